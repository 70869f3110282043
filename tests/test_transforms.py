"""State transforms, jitted, against the module-level operations they mirror."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from layers import LAYOUTS

from lora_jax import AdapterConfig, AdapterParam, AdapterState, Alpha, LoRAConfig, Rule, apply_adapters
from lora_jax import set_alpha as module_set_alpha
from lora_jax.surgery import NoMatchError, merge_adapters
from lora_jax.transforms import adapter_state, cast, cat, combine, merge, negate, scale, set_alpha


class Net(nnx.Module):
    def __init__(self, layer):
        self.layer = layer

    def __call__(self, x):
        return self.layer(x)


class MLP(nnx.Module):
    def __init__(self):
        rngs = nnx.Rngs(0)
        self.up = nnx.Linear(8, 16, rngs=rngs)
        self.down = nnx.Linear(16, 8, rngs=rngs)

    def __call__(self, x):
        return self.down(jax.nn.gelu(self.up(x)))


# Linear, a multi-axis output (packed K/V) and a kernel-batch axis (MoE): the whole zoo
# is covered by the adapter tests, this checks the state plumbing around them.
FEW = [layout for layout in LAYOUTS if layout.name in ("linear", "kv_packed", "moe_EBD_EDF")]
FEW_IDS = [layout.name for layout in FEW]
X = jax.random.normal(jax.random.key(7), (4, 8))


def adapted(base, *, r=3, seed=0, lora_alpha=6.0, pattern="layer|up|down"):
    model = apply_adapters(
        base, AdapterConfig(rules=(Rule(pattern=pattern, variant=LoRAConfig(r=r, lora_alpha=lora_alpha)),), seed=seed)
    )
    leaves, treedef = jax.tree.flatten(nnx.state(model, AdapterParam))
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    nnx.update(
        model,
        jax.tree.unflatten(
            treedef, [x + 0.2 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
        ),
    )
    return model


def run(graphdef, state, x=X):
    return nnx.merge(graphdef, state)(x)


def jitted_module(model, x=X):
    """The module-level reference, compiled too: eager and jit may differ in the last ulp."""
    graphdef, state = nnx.split(model)
    return jax.jit(lambda s: run(graphdef, s, x))(state)


def test_set_alpha_matches_module_level():
    model = adapted(MLP())
    graphdef, state = nnx.split(model)
    jitted = jax.jit(lambda s, a: run(graphdef, set_alpha(s, a, pattern="down")))
    y = jitted(state, 0.3)
    assert float(set_alpha(state, 0.3, pattern="down")["down"]["alpha"][...]) == pytest.approx(0.3)
    assert float(state["down"]["alpha"][...]) == 1.0  # the input state is untouched
    module_set_alpha(model, 0.3, pattern="down")
    np.testing.assert_array_equal(y, jitted_module(model))
    with pytest.raises(NoMatchError, match=r"matched no adapter; adapters in this state: \['down', 'up'\]"):
        set_alpha(state, 0.0, pattern="attn")
    with pytest.raises(ValueError, match=r"alpha must be finite, got \[1.0, nan\]"):
        set_alpha(state, jnp.array([1.0, jnp.nan]))
    with pytest.raises(ValueError, match=r"scale factor must be finite, got inf"):
        scale(state, jnp.inf)


def test_each_set_alpha_names_the_other_when_given_the_wrong_kind():
    model = adapted(MLP())
    _, state = nnx.split(model)
    with pytest.raises(TypeError, match=r"got State; for an nnx.State use lora_jax.transforms.set_alpha"):
        module_set_alpha(state, 0.5)
    with pytest.raises(TypeError, match=r"got MLP; for a model use lora_jax.set_alpha"):
        set_alpha(model, 0.5)
    assert float(model.up.alpha[...]) == 1.0 and float(state["up"]["alpha"][...]) == 1.0  # nothing changed


def test_vmap_sweep_over_alpha_is_the_loop_of_module_calls():
    model = adapted(MLP())
    graphdef, state = nnx.split(model)
    alphas = jnp.linspace(-1.0, 1.0, 5)
    swept = jax.jit(jax.vmap(lambda a: run(graphdef, set_alpha(state, a))))(alphas)
    for a, y in zip(alphas, swept, strict=True):
        module_set_alpha(model, a)
        np.testing.assert_allclose(y, model(X), rtol=1e-6, atol=1e-6)


def test_scale_and_negate_move_a_lora_delta_linearly():
    model = adapted(Net(nnx.Linear(8, 8, rngs=nnx.Rngs(1))))
    graphdef, state = nnx.split(model)
    base = model.layer.base(X)
    delta = model(X) - base
    half = jax.jit(lambda s: run(graphdef, scale(s, 0.5)))(state)
    flipped = jax.jit(lambda s: run(graphdef, negate(s)))(state)
    np.testing.assert_allclose(half - base, 0.5 * delta, rtol=1e-5, atol=1e-6)
    module_set_alpha(model, -1.0)
    np.testing.assert_array_equal(flipped, jitted_module(model))


def test_combine_interpolates_deltas_when_a_is_shared():
    base = Net(nnx.Linear(8, 8, rngs=nnx.Rngs(1)))
    m1, m2 = adapted(base, seed=0), adapted(base, seed=0)
    nnx.update(m2, {"layer": {"lora_b": AdapterParam(jax.random.normal(jax.random.key(3), (3, 8)))}})
    graphdef, s1 = nnx.split(m1)
    s2 = nnx.state(m2)
    y = jax.jit(lambda a, b, w: run(graphdef, combine([a, b], w)))(s1, s2, jnp.array([1.4, -0.4]))
    y0 = base(X)
    np.testing.assert_allclose(y - y0, 1.4 * (m1(X) - y0) - 0.4 * (m2(X) - y0), rtol=1e-5, atol=1e-5)
    other = nnx.state(adapted(base, r=2))
    with pytest.raises(ValueError, match=r"differs from state 0 .* at \['layer.lora_a', 'layer.lora_b'\]"):
        combine([s1, other], [1.0, 1.0])


@pytest.mark.parametrize("layout", FEW, ids=FEW_IDS)
def test_cat_is_the_exact_sum_of_lora_deltas(layout):
    layer, x = layout.build(seed=0)
    base = Net(layer)
    m1, m2 = adapted(base, r=2, seed=0), adapted(base, r=3, seed=5, lora_alpha=1.0)
    module_set_alpha(m2, -0.5)
    pairs = [nnx.split(m1), nnx.split(m2)]
    graphdef, eager = cat(pairs, [0.7, 1.3])
    state = jax.jit(lambda s1, s2: cat([(pairs[0][0], s1), (pairs[1][0], s2)], [0.7, 1.3])[1])(pairs[0][1], pairs[1][1])
    jax.tree.map(np.testing.assert_array_equal, state, eager)
    combined = nnx.merge(graphdef, state)
    assert combined.layer.config.r == 5 and combined.layer.lora_a.shape[-1] == 5
    y0 = base(x)
    want = 0.7 * (m1(x) - y0) + 1.3 * (m2(x) - y0)
    np.testing.assert_allclose(combined(x) - y0, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"other paths: \['layer'\]"):
        cat([pairs[0], nnx.split(base)], [1.0, 1.0])


@pytest.mark.parametrize("layout", FEW, ids=FEW_IDS)
def test_merge_state_equals_merge_adapters(layout):
    layer, x = layout.build(seed=0)
    model = adapted(Net(layer))
    module_set_alpha(model, 0.6)
    graphdef, state = nnx.split(model)
    merged_graphdef, _ = merge(graphdef, state)
    merged_state = jax.jit(lambda s: merge(graphdef, s)[1])(state)
    reference = merge_adapters(model)
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)  # jit vs eager: last ulp
    jax.tree.map(close, merged_state, nnx.state(reference))
    close(nnx.merge(merged_graphdef, merged_state)(x), reference(x))


def test_cast_is_a_storage_cast():
    model = adapted(MLP())
    graphdef, state = nnx.split(model)
    low = jax.jit(lambda s: cast(s, jnp.bfloat16))(state)
    kinds = {type(v).__name__: v[...].dtype for _, v in nnx.to_flat_state(low)}
    assert kinds == {"Alpha": jnp.float32, "AdapterParam": jnp.bfloat16, "Param": jnp.float32}
    rounded = jax.tree.map(lambda v: v.astype(jnp.bfloat16).astype(jnp.float32), nnx.state(model, AdapterParam))
    nnx.update(model, rounded)
    np.testing.assert_array_equal(jax.jit(lambda s: run(graphdef, s))(low), jitted_module(model))


def test_adapter_state_selects_adapter_leaves_only():
    model = adapted(MLP())
    graphdef, full = nnx.split(model)
    only = adapter_state(full)
    types = {type(v) for _, v in nnx.to_flat_state(only)}
    assert types <= {AdapterParam, AdapterState, Alpha} and AdapterParam in types and Alpha in types
    base_only = full.filter(nnx.Not((AdapterParam, AdapterState, Alpha)))
    edited = set_alpha(only, 0.0)
    np.testing.assert_array_equal(nnx.merge(graphdef, base_only, edited)(X), MLP()(X))
