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
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from lora_jax.adapter import Adapter, AdapterParam, Target, VariantConfig
from lora_jax.peft_codec import PeftCodec, host_array
from lora_jax.rotations import gate_power


def gate_codec(config_cls: Callable[[], VariantConfig], side: str) -> PeftCodec:
    """PEFT's IA3 tensor ``ia3_l``: an output gate (``side="o"``) is stored ``(d_out, 1)``,
    a feed-forward input gate (``side="i"``) ``(1, d_in)``, its layers listed in
    ``feedforward_modules``."""

    def to_peft(adapter: Adapter) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        gate = host_array(adapter.ia3_l[...])
        shape = (gate.shape[-1], 1) if side == "o" else (1, gate.shape[-1])
        return {}, {"ia3_l": gate.reshape(shape)}

    def from_peft(cfg: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> tuple[VariantConfig, dict]:
        return config_cls(), {"ia3_l": tensors["ia3_l"].reshape(-1)}

    member_of = None if side == "o" else "feedforward_modules"
    return PeftCodec("IA3", {}, {}, ("ia3_l",), to_peft, from_peft, member_of=member_of)


@dataclasses.dataclass(frozen=True, kw_only=True)
class IA3Config(VariantConfig):
    """No hyperparameters: one gate per output feature, initialised to 1."""

    name = "ia3"

    def build(self, target: Target, *, seed: int) -> IA3:
        return IA3(target, self)


IA3Config.peft_codec = gate_codec(IA3Config, "o")


class IA3(Adapter):
    """One gate ``ia3_l`` per feature of ``side``: ``"o"`` output (here), ``"i"`` input (IA3-FF)."""

    side: ClassVar[str] = "o"

    def __init__(self, target: Target, config: IA3Config):
        super().__init__(target, config)
        spec = target.spec
        size = spec.d_out if self.side == "o" else spec.d_in
        self.ia3_l = self.variable(AdapterParam, jnp.ones((*spec.batch_shape, size), self.dtype), self.side)

    def forward(self, x: Array, call_base: Callable[[Array], Array]) -> Array:
        y = call_base(x)
        gate = gate_power(self.spec.out_broadcast(self.ia3_l[...], x.ndim, like=y), self.alpha_for("out", x.ndim))
        return (y.astype(self.dtype) * gate).astype(y.dtype)

    def merged(self, kernel, bias):
        gate = gate_power(self.ia3_l[...], self.scalar_alpha())
        return kernel * gate[..., None, :], None if bias is None else bias * gate
