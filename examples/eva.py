"""EVA: calibrate LoRA's A on the data, then train; compared with plain LoRA, same steps.

EVA (Paischer et al. 2024) initialises each layer's A with the top principal directions
of the inputs that layer sees on calibration data and redistributes the rank budget
across layers by explained variance. This runs both inits through the same fine-tuning
loop (examples/finetune.py) on the shipped tiny corpus and prints the eval losses.

    python examples/eva.py                 # built-in tiny Qwen3, ~2 x 300 steps
    python examples/eva.py --steps 30      # quick mode
    python examples/eva.py --model PATH    # a local HF Qwen3 / Llama checkpoint
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import finetune


def main(argv: list[str] | None = None) -> dict[str, dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--model", default=None)
    p.add_argument("--out", default="eva_out")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    common = ["--steps", str(args.steps), "--eval-every", str(max(args.steps // 5, 1)), "--sample-tokens", "0"]
    common += ["--model", args.model] if args.model else []
    common += ["--quiet"] if args.quiet else []
    runs = {}
    for variant in ("eva", "lora"):
        print(f"\n== {variant}")
        runs[variant] = finetune.main([*common, "--variant", variant, "--out", str(Path(args.out) / variant)])
    print("\n| init | eval loss at start | after | per-layer ranks |\n|---|---:|---:|---|")
    for variant, h in runs.items():
        ranks = sorted(set(h["ranks"].values()))
        print(f"| {variant} | {h['initial_eval_loss']:.4f} | {h['final_eval_loss']:.4f} | {ranks} |")
    return runs


if __name__ == "__main__":
    main()
