"""Pieces the low-rank variants share with LoRA's conventions (PEFT's defaults)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from lora_jax.adapter import Adapter, AdapterParam


def lora_scale(lora_alpha: float, r: int, rslora: bool) -> float:
    """PEFT's ``scaling``: ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA."""
    return lora_alpha / (math.sqrt(r) if rslora else r)


def lora_pair(adapter: Adapter, key: jax.Array, r: int) -> tuple[AdapterParam, AdapterParam]:
    """PEFT's LoRA init as the adapter's Variables: ``A (*batch, d_in, r)`` kaiming-uniform
    (a=sqrt(5)), i.e. U(+-1/sqrt(d_in)), and ``B (*batch, r, d_out)`` zero."""
    spec, dtype = adapter.spec, adapter.dtype
    bound = 1.0 / math.sqrt(spec.d_in)
    a = jax.random.uniform(key, (*spec.batch_shape, spec.d_in, r), dtype, -bound, bound)
    b = jnp.zeros((*spec.batch_shape, r, spec.d_out), dtype)
    return adapter.variable(AdapterParam, a, "i-"), adapter.variable(AdapterParam, b, "-o")
