"""Timing and training-step harness shared by the benchmarks: interleaved rounds with
per-round ratios, jitted forwards, functional optax steps with their compiled peak
memory, and the qwix / flax LoRA baselines. Not a unit test."""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import lora_jax as lj


def block(tree):
    return jax.block_until_ready(tree)


@dataclasses.dataclass
class Timings:
    """Wall times of functions measured round-robin: ``times[name][i]`` is round i."""

    times: dict[str, list[float]]

    def median(self, name: str) -> float:
        return statistics.median(self.times[name])

    def ratio(self, name: str, ref: str) -> float:
        """Median over rounds of ``name / ref`` in the same round: slow drift of the
        machine hits both sides of each ratio alike."""
        return statistics.median(a / b for a, b in zip(self.times[name], self.times[ref], strict=True))

    def medians(self) -> dict[str, float]:
        return {name: self.median(name) for name in self.times}


def interleaved(fns: dict[str, Callable[[], object]], reps: int, warmup: int = 2) -> Timings:
    """Time each function ``reps`` times, round by round, after ``warmup`` calls each.
    Each round starts one function later, so no function always runs first."""
    for fn in fns.values():
        for _ in range(warmup):
            block(fn())
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(reps):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            start = time.perf_counter()
            block(fns[name]())
            times[name].append(time.perf_counter() - start)
    return Timings(times)


def forward_fn(model: nnx.Module, x: jax.Array) -> Callable[[], jax.Array]:
    graphdef, state = nnx.split(model)
    jitted = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    return lambda: jitted(state, x)


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


def with_random_adapters(model: nnx.Module, scale: float = 0.01, wrt=lj.AdapterParam) -> nnx.Module:
    """Move adapter weights off their identity init, so no zero is special-cased."""
    state = nnx.state(model, wrt)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    moved = [v + scale * jax.random.normal(k, v.shape, v.dtype) for v, k in zip(leaves, keys, strict=True)]
    nnx.update(model, jax.tree.unflatten(treedef, moved))
    return model
