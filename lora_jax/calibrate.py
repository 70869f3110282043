"""Statistics of the inputs each targeted layer sees, without hooks.

    stats = collect_statistics(model, batches, paths=["layers.0.q"], init=..., update=...)

The caller's model is not touched: a clone has each target wrapped in a recorder module
that runs the original layer and folds the rows of its input into a statistic held in
its own ``nnx.Variable``. One ``nnx.jit`` step per batch updates every statistic; the
model's output is discarded, so XLA drops the layers after the last target. Memory is the
size of the statistics (e.g. ``d_in^2`` per layer for a scatter matrix), not of the data.

A row is one input vector of a kernel matrix: ``spec.in_to_matrix(x)`` with its free
axes (tokens, batch rows) flattened to ``N``, so ``update`` sees ``(*kbatch, N, d_in)``
(``kbatch`` are kernel-batch axes: experts, heads). A padding mask over the model input,
e.g. an attention mask ``(B, T)``, is matched to the leading free axes of each layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, PyTree

from lora_jax.adapter import Adapter, Target
from lora_jax.layer_kinds import describe
from lora_jax.paths import dotted, replace_module
from lora_jax.progress import Progress
from lora_jax.views import spec_of

__all__ = ["collect_statistics", "moments_init", "moments_update"]


class _Statistic(nnx.Variable):
    """A recorder's running statistic (any pytree of arrays)."""


class _Mask(nnx.Variable):
    """The current batch's row mask, one Variable shared by every recorder."""


def _rows_mask(mask: Array, free_shape: tuple[int, ...], path: str, equation: str) -> Float[Array, " N"]:
    """Broadcast a mask over the leading free axes of a layer's input to one value per row."""
    n_rows = math.prod(free_shape)
    if mask.ndim == 0:
        return jnp.broadcast_to(mask, (n_rows,))
    if tuple(mask.shape) != free_shape[: mask.ndim]:
        raise ValueError(
            f"collect_statistics: the mask has shape {tuple(mask.shape)} but layer {path!r} (einsum "
            f"{equation!r}) sees rows over free axes {free_shape}; the mask must match their leading "
            "axes (e.g. (batch, seq) for a token mask). Pass mask=None for this model or layer set."
        )
    full = mask.reshape(*mask.shape, *(1,) * (len(free_shape) - mask.ndim))
    return jnp.broadcast_to(full, free_shape).reshape(n_rows)


class _Recorder(nnx.Module):
    """Runs ``inner`` unchanged and folds its input rows into ``stat``."""

    def __init__(self, target: Target, inner: nnx.Module, stat: PyTree, mask: _Mask, update: Callable):
        self.inner = inner
        self.path = target.path
        self.spec = target.spec
        self.input_arg = target.info.input_arg
        self.stat = _Statistic(stat)
        self.mask = mask
        self.update = update

    def __call__(self, *args: Any, **kwargs: Any) -> Array:
        x = args[self.input_arg]
        matrix = self.spec.in_to_matrix(x).astype(jnp.float32)
        n_batch = len(self.spec.batch_shape)
        free_shape = tuple(matrix.shape[n_batch:-1])
        rows = matrix.reshape(*matrix.shape[:n_batch], math.prod(free_shape), self.spec.d_in)
        mask = _rows_mask(self.mask.get_value(), free_shape, self.path, self.spec.equation)
        self.stat.set_value(self.update(self.stat.get_value(), rows, mask.astype(jnp.float32)))
        return self.inner(*args, **kwargs)


class _Session(nnx.Module):
    def __init__(self, model: nnx.Module, mask: _Mask):
        self.model = model
        self.mask = mask


def _target_at(path: str, module: nnx.Module) -> Target:
    if isinstance(module, Adapter):  # record what the adapter sees; it runs as it is
        target = Target(path, module.base, module.info, module.spec)
    else:
        info = describe(module)
        if info is None:
            raise ValueError(
                f"collect_statistics: {path!r} is a {type(module).__name__}, not an adaptable layer; pass "
                "paths as find_targets or iter_adapters report them"
            )
        target = Target(path, module, info, spec_of(module, info))
    if target.info.kind != "einsum":  # a conv's rows are patches, an embedding's one-hot ids
        raise ValueError(
            f"collect_statistics: {path!r} is a layer of kind {target.info.kind!r}; input statistics are "
            "collected for einsum layers (Linear, LinearGeneral, Einsum) only"
        )
    return target


@nnx.jit(static_argnums=3)
def _step(session: _Session, batch: Any, batch_mask: Array, forward: Callable[[nnx.Module, Any], Any]) -> None:
    """One batch through the recorders. Module level, so a second calibration of a model
    with the same structure and the same ``forward`` reuses the compiled step."""
    session.mask.set_value(batch_mask)
    forward(session.model, batch)  # the output is dropped: only the statistics are kept
    session.mask.set_value(jnp.ones((), jnp.float32))  # same state shapes every call: one compile


def collect_statistics(
    model: nnx.Module,
    batches: Iterable[Any],
    *,
    paths: Sequence[str],
    init: Callable[[Target], PyTree],
    update: Callable[[PyTree, Array, Array], PyTree],
    forward: Callable[[nnx.Module, Any], Any] = lambda m, b: m(b),
    mask: Callable[[Any], Array] | None = None,
    desc: str = "calibrating",
    until: Callable[[dict[str, PyTree]], bool] | None = None,
    revise: Callable[[dict[str, PyTree]], dict[str, PyTree]] | None = None,
    check_finite: bool = True,
) -> dict[str, PyTree]:
    """Run ``forward(model, batch)`` over ``batches`` and return ``{path: statistic}``.

    ``init(target)`` gives a layer's initial statistic; ``update(stat, rows, mask)`` folds
    in one batch, with ``rows (*kbatch, N, d_in)`` in float32 and ``mask (N,)`` (1 = use
    the row, 0 = padding); it runs traced, so it must be pure jax. ``mask(batch)`` gives
    a mask over the leading free axes of every layer's input (``None``: all rows count).
    ``revise(stats)``, if given, runs after each batch and returns the statistics to go on
    with (same shapes and dtypes, so nothing recompiles): host-side decisions, such as a
    flag that switches a layer's ``update`` off, go back in this way. ``until(stats)``, if
    given, is checked after that; True stops early.
    Long calibrations write a progress line (``desc``) at most every 10 s to stderr
    (``lora_jax.progress``).
    The model runs in eval mode (no dropout) on a clone; ``model`` is left unchanged.
    With ``check_finite`` (the default) a statistic holding NaN or inf at the end raises
    a ValueError naming its layers: the calibration data drove the model to non-finite
    activations there (padding rows masked out do not count). Pass ``check_finite=False``
    for a statistic that is meant to hold inf (e.g. a running max started at -inf).
    """
    paths = list(paths)
    if not paths:
        raise ValueError("collect_statistics: paths is empty; pass the dotted paths of the layers to calibrate")
    copy = nnx.clone(model)
    copy.eval()
    modules = {dotted(parts): (parts, module) for parts, module in nnx.iter_modules(copy)}
    missing = [p for p in paths if p not in modules]
    if missing:
        raise ValueError(f"collect_statistics: no module at path(s) {missing}; paths look like 'layers.0.attn.q'")
    shared_mask = _Mask(jnp.ones((), jnp.float32))
    recorders = {}
    for path in paths:
        parts, module = modules[path]
        target = _target_at(path, module)
        recorders[path] = _Recorder(target, module, init(target), shared_mask, update)
        replace_module(copy, parts, recorders[path])
    session = _Session(copy, shared_mask)
    n_batches = 0
    total = len(batches) if hasattr(batches, "__len__") else None
    with Progress(desc, total, unit="batches") as bar:
        for batch in batches:
            batch_mask = jnp.ones((), jnp.float32) if mask is None else jnp.asarray(mask(batch), jnp.float32)
            _step(session, batch, batch_mask, forward)
            n_batches += 1
            if revise is not None:
                revised = revise({p: r.stat.get_value() for p, r in recorders.items()})
                for p, r in recorders.items():
                    r.stat.set_value(revised[p])
            if bar.due():  # count batches computed, not merely dispatched
                jax.block_until_ready([r.stat.get_value() for r in recorders.values()])
            bar.update()
            if until is not None and until({p: r.stat.get_value() for p, r in recorders.items()}):
                bar.close(note="converged")
                break
    if n_batches == 0:
        raise ValueError("collect_statistics: no calibration data (batches was empty); pass at least one batch")
    stats = {p: jax.tree.map(jnp.asarray, r.stat.get_value()) for p, r in recorders.items()}
    if check_finite:
        _check_finite(stats, desc)
    return stats


def _check_finite(stats: dict[str, PyTree], desc: str) -> None:
    def finite(leaf: Array) -> bool:
        return not jnp.issubdtype(leaf.dtype, jnp.inexact) or bool(jnp.isfinite(leaf).all())

    bad = [p for p, stat in stats.items() if not all(finite(leaf) for leaf in jax.tree.leaves(stat))]
    if bad:
        raise ValueError(
            f"{desc}: the calibration data produced non-finite activations (NaN or inf) at the input of "
            f"layer(s) {bad}, so their statistics are NaN / inf. Check the "
            "data (NaN in the inputs?) and the model (overflow, e.g. in float16); mask padding rows with mask="
        )


def moments_init(target: Target) -> dict[str, Array]:
    """Zero row count, mean ``(*kbatch, d_in)`` and centered scatter ``(*kbatch, d_in, d_in)``."""
    spec = target.spec
    d, kb = spec.d_in, spec.batch_shape
    return {"count": jnp.zeros(()), "mean": jnp.zeros((*kb, d)), "scatter": jnp.zeros((*kb, d, d))}


def moments_update(stat: dict[str, Array], rows: Array, mask: Array) -> dict[str, Array]:
    """Fold one batch into the running mean and centered scatter ``sum (x - mean)(x - mean)^T``.

    Batches are merged with Chan et al.'s pairwise formula instead of accumulating
    ``sum x x^T`` and subtracting ``n mean mean^T`` at the end: in float32 that
    subtraction cancels catastrophically when the mean is large against the spread, as
    it is for some channels of LLM residual streams. ``mask`` entries are 0 or 1.
    """
    n_a, n_b = stat["count"], mask.sum()
    keep = (mask > 0).reshape((1,) * (rows.ndim - 2) + (-1, 1))  # explicit rank over kernel-batch axes
    mean_b = jnp.where(keep, rows, 0.0).sum(-2) / jnp.maximum(n_b, 1.0)  # padding may hold NaN
    centered = jnp.where(keep, rows - mean_b[..., None, :], 0.0)
    n = n_a + n_b
    delta = mean_b - stat["mean"]
    weight = n_a * n_b / jnp.maximum(n, 1.0)
    return {
        "count": n,
        "mean": stat["mean"] + delta * (n_b / jnp.maximum(n, 1.0)),
        "scatter": stat["scatter"]
        + jnp.einsum("...nd,...ne->...de", centered, centered)
        + weight * delta[..., :, None] * delta[..., None, :],
    }
