"""Validation shared by variants: one message for one mistake."""

from __future__ import annotations

from typing import Any

from jaxtyping import Array, Float

from lora_jax.adapter import Target
from lora_jax.validation import is_int


def check_rank(variant: str, r: int, target: Target) -> None:
    spec = target.spec
    limit = min(spec.d_in, spec.d_out)
    if not is_int(r) or not 0 < r <= limit:
        raise ValueError(
            f"{variant}: rank r={r!r} at {target.path!r} must be an integer in [1, {limit}] "
            f"(min of d_in={spec.d_in}, d_out={spec.d_out}); lower r or exclude the layer"
        )


def check_dropout(variant: str, p: float) -> None:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{variant}: dropout={p} must be in [0, 1)")


def dense_kernel(variant: str, target: Target, dtype: Any) -> Float[Array, "*batch d_in d_out"]:
    """``target.kernel_matrix(variant, dtype)``: the guarded read (:func:`lora_jax.adapter.layer_kernel`)
    under the name variants used before it moved there."""
    return target.kernel_matrix(variant, dtype)
