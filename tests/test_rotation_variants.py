"""IA3, IA3-FF, HRA and ROAD on every layout of tests/layers.py: identity, alpha semantics,
merge, per-row alpha. Adapter weights are moved off their init first, so nothing here
passes by the adapter being a no-op."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lora_jax import (
    AdapterConfig,
    AdapterParam,
    HRAConfig,
    IA3Config,
    IA3FFConfig,
    ROADConfig,
    Rule,
    apply_adapters,
    merge_adapters,
    set_alpha,
)
from tests.layers import LAYOUTS

CONFIGS = {
    "ia3": IA3Config(),
    "ia3_ff": IA3FFConfig(),
    "hra": HRAConfig(r=4),
    "road_1": ROADConfig(kind="road_1", group_size=2),
    "road_2": ROADConfig(kind="road_2", group_size=2),
    "road_4": ROADConfig(kind="road_4", group_size=2),
}


class Holder(nnx.Module):
    def __init__(self, layer):
        self.layer = layer

    def __call__(self, x):
        return self.layer(x)


def adapted(layout, variant, seed=0):
    base, x = layout.build(seed)
    model = apply_adapters(Holder(base), AdapterConfig(rules=(Rule(pattern="layer", variant=variant),)))
    return Holder(base), model, x


def perturb(model, scale=0.3, seed=1):
    """Move every adapter weight away from its identity init."""
    state = nnx.state(model, AdapterParam)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = [v + scale * jax.random.normal(k, v.shape, v.dtype) for v, k in zip(leaves, keys, strict=True)]
    nnx.update(model, jax.tree.unflatten(treedef, noisy))


def close(a, b, tol=2e-5):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol * float(jnp.abs(b).max()))


# road_2 / road_4 share road_1's layout handling; two layouts each keep the suite short.
CASES = [(lo, n) for n in ("ia3", "ia3_ff", "hra", "road_1") for lo in LAYOUTS] + [
    (lo, n) for n in ("road_2", "road_4") for lo in LAYOUTS if lo.name in ("linear", "kv_packed")
]


@pytest.mark.parametrize(("layout", "name"), CASES, ids=[f"{lo.name}-{n}" for lo, n in CASES])
def test_identity_alpha_merge_inverse(layout, name):
    base, model, x = adapted(layout, CONFIGS[name])
    y0 = base(x)
    close(model(x), y0, 1e-6)  # identity at init (HRA: up to rounding of the pair rotation)
    if name != "hra":
        assert bool((model(x) == y0).all()), "identity at init must be exact"
    perturb(model)
    set_alpha(model, 0.0)
    assert bool((model(x) == y0).all()), "alpha=0 must be bit-identical to the base"
    for a in (0.6, -0.6):
        set_alpha(model, a)
        y = model(x)
        assert float(jnp.abs(y - y0).max()) > 1e-3, "perturbed adapter should change the output"
        close(merge_adapters(model)(x), y)
    # alpha=-1 undoes alpha=1: the same adapter at -1 on top of the layer merged at +1
    set_alpha(model, 1.0)
    merged = merge_adapters(model)
    undo = apply_adapters(merged, AdapterConfig(rules=(Rule(pattern="layer", variant=CONFIGS[name]),)))
    nnx.update(undo, nnx.state(model, AdapterParam))
    set_alpha(undo, -1.0)
    close(undo(x), y0, 1e-4)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize(
    "layout", [lo for lo in LAYOUTS if lo.name in ("linear", "q_BTD_NDH", "kv_packed")], ids=lambda lo: lo.name
)
def test_per_row_alpha_matches_scalar_runs(layout, name):
    _, model, x = adapted(layout, CONFIGS[name])
    perturb(model)
    alphas = jnp.array([0.7, 0.0, -1.3])
    set_alpha(model, alphas)
    y = nnx.jit(lambda m, v: m(v))(model, x)
    row_axis = 1 if layout.name == "kv_packed" else 0  # CBSKH: the batch rows are axis 1
    for i, a in enumerate(alphas):
        set_alpha(model, a)
        close(jnp.take(y, i, axis=row_axis), jnp.take(model(x), i, axis=row_axis))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_gradient_at_init_is_finite_and_nonzero(name):
    """Training starts at the identity init: HRA's paired reflections and ROAD's zero angles
    must still give a gradient that moves every adapter weight."""
    _, model, x = adapted(LAYOUTS[0], CONFIGS[name])
    target = jax.random.normal(jax.random.key(7), model(x).shape)
    grads = nnx.grad(lambda m: jnp.mean((m(x) - target) ** 2), argnums=nnx.DiffState(0, AdapterParam))(model)
    for leaf in jax.tree.leaves(grads):
        assert bool(jnp.isfinite(leaf).all())
        assert float(jnp.abs(leaf).max()) > 1e-4


@pytest.mark.parametrize("name", list(CONFIGS))
def test_bf16_base_keeps_its_dtype(name):
    _, x = LAYOUTS[0].build(0)
    base = Holder(nnx.Linear(16, 12, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    model = apply_adapters(base, AdapterConfig(rules=(Rule(pattern="layer", variant=CONFIGS[name]),)))
    perturb(model)
    x = x.astype(jnp.bfloat16)
    set_alpha(model, 0.0)
    assert bool((model(x) == base(x)).all())
    set_alpha(model, 1.0)
    y = model(x)
    assert y.dtype == jnp.bfloat16
    merged = merge_adapters(model)
    assert merged.layer.kernel.dtype == jnp.bfloat16
    close(merged(x).astype(jnp.float32), y.astype(jnp.float32), 3e-2)
