"""Data-driven choice of the singular dims an AntiPaSTO adapter rotates and shifts.

Top-r by singular value ignores the data. With calibration inputs ``x`` (rows each
kernel matrix sees, ``(*batch, N, d_in)``) and the full SVD ``W = U diag(S) Vh``:

- Wanda-style (Sun et al. 2023, https://arxiv.org/abs/2306.11695, per singular dim):
  ``score_i = S_i * mean |x . u_i|``, keep the top r.
- "L1 trip" (AntiPaSTO, https://arxiv.org/abs/2601.07473) for contrastive pairs: r/3
  dims by ``S * mean |x_chosen . u|``, r/3 by ``S * mean |x_rejected . u|``, r/6 by
  ``S * relu(mean diff)``, r/6 by ``S * relu(-mean diff)`` (``diff = x_chosen . u -
  x_rejected . u``); the union, padded with the best remaining Wanda score, in SVD order.
- Polarity interleave: reorder the chosen dims so that consecutive ones alternate
  between ``diff >= 0`` and ``diff < 0``, so every rotation block can steer both ways.

Everything reduces to :class:`ProjectionStats` (sums, so it streams over batches).
:func:`rebase` then points an adapter at the selected dims and records them in its
``indices`` state. The delta form needs no ``W_res`` update: the base kernel is untouched.
:func:`select_dimensions` does it all for a model, collecting the statistics with
``lora_jax.calibrate.collect_statistics`` in one pass over the data.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from lora_jax.calibrate import collect_statistics
from lora_jax.paths import iter_adapters, matches
from lora_jax.variants.antipasto import AntiPaSTO

__all__ = [
    "ProjectionStats",
    "full_svd",
    "l1_trip",
    "polarity_interleave",
    "projection_stats",
    "rebase",
    "select_dimensions",
    "top_indices",
    "wanda_scores",
]

Svd = tuple[Float[Array, "*batch d_in k"], Float[Array, "*batch k"], Float[Array, "*batch k d_out"]]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ProjectionStats:
    """Sums over rows of ``|x . u_i|`` and ``x . u_i`` per singular dim, and the row count."""

    abs_sum: Float[Array, "*batch k"]
    sum: Float[Array, "*batch k"]
    count: Float[Array, ""]

    def __add__(self, other: ProjectionStats) -> ProjectionStats:
        return jax.tree.map(jnp.add, self, other)

    @property
    def mean_abs(self) -> Array:
        return self.abs_sum / jnp.maximum(self.count, 1.0)

    @property
    def mean(self) -> Array:
        return self.sum / jnp.maximum(self.count, 1.0)


def projection_stats(
    rows: Float[Array, "*batch n d_in"], u: Float[Array, "*batch d_in k"], mask: Float[Array, " n"] | None = None
) -> ProjectionStats:
    """Statistics of one batch of rows (``mask``: 1 for real rows, 0 for padding)."""
    weight = jnp.ones(rows.shape[-2], u.dtype) if mask is None else mask.astype(u.dtype)
    w = weight.reshape((1,) * (rows.ndim - 2) + (-1, 1))
    proj = jnp.where(w > 0, rows.astype(u.dtype), 0.0) @ u  # padding rows may hold NaN
    return ProjectionStats((jnp.abs(proj) * w).sum(-2), (proj * w).sum(-2), weight.sum())


def full_svd(adapter: AntiPaSTO) -> Svd:
    """Every singular triplet of the adapter's base kernel, largest first."""
    kernel = adapter.base_kernel("to select dimensions")
    matrix = adapter.spec.kernel_to_matrix(kernel).astype(jnp.promote_types(adapter.dtype, jnp.float32))
    return jnp.linalg.svd(matrix, full_matrices=False)


def wanda_scores(stats: ProjectionStats, s: Float[Array, "*batch k"]) -> Float[Array, "*batch k"]:
    return s * stats.mean_abs


def top_indices(scores: Float[Array, "*batch k"], r: int) -> Int[Array, "*batch r"]:
    """The ``r`` best dims, in SVD order (ascending index)."""
    return jnp.sort(jax.lax.top_k(scores, r)[1], axis=-1).astype(jnp.int32)


def _trip_one(c_abs, r_abs, diff, s, fallback, r) -> np.ndarray:
    picked: list[int] = []
    pos, neg = np.maximum(diff, 0.0), np.maximum(-diff, 0.0)
    for score, n in ((s * c_abs, r // 3), (s * r_abs, r // 3), (s * pos, r // 6), (s * neg, r // 6)):
        order = [i for i in np.argsort(-score, kind="stable") if score[i] > 0 and i not in picked]
        picked += order[:n]
    picked += [i for i in np.argsort(-fallback, kind="stable") if i not in picked][: r - len(picked)]
    return np.sort(np.asarray(picked[:r]))


def l1_trip(
    chosen: ProjectionStats, rejected: ProjectionStats, s: Float[Array, "*batch k"], r: int
) -> Int[Array, "*batch r"]:
    """Contrastive selection (module doc), one index set per kernel-batch matrix."""
    c_abs, r_abs, s_np = (np.asarray(v, np.float64) for v in (chosen.mean_abs, rejected.mean_abs, s))
    diff = np.asarray(chosen.mean - rejected.mean, np.float64)
    fallback = s_np * (c_abs + r_abs)
    out = np.zeros((*s_np.shape[:-1], r), np.int32)
    for i in np.ndindex(s_np.shape[:-1]):
        out[i] = _trip_one(c_abs[i], r_abs[i], diff[i], s_np[i], fallback[i], r)
    return jnp.asarray(out)


def polarity_interleave(indices: Int[Array, "*batch r"], diff: Float[Array, "*batch k"]) -> Int[Array, "*batch r"]:
    """Order ``indices`` so that ``diff[indices]`` alternates sign (>= 0 first) while
    both signs last; the rest follow. Within a sign the given order is kept."""
    idx, d = np.asarray(indices), np.asarray(diff)
    out = np.empty_like(idx)
    for i in np.ndindex(idx.shape[:-1]):
        pos = [j for j in idx[i] if d[i][j] >= 0]
        neg = [j for j in idx[i] if d[i][j] < 0]
        pairs = [j for pair in zip(pos, neg, strict=False) for j in pair]
        n = min(len(pos), len(neg))
        out[i] = pairs + pos[n:] + neg[n:]
    return jnp.asarray(out)


def rebase(adapter: AntiPaSTO, indices: Int[Array, "*batch r"], svd: Svd | None = None) -> None:
    """Point ``adapter`` (in place) at singular dims ``indices`` of its base kernel.

    Trained parameters keep their values: rebase before training.
    """
    if not isinstance(adapter, AntiPaSTO):
        raise TypeError(f"rebase needs an AntiPaSTO adapter, got {type(adapter).__name__}")
    u, s, vh = full_svd(adapter) if svd is None else svd
    indices = jnp.asarray(indices, jnp.int32)
    expected = adapter.indices.shape
    if indices.shape != expected:
        raise ValueError(f"indices have shape {indices.shape}, the adapter needs {expected} (*kernel_batch, r)")
    if int(indices.min()) < 0 or int(indices.max()) >= s.shape[-1]:
        raise ValueError(f"indices must lie in [0, {s.shape[-1]}) (the kernel's singular dims)")
    if any(len(set(row)) != len(row) for row in np.asarray(indices).reshape(-1, indices.shape[-1]).tolist()):
        raise ValueError("indices repeat a singular dim; each of the r dims must be distinct")
    adapter.u.value = jnp.take_along_axis(u, indices[..., None, :], axis=-1).astype(adapter.dtype)
    adapter.s.value = jnp.take_along_axis(s, indices, axis=-1).astype(adapter.dtype)
    adapter.vh.value = jnp.take_along_axis(vh, indices[..., :, None], axis=-2).astype(adapter.dtype)
    adapter.indices.value = indices


METHODS = ("wanda", "l1_trip")


def select_dimensions(
    model: Any,
    batches: Iterable[Any],
    *,
    method: str = "wanda",
    pattern: str | None = None,
    interleave: bool = True,
    forward: Callable[[Any, Any], Any] = lambda m, b: m(b),
    mask: Callable[[Any], Array] | None = None,
    desc: str = "selecting dims",
) -> dict[str, Int[Array, "*batch r"]]:
    """Re-base every AntiPaSTO adapter (path matching ``pattern``) on data-chosen dims,
    in place, before training; returns ``{path: indices}``.

    ``method="wanda"`` scores all rows; ``"l1_trip"`` reads the batch axis as interleaved
    pairs (rows 0, 2, ... chosen; 1, 3, ... rejected) and, with ``interleave``, orders the
    dims by polarity. ``forward(model, batch)`` runs the model; ``mask(batch)`` marks real
    tokens (1) and padding (0) over the leading axes of each layer's input, as in
    ``collect_statistics``.
    """
    if method not in METHODS:
        raise ValueError(f"select_dimensions: unknown method={method!r}; use one of {METHODS}")
    adapters = {
        p: a for p, a in iter_adapters(model) if isinstance(a, AntiPaSTO) and matches(pattern, p)
    }
    if not adapters:
        raise ValueError(f"select_dimensions: no AntiPaSTO adapter matches pattern={pattern!r}; apply_adapters first")
    svds = {p: full_svd(a) for p, a in adapters.items()}
    contrastive = method == "l1_trip"

    def init(target):
        zero = jnp.zeros(svds[target.path][1].shape, jnp.float32)
        stats = ProjectionStats(zero, zero, jnp.zeros((), jnp.float32))
        return {"u": svds[target.path][0].astype(jnp.float32), "chosen": stats, "rejected": stats}

    def update(stat, rows, row_mask):
        # l1_trip: the mask carries the pair side as its sign (+1 chosen, -1 rejected, 0 padding).
        chosen = projection_stats(rows, stat["u"], jnp.maximum(row_mask, 0.0))
        rejected = projection_stats(rows, stat["u"], jnp.maximum(-row_mask, 0.0))
        return {"u": stat["u"], "chosen": stat["chosen"] + chosen, "rejected": stat["rejected"] + rejected}

    def signed_mask(batch):
        m = jnp.ones((), jnp.float32) if mask is None else jnp.asarray(mask(batch), jnp.float32)
        if not contrastive:
            return m
        n = jax.tree.leaves(batch)[0].shape[0]
        if n % 2 or (m.ndim and m.shape[0] != n):
            raise ValueError(
                f"select_dimensions(method='l1_trip'): a batch of {n} rows is not chosen/rejected pairs "
                "interleaved on axis 0 (rows 0, 2, ... chosen; 1, 3, ... rejected); pass an even batch"
            )
        sign = jnp.where(jnp.arange(n) % 2 == 0, 1.0, -1.0)
        return sign.reshape(n, *(1,) * max(m.ndim - 1, 0)) * m

    stats = collect_statistics(
        model, batches, paths=list(adapters), init=init, update=update, forward=forward, mask=signed_mask, desc=desc
    )
    chosen = {}
    for path, adapter in adapters.items():
        c, r, s, size = stats[path]["chosen"], stats[path]["rejected"], svds[path][1], adapter.config.r
        if contrastive:
            indices = l1_trip(c, r, s, size)
            if interleave:
                indices = polarity_interleave(indices, c.mean - r.mean)
        else:
            indices = top_indices(wanda_scores(c, s), size)
        rebase(adapter, indices, svds[path])
        chosen[path] = indices
    return chosen
