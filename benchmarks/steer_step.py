"""AntiPaSTO's steering step on SmolLM2-135M's shapes, against a LoRA step of the same rank
on the same tokens, measured side by side (interleaved rounds, medians of per-round ratios).

    python benchmarks/steer_step.py                 # 30 blocks, 4 pairs x 2 rows x 43 tokens
    python benchmarks/steer_step.py --reps 5 --layers 30

Rows of a step: 4 pairs -> 8 sequences (each pair: positive and negative persona). The three
forms, each a jitted AdamW step on the adapter weights (r=32 on o_proj / down_proj of
blocks [0.1 L, 0.5 L)):

- ``antipasto naive``: the objective as first written: one forward over 3 x 8 rows (alpha
  0, +1, -1 per row), full-vocabulary logits at every position, the reference rows inside
  the differentiated function (their gradient stopped);
- ``antipasto fast``: ``examples/steer_objective.py``: the reference (and the stream below
  the first adapted block) computed once per data set, outside the gradient; two scalar-alpha
  passes over the adapted blocks and above; logits only at the answer positions;
- ``lora lm``: one causal-LM forward and backward over the same 8 rows (LoRA r=32, same layers).

Random weights with SmolLM2's shapes: time does not depend on the values.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
from harness import interleaved
from steer_objective import _cos, make_step, reference, steering_loss

import lora_jax as lj
from lora_jax.models import Qwen3, tiny_config

SMOLLM2 = dict(vocab_size=49152, d_model=576, n_heads=9, n_kv_heads=3, head_dim=64, d_ff=1536, tie_embeddings=True)


def batch_of(rows: int, seq: int, n_answer: int, vocab: int) -> dict:
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab, (rows, seq)).astype(np.int32)
    ans_pos = np.broadcast_to(np.arange(seq - n_answer - 1, seq - 1), (rows, n_answer)).astype(np.int32)
    return {
        "tokens": tokens,
        "mask": np.ones((rows, seq), bool),
        "ans_pos": ans_pos,
        "ans_tok": np.take_along_axis(tokens, ans_pos + 1, 1),
        "ans_mask": np.ones((rows, n_answer), bool),
        "last3": np.broadcast_to(np.arange(seq - 3, seq), (rows, 3)).astype(np.int32),
    }


def naive_loss(model, batch, *, hidden_layer: int, margin=0.5, coh_frac=0.3, mono_weight=10.0):
    """The same three terms, from one per-row-alpha pass over reference, +1 and -1 rows."""
    rows, n = batch["tokens"].shape[0], batch["tokens"].shape[0] // 2
    tile = lambda x: jnp.tile(x, (3,) + (1,) * (x.ndim - 1))
    lj.set_alpha(model, jnp.repeat(jnp.array([0.0, 1.0, -1.0]), rows))
    mask = tile(batch["mask"])
    hidden = model.blocks(model.embed(tile(batch["tokens"])), mask, 0, hidden_layer + 1)
    logits = model.head(model.blocks(hidden, mask, hidden_layer + 1))  # every position, as first written
    lj.set_alpha(model, 1.0)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1).reshape(3, rows, *logits.shape[1:])
    logp = jnp.take_along_axis(logp, tile(batch["ans_pos"]).reshape(3, rows, -1)[..., None], 2)
    h = jnp.take_along_axis(hidden, tile(batch["last3"])[..., None], 1).reshape(3, rows, 3, -1)
    logp, h = logp.at[0].set(jax.lax.stop_gradient(logp[0])), h.at[0].set(jax.lax.stop_gradient(h[0]))
    diff = h[:, :n] - h[:, n:]
    proj = (_cos(diff[1] - diff[0], diff[0]) * _cos(diff[2] - diff[0], diff[0])).mean()
    p = jnp.exp(logp)
    tv = 0.5 * jnp.abs(p[1:] - p[0]).sum(-1)
    v = jax.nn.relu(tv - coh_frac * jnp.sqrt(-(p[0] * logp[0]).sum(-1) + 0.02))
    lp = jnp.take_along_axis(logp, batch["ans_tok"][None, ..., None], -1)[..., 0].mean(-1)
    gap = lp[:, :n] - lp[:, n:]
    mono = (jax.nn.relu(margin - (gap[1] - gap[0])) + jax.nn.relu(margin + (gap[2] - gap[0]))).mean()
    return proj + (jnp.log1p(50.0 * v) ** 2 + v).mean() + mono_weight * mono, {}


def lm_loss(model, batch):
    logits = model(batch["tokens"], batch["mask"])
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), -1)
    return -jnp.take_along_axis(logp, batch["tokens"][:, 1:, None], -1).mean(), {}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--seq", type=int, default=43, help="the demo's padded pair length")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)

    cfg = tiny_config(**SMOLLM2, n_layers=args.layers)
    base = Qwen3(cfg, rngs=nnx.Rngs(0))
    layers = tuple(range(int(0.1 * args.layers), max(args.layers // 2, 1)))
    first, hidden_layer = layers[0], layers[-1]
    batch = {k: jnp.asarray(v) for k, v in batch_of(2 * args.pairs, args.seq, 5, cfg.vocab_size).items()}

    def adapted(variant):
        rule = lj.Rule(pattern="o_proj|down_proj", variant=variant, layers=layers)
        return lj.apply_adapters(base, lj.AdapterConfig(rules=(rule,)))

    fns = {}
    for name, variant, loss in (
        ("antipasto fast", lj.AntiPaSTOConfig(r=args.rank, delta_s_init=4e-4, svd_iters=4), "fast"),
        ("antipasto naive", lj.AntiPaSTOConfig(r=args.rank, delta_s_init=4e-4, svd_iters=4), "naive"),
        ("lora lm", lj.LoRAConfig(r=args.rank, lora_alpha=args.rank), "lm"),
    ):
        model = adapted(variant)
        if loss == "fast":
            ref = nnx.jit(functools.partial(reference, first=first, hidden_layer=hidden_layer))(model, batch)
            fn = functools.partial(
                steering_loss, first=first, hidden_layer=hidden_layer, margin=0.5, coh_frac=0.3, mono_weight=10.0
            )
            data = {**batch, **ref}
        elif loss == "naive":
            fn, data = functools.partial(naive_loss, hidden_layer=hidden_layer), batch
        else:
            fn, data = lm_loss, batch
        step = make_step(fn, lj.AdapterParam)
        optimizer = nnx.Optimizer(model, optax.adamw(1e-4), wrt=lj.AdapterParam)
        fns[name] = functools.partial(lambda s, m, o, d: s(m, o, d)[0], step, model, optimizer, data)

    t = interleaved(fns, reps=args.reps, warmup=1)
    shape = f"{2 * args.pairs} rows x {args.seq} tokens"
    print(f"{args.layers} blocks, {shape}, r={args.rank}, medians of {args.reps} rounds")
    for name in fns:
        print(f"  {name}: {t.median(name) * 1e3:.0f} ms")
    print(f"antipasto fast / lora lm: {t.ratio('antipasto fast', 'lora lm'):.2f}")
    print(f"antipasto naive / lora lm: {t.ratio('antipasto naive', 'lora lm'):.2f}")
    print(f"antipasto naive / antipasto fast: {t.ratio('antipasto naive', 'antipasto fast'):.2f}")


if __name__ == "__main__":
    main()
