"""EVA: explained variance adaptation. Paischer et al. 2024, https://arxiv.org/abs/2410.07170

    y = base(x) + alpha * s * x A B,   A = top-r principal directions of the layer's inputs

EVA is LoRA with a data-driven A: the columns of ``A (d_in, r)`` are the leading
eigenvectors of the (centered) covariance of the rows the layer sees on calibration
data, and B = 0. The total rank budget (sum of r over EVA layers) is redistributed by
explained variance ratio: a layer may end up with 0 (not adapted) to ``round(rho * r)``;
``lora_alpha`` is scaled with the new rank so ``lora_alpha / r`` (the LoRA scale) stays
fixed. ``whiten`` divides each direction by the square root of its singular value.

Identity at t=0: B = 0, so the delta is exactly zero; and alpha = 0 adds an exact zero.

Forward and merge are LoRA's; runtime ``alpha`` multiplies the whole delta (-1 negates it).
``build`` alone gives LoRA's random A: the data-driven A comes from
``lora_jax.eva_init(model, cfg, batches)`` (variants/eva_calibration.py), which also writes the per-layer ranks
into a new config (keep it to rebuild the model for a checkpoint).
Checked against ``peft.tuners.lora.eva.get_eva_state_dict`` (tests/test_eva.py).
"""

from __future__ import annotations

import dataclasses

from lora_jax.adapter import Target
from lora_jax.variants._checks import check_rank
from lora_jax.variants.lora import LoRA, LoRAConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class EVAConfig(LoRAConfig):
    """LoRA's options plus the calibration ones (PEFT's ``EvaConfig`` defaults):
    ``rho`` (>= 1) bounds a layer's rank at ``round(rho * r)``, ``tau`` is the cosine
    similarity between consecutive estimates of a component above which it has
    converged, ``whiten`` scales A's columns by ``1 / sqrt(singular value)``."""

    name = "eva"
    layer_kinds = frozenset({"einsum"})  # calibration reads each layer's input rows
    # PEFT saves EVA as the LoRA it is; such a file imports as LoRA.
    peft_codec = dataclasses.replace(LoRAConfig.peft_codec, from_peft=None, alt_suffixes=())
    rho: float = 2.0
    tau: float = 0.99
    whiten: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.rho >= 1.0:
            raise ValueError(f"eva: rho={self.rho} must be >= 1 (1 keeps every layer at its rank r)")
        if not 0.0 <= self.tau <= 1.0:
            raise ValueError(f"eva: tau={self.tau} must be in [0, 1] (a cosine similarity threshold)")

    def build(self, target: Target, *, seed: int) -> EVA:
        check_rank(self.name, self.r, target)
        return EVA(target, self, seed=seed)


class EVA(LoRA):
    """A LoRA adapter whose A is set from calibration data by ``eva_init``."""
