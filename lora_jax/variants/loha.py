"""LoHa: low-rank Hadamard product (FedPara). Hyeon-Woo et al. 2022, https://arxiv.org/abs/2108.06098

    y = base(x) + alpha * s * x [(B1 A1) * (B2 A2)],     s = lora_alpha / r,  * elementwise

Flax layout: ``B1, B2 (d_in, r)`` (PEFT's ``hada_w1_b.T``, ``hada_w2_b.T``) and
``A1, A2 (r, d_out)`` (``hada_w1_a.T``, ``hada_w2_a.T``), one set per kernel-batch index.
The Hadamard product of two rank-r matrices is the rank-r^2 product ``P Q`` with
``P[i, (j, k)] = B1[i, j] B2[i, k]`` and ``Q[(j, k), o] = A1[j, o] A2[k, o]``, so the
forward pass costs ``r^2 (d_in + d_out)`` per row (never the dense ``d_in d_out`` delta
PEFT builds on every call) and runs through the same rank-space projections as LoRA.

Identity at t=0: B2 = 0 (PEFT's init zeroes ``hada_w2_b``), so P = 0 and the delta is an
exact zero; alpha = 0 adds an exact zero too.

Init as PEFT (torch kaiming-uniform(a=sqrt 5) on each torch tensor, i.e. U(+-1/sqrt(fan
in))): ``A1, A2 ~ U(+-1/sqrt(r))``, ``B1 ~ U(+-1/sqrt(d_in))``, B2 = 0. Runtime alpha
multiplies the delta: alpha = -1 is the negated delta (the delta is linear in s).
Not implemented: PEFT's ``rank_dropout`` / ``module_dropout`` (training-time only) and the
conv-only ``use_effective_conv2d``. Checked against ``peft.tuners.loha.layer.Linear``
(tests/test_loha.py).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from lora_jax.adapter import Adapter, AdapterParam, Target, VariantConfig
from lora_jax.peft_codec import PeftCodec, PeftFormatError
from lora_jax.variants._checks import check_rank

# -- PEFT's format: peft_type LOHA, each tensor is ours transposed ----------------------
LOHA_TENSORS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


def loha_to_peft(adapter: LoHa) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The delta is linear in alpha, so alpha goes into ``hada_w2_a``."""
    arrays = {name: np.asarray(getattr(adapter, name)[...], np.float32) for name in LOHA_TENSORS}
    arrays["hada_w2_a"] = arrays["hada_w2_a"] * np.float32(adapter.scalar_alpha())
    return {"r": adapter.config.r, "alpha": adapter.config.lora_alpha}, {k: v.T for k, v in arrays.items()}


def loha_from_peft(cfg: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> tuple[LoHaConfig, dict]:
    """``rank_dropout`` / ``module_dropout`` act in training only and are dropped."""
    rank = tensors["hada_w1_a"].shape[1]
    if cfg.get("r", rank) != rank:
        raise PeftFormatError(
            f"adapter_config.json gives r={cfg['r']!r} (after rank_pattern) but hada_w1_a has rank {rank}"
        )
    return LoHaConfig(r=rank, lora_alpha=float(cfg["alpha"])), {k: tensors[k].T for k in LOHA_TENSORS}


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoHaConfig(VariantConfig):
    """``r`` rank of each factor pair; ``lora_alpha`` the scale numerator (PEFT's ``alpha``)."""

    name = "loha"
    peft_codec = PeftCodec(
        "LOHA",
        flags={},
        patterns={"r": "rank_pattern", "alpha": "alpha_pattern"},
        suffixes=LOHA_TENSORS,
        to_peft=loha_to_peft,
        from_peft=loha_from_peft,
        folds_alpha=True,
    )
    r: int = 8
    lora_alpha: float = 8.0

    @property
    def scale(self) -> float:
        """PEFT's ``scaling``: ``alpha / r``."""
        return self.lora_alpha / self.r

    def build(self, target: Target, *, seed: int) -> LoHa:
        check_rank(self.name, self.r, target)
        return LoHa(target, self, seed=seed)


def hadamard_factors(
    b1: Float[Array, "*batch d_in r"], a1: Float[Array, "*batch r d_out"], b2: Array, a2: Array
) -> tuple[Float[Array, "*batch d_in rr"], Float[Array, "*batch rr d_out"]]:
    """``(P, Q)`` with ``P Q = (B1 A1) * (B2 A2)``: the row-wise and column-wise Khatri-Rao products."""
    p = (b1[..., :, None] * b2[..., None, :]).reshape(*b1.shape[:-1], -1)
    q = (a1[..., :, None, :] * a2[..., None, :, :]).reshape(*a1.shape[:-2], -1, a1.shape[-1])
    return p, q


class LoHa(Adapter):
    def __init__(self, target: Target, config: LoHaConfig, *, seed: int):
        super().__init__(target, config)
        spec, dtype, r = target.spec, self.dtype, config.r
        k_a1, k_b1, k_a2 = jax.random.split(target.key(seed), 3)

        def uniform(key: jax.Array, shape: tuple[int, ...], fan_in: int) -> Array:
            bound = 1.0 / math.sqrt(fan_in)
            return jax.random.uniform(key, (*spec.batch_shape, *shape), dtype, -bound, bound)

        self.hada_w1_a = self.variable(AdapterParam, uniform(k_a1, (r, spec.d_out), r), "-o")
        self.hada_w1_b = self.variable(AdapterParam, uniform(k_b1, (spec.d_in, r), spec.d_in), "i-")
        self.hada_w2_a = self.variable(AdapterParam, uniform(k_a2, (r, spec.d_out), r), "-o")
        self.hada_w2_b = self.variable(AdapterParam, jnp.zeros((*spec.batch_shape, spec.d_in, r), dtype), "i-")

    def _factors(self) -> tuple[Array, Array]:
        return hadamard_factors(self.hada_w1_b[...], self.hada_w1_a[...], self.hada_w2_b[...], self.hada_w2_a[...])

    def forward(self, x: Array, call_base: Callable[[Array], Array]) -> Array:
        y = call_base(x)
        p, q = self._factors()
        h = self.project_in(x.astype(self.dtype), p) * (self.alpha_for("hidden", x.ndim) * self.config.scale)
        return y + self.project_out(h, q, x.ndim).astype(y.dtype)

    def merged(self, kernel, bias):
        p, q = self._factors()
        return kernel + (self.scalar_alpha() * self.config.scale) * (p @ q), bias
