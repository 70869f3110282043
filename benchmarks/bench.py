"""Side-by-side benchmark of lora_jax on a Qwen3-0.6B-shaped stack. Not a unit test.

Every ratio is measured in one run: the timed functions are interleaved round by round
(base, adapted, base, adapted, ...) after a warm-up, and each ratio is the median over
rounds of the two times in the same round. A second copy of the base model is timed as
a noise control.

    python benchmarks/bench.py                      # 2 layers, 4 x 256 tokens (CPU: minutes)
    python benchmarks/bench.py --layers 1 --seq 64  # quick look

Writes benchmarks/results/bench.md and bench.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))

import qwen_shaped as qs
from harness import block, flax_lora_mlp, forward_fn, interleaved, qwix_lora, train_step, with_random_adapters

import lora_jax as lj
from lora_jax.linalg import randomized_svd, svd_error, top_r_svd
from lora_jax.steering import sweep

RANK = 16
Row = tuple[str, str, str]


def cfg_for(variant: lj.VariantConfig, pattern: str = qs.PROJECTIONS) -> lj.AdapterConfig:
    return lj.AdapterConfig(rules=(lj.Rule(pattern=pattern, variant=variant),))


def flop_ratio(rank: int) -> float:
    shapes = qs.projection_shapes()
    base = sum(i * o for i, o in shapes)
    return 1 + sum(rank * (i + o) for i, o in shapes) / base


# Variants whose ``r`` is not a rank, benchmarked at their defaults: OFT's r counts blocks
# (32-wide blocks are used); BOFT has no r (PEFT's default: 4-wide blocks, one factor).
DEFAULT_OPTIONS = {"oft": " (oft_block_size=32)", "boft": " (boft_block_size=4)"}


def bench_variant_configs() -> dict[str, lj.VariantConfig]:
    """Forward-benchmark configs: every variant that can be built from a config alone
    (EVA without calibration data is a LoRA with a random A: the same forward cost)."""
    configs = {}
    for name, cls in sorted(lj.variants.VARIANTS.items()):
        fields = {f.name for f in dataclasses.fields(cls)}
        configs[name] = cls(**({"r": RANK} if "r" in fields and name not in DEFAULT_OPTIONS else {}))
    return configs


def bench_forward(base: nnx.Module, x: jax.Array, reps: int, results: dict) -> list[Row]:
    """1-2. forward time of each adapted model and of the merged LoRA, over the base's."""
    fns = {"base": forward_fn(base, x), "base (second copy: noise control)": forward_fn(nnx.clone(base), x)}
    models = {
        name: with_random_adapters(lj.apply_adapters(base, cfg_for(v))) for name, v in bench_variant_configs().items()
    }
    models["antipasto r=64"] = with_random_adapters(
        lj.apply_adapters(base, cfg_for(lj.AntiPaSTOConfig(r=64, block_size=4, delta_s_init=1e-3)))
    )
    fns.update({name: forward_fn(m, x) for name, m in models.items()})
    fns["merged lora"] = forward_fn(lj.merge_adapters(models["lora"]), x)
    if importlib.util.find_spec("qwix") is not None:  # an optional comparison (not a dependency)
        qwix = with_random_adapters(qwix_lora(base, qs.PROJECTIONS, RANK, x), wrt=nnx.LoRAParam)
        fns["qwix lora"] = forward_fn(qwix, x)
    else:
        print("qwix is not installed: its forward row is left out", flush=True)
    fwd = interleaved(fns, reps)
    results["forward_s"], results["flop_ratio_lora"] = fwd.medians(), flop_ratio(RANK)
    targets = {
        "lora": f"<= 1.05 (FLOP ratio {flop_ratio(RANK):.3f})",
        "merged lora": "<= 1.01",
        "antipasto r=64": "<= 1.10",
    }
    rows = []
    for name in fns:
        if name != "base":
            label = f"forward {name} / base" + ("" if "r=" in name or "base" in name else _size(name))
            rows.append((label, f"{fwd.ratio(name, 'base'):.3f}", targets.get(name, "")))
    return rows


def bench_train(base: nnx.Module, remat_base: nnx.Module, x: jax.Array, y: jax.Array, reps: int, results: dict):
    """3. training step: lora_jax vs qwix vs flax nnx.LoRA; peak memory vs a full fine-tune."""
    lora = lj.LoRAConfig(r=RANK, lora_alpha=float(RANK))
    autodiff = dataclasses.replace(lora, custom_vjp=False)
    adapted = lj.apply_adapters(base, cfg_for(lora))
    steps = {
        "lora_jax": train_step(adapted, lj.AdapterParam, x, y),
        "lora_jax custom_vjp=False": train_step(lj.apply_adapters(base, cfg_for(autodiff)), lj.AdapterParam, x, y),
        "qwix": train_step(qwix_lora(base, qs.PROJECTIONS, RANK, x), nnx.LoRAParam, x, y),
        "lora_jax mlp": train_step(lj.apply_adapters(base, cfg_for(lora, r"mlp")), lj.AdapterParam, x, y),
        "flax nnx.LoRA mlp": train_step(flax_lora_mlp(base, RANK), nnx.LoRAParam, x, y),
        "full fine-tune": train_step(nnx.clone(base), nnx.Param, x, y),
    }
    train = interleaved({k: v.run for k, v in steps.items()}, reps)
    remat_peak = {
        "lora_jax": train_step(lj.apply_adapters(remat_base, cfg_for(lora)), lj.AdapterParam, x, y).peak_bytes,
        "full fine-tune": train_step(nnx.clone(remat_base), nnx.Param, x, y).peak_bytes,
    }
    peak = {k: v.peak_bytes for k, v in steps.items()}
    results.update(train_step_s=train.medians(), train_peak_bytes=peak, train_peak_bytes_remat=remat_peak)
    state_bytes = {  # parameters + gradients + Adam moments, without activations
        "lora_jax": _tree_bytes(nnx.state(base)) + 4 * _tree_bytes(nnx.state(adapted, lj.AdapterParam)),
        "full fine-tune": 4 * _tree_bytes(nnx.state(base, nnx.Param)),
    }
    results["train_state_bytes"] = state_bytes
    return [
        ("train step lora_jax / qwix (7 projections)", f"{train.ratio('lora_jax', 'qwix'):.3f}", "<= 0.95"),
        (
            "train step lora_jax custom_vjp=False / qwix",
            f"{train.ratio('lora_jax custom_vjp=False', 'qwix'):.3f}",
            "",
        ),
        (
            "train step lora_jax / flax nnx.LoRA (MLP only)",
            f"{train.ratio('lora_jax mlp', 'flax nnx.LoRA mlp'):.3f}",
            "<= 1.0",
        ),
        (
            "train-step peak memory lora_jax / full fine-tune",
            f"{peak['lora_jax'] / peak['full fine-tune']:.3f}",
            "<= 0.5",
        ),
        (
            "  the same with jax.checkpoint per block",
            f"{remat_peak['lora_jax'] / remat_peak['full fine-tune']:.3f}",
            "",
        ),
        (
            "  params + grads + Adam state only, lora_jax / full",
            f"{state_bytes['lora_jax'] / state_bytes['full fine-tune']:.3f}",
            "",
        ),
        ("train-step peak memory lora_jax / qwix", f"{peak['lora_jax'] / peak['qwix']:.3f}", ""),
    ]


# The variants of issue 17, each timed against LoRA's train step in the same rounds.
NEW_VARIANTS = ("loha", "lokr", "oft", "miss", "vera", "boft", "adalora")


def bench_variant_train(base: nnx.Module, x: jax.Array, y: jax.Array, reps: int, results: dict) -> list[Row]:
    """3b. train step (all 7 projections) of each newer variant over LoRA's (r=16 where r is a rank)."""
    configs = bench_variant_configs()
    names = ["lora", *(n for n in NEW_VARIANTS if n in configs)]
    steps = {n: train_step(lj.apply_adapters(base, cfg_for(configs[n])), lj.AdapterParam, x, y) for n in names}
    train = interleaved({k: v.run for k, v in steps.items()}, reps)
    results["variant_train_step_s"] = train.medians()
    return [(f"train step {n} / lora{_size(n)}", f"{train.ratio(n, 'lora'):.3f}", "") for n in names[1:]]


def _size(name: str) -> str:
    return DEFAULT_OPTIONS.get(name, f" (r={RANK})")


def _tree_bytes(tree) -> int:
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree))


def bench_sweep(model: nnx.Module, x: jax.Array, reps: int, results: dict) -> list[Row]:
    """4. lora_jax.steering.sweep over 16 alphas vs 16 single forwards (alpha traced, so the
    singles share one compilation too)."""
    alphas = jnp.linspace(-2.0, 2.0, 16)
    traces = []

    def fn(m, x):
        traces.append(1)  # runs only while tracing
        return m(x)

    graphdef, alpha_state, rest = nnx.split(model, lj.Alpha, ...)
    single = jax.jit(lambda a, rest, x: nnx.merge(graphdef, jax.tree.map(lambda _: a, alpha_state), rest)(x))
    fns = {
        "sweep batch_size=1": lambda: sweep(model, fn, alphas, inputs=x, batch_size=1),
        "sweep vmap (all 16 at once)": lambda: sweep(model, fn, alphas, inputs=x),
        "16 singles": lambda: [single(a, rest, x) for a in alphas],
    }
    block(fns["sweep batch_size=1"]())
    compiles = len(traces)
    times = interleaved(fns, max(3, reps // 2))
    results.update(sweep_s=times.medians(), sweep_compiles=compiles)
    ratio = lambda k: f"{times.ratio(k, '16 singles'):.3f}"
    return [
        ("sweep of 16 alphas (batch_size=1): compiles", str(compiles), "== 1"),
        ("sweep of 16 alphas (batch_size=1) / 16 single forwards", ratio("sweep batch_size=1"), "<= 1.0"),
        ("sweep of 16 alphas (full vmap) / 16 single forwards", ratio("sweep vmap (all 16 at once)"), ""),
    ]


def _warm_seconds(fn: Callable[[], object]) -> float:
    """Wall time of the second call: the first compiles (once per kernel shape)."""
    block(fn())
    start = time.perf_counter()
    block(fn())
    return time.perf_counter() - start


def _power_law_kernel(shape: tuple[int, int], key: jax.Array) -> jax.Array:
    """Random singular vectors with singular values i^-1/2: a decaying spectrum, unlike a
    random init's flat one (a stand-in for trained weights; no real checkpoint here)."""
    k1, k2 = jax.random.split(key)
    n = min(shape)
    u = jnp.linalg.qr(jax.random.normal(k1, (shape[0], n)))[0]
    v = jnp.linalg.qr(jax.random.normal(k2, (shape[1], n)))[0]
    return (u * jnp.arange(1, n + 1) ** -0.5) @ v.T


def bench_svd_init(base: nnx.Module, results: dict) -> list[Row]:
    """5. PiSSA / AntiPaSTO init over all kernels of the stack, full vs randomized SVD, and
    the randomized top-r error above the full SVD's (the optimum) on down_proj, at each
    variant's r (PiSSA 16, AntiPaSTO 64)."""
    settings = {"niter=4": {"niter": 4}, "niter=8 oversample=32": {"niter": 8, "oversample": 32}}
    inits = {"pissa full": lj.PiSSAConfig(r=RANK), "antipasto full": lj.AntiPaSTOConfig(r=64, block_size=4)}
    for name, opts in settings.items():
        svd = {"svd_iters": opts["niter"], "svd_oversample": opts.get("oversample", 8)}
        inits[f"pissa {name}"] = lj.PiSSAConfig(r=RANK, **svd)
        inits[f"antipasto {name}"] = lj.AntiPaSTOConfig(r=64, block_size=4, **svd)
    init_s = {
        name: _warm_seconds(lambda v=v: nnx.state(lj.apply_adapters(base, cfg_for(v)), lj.AdapterState))
        for name, v in inits.items()
    }
    kernels = {
        "random init": base.layers[0].mlp.down_proj.kernel[...],
        "power-law spectrum": _power_law_kernel(qs.projection_shapes()[-1], jax.random.key(5)),
    }
    errors = {}
    for r in (RANK, 64):
        for kind, w in kernels.items():
            optimum = float(svd_error(w, *top_r_svd(w, r)))
            for name, opts in settings.items():
                approx = float(svd_error(w, *randomized_svd(w, r, key=jax.random.key(0), **opts)))
                errors[f"top-{r}, {kind}, {name}"] = approx - optimum
    results.update(init_s=init_s, top_r_excess_error=errors)
    rows = []
    for name in settings:
        for kind, r in (("pissa", RANK), ("antipasto", 64)):
            speedup = init_s[f"{kind} full"] / init_s[f"{kind} {name}"]
            rows.append((f"{kind} init (r={r}) full SVD / randomized {name}", f"{speedup:.1f}x", ">= 5x"))
    for key, err in errors.items():
        rows.append((f"randomized {key}: error - full SVD's (down_proj)", f"{err:.2e}", "<= 1e-3"))
    return rows


def bench_eva(base: nnx.Module, x: jax.Array, layers: int, results: dict) -> list[Row]:
    """6. EVA calibration throughput over all seven projections, and its statistics memory."""
    eva_cfg = cfg_for(lj.EVAConfig(r=RANK, lora_alpha=float(RANK)))
    batches = [jax.random.normal(jax.random.key(100 + i), x.shape) for i in range(8)]
    lj.eva_plan(base, eva_cfg, batches[:2], desc="eva warm-up")  # compile outside the timing
    start = time.perf_counter()
    plan = lj.eva_plan(base, eva_cfg, batches, desc="eva")
    tokens_per_s = plan.n_batches * x.shape[0] * x.shape[1] / (time.perf_counter() - start)
    stat_mib = sum(d_in * d_in + d_in for d_in, _ in qs.projection_shapes()) * layers * 4 / 2**20
    results["eva"] = {"tokens_per_s": tokens_per_s, "batches": plan.n_batches, "scatter_mib": stat_mib}
    return [
        (f"EVA calibration throughput ({plan.n_batches} batches)", f"{tokens_per_s:,.0f} tokens/s", ""),
        ("EVA statistics memory (scatter + mean, all layers)", f"{stat_mib:.0f} MiB", "bounded by d_in^2"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--sections", default="", help="comma-separated subset, e.g. 'forward,variant train step'")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    base = qs.Stack(args.layers)
    x = jax.random.normal(jax.random.key(0), (args.batch, args.seq, qs.D_MODEL))
    y = jax.random.normal(jax.random.key(1), x.shape)
    results: dict[str, object] = {
        "machine": f"{platform.machine()} {jax.devices()[0].device_kind}, {jax.device_count()} device(s)",
        "tokens": args.batch * args.seq,
        "layers": args.layers,
        "rank": RANK,
    }
    sections = [
        ("forward", lambda: bench_forward(base, x, args.reps, results)),
        ("train step", lambda: bench_train(base, qs.Stack(args.layers, remat=True), x, y, args.reps, results)),
        ("variant train step", lambda: bench_variant_train(base, x, y, args.reps, results)),
        (
            "sweep",
            lambda: bench_sweep(
                with_random_adapters(lj.apply_adapters(base, cfg_for(lj.LoRAConfig(r=RANK)))), x, args.reps, results
            ),
        ),
        ("svd init", lambda: bench_svd_init(base, results)),
        ("eva", lambda: bench_eva(base, x, args.layers, results)),
    ]
    chosen = {s.strip() for s in args.sections.split(",") if s.strip()}
    unknown = chosen - {name for name, _ in sections}
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; known: {[name for name, _ in sections]}")
    rows: list[Row] = []
    for name, run in sections:
        if chosen and name not in chosen:
            continue
        print(f"{name} ...", flush=True)
        rows += run()

    table = ["| measurement | value | target |", "|---|---|---|"] + [f"| {a} | {b} | {c} |" for a, b, c in rows]
    header = (
        f"Machine: {results['machine']}; {args.layers} layers, {results['tokens']} tokens "
        f"({args.batch} x {args.seq}), fp32, r={RANK}, medians of {args.reps} interleaved rounds.\n"
        f"Command: `python benchmarks/bench.py --layers {args.layers} --batch {args.batch} "
        f"--seq {args.seq} --reps {args.reps}`\n"
    )
    (args.out / "bench.md").write_text(header + "\n" + "\n".join(table) + "\n")
    (args.out / "bench.json").write_text(json.dumps(results, indent=2, default=float))
    print(header)
    print("\n".join(table))


if __name__ == "__main__":
    main()
