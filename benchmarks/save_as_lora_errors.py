"""How well a plain LoRA holds each variant: truncation error vs rank on SmolLM2-135M's layers.

    PYTHONPATH=. python benchmarks/save_as_lora_errors.py [--layers 0] [--scale 0.05]

Each variant is applied to one block's q_proj (576 -> 576) and up_proj (576 -> 1536); its
trainable weights are moved off the identity by Gaussian noise of ``--scale`` times each
leaf's own RMS (or ``--scale`` where the leaf is all zeros: LoRA's B, rotation generators)
-- a stand-in for training, so the numbers show each method's delta structure, not a
trained adapter's. Prints the relative Frobenius error of the best rank-k approximation
of the delta at alpha=1 (and alpha=-1 for AntiPaSTO), and the rank that
``save_as_lora(max_error=...)`` picks for 10%, 5% and 1%. The delta is computed by
:func:`lora_jax.as_lora.delta_matrix`, the same one ``save_as_lora`` truncates.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import lora_jax as lj
from lora_jax.as_lora import delta_matrix
from lora_jax.models.gguf import load_gguf, smollm2_path

RANKS = (1, 4, 16, 64, 256)
TARGETS = (0.10, 0.05, 0.01)


def variants() -> dict[str, lj.VariantConfig]:
    return {
        "lora r=16": lj.LoRAConfig(r=16, lora_alpha=16),
        "dora r=16": lj.DoRAConfig(r=16, lora_alpha=16),
        "delora r=16": lj.DeLoRAConfig(r=16),
        "pissa r=16": lj.PiSSAConfig(r=16, lora_alpha=16),
        "hra r=16": lj.HRAConfig(r=16),
        "road_1": lj.ROADConfig(kind="road_1", group_size=64),
        "ia3": lj.IA3Config(),
        "ia3_ff": lj.IA3FFConfig(),
        "antipasto r=64": lj.AntiPaSTOConfig(r=64, block_size=4, rotate="input"),
    }


def moved(model: nnx.Module, scale: float) -> nnx.Module:
    leaves, treedef = jax.tree.flatten(nnx.state(model, lj.AdapterParam))
    keys = jax.random.split(jax.random.key(0), len(leaves))
    out = []
    for x, k in zip(leaves, keys, strict=True):
        rms = float(jnp.sqrt(jnp.mean(x.astype(jnp.float32) ** 2)))
        out.append(x + scale * (rms if rms > 0 else 1.0) * jax.random.normal(k, x.shape, x.dtype))
    nnx.update(model, treedef.unflatten(out))
    return model


def errors(delta: np.ndarray) -> tuple[list[float], list[int]]:
    s = np.linalg.svd(np.asarray(delta, np.float64), compute_uv=False)
    energy = s**2
    tail = np.concatenate([np.cumsum(energy[::-1])[::-1], [0.0]])
    rel = np.sqrt(tail / energy.sum())  # rel[k]: error at rank k
    at = [float(rel[min(k, len(s))]) for k in RANKS]
    need = [int(np.nonzero(rel <= t)[0][0]) for t in TARGETS]
    return at, need


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=0, help="block index")
    parser.add_argument("--scale", type=float, default=0.05)
    args = parser.parse_args()
    base, _ = load_gguf(smollm2_path(), tokenizer=False)
    pattern = rf"^layers\.{args.layers}\.(attn\.q_proj|mlp\.up_proj)$"
    header = " ".join(f"k={k:<5}" for k in RANKS) + " | rank for " + " ".join(f"{t:.0%}" for t in TARGETS)
    print(f"SmolLM2-135M block {args.layers}, noise scale {args.scale}; relative error of the rank-k delta")
    print(f"{'variant':<16} {'layer':<14} {'alpha':>5}  {header}")
    for name, config in variants().items():
        rules = (lj.Rule(pattern=pattern, variant=config),)
        model = moved(lj.apply_adapters(base, lj.AdapterConfig(rules=rules)), args.scale)
        for path, adapter in lj.iter_adapters(model):
            for alpha in (1.0, -1.0) if name.startswith("antipasto") else (1.0,):
                delta, _ = delta_matrix(adapter, alpha)
                at, need = errors(delta)
                cells = " ".join(f"{e:<7.3g}" for e in at) + " | " + " ".join(f"{n:<4}" for n in need)
                print(f"{name:<16} {path.split('.', 2)[2]:<14} {alpha:>5.0f}  {cells}", flush=True)


if __name__ == "__main__":
    main()
