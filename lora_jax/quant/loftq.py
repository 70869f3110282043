"""LoftQ: quantize the base and initialise LoRA so that base + adapter is close to the FLOAT
kernel. Li et al. 2023, https://arxiv.org/abs/2310.08659 (PEFT's ``init_lora_weights="loftq"``)

    res = W;  repeat T times:  Q = quant(res),  L R = top-r SVD of (W - deq(Q)),  res = W - L R
    base kernel: Q;   LoRA: s A B = L R   (A = L / sqrt(s), B = R / sqrt(s))

Plain QLoRA starts from ``deq(quant(W))`` with ``B = 0``, an error of ``||W - deq(quant(W))||``
on every layer; LoftQ spends the adapter's rank on that error at init, so training starts
from ``deq(Q) + s A B``, closer to ``W``. :class:`LoftQReport` gives both errors per layer.

Identity at t=0: NOT the quantized base (that is the point): at init the layer is
``deq(Q) + s A B``; alpha=0 is the LoftQ-quantized base ``deq(Q)`` bit for bit.
Only plain LoRA (``LoRAConfig``) rules are accepted: the init defines A and B of a LoRA.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TypeVar

import jax.numpy as jnp
from flax import nnx

from lora_jax.config import AdapterConfig
from lora_jax.linalg import top_r_svd
from lora_jax.quant.formats import QuantFormat
from lora_jax.quant.layer import QuantizedLayer, quantize
from lora_jax.surgery import apply_adapters, find_targets, iter_adapters
from lora_jax.variants.lora import LoRAConfig

__all__ = ["LoftQReport", "loftq"]

M = TypeVar("M", bound=nnx.Module)


@dataclasses.dataclass(frozen=True)
class LoftQReport:
    """Per layer, relative to ``||W||_F`` of the float kernel: ``quant_error`` of plain
    quantization, ``loftq_error`` of ``deq(Q) + s A B`` after ``iters`` alternations."""

    path: str
    quant_error: float
    loftq_error: float


def _alternate(fmt: QuantFormat, w, r: int, iters: int):
    """LoftQ's alternation on one matrix view ``(*batch, d_in, d_out)``, float32."""
    res = w
    for _ in range(iters):
        q = fmt.quantize(res)
        u, s, vh = top_r_svd(w - fmt.dequantize(q, jnp.float32), r)
        root = jnp.sqrt(s)
        left, right = u * root[..., None, :], root[..., :, None] * vh
        res = w - left @ right
    return q, left, right


def loftq(
    model: M,
    cfg: AdapterConfig,
    fmt: QuantFormat,
    *,
    iters: int = 5,
    pattern: str = ".",
    exclude: tuple[str, ...] = (),
) -> tuple[M, list[LoftQReport]]:
    """A copy of the FLOAT ``model`` quantized like ``quantize(model, fmt, pattern=,
    exclude=)`` and adapted with ``cfg``, where every adapted layer's codes and LoRA
    factors come from LoftQ's alternation (``iters`` >= 1 rounds; 1 is QLoRA's
    quantization plus an SVD init of its error). Every rule of ``cfg`` must be
    ``LoRAConfig`` and every layer it selects must be one that gets quantized."""
    if not isinstance(iters, int) or iters < 1:
        raise ValueError(f"loftq: iters={iters!r} must be an integer >= 1")
    bad = [type(rule.variant).__name__ for rule in cfg.rules if type(rule.variant) is not LoRAConfig]
    if bad:
        raise ValueError(f"loftq initialises plain LoRA only; the config has rules of {bad}: use LoRAConfig")
    floats = {t.path: t.kernel_matrix("loftq", jnp.float32) for t, _ in find_targets(model, cfg)}
    qmodel = quantize(model, fmt, pattern=pattern, exclude=exclude)
    adapted = apply_adapters(qmodel, cfg)
    adapters = dict(iter_adapters(adapted))
    outside = sorted(p for p, a in adapters.items() if not isinstance(a.base, QuantizedLayer))
    if outside:
        raise ValueError(f"loftq: {outside} are adapted but not quantized (pattern={pattern!r}, exclude={exclude!r})")
    reports = []
    for path, w in floats.items():
        adapter = adapters[path]
        norm = float(jnp.linalg.norm(w))
        plain = float(jnp.linalg.norm(w - fmt.dequantize(fmt.quantize(w), jnp.float32))) / norm
        q, left, right = _alternate(fmt, w, adapter.config.r, iters)
        root = math.sqrt(adapter.config.scale)
        adapter.base.set_codes(q)
        adapter.lora_a.value = (left / root).astype(adapter.dtype)
        adapter.lora_b.value = (right / root).astype(adapter.dtype)
        approx = fmt.dequantize(q, jnp.float32) + left @ right
        reports.append(LoftQReport(path, plain, float(jnp.linalg.norm(w - approx)) / norm))
    return adapted, reports
