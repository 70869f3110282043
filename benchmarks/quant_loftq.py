"""LoftQ's init error vs plain quantization on real kernels (SmolLM2-135M). Not a unit test.

    python benchmarks/quant_loftq.py --layers 2 --rank 16

For each format, the mean over the adapted projections of ``||W - deq(quant(W))|| / ||W||``
(plain QLoRA init) and ``||W - (deq(Q) + s A B)|| / ||W||`` (LoftQ after 1 and 5
alternations). SmolLM2's float kernels are the GGUF file's Q4_1 values, so they sit on a
4-bit grid already; requantizing them to another format is what is measured.
"""

from __future__ import annotations

import argparse
import statistics

import lora_jax as lj
from lora_jax import quant
from lora_jax.models import load_gguf, smollm2_path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=2, help="blocks to adapt (from the first)")
    p.add_argument("--rank", type=int, default=16)
    args = p.parse_args()
    model, _ = load_gguf(smollm2_path(), tokenizer=False)
    pattern = rf"layers\.({'|'.join(str(i) for i in range(args.layers))})\..*_proj$"
    cfg = lj.AdapterConfig(rules=(lj.Rule(pattern=pattern, variant=lj.LoRAConfig(r=args.rank, lora_alpha=args.rank)),))
    print(f"SmolLM2-135M, blocks 0..{args.layers - 1}, 7 projections each, LoRA r={args.rank}\n")
    print("| format | plain quantization error | LoftQ, 1 iteration | LoftQ, 5 iterations | reduction (5) |")
    print("|---|---|---|---|---|")
    for name, fmt in (("nf4 (group 64)", quant.NF4()), ("int4 symmetric (group 32)", quant.Int4(symmetric=True)),
                      ("int8 per channel", quant.Int8())):  # fmt: skip
        errors = {}
        for iters in (1, 5):
            _, reports = quant.loftq(model, cfg, fmt, iters=iters, pattern=pattern)
            plain = statistics.mean(r.quant_error for r in reports)
            errors[iters] = (plain, statistics.mean(r.loftq_error for r in reports))
        plain = errors[1][0]
        print(f"| {name} | {plain:.4f} | {errors[1][1]:.4f} | {errors[5][1]:.4f} | {1 - errors[5][1] / plain:.1%} |")


if __name__ == "__main__":
    main()
