"""PiSSA, OLoRA, DoRA, DeLoRA: the init math, every layout, and parity with PEFT (torch CPU, fp32)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from layers import LAYOUT_IDS, LAYOUTS

from lora_jax import (
    AdapterConfig,
    AdapterParam,
    DeLoRAConfig,
    DoRAConfig,
    LoRAConfig,
    OLoRAConfig,
    PiSSAConfig,
    Rule,
    ViewInfo,
    apply_adapters,
    linalg,
    merge_adapters,
    register_view,
    set_alpha,
)
from lora_jax.variants import to_lora

CONFIGS = {
    "pissa": PiSSAConfig(r=2, lora_alpha=4.0),
    "pissa_randomized": PiSSAConfig(r=2, lora_alpha=4.0, niter=2),
    "olora": OLoRAConfig(r=2, lora_alpha=4.0),
    "dora": DoRAConfig(r=2, lora_alpha=4.0),
    "delora": DeLoRAConfig(r=2),
}


class Wrap(nnx.Module):
    def __init__(self, layer):
        self.layer = layer

    def __call__(self, x):
        return self.layer(x)


def adapt(layer, variant):
    return apply_adapters(Wrap(layer), AdapterConfig(rules=(Rule(pattern="layer", variant=variant),)))


def perturb(model, seed=1, size=0.3):
    """Move every trainable adapter leaf away from its init (a trained, non-identity adapter)."""
    state = nnx.state(model, AdapterParam)
    leaves, tree = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = [x + size * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys, strict=True)]
    nnx.update(model, jax.tree.unflatten(tree, noisy))


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)  # an exact 0 == 0 is 0


# -- linalg ------------------------------------------------------------------------------
def test_randomized_svd_top_r_error_matches_full_svd():
    m = jax.random.normal(jax.random.key(0), (2, 64, 48))  # flat spectrum: the hard case
    full = linalg.svd_error(m, *linalg.top_r_svd(m, 8))
    approx = linalg.svd_error(m, *linalg.randomized_svd(m, 8, niter=4, key=jax.random.key(1)))
    assert np.all(np.asarray(approx - full) < 1e-3), (approx, full)
    no_power = linalg.svd_error(m, *linalg.randomized_svd(m, 8, niter=0, key=jax.random.key(1)))
    assert np.all(np.asarray(no_power - full) > 1e-3)  # the power iterations are what close the gap
    wide = linalg.svd_error(m, *linalg.randomized_svd(m, 8, niter=0, oversample=24, key=jax.random.key(1)))
    assert np.all(np.asarray(wide) < np.asarray(no_power))  # and so does a wider sketch


def test_randomized_svd_of_rank_deficient_kernels_is_finite_and_exact():
    k1, k2 = jax.random.split(jax.random.key(0))
    rank_two = jax.random.normal(k1, (64, 2)) @ jax.random.normal(k2, (2, 48))
    for m in (jnp.zeros((64, 48)), rank_two):  # zero pivots in the LU renormalization
        u, s, vh = linalg.randomized_svd(m, 4, niter=4, key=jax.random.key(1))
        assert all(bool(jnp.isfinite(t).all()) for t in (u, s, vh))
        np.testing.assert_allclose((u * s[None, :]) @ vh, m, atol=1e-4)
        np.testing.assert_allclose(u.T @ u, np.eye(4), atol=1e-5)  # orthonormal even past the rank


def test_lq_and_full_rank_svd_reconstruct():
    m = jax.random.normal(jax.random.key(0), (3, 7, 5))
    low, q = linalg.lq(m)
    assert rel_err(low @ q, m) < 1e-6
    np.testing.assert_allclose(q @ jnp.swapaxes(q, -1, -2), np.broadcast_to(np.eye(5), (3, 5, 5)), atol=1e-6)
    assert np.all(np.asarray(linalg.svd_error(m, *linalg.top_r_svd(m, 5))) < 1e-6)


# -- beyond the contract suite (tests/test_contract.py has identity, alpha=0, merge, training)
ROW_LAYOUTS = [lay for lay in LAYOUTS if lay.name in ("linear", "kv_packed", "o_BTNH_NHD", "per_head_BTNH_NHK")]


@pytest.mark.parametrize("layout", ROW_LAYOUTS, ids=[lay.name for lay in ROW_LAYOUTS])
@pytest.mark.parametrize("variant", CONFIGS.values(), ids=CONFIGS.keys())
def test_one_alpha_per_row_is_a_sweep_in_one_pass(variant, layout):
    layer, x = layout.build()
    y_base = layer(x)
    model = adapt(layer, variant)
    assert jnp.array_equal(model(x), y_base)  # also covers the randomized PiSSA init
    perturb(model)
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


@pytest.mark.parametrize("layout", LAYOUTS[::3], ids=LAYOUT_IDS[::3])
@pytest.mark.parametrize("variant", [CONFIGS["pissa"], CONFIGS["olora"]], ids=["pissa", "olora"])
def test_to_lora_gives_the_same_layer(variant, layout):
    layer, x = layout.build()
    model = adapt(layer, variant)
    perturb(model)
    set_alpha(model, 0.6)
    lora = to_lora(model.layer)
    assert lora.lora_a.shape[-1] == 2 * variant.r
    assert rel_err(lora(x), model(x)) < 1e-5
    kernel = model.layer.spec.kernel_to_matrix(layer.kernel[...])
    assert rel_err(lora.merged(kernel, None)[0], model.layer.merged(kernel, None)[0]) < 1e-5


@pytest.mark.parametrize("layout", LAYOUTS[::2], ids=LAYOUT_IDS[::2])
@pytest.mark.parametrize("niter", [None, 4])
def test_pissa_factors_are_the_principal_part(layout, niter):
    layer, _ = layout.build()
    model = adapt(layer, PiSSAConfig(r=2, lora_alpha=4.0, niter=niter))
    adapter = model.layer
    w = adapter.spec.kernel_to_matrix(layer.kernel[...])
    top = adapter.config.scale * (adapter.base_a[...] @ adapter.base_b[...])
    tail = jnp.linalg.svd(w, compute_uv=False)[..., 2:]
    # W_res = W - s A0 B0 holds exactly the singular values PiSSA left out.
    tol = 1e-5 if niter is None else 2e-2
    assert rel_err(jnp.linalg.norm(w - top, axis=(-2, -1)), jnp.linalg.norm(tail, axis=-1)) < tol
    full = adapt(layer, PiSSAConfig(r=min(adapter.spec.d_in, adapter.spec.d_out), niter=niter)).layer
    assert rel_err(full.config.scale * (full.base_a[...] @ full.base_b[...]), w) < 1e-5  # W_res + s B A == W


# -- errors ------------------------------------------------------------------------------
class Int8Linear(nnx.Module):
    """A toy weight-only-quantized layer: its kernel attribute is int8 storage, not the weight."""

    def __init__(self):
        self.w = nnx.Param(jnp.ones((16, 12), jnp.int8))
        self.w_scale = nnx.Param(jnp.full((12,), 0.1))

    def __call__(self, x):
        return x @ (self.w[...].astype(x.dtype) * self.w_scale[...])


register_view(Int8Linear, lambda m: ViewInfo("...i,io->...o", kernel="w"))

READS_KERNEL = {k: CONFIGS[k] for k in ("pissa", "olora", "dora", "delora")}


@pytest.mark.parametrize("variant", READS_KERNEL.values(), ids=READS_KERNEL.keys())
def test_variants_that_read_the_kernel_refuse_one_that_is_not_dense(variant):
    with pytest.raises(ValueError, match=r"kernel 'w' of 'layer' is an array of dtype int8, not a dense float array"):
        adapt(Int8Linear(), variant)
    adapt(Int8Linear(), LoRAConfig(r=2))  # LoRA never reads it, so the same layer is fine there


class Packed:
    """An opaque weight container (packed 4-bit, say): it has a shape but is no array."""

    shape = (16, 12)


class PackedLinear(nnx.Module):
    def __init__(self):
        self.w = Packed()


register_view(PackedLinear, lambda m: ViewInfo("...i,io->...o", kernel="w"))


def test_an_opaque_kernel_container_is_named_in_the_error():
    with pytest.raises(ValueError, match=r"pissa: the kernel 'w' of 'layer' is a Packed, not a dense float array"):
        adapt(PackedLinear(), PiSSAConfig(r=2))


@pytest.mark.parametrize("variant", READS_KERNEL.values(), ids=READS_KERNEL.keys())
def test_rank_bounds(variant):
    layer, _ = LAYOUTS[0].build()  # d_in=16, d_out=12
    with pytest.raises(ValueError, match=r"rank r=13 at 'layer' must be an integer in \[1, 12\]"):
        adapt(layer, type(variant)(r=13))
    with pytest.raises(ValueError, match=r"rank r=0"):
        adapt(layer, type(variant)(r=0))


def test_bad_options():
    with pytest.raises(ValueError, match=r"pissa: niter=-1 must be None \(full SVD\) or an integer >= 0"):
        PiSSAConfig(niter=-1)
    with pytest.raises(ValueError, match=r"delora: dropout=1.0 must be in \[0, 1\)"):
        DeLoRAConfig(dropout=1.0)
    with pytest.raises(ValueError, match=r"pissa: oversample=-2 must be an integer >= 0"):
        PiSSAConfig(niter=2, oversample=-2)


# -- parity with PEFT (torch CPU, fp32, nn.Linear(16, 12) with bias) ---------------------
class TorchNet(torch.nn.Module):
    def __init__(self, layer: nnx.Linear):
        super().__init__()
        self.proj = torch.nn.Linear(16, 12)
        with torch.no_grad():
            self.proj.weight.copy_(torch.from_numpy(np.asarray(layer.kernel[...]).T.copy()))
            self.proj.bias.copy_(torch.from_numpy(np.asarray(layer.bias[...]).copy()))

    def forward(self, x):
        return self.proj(x)


def t2j(t):
    return jnp.asarray(t.detach().numpy())


def j2t(a):
    return torch.from_numpy(np.array(a))


def peft_pair(peft_config, variant):
    """The same nnx.Linear under our adapter and under PEFT."""
    import peft

    layer, x = LAYOUTS[0].build(seed=3)
    torch.manual_seed(0)
    theirs = peft.get_peft_model(TorchNet(layer), peft_config).base_model.model.proj
    return adapt(layer, variant), theirs, x


def set_random(ours, theirs, names, seed=5):
    """Copy the same non-identity weights into both: ``names`` maps our Variable to PEFT's tensor."""
    gen = torch.Generator().manual_seed(seed)
    for ours_name, get in names.items():
        tensor = get(theirs)
        with torch.no_grad():
            tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.3 + (1.0 if "magnitude" in ours_name else 0.0))
        value = t2j(tensor)
        var = getattr(ours, ours_name)
        var.value = value.T if value.ndim == 2 else value.reshape(var.shape)


def check_forward_and_merge(model, theirs, x):
    y_theirs = theirs(j2t(x))
    assert rel_err(model(x), t2j(y_theirs)) < 1e-5
    merged = merge_adapters(model).layer.kernel[...]
    theirs.merge()
    assert rel_err(merged, t2j(theirs.base_layer.weight).T) < 1e-5
    return y_theirs


LORA_WEIGHTS = {"lora_a": lambda m: m.lora_A["default"].weight, "lora_b": lambda m: m.lora_B["default"].weight}


@pytest.mark.parametrize(("init", "variant"), [("pissa", CONFIGS["pissa"]), ("olora", CONFIGS["olora"])])
def test_residual_init_and_forward_match_peft(init, variant):
    import peft

    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["proj"], init_lora_weights=init)
    model, theirs, x = peft_pair(config, variant)
    adapter, s = model.layer, variant.scale
    w = model.layer.base.kernel[...]
    # Init: the same principal part (sign-free: compare products) and the same residual.
    their_top = s * (theirs.lora_B["default"].weight @ theirs.lora_A["default"].weight)
    assert rel_err(s * adapter.base_a[...] @ adapter.base_b[...], t2j(their_top).T) < 1e-5
    assert rel_err(w - s * adapter.base_a[...] @ adapter.base_b[...], t2j(theirs.base_layer.weight).T) < 1e-5
    assert rel_err(model(x), t2j(theirs(j2t(x)))) < 1e-5
    set_random(adapter, theirs, LORA_WEIGHTS)
    check_forward_and_merge(model, theirs, x)


def test_pissa_randomized_init_finds_peft_principal_part():
    import peft

    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["proj"], init_lora_weights="pissa_niter_16")
    model, theirs, _ = peft_pair(config, PiSSAConfig(r=2, lora_alpha=4.0, niter=16))
    ours = model.layer.base_a[...] @ model.layer.base_b[...]
    their_top = t2j(theirs.lora_B["default"].weight @ theirs.lora_A["default"].weight).T
    assert rel_err(ours, their_top) < 1e-3  # both approximate the same top-2 part


@pytest.mark.parametrize("kind", ["dora", "delora"])
def test_dora_and_delora_forward_merge_and_grads_match_peft(kind):
    import peft

    if kind == "dora":
        config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["proj"], use_dora=True)
        names = {**LORA_WEIGHTS, "magnitude": lambda m: m.lora_magnitude_vector["default"].weight}
    else:
        config = peft.DeloraConfig(r=2, delora_lambda=15, target_modules=["proj"])
        names = {
            "lora_a": lambda m: m.delora_A["default"],
            "lora_b": lambda m: m.delora_B["default"],
            "delora_lambda": lambda m: m.delora_lambda["default"],
        }
    model, theirs, x = peft_pair(config, CONFIGS[kind])
    if kind == "delora":
        assert rel_err(model.layer.w_norm[...], t2j(theirs.delora_w_norm["default"])) < 1e-6
    g = jax.random.normal(jax.random.key(9), (*x.shape[:-1], 12))
    model.layer.lora_a.value = t2j(names["lora_a"](theirs)).T  # the random part of the init
    check_grads(model, theirs, names, x, g)  # at init: B = 0, DeLoRA's clamp regime
    set_random(model.layer, theirs, names)
    check_grads(model, theirs, names, x, g)
    check_forward_and_merge(model, theirs, x)


def check_grads(model, theirs, names, x, g):
    def loss(m):
        return jnp.sum(m(x) * g)

    ours = nnx.grad(loss, argnums=nnx.DiffState(0, AdapterParam))(model)
    theirs.zero_grad()
    (theirs(j2t(x)) * j2t(g)).sum().backward()
    for name, get in names.items():
        want = t2j(get(theirs).grad)
        got = getattr(ours.layer, name)[...]
        assert np.all(np.isfinite(got)), name
        assert rel_err(got, want.T if want.ndim == 2 else want.reshape(got.shape)) < 1e-5, name


@pytest.mark.parametrize(
    "variant", [PiSSAConfig(r=2, dropout=0.5), OLoRAConfig(r=2, dropout=0.5), DeLoRAConfig(r=2, dropout=0.5)]
)
def test_dropout_acts_only_in_train_mode_and_only_on_the_adapter(variant):
    layer, x = LAYOUTS[0].build()
    y_base = layer(x)
    model = adapt(layer, variant)
    perturb(model)
    model.eval()
    y_eval = model(x)
    assert rel_err(merge_adapters(model)(x), y_eval) < 1e-5
    model.train()
    assert rel_err(model(x), y_eval) > 1e-3
    set_alpha(model, 0.0)
    assert jnp.array_equal(model(x), y_base)
    with pytest.raises(ValueError, match=r"dora: dropout=0.5 is not supported; use dropout=0.0"):
        DoRAConfig(dropout=0.5)
