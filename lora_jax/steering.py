"""Steering sweeps: evaluate a model over many alphas with one compilation, and report.

    out = sweep(model, lambda m, x: m(x), jnp.linspace(-2, 2, 9), inputs=x)   # (9, *m(x).shape)
    metrics = sweep_metrics(alphas, effect, logits, kl_budget=0.1)
    print(format_table(metrics)); plot_sweep(metrics, "sweep.png")

Alpha is state (an ``Alpha`` Variable), so a sweep sets it from a traced value inside one
jitted function instead of baking a Python float into each trace:

- ``mode="vmap"``: ``jax.vmap`` over a scalar alpha; every alpha sees the same inputs.
  ``batch_size=b`` instead maps over the alphas ``b`` at a time (``jax.lax.map``), with
  memory for ``b`` forwards, not all of them. On a CPU ``batch_size=1`` measured
  0.86-0.89x the time of separate calls and the full vmap 1.02-1.87x over six runs of
  ``benchmarks/bench.py``; on an accelerator the full vmap is what fills the device.
- ``mode="rows"``: the inputs are repeated once per alpha and each row gets its own alpha
  (shape ``(n_alphas * batch,)``), so the whole sweep is one ordinary forward pass. Needs
  layers whose input's first axis is the batch (not e.g. an expert axis).

The compiled function is cached on (model structure, ``fn``, pattern, shapes), so a second
sweep with other alpha values but the same count does not compile again.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, ArrayLike, Float

from lora_jax.adapter import as_alpha
from lora_jax.paths import NoMatchError, iter_adapters, select
from lora_jax.transforms import set_alpha
from lora_jax.validation import is_int

__all__ = ["sweep", "sweep_metrics", "SweepMetrics", "format_table", "plot_sweep", "sweep_figure"]

MODES = ("vmap", "rows")


def _check_alphas(alphas: ArrayLike) -> Float[Array, " n"]:
    a = jnp.asarray(alphas, jnp.float32)
    if a.ndim != 1:
        raise ValueError(f"alphas must be a 1-D vector of steering values, got shape {a.shape}")
    if a.shape[0] == 0:
        raise ValueError("alphas is empty: pass at least one value, e.g. jnp.linspace(-1, 1, 9)")
    return as_alpha(a, what="alphas")  # refuses NaN / inf while the values are concrete


def _call(fn: Callable, model: nnx.Module, inputs: Any, has_inputs: bool) -> Any:
    return fn(model, inputs) if has_inputs else fn(model)


@functools.partial(jax.jit, static_argnames=("graphdef", "fn", "pattern", "has_inputs", "batch_size"))
def _sweep_vmap(graphdef, state, alphas, inputs, *, fn, pattern, has_inputs, batch_size):
    def one(alpha):
        # copy=True: Variables made at this trace level, or an nnx.scan inside fn (stacked
        # layers) refuses the jit-level ones it would otherwise receive.
        model = nnx.merge(graphdef, set_alpha(state, alpha, pattern=pattern), copy=True)
        return _call(fn, model, inputs, has_inputs)

    if batch_size is None:
        return jax.vmap(one)(alphas)
    return jax.lax.map(one, alphas, batch_size=batch_size)


@functools.partial(jax.jit, static_argnames=("graphdef", "fn", "pattern"))
def _sweep_rows(graphdef, state, alphas, inputs, *, fn, pattern):
    n, batch = alphas.shape[0], jax.tree.leaves(inputs)[0].shape[0]
    # alpha-major: row i * batch + b is input row b at alphas[i]
    tiled = jax.tree.map(lambda x: jnp.tile(x, (n,) + (1,) * (x.ndim - 1)), inputs)
    out = fn(nnx.merge(graphdef, set_alpha(state, jnp.repeat(alphas, batch), pattern=pattern), copy=True), tiled)
    bad = [y.shape for y in jax.tree.leaves(out) if y.ndim == 0 or y.shape[0] != n * batch]
    if bad:
        raise ValueError(
            f"sweep(mode='rows'): every output of fn must keep one row per input row "
            f"({n} alphas x {batch} rows = {n * batch}), got shapes {bad}; reduce over rows "
            "after the sweep, or use mode='vmap'"
        )
    return jax.tree.map(lambda y: y.reshape(n, batch, *y.shape[1:]), out)


def sweep(
    model: nnx.Module,
    fn: Callable[..., Any],
    alphas: ArrayLike,
    *,
    inputs: Any = None,
    pattern: str | None = None,
    mode: str = "vmap",
    batch_size: int | None = None,
) -> Any:
    """``fn(model)`` (or ``fn(model, inputs)``) at every alpha, stacked on a new leading axis.

    Alpha is set on every adapter, or on those whose dotted path matches ``pattern``
    (``re.search``); the others keep their value. ``model`` itself is not changed, and
    state that ``fn`` mutates is discarded. One compilation for the whole sweep.

    ``mode="rows"`` needs ``inputs`` (a pytree whose leaves share a leading batch axis)
    and an ``fn`` whose outputs keep that axis; results have shape ``(n_alphas, batch, ...)``,
    the same as ``mode="vmap"`` gives for such an ``fn``. ``batch_size`` (vmap mode) runs
    the alphas that many at a time instead of all at once.
    """
    a = _check_alphas(alphas)
    if mode not in MODES:
        raise ValueError(f"sweep: mode={mode!r} is not one of {MODES}")
    if batch_size is not None:
        if mode != "vmap":
            raise ValueError(f"sweep: batch_size applies to mode='vmap' only, got mode={mode!r}")
        if not is_int(batch_size) or batch_size < 1:
            raise ValueError(f"sweep: batch_size={batch_size!r} must be a positive integer (alphas per step)")
    if pattern is not None:
        select(iter_adapters(model), pattern, caller="sweep")
    if not any(True for _ in iter_adapters(model)):
        raise NoMatchError("sweep: the model has no adapters; apply_adapters(model, cfg) first")
    graphdef, state = nnx.split(model)
    if mode == "vmap":
        return _sweep_vmap(
            graphdef, state, a, inputs, fn=fn, pattern=pattern, has_inputs=inputs is not None, batch_size=batch_size
        )
    leaves = jax.tree.leaves(inputs)
    if not leaves:
        raise ValueError("sweep(mode='rows') needs inputs=... (the batch to repeat once per alpha)")
    sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in leaves}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(f"sweep(mode='rows'): all inputs need the same leading batch axis, got sizes {sizes}")
    return _sweep_rows(graphdef, state, a, inputs, fn=fn, pattern=pattern)


# -- what a sweep reports ------------------------------------------------------------------


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


def sweep_figure(m: SweepMetrics, *, title: str = "steering sweep") -> Any:
    """A matplotlib ``Figure``: the effect and its linear fit against alpha (top); the cost
    (bottom): KL(base‖α) in nats with the KL budget on the left axis, TV distance (0 to 1,
    no unit) on a right axis of its own. Every line is in a legend."""
    # A bare Figure on the Agg canvas: no pyplot, so the caller's backend is left alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 6), dpi=100)
    FigureCanvasAgg(fig)
    top, kl_ax = fig.subplots(2, 1, sharex=True)
    top.plot(m.alphas, m.effect, "o-", color="tab:blue", label="effect")
    top.plot(m.alphas, m.slope * m.alphas + m.intercept, ":", color="tab:blue", label=f"linear fit (R² {m.r2:.2f})")
    top.set_ylabel("effect")
    top.set_title(title)
    top.legend(loc="best", fontsize=8)
    kl_ax.plot(m.alphas, m.kl, "s--", color="tab:red", label="KL(base‖α)")
    kl_ax.axhline(m.kl_budget, color="tab:red", lw=0.8, ls=":", label=f"KL budget ({m.kl_budget:g} nats)")
    kl_ax.set_ylabel("KL(base‖α) [nats]", color="tab:red")
    kl_ax.set_xlabel("alpha")
    tv_ax = kl_ax.twinx()
    tv_ax.plot(m.alphas, m.tv, "^--", color="tab:orange", label="TV distance")
    tv_ax.set_ylabel("TV distance [0-1]", color="tab:orange")
    handles = kl_ax.get_legend_handles_labels()[0] + tv_ax.get_legend_handles_labels()[0]
    kl_ax.legend(handles, [h.get_label() for h in handles], loc="upper center", fontsize=8)
    fig.tight_layout()
    return fig


def plot_sweep(m: SweepMetrics, path: str, *, title: str = "steering sweep") -> str:
    """Write :func:`sweep_figure` as a PNG at ``path``; returns ``path``."""
    sweep_figure(m, title=title).savefig(path)
    return path
