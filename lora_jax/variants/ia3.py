"""IA3: learned output gate. Liu et al. 2022 (T-Few), https://arxiv.org/abs/2205.05638

    y = (x W + b) * l,      l (d_out,), one per kernel-batch index

Identity at t=0: l = 1 (PEFT's init), so the gate multiplies by exactly 1.

Runtime alpha: the gate is ``l ** alpha`` (``Re(l ** alpha)`` on the principal branch,
:func:`lora_jax.rotations.gate_power`): alpha = 0 gives a gate of exactly 1 (the base),
alpha = -1 gives ``1 / l`` (the exact inverse). A negative entry of ``l`` passes through 0
at alpha = 1/2; an entry of exactly 0 has no inverse and is floored at 1e-6 for alpha < 0.
A huge alpha overflows: ``l ** alpha`` is inf in float32 once ``|alpha log l|`` passes
about 88 (e.g. alpha = 1e6 for any trained gate); that is the power, kept as it is.
The bias is gated too, as PEFT does (the gate acts on the layer's output). Use
:class:`~lora_jax.variants.ia3_ff.IA3FFConfig` for PEFT's ``feedforward_modules``.
Checked against ``peft.tuners.ia3.layer.Linear`` with ``is_feedforward=False``
(tests/test_ia3.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax.numpy as jnp
from jaxtyping import Array

from lora_jax.adapter import Adapter, AdapterParam, Target, VariantConfig
from lora_jax.rotations import gate_power


@dataclasses.dataclass(frozen=True, kw_only=True)
class IA3Config(VariantConfig):
    """No hyperparameters: one gate per output feature, initialised to 1."""

    name = "ia3"

    def build(self, target: Target, *, seed: int) -> IA3:
        return IA3(target, self)


class IA3(Adapter):
    def __init__(self, target: Target, config: IA3Config):
        super().__init__(target, config)
        self.ia3_l = self.variable(
            AdapterParam, jnp.ones((*target.spec.batch_shape, target.spec.d_out), self.dtype), "o"
        )

    def forward(self, x: Array, call_base: Callable[[Array], Array]) -> Array:
        y = call_base(x)
        gate = gate_power(self.spec.out_broadcast(self.ia3_l[...], x.ndim), self.alpha_for("out", x.ndim))
        return (y.astype(self.dtype) * gate).astype(y.dtype)

    def merged(self, kernel, bias):
        gate = gate_power(self.ia3_l[...], self.scalar_alpha())
        return kernel * gate[..., None, :], None if bias is None else bias * gate
