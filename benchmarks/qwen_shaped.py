"""A Qwen3-0.6B-shaped decoder stack for benchmarks: the real projection shapes
(d_model 1024, q 1024x2048, k/v 1024x1024, o 2048x1024, MLP 1024<->3072), attention
projections as tunix-layout ``nnx.Einsum`` and the MLP as ``nnx.Linear``, causal GQA.
No rotary embedding: it costs the same with and without an adapter."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

D_MODEL, HEADS, KV_HEADS, HEAD_DIM, D_FF = 1024, 16, 8, 128, 3072


class Attention(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, dtype):
        kw = dict(param_dtype=dtype, dtype=dtype, rngs=rngs)
        self.q_proj = nnx.Einsum("BTD,DNH->BTNH", (D_MODEL, HEADS, HEAD_DIM), **kw)
        self.k_proj = nnx.Einsum("BSD,DKH->BSKH", (D_MODEL, KV_HEADS, HEAD_DIM), **kw)
        self.v_proj = nnx.Einsum("BSD,DKH->BSKH", (D_MODEL, KV_HEADS, HEAD_DIM), **kw)
        self.o_proj = nnx.Einsum("BTNH,NHD->BTD", (HEADS, HEAD_DIM, D_MODEL), **kw)

    def __call__(self, x):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        k, v = (jnp.repeat(t, HEADS // KV_HEADS, axis=2) for t in (k, v))
        logits = jnp.einsum("BTNH,BSNH->BNTS", q, k) / jnp.sqrt(HEAD_DIM).astype(q.dtype)
        t = x.shape[1]
        causal = jnp.tril(jnp.ones((t, t), bool))
        weights = jax.nn.softmax(jnp.where(causal, logits, -1e9).astype(jnp.float32), axis=-1).astype(v.dtype)
        return self.o_proj(jnp.einsum("BNTS,BSNH->BTNH", weights, v))


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, dtype):
        kw = dict(use_bias=False, param_dtype=dtype, dtype=dtype, rngs=rngs)
        self.gate_proj = nnx.Linear(D_MODEL, D_FF, **kw)
        self.up_proj = nnx.Linear(D_MODEL, D_FF, **kw)
        self.down_proj = nnx.Linear(D_FF, D_MODEL, **kw)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, dtype):
        self.attn_norm = nnx.RMSNorm(D_MODEL, param_dtype=dtype, dtype=dtype, rngs=rngs)
        self.attn = Attention(rngs, dtype)
        self.mlp_norm = nnx.RMSNorm(D_MODEL, param_dtype=dtype, dtype=dtype, rngs=rngs)
        self.mlp = MLP(rngs, dtype)

    def __call__(self, x):
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class Stack(nnx.Module):
    """``remat=True`` recomputes each block in the backward pass (``jax.checkpoint``), so a
    training step keeps one block's activations instead of every block's."""

    def __init__(self, n_layers: int, seed: int = 0, dtype=jnp.float32, remat: bool = False):
        rngs = nnx.Rngs(seed)
        self.layers = nnx.List([Block(rngs, dtype) for _ in range(n_layers)])
        self.remat = remat

    def __call__(self, x):
        for layer in self.layers:
            if self.remat:  # pure jax.checkpoint: nnx.remat would write state back across trace levels
                graphdef, state = nnx.split(layer)
                x = jax.checkpoint(lambda s, x, g=graphdef: nnx.merge(g, s)(x))(state, x)
            else:
                x = layer(x)
        return x


PROJECTIONS = r"(q|k|v|o|gate|up|down)_proj"


def projection_shapes() -> list[tuple[int, int]]:
    """(d_in, d_out) of the seven projections of one block."""
    return [
        (D_MODEL, HEADS * HEAD_DIM),
        (D_MODEL, KV_HEADS * HEAD_DIM),
        (D_MODEL, KV_HEADS * HEAD_DIM),
        (HEADS * HEAD_DIM, D_MODEL),
        (D_MODEL, D_FF),
        (D_MODEL, D_FF),
        (D_FF, D_MODEL),
    ]
