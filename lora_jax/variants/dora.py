"""DoRA: weight-decomposed low-rank adaptation. Liu et al. 2024, https://arxiv.org/abs/2402.09353

    W' = (m / n) (W + s A B),   n = stop_gradient(||W + s A B||_col),   s = lora_alpha / r
    y  = base(x) + alpha * [(m/n - 1) x W + (m/n) s x A B]

Flax layout: ``A (d_in, r)``, ``B (r, d_out)``, magnitude ``m (d_out,)``; ``||.||_col`` is
the norm over d_in of each output column (PEFT's ``weight.norm(dim=1)``), detached as in
the paper's section 4.3 and PEFT. ``x W`` is the base output minus its bias, so the bias
passes unscaled (as PEFT). Every kernel-batch index has its own A, B and m.

The norm is computed as ``n = sqrt(n0 + sum_col(s A B * (2 W + s A B)))`` with the frozen
``n0 = ||W||_col^2``, and m starts as ``sqrt(n0 + 0)``: with B = 0 the correction is an
exact zero, so ``m / n == 1`` exactly at init instead of depending on two norm reductions
rounding alike. (A column of W that is zero is floored at the dtype's tiny, not divided by.)

Identity at t=0: bit-exact (B = 0 and m / n = 1 make both terms exact zeros).

Runtime alpha moves linearly between the base (0, bit-exact) and the DoRA layer (1):
-1 is the negated delta ``W - (W' - W)``, not the inverse of the magnitude rescaling.
Checked against ``peft.tuners.lora.layer.Linear`` with ``use_dora=True`` (forward, merge,
gradients).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array

from lora_jax.adapter import Adapter, AdapterParam, AdapterState, Target
from lora_jax.variants._checks import check_rank, dense_kernel
from lora_jax.variants._lowrank import LowRankConfig, lora_pair


class DoRAMagnitude(AdapterParam):
    """DoRA's magnitude vector: its own type so it can get its own learning rate."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class DoRAConfig(LowRankConfig):
    """``r``, ``lora_alpha``, ``rslora`` as in LoRA. ``dropout`` must stay 0: PEFT's DoRA
    dropout runs a second base matmul on the dropped input, not implemented here."""

    name = "dora"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dropout:
            raise ValueError(f"dora: dropout={self.dropout} is not supported; use dropout=0.0 (or lora with dropout)")

    def build(self, target: Target, *, seed: int) -> DoRA:
        check_rank(self.name, self.r, target)
        w = dense_kernel(self.name, target, self.dtype).astype(self.dtype)
        return DoRA(target, self, jnp.sum(jnp.square(w), axis=-2), seed=seed)


class DoRA(Adapter):
    def __init__(self, target: Target, config: DoRAConfig, sq_norm: Array, *, seed: int):
        super().__init__(target, config)
        self.lora_a, self.lora_b = lora_pair(self, target.key(seed), config.r)
        self.sq_norm = self.variable(AdapterState, sq_norm, "o")
        self.magnitude = self.variable(DoRAMagnitude, self._norm(jnp.zeros_like(sq_norm)), "o")

    def _norm(self, correction: Array) -> Array:
        return jnp.sqrt(jnp.maximum(self.sq_norm[...] + correction, jnp.finfo(self.dtype).tiny))

    def _gain(self, kernel: Array) -> Array:
        """m / n, with n the detached column norm of ``W + s A B``."""
        delta = self.config.scale * (self.lora_a[...] @ self.lora_b[...])
        n = self._norm(jnp.sum(delta * (2 * kernel + delta), axis=-2))
        return self.magnitude[...] / jax.lax.stop_gradient(n)

    def _kernel(self) -> Array:
        return self.spec.kernel_to_matrix(getattr(self.base, self.info.kernel)[...]).astype(self.dtype)

    def forward(self, x: Array, call_base: Callable[[Array], Array]) -> Array:
        y = call_base(x)
        xw = y.astype(self.dtype)
        if self.info.bias is not None:
            bias = self.spec.bias_to_matrix(getattr(self.base, self.info.bias)[...])
            xw = xw - self.spec.out_broadcast(bias.astype(self.dtype), x.ndim, like=xw)
        gain = self.spec.out_broadcast(self._gain(self._kernel()), x.ndim, like=xw)
        h = self.project_in(x.astype(self.dtype), self.lora_a[...]) * self.config.scale
        delta = (gain - 1) * xw + gain * self.project_out(h, self.lora_b[...], x.ndim)
        return y + (self.alpha_for("out", x.ndim) * delta).astype(y.dtype)

    def merged(self, kernel, bias):
        gain = self._gain(kernel)[..., None, :]
        dora = gain * (kernel + self.config.scale * (self.lora_a[...] @ self.lora_b[...]))
        return kernel + self.scalar_alpha() * (dora - kernel), bias
