"""Pictures of a sweep's metrics. matplotlib is an optional extra: ``pip install lora_jax[plot]``.

matplotlib is imported when a figure is drawn, not when :mod:`lora_jax.steering` is, so
sweeps and metrics work without it.
"""

from __future__ import annotations

from typing import Any

from lora_jax.steering.metrics import SweepMetrics

__all__ = ["plot_sweep", "sweep_figure"]


def _agg_figure_classes() -> tuple[type, type]:
    """matplotlib's ``Figure`` and the Agg canvas, or an ImportError that says how to get them."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(
            "lora_jax.steering's plots need matplotlib, which is an optional extra: "
            "pip install lora_jax[plot] (or pip install matplotlib)"
        ) from err
    return Figure, FigureCanvasAgg


def sweep_figure(m: SweepMetrics, *, title: str = "steering sweep") -> Any:
    """A matplotlib ``Figure``: the effect and its linear fit against alpha (top); the cost
    (bottom): KL(base‖α) in nats with the KL budget on the left axis, TV distance (0 to 1,
    no unit) on a right axis of its own. Every line is in a legend."""
    # A bare Figure on the Agg canvas: no pyplot, so the caller's backend is left alone.
    Figure, FigureCanvasAgg = _agg_figure_classes()
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
