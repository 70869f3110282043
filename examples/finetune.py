"""Supervised fine-tuning of a causal LM with any lora_jax variant, then merge and check.

The default model is the built-in tiny random-init Qwen3 with a byte-level tokenizer (no
download); ``--model`` takes a local HF checkpoint directory (Qwen3 or Llama) and its own
tokenizer. Only the adapters train. After training the adapters are merged into the
kernels and the merged model's logits are checked against the adapted model's.

    python examples/finetune.py                         # tiny model, LoRA, ~1-2 min on 2 cores
    python examples/finetune.py --variant lora --steps 30
    python examples/finetune.py --model ~/models/Qwen3-0.6B --steps 200 --lr 1e-4
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import lora_jax as lj
from lora_jax.checkpoint import restore, save
from lora_jax.models import ByteTokenizer, Qwen3, generate, load_hf, load_tokenizer, tiny_config, to_hf_name
from lora_jax.peft_format import CODECS, export_peft
from lora_jax.progress import Progress

CORPUS = Path(__file__).with_name("data") / "tiny_corpus.txt"
DEFAULT_PATTERN = r"(q|k|v|o|gate|up|down)_proj"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", default="lora", choices=sorted(lj.VARIANTS), help="adapter method (default config)")
    p.add_argument("--pattern", default=DEFAULT_PATTERN, help="regex on module paths to adapt")
    p.add_argument("--model", default=None, help="local HF checkpoint directory (default: built-in tiny model)")
    p.add_argument("--data", default=str(CORPUS), help="text file, one example per line")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128, help="tokens per example (longer lines are cut)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--sample-tokens", type=int, default=60, help="greedy sample length after training (0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--out", default="finetune_out", help="where the adapter checkpoint and PEFT files go")
    return p.parse_args(argv)


def load_model_and_tokenizer(path: str | None, seed: int):
    if path is None:
        tok = ByteTokenizer()
        return Qwen3(tiny_config(vocab_size=tok.vocab_size), rngs=nnx.Rngs(seed)), tok
    tok = load_tokenizer(path)
    if tok.pad_token_id is None:  # Llama tokenizers ship without one; padding is masked anyway
        tok.pad_token = tok.eos_token
    return load_hf(path), tok


def tokenize(tok, lines: list[str], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """All lines at once, right-padded to one width so every batch has the same shape."""
    enc = tok(lines, padding=True, truncation=True, max_length=seq_len, return_tensors="np")
    return np.asarray(enc["input_ids"], np.int32), np.asarray(enc["attention_mask"], np.int32)


def lm_loss(model, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy over real (non-padding) targets."""
    logits = model(ids, mask)[:, :-1].astype(jnp.float32)
    weight = (mask[:, 1:] * mask[:, :-1]).astype(jnp.float32)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:])
    return (nll * weight).sum() / weight.sum()


@nnx.jit
def train_step(model, optimizer, ids, mask):
    loss, grads = nnx.value_and_grad(lm_loss, argnums=nnx.DiffState(0, lj.AdapterParam))(model, ids, mask)
    optimizer.update(model, grads)
    return loss


@nnx.jit
def eval_loss(model, ids, mask):
    return lm_loss(model, ids, mask)


def _forward_batch(model, batch):
    return model(*batch)


def _batch_mask(batch):
    return batch[1]


def save_checkpoint(model, out: Path) -> dict[str, Path]:
    """The adapter alone as an Orbax checkpoint, and as PEFT files when PEFT has the variant."""
    saved = {"checkpoint": save(out / "adapter", model, overwrite=True)}
    variants = {adapter.config.name for _, adapter in lj.iter_adapters(model)}
    if variants <= set(CODECS):
        saved["peft"] = export_peft(out / "peft", model, hf_name=to_hf_name)
    return saved


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    lines = [line.strip() for line in Path(args.data).read_text().splitlines() if line.strip()]
    n_eval = max(1, len(lines) // 10)
    base, tok = load_model_and_tokenizer(args.model, args.seed)
    train_ids, train_mask = tokenize(tok, lines[:-n_eval], args.seq_len)
    eval_ids, eval_mask = (jnp.asarray(a) for a in tokenize(tok, lines[-n_eval:], args.seq_len))

    try:
        variant = lj.VARIANTS[args.variant]()
    except TypeError as err:
        raise SystemExit(f"variant {args.variant!r} has required options, so it has no default config: {err}") from err
    adapter_config = lj.AdapterConfig(rules=(lj.Rule(pattern=args.pattern, variant=variant),), seed=args.seed)
    if args.variant == "eva":  # data-driven init: principal directions of each layer's inputs
        batches = [(train_ids[i : i + 32], train_mask[i : i + 32]) for i in range(0, len(train_ids) - 31, 32)]
        model = lj.eva_init(base, adapter_config, batches, forward=_forward_batch, mask=_batch_mask)
        print(f"EVA ranks (budget {variant.r} per layer): {[a.config.r for _, a in lj.iter_adapters(model)]}")
    else:
        model = lj.apply_adapters(base, adapter_config)
    n_adapters = len(list(lj.iter_adapters(model)))
    n_train = sum(x.size for x in jax.tree.leaves(nnx.state(model, lj.AdapterParam)))
    print(f"{args.variant}: {n_adapters} adapters, {n_train:,} trainable numbers, {len(lines) - n_eval} train lines")

    optimizer = nnx.Optimizer(model, optax.adamw(args.lr), wrt=lj.AdapterParam)
    rng = np.random.default_rng(args.seed)
    history = {"initial_eval_loss": float(eval_loss(model, eval_ids, eval_mask)), "eval": [], "train": []}
    history["ranks"] = {path: getattr(a.config, "r", None) for path, a in lj.iter_adapters(model)}
    start = time.perf_counter()
    with Progress("finetune", args.steps, unit="steps", enabled=not args.quiet) as bar:  # a line every 10 s
        for step in range(1, args.steps + 1):
            rows = rng.choice(len(train_ids), size=args.batch_size, replace=False)
            loss = float(train_step(model, optimizer, jnp.asarray(train_ids[rows]), jnp.asarray(train_mask[rows])))
            history["train"].append(loss)
            if step % args.eval_every == 0 or step == args.steps:
                history["eval"].append((step, float(eval_loss(model, eval_ids, eval_mask))))
            bar.update(loss=loss, eval=history["eval"][-1][1] if history["eval"] else "-")
    history["seconds"] = time.perf_counter() - start
    history["final_eval_loss"] = history["eval"][-1][1] if history["eval"] else history["initial_eval_loss"]
    print(
        f"eval loss {history['initial_eval_loss']:.4f} -> {history['final_eval_loss']:.4f} "
        f"in {args.steps} steps ({history['seconds']:.1f} s)"
    )
    saved = save_checkpoint(model, Path(args.out).resolve())
    restored = restore(saved["checkpoint"], base)
    history["restore_identical"] = bool(jnp.array_equal(restored(eval_ids, eval_mask), model(eval_ids, eval_mask)))
    print(
        f"saved {', '.join(f'{k}: {v}' for k, v in saved.items())}; restore identical: {history['restore_identical']}"
    )
    history["saved"] = saved

    merged = lj.merge_adapters(model)
    adapted_logits, merged_logits = model(eval_ids, eval_mask), merged(eval_ids, eval_mask)
    real = eval_mask.astype(bool)
    diff = float(jnp.max(jnp.abs(adapted_logits - merged_logits)[real]))
    scale = float(jnp.max(jnp.abs(adapted_logits)[real]))
    history["merge_max_abs_diff"] = diff
    print(f"merged vs adapted logits: max |diff| = {diff:.2e} (logits up to {scale:.1f})")
    if diff > 1e-4 * max(1.0, scale):
        raise SystemExit(f"merged logits differ from adapted logits by {diff:.2e}")

    if args.sample_tokens:
        prompt = tok([lines[-1][:24]], padding=True, return_tensors="np")
        new = generate(merged, prompt["input_ids"], prompt["attention_mask"], max_new_tokens=args.sample_tokens)
        print(f"sample: {lines[-1][:24]!r} -> {tok.decode(np.asarray(new[0]), skip_special_tokens=True)!r}")
    return history


if __name__ == "__main__":
    main()
