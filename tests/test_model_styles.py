"""Model code as others write it, adapted unchanged: layers that are asked for their sizes
in the forward, flax's own nnx.MultiHeadAttention, norms in the way of a pattern.

The models here are written for these tests, each in the style the README's "Model styles
supported" table names."""

from __future__ import annotations

import copy
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lora_jax as lj

D, HEADS, T = 16, 4, 6
X = jax.random.normal(jax.random.key(0), (2, T, D))


class ShapeReadingAttention(nnx.Module):
    """Attention that asks its projections for their sizes in the forward (bonsai-style):
    head count and width from ``o_proj.kernel.shape``, the model width from
    ``q_proj.in_features``."""

    def __init__(self, rngs: nnx.Rngs):
        self.norm = nnx.RMSNorm(D, rngs=rngs)
        self.q_proj = nnx.Linear(D, D, use_bias=False, rngs=rngs)
        self.k_proj = nnx.Linear(D, D, use_bias=False, rngs=rngs)
        self.v_proj = nnx.Linear(D, D, use_bias=False, rngs=rngs)
        self.o_proj = nnx.Einsum("BTNH,NHD->BTD", (HEADS, D // HEADS, D), rngs=rngs)

    def __call__(self, x):
        n_heads, head_dim, d_model = self.o_proj.kernel.shape
        if x.shape[-1] != self.q_proj.in_features or d_model != self.v_proj.kernel.shape[0]:
            raise ValueError("input width does not match the layer")
        h = self.norm(x)

        def heads(t):
            return t.reshape(*t.shape[:-1], n_heads, head_dim)

        q, k, v = heads(self.q_proj(h)), heads(self.k_proj(h)), heads(self.v_proj(h))
        return x + self.o_proj(jax.nn.dot_product_attention(q, k, v, is_causal=True))


class Stack(nnx.Module):
    def __init__(self, n: int = 2, seed: int = 0):
        rngs = nnx.Rngs(seed)
        self.layers = nnx.List([ShapeReadingAttention(rngs) for _ in range(n)])

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


PROJ = lj.AdapterConfig(rules=(lj.Rule(pattern="proj", variant=lj.LoRAConfig(r=2)),))


def _nudge(model, scale=0.2, seed=1):
    state = nnx.state(model, lj.AdapterParam)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    moved = [v + scale * jax.random.normal(k, v.shape) for v, k in zip(leaves, keys, strict=True)]
    nnx.update(model, jax.tree.unflatten(treedef, moved))


def test_model_that_reads_its_layers_runs_adapted_jitted_and_merged():
    base = Stack()
    model = lj.apply_adapters(base, PROJ)
    assert isinstance(model.layers[0].o_proj, lj.variants.LoRA)
    np.testing.assert_array_equal(model(X), base(X))  # identity at init, eager
    _nudge(model)
    jitted = nnx.jit(lambda m, x: m(x))(model, X)
    np.testing.assert_allclose(jitted, model(X), rtol=1e-5, atol=1e-5)
    assert np.abs(jitted - base(X)).max() > 1e-2
    np.testing.assert_allclose(lj.merge_adapters(model)(X), jitted, rtol=1e-5, atol=1e-5)


def test_read_through_gives_the_base_layer_attributes():
    model = lj.apply_adapters(Stack(), PROJ)
    layer = model.layers[1]
    adapter = layer.o_proj
    assert adapter.kernel is adapter.base.kernel and adapter.bias is adapter.base.bias
    assert adapter.einsum_str == "BTNH,NHD->BTD"
    assert layer.q_proj.in_features == D and layer.q_proj.out_features == D and layer.q_proj.use_bias is False
    assert hasattr(layer.q_proj, "kernel") and not hasattr(layer.q_proj, "no_such_thing")
    # the adapter's own attributes win over the layer's
    assert adapter.alpha is not None and adapter.config.r == 2 and adapter.dtype == jnp.float32
    with pytest.raises(AttributeError, match="'LoRA' object has no attribute 'nothing', nor has the Einsum it wraps"):
        _ = adapter.nothing
    with pytest.raises(AttributeError, match="no attribute '_private'"):
        _ = adapter._private  # never forwarded: copy, pickle and NNX probe such names


def test_base_methods_are_refused_not_run_without_the_adapter():
    class Scorer(nnx.Linear):
        def score(self, x):
            return self(x).sum(-1)

    class Net(nnx.Module):
        def __init__(self):
            self.head = Scorer(D, 3, rngs=nnx.Rngs(0))

    model = lj.apply_adapters(Net(), lj.AdapterConfig(rules=(lj.Rule(pattern="head", variant=lj.LoRAConfig(r=2)),)))
    with pytest.raises(AttributeError, match=r"'score' is a method of the wrapped Scorer.*adapter.base.score"):
        model.head.score(X)
    assert model.head.base.score(X).shape == (2, T)


def test_read_through_survives_graph_ops_copy_and_pickle():
    model = lj.apply_adapters(Stack(), PROJ)
    _nudge(model)
    expected = model(X)
    n_base = len(jax.tree.leaves(nnx.state(Stack(), nnx.Param)))
    n_adapter = len(jax.tree.leaves(nnx.state(model, lj.AdapterParam)))
    assert n_adapter == 2 * 4 * 2  # layers x projections x (A, B): nothing counted twice
    assert len(jax.tree.leaves(nnx.state(model, nnx.Param))) == n_base + n_adapter
    graphdef, state = nnx.split(model)
    copies = (nnx.merge(graphdef, state), nnx.clone(model), copy.deepcopy(model), pickle.loads(pickle.dumps(model)))
    for copied in copies:
        assert copied.layers[0].o_proj.kernel.shape == (HEADS, D // HEADS, D)
        np.testing.assert_allclose(copied(X), expected, atol=1e-6)
    model.eval()  # set_attributes probes every module with hasattr
    model.train()
    np.testing.assert_allclose(model(X), expected, atol=1e-6)


def test_flax_multi_head_attention_projections_adapt_train_and_merge():
    """nnx.MultiHeadAttention's query / key / value / out are LinearGeneral layers."""

    class Net(nnx.Module):
        def __init__(self, seed):
            self.attn = nnx.MultiHeadAttention(HEADS, D, decode=False, rngs=nnx.Rngs(seed))

        def __call__(self, x):
            return self.attn(x)

    base = Net(0)
    cfg = lj.AdapterConfig(rules=(lj.Rule(pattern="query|key|value|out", variant=lj.LoRAConfig(r=4, lora_alpha=8)),))
    model = lj.apply_adapters(base, cfg)
    assert sorted(p for p, _ in lj.iter_adapters(model)) == ["attn.key", "attn.out", "attn.query", "attn.value"]
    np.testing.assert_array_equal(model(X), base(X))
    target = Net(1)(X)
    base_state = jax.tree.map(np.asarray, nnx.state(model, nnx.Not(lj.AdapterParam)))
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=lj.AdapterParam)

    @nnx.jit
    def step(model, opt):
        def loss_fn(m):
            return jnp.mean((m(X) - target) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, lj.AdapterParam))(model)
        opt.update(model, grads)
        return loss

    losses = [float(step(model, opt)) for _ in range(40)]
    assert losses[-1] < 0.7 * losses[0]
    jax.tree.map(np.testing.assert_array_equal, nnx.state(model, nnx.Not(lj.AdapterParam)), base_state)
    merged = lj.merge_adapters(model)
    assert type(merged.attn.out) is nnx.LinearGeneral
    np.testing.assert_allclose(merged(X), model(X), rtol=1e-5, atol=1e-5)
