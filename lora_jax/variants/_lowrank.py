"""Pieces the LoRA-shaped variants share, with PEFT's conventions and defaults."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from lora_jax.adapter import Adapter, AdapterParam, VariantConfig
from lora_jax.variants._checks import check_dropout


@dataclasses.dataclass(frozen=True, kw_only=True)
class LowRankConfig(VariantConfig):
    """``r`` rank, ``lora_alpha`` scale numerator (PEFT's ``lora_alpha``), ``rslora``
    for ``lora_alpha / sqrt(r)``, ``dropout`` on the adapter's input (train mode only)."""

    r: int = 8
    lora_alpha: float = 8.0
    rslora: bool = False
    dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_dropout(self.name, self.dropout)

    @property
    def scale(self) -> float:
        """PEFT's ``scaling``."""
        return self.lora_alpha / (math.sqrt(self.r) if self.rslora else self.r)


def lora_pair(adapter: Adapter, key: jax.Array, r: int) -> tuple[AdapterParam, AdapterParam]:
    """PEFT's LoRA init as the adapter's Variables: ``A (*batch, d_in, r)`` kaiming-uniform
    (a=sqrt(5)), i.e. U(+-1/sqrt(d_in)), and ``B (*batch, r, d_out)`` zero."""
    spec, dtype = adapter.spec, adapter.dtype
    bound = 1.0 / math.sqrt(spec.d_in)
    a = jax.random.uniform(key, (*spec.batch_shape, spec.d_in, r), dtype, -bound, bound)
    b = jnp.zeros((*spec.batch_shape, r, spec.d_out), dtype)
    return adapter.variable(AdapterParam, a, "i-"), adapter.variable(AdapterParam, b, "-o")
