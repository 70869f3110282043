"""What the low-rank variants beyond LoRA share (lora_jax/variants/_lowrank.py): PiSSA,
OLoRA, DoRA and DeLoRA take one alpha per row, refuse kernels they cannot read, bound
their rank, and apply dropout to the adapter only. Each variant's own math and PEFT parity
are in tests/test_<variant>.py; identity, alpha=0, merge and training in test_contract.py."""

from __future__ import annotations

import jax.numpy as jnp
import pytest
from flax import nnx
from helpers import adapt, perturb, rel_err
from layers import LAYOUTS

from lora_jax import (
    DeLoRAConfig,
    DoRAConfig,
    LoRAConfig,
    OLoRAConfig,
    PiSSAConfig,
    ViewInfo,
    merge_adapters,
    set_alpha,
)

CONFIGS = {
    "pissa": PiSSAConfig(r=2, lora_alpha=4.0),
    "pissa_randomized": PiSSAConfig(r=2, lora_alpha=4.0, niter=2),
    "olora": OLoRAConfig(r=2, lora_alpha=4.0),
    "dora": DoRAConfig(r=2, lora_alpha=4.0),
    "delora": DeLoRAConfig(r=2),
}
ROW_LAYOUTS = [lay for lay in LAYOUTS if lay.name in ("linear", "kv_packed", "o_BTNH_NHD", "per_head_BTNH_NHK")]


@pytest.mark.parametrize("layout", ROW_LAYOUTS, ids=[lay.name for lay in ROW_LAYOUTS])
@pytest.mark.parametrize("variant", CONFIGS.values(), ids=CONFIGS.keys())
def test_one_alpha_per_row_is_a_sweep_in_one_pass(variant, layout):
    layer, x = layout.build()
    y_base = layer(x)
    model = adapt(layer, variant)
    assert jnp.array_equal(model(x), y_base)  # also covers the randomized PiSSA init
    perturb(model, 0.3, seed=1)
    y1 = model(x)
    set_alpha(model, -0.7)
    y_neg = model(x)
    set_alpha(model, jnp.array([0.0, 1.0, -0.7]))
    lay = model.layer.spec.layout(x.ndim)
    rows = [jnp.moveaxis(v, lay.out.index(lay.lhs[0]), 0) for v in (model(x), y_base, y1, y_neg)]
    assert jnp.array_equal(rows[0][0], rows[1][0])
    assert rel_err(rows[0][1], rows[2][1]) < 1e-6
    assert rel_err(rows[0][2], rows[3][2]) < 1e-6
    assert rel_err(rows[2][1], rows[1][1]) > 1e-2


# -- kernels a variant cannot read -----------------------------------------------------------
class Int8Linear(nnx.Module):
    """A toy weight-only-quantized layer: its kernel attribute is int8 storage, not the weight."""

    def __init__(self):
        self.w = nnx.Param(jnp.ones((16, 12), jnp.int8))
        self.w_scale = nnx.Param(jnp.full((12,), 0.1))

    def __call__(self, x):
        return x @ (self.w[...].astype(x.dtype) * self.w_scale[...])


READS_KERNEL = {k: CONFIGS[k] for k in ("pissa", "olora", "dora", "delora")}


@pytest.mark.parametrize("variant", READS_KERNEL.values(), ids=READS_KERNEL.keys())
def test_variants_that_read_the_kernel_refuse_one_that_is_not_dense(variant, register_view):
    register_view(Int8Linear, lambda m: ViewInfo("...i,io->...o", kernel="w"))
    with pytest.raises(ValueError, match=r"kernel 'w' of 'layer' is an array of dtype int8, not a dense float array"):
        adapt(Int8Linear(), variant)
    adapt(Int8Linear(), LoRAConfig(r=2))  # LoRA never reads it, so the same layer is fine there


class Packed:
    """An opaque weight container (packed 4-bit, say): it has a shape but is no array."""

    shape = (16, 12)


class PackedLinear(nnx.Module):
    def __init__(self):
        self.w = Packed()


def test_an_opaque_kernel_container_is_named_in_the_error(register_view):
    register_view(PackedLinear, lambda m: ViewInfo("...i,io->...o", kernel="w"))
    with pytest.raises(ValueError, match=r"pissa: the kernel 'w' of 'layer' is a Packed, not a dense float array"):
        adapt(PackedLinear(), PiSSAConfig(r=2))


@pytest.mark.parametrize("variant", READS_KERNEL.values(), ids=READS_KERNEL.keys())
def test_rank_bounds(variant):
    layer, _ = LAYOUTS[0].build()  # d_in=16, d_out=12
    with pytest.raises(ValueError, match=r"rank r=13 at 'layer' must be an integer in \[1, 12\]"):
        adapt(layer, type(variant)(r=13))
    with pytest.raises(ValueError, match=r"rank r=0"):
        adapt(layer, type(variant)(r=0))


@pytest.mark.parametrize(
    "variant", [PiSSAConfig(r=2, dropout=0.5), OLoRAConfig(r=2, dropout=0.5), DeLoRAConfig(r=2, dropout=0.5)]
)
def test_dropout_acts_only_in_train_mode_and_only_on_the_adapter(variant):
    layer, x = LAYOUTS[0].build()
    y_base = layer(x)
    model = adapt(layer, variant)
    perturb(model, 0.3, seed=1)
    model.eval()
    y_eval = model(x)
    assert rel_err(merge_adapters(model)(x), y_eval) < 1e-5
    model.train()
    assert rel_err(model(x), y_eval) > 1e-3
    set_alpha(model, 0.0)
    assert jnp.array_equal(model(x), y_base)
