"""Building blocks of the Qwen3 / Llama decoder: RMSNorm, rotary embeddings, grouped-query
attention with a KV cache, SwiGLU MLP.

Attention projections are ``nnx.Einsum`` in the tunix layout (``B`` batch, ``T`` query
and ``S`` key tokens, ``D`` model width, ``N`` query heads, ``K`` KV heads, ``H`` head
dim): q ``BTD,DNH->BTNH``, k/v ``BSD,DKH->BSKH``, o ``BTNH,NHD->BTD``. MLP projections
are ``nnx.Linear``. Both are what ``lora_jax.apply_adapters`` adapts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from lora_jax.models.config import ModelConfig

__all__ = ["RMSNorm", "Attention", "MLP", "rope_tables", "LayerCache"]

_NEG = -0.7 * float(np.finfo(np.float32).max)  # finite, so a fully masked row gives no NaN


def _last_axis(v: Array, ndim: int) -> Array:
    return v.reshape((1,) * (ndim - 1) + (-1,))


class RMSNorm(nnx.Module):
    """``w * x / rms(x)`` over the last axis, normalized in float32 as HF does."""

    def __init__(self, dim: int, eps: float, *, param_dtype=jnp.float32):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps = eps

    def __call__(self, x: Float[Array, "*lead d"]) -> Float[Array, "*lead d"]:
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return _last_axis(self.weight[...], x.ndim) * y.astype(x.dtype)


def rope_tables(
    positions: Int[Array, "B T"], inv_freq: Float[Array, " half"]
) -> tuple[Float[Array, "B T 1 H"], Float[Array, "B T 1 H"]]:
    """cos and sin of the rotation angles, laid out to multiply ``(B, T, heads, H)``."""
    angles = positions.astype(jnp.float32)[:, :, None] * inv_freq[None, None, :]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    return jnp.cos(angles), jnp.sin(angles)


def _rotate(x: Float[Array, "B T n H"], cos: Array, sin: Array) -> Float[Array, "B T n H"]:
    # HF's rotate_half pairs dimension i with i + H/2 (not interleaved pairs).
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x * cos.astype(x.dtype) + rotated * sin.astype(x.dtype)).astype(x.dtype)


LayerCache = tuple[Array, Array]  # keys, values: (B, S_max, K, H) each


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, param_dtype, rngs: nnx.Rngs):
        d, n, k, h = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        kw = dict(param_dtype=param_dtype, rngs=rngs)
        self.q_proj = nnx.Einsum("BTD,DNH->BTNH", (d, n, h), **kw)
        self.k_proj = nnx.Einsum("BSD,DKH->BSKH", (d, k, h), **kw)
        self.v_proj = nnx.Einsum("BSD,DKH->BSKH", (d, k, h), **kw)
        self.o_proj = nnx.Einsum("BTNH,NHD->BTD", (n, h, d), **kw)
        norm = lambda: RMSNorm(h, cfg.rms_eps, param_dtype=param_dtype)
        self.q_norm = norm() if cfg.qk_norm else None
        self.k_norm = norm() if cfg.qk_norm else None
        self.n_kv_heads, self.head_dim = k, h

    def __call__(
        self,
        x: Float[Array, "B T D"],
        cos: Array,
        sin: Array,
        kv_mask: Bool[Array, "B S"],
        cache: LayerCache | None = None,
        start: Int[Array, ""] | int = 0,
    ) -> tuple[Float[Array, "B T D"], LayerCache | None]:
        """Without a cache, keys are this call's tokens (S = T). With one, this call's keys
        are written at slot ``start`` and the whole cache (S = S_max) is attended to;
        ``kv_mask`` marks the valid (non-padding, already written) slots."""
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        if cache is not None:
            k = jax.lax.dynamic_update_slice(cache[0], k.astype(cache[0].dtype), (0, start, 0, 0))
            v = jax.lax.dynamic_update_slice(cache[1], v.astype(cache[1].dtype), (0, start, 0, 0))
            cache = (k, v)
        b, t, n, h = q.shape
        q = q.reshape(b, t, self.n_kv_heads, n // self.n_kv_heads, h)  # head n = kv * G + g, as HF repeat_kv
        scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, k.astype(q.dtype)).astype(jnp.float32) * (h**-0.5)
        q_slot = start + jnp.arange(t)
        causal = jnp.arange(k.shape[1])[None, :] <= q_slot[:, None]  # (T, S)
        allowed = causal[None, None, None] & kv_mask[:, None, None, None, :]
        probs = jax.nn.softmax(jnp.where(allowed, scores, _NEG), axis=-1).astype(v.dtype)
        out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v).reshape(b, t, n, h)
        return self.o_proj(out.astype(x.dtype)), cache


class MLP(nnx.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, cfg: ModelConfig, *, param_dtype, rngs: nnx.Rngs):
        kw = dict(use_bias=False, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = nnx.Linear(cfg.d_model, cfg.d_ff, **kw)
        self.up_proj = nnx.Linear(cfg.d_model, cfg.d_ff, **kw)
        self.down_proj = nnx.Linear(cfg.d_ff, cfg.d_model, **kw)

    def __call__(self, x: Float[Array, "B T D"]) -> Float[Array, "B T D"]:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))
