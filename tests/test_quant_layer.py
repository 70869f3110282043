"""Adapters over a quantized base: every variant of the contract suite on int8, int4 and nf4
kernels. Identity at init and alpha=0 are checked bit for bit against the QUANTIZED base
(eagerly and under jit); training (one variant per distinct path through the quantized
layer) moves only adapter leaves (the codes and scales stay bit-identical) and fits the
contract's toy task."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import max_rel_err as _rel_err
from helpers import perturb
from layers import LAYOUT_IDS, LAYOUTS
from test_contract import CASES, _adapt

import lora_jax as lj
from lora_jax import quant

FORMATS = {
    "int8": quant.Int8(),
    "int4": quant.Int4(group_size=4),
    "int4_sym": quant.Int4(group_size=4, symmetric=True),
    "nf4": quant.NF4(group_size=4),
}


class MLP(nnx.Module):
    """Linear, a q-style einsum and an o-style einsum: three view layouts in one model."""

    def __init__(self, rngs, dtype=jnp.float32):
        self.up = nnx.Linear(12, 24, rngs=rngs, param_dtype=dtype, bias_init=nnx.initializers.normal())
        self.heads = nnx.Einsum("BTD,DNH->BTNH", (24, 2, 6), (2, 6), rngs=rngs, param_dtype=dtype)
        self.down = nnx.Einsum("BTNH,NHD->BTD", (2, 6, 12), rngs=rngs, param_dtype=dtype)

    def __call__(self, x):
        return self.down(jnp.tanh(self.heads(jnp.tanh(self.up(x)))))


class Wrap(nnx.Module):
    def __init__(self, layer):
        self.layer = layer

    def __call__(self, x):
        return self.layer(x)


@nnx.jit
def _jit_call(model, x):
    return model(x)


def _storage(model):
    return jax.tree.map(np.asarray, nnx.state(model, quant.QuantizedWeight))


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
def test_quantized_layer_is_the_float_layer_on_its_dequantized_kernel(fmt, dtype):
    model = MLP(nnx.Rngs(0), dtype)
    qmodel = quant.quantize(model, FORMATS[fmt])
    x = jax.random.normal(jax.random.key(1), (2, 3, 12)).astype(dtype)
    assert {p for p, _ in quant.quantized_layers(qmodel)} == {"up", "heads", "down"}
    assert not quant.quantized_layers(model), "quantize must not touch the caller's model"
    back = quant.dequantize(qmodel)
    assert type(back.up) is nnx.Linear and type(back.heads) is nnx.Einsum
    np.testing.assert_array_equal(np.asarray(back(x)), np.asarray(qmodel(x)))
    assert qmodel.up.kernel.shape == model.up.kernel.shape and qmodel.up.kernel.dtype == dtype
    # quantizing the dequantized kernels again lands on the same codes (scales may move an ulp)
    again = quant.quantize(back, FORMATS[fmt])
    np.testing.assert_array_equal(np.asarray(again.heads.codes[...]), np.asarray(qmodel.heads.codes[...]))
    assert 0 < _rel_err(qmodel(x), model(x)) < (0.2 if FORMATS[fmt].bits == 4 else 0.02)


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_every_layout_quantizes_and_adapts(layout):
    layer, x = layout.build()
    qmodel = quant.quantize(Wrap(layer), quant.Int8())
    adapted = _adapt(CASES["pissa"], qmodel, x)
    np.testing.assert_array_equal(np.asarray(adapted(x)), np.asarray(qmodel(x)))
    assert _rel_err(quant.dequantize(qmodel)(x), qmodel(x)) == 0


# The base path does not depend on the format (only its dequantization does): one 8-bit
# and one 4-bit format per variant keep the suite fast.
@pytest.mark.parametrize("fmt", ["int8", "nf4"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_identity_and_alpha_zero_on_quantized_base(name, fmt):
    case = CASES[name]
    x = jax.random.normal(jax.random.key(1), (2, 3, 12))
    base = quant.quantize(MLP(nnx.Rngs(0)), FORMATS[fmt])
    adapted = _adapt(case, base, x)
    y0, y0_jit = base(x), _jit_call(base, x)
    if case.bit_exact_init:
        np.testing.assert_array_equal(np.asarray(adapted(x)), np.asarray(y0))
        np.testing.assert_array_equal(np.asarray(_jit_call(adapted, x)), np.asarray(y0_jit))
    else:
        assert _rel_err(adapted(x), y0) < 1e-6
    perturb(adapted, case.perturb, seed=7)
    assert _rel_err(adapted(x), y0) > 0
    lj.set_alpha(adapted, 0.0)
    np.testing.assert_array_equal(np.asarray(adapted(x)), np.asarray(y0))
    np.testing.assert_array_equal(np.asarray(_jit_call(adapted, x)), np.asarray(y0_jit))


# Training over the quantized base, for the variants whose path through it differs: LoRA
# (an output-side sum), those that read the dequantized kernel (PiSSA, OLoRA, DoRA, DeLoRA,
# AntiPaSTO) or calibrate on its activations (EVA), those whose gradient flows back through
# the quantized layer to an input-side change (IA3-FF, HRA, OFT, BOFT), and the two with
# frozen state of their own besides the codes (VeRA's projection, AdaLoRA's rank mask).
# Identity and alpha=0 above cover every case.
TRAINED = ("lora", "pissa", "olora", "dora", "delora", "antipasto", "eva", "ia3_ff", "hra", "oft", "boft_butterfly",
           "vera", "adalora")  # fmt: skip


@pytest.mark.parametrize("name", TRAINED)
def test_training_over_quantized_base_moves_only_adapters(name):
    case = CASES[name]
    x = jax.random.normal(jax.random.key(1), (8, 6, 12))
    base = quant.quantize(MLP(nnx.Rngs(0)), FORMATS["int4"])
    teacher = _adapt(case, base, x)
    perturb(teacher, 4 * case.perturb, seed=11)
    target = teacher(x)
    model = _adapt(case, base, x)
    frozen_before = jax.tree.map(np.asarray, nnx.state(model, nnx.Not(lj.AdapterParam)))
    optimizer = nnx.Optimizer(model, optax.adam(case.lr), wrt=lj.AdapterParam)

    @nnx.jit
    def step(m, opt):
        loss_fn = lambda m: jnp.mean((m(x) - target) ** 2)
        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, lj.AdapterParam))(m)
        opt.update(m, grads)
        return loss

    first = float(step(model, optimizer))
    for _ in range(case.steps - 1):
        loss = step(model, optimizer)
    assert float(loss) < case.toy_loss_ratio * first, (first, float(loss))
    frozen_after = jax.tree.map(np.asarray, nnx.state(model, nnx.Not(lj.AdapterParam)))
    pairs = zip(jax.tree.leaves_with_path(frozen_before), jax.tree.leaves(frozen_after), strict=True)
    for (path, before), after in pairs:
        np.testing.assert_array_equal(before, after, err_msg=jax.tree_util.keystr(path))
    assert jax.tree.leaves(_storage(model)), "the quantized storage is frozen state of the model"


def test_quantized_storage_is_not_a_param_and_not_saved_with_the_adapter(tmp_path):
    from lora_jax.checkpoint import restore, save

    x = jax.random.normal(jax.random.key(1), (2, 3, 12))
    base = quant.quantize(MLP(nnx.Rngs(0)), FORMATS["int4"])
    params = jax.tree.leaves(nnx.state(base, nnx.Param))
    assert len(params) == 2 and all(jnp.issubdtype(p.dtype, jnp.floating) for p in params)  # the two biases
    model = _adapt(CASES["lora"], base, x)
    perturb(model, 0.1, seed=7)
    restored = restore(save(tmp_path / "q", model), quant.quantize(MLP(nnx.Rngs(0)), FORMATS["int4"]))
    np.testing.assert_array_equal(np.asarray(restored(x)), np.asarray(model(x)))


def test_codes_are_stored_in_narrow_dtypes():
    base = quant.quantize(MLP(nnx.Rngs(0)), FORMATS["nf4"])
    assert base.up.codes[...].dtype == jnp.uint4 and base.up.scale[...].shape == (12 // 4, 24)
    assert quant.quantize(MLP(nnx.Rngs(0)), quant.Int8()).up.codes[...].dtype == jnp.int8
    sizes = quant.kernel_bytes(base)
    assert sizes["quantized"] == (12 * 24 + 24 * 12 + 12 * 12) // 2 + 4 * (3 * 24 + 6 * 12 + 3 * 12)


def test_quantize_refuses_bad_input_before_changing_anything():
    model = MLP(nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"'heads'.*d_in=24 is not a multiple of group_size=5"):
        quant.quantize(model, quant.Int4(group_size=5), pattern="heads")
    with pytest.raises(ValueError, match="no linear-like layer matches"):
        quant.quantize(model, quant.Int8(), pattern="nothing")
    with pytest.raises(TypeError, match="needs a format"):
        quant.quantize(model, "nf4")
    with pytest.raises(ValueError, match="already carries an adapter"):
        quant.quantize(_adapt(CASES["lora"], model, None), quant.Int8())
    with pytest.raises(ValueError, match="group_size=0 must be a positive integer"):
        quant.Int4(group_size=0)
    assert type(model.heads) is nnx.Einsum and not quant.quantized_layers(model)
    qmodel = quant.quantize(model, quant.Int8(), exclude=("down",))
    assert type(qmodel.down) is nnx.Einsum and isinstance(qmodel.up, quant.QuantizedLayer)
    with pytest.raises(TypeError, match=r"reads whole: use kernel\[...\]"):
        qmodel.up.kernel[0]
