"""What a steering sweep reports: per-alpha effect and cost, and the shape of the response.

Plain numpy on the sweep's outputs, after the compiled part is done.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import ArrayLike

__all__ = ["SweepMetrics", "format_table", "sweep_metrics"]


@dataclasses.dataclass(frozen=True)
class SweepMetrics:
    """Per alpha (sorted ascending): ``effect``, ``kl`` = KL(base || steered) and ``tv``
    (total variation), each averaged over positions. Over the sweep: least-squares
    ``slope``/``intercept``/``r2`` of effect on alpha; ``spearman`` rank correlation of
    effect with alpha; ``monotone_frac``, the fraction of consecutive steps whose effect
    moves in the direction of the slope; ``symmetry`` in [0, 1] (1: the effect at -a is the
    mirror of +a around alpha=0); ``max_alpha_in_budget``, the largest |alpha| such that
    every swept alpha at most that far from 0 has KL <= ``kl_budget``."""

    alphas: np.ndarray
    effect: np.ndarray
    kl: np.ndarray
    tv: np.ndarray
    slope: float
    intercept: float
    r2: float
    spearman: float
    monotone_frac: float
    symmetry: float
    kl_budget: float
    max_alpha_in_budget: float


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x), dtype=float)
    for v in np.unique(x):  # ties share their mean rank
        ranks[x == v] = ranks[x == v].mean()
    return ranks


def _corr(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x - x.mean(), y - y.mean()
    denom = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / denom) if denom > 0 else float("nan")


def _symmetry(alphas: np.ndarray, effect: np.ndarray, e0: float) -> float:
    up, down = [], []
    for a, e in zip(alphas, effect, strict=True):
        mirror = np.flatnonzero(alphas == -a)
        if a > 0 and mirror.size:
            up.append(e - e0)
            down.append(e0 - effect[mirror[0]])
    up, down = np.array(up), np.array(down)
    total = np.abs(up).sum() + np.abs(down).sum()
    return float(1.0 - np.abs(up - down).sum() / total) if total > 0 else float("nan")


def sweep_metrics(
    alphas: ArrayLike,
    effects: ArrayLike,
    logits: ArrayLike,
    *,
    mask: ArrayLike | None = None,
    kl_budget: float = 0.1,
) -> SweepMetrics:
    """Metrics of a sweep. ``effects`` is ``(n,)`` or ``(n, ...)`` (averaged to one number
    per alpha); ``logits`` is ``(n, ..., vocab)``, logits or log-probabilities (both are
    normalized with log-softmax). ``mask`` (shape ``logits.shape[1:-1]``, true at real
    tokens) leaves padding out of KL and TV. The sweep must include alpha = 0: it is the
    base model every cost is measured from."""
    a = np.asarray(alphas, np.float64)
    e = np.asarray(effects, np.float64)
    logp = np.asarray(jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1), np.float64)
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"alphas must be a non-empty 1-D vector, got shape {a.shape}")
    if e.shape[:1] != a.shape or logp.shape[:1] != a.shape:
        raise ValueError(f"effects {e.shape} and logits {logp.shape} need one leading row per alpha ({a.size})")
    if not np.any(a == 0):
        raise ValueError("include alpha=0 in the sweep: KL, TV and symmetry are measured from the base (alpha=0)")
    e = e.reshape(a.size, -1).mean(axis=1)
    order = np.argsort(a, kind="stable")
    a, e, logp = a[order], e[order], logp[order]
    zero = int(np.flatnonzero(a == 0)[0])
    p0, p = np.exp(logp[zero]), np.exp(logp)
    positions = logp.shape[1:-1]
    w = np.ones(positions) if mask is None else np.asarray(mask, np.float64)
    if w.shape != positions or w.sum() == 0:
        raise ValueError(f"mask must have shape logits.shape[1:-1] = {positions} and mark some tokens, got {w.shape}")
    with np.errstate(invalid="ignore", divide="ignore"):
        kl_tok = np.where(p0 > 0, p0 * (logp[zero] - logp), 0.0).sum(-1)
    kl = (kl_tok * w).reshape(a.size, -1).sum(1) / w.sum()
    tv = (0.5 * np.abs(p - p0).sum(-1) * w).reshape(a.size, -1).sum(1) / w.sum()
    if a.size > 1 and np.ptp(a) > 0:
        slope, intercept = np.polyfit(a, e, 1)
        ss_tot = ((e - e.mean()) ** 2).sum()
        r2 = 1.0 - ((e - (slope * a + intercept)) ** 2).sum() / ss_tot if ss_tot > 0 else float("nan")
    else:
        slope, intercept, r2 = float("nan"), float(e[0]), float("nan")
    steps = np.diff(e)
    monotone = float((np.sign(steps) == np.sign(slope)).mean()) if steps.size and slope != 0 else float("nan")
    inside = [abs(x) for x in a if np.all(kl[np.abs(a) <= abs(x)] <= kl_budget)]
    return SweepMetrics(
        alphas=a,
        effect=e,
        kl=kl,
        tv=tv,
        slope=float(slope),
        intercept=float(intercept),
        r2=float(r2),
        spearman=_corr(_ranks(a), _ranks(e)),
        monotone_frac=monotone,
        symmetry=_symmetry(a, e, float(e[zero])),
        kl_budget=float(kl_budget),
        max_alpha_in_budget=float(max(inside, default=0.0)),
    )


def format_table(m: SweepMetrics) -> str:
    """A markdown table (one row per alpha) followed by the sweep summary."""
    lines = ["| alpha | effect | KL(base‖α) | TV |", "|---:|---:|---:|---:|"]
    rows = zip(m.alphas, m.effect, m.kl, m.tv, strict=True)
    lines += [f"| {a:+.3g} | {e:+.4f} | {k:.4g} | {t:.4f} |" for a, e, k, t in rows]
    lines += [
        "",
        f"slope {m.slope:+.4g}, R² {m.r2:.3f}, Spearman {m.spearman:+.3f}, "
        f"monotone steps {m.monotone_frac:.0%}, symmetry {m.symmetry:.3f}, "
        f"largest |alpha| with KL <= {m.kl_budget:g}: {m.max_alpha_in_budget:g}",
    ]
    return "\n".join(lines)
