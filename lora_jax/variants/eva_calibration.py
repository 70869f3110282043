"""EVA initialisation from calibration data: input statistics, rank allocation, adapters.

    cfg = AdapterConfig(rules=(Rule(pattern="proj", variant=EVAConfig(r=8)),))
    model = eva_init(model, cfg, batches, forward=lambda m, b: m(b["input_ids"]),
                     mask=lambda b: b["attention_mask"])

Estimator. Each EVA layer streams the mean and centered scatter of its input rows
(``calibrate.moments_update``, ``d_in^2`` floats per kernel matrix); the components are
one exact ``eigh`` of that scatter at the end. PEFT instead runs an incremental PCA
(truncated to ``round(rho r)`` components, with a randomized SVD) on every batch: that
keeps only ``k d_in`` floats but is approximate after truncation and costs an SVD of a
``(k + tokens, d_in)`` matrix per batch. The scatter is exact for the data seen, order
independent, and a batch costs one ``rows^T rows`` matmul; ``d_in^2`` is a few MB per
layer at LLM widths.

Convergence (PEFT's rule): after each batch a warm-started subspace iteration plus a
Rayleigh-Ritz step (``O(d_in^2 k)``, no full eigh) tracks the leading components; a
component has converged when its cosine similarity with the previous batch's estimate
is >= ``tau``. The budget is allocated from the current ratios, and a layer whose
allocated components have all converged stops taking in data (its statistics freeze);
it takes data again if a later allocation gives it a component that has not converged.
Calibration stops when every layer is frozen. Freezing matters in near-ties: a layer
that kept taking data would shift its ratios and could win or lose a rank against
PEFT's allocation. Unlike PEFT, the data is not cycled: if it runs out first, the exact
result for the data seen is used, with a warning. PEFT's sharing of one decomposition
between layers that see the same input (q/k/v) is not done: each layer keeps its own
scatter.
"""

from __future__ import annotations

import collections
import dataclasses
import re
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float

from lora_jax.adapter import Target
from lora_jax.calibrate import collect_statistics, moments_init, moments_update
from lora_jax.config import AdapterConfig, Rule
from lora_jax.surgery import apply_adapters, find_targets, iter_adapters
from lora_jax.variants._checks import check_rank
from lora_jax.variants.eva import EVAConfig

__all__ = ["EvaPlan", "apply_eva_plan", "eva_init", "eva_plan"]

_POWER_STEPS = 2  # subspace iterations per batch (warm-started); each costs a matmul and a QR


@dataclasses.dataclass(frozen=True)
class EvaPlan:
    """The result of calibration. ``config`` has one EVA rule per adapted layer with its
    allocated rank and alpha (layers allocated rank 0 are left out) and the other rules
    of the original config; rebuild a checkpointed model with it. ``components[path]``
    is A ``(*kbatch, d_in, rank)``; ``ratios[path]`` the explained variance ratios of the
    layer's ``round(rho r)`` candidate components (mean over kernel-batch indices)."""

    config: AdapterConfig
    components: dict[str, Array]
    ratios: dict[str, np.ndarray]
    n_batches: int
    converged: bool


def _n_candidates(cfg: EVAConfig, target: Target) -> int:
    return min(round(cfg.r * cfg.rho), target.spec.d_in, target.spec.d_out)


def _ritz(scatter: Array, basis: Array) -> tuple[Array, Array]:
    """Top eigenpairs of ``scatter`` (descending), refined from the columns of ``basis``."""
    for _ in range(_POWER_STEPS):
        basis, _ = jnp.linalg.qr(scatter @ basis)
    values, rotation = jnp.linalg.eigh(jnp.swapaxes(basis, -1, -2) @ scatter @ basis)
    return (basis @ rotation)[..., ::-1], values[..., ::-1]


def _trace(scatter: Array) -> Array:
    return jnp.trace(scatter, axis1=-2, axis2=-1)


def _update(stat: dict[str, Array], rows: Array, mask: Array) -> dict[str, Array]:
    """One batch into a layer's statistics; a frozen layer (``active == 0``) keeps them."""
    new = _updated(stat, rows, mask)
    return jax.tree.map(lambda fresh, old: jnp.where(stat["active"] > 0, fresh, old), new, stat)


def _updated(stat: dict[str, Array], rows: Array, mask: Array) -> dict[str, Array]:
    moments = moments_update(stat, rows, mask)
    trace = _trace(moments["scatter"])
    basis, values = _ritz(moments["scatter"], stat["basis"])
    basis = jnp.where((trace > 0)[..., None, None], basis, stat["basis"])  # nothing seen yet: keep the start
    k = stat["sim"].shape[-1]
    sim = jnp.abs(jnp.einsum("...dk,...dk->...k", basis[..., :k], stat["basis"][..., :k]))
    return {
        **moments,
        "basis": basis,
        "ratio": values[..., :k] / jnp.maximum(trace, 1e-30)[..., None],
        "sim": jnp.where(stat["count"] > 0, sim, 0.0),  # the first estimate has nothing to agree with
        "active": stat["active"],
    }


def _allocate(ratios: dict[str, np.ndarray], budget: int) -> dict[str, int]:
    """The budget goes to the largest ratios over all layers' candidates (ties: layer order)."""
    owners = [path for path, r in ratios.items() for _ in r]
    order = np.argsort(-np.concatenate(list(ratios.values())), kind="stable")[:budget]
    counts = collections.Counter(owners[i] for i in order)
    return {path: counts.get(path, 0) for path in ratios}


def _layer_ratios(ratio: Array) -> np.ndarray:
    return np.asarray(ratio).reshape(-1, ratio.shape[-1]).mean(0)


def _final_components(stat: dict[str, Array], k: int) -> tuple[Float[Array, "*kb d k"], Float[Array, "*kb k"]]:
    """Exact top-``k`` eigenpairs of the scatter, each direction's largest entry positive
    (PEFT's sign convention, so repeated runs give the same A)."""
    values, vectors = jnp.linalg.eigh(stat["scatter"])
    values, vectors = values[..., ::-1][..., :k], vectors[..., ::-1][..., :k]
    peak = jnp.take_along_axis(vectors, jnp.argmax(jnp.abs(vectors), axis=-2)[..., None, :], axis=-2)
    return vectors * jnp.where(peak < 0, -1.0, 1.0), values


def eva_plan(
    model: nnx.Module,
    cfg: AdapterConfig,
    batches: Iterable[Any],
    *,
    forward: Callable[[nnx.Module, Any], Any] = lambda m, b: m(b),
    mask: Callable[[Any], Array] | None = None,
    desc: str = "EVA",
) -> EvaPlan:
    """Calibrate the layers of ``cfg``'s EVA rules on ``batches``: their A and ranks."""
    chosen = [(t, rule) for t, rule in find_targets(model, cfg) if isinstance(rule.variant, EVAConfig)]
    if not chosen:
        raise ValueError("eva_init: no rule of the config uses EVAConfig; use apply_adapters for other variants")
    targets = {t.path: (t, rule.variant) for t, rule in chosen}
    for t, v in targets.values():
        check_rank(v.name, v.r, t)
    ks = {p: _n_candidates(v, t) for p, (t, v) in targets.items()}
    budget = sum(v.r for _, v in targets.values())

    def init(target: Target) -> dict[str, Array]:
        k, d, kb = ks[target.path], target.spec.d_in, target.spec.batch_shape
        start = jax.random.normal(target.key(cfg.seed), (*kb, d, min(2 * k, d)))  # 2k: oversampled like PEFT
        zeros = jnp.zeros((*kb, k))
        basis = jnp.linalg.qr(start)[0]
        return {**moments_init(target), "basis": basis, "ratio": zeros, "sim": zeros, "active": jnp.ones(())}

    progress = {"batches": 0, "converged": False}

    def revise(stats: dict[str, dict[str, Array]]) -> dict[str, dict[str, Array]]:
        """PEFT's rule: freeze each layer whose allocated components have converged."""
        progress["batches"] += 1
        ranks = _allocate({p: _layer_ratios(s["ratio"]) for p, s in stats.items()}, budget)
        done = {p: bool(np.all(np.asarray(s["sim"])[..., : ranks[p]] >= targets[p][1].tau)) for p, s in stats.items()}
        progress["converged"] = all(done.values())
        return {p: {**s, "active": jnp.asarray(0.0 if done[p] else 1.0, s["active"].dtype)} for p, s in stats.items()}

    stats = collect_statistics(
        model,
        batches,
        paths=list(targets),
        init=init,
        update=_update,
        forward=forward,
        mask=mask,
        desc=desc,
        revise=revise,
        until=lambda _: progress["converged"],
    )
    finals, ratios = {}, {}
    for path, stat in stats.items():
        n = int(stat["count"])
        if n <= ks[path]:
            raise ValueError(
                f"eva_init: layer {path!r} saw {n} calibration rows (tokens after masking) but needs more "
                f"than {ks[path]} (= round(rho * r) candidate components); pass more calibration data or "
                "lower r or rho"
            )
        finals[path] = _final_components(stat, ks[path])
        ratios[path] = _layer_ratios(finals[path][1] / _trace(stat["scatter"])[..., None])
    if not progress["converged"]:
        warnings.warn(
            f"eva_init: the components did not converge (tau) within {progress['batches']} batches; "
            "using the exact PCA of the data seen. Pass more calibration data for a stable init.",
            stacklevel=2,
        )
    ranks = _allocate(ratios, budget)
    components, rules = {}, []
    for path, (_, v) in targets.items():
        rank = ranks[path]
        if rank == 0:
            continue
        vectors, values = (a[..., :rank] for a in finals[path])
        if v.whiten:  # PEFT divides by sqrt of the singular value sqrt(eigenvalue of the scatter)
            vectors = vectors / jnp.maximum(values, 1e-30)[..., None, :] ** 0.25
        components[path] = vectors
        variant = dataclasses.replace(v, r=rank, lora_alpha=v.lora_alpha * rank / v.r)
        rules.append(Rule(pattern=f"^{re.escape(path)}$", variant=variant))
    fenced = tuple(f"^{re.escape(p)}$" for p in targets)
    others = [
        dataclasses.replace(r, exclude=r.exclude + fenced) for r in cfg.rules if not isinstance(r.variant, EVAConfig)
    ]
    config = dataclasses.replace(cfg, rules=(*rules, *others))
    return EvaPlan(config, components, ratios, progress["batches"], progress["converged"])


def apply_eva_plan(model: nnx.Module, plan: EvaPlan) -> nnx.Module:
    """A copy of ``model`` with ``plan.config``'s adapters and EVA's A written in."""
    new = apply_adapters(model, plan.config)
    for path, adapter in iter_adapters(new):
        if path in plan.components:
            old = adapter.lora_a[...]  # keep the placement a sharded model gave it
            adapter.lora_a[...] = jax.device_put(plan.components[path].astype(old.dtype), old.sharding)
    return new


def eva_init(model: nnx.Module, cfg: AdapterConfig, batches: Iterable[Any], **calibration: Any) -> nnx.Module:
    """A copy of ``model`` with EVA adapters initialised from ``batches``.

    Keywords as :func:`eva_plan`: ``forward(model, batch)`` runs the model (default
    ``model(batch)``); ``mask(batch)`` marks real tokens (1) and padding (0) over the
    leading axes of the layers' inputs, e.g. the attention mask; ``desc`` labels the
    progress lines. Rules of ``cfg`` with other variants are applied as usual. The
    caller's model is not changed. For the allocated ranks and the config that rebuilds
    the model (for checkpoints), call :func:`eva_plan` then :func:`apply_eva_plan`.
    """
    return apply_eva_plan(model, eva_plan(model, cfg, batches, **calibration))
