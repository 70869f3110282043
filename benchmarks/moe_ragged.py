"""LoRA on MoE experts: the ragged_dot form against the einsum (one-hot dispatch) form.

Both layers hold the same expert kernels (E, D, F) and the same LoRA factors; tokens are
routed top-1 by fixed random ids. The ragged form sorts tokens by expert and calls
``jax.lax.ragged_dot`` (base and adapter); the einsum form dispatches them into
``(E, C, D)`` slots with a one-hot ``(T, E, C)`` tensor (C = the largest group, so no
token is dropped and both forms compute the same outputs, checked below), runs the
``ECD,EDF->ECF`` expert einsum with lora_jax's einsum LoRA and combines back.

Ratios are per-round medians of interleaved rounds (``benchmarks/harness.py``), measured
side by side in one run: ``python benchmarks/moe_ragged.py [--tokens 2048 ...]``.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from harness import interleaved, train_step

import lora_jax as lj
from lora_jax.ragged import register_ragged


class RaggedExperts(nnx.Module):
    def __init__(self, kernel: jax.Array):
        self.kernel = nnx.Param(kernel)

    def __call__(self, x: jax.Array, group_sizes: jax.Array) -> jax.Array:
        return jax.lax.ragged_dot(x, self.kernel[...], group_sizes)


register_ragged(RaggedExperts)


class RaggedMoE(nnx.Module):
    def __init__(self, kernel: jax.Array):
        self.experts = RaggedExperts(kernel)
        self.n_experts, self.d_out = kernel.shape[0], kernel.shape[-1]

    def __call__(self, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
        x, expert = batch
        order = jnp.argsort(expert)
        group_sizes = jnp.bincount(expert, length=self.n_experts).astype(jnp.int32)
        return jnp.zeros((x.shape[0], self.d_out), x.dtype).at[order].set(
            self.experts(x[order], group_sizes)
        )


class EinsumMoE(nnx.Module):
    def __init__(self, kernel: jax.Array, capacity: int):
        n_experts, d, f = kernel.shape
        self.experts = nnx.Einsum("ECD,EDF->ECF", (n_experts, d, f), rngs=nnx.Rngs(0))
        self.experts.kernel.value = kernel
        self.capacity, self.n_experts = capacity, n_experts

    def __call__(self, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
        x, expert = batch
        onehot = jax.nn.one_hot(expert, self.n_experts, dtype=x.dtype)  # (T, E)
        slot = (jnp.cumsum(onehot, axis=0) - 1.0) * onehot  # position of each token in its expert
        dispatch = onehot[:, :, None] * jax.nn.one_hot(slot.sum(-1).astype(jnp.int32), self.capacity)[:, None, :]
        xe = jnp.einsum("TD,TEC->ECD", x, dispatch)
        return jnp.einsum("ECF,TEC->TF", self.experts(xe), dispatch)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--f", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--reps", type=int, default=15)
    args = parser.parse_args()
    e, d, f, t = args.experts, args.d, args.f, args.tokens
    key_w, key_x, key_e, key_y = jax.random.split(jax.random.key(0), 4)
    kernel = jax.random.normal(key_w, (e, d, f)) / np.sqrt(d)
    x = jax.random.normal(key_x, (t, d))
    expert = jax.random.randint(key_e, (t,), 0, e)
    capacity = int(jnp.bincount(expert, length=e).max())
    batch = (x, expert)
    y = jax.random.normal(key_y, (t, f))

    cfg = lj.AdapterConfig(rules=(lj.Rule(pattern="experts", variant=lj.LoRAConfig(r=args.rank)),))
    ragged = lj.apply_adapters(RaggedMoE(kernel), cfg)
    einsum = lj.apply_adapters(EinsumMoE(kernel, capacity), cfg)
    state = nnx.state(ragged, lj.AdapterParam)
    moved = jax.tree.map(lambda a: a + 0.02 * jax.random.normal(jax.random.key(1), a.shape), state)
    nnx.update(ragged, moved)
    nnx.update(einsum, moved)  # the same factors: (E, D, r), (E, r, F) in both

    def forward(model):
        graphdef, st = nnx.split(model)
        jitted = jax.jit(lambda s, b: nnx.merge(graphdef, s)(b))
        return lambda: jitted(st, batch)

    out_r, out_e = forward(ragged)(), forward(einsum)()
    err = float(jnp.abs(out_r - out_e).max() / jnp.abs(out_e).max())
    print(f"E={e} D={d} F={f} tokens={t} r={args.rank} capacity={capacity} (mean {t / e:.0f}); "
          f"backend={jax.default_backend()}; max rel. difference ragged vs einsum: {err:.1e}")

    fns = {
        "fwd ragged base": forward(RaggedMoE(kernel)),
        "fwd einsum base": forward(EinsumMoE(kernel, capacity)),
        "fwd ragged": forward(ragged),
        "fwd einsum": forward(einsum),
        "train ragged": train_step(ragged, lj.AdapterParam, batch, y).run,
        "train einsum": train_step(einsum, lj.AdapterParam, batch, y).run,
    }
    timings = interleaved(fns, reps=args.reps)
    print(f"{'':17}{'median ms':>10}")
    for name, seconds in timings.medians().items():
        print(f"{name:17}{seconds * 1e3:10.2f}")
    print(f"base     ragged / einsum: {timings.ratio('fwd ragged base', 'fwd einsum base'):.2f}x (no adapter)")
    print(f"forward  ragged / einsum: {timings.ratio('fwd ragged', 'fwd einsum'):.2f}x")
    print(f"training ragged / einsum: {timings.ratio('train ragged', 'train einsum'):.2f}x")
    print(f"LoRA forward overhead: ragged {timings.ratio('fwd ragged', 'fwd ragged base'):.2f}x, "
          f"einsum {timings.ratio('fwd einsum', 'fwd einsum base'):.2f}x")


if __name__ == "__main__":
    main()
