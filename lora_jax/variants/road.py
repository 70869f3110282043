"""ROAD: 2D rotary adaptation. Liao et al. 2024, https://arxiv.org/abs/2409.00119

    y' = y * c + rotate_half(y) * s,     y = base(x),  per group of ``group_size`` outputs

``rotate_half`` pairs output i with i + group_size/2 inside its group, ``(y1, y2) ->
(-y2, y1)``; ``c = m cos(theta)``, ``s = m sin(theta)``. ``road_1`` keeps one (theta, m)
per pair (d_out/2 of each), ``road_2`` one per output (d_out), ``road_4`` separate ones
for c and s (2 d_out). Parameters are laid out as PEFT's ``road_theta`` / ``road_alpha``
(here ``theta`` / ``magnitude``), one set per kernel-batch index. Merged: ``R W`` and
``R b`` (the same elementwise form applied to the kernel's rows and the bias).

Identity at t=0: theta = 0 and m = 1, so c = 1 and s = 0 exactly.

Runtime alpha: for alpha >= 0 angles scale to ``alpha theta`` and magnitudes to
``|m| ** alpha`` (a negative m is folded into the angle, ``m cos t = |m| cos(t + pi)``);
alpha < 0 applies the exact inverse of every 2x2 block at ``|alpha|``. So alpha = 0 is
the base, alpha = -1 undoes alpha = 1 (for ``road_1``: rotation by -theta, scale 1/m),
and a singular block (determinant 0) has its determinant floored at 1e-12. A huge alpha
overflows: ``|m| ** alpha`` is inf in float32 once ``|alpha log |m||`` passes about 88;
that is the power, kept as it is.
Checked against ``peft.tuners.road.layer.Linear`` (tests/test_road.py).

PEFT file (``peft_type`` ROAD): ``road_theta`` and ``road_alpha`` are ``theta`` and
``magnitude`` as they are; config ``variant`` (``kind``) and ``group_size``, one of each
for the whole file (PEFT has no per-layer pattern for them).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from lora_jax.adapter import Adapter, AdapterParam, Target, VariantConfig
from lora_jax.peft_codec import PeftCodec, host_array, variant_config
from lora_jax.rotations import road_apply, road_columns, road_inverse
from lora_jax.validation import is_int

_SIZES = {"road_1": 0.5, "road_2": 1, "road_4": 2}  # parameters per output feature


@dataclasses.dataclass(frozen=True, kw_only=True)
class ROADConfig(VariantConfig):
    """``kind`` (PEFT's ``variant``) road_1, road_2 or road_4; ``group_size`` even, divides d_out."""

    name = "road"
    kind: str = "road_1"
    group_size: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kind not in _SIZES:
            raise ValueError(f"road: kind={self.kind!r} must be one of {sorted(_SIZES)}")
        g = self.group_size
        if not is_int(g) or g <= 0 or g % 2:
            raise ValueError(
                f"road: group_size={g!r} must be a positive even integer (each group is split "
                "into two halves that rotate against each other)"
            )

    def build(self, target: Target, *, seed: int) -> ROAD:
        d_out = target.spec.d_out
        if d_out % self.group_size:
            options = [g for g in range(2, min(d_out, 128) + 1, 2) if d_out % g == 0]
            raise ValueError(
                f"road: group_size={self.group_size} does not divide d_out={d_out} at {target.path!r}; "
                f"pick an even group size that divides it, e.g. one of {options} (PEFT's default is 64)"
            )
        return ROAD(target, self)


class ROAD(Adapter):
    def __init__(self, target: Target, config: ROADConfig):
        super().__init__(target, config)
        shape = (*target.spec.batch_shape, int(target.spec.d_out * _SIZES[config.kind]))
        # d_out/2 or 2 d_out long, so not laid out like the kernel's outputs: replicated
        self.theta = self.variable(AdapterParam, jnp.zeros(shape, self.dtype), "-")
        self.magnitude = self.variable(AdapterParam, jnp.ones(shape, self.dtype), "-")

    def _columns(self, alpha: Array, n_rows: int) -> tuple[Array, Array]:
        """Columns at ``alpha``, parameters lifted over ``n_rows`` row axes."""
        lift = lambda v: v.reshape(*v.shape[:-1], *(1,) * n_rows, v.shape[-1])
        cfg = self.config
        theta, magnitude = lift(self.theta[...]), lift(self.magnitude[...])
        first, second = road_columns(cfg.kind, cfg.group_size, theta, magnitude, jnp.abs(alpha))
        inv_first, inv_second = road_inverse(first, second, cfg.group_size)
        return jnp.where(alpha < 0, inv_first, first), jnp.where(alpha < 0, inv_second, second)

    def forward(self, x: Array, call_base: Callable[[Array], Array]) -> Array:
        y = call_base(x)
        spec, ndim = self.spec, x.ndim
        ym = spec.out_to_matrix(y.astype(self.dtype), ndim)  # (*batch, *free, d_out)
        alpha = self.alpha_for("out", ndim)
        if alpha.ndim:  # the same transpose as the output, then the size-1 output axes merge
            lay = spec.layout(ndim)
            order = spec.batch + lay.free + spec.output
            alpha = jnp.transpose(alpha, [lay.out.index(c) for c in order])
            alpha = alpha.reshape(*alpha.shape[: ym.ndim - 1], 1)
        first, second = self._columns(alpha, ym.ndim - len(spec.batch_shape) - 1)
        out = road_apply(ym, first, second, self.config.group_size)
        return spec.out_from_matrix(out, ndim).astype(y.dtype)

    def merged(self, kernel, bias):
        first, second = self._columns(self.scalar_alpha(), 1)
        rotated = road_apply(kernel, first, second, self.config.group_size)
        if bias is not None:
            bias = road_apply(bias, first[..., 0, :], second[..., 0, :], self.config.group_size)
        return rotated, bias


def _to_peft(adapter: ROAD) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    cfg = adapter.config
    arrays = {"road_theta": host_array(adapter.theta[...]), "road_alpha": host_array(adapter.magnitude[...])}
    return {"variant": cfg.kind, "group_size": cfg.group_size}, arrays


def _from_peft(cfg: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> tuple[ROADConfig, dict]:
    options = {"kind": cfg.get("variant", "road_1"), "group_size": cfg.get("group_size", 64)}  # PEFT's defaults
    arrays = {"theta": tensors["road_theta"], "magnitude": tensors["road_alpha"]}
    return variant_config(lambda: ROADConfig(**options)), arrays


ROADConfig.peft_codec = PeftCodec("ROAD", {}, {}, ("road_theta", "road_alpha"), _to_peft, _from_peft)
