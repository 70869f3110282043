"""PiSSA init cost: full SVD vs randomized SVD (``niter`` power iterations). Not a unit test.

Qwen3-0.6B kernel shapes (Flax ``(d_in, d_out)``), fp32, rank r. For each method: the
median wall time of the jitted decomposition over interleaved rounds, and the top-r
relative Frobenius error ``|W - U S Vh| / |W|`` next to the full SVD's (the optimum).
Random Gaussian kernels have a flat spectrum, the hardest case for the sketch.

    python benchmarks/svd_init.py            # r=16, 3 rounds
    python benchmarks/svd_init.py --r 64
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax

from lora_jax.linalg import randomized_svd, svd_error, top_r_svd

SHAPES = {"q_proj": (1024, 2048), "down_proj": (3072, 1024)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    jax.config.update("jax_default_matmul_precision", "highest")
    methods = {"full": jax.jit(functools.partial(top_r_svd, r=args.r))}
    for niter in (0, 2, 4):
        fn = functools.partial(randomized_svd, r=args.r, niter=niter, key=jax.random.key(1))
        methods[f"niter={niter}"] = jax.jit(fn)
    print(f"r={args.r}, {jax.devices()[0].platform}, median of {args.rounds} rounds")
    for name, shape in SHAPES.items():
        w = jax.random.normal(jax.random.key(0), shape) / shape[0] ** 0.5
        for fn in methods.values():
            jax.block_until_ready(fn(w))  # compile
        times: dict[str, list[float]] = {m: [] for m in methods}
        for _ in range(args.rounds):
            for m, fn in methods.items():
                t0 = time.perf_counter()
                jax.block_until_ready(fn(w))
                times[m].append(time.perf_counter() - t0)
        full_t = statistics.median(times["full"])
        for m, fn in methods.items():
            t = statistics.median(times[m])
            err = float(svd_error(w, *fn(w)))
            print(f"{name} {shape}  {m:8s} {t * 1e3:8.1f} ms  ({full_t / t:5.1f}x faster)  top-r error {err:.5f}")


if __name__ == "__main__":
    main()
