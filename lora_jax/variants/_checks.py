"""Validation shared by variants: one message for one mistake."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from lora_jax import shardings
from lora_jax.adapter import Target


def check_rank(variant: str, r: int, target: Target) -> None:
    spec = target.spec
    limit = min(spec.d_in, spec.d_out)
    if not isinstance(r, int) or isinstance(r, bool) or not 0 < r <= limit:
        raise ValueError(
            f"{variant}: rank r={r!r} at {target.path!r} must be an integer in [1, {limit}] "
            f"(min of d_in={spec.d_in}, d_out={spec.d_out}); lower r or exclude the layer"
        )


def dense_kernel(variant: str, target: Target, dtype: Any) -> Float[Array, "*batch d_in d_out"]:
    """The kernel as a float matrix view, for variants whose init reads the weights (SVD,
    QR, norms). A kernel that is not a plain float array (an int8 / packed quantized
    weight behind a registered view, or a custom container) is refused rather than
    decomposed as if its raw storage were the weight."""
    try:
        kernel = target.kernel
    except TypeError:  # not indexable with [...]: name the object itself in the message
        kernel = getattr(target.module, target.info.kernel)
    if not isinstance(kernel, jax.Array | np.ndarray) or not jnp.issubdtype(kernel.dtype, jnp.floating):
        what = f"an array of dtype {kernel.dtype}" if hasattr(kernel, "dtype") else f"a {type(kernel).__name__}"
        raise ValueError(
            f"{variant}: the kernel {target.info.kernel!r} of {target.path!r} is {what}, not a dense float "
            f"array, and {variant} reads the dense weights at init; dequantize the layer first (or register a "
            "view whose kernel attribute is the float weight), or use lora, which never reads the kernel"
        )
    # The decompositions run in at least fp32 even for a bf16 adapter, on whole matrices.
    matrix = shardings.whole_matrices(target.spec.kernel_to_matrix(kernel))
    return matrix.astype(jnp.promote_types(dtype, jnp.float32))


def check_dropout(variant: str, p: float) -> None:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{variant}: dropout={p} must be in [0, 1)")


def check_oversample(variant: str, field: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(
            f"{variant}: {field}={value!r} must be an integer >= 0 (extra randomized-SVD sketch columns, e.g. 8)"
        )

