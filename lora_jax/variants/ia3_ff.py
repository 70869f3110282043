"""IA3-FF: learned input gate ("feedforward" IA3). Liu et al. 2022, https://arxiv.org/abs/2205.05638

    y = (x * l) W + b,      l (d_in,), one per kernel-batch index

PEFT applies this form to the modules listed in ``feedforward_modules`` (the second
matrix of an MLP); put an :class:`IA3FFConfig` rule for those layers next to an
:class:`~lora_jax.variants.ia3.IA3Config` rule for the rest.

Identity at t=0: l = 1, so the input is multiplied by exactly 1.

The gate, its init and its PEFT codec are IA3's (:mod:`lora_jax.variants.ia3`); this file
holds what differs: the gate acts on the input, so forward and merge.

Runtime alpha: the gate is ``Re(l ** alpha)`` as in IA3: alpha = 0 gives exactly the
base, alpha = -1 the inverse gate ``1 / l`` (entries of exactly 0 floored at 1e-6).
The bias is untouched (the gate acts before the layer). Checked against
``peft.tuners.ia3.layer.Linear`` with ``is_feedforward=True`` (tests/test_ia3.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from jaxtyping import Array

from lora_jax.adapter import Target
from lora_jax.rotations import gate_power
from lora_jax.variants.ia3 import IA3, IA3Config, gate_codec


@dataclasses.dataclass(frozen=True, kw_only=True)
class IA3FFConfig(IA3Config):
    """No hyperparameters: one gate per input feature, initialised to 1."""

    name = "ia3_ff"

    def build(self, target: Target, *, seed: int) -> IA3FF:
        return IA3FF(target, self)


IA3FFConfig.peft_codec = gate_codec(IA3FFConfig, "i")


class IA3FF(IA3):
    side = "i"

    def forward(self, x: Array, call_base: Callable[[Array], Array]) -> Array:
        alpha = self.alpha_for("out", x.ndim)  # validates a per-row alpha against this layout
        if alpha.ndim:  # one value per row: rows are the input's first axis
            alpha = alpha.reshape(-1, *(1,) * (x.ndim - 1))
        gate = gate_power(self.spec.in_broadcast(self.ia3_l[...], x.ndim, like=x), alpha)
        return call_base((x.astype(self.dtype) * gate).astype(x.dtype))

    def merged(self, kernel, bias):
        return kernel * gate_power(self.ia3_l[...], self.scalar_alpha())[..., :, None], bias
