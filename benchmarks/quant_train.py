"""Train-step memory and time: LoRA over a quantized base (int8 / int4 / nf4, lora_jax.quant)
vs LoRA over an fp32 and a bf16 base vs a full fine-tune. Not a unit test.

    python benchmarks/quant_train.py --layers 2 --batch 2 --seq 64        # Qwen3-0.6B-shaped stack
    python benchmarks/quant_train.py --smollm2 --batch 2 --seq 64         # the real SmolLM2-135M (Q4_1 kept)

Per row: the compiled step's argument bytes (weights, adapter, Adam state, batch: what
stays resident between steps), its peak (arguments + outputs + temporaries - aliased, from
XLA's memory analysis) and its time relative to LoRA over the fp32 base (median of
interleaved rounds, harness.interleaved). The stack benchmark unrolls its blocks, and
XLA:CPU gives each block's dequantized kernel its own temporary buffer there (a 4-block
pure-JAX loop of dequantize-then-matmul shows the same), so its peak overstates; the
SmolLM2 model runs its identical blocks as one lax.scan, where one block's kernels are
dequantized at a time.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))

import qwen_shaped as qs
from harness import interleaved

import lora_jax as lj
from lora_jax import quant

RANK = 16
MiB = 2**20


def step_fn(model: nnx.Module, wrt, loss_fn, batch: tuple) -> tuple[callable, dict]:
    """A jitted, donated Adam step over the ``wrt`` leaves and its compiled memory."""
    graphdef, params, rest = nnx.split(model, wrt, ...)
    tx = optax.adam(1e-4)
    carry = {"params": jax.tree.map(jnp.copy, params)}
    carry["opt"] = tx.init(carry["params"])

    def step(params, opt_state, rest, *batch):
        loss, grads = jax.value_and_grad(lambda p: loss_fn(nnx.merge(graphdef, p, rest), *batch))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    jitted = jax.jit(step, donate_argnums=(0, 1))
    mem = jitted.lower(carry["params"], carry["opt"], rest, *batch).compile().memory_analysis()
    args = mem.argument_size_in_bytes
    sizes = {"args": args, "peak": args + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes}

    def run():
        carry["params"], carry["opt"], loss = jitted(carry["params"], carry["opt"], rest, *batch)
        return loss

    return run, sizes


def lora(model: nnx.Module) -> nnx.Module:
    cfg = lj.AdapterConfig(rules=(lj.Rule(pattern=qs.PROJECTIONS, variant=lj.LoRAConfig(r=RANK, lora_alpha=RANK)),))
    return lj.apply_adapters(model, cfg)


def stack_models(layers: int) -> dict[str, tuple[nnx.Module, type]]:
    f32, bf16 = qs.Stack(layers), qs.Stack(layers, dtype=jnp.bfloat16)
    return {
        "LoRA, fp32 base": (lora(f32), lj.AdapterParam),
        "LoRA, bf16 base": (lora(bf16), lj.AdapterParam),
        "LoRA, int8 base": (lora(quant.quantize(f32, quant.Int8(), pattern=qs.PROJECTIONS)), lj.AdapterParam),
        "LoRA, int4 base (Q4_1 groups)": (
            lora(quant.quantize(f32, quant.Int4(), pattern=qs.PROJECTIONS)),
            lj.AdapterParam,
        ),
        "LoRA, nf4 base": (lora(quant.quantize(f32, quant.NF4(), pattern=qs.PROJECTIONS)), lj.AdapterParam),
        "full fine-tune, fp32": (f32, nnx.Param),
        "full fine-tune, bf16": (bf16, nnx.Param),
    }


def smollm2_models() -> dict[str, tuple[nnx.Module, type]]:
    from lora_jax.models import load_gguf, smollm2_path

    path = smollm2_path()
    f32, _ = load_gguf(path, tokenizer=False)
    bf16, _ = load_gguf(path, dtype=jnp.bfloat16, tokenizer=False)
    q4, _, _ = quant.load_gguf_quantized(path, tokenizer=False)
    return {
        "LoRA, fp32 base": (lora(f32), lj.AdapterParam),
        "LoRA, bf16 base": (lora(bf16), lj.AdapterParam),
        "LoRA, int8 base": (lora(quant.quantize(f32, quant.Int8(), pattern=qs.PROJECTIONS)), lj.AdapterParam),
        "LoRA, Q4_1 base (the file's blocks)": (lora(q4), lj.AdapterParam),
        "LoRA, nf4 base": (lora(quant.quantize(f32, quant.NF4(), pattern=qs.PROJECTIONS)), lj.AdapterParam),
        "full fine-tune, fp32": (f32, nnx.Param),
        "full fine-tune, bf16": (bf16, nnx.Param),
    }


def mse(model, x, y):
    return jnp.mean((model(x).astype(jnp.float32) - y) ** 2)


def lm_loss(model, ids):
    logits = model(ids)[:, :-1].astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smollm2", action="store_true", help="the real SmolLM2-135M instead of the 0.6B-shaped stack")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    if args.smollm2:
        models = smollm2_models()
        ids = jax.random.randint(jax.random.key(0), (args.batch, args.seq), 0, 49152)
        loss_fn, batch = lm_loss, (ids,)
        what = f"SmolLM2-135M (30 blocks, scanned), {args.batch} x {args.seq} tokens, LM loss"
    else:
        models = stack_models(args.layers)
        x = jax.random.normal(jax.random.key(0), (args.batch, args.seq, qs.D_MODEL))
        loss_fn, batch = mse, (x, x)
        what = f"Qwen3-0.6B-shaped stack, {args.layers} blocks (unrolled), {args.batch} x {args.seq} tokens, MSE"
    steps, sizes = {}, {}
    for name, (model, wrt) in models.items():
        steps[name], sizes[name] = step_fn(model, wrt, loss_fn, batch)
    times = interleaved(steps, args.reps, warmup=1)
    ref = "LoRA, fp32 base"
    print(f"{what}, rank {RANK} on the 7 projections; {jax.devices()[0].platform}\n")
    print("| train step | resident args MiB | compiled peak MiB | peak / LoRA fp32 | time / LoRA fp32 |")
    print("|---|---|---|---|---|")
    for name in models:
        s = sizes[name]
        print(
            f"| {name} | {s['args'] / MiB:.1f} | {s['peak'] / MiB:.1f} | {s['peak'] / sizes[ref]['peak']:.3f} "
            f"| {times.ratio(name, ref):.2f} |"
        )


if __name__ == "__main__":
    main()
