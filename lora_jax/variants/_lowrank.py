"""Pieces the low-rank variants share with LoRA's conventions (PEFT's defaults)."""

from __future__ import annotations

import math
from typing import Any

import jax
from jaxtyping import Array, Float

from lora_jax.views import EinsumSpec


def lora_scale(lora_alpha: float, r: int, rslora: bool) -> float:
    """PEFT's ``scaling``: ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA."""
    return lora_alpha / (math.sqrt(r) if rslora else r)


def kaiming_a(key: jax.Array, spec: EinsumSpec, r: int, dtype: Any) -> Float[Array, "*batch d_in r"]:
    """PEFT's down-projection init, kaiming-uniform(a=sqrt(5)) = U(+-1/sqrt(d_in))."""
    bound = 1.0 / math.sqrt(spec.d_in)
    return jax.random.uniform(key, (*spec.batch_shape, spec.d_in, r), dtype, -bound, bound)
