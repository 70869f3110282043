"""OLoRA: orthonormal low-rank adaptation. Büyükakyüz 2024, https://arxiv.org/abs/2406.01775

    W = Q R  (PyTorch layout),  B0 = Q[:, :r],  A0 = R[:r]   (Flax: A0 = L[:, :r], B0 = Q[:r] of W^T = L Q)
    y = base(x) + alpha * s * x (A B - A0 B0),   A = A0, B = B0 at init,   s = lora_alpha / r

PEFT subtracts ``s B0 A0`` from the base weight and trains LoRA on that residual; here,
as for PiSSA (whose adapter module this reuses), the same map is a delta on the untouched
base, computed as the rank-2r LoRA ``x [A - A0, A0] [B; B - B0]``. Note PEFT's residual
removes ``s`` times the first r QR terms, not the terms themselves, so ``lora_alpha``
changes the init here as there.

Identity at t=0: bit-exact (``A - A0`` and ``B - B0`` are exact zeros).

Runtime alpha scales the delta: 0 is the base (bit-exact), 1 the trained adapter, -1 the
negated delta. Checked against ``peft.tuners.lora.layer.Linear`` with
``init_lora_weights="olora"``; :func:`lora_jax.variants.pissa.to_lora` converts it to LoRA.
"""

from __future__ import annotations

import dataclasses

from lora_jax.adapter import Target
from lora_jax.linalg import lq
from lora_jax.variants._checks import check_rank
from lora_jax.variants._lowrank import LowRankConfig
from lora_jax.variants.pissa import RESIDUAL_PEFT_CODEC, PiSSA


@dataclasses.dataclass(frozen=True, kw_only=True)
class OLoRAConfig(LowRankConfig):
    """``r``, ``lora_alpha``, ``rslora``, ``dropout`` as in LoRA."""

    name = "olora"
    peft_codec = RESIDUAL_PEFT_CODEC

    def build(self, target: Target, *, seed: int) -> OLoRA:
        check_rank(self.name, self.r, target)
        low, q = lq(target.kernel_matrix(self.name, self.dtype))
        return OLoRA(target, self, low[..., : self.r], q[..., : self.r, :], seed=seed)


class OLoRA(PiSSA):
    """PiSSA's residual-LoRA module with OLoRA's QR init."""
