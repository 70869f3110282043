"""HRA: Householder reflection adaptation. Yuan et al. 2024, https://arxiv.org/abs/2405.17484

    y = base(x R^T),    R = H_1 H_2 ... H_r,    H_i = I - 2 u_i u_i^T / |u_i|^2

i.e. PEFT's merged weight ``W R`` (torch layout), Flax kernel ``R^T K``. ``U (d_in, r)``
is PEFT's ``hra_u``, one per kernel-batch index. The rotation acts on the input, so the
base layer, its bias and its dtype are used unchanged.

Identity at t=0: the columns come in equal pairs (PEFT's symmetric init), H_i H_i = I
exactly; this needs an even r, so an odd r is rejected.

Runtime alpha: a pair H_u H_v is a rotation by 2 phi in the plane of u and v (phi the
angle between them). R(alpha) rotates each pair's plane by 2 alpha phi, pairs applied in
PEFT's order for alpha >= 0 and in reverse for alpha < 0. So R(0) = I, R(1) is PEFT's
product, R(-alpha) = R(alpha)^-1 (R(-1) = H_r ... H_1), R(alpha) is orthogonal for
every alpha, and for r = 2 R(a) R(b) = R(a + b). Math in :mod:`lora_jax.rotations`;
cost O(r d_in + r^2) per row. Not implemented: PEFT's ``apply_GS`` (Gram-Schmidt) form.

:func:`hra_orthogonality_penalty` is the paper's regulariser (not in PEFT).
Checked against ``peft.tuners.hra.layer.HRALinear`` (tests/test_hra.py).

PEFT file (``peft_type`` HRA): ``hra_u (d_in, r)`` as is; config ``r`` (one for the whole
file: PEFT's HRA has no ``rank_pattern``) and ``apply_GS`` (False; a file with True is
refused, see above; so is an odd r, which PEFT allows).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float

from lora_jax import shardings
from lora_jax.adapter import Adapter, AdapterParam, Target, VariantConfig
from lora_jax.peft_codec import PeftCodec, PeftFormatError, check_file_rank, host_array, variant_config
from lora_jax.rotations import hra_basis, hra_coefficients, hra_coords, hra_rotation, safe_norm
from lora_jax.validation import is_int


@dataclasses.dataclass(frozen=True, kw_only=True)
class HRAConfig(VariantConfig):
    """``r``: number of reflections (even, at most d_in)."""

    name = "hra"
    r: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        if not is_int(self.r) or self.r <= 0 or self.r % 2:
            raise ValueError(
                f"hra: r={self.r!r} must be a positive even integer: the identity init pairs equal "
                "reflections (H H = I), so an odd r cannot start at the base model; use r=2, 4, 8, ..."
            )

    def build(self, target: Target, *, seed: int) -> HRA:
        if self.r > target.spec.d_in:
            raise ValueError(f"hra: r={self.r} reflections at {target.path!r} exceed d_in={target.spec.d_in}; lower r")
        return HRA(target, self, seed=seed)


class HRA(Adapter):
    def __init__(self, target: Target, config: HRAConfig, *, seed: int):
        super().__init__(target, config)
        spec, half = target.spec, config.r // 2
        bound = 1.0 / math.sqrt(half)  # torch kaiming-uniform(a=sqrt 5) on (d_in, r/2): fan_in = r/2
        u = jax.random.uniform(target.key(seed), (*spec.batch_shape, spec.d_in, half), self.dtype, -bound, bound)
        self.hra_u = self.variable(AdapterParam, jnp.repeat(u, 2, axis=-1), "i-")

    def _coords(self, h0: Array, basis: Array, n_delta: Array, n_sigma: Array, alpha: Array) -> Array:
        """``hra_coords`` with the per-pair tensors shaped like ``h0`` (batch + rows + rank)."""
        ones = (1,) * (h0.ndim - len(self.spec.batch_shape) - 1)
        lift = lambda v: v.reshape(*v.shape[:-1], *ones, v.shape[-1])
        gram = shardings.einsum("...dr,...ds->...rs", basis, basis)
        gram = gram.reshape(*gram.shape[:-2], *ones, *gram.shape[-2:])
        return hra_coords(h0, gram, hra_coefficients(lift(n_delta), lift(n_sigma), alpha), alpha)

    def forward(self, x: Array, call_base: Callable[[Array], Array]) -> Array:
        basis, n_delta, n_sigma = hra_basis(self.hra_u[...])
        h = x.astype(self.dtype)
        g = self._coords(self.project_in(h, basis), basis, n_delta, n_sigma, self.alpha_for("hidden", x.ndim))
        return call_base((h + self.project_back(g, basis, x.ndim)).astype(x.dtype))

    def merged(self, kernel, bias):
        # The dense rotation is built whole on every device (a one-off, d_in x d_in).
        rotation = hra_rotation(shardings.whole_matrices(self.hra_u[...]), self.scalar_alpha())
        return shardings.einsum("...ed,...eo->...do", rotation, kernel), bias


def _to_peft(adapter: HRA) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    return {"r": adapter.config.r, "apply_GS": False}, {"hra_u": host_array(adapter.hra_u[...])}


def _from_peft(cfg: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> tuple[HRAConfig, dict]:
    if cfg.get("apply_GS", False):
        raise PeftFormatError(
            "apply_GS=True (HRA's Gram-Schmidt form) is not implemented in lora_jax, whose HRA is the product of "
            "reflections (PEFT's apply_GS=False); retrain with apply_GS=False"
        )
    u = tensors["hra_u"]
    check_file_rank(cfg, u.shape[1], f"hra_u (shape {u.shape})")
    return variant_config(lambda: HRAConfig(r=u.shape[1])), {"hra_u": u}


HRAConfig.peft_codec = PeftCodec("HRA", {}, {}, ("hra_u",), _to_peft, _from_peft)


def hra_orthogonality_penalty(model: nnx.Module, *, weight: float = 1e-4) -> Float[Array, ""]:
    """The HRA paper's regulariser: ``weight * sum ||I - U^T U||_F`` over every HRA adapter
    in ``model`` (U column-normalized), to add to a training loss. 0.0 if there is none."""
    total = jnp.zeros((), jnp.float32)
    for _, module in nnx.iter_modules(model):
        if isinstance(module, HRA):
            u = module.hra_u[...]
            unit = u / jnp.linalg.norm(u, axis=-2, keepdims=True)
            gap = jnp.eye(u.shape[-1], dtype=u.dtype) - jnp.einsum("...dr,...ds->...rs", unit, unit)
            total = total + jnp.sum(safe_norm(gap.reshape(*gap.shape[:-2], -1), -1)).astype(jnp.float32)
    return weight * total
