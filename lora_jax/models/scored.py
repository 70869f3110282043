"""Greedy generation scored against a reference model in the same pass.

Steering is judged on the text it generates: how far each generated token's distribution
moved from the base model's (per-token KL) and how likely the base model finds the text
(its perplexity). Teacher-forcing the base model afterwards would process every row's
prompt again; here the reference decodes in lockstep, fed the tokens the steered model
chose, and its prompt is processed once per distinct prompt (``reference_rows`` maps each
row to its reference prompt), so the scores cost one extra token per row and step.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from lora_jax.models.qwen3 import KVCache, Qwen3

__all__ = ["generate_scored"]


def _last_logits(logits, mask):
    last = mask.shape[1] - 1 - jnp.argmax(mask[:, ::-1], axis=1)  # last real token (any padding side)
    return jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0].astype(jnp.float32)


def _prefill(model, tokens, mask, new: int):
    cache = model.init_cache(tokens.shape[0], tokens.shape[1] + new, model.embed.embedding[...].dtype)
    logits, cache = model.decode(tokens, mask, cache)
    return _last_logits(logits, mask), cache


def _scores(logits, ref_logits, token):
    logp, ref_logp = jax.nn.log_softmax(logits), jax.nn.log_softmax(ref_logits)
    kl = (jnp.exp(logp) * (logp - ref_logp)).sum(-1)
    return kl, jnp.take_along_axis(ref_logp, token[:, None], -1)[:, 0]


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "eos_token_id", "pad_token_id"))
def _run(graphdef, state, ref_state, tokens, mask, ref_tokens, ref_mask, ref_rows, **kw):
    model, ref = nnx.merge(graphdef, state), nnx.merge(graphdef, ref_state)
    new, eos = kw["max_new_tokens"], kw["eos_token_id"]
    logits, cache = _prefill(model, tokens, mask, new)
    ref_logits, ref_cache = _prefill(ref, ref_tokens, ref_mask, new)
    # one reference prompt serves every row that maps to it: copy its cache to those rows
    ref_logits = ref_logits[ref_rows]
    ref_cache = KVCache(
        ref_cache.keys[:, ref_rows],
        ref_cache.values[:, ref_rows],
        ref_cache.mask[ref_rows],
        ref_cache.end,
        ref_cache.next_pos[ref_rows],
    )
    ones = jnp.ones((tokens.shape[0], 1), bool)

    def step(carry, _):
        logits, ref_logits, cache, ref_cache, done = carry
        token = jnp.argmax(logits, axis=-1)
        kl, ref_lp = _scores(logits, ref_logits, token)
        live = ~done
        token = jnp.where(done, kw["pad_token_id"], token)
        if eos is not None:
            done = done | (token == eos)
        out, cache = model.decode(token[:, None], ones, cache)
        ref_out, ref_cache = ref.decode(token[:, None], ones, ref_cache)
        carry = (out[:, -1].astype(jnp.float32), ref_out[:, -1].astype(jnp.float32), cache, ref_cache, done)
        return carry, (token, kl, ref_lp, live)

    done = jnp.zeros((tokens.shape[0],), bool)
    _, (toks, kl, ref_lp, live) = jax.lax.scan(step, (logits, ref_logits, cache, ref_cache, done), None, length=new)
    return toks.T, kl.T, ref_lp.T, live.T


def generate_scored(
    model: Qwen3,
    tokens: Int[Array, "B T"],
    attention_mask: Bool[Array, "B T"],
    *,
    reference: Qwen3,
    reference_tokens: Int[Array, "R S"],
    reference_mask: Bool[Array, "R S"],
    reference_rows: Int[Array, " B"],
    max_new_tokens: int,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
) -> tuple[Int[Array, "B N"], Float[Array, "B N"], Float[Array, "B N"], Bool[Array, "B N"]]:
    """Greedy decoding of ``model`` (the same tokens as :func:`~lora_jax.models.generate`),
    with ``reference`` run alongside on row ``b``'s reference prompt
    ``reference_tokens[reference_rows[b]]`` followed by the tokens ``model`` generated.

    Returns ``(tokens, kl, reference_logp, live)``, each ``(B, max_new_tokens)``: the
    generated tokens; ``KL(model || reference)`` of each token's next-token distributions;
    the reference's log-probability of each generated token; and which tokens are real
    (up to and including ``eos_token_id``; after it the row holds ``pad_token_id``).
    ``model`` and ``reference`` must share one structure (e.g. the same adapted model at
    another alpha: ``nnx.clone`` it and ``set_alpha(reference, 0.0)`` for the base)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    graphdef, state = nnx.split(model)
    ref_graphdef, ref_state = nnx.split(reference)
    if ref_graphdef != graphdef:
        raise ValueError(
            "reference must have the same structure as model (the same adapters); "
            "for the base model use a clone of model with set_alpha(reference, 0.0)"
        )
    rows = jnp.asarray(reference_rows, jnp.int32)
    if rows.shape != (tokens.shape[0],):
        raise ValueError(f"reference_rows needs one index per row: shape ({tokens.shape[0]},), got {rows.shape}")
    return _run(
        graphdef,
        state,
        ref_state,
        jnp.asarray(tokens, jnp.int32),
        jnp.asarray(attention_mask, bool),
        jnp.asarray(reference_tokens, jnp.int32),
        jnp.asarray(reference_mask, bool),
        rows,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
