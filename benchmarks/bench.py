"""Side-by-side benchmark of lora_jax on a Qwen3-0.6B-shaped stack. Not a unit test.

Every ratio is measured in one run: the timed functions are interleaved round by round
(base, adapted, base, adapted, ...) after a warm-up, and medians are reported.

    python benchmarks/bench.py                      # 2 layers, 4 x 256 tokens (CPU: minutes)
    python benchmarks/bench.py --layers 1 --seq 64  # quick look

Writes benchmarks/results/bench.md and bench.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))

import qwen_shaped as qs

import lora_jax as lj

RANK = 16


def block(tree):
    return jax.block_until_ready(tree)


def interleaved_medians(fns: dict[str, Callable[[], object]], reps: int, warmup: int = 2) -> dict[str, float]:
    """Median wall time of each function, measured round-robin so drift hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            block(fn())
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            block(fn())
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def forward_fn(model: nnx.Module, x: jax.Array) -> Callable[[], jax.Array]:
    graphdef, state = nnx.split(model)
    jitted = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    return lambda: jitted(state, x)


def cfg_for(variant: lj.VariantConfig, pattern: str = qs.PROJECTIONS) -> lj.AdapterConfig:
    return lj.AdapterConfig(rules=(lj.Rule(pattern=pattern, variant=variant),))


@dataclasses.dataclass
class TrainStep:
    """A jitted optax step over the ``wrt`` leaves of a model, kept functional so its
    compiled memory can be read; state is carried between calls."""

    run: Callable[[], jax.Array]
    peak_bytes: int


def train_step(model: nnx.Module, wrt, x: jax.Array, y: jax.Array) -> TrainStep:
    graphdef, params, rest = nnx.split(model, wrt, ...)
    tx = optax.adam(1e-4)
    params = jax.tree.map(jnp.copy, params)  # donated below; never donate arrays other models share
    carry = {"params": params, "opt": tx.init(params)}

    def step(params, opt_state, rest, x, y):
        def loss_fn(p):
            return jnp.mean((nnx.merge(graphdef, p, rest)(x) - y) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    jitted = jax.jit(step, donate_argnums=(0, 1))
    mem = jitted.lower(carry["params"], carry["opt"], rest, x, y).compile().memory_analysis()
    peak = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes

    def run():
        carry["params"], carry["opt"], loss = jitted(carry["params"], carry["opt"], rest, x, y)
        return loss

    return TrainStep(run, int(peak))


def flax_lora_mlp(model: nnx.Module, rank: int) -> nnx.Module:
    """flax's own nnx.LoRA around the MLP Linears (it does not wrap Einsum layers)."""
    model = nnx.clone(model)
    rngs = nnx.Rngs(0)
    for layer in model.layers:
        for name in ("gate_proj", "up_proj", "down_proj"):
            base = getattr(layer.mlp, name)
            d_in, d_out = base.kernel.shape
            setattr(layer.mlp, name, nnx.LoRA(d_in, rank, d_out, base_module=base, rngs=rngs))
    return model


def qwix_lora(model: nnx.Module, pattern: str, rank: int, x: jax.Array) -> nnx.Module:
    import qwix

    provider = qwix.LoraProvider([qwix.LoraRule(module_path=f".*{pattern}.*", rank=rank, alpha=float(rank))])
    return qwix.apply_lora_to_model(nnx.clone(model), provider, x[:1, :8], rngs=nnx.Rngs(0))


def with_random_adapters(model: nnx.Module, scale: float = 0.01) -> nnx.Module:
    """Move adapter weights off their identity init, so no zero is special-cased."""
    state = nnx.state(model, lj.AdapterParam)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    moved = [v + scale * jax.random.normal(k, v.shape, v.dtype) for v, k in zip(leaves, keys, strict=True)]
    nnx.update(model, jax.tree.unflatten(treedef, moved))
    return model


def _top_r(w: jax.Array, r: int, niter: int | None) -> jax.Array:
    from lora_jax.linalg import randomized_svd, top_r_svd

    u, s, vh = top_r_svd(w, r) if niter is None else randomized_svd(w, r, niter=niter, key=jax.random.key(0))
    return (u * s[..., None, :]) @ vh


def flop_ratio(rank: int) -> float:
    shapes = qs.projection_shapes()
    base = sum(i * o for i, o in shapes)
    return 1 + sum(rank * (i + o) for i, o in shapes) / base


def bench_variant_configs() -> dict[str, lj.VariantConfig]:
    """Forward-benchmark configs: every variant that can be built from a config alone."""
    configs = {}
    for name, cls in sorted(lj.VARIANTS.items()):
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {"r": RANK} if "r" in fields else {}
        try:
            configs[name] = cls(**kwargs)
        except (TypeError, ValueError) as err:
            print(f"  skip {name}: {err}")
    return configs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    base = qs.Stack(args.layers)
    x = jax.random.normal(jax.random.key(0), (args.batch, args.seq, qs.D_MODEL))
    y = jax.random.normal(jax.random.key(1), x.shape)
    rows: list[tuple[str, str, str]] = []
    results: dict[str, object] = {
        "machine": f"{platform.machine()} {jax.devices()[0].device_kind}, {jax.device_count()} device(s)",
        "tokens": args.batch * args.seq,
        "layers": args.layers,
        "rank": RANK,
    }

    # 1-2. forward: adapted / base per variant, merged / base
    print("forward ...")
    fns = {"base": forward_fn(base, x)}
    adapted_models = {}
    for name, variant in bench_variant_configs().items():
        try:
            adapted_models[name] = with_random_adapters(lj.apply_adapters(base, cfg_for(variant)))
        except Exception as err:  # a data-driven variant (EVA) needs calibration first
            print(f"  skip {name}: {type(err).__name__}: {err}"[:200])
            continue
        fns[name] = forward_fn(adapted_models[name], x)
    antipasto64 = lj.AntiPaSTOConfig(r=64, block_size=4, delta_s_init=1e-3)
    adapted_models["antipasto r=64"] = with_random_adapters(lj.apply_adapters(base, cfg_for(antipasto64)))
    fns["antipasto r=64"] = forward_fn(adapted_models["antipasto r=64"], x)
    if "lora" in adapted_models:
        fns["merged lora"] = forward_fn(lj.merge_adapters(adapted_models["lora"]), x)
    fwd = interleaved_medians(fns, args.reps)
    results["forward_s"] = fwd
    results["flop_ratio_lora"] = flop_ratio(RANK)
    for name, seconds in fwd.items():
        if name == "base":
            continue
        target = {"lora": "<= 1.05", "merged lora": "<= 1.01", "antipasto r=64": "<= 1.10"}.get(name, "")
        note = f"FLOP ratio {flop_ratio(RANK):.3f}" if name == "lora" else ""
        rows.append(
            (
                f"forward {name} / base" + ("" if "r=" in name else f" (r={RANK})"),
                f"{seconds / fwd['base']:.3f}",
                f"{target} {note}",
            )
        )

    # 3. training step: lora_jax vs qwix vs flax nnx.LoRA; memory vs full fine-tune
    print("train step ...")
    lora = lj.LoRAConfig(r=RANK, lora_alpha=float(RANK))
    steps = {
        "lora_jax": train_step(lj.apply_adapters(base, cfg_for(lora)), lj.AdapterParam, x, y),
        "qwix": train_step(qwix_lora(base, qs.PROJECTIONS, RANK, x), nnx.LoRAParam, x, y),
        "lora_jax mlp": train_step(lj.apply_adapters(base, cfg_for(lora, r"mlp")), lj.AdapterParam, x, y),
        "flax nnx.LoRA mlp": train_step(flax_lora_mlp(base, RANK), nnx.LoRAParam, x, y),
        "full fine-tune": train_step(nnx.clone(base), nnx.Param, x, y),
    }
    train = interleaved_medians({k: v.run for k, v in steps.items()}, args.reps)
    results["train_step_s"] = train
    results["train_peak_bytes"] = {k: v.peak_bytes for k, v in steps.items()}
    rows.append(("train step lora_jax / qwix (7 projections)", f"{train['lora_jax'] / train['qwix']:.3f}", "<= 0.95"))
    rows.append(
        (
            "train step lora_jax / flax nnx.LoRA (MLP only)",
            f"{train['lora_jax mlp'] / train['flax nnx.LoRA mlp']:.3f}",
            "<= 1.0",
        )
    )
    peak = steps["lora_jax"].peak_bytes / steps["full fine-tune"].peak_bytes
    rows.append(("train-step peak memory lora_jax / full fine-tune", f"{peak:.3f}", "<= 0.5"))
    rows.append(
        ("train-step peak memory lora_jax / qwix", f"{steps['lora_jax'].peak_bytes / steps['qwix'].peak_bytes:.3f}", "")
    )

    # 5. SVD-based init over all kernels of the stack: full vs randomized SVD
    print("svd init ...")
    inits = {
        "pissa full": lj.PiSSAConfig(r=RANK),
        "pissa niter=4": lj.PiSSAConfig(r=RANK, niter=4),
        "antipasto full": lj.AntiPaSTOConfig(r=64, block_size=4),
        "antipasto niter=4": lj.AntiPaSTOConfig(r=64, block_size=4, svd_iters=4),
    }
    init_s = {}
    for name, variant in inits.items():
        runs = []
        for _ in range(1):
            start = time.perf_counter()
            block(nnx.state(lj.apply_adapters(base, cfg_for(variant)), lj.AdapterState))
            runs.append(time.perf_counter() - start)
        init_s[name] = min(runs)
    results["init_s"] = init_s
    w = base.layers[0].mlp.down_proj.kernel[...]
    full_err = float(jnp.linalg.norm(w - _top_r(w, 64, None)) / jnp.linalg.norm(w))
    rand_err = float(jnp.linalg.norm(w - _top_r(w, 64, 4)) / jnp.linalg.norm(w))
    results["top_r_error"] = {"full": full_err, "niter=4": rand_err}
    for kind, r in (("pissa", RANK), ("antipasto", 64)):
        speedup = init_s[f"{kind} full"] / init_s[f"{kind} niter=4"]
        rows.append((f"{kind} init (r={r}) full SVD / randomized niter=4", f"{speedup:.1f}x", ">= 5x"))
    rows.append(("randomized top-64 error - full SVD's (down_proj)", f"{rand_err - full_err:.2e}", "<= 1e-3"))

    # 6. EVA calibration throughput over all seven projections of the stack
    print("eva ...")
    eva_cfg = cfg_for(lj.EVAConfig(r=RANK, lora_alpha=float(RANK)))
    batches = [jax.random.normal(jax.random.key(100 + i), x.shape) for i in range(8)]
    lj.eva_plan(base, eva_cfg, batches[:2], desc="eva warm-up")  # compile outside the timing
    start = time.perf_counter()
    plan = lj.eva_plan(base, eva_cfg, batches, desc="eva")
    eva_s = time.perf_counter() - start
    tokens_per_s = plan.n_batches * x.shape[0] * x.shape[1] / eva_s
    stat_mib = sum(d_in * d_in + d_in for d_in, _ in qs.projection_shapes()) * args.layers * 4 / 2**20
    results["eva"] = {"tokens_per_s": tokens_per_s, "batches": plan.n_batches, "scatter_mib": stat_mib}
    rows.append((f"EVA calibration throughput ({plan.n_batches} batches)", f"{tokens_per_s:,.0f} tokens/s", ""))
    rows.append(("EVA statistics memory (scatter + mean, all layers)", f"{stat_mib:.0f} MiB", "bounded by d_in^2"))

    # 4. alpha sweep over 16 alphas in one call vs 16 single forwards
    print("sweep ...")
    model = adapted_models["lora"]
    alphas = jnp.linspace(-2.0, 2.0, 16)
    graphdef, alpha_state, rest = nnx.split(model, lj.Alpha, ...)
    traces = []

    def forward_at(alpha, rest, x):
        traces.append(1)
        return nnx.merge(graphdef, jax.tree.map(lambda a: alpha, alpha_state), rest)(x)

    sweep = jax.jit(jax.vmap(forward_at, in_axes=(0, None, None)))
    single = jax.jit(forward_at)
    sweep_times = interleaved_medians(
        {"sweep": lambda: sweep(alphas, rest, x), "16 singles": lambda: [single(a, rest, x) for a in alphas]},
        max(3, args.reps // 2),
    )
    results["sweep_s"] = sweep_times
    results["sweep_compiles"] = len(traces) - 1  # minus the single-forward trace
    rows.append(("sweep of 16 alphas: compiles", str(len(traces) - 1), "== 1"))
    rows.append(
        ("sweep of 16 alphas / 16 single forwards", f"{sweep_times['sweep'] / sweep_times['16 singles']:.3f}", "<= 1.0")
    )

    table = ["| measurement | value | target |", "|---|---|---|"] + [f"| {a} | {b} | {c.strip()} |" for a, b, c in rows]
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
