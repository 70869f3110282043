"""Train a bidirectional steering adapter on contrastive persona pairs, then sweep it.

    PYTHONPATH=$PWD python examples/steer.py                  # tiny random Qwen3, AntiPaSTO
    PYTHONPATH=$PWD python examples/steer.py --quick          # CI-sized
    PYTHONPATH=$PWD python examples/steer.py --model ~/models/Qwen3-0.6B --steps 200

A compact version of the AntiPaSTO objective (arXiv 2601.07473). Each pair is one question
asked under an honest (chosen) and a dishonest (rejected) persona, followed by the same
truncated answer. Every step runs the batch three times in one forward pass, one alpha per
row: the reference (alpha=0, the base model, no gradient), alpha=+1 and alpha=-1.

- anti-parallel projection: at about half depth, over the last 3 tokens, the change that
  +1 and -1 make to the chosen-minus-rejected hidden difference should point in opposite
  directions along the reference difference (product of the two cosines pushed to -1);
- coherence barrier: per-token total variation from the reference distribution above
  ``coh_frac * sqrt(entropy + 0.02)`` is penalised with ``log1p(50 v)^2 + v``;
- monotonic ordering: the chosen-minus-rejected log-prob gap of the answer must rise by
  ``margin`` at +1 and fall by ``margin`` at -1 (a hinge on both, weight ``--mono-weight``:
  at weight 1 the projection term dominates and the gap barely moves on the tiny model).

After training, one ``sweep`` (per-row alpha, one forward pass) over alpha in [-2, 2]
on held-out pairs and on as many training pairs; ``sweep_metrics`` table and a PNG plot.

The tiny model is random, so the run shows the mechanics, not honesty; pass ``--model``
with a local Qwen3 / Llama checkpoint for a real one.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lora_jax import AdapterConfig, AdapterParam, AntiPaSTOConfig, LoRAConfig, Rule, apply_adapters, set_alpha
from lora_jax.checkpoint import restore, save
from lora_jax.models import ByteTokenizer, Qwen3, load_hf, load_tokenizer, tiny_config
from lora_jax.progress import Progress
from lora_jax.select import select_dimensions
from lora_jax.steering import format_table, plot_sweep, sweep, sweep_metrics

DATA = Path(__file__).parent / "data" / "persona_pairs.json"
PASS_ALPHAS = (0.0, 1.0, -1.0)  # reference, +1, -1


def load_pairs(path: Path) -> list[dict]:
    pairs = json.loads(Path(path).read_text())["pairs"]
    for i, p in enumerate(pairs):
        missing = {"chosen", "rejected", "continuation"} - set(p)
        if missing:
            raise ValueError(
                f"{path}: pair {i} lacks {sorted(missing)}; each pair needs chosen, rejected, continuation"
            )
    return pairs


def encode(tokenizer, pairs: list[dict]) -> dict[str, np.ndarray]:
    """Rows: all chosen sequences, then all rejected ones (right-padded). ``answer`` marks
    the continuation's tokens; ``last3`` indexes each row's last 3 real tokens."""
    prompts = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
    answers = [p["continuation"] for p in pairs] * 2
    enc = tokenizer(
        [q + a for q, a in zip(prompts, answers, strict=True)], padding=True, padding_side="right", return_tensors="np"
    )
    mask = np.asarray(enc["attention_mask"], bool)
    n_prompt = np.array([len(tokenizer(q, return_tensors="np")["input_ids"][0]) for q in prompts])
    length = mask.sum(1)
    positions = np.arange(mask.shape[1])
    answer = mask & (positions[None] >= n_prompt[:, None])
    return {
        "tokens": np.asarray(enc["input_ids"], np.int32),
        "mask": mask,
        "answer": answer,
        "last3": (length[:, None] - 3 + np.arange(3)[None]).astype(np.int32),
    }


def forward(model, batch, alphas, hidden_layer: int):
    """Logits and the residual stream after block ``hidden_layer`` (captured with
    ``nnx.capture``, so any model whose blocks are ``model.layers`` works), one alpha per row."""
    set_alpha(model, alphas)
    logits, inter = nnx.capture(model, nnx.Intermediate, method_outputs=nnx.Intermediate)(
        batch["tokens"], batch["mask"]
    )
    set_alpha(model, 1.0)
    hidden = jax.tree.leaves(inter["layers"][hidden_layer]["__call__"].get_value())[0]  # blocks may return (x, cache)
    return logits, hidden


def answer_logp(logits, batch):
    """Mean log-prob of each row's answer tokens: (..., rows)."""
    logp = jax.nn.log_softmax(logits[..., :-1, :].astype(jnp.float32), axis=-1)
    tok = jnp.broadcast_to(batch["tokens"][:, 1:], logp.shape[:-1])
    lp = jnp.take_along_axis(logp, tok[..., None], axis=-1)[..., 0]
    m = jnp.broadcast_to(batch["answer"][:, 1:], lp.shape)
    return (lp * m).sum(-1) / m.sum(-1)


def _cos(a, b, eps=1e-6):
    # eps inside the square roots: the +-1 changes start at exactly zero, where a norm's gradient is NaN
    return (a * b).sum(-1) / jnp.sqrt(((a * a).sum(-1) + eps) * ((b * b).sum(-1) + eps))


def steering_loss(model, batch, *, hidden_layer: int, margin: float, coh_frac: float, mono_weight: float = 1.0):
    rows, n_pairs = batch["tokens"].shape[0], batch["tokens"].shape[0] // 2
    tiled = {k: jnp.tile(v, (3,) + (1,) * (v.ndim - 1)) for k, v in batch.items()}
    alphas = jnp.repeat(jnp.array(PASS_ALPHAS, jnp.float32), rows)
    logits, hidden = forward(model, tiled, alphas, hidden_layer)
    logits = logits.reshape(3, rows, *logits.shape[1:]).astype(jnp.float32)
    hidden = hidden.reshape(3, rows, *hidden.shape[1:]).astype(jnp.float32)
    logits = logits.at[0].set(jax.lax.stop_gradient(logits[0]))
    hidden = hidden.at[0].set(jax.lax.stop_gradient(hidden[0]))

    # (1) anti-parallel projection on the chosen - rejected hidden difference, last 3 tokens
    h = jnp.take_along_axis(hidden, batch["last3"][None, :, :, None], axis=2)  # (3, rows, 3, D)
    diff = h[:, :n_pairs] - h[:, n_pairs:]
    ref = diff[0]
    proj = (_cos(diff[1] - ref, ref) * _cos(diff[2] - ref, ref)).mean()

    # (2) coherence barrier: TV from the reference above a sqrt(entropy) threshold
    p_ref = jax.nn.softmax(logits[0], axis=-1)
    entropy = -(p_ref * jax.nn.log_softmax(logits[0], axis=-1)).sum(-1)
    threshold = coh_frac * jnp.sqrt(entropy + 0.02)
    tv = 0.5 * jnp.abs(jax.nn.softmax(logits[1:], axis=-1) - p_ref[None]).sum(-1)  # (2, rows, T)
    v = jax.nn.relu(tv - threshold[None])
    penalty = jnp.log1p(50.0 * v) ** 2 + v
    coherence = (penalty * batch["mask"][None]).sum() / (2 * batch["mask"].sum())

    # (3) monotonic ordering of the answer's chosen - rejected log-prob gap
    lp = answer_logp(logits, batch)
    gap = lp[:, :n_pairs] - lp[:, n_pairs:]
    up, down = gap[1] - gap[0], gap[2] - gap[0]
    mono = (jax.nn.relu(margin - up) + jax.nn.relu(margin + down)).mean()

    loss = proj + coherence + mono_weight * mono
    return loss, {"proj": proj, "coh": coherence, "mono": mono, "tv": tv.mean(), "gap+": up.mean(), "gap-": down.mean()}


def load_base(args):
    """The base model and its tokenizer: a local HF checkpoint, or the tiny random Qwen3."""
    if args.model:
        model, tokenizer = load_hf(args.model), load_tokenizer(args.model)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        return model, tokenizer
    tokenizer = ByteTokenizer()
    return Qwen3(tiny_config(tokenizer.vocab_size, n_layers=4), rngs=nnx.Rngs(args.seed)), tokenizer


def build(args):
    model, tokenizer = load_base(args)
    n_layers = len(model.layers)
    layers = tuple(range(int(0.1 * n_layers), max(n_layers // 2, 1)))  # the paper's [0.1 L, 0.5 L)
    if args.variant == "antipasto":  # antipasto3's small delta_s init: +1 and -1 differ from step one
        variant = AntiPaSTOConfig(r=args.rank, block_size=args.block_size, delta_s_init=4e-4)
    else:
        variant = LoRAConfig(r=args.rank, lora_alpha=args.rank)
    cfg = AdapterConfig(rules=(Rule(pattern=r"o_proj|down_proj", variant=variant, layers=layers),), seed=args.seed)
    return apply_adapters(model, cfg), tokenizer, layers[-1]


def run(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="local HF Qwen3 / Llama checkpoint dir (default: tiny random Qwen3)")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--variant", default="antipasto", choices=("antipasto", "lora"))
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--block-size", type=int, default=4, help="AntiPaSTO rotation block size")
    ap.add_argument(
        "--select", default="l1_trip", choices=("top", "wanda", "l1_trip"), help="AntiPaSTO dims: top-r by S or data"
    )
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=16, help="pairs per step")
    ap.add_argument("--lr", type=float, default=1e-2, help="the paper used 2e-3 on real models")
    ap.add_argument("--margin", type=float, default=0.5, help="nats per answer token")
    ap.add_argument("--coh-frac", type=float, default=0.3)
    ap.add_argument("--mono-weight", type=float, default=10.0, help="weight of the ordering hinge")
    ap.add_argument("--kl-budget", type=float, default=0.05)
    ap.add_argument("--out", default="steer_out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="a few steps, for CI")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.batch = min(args.steps, 40), min(args.batch, 8)

    pairs = load_pairs(Path(args.data))
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(pairs))
    n_eval = max(len(pairs) // 5, 1)
    eval_pairs, train_pairs = [pairs[i] for i in order[:n_eval]], [pairs[i] for i in order[n_eval:]]
    model, tokenizer, hidden_layer = build(args)
    train = {k: jnp.asarray(v) for k, v in encode(tokenizer, train_pairs).items()}
    # swept after training: the held-out pairs, then as many training pairs for comparison
    probe = {k: jnp.asarray(v) for k, v in encode(tokenizer, eval_pairs + train_pairs[:n_eval]).items()}

    if args.variant == "antipasto" and args.select != "top":
        # pairs interleaved (chosen, rejected, chosen, ...), as select_dimensions reads them
        n = len(train_pairs)
        rows = np.stack([np.arange(n), np.arange(n) + n], axis=1).ravel()
        chunks = [rows[i : i + 2 * args.batch] for i in range(0, 2 * n, 2 * args.batch)]
        select_dimensions(
            model,
            [{k: v[c] for k, v in train.items()} for c in chunks],
            method=args.select,
            forward=lambda m, b: m(b["tokens"], b["mask"]),
            mask=lambda b: b["mask"],
        )
    optimizer = nnx.Optimizer(model, optax.adamw(args.lr), wrt=AdapterParam)
    loss_fn = functools.partial(
        steering_loss,
        hidden_layer=hidden_layer,
        margin=args.margin,
        coh_frac=args.coh_frac,
        mono_weight=args.mono_weight,
    )

    @nnx.jit
    def step(model, optimizer, batch):
        grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, AdapterParam), has_aux=True)
        (loss, aux), grads = grad_fn(model, batch)
        optimizer.update(model, grads)
        return loss, aux

    n_train, bsz = len(train_pairs), min(args.batch, len(train_pairs))
    fixed = np.arange(bsz)  # a fixed batch, to compare the loss before and after training
    fixed = {k: v[np.concatenate([fixed, fixed + n_train])] for k, v in train.items()}
    fixed_loss = nnx.jit(lambda m, b: loss_fn(m, b)[0])
    loss_before = float(fixed_loss(model, fixed))
    losses, t0 = [], time.perf_counter()
    with Progress("train", args.steps, unit="steps") as bar:  # a line every 10 s, in a terminal and in a log
        for _ in range(args.steps):
            idx = rng.choice(n_train, bsz, replace=False)
            rows = np.concatenate([idx, idx + n_train])  # the pairs' chosen rows, then their rejected rows
            batch = {k: v[rows] for k, v in train.items()}
            loss, aux = step(model, optimizer, batch)
            losses.append(float(loss))
            bar.update(loss=loss, **aux)
    train_s = time.perf_counter() - t0
    loss_after = float(fixed_loss(model, fixed))

    # the sweep: one forward pass, one alpha per row
    alphas = jnp.linspace(-2.0, 2.0, 9)

    def evaluate(m, batch):
        logits = m(batch["tokens"], batch["mask"])
        return {"lp": answer_logp(logits, batch), "logits": logits}

    out = sweep(model, evaluate, alphas, inputs=probe, mode="rows")
    chosen, rejected = np.arange(n_eval), np.arange(n_eval) + 2 * n_eval  # probe rows of the held-out pairs
    metrics = {}
    for name, offset in (("held-out", 0), ("train", n_eval)):
        effect = out["lp"][:, chosen + offset] - out["lp"][:, rejected + offset]
        rows = np.concatenate([chosen, rejected]) + offset
        logits, mask = out["logits"][:, rows], probe["mask"][rows]
        metrics[name] = sweep_metrics(alphas, effect, logits, mask=mask, kl_budget=args.kl_budget)
    os.makedirs(args.out, exist_ok=True)
    title = f"{args.variant}: honest - dishonest answer log-prob, held-out pairs"
    png = plot_sweep(metrics["held-out"], os.path.join(args.out, "sweep.png"), title=title)
    print(f"\ntrained {args.steps} steps in {train_s:.1f}s, fixed-batch loss {loss_before:.4f} -> {loss_after:.4f}")
    print("effect = mean log P(answer | honest prompt) - log P(answer | dishonest prompt), per answer token\n")
    print(f"held-out pairs ({n_eval}):\n{format_table(metrics['held-out'])}")
    t = metrics["train"]
    print(f"\ntraining pairs ({n_eval}): slope {t.slope:+.4g}, R² {t.r2:.3f}, monotone steps {t.monotone_frac:.0%}")
    print(f"\nplot: {png}")

    # The adapter alone goes to disk and back onto a freshly loaded base model.
    ckpt = os.path.abspath(os.path.join(args.out, "adapter"))
    save(ckpt, model, overwrite=True)
    restored = restore(ckpt, load_base(args)[0])
    same = bool(jnp.array_equal(model(probe["tokens"], probe["mask"]), restored(probe["tokens"], probe["mask"])))
    print(f"adapter saved to {ckpt}; restored onto a fresh base model: logits identical = {same}")
    return {
        "losses": losses,
        "loss_before": loss_before,
        "loss_after": loss_after,
        "metrics": metrics,
        "png": png,
        "checkpoint": ckpt,
        "restore_identical": same,
    }


if __name__ == "__main__":
    run()
