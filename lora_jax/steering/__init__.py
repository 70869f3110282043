"""Steering sweeps: evaluate a model over many alphas with one compilation, and report.

    out = sweep(model, lambda m, x: m(x), jnp.linspace(-2, 2, 9), inputs=x)   # (9, *m(x).shape)
    metrics = sweep_metrics(alphas, effect, logits, kl_budget=0.1)
    print(format_table(metrics)); plot_sweep(metrics, "sweep.png")

:mod:`~lora_jax.steering.sweeps` runs the compiled sweep, :mod:`~lora_jax.steering.metrics`
measures it (numpy), :mod:`~lora_jax.steering.plot` draws it (matplotlib, the optional
``plot`` extra, imported only when a figure is drawn).
"""

from lora_jax.steering.metrics import SweepMetrics, format_table, sweep_metrics
from lora_jax.steering.plot import plot_sweep, sweep_figure
from lora_jax.steering.sweeps import sweep

__all__ = ["sweep", "sweep_metrics", "SweepMetrics", "format_table", "plot_sweep", "sweep_figure"]
