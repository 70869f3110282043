"""LoRA per expert on MoE layers that call ``jax.lax.ragged_dot`` (dropless MoE style).
The model code is written here for these tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import perturb

import lora_jax as lj
from lora_jax.adapter import ADAPTER_VARIABLES
from lora_jax.ragged import RaggedLoRA, register_ragged

E, D, F, T = 4, 8, 12, 24


class RaggedExperts(nnx.Module):
    """E expert matrices; rows of ``x`` arrive sorted by expert, ``group_sizes[e]`` each."""

    def __init__(self, n_experts: int, d_in: int, d_out: int, rngs: nnx.Rngs):
        self.w = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), (n_experts, d_in, d_out)))

    def __call__(self, x: jax.Array, group_sizes: jax.Array) -> jax.Array:
        return jax.lax.ragged_dot(x, self.w[...], group_sizes)


@pytest.fixture(autouse=True)
def _ragged_experts_registered(register_view):
    """RaggedExperts is adaptable during each test here and not after: the view registry is
    global (the ``register_view`` fixture restores it)."""
    register_ragged(RaggedExperts, kernel="w", group_sizes=1)


class MoE(nnx.Module):
    """Top-1 dropless MoE: route, sort tokens by expert, two ragged matmuls, unsort."""

    def __init__(self, rngs: nnx.Rngs):
        self.router = nnx.Linear(D, E, rngs=rngs)
        self.up = RaggedExperts(E, D, F, rngs)
        self.down = RaggedExperts(E, F, D, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        expert = jnp.argmax(self.router(x), axis=-1)
        order = jnp.argsort(expert)
        group_sizes = jnp.bincount(expert, length=E).astype(jnp.int32)
        h = jax.nn.gelu(self.up(x[order], group_sizes))
        return jnp.zeros_like(x).at[order].set(self.down(h, group_sizes))


def _model_and_input(seed=0):
    return MoE(nnx.Rngs(seed)), jax.random.normal(jax.random.key(seed + 1), (T, D))


CFG = lj.AdapterConfig(rules=(lj.Rule(pattern="up|down", variant=lj.LoRAConfig(r=2, lora_alpha=4)),))


def test_lora_per_expert_equals_a_dense_loop_over_experts():
    layer = RaggedExperts(E, D, F, nnx.Rngs(0))
    holder = nnx.Dict(experts=layer)
    cfg = lj.AdapterConfig(rules=(lj.Rule(pattern="experts", variant=CFG.rules[0].variant),))
    adapted = lj.apply_adapters(holder, cfg)
    lora = adapted["experts"]
    assert isinstance(lora, RaggedLoRA)
    assert lora.lora_a.shape == (E, D, 2) and lora.lora_b.shape == (E, 2, F)
    perturb(adapted, 0.2, seed=5)
    lj.set_alpha(adapted, 0.7)
    group_sizes = jnp.asarray([5, 0, 12, 7], jnp.int32)  # an expert with no token too
    x = jax.random.normal(jax.random.key(2), (24, D))
    got = lora(x, group_sizes)
    w, a, b = layer.w[...], lora.lora_a[...], lora.lora_b[...]
    rows, start = [], 0
    for e, n in enumerate(np.asarray(group_sizes)):
        dense = w[e] + 0.7 * 2.0 * (a[e] @ b[e])  # scale = lora_alpha / r = 2
        rows.append(x[start : start + n] @ dense)
        start += n
    np.testing.assert_allclose(got, jnp.concatenate(rows), rtol=1e-5, atol=1e-5)


def test_identity_alpha_zero_and_merge():
    model, x = _model_and_input()
    forward = nnx.jit(lambda m, x: m(x))
    base = forward(model, x)
    adapted = lj.apply_adapters(model, CFG)
    np.testing.assert_array_equal(forward(adapted, x), base)
    perturb(adapted, 0.2, seed=5)
    moved = forward(adapted, x)
    assert not np.allclose(moved, base)
    merged = lj.merge_adapters(adapted)
    assert type(merged.up) is RaggedExperts and merged.up.w.shape == (E, D, F)
    np.testing.assert_allclose(forward(merged, x), moved, rtol=1e-5, atol=1e-5)
    lj.set_alpha(adapted, 0.0)
    np.testing.assert_array_equal(forward(adapted, x), base)


def test_training_moves_only_the_expert_adapters():
    model, x = _model_and_input()
    adapted = lj.apply_adapters(model, CFG)
    target = jnp.flip(model(x), axis=-1)
    base_before = jax.tree.map(jnp.copy, nnx.state(adapted, nnx.Not(ADAPTER_VARIABLES)))
    optimizer = nnx.Optimizer(adapted, optax.adam(3e-2), wrt=lj.AdapterParam)

    @nnx.jit
    def step(m, opt):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - target) ** 2))(m)
        opt.update(m, grads)
        return loss

    losses = [float(step(adapted, optimizer)) for _ in range(80)]
    assert losses[-1] < 0.5 * losses[0]
    b = adapted.up.lora_b[...]
    assert all(float(jnp.abs(b[e]).max()) > 0 for e in range(E))  # every routed expert learned
    after = nnx.state(adapted, nnx.Not(ADAPTER_VARIABLES))
    for (path, old), (_, new) in zip(nnx.to_flat_state(base_before), nnx.to_flat_state(after), strict=True):
        np.testing.assert_array_equal(old[...], new[...], err_msg=str(path))


def test_same_adapter_as_the_einsum_expert_layer():
    """The ragged form and the padded einsum form ``EBD,EDF->EBF`` (same weights, same
    LoRA factors) agree on every routed token: the benchmark compares like with like."""
    layer = RaggedExperts(E, D, F, nnx.Rngs(0))
    dense = nnx.Einsum("ECD,EDF->ECF", (E, D, F), rngs=nnx.Rngs(1))
    dense.kernel.value = layer.w[...]
    cfg = lj.AdapterConfig(rules=(lj.Rule(pattern=".*", variant=lj.LoRAConfig(r=2)),))
    ragged = lj.apply_adapters(nnx.Dict(l=layer), cfg)["l"]
    padded = lj.apply_adapters(nnx.Dict(l=dense), cfg)["l"]
    perturb(ragged, 0.2, seed=5)
    padded.lora_a.value, padded.lora_b.value = ragged.lora_a[...], ragged.lora_b[...]
    group_sizes = jnp.asarray([3, 6, 0, 5], jnp.int32)
    x = jax.random.normal(jax.random.key(3), (14, D))
    capacity = 6
    xe = jnp.zeros((E, capacity, D))
    start, slots = 0, []
    for e, n in enumerate(np.asarray(group_sizes)):
        xe = xe.at[e, :n].set(x[start : start + n])
        slots += [(e, i) for i in range(n)]
        start += n
    ye = padded(xe)
    expected = jnp.stack([ye[e, i] for e, i in slots])
    np.testing.assert_allclose(ragged(x, group_sizes), expected, rtol=1e-5, atol=1e-5)


def test_stacked_ragged_experts_under_scan():
    """A scanned stack of MoE blocks: the expert adapters are stacked and ragged at once."""

    class Stack(nnx.Module):
        def __init__(self, rngs):
            self.blocks = nnx.split_rngs(splits=2)(nnx.vmap(MoE, in_axes=0, out_axes=0))(rngs)

        def __call__(self, x):
            return nnx.scan(lambda h, block: (block(h), None), in_axes=(nnx.Carry, 0))(x, self.blocks)[0]

    forward = nnx.jit(lambda m, x: m(x))
    model = Stack(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (T, D))
    base = forward(model, x)
    adapted = lj.apply_adapters(model, CFG)
    assert isinstance(adapted.blocks.up, RaggedLoRA) and adapted.blocks.up.lora_a.shape == (2, E, D, 2)
    np.testing.assert_array_equal(forward(adapted, x), base)
    perturb(adapted, 0.2, seed=5)
    merged = lj.merge_adapters(adapted)
    np.testing.assert_allclose(forward(merged, x), forward(adapted, x), rtol=1e-5, atol=1e-5)


def test_errors():
    model, x = _model_and_input()
    bad = lj.AdapterConfig(rules=(lj.Rule(pattern="up", variant=lj.IA3Config()),))
    with pytest.raises(lj.UnsupportedLayerError, match="applies its experts with jax.lax.ragged_dot"):
        lj.apply_adapters(model, bad)
    adapted = lj.apply_adapters(model, CFG)
    lj.set_alpha(adapted, jnp.ones((T,)))
    with pytest.raises(ValueError, match="takes a scalar alpha"):
        adapted(x)
    with pytest.raises(ValueError, match="rank r=9"):
        lj.apply_adapters(model, lj.AdapterConfig(rules=(lj.Rule(pattern="up", variant=lj.LoRAConfig(r=9)),)))
