"""AntiPaSTO forward: delta form (the library's) vs a W_res rewrite, same math, on CPU.

    PYTHONPATH=$PWD python benchmarks/antipasto_forms.py [--rows 2048] [--d 1024] [--r 64]

delta:  y = base(x) + [h (R - I) S' + h diag(a d)] Vh          (no W_res copy)
W_res:  y = x W_res + b + (x U R) S' Vh                          (W_res = W - U S Vh)
Prints the median time of each (jit, best of repeats) and the extra kernel memory.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
from flax import nnx

from lora_jax import AdapterConfig, AdapterParam, AntiPaSTOConfig, Rule, apply_adapters, iter_adapters
from lora_jax.variants.antipasto_cayley import block_diag, bound_skew, cayley, skew_from_params


class Host(nnx.Module):
    def __init__(self, d, rngs):
        self.proj = nnx.Linear(d, d, rngs=rngs)

    def __call__(self, x):
        return self.proj(x)


def timed(fn, *args, repeats=20):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--d", type=int, default=1024)
    parser.add_argument("--r", type=int, default=64)
    parser.add_argument("--bs", type=int, default=4)
    args = parser.parse_args()
    host = Host(args.d, nnx.Rngs(0))
    variant = AntiPaSTOConfig(r=args.r, block_size=args.bs, delta_s_init=1e-2)
    model = apply_adapters(host, AdapterConfig(rules=(Rule(pattern="proj", variant=variant),)))
    params = nnx.state(model, AdapterParam)
    nnx.update(model, jax.tree.map(lambda p: p + 0.1, params))
    [(_, ad)] = list(iter_adapters(model))
    x = jax.random.normal(jax.random.key(1), (args.rows, args.d))

    graphdef, state = nnx.split(model)  # plain jax.jit: no per-call graph bookkeeping in the timing
    delta_jit = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
    delta_fn = lambda _, x: delta_jit(state, x)
    kernel, bias = host.proj.kernel[...], host.proj.bias[...]
    w_res = kernel - (ad.u[...] * ad.s[...][None, :]) @ ad.vh[...]

    @jax.jit
    def wres_fn(x, w_res, bias, u, s, d, vh, rot, a):
        rotation = block_diag(cayley(bound_skew(skew_from_params(rot), variant.max_angle), a))
        return x @ w_res + bias[None, :] + ((x @ u @ rotation) * (s + a * d)[None, :]) @ vh

    wres_args = (x, w_res, bias, ad.u[...], ad.s[...], ad.delta_s[...], ad.vh[...], ad.rot_in[...], jnp.float32(1.0))
    err = float(jnp.abs(delta_fn(model, x) - wres_fn(*wres_args)).max())
    base_fn = jax.jit(lambda x, k, b: x @ k + b[None, :])
    t_base = timed(base_fn, x, kernel, bias)
    t_delta = timed(delta_fn, model, x)
    t_wres = timed(wres_fn, *wres_args)
    extra_delta = (ad.u.size + ad.s.size + ad.vh.size) * 4
    extra_wres = extra_delta + w_res.size * 4
    print(f"rows={args.rows} d={args.d} r={args.r} bs={args.bs}  max|delta - W_res| = {err:.2e}")
    print(f"base matmul {t_base * 1e3:8.2f} ms")
    mib, ratio = 2**20, t_delta / t_wres
    print(f"delta form  {t_delta * 1e3:8.2f} ms ({ratio:.2f}x W_res)  extra memory {extra_delta / mib:.2f} MiB")
    print(f"W_res form  {t_wres * 1e3:8.2f} ms                   extra memory {extra_wres / mib:.2f} MiB")


if __name__ == "__main__":
    main()
