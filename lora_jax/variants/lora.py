"""LoRA: low-rank adaptation. Hu et al. 2021, https://arxiv.org/abs/2106.09685

    y = base(x) + alpha * s * dropout(x) A B,     s = lora_alpha / r   (rsLoRA: / sqrt(r))

Flax layout: ``A (d_in, r)``, ``B (r, d_out)`` (PEFT's ``lora_A.weight.T`` and
``lora_B.weight.T``), one pair per kernel-batch index.

Identity at t=0: B = 0, so the delta is exactly zero; and alpha = 0 adds an exact zero.

Init as PEFT: A ~ kaiming-uniform(a=sqrt(5)) = U(+-1/sqrt(d_in)), B = 0. The runtime
``alpha`` (steering) multiplies the whole delta, so alpha = -1 is the negated delta.
Checked against ``peft.tuners.lora.layer.Linear`` (tests/test_lora.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
from flax import nnx
from jaxtyping import Array

from lora_jax.adapter import Adapter, Target
from lora_jax.variants._checks import check_rank
from lora_jax.variants._lowrank import LowRankConfig, lora_pair


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoRAConfig(LowRankConfig):
    """``r``, ``lora_alpha``, ``rslora``, ``dropout``: see :class:`LowRankConfig`."""

    name = "lora"
    layer_kinds = frozenset({"einsum", "conv", "embed"})

    def build(self, target: Target, *, seed: int) -> LoRA:
        check_rank(self.name, self.r, target)
        if target.info.kind != "einsum":  # nnx.Conv / nnx.Embed: lora_conv_embed.py
            from lora_jax.variants.lora_conv_embed import build_lora

            return build_lora(target, self, seed=seed)
        return LoRA(target, self, seed=seed)


class LoRA(Adapter):
    def __init__(self, target: Target, config: LoRAConfig, *, seed: int):
        super().__init__(target, config)
        key_a, key_dropout = jax.random.split(target.key(seed))
        self.lora_a, self.lora_b = lora_pair(self, key_a, config.r)
        self.dropout = nnx.Dropout(config.dropout, rngs=nnx.Rngs(dropout=key_dropout)) if config.dropout else None

    def forward(self, x: Array, call_base: Callable[[Array], Array]) -> Array:
        y = call_base(x)
        h = x.astype(self.dtype)
        if self.dropout is not None:
            h = self.dropout(h)
        # Scaling in rank space touches r numbers per row instead of d_out.
        h = self.project_in(h, self.lora_a[...]) * (self.alpha_for("hidden", x.ndim) * self.config.scale)
        delta = self.project_out(h, self.lora_b[...], x.ndim)
        return y + delta.astype(y.dtype)

    def merged(self, kernel, bias):
        delta = self.lora_a[...] @ self.lora_b[...]
        return kernel + (self.scalar_alpha() * self.config.scale) * delta, bias
