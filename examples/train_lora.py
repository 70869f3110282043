"""Train LoRA adapters on a toy task with a jit-compiled optax step; only adapters move.

The task: a small random-init MLP-attention stack must learn to imitate a "teacher"
copy of itself whose weights moved by a random low-rank change. LoRA on every
projection can represent that change exactly, so the loss should fall close to zero.

    python examples/train_lora.py            # ~20 s on 2 CPU cores
    python examples/train_lora.py --steps 50
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import lora_jax as lj
from lora_jax.progress import Progress


class Block(nnx.Module):
    def __init__(self, d: int, heads: int, rngs: nnx.Rngs):
        self.q_proj = nnx.Einsum("BTD,DNH->BTNH", (d, heads, d // heads), rngs=rngs)
        self.o_proj = nnx.Einsum("BTNH,NHD->BTD", (heads, d // heads, d), rngs=rngs)
        self.up_proj = nnx.Linear(d, 4 * d, rngs=rngs)
        self.down_proj = nnx.Linear(4 * d, d, rngs=rngs)

    def __call__(self, x):
        x = x + self.o_proj(jnp.tanh(self.q_proj(x)))
        return x + self.down_proj(jax.nn.gelu(self.up_proj(x)))


class Stack(nnx.Module):
    def __init__(self, d: int = 32, heads: int = 4, n_layers: int = 2, seed: int = 0):
        rngs = nnx.Rngs(seed)
        self.layers = nnx.List([Block(d, heads, rngs) for _ in range(n_layers)])

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def make_teacher(model: nnx.Module, rank: int, seed: int) -> nnx.Module:
    """A copy of ``model`` whose projection kernels moved by a random rank-``rank`` change."""
    cfg = lj.AdapterConfig(rules=(lj.Rule(pattern="proj", variant=lj.LoRAConfig(r=rank, lora_alpha=rank)),), seed=seed)
    teacher = lj.apply_adapters(model, cfg)
    for i, (_, adapter) in enumerate(lj.iter_adapters(teacher)):
        key = jax.random.key(seed + i)
        adapter.lora_b.value = 0.3 * jax.random.normal(key, adapter.lora_b.shape)
    return lj.merge_adapters(teacher)


def train(steps: int = 300, lr: float = 1e-2, rank: int = 4, seed: int = 0, progress: bool = True) -> dict:
    base = Stack(seed=seed)
    teacher = make_teacher(base, rank, seed + 1)
    model = lj.apply_adapters(
        base, lj.AdapterConfig(rules=(lj.Rule(pattern="proj", variant=lj.LoRAConfig(r=rank, lora_alpha=rank)),))
    )
    base_state = jax.tree.map(np.asarray, nnx.state(model, nnx.All(nnx.Param, nnx.Not(lj.AdapterParam))))
    optimizer = nnx.Optimizer(model, optax.adam(lr), wrt=lj.AdapterParam)

    @nnx.jit
    def step(model, optimizer, x, y):
        def loss_fn(m):
            return jnp.mean((m(x) - y) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, lj.AdapterParam))(model)
        optimizer.update(model, grads)
        return loss

    key = jax.random.key(seed + 2)
    losses = []
    start = time.perf_counter()
    with Progress("train", steps, unit="steps", enabled=progress) as bar:  # a line every 10 s, also in a log
        for _ in range(steps):
            key, sub = jax.random.split(key)
            x = jax.random.normal(sub, (16, 8, 32))
            losses.append(float(step(model, optimizer, x, teacher(x))))
            bar.update(loss=losses[-1])
    seconds = time.perf_counter() - start

    after = jax.tree.map(np.asarray, nnx.state(model, nnx.All(nnx.Param, nnx.Not(lj.AdapterParam))))
    base_unchanged = all(jax.tree.leaves(jax.tree.map(np.array_equal, base_state, after)))
    n_train = sum(x.size for x in jax.tree.leaves(nnx.state(model, lj.AdapterParam)))
    n_base = sum(x.size for x in jax.tree.leaves(base_state))
    return dict(losses=losses, base_unchanged=base_unchanged, n_train=n_train, n_base=n_base, seconds=seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-2)
    args = parser.parse_args()
    out = train(steps=args.steps, lr=args.lr)
    losses = out["losses"]
    print(f"trainable adapter weights: {out['n_train']:,} (base: {out['n_base']:,}, frozen)")
    print(f"loss: first {losses[0]:.5f}  last {losses[-1]:.6f}  ({losses[-1] / losses[0]:.2%} of first)")
    print(f"base weights bit-identical after training: {out['base_unchanged']}")
    print(f"{args.steps} steps in {out['seconds']:.1f} s")


if __name__ == "__main__":
    main()
