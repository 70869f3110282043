"""AntiPaSTO: rotations, delta form against a float64 dense reference, steering symmetry."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from layers import LAYOUT_IDS, LAYOUTS

from lora_jax import (
    AdapterConfig,
    AdapterParam,
    AntiPaSTOConfig,
    DeltaS,
    RotationParam,
    Rule,
    apply_adapters,
    iter_adapters,
    merge_adapters,
    set_alpha,
)
from lora_jax.variants.antipasto_cayley import (
    angle_limit,
    block_diag,
    bound_skew,
    cayley,
    n_params,
    orthogonality_error,
    rotation_angles,
    skew_from_params,
)
from lora_jax.views import ViewInfo

BY_NAME = {layout.name: layout for layout in LAYOUTS}


class Host(nnx.Module):
    def __init__(self, layer):
        self.layer = layer

    def __call__(self, x):
        return self.layer(x)


def adapted(layout_name, *, scale=0.3, **options):
    """A layout with an AntiPaSTO adapter whose trainable leaves are random (not identity)."""
    layer, x = BY_NAME[layout_name].build(0)
    host = Host(layer)
    variant = AntiPaSTOConfig(**{"r": 4, "block_size": 2, **options})
    model = apply_adapters(host, AdapterConfig(rules=(Rule(pattern="layer", variant=variant),)))
    params = nnx.state(model, AdapterParam)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    noisy = [p + scale * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys, strict=True)]
    nnx.update(model, jax.tree.unflatten(treedef, noisy))
    return host, model, x


def the_adapter(model):
    [(_, adapter)] = list(iter_adapters(model))
    return adapter


# -- cayley.py ------------------------------------------------------------------------
@pytest.mark.parametrize("bs", [2, 3, 4, 8])
def test_cayley_orthogonal_and_inverse(bs):
    params = 3.0 * jax.random.normal(jax.random.key(bs), (5, n_params(bs)))
    skew = bound_skew(skew_from_params(params), math.pi / 3)
    assert float(jnp.max(jnp.abs(skew + jnp.swapaxes(skew, -1, -2)))) == 0.0
    # fp32 rounding grows with bs and |a| (cond(I - aA/2)): 1e-6 up to |a| = 2.5, 4e-6 at 10.
    for a, tol in ((0.3, 1e-6), (1.0, 1e-6), (-2.5, 1e-6), (10.0, 4e-6)):
        r_plus, r_minus = cayley(skew, a), cayley(skew, -a)
        assert float(orthogonality_error(r_plus)) < tol
        assert float(jnp.max(jnp.abs(r_minus @ r_plus - jnp.eye(bs)[None]))) < tol
        assert float(jnp.max(jnp.abs(r_minus - jnp.swapaxes(r_plus, -1, -2)))) < tol
    assert bool(jnp.all(cayley(skew, 0.0) == jnp.eye(bs)[None]))


def test_cayley_per_row_alpha_prepends_rows():
    skew = skew_from_params(jax.random.normal(jax.random.key(0), (2, 3, 6)))
    a = jnp.array([0.5, -1.0, 2.0, 0.0])
    rows = cayley(skew, a)
    assert rows.shape == (4, 2, 3, 4, 4)
    for i in range(4):
        np.testing.assert_allclose(rows[i], cayley(skew, a[i]), atol=1e-6)


@pytest.mark.parametrize("bs", [2, 4])
def test_angle_bound(bs):
    """bs=2: |angle| < max_angle for |a| <= 1, and the bound is tight; bs>2: entrywise, so
    the angle is below angle_limit(max_angle, bs), which exceeds max_angle."""
    max_angle = math.pi / 4
    params = 1e4 * jax.random.normal(jax.random.key(3), (64, n_params(bs)))
    skew = bound_skew(skew_from_params(params), max_angle)
    angles = jnp.concatenate([rotation_angles(cayley(skew, a)).ravel() for a in (-1.0, -0.5, 0.7, 1.0)])
    limit = angle_limit(max_angle, bs)
    assert float(angles.max()) <= limit + 1e-5
    if bs == 2:
        assert limit == pytest.approx(max_angle)
        assert float(angles.max()) > max_angle - 1e-3
    else:
        assert limit > max_angle
    wide = rotation_angles(cayley(skew, 10.0))
    assert float(wide.max()) > max_angle and float(wide.max()) < math.pi


def test_block_diag_and_param_errors():
    blocks = jnp.arange(2 * 2 * 2, dtype=jnp.float32).reshape(2, 2, 2)
    dense = block_diag(blocks)
    np.testing.assert_array_equal(dense[:2, :2], blocks[0])
    np.testing.assert_array_equal(dense[2:, 2:], blocks[1])
    assert float(jnp.abs(dense[:2, 2:]).max()) == 0.0
    with pytest.raises(ValueError, match="not bs"):
        skew_from_params(jnp.zeros((3, 4)))


# -- the adapter ------------------------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUT_IDS)
def test_alpha_zero_is_bit_identical_and_merge_matches(layout):
    host, model, x = adapted(layout, rotate="both", delta_s_init=0.1)
    y_base = host(x)
    y = model(x)
    assert float(jnp.abs(y - y_base).max()) > 1e-3  # the adapter does something
    np.testing.assert_allclose(merge_adapters(model)(x), y, atol=1e-5)
    set_alpha(model, 0.0)
    np.testing.assert_array_equal(model(x), y_base)


def test_identity_at_init():
    layer, x = BY_NAME["q_BTD_DNH"].build(0)
    host = Host(layer)
    model = apply_adapters(host, AdapterConfig(rules=(Rule(pattern="layer", variant=AntiPaSTOConfig(r=4)),)))
    np.testing.assert_array_equal(model(x), host(x))


def numpy_reference(adapter, x, y_base, a):
    """W_res + U R_in(a) diag(S + a d) R_out(a)^T Vh in float64 numpy, applied as an einsum."""
    cfg, spec = adapter.config, adapter.spec
    f64 = lambda v: np.asarray(v, np.float64)
    kernel = f64(spec.kernel_to_matrix(adapter.base.kernel[...]))
    u, s, vh = f64(adapter.u[...]), f64(adapter.s[...]), f64(adapter.vh[...])
    d = f64(adapter.delta_s[...])
    c = 2 * math.tan(cfg.max_angle / 2)

    def rotation(param):
        if param is None:
            return np.broadcast_to(np.eye(cfg.r), (*s.shape, cfg.r))
        p, bs = f64(param[...]), cfg.block_size
        rows, cols = np.triu_indices(bs, 1)
        skew = np.zeros((*p.shape[:-1], bs, bs))
        skew[..., rows, cols] = p
        skew = c * np.tanh((skew - np.swapaxes(skew, -1, -2)) / c)
        blocks = np.linalg.solve(np.eye(bs) - a * skew / 2, np.eye(bs) + a * skew / 2)
        dense = np.zeros((*p.shape[:-2], cfg.r, cfg.r))
        for k in range(cfg.r // bs):
            dense[..., k * bs : (k + 1) * bs, k * bs : (k + 1) * bs] = blocks[..., k, :, :]
        return dense

    w_res = kernel - (u * s[..., None, :]) @ vh
    r_in, r_out = rotation(adapter.rot_in), rotation(adapter.rot_out)
    w_a = w_res + (u @ r_in * (s + a * d)[..., None, :]) @ np.swapaxes(r_out, -1, -2) @ vh
    order = spec.batch + spec.contracted + spec.output
    change = (w_a - kernel).reshape([spec.kernel_shape[spec.kernel.index(c)] for c in order])
    change = np.transpose(change, [order.index(c) for c in spec.kernel])
    lay = spec.layout(x.ndim)
    return f64(y_base) + np.einsum(f"{lay.lhs},{spec.kernel}->{lay.out}", f64(x), change)


@pytest.mark.parametrize("rotate", ["input", "output", "both", "none"])
@pytest.mark.parametrize("layout", ["linear", "q_BTD_NDH", "kv_packed", "moe_EBD_EDF", "per_head_BTNH_NHK"])
def test_matches_float64_dense_reference(layout, rotate):
    host, model, x = adapted(layout, rotate=rotate, block_size=2, delta_s_init=0.05)
    adapter, y_base = the_adapter(model), host(x)
    for a in (1.0, -1.0, 0.6):
        set_alpha(model, a)
        np.testing.assert_allclose(model(x), numpy_reference(adapter, x, y_base, a), atol=1e-5)


@pytest.mark.parametrize("options", [{"delta_s": False}, {"svd_iters": 2}], ids=["no_shift", "randomized_svd"])
def test_options_match_reference(options):
    """Shifts off: no DeltaS leaf, shifts frozen at 0. Randomized SVD: the delta form needs
    only orthonormal-ish bases, so an approximate top-r changes nothing about exactness."""
    host, model, x = adapted("q_BTD_DNH", block_size=2, **options)
    adapter, y_base = the_adapter(model), host(x)
    assert bool(jax.tree.leaves(nnx.state(model, DeltaS))) == options.get("delta_s", True)
    np.testing.assert_allclose(model(x), numpy_reference(adapter, x, y_base, 1.0), atol=1e-5)
    np.testing.assert_allclose(merge_adapters(model)(x), model(x), atol=1e-5)
    set_alpha(model, 0.0)
    np.testing.assert_array_equal(model(x), y_base)


def test_per_row_alpha_matches_scalar_runs():
    _, model, x = adapted("per_head_BTNH_NHK", rotate="both", delta_s_init=0.1)
    alphas = [1.0, -1.0, 0.4]
    set_alpha(model, jnp.array(alphas))
    per_row = model(x)
    for i, a in enumerate(alphas):
        set_alpha(model, a)
        np.testing.assert_allclose(per_row[i], model(x)[i], atol=1e-6)


def test_rotation_inverse_pair_on_svd_part():
    """Let P(a) = U R(a) diag(S + a d) Vh and G(a) = U R(a) U^T. With d = 0, G(-a) undoes
    the rotation exactly: G(-a) P(+a) = P(0). With d != 0 the shift survives: the residual
    is U diag(a d) Vh (additive shifts are symmetric about S, not undone by G)."""
    for d_init in (0.0, 0.2):
        _, model, _ = adapted("linear", rotate="input", block_size=4, delta_s_init=d_init, scale=0.5)
        adapter = the_adapter(model)
        u, s, vh = adapter.u[...], adapter.s[...], adapter.vh[...]
        skew = bound_skew(skew_from_params(adapter.rot_in[...]), adapter.config.max_angle)
        d = adapter.delta_s[...] if d_init else jnp.zeros_like(s)
        if not d_init:
            adapter.delta_s.value = d
        a = 0.8
        p_plus = u @ block_diag(cayley(skew, a)) * (s + a * d)[None, :] @ vh
        undo = u @ block_diag(cayley(skew, -a)) @ u.T
        residual = undo @ p_plus - (u * s[None, :]) @ vh
        np.testing.assert_allclose(residual, (u * (a * d)[None, :]) @ vh, atol=1e-5)


@pytest.mark.parametrize("rotate", ["input", "both"])
def test_finite_for_large_alpha_and_params(rotate):
    _, model, x = adapted("q_BTD_DNH", rotate=rotate, block_size=4, r=8, scale=1e4)
    for a in np.linspace(-10.0, 10.0, 9):
        set_alpha(model, float(a))
        assert bool(jnp.all(jnp.isfinite(model(x))))
        assert bool(jnp.all(jnp.isfinite(merge_adapters(model).layer.kernel[...])))


def test_two_param_groups_train_with_their_own_rates():
    host, model, x = adapted("linear", rotate="input", delta_s_init=0.01, scale=0.0)
    target = jax.random.normal(jax.random.key(5), host(x).shape)
    tx = optax.multi_transform(
        {"shift": optax.adam(1e-2), "rot": optax.sgd(0.0)},
        lambda state: jax.tree.map_with_path(lambda path, _: "shift" if "delta_s" in str(path) else "rot", state),
    )
    optimizer = nnx.Optimizer(model, tx, wrt=AdapterParam)
    snapshot = lambda kind: [np.array(leaf) for leaf in jax.tree.leaves(nnx.state(model, kind))]
    rot_before, shift_before, base_before = (snapshot(k) for k in (RotationParam, DeltaS, nnx.Not(AdapterParam)))

    @nnx.jit
    def step(model, optimizer):
        loss_fn = lambda m: jnp.mean((m(x) - target) ** 2)
        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, AdapterParam))(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(5)]
    assert losses[-1] < losses[0]
    same = lambda a, b: all(np.array_equal(p, q) for p, q in zip(a, b, strict=True))
    assert same(snapshot(RotationParam), rot_before)  # its group has lr 0
    assert not same(snapshot(DeltaS), shift_before)
    assert same(snapshot(nnx.Not(AdapterParam)), base_before)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"r": 6, "block_size": 4}, "not divisible by block_size"),
        ({"r": 32, "block_size": 4}, "rank r=32"),
        ({"max_angle": 0.0}, r"max_angle=0.0 must be in \(0, pi\)"),
        ({"max_angle": 4.0}, r"must be in \(0, pi\)"),
        ({"rotate": "sideways"}, "unknown rotate='sideways'"),
        ({"block_size": 1}, "block_size=1 must be an integer >= 2"),
        ({"rotate": "none", "delta_s": False}, "nothing to train"),
        ({"svd_iters": 2, "svd_oversample": 1.5}, r"svd_oversample=1.5 must be an integer >= 0"),
    ],
)
def test_bad_config_errors(options, message):
    layer, _ = BY_NAME["linear"].build(0)
    with pytest.raises(ValueError, match=message):
        variant = AntiPaSTOConfig(**{"r": 4, "block_size": 2, **options})
        apply_adapters(Host(layer), AdapterConfig(rules=(Rule(pattern="layer", variant=variant),)))


class Int8Linear(nnx.Module):
    """A toy weight-only-quantized layer: its kernel attribute is int8 storage, not the weight."""

    def __init__(self):
        self.w = nnx.Param(jnp.ones((16, 12), jnp.int8))

    def __call__(self, x):
        return x @ self.w[...].astype(x.dtype)


def test_a_kernel_that_is_not_dense_is_refused_like_for_the_other_svd_variants(register_view):
    register_view(Int8Linear, lambda m: ViewInfo("...i,io->...o", kernel="w"))
    variant = AntiPaSTOConfig(r=4, block_size=2)
    with pytest.raises(
        ValueError, match=r"antipasto: the kernel 'w' of 'layer' is an array of dtype int8, not a dense float array"
    ):
        apply_adapters(Host(Int8Linear()), AdapterConfig(rules=(Rule(pattern="layer", variant=variant),)))
