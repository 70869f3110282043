"""DoRA: weight-decomposed low-rank adaptation. Liu et al. 2024, https://arxiv.org/abs/2402.09353

    W' = (m / n) (W + s A B),   n = stop_gradient(||W + s A B||_col),   s = lora_alpha / r
    y  = base(x) + alpha * [(m/n - 1) x W + (m/n) s x A B]

Flax layout: ``A (d_in, r)``, ``B (r, d_out)``, magnitude ``m (d_out,)``; ``||.||_col`` is
the norm over d_in of each output column (PEFT's ``weight.norm(dim=1)``), detached as in
the paper's section 4.3 and PEFT. ``x W`` is the base output minus its bias, so the bias
passes unscaled (as PEFT). Every kernel-batch index has its own A, B and m.

The norm is computed as ``n = n0 + c / (sqrt(n0^2 + c) + n0)`` (which is
``sqrt(n0^2 + c)`` rearranged) with the frozen base norm ``n0 = ||W||_col`` and the
correction ``c = sum_col(s A B * (2 W + s A B))``; m starts as a copy of ``n0``. The layer
adds ``(m - n) / n * x W + (m / n) * s x A B``. With B = 0, ``c`` is an exact zero, so
``n == n0 == m`` and both terms are exact zeros, however the compiler rewrites the
divisions (under ``jit`` XLA turns ``m / sqrt(.)`` into ``m * rsqrt(.)``, which is off by
an ulp). (A column of W that is zero is floored at the dtype's tiny, not divided by.)

Identity at t=0: bit-exact, eagerly and under jit (B = 0 and m - n = 0 make both terms
exact zeros).

Runtime alpha moves linearly between the base (0, bit-exact) and the DoRA layer (1):
-1 is the negated delta ``W - (W' - W)``, not the inverse of the magnitude rescaling.
Checked against ``peft.tuners.lora.layer.Linear`` with ``use_dora=True`` (forward, merge,
gradients).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from lora_jax.adapter import Adapter, AdapterParam, AdapterState, Target
from lora_jax.peft_codec import PeftCodec, host_array
from lora_jax.variants._checks import check_rank
from lora_jax.variants._lowrank import LORA_AB, LORA_PEFT, LowRankConfig, from_peft_entries, lora_pair, peft_entries


class DoRAMagnitude(AdapterParam):
    """DoRA's magnitude vector: its own type so it can get its own learning rate."""


def _dora_to_peft(adapter: DoRA) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    a, b, m = (host_array(v[...]) for v in (adapter.lora_a, adapter.lora_b, adapter.magnitude))
    return peft_entries(adapter.config), {"lora_A.weight": a.T, "lora_B.weight": b.T, "lora_magnitude_vector": m}


def _dora_from_peft(cfg: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> tuple[DoRAConfig, dict]:
    a, b = tensors["lora_A.weight"].T, tensors["lora_B.weight"].T
    # lora_jax's DoRA has no dropout; without it the adapter computes what PEFT's does at inference
    arrays = {"lora_a": a, "lora_b": b, "magnitude": tensors["lora_magnitude_vector"]}
    return from_peft_entries(DoRAConfig, cfg, a, keep_dropout=False), arrays


@dataclasses.dataclass(frozen=True, kw_only=True)
class DoRAConfig(LowRankConfig):
    """``r``, ``lora_alpha``, ``rslora`` as in LoRA. ``dropout`` must stay 0: PEFT's DoRA
    dropout runs a second base matmul on the dropped input, not implemented here."""

    name = "dora"
    peft_codec = PeftCodec(
        **LORA_PEFT,
        flags={"use_dora": True},
        suffixes=(*LORA_AB, "lora_magnitude_vector"),
        to_peft=_dora_to_peft,
        from_peft=_dora_from_peft,
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dropout:
            raise ValueError(f"dora: dropout={self.dropout} is not supported; use dropout=0.0 (or lora with dropout)")

    def build(self, target: Target, *, seed: int) -> DoRA:
        check_rank(self.name, self.r, target)
        w = target.kernel_matrix(self.name, self.dtype).astype(self.dtype)
        base_norm = jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(w), axis=-2), jnp.finfo(self.dtype).tiny))
        return DoRA(target, self, base_norm, seed=seed)


class DoRA(Adapter):
    def __init__(self, target: Target, config: DoRAConfig, base_norm: Array, *, seed: int):
        super().__init__(target, config)
        self.lora_a, self.lora_b = lora_pair(self, target.key(seed), config.r)
        self.base_norm = self.variable(AdapterState, base_norm, "o")
        # the same bits in its own buffer (a train step may donate it): m - n = 0 at init
        self.magnitude = self.variable(DoRAMagnitude, jnp.array(base_norm, copy=True), "o")

    def _norm(self, kernel: Array) -> Array:
        """The detached column norm of ``W + s A B``, exactly ``n0`` when ``s A B`` is zero."""
        delta = self.config.scale * (self.lora_a[...] @ self.lora_b[...])
        correction = jnp.sum(delta * (2 * kernel + delta), axis=-2)
        n0, tiny = self.base_norm[...], jnp.finfo(self.dtype).tiny
        root = jnp.sqrt(jnp.maximum(n0 * n0 + correction, tiny))
        # floored like n0 (a column of W + s A B that cancels to zero); n0 itself passes unchanged
        return jax.lax.stop_gradient(jnp.maximum(n0 + correction / (root + n0), jnp.sqrt(tiny)))

    def _gains(self, kernel: Array) -> tuple[Array, Array]:
        """``(m / n - 1, m / n)``; the first as ``(m - n) / n`` so it is 0 whenever m == n."""
        n = self._norm(kernel)
        m = self.magnitude[...]
        return (m - n) / n, m / n

    def _kernel(self) -> Array:
        return self.spec.kernel_to_matrix(self.base_kernel("in every forward")).astype(self.dtype)

    def forward(self, x: Array, call_base: Callable[[Array], Array]) -> Array:
        y = call_base(x)
        xw = y.astype(self.dtype)
        if self.info.bias is not None:
            bias = self.spec.bias_to_matrix(getattr(self.base, self.info.bias)[...])
            xw = xw - self.spec.out_broadcast(bias.astype(self.dtype), x.ndim, like=xw)
        excess, gain = (self.spec.out_broadcast(g, x.ndim, like=xw) for g in self._gains(self._kernel()))
        h = self.project_in(x.astype(self.dtype), self.lora_a[...]) * self.config.scale
        delta = excess * xw + gain * self.project_out(h, self.lora_b[...], x.ndim)
        return y + (self.alpha_for("out", x.ndim) * delta).astype(y.dtype)

    def merged(self, kernel, bias):
        excess, gain = (g[..., None, :] for g in self._gains(kernel))
        delta = excess * kernel + gain * (self.config.scale * (self.lora_a[...] @ self.lora_b[...]))
        return kernel + self.scalar_alpha() * delta, bias
