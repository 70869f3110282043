"""Many LoRA adapters on one base: mixed-adapter batches, side by side.

Part 1, one layer ``y = x W + alpha_b s (x A_k B_k)`` with row b on adapter k: the three
kernel forms of a mixed batch, for K adapters:

- ``gather``: each row gathers its own ``A_k``, ``B_k`` and runs the single-adapter math
  under ``jax.vmap`` over rows (the form :mod:`lora_jax.named_layer` uses, generic over
  variants);
- ``onehot``: every row through all K adapters, masked by a one-hot row -> adapter matrix
  (K times the adapter FLOPs, no gather);
- ``ragged``: rows sorted by adapter, ``jax.lax.ragged_dot`` over the groups, unsorted;

next to ``single`` (one adapter for every row) and ``merged`` (the base matmul alone).

Part 2, a Qwen3-shaped model with LoRA on every projection: a mixed batch of K named
adapters (rows round-robin) vs the same batch with one adapter vs K separate forwards
(each adapter on its rows, one call each) vs the merged model; and the memory of one
adapter slot.

Ratios are per-round medians of interleaved rounds (``benchmarks/harness.py``), measured
in one run: ``python benchmarks/multi_adapter.py [--rows 16 --tokens 64 --d 1024 ...]``.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from harness import forward_fn, interleaved

import lora_jax as lj
from lora_jax import named
from lora_jax.models import ModelConfig, Qwen3


def layer_forms(k: int, rows: int, tokens: int, d: int, r: int):
    keys = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(keys[0], (rows, tokens, d))
    w = jax.random.normal(keys[1], (d, d)) / np.sqrt(d)
    a = jax.random.normal(keys[2], (k, d, r)) / np.sqrt(d)
    b = jax.random.normal(keys[3], (k, r, d)) / np.sqrt(r)
    slots = jnp.arange(rows) % k
    alpha = jax.random.uniform(keys[4], (rows,), minval=-1.0, maxval=1.0)
    scale = 2.0

    @jax.jit
    def gather(x, w, a, b, slots, alpha):
        def row(xr, ar, br, al):
            return xr @ w + ((xr @ ar) * (al * scale)) @ br

        return jax.vmap(row)(x, a[slots], b[slots], alpha)

    @jax.jit
    def onehot(x, w, a, b, slots, alpha):
        mask = jax.nn.one_hot(slots, k, dtype=x.dtype) * (alpha * scale)[:, None]
        h = jnp.einsum("btd,kdr->btkr", x, a) * mask[:, None, :, None]
        return x @ w + jnp.einsum("btkr,kro->bto", h, b)

    @jax.jit
    def ragged(x, w, a, b, slots, alpha):
        order = jnp.argsort(slots)
        sizes = (jnp.bincount(slots, length=k) * tokens).astype(jnp.int32)
        xs = x[order].reshape(rows * tokens, d)
        h = jax.lax.ragged_dot(xs, a, sizes) * jnp.repeat(alpha[order] * scale, tokens)[:, None]
        delta = jax.lax.ragged_dot(h, b, sizes).reshape(rows, tokens, d)
        return x @ w + jnp.zeros_like(delta).at[order].set(delta)

    @jax.jit
    def single(x, w, a, b, slots, alpha):
        h = (x @ a[0]) * (alpha * scale)[:, None, None]
        return x @ w + h @ b[0]

    @jax.jit
    def merged(x, w, a, b, slots, alpha):
        return x @ w

    args = (x, w, a, b, slots, alpha)
    want = gather(*args)
    for fn in (onehot, ragged):
        np.testing.assert_allclose(fn(*args), want, rtol=2e-4, atol=2e-4)
    return {name: (lambda fn=fn: fn(*args)) for name, fn in dict(
        gather=gather, onehot=onehot, ragged=ragged, single=single, merged=merged
    ).items()}


def model_config(d: int, layers: int) -> ModelConfig:
    heads = max(2, d // 64)
    return ModelConfig(
        vocab_size=2048, d_model=d, n_layers=layers, n_heads=heads, n_kv_heads=max(1, heads // 2),
        head_dim=64, d_ff=3 * d,
    )


def lora_rule(r: int, seed: int) -> lj.AdapterConfig:
    return lj.AdapterConfig(rules=(lj.Rule(pattern="proj", variant=lj.LoRAConfig(r=r, lora_alpha=2.0 * r)),), seed=seed)


def trained(model: nnx.Module, seed: int) -> None:
    state = nnx.state(model, (lj.AdapterParam, named.Parked))
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    new = [v + 0.02 * jax.random.normal(q, v.shape) for v, q in zip(leaves, keys, strict=True)]
    nnx.update(model, jax.tree.unflatten(treedef, new))


def model_rows(k: int, rows: int, tokens: int, d: int, layers: int, r: int):
    base = Qwen3(model_config(d, layers), rngs=nnx.Rngs(0))
    model = base
    for i in range(k):
        model = named.add(model, f"a{i}", lora_rule(r, i), active=(i == 0))
    trained(model, 1)
    tokens_in = jax.random.randint(jax.random.key(2), (rows, tokens), 0, 2048)
    names = [f"a{i % k}" for i in range(rows)]
    mixed = nnx.clone(model)
    named.route(mixed, names)
    one = named.only(model, "a0")
    merged = lj.merge_adapters(one)
    singles = [named.only(model, f"a{i}") for i in range(k)]
    picks = [np.flatnonzero(np.asarray([n == f"a{i}" for n in names])) for i in range(k)]
    fwd_singles = [forward_fn(m, tokens_in[p]) for m, p in zip(singles, picks, strict=True)]
    # the mixed batch equals each row's adapter alone
    y, want = forward_fn(mixed, tokens_in)(), forward_fn(singles[1 % k], tokens_in[picks[1 % k]])()
    np.testing.assert_allclose(y[picks[1 % k]], want, rtol=2e-3, atol=2e-3)
    slot_bytes = sum(v.size * v.dtype.itemsize for v in jax.tree.leaves(nnx.state(one, lj.AdapterParam)))
    fns = {
        "mixed": forward_fn(mixed, tokens_in),
        "one adapter": forward_fn(one, tokens_in),
        "K separate": lambda: [f() for f in fwd_singles],
        "merged": forward_fn(merged, tokens_in),
    }
    return fns, slot_bytes, {"mixed": temp_bytes(mixed, tokens_in), "one adapter": temp_bytes(one, tokens_in)}


def temp_bytes(model: nnx.Module, x: jax.Array) -> int:
    """XLA's temporary buffers of the compiled forward (activations, gathered weights)."""
    graphdef, state = nnx.split(model)
    compiled = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)).lower(state, x).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--d", type=int, default=1024)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--ks", type=int, nargs="+", default=[4, 16])
    p.add_argument("--skip-model", action="store_true")
    args = p.parse_args()
    print(f"backend {jax.default_backend()}; rows {args.rows} x {args.tokens} tokens, d {args.d}, r {args.r}")
    print("\n## one layer: kernel forms of a mixed batch (median ms; ratio to merged, same round)")
    print("| K | form | ms | / merged | / single |\n|---|---|---|---|---|")
    for k in args.ks:
        t = interleaved(layer_forms(k, args.rows, args.tokens, args.d, args.r), args.reps)
        for name in t.times:
            print(f"| {k} | {name} | {1e3 * t.median(name):.2f} | {t.ratio(name, 'merged'):.2f} | "
                  f"{t.ratio(name, 'single'):.2f} |")
    if args.skip_model:
        return
    print(f"\n## Qwen3-shaped model ({args.layers} blocks, d {args.d}), LoRA r={args.r} on every projection")
    print("| K | row | ms | / merged | / one adapter |\n|---|---|---|---|---|")
    for k in args.ks:
        fns, slot_bytes, temps = model_rows(k, args.rows, args.tokens, args.d, args.layers, args.r)
        t = interleaved(fns, args.reps)
        for name in t.times:
            print(f"| {k} | {name} | {1e3 * t.median(name):.1f} | {t.ratio(name, 'merged'):.2f} | "
                  f"{t.ratio(name, 'one adapter'):.2f} |")
        print(f"| {k} | compiled temporaries (MiB): mixed {temps['mixed'] / 2**20:.1f}, "
              f"one adapter {temps['one adapter'] / 2**20:.1f} | | | |")
    print(f"\nmemory of one adapter slot: {slot_bytes / 2**20:.2f} MiB (its LoRA weights over every layer); a "
          f"mixed forward also gathers one copy per row and layer transiently")


if __name__ == "__main__":
    main()
