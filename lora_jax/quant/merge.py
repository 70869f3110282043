"""Fold adapters into a quantized base: dequantize, add, requantize (the error that adds is
reported), or keep the merged layers in float.

``merge_adapters`` alone already requantizes (a :class:`~lora_jax.quant.layer.QuantizedLayer`'s
kernel stores what is assigned to it in its format); :func:`merge_quantized` does the
same and says what it cost. The cost is rounding: a merged kernel ``W' = W_q + delta`` is
rounded back onto the format's grid, an error of up to half a quantization step per
entry, which is of the size of a typical fine-tuned ``delta`` on a 4-bit grid. So
``delta_error`` (the rounding relative to the delta itself) near or above 1 means the
requantized model lost much of what was trained: keep that layer in float
(``keep_float=True``) or keep the adapter unmerged.
"""

from __future__ import annotations

import dataclasses
from typing import TypeVar

import jax.numpy as jnp
from flax import nnx

from lora_jax.paths import dotted
from lora_jax.quant.layer import QuantizedLayer
from lora_jax.stacked import merged_arrays
from lora_jax.surgery import iter_adapters, merge_adapters

__all__ = ["MergeReport", "merge_quantized"]

M = TypeVar("M", bound=nnx.Module)


@dataclasses.dataclass(frozen=True)
class MergeReport:
    """Per merged quantized layer (Frobenius norms over the kernel, float32):

    - ``kernel_error``: ``||stored - W'|| / ||W'||``, the requantization error relative to
      the merged kernel ``W' = W_q + delta`` (0 with ``keep_float``);
    - ``delta_error``: the same error relative to ``||delta||`` (inf for a zero delta);
    - ``delta_norm``: ``||delta|| / ||W_q||``, how large the merged adapter is.
    """

    path: str
    kernel_error: float
    delta_error: float
    delta_norm: float


def _norm(x) -> float:
    return float(jnp.linalg.norm(x.astype(jnp.float32).reshape(-1)))


def merge_quantized(model: M, *, keep_float: bool = False) -> tuple[M, list[MergeReport]]:
    """A copy of ``model`` with every adapter merged, and a report per adapter whose base is
    quantized. ``keep_float=False``: those layers stay quantized (same format), their
    merged kernels requantized. ``keep_float=True``: they become their original float
    layer type holding the exact merged kernel. Other adapters merge as
    :func:`~lora_jax.merge_adapters` does. Alphas must be scalars (as for any merge)."""
    quantized = [(p, a) for p, a in iter_adapters(model) if isinstance(a.base, QuantizedLayer)]
    exact = {}
    for path, adapter in quantized:  # everything computed before anything is built
        kernel, _ = merged_arrays(adapter)
        exact[path] = (adapter.base.dequantized(), kernel, adapter.base.kernel_name)
    source = model
    if keep_float:
        source = nnx.clone(model)
        for _, adapter in iter_adapters(source):
            if isinstance(adapter.base, QuantizedLayer):
                adapter.base = adapter.base.float_layer()
    merged = merge_adapters(source)
    stored = {dotted(parts): m for parts, m in nnx.iter_modules(merged)}
    reports = []
    for path, (w_q, w_merged, kernel_name) in exact.items():
        layer = stored[path]
        now = layer.dequantized() if isinstance(layer, QuantizedLayer) else getattr(layer, kernel_name)[...]
        err, delta = _norm(now - w_merged), _norm(w_merged - w_q)
        reports.append(
            MergeReport(
                path=path,
                kernel_error=err / max(_norm(w_merged), 1e-30),
                delta_error=err / delta if delta > 0 else float("inf") if err > 0 else 0.0,
                delta_norm=delta / max(_norm(w_q), 1e-30),
            )
        )
    return merged, reports
