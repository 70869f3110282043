"""LoRA: low-rank adaptation. Hu et al. 2021, https://arxiv.org/abs/2106.09685

    y = base(x) + alpha * s * dropout(x) A B,     s = lora_alpha / r   (rsLoRA: / sqrt(r))

Flax layout: ``A (d_in, r)``, ``B (r, d_out)`` (PEFT's ``lora_A.weight.T`` and
``lora_B.weight.T``), one pair per kernel-batch index.

Identity at t=0: B = 0, so the delta is exactly zero; and alpha = 0 adds an exact zero.

Init as PEFT: A ~ kaiming-uniform(a=sqrt(5)) = U(+-1/sqrt(d_in)), B = 0. The runtime
``alpha`` (steering) multiplies the whole delta, so alpha = -1 is the negated delta.
Checked against ``peft.tuners.lora.layer.Linear`` (tests/test_parity_peft.py).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array

from lora_jax.adapter import Adapter, AdapterParam, Target, VariantConfig
from lora_jax.variants._checks import check_rank


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoRAConfig(VariantConfig):
    """``r`` rank, ``lora_alpha`` scale numerator (PEFT's ``lora_alpha``), ``rslora``
    for ``lora_alpha / sqrt(r)``, ``dropout`` on the adapter's input (train mode only)."""

    name = "lora"
    r: int = 8
    lora_alpha: float = 8.0
    rslora: bool = False
    dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora: dropout={self.dropout} must be in [0, 1)")

    @property
    def scale(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.rslora else self.r)

    def build(self, target: Target, *, seed: int) -> LoRA:
        check_rank(self.name, self.r, target)
        return LoRA(target, self, seed=seed)


class LoRA(Adapter):
    def __init__(self, target: Target, config: LoRAConfig, *, seed: int):
        super().__init__(target, config)
        spec, r = target.spec, config.r
        bound = 1.0 / math.sqrt(spec.d_in)
        a_shape = (*spec.batch_shape, spec.d_in, r)
        key_a, key_dropout = jax.random.split(target.key(seed))
        self.lora_a = self.variable(AdapterParam, jax.random.uniform(key_a, a_shape, self.dtype, -bound, bound), "i-")
        self.lora_b = self.variable(AdapterParam, jnp.zeros((*spec.batch_shape, r, spec.d_out), self.dtype), "-o")
        self.dropout = nnx.Dropout(config.dropout, rngs=nnx.Rngs(dropout=key_dropout)) if config.dropout else None

    def forward(self, x: Array, call_base: Callable[[Array], Array]) -> Array:
        y = call_base(x)
        h = x.astype(self.dtype)
        if self.dropout is not None:
            h = self.dropout(h)
        # Scaling in rank space touches r numbers per row instead of d_out.
        h = self.spec.project_in(h, self.lora_a[...]) * (self.alpha_for("hidden", x.ndim) * self.config.scale)
        delta = self.spec.project_out(h, self.lora_b[...], x.ndim)
        return y + delta.astype(y.dtype)

    def merged(self, kernel, bias):
        delta = self.lora_a[...] @ self.lora_b[...]
        return kernel + (self.scalar_alpha() * self.config.scale) * delta, bias
