"""A compact Flax NNX Qwen3 / Llama causal LM, checked against HF transformers.

    model = Qwen3(tiny_config(), rngs=nnx.Rngs(0))        # random init, no download
    model = load_hf("path/to/Qwen3-0.6B")                   # config.json + safetensors
    logits = model(tokens, attention_mask)                  # (B, T, vocab)
    new_tokens = generate(model, tokens, attention_mask, max_new_tokens=20)

Module paths (what ``lora_jax.Rule`` patterns match; HF names via ``to_hf_name``):

    embed                       model.embed_tokens
    layers.{i}.input_norm       model.layers.{i}.input_layernorm
    layers.{i}.attn.q_proj      model.layers.{i}.self_attn.q_proj   (also k_, v_, o_proj)
    layers.{i}.attn.q_norm      model.layers.{i}.self_attn.q_norm   (Qwen3 only; also k_norm)
    layers.{i}.post_attn_norm   model.layers.{i}.post_attention_layernorm
    layers.{i}.mlp.gate_proj    model.layers.{i}.mlp.gate_proj      (also up_, down_proj)
    norm                        model.norm
    lm_head                     lm_head                             (absent when tied)

Padding: ``attention_mask`` (B, T) marks real tokens, left or right padding. Positions
count real tokens only (a row's first real token has position 0), so a padded row gives
the same logits as the row alone. Logits at padded positions are meaningless.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from lora_jax.models.config import ModelConfig
from lora_jax.models.layers import MLP, Attention, RMSNorm, rope_tables

__all__ = ["Qwen3", "Block", "KVCache", "generate", "positions_from_mask"]


def positions_from_mask(mask: Bool[Array, "B T"], offset: Int[Array, " B"] | None = None) -> Int[Array, "B T"]:
    """Position of each token: the number of real tokens before it (padding gets 0)."""
    pos = jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1
    if offset is not None:
        pos = pos + offset[:, None]
    return jnp.maximum(pos, 0)


class KVCache(NamedTuple):
    """Keys/values of every layer, which slots hold real tokens, the next free slot and
    each row's next position. All rows advance by the same number of slots."""

    keys: Array  # (layers, B, S_max, K, H)
    values: Array
    mask: Bool[Array, "B S_max"]
    end: Int[Array, ""]
    next_pos: Int[Array, " B"]


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, param_dtype, rngs: nnx.Rngs):
        self.input_norm = RMSNorm(cfg.d_model, cfg.rms_eps, param_dtype=param_dtype)
        self.attn = Attention(cfg, param_dtype=param_dtype, rngs=rngs)
        self.post_attn_norm = RMSNorm(cfg.d_model, cfg.rms_eps, param_dtype=param_dtype)
        self.mlp = MLP(cfg, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, cos, sin, kv_mask, cache=None, start=0):
        h, cache = self.attn(self.input_norm(x), cos, sin, kv_mask, cache, start)
        x = x + h
        return x + self.mlp(self.post_attn_norm(x)), cache


class Qwen3(nnx.Module):
    """Qwen3 (q/k RMSNorm) or Llama (``cfg.qk_norm=False``) decoder with an LM head."""

    def __init__(self, cfg: ModelConfig, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = cfg
        self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, param_dtype=param_dtype, rngs=rngs)
        self.layers = nnx.List([Block(cfg, param_dtype=param_dtype, rngs=rngs) for _ in range(cfg.n_layers)])
        self.norm = RMSNorm(cfg.d_model, cfg.rms_eps, param_dtype=param_dtype)
        self.lm_head = (
            None
            if cfg.tie_embeddings
            else nnx.Linear(cfg.d_model, cfg.vocab_size, use_bias=False, param_dtype=param_dtype, rngs=rngs)
        )

    def _run(self, tokens, positions, kv_mask, cache: KVCache | None):
        cos, sin = rope_tables(positions, jnp.asarray(self.config.rope.inv_freq(self.config.head_dim)))
        kv = None if cache is None else (cache.keys, cache.values)
        start = 0 if cache is None else cache.end
        x, kv = _run_blocks(list(self.layers), self.embed(tokens), (cos, sin, kv_mask), kv, start)
        return self.head(x), kv

    def __call__(
        self,
        tokens: Int[Array, "B T"],
        attention_mask: Bool[Array, "B T"] | None = None,
        *,
        positions: Int[Array, "B T"] | None = None,
    ) -> Float[Array, "B T V"]:
        """Logits for every position. ``positions`` default to :func:`positions_from_mask`."""
        mask = jnp.ones(tokens.shape, bool) if attention_mask is None else attention_mask.astype(bool)
        if positions is None:
            positions = positions_from_mask(mask)
        return self._run(tokens, positions, mask, None)[0]

    def blocks(
        self,
        x: Float[Array, "B T D"],
        attention_mask: Bool[Array, "B T"],
        start: int = 0,
        stop: int | None = None,
    ) -> Float[Array, "B T D"]:
        """The residual stream after blocks ``start .. stop - 1``, given the stream ``x``
        entering block ``start`` (``self.embed(tokens)`` for ``start=0``).

        Spans compose (``blocks(blocks(x, m, 0, k), m, k)`` is ``blocks(x, m)`` up to float
        rounding), so a caller can compute once a prefix that no adapter touches and reuse
        it (the steering objective does), or read the stream at any depth."""
        mask = attention_mask.astype(bool)
        positions = positions_from_mask(mask)
        cos, sin = rope_tables(positions, jnp.asarray(self.config.rope.inv_freq(self.config.head_dim)))
        return _run_blocks(list(self.layers)[start:stop], x, (cos, sin, mask))[0]

    def head(self, x: Float[Array, "*lead D"]) -> Float[Array, "*lead V"]:
        """Logits from the last block's residual stream: final norm, then the LM head."""
        x = self.norm(x)
        return self.embed.attend(x) if self.lm_head is None else self.lm_head(x)

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
        cfg = self.config
        shape = (batch, max_len, cfg.n_kv_heads, cfg.head_dim)
        zeros = jnp.zeros((cfg.n_layers, *shape), dtype)
        return KVCache(
            zeros, zeros, jnp.zeros((batch, max_len), bool), jnp.zeros((), jnp.int32), jnp.zeros((batch,), jnp.int32)
        )

    def decode(
        self, tokens: Int[Array, "B T"], attention_mask: Bool[Array, "B T"], cache: KVCache
    ) -> tuple[Float[Array, "B T V"], KVCache]:
        """Run ``tokens`` after what the cache holds (a prompt, then one token at a time)."""
        mask = attention_mask.astype(bool)
        positions = positions_from_mask(mask, cache.next_pos)
        kv_mask = jax.lax.dynamic_update_slice(cache.mask, mask, (0, cache.end))
        logits, (keys, values) = self._run(tokens, positions, kv_mask, cache)
        t = tokens.shape[1]
        new = KVCache(keys, values, kv_mask, cache.end + t, cache.next_pos + mask.sum(axis=1, dtype=jnp.int32))
        return logits, new


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "eos_token_id", "pad_token_id"))
def _generate(graphdef, state, tokens, mask, *, max_new_tokens, eos_token_id, pad_token_id):
    model = nnx.merge(graphdef, state)
    b, t = tokens.shape
    cache = model.init_cache(b, t + max_new_tokens, model.embed.embedding[...].dtype)
    logits, cache = model.decode(tokens, mask, cache)
    last = t - 1 - jnp.argmax(mask[:, ::-1], axis=1)  # last real token of each row (any padding side)
    first = jnp.argmax(jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0], axis=-1)
    done = jnp.zeros((b,), bool) if eos_token_id is None else first == eos_token_id

    def step(carry, _):
        tok, cache, done = carry
        logits, cache = model.decode(tok[:, None], jnp.ones((b, 1), bool), cache)
        nxt = jnp.argmax(logits[:, -1], axis=-1)
        nxt = jnp.where(done, pad_token_id, nxt)
        if eos_token_id is not None:
            done = done | (nxt == eos_token_id)
        return (nxt, cache, done), nxt

    _, rest = jax.lax.scan(step, (first, cache, done), None, length=max_new_tokens - 1)
    return jnp.concatenate([first[:, None], rest.T], axis=1)


def generate(
    model: Qwen3,
    tokens: Int[Array, "B T"],
    attention_mask: Bool[Array, "B T"] | None = None,
    *,
    max_new_tokens: int,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
) -> Int[Array, "B new"]:
    """Greedy decoding with a KV cache; returns only the ``max_new_tokens`` new tokens.
    After a row emits ``eos_token_id`` it continues with ``pad_token_id``. One compile
    per (shapes, max_new_tokens); adapters and their alpha are honoured."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    tokens = jnp.asarray(tokens, jnp.int32)
    mask = jnp.ones(tokens.shape, bool) if attention_mask is None else jnp.asarray(attention_mask, bool)
    if not bool(mask.any(axis=1).all()):
        raise ValueError("every prompt row needs at least one real token (attention_mask row of all zeros)")
    graphdef, state = nnx.split(model)
    return _generate(
        graphdef,
        state,
        tokens,
        mask,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )


def _same_structure_runs(layers: Sequence[nnx.Module]) -> list[list[int]]:
    """Indices of consecutive blocks with one graph structure and equal state shapes:
    each run can be executed by a single ``lax.scan`` body (e.g. the unadapted blocks, then
    the adapted ones, then the unadapted ones again)."""
    runs, last = [], None
    for i, layer in enumerate(layers):
        graphdef, state = nnx.split(layer)
        key = (graphdef, jax.tree.structure(state), [(v.shape, v.dtype) for v in jax.tree.leaves(state)])
        if runs and key == last:
            runs[-1].append(i)
        else:
            runs.append([i])
            last = key
    return runs


def _stack(trees):
    return jax.tree.map(lambda *v: jnp.stack(v), *trees)


def _run_blocks(layers: Sequence[nnx.Module], x, context, kv=None, slot=0):
    """Run ``layers`` on the residual stream ``x``; ``kv`` is the stacked (keys, values)
    cache of exactly these layers, or None.

    Why a scan: unrolled, every block is compiled again, and XLA's compile time for a
    30-block model (forward and backward) was most of a short training run on a CPU. Runs
    of identical blocks are stacked and scanned, so each distinct block is compiled once.
    A lone block is scanned too (length 1), so a block is always computed by the same kind
    of compiled body: a model whose adapters are at alpha = 0 gives the base model's
    logits bit for bit. Variables other than ``nnx.Param`` that a block changes (calibration
    statistics, dropout RNG counts) come out of the scan and are written back."""
    cos, sin, mask = context
    new_keys, new_values = [], []
    for run in _same_structure_runs(layers):
        blocks = [layers[i] for i in run]
        cache = None if kv is None else (kv[0][run[0] : run[-1] + 1], kv[1][run[0] : run[-1] + 1])
        graphdef = nnx.split(blocks[0], nnx.Param, ...)[0]
        before = [nnx.state(b, nnx.Not(nnx.Param)) for b in blocks]
        changed: list[int] = []  # leaves of the non-Param state that the block writes (found while tracing)

        def body(h, xs, graphdef=graphdef, changed=changed):
            old = jax.tree.leaves(xs[1])  # read first: merge may hand these Variables to the block
            block = nnx.merge(graphdef, xs[0], xs[1])
            h, layer_cache = block(h, cos, sin, mask, xs[2], slot)
            new = jax.tree.leaves(nnx.state(block, nnx.Not(nnx.Param)))
            changed[:] = [k for k, (a, b) in enumerate(zip(old, new, strict=True)) if a is not b]
            return h, ([new[k] for k in changed], layer_cache)

        params = _stack([nnx.state(b, nnx.Param) for b in blocks])
        x, (written, out) = jax.lax.scan(body, x, (params, _stack(before), cache))
        for i, block in enumerate(blocks):
            if changed:
                leaves, treedef = jax.tree.flatten(before[i])
                for k, value in zip(changed, written, strict=True):
                    leaves[k] = value[i]
                nnx.update(block, jax.tree.unflatten(treedef, leaves))
        if out is not None:
            new_keys.append(out[0])
            new_values.append(out[1])
    if kv is None:
        return x, None
    return x, (jnp.concatenate(new_keys), jnp.concatenate(new_values))
