"""Block-diagonal Cayley rotations, AntiPaSTO's rotation math. Pure jax, no nnx.

A rotation of ``r`` dims is ``r / bs`` independent ``bs x bs`` blocks. Each block is the
Cayley transform of a skew matrix ``A`` built from its ``bs (bs - 1) / 2`` upper-triangle
parameters::

    R(a) = (I - a A / 2)^-1 (I + a A / 2)      R(0) = I,  R(-a) = R(a)^-1 = R(a)^T

``I - aA/2`` has eigenvalues ``1 - i a lambda`` (``|.| >= 1``), so the solve is never
singular, for any ``a`` and any parameter size. :func:`cayley_delta` returns
``R(a) - I = 2 (I - X)^-1 X`` (``X = aA/2``) directly: it is an exact zero at ``a = 0``
and keeps its relative accuracy for small angles, where forming ``R`` and subtracting
``I`` would cancel.

Angle bound: ``A <- c tanh(A / c)`` elementwise with ``c = 2 tan(max_angle / 2)``. A
2x2 block rotates by ``2 arctan(a p / 2)``, so ``|angle| < max_angle`` for ``|a| <= 1``:
exact. For ``bs > 2`` the bound is on entries, not angles: the block's angles are
``2 arctan(a lambda_k / 2)`` with ``lambda_k <= ||A||_2 <= (bs - 1) c``, so
``|angle| <= 2 arctan((bs - 1) tan(max_angle / 2))`` for ``|a| <= 1``
(:func:`angle_limit`). For ``|a| > 1`` the angle keeps growing towards (never past) pi.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from jaxtyping import Array, Float

__all__ = [
    "angle_limit",
    "block_diag",
    "block_size_of",
    "bound_skew",
    "cayley",
    "cayley_delta",
    "n_params",
    "orthogonality_error",
    "rotation_angles",
    "skew_from_params",
]


def _eye_like(m: Array) -> Array:
    """An identity that broadcasts against a stack of square matrices ``m`` (same rank)."""
    return jnp.eye(m.shape[-1], dtype=m.dtype).reshape((1,) * (m.ndim - 2) + m.shape[-2:])


def n_params(bs: int) -> int:
    """Upper-triangle parameters of one ``bs x bs`` skew block."""
    return bs * (bs - 1) // 2


def block_size_of(m: int) -> int:
    """The block size whose skew block has ``m`` parameters."""
    bs = (1 + math.isqrt(1 + 8 * m)) // 2
    if n_params(bs) != m or bs < 2:
        raise ValueError(f"{m} parameters is not bs*(bs-1)/2 for any block size bs >= 2")
    return bs


def skew_from_params(params: Float[Array, "*lead m"]) -> Float[Array, "*lead bs bs"]:
    """Skew-symmetric blocks from their upper-triangle entries (row-major order)."""
    bs = block_size_of(params.shape[-1])
    rows, cols = jnp.triu_indices(bs, k=1)
    upper = jnp.zeros((*params.shape[:-1], bs, bs), params.dtype).at[..., rows, cols].set(params)
    return upper - jnp.swapaxes(upper, -1, -2)


def bound_skew(a: Float[Array, "*lead bs bs"], max_angle: float | None) -> Float[Array, "*lead bs bs"]:
    """Soft-clip entries to ``|A_ij| < 2 tan(max_angle / 2)`` (``None``: no bound)."""
    if max_angle is None:
        return a
    c = 2.0 * math.tan(max_angle / 2.0)
    return c * jnp.tanh(a / c)


def angle_limit(max_angle: float, bs: int) -> float:
    """The largest rotation angle :func:`bound_skew` allows at ``|a| <= 1`` (see module doc)."""
    return 2.0 * math.atan((bs - 1) * math.tan(max_angle / 2.0))


def cayley_delta(skew: Float[Array, "*lead bs bs"], a: Float[Array, "*rows"] | float) -> Array:
    """``R(a) - I`` per block. ``a`` is a scalar or has leading ``rows`` axes, which are
    prepended (one rotation per row): result ``(*rows, *lead, bs, bs)``."""
    a = jnp.asarray(a, skew.dtype)
    x = a.reshape(a.shape + (1,) * skew.ndim) * (skew / 2).reshape((1,) * a.ndim + skew.shape)
    return 2.0 * jnp.linalg.solve(_eye_like(x) - x, x)


def cayley(skew: Float[Array, "*lead bs bs"], a: Float[Array, "*rows"] | float) -> Array:
    """``R(a) = (I - aA/2)^-1 (I + aA/2)`` per block."""
    delta = cayley_delta(skew, a)
    return _eye_like(delta) + delta


def block_diag(blocks: Float[Array, "*lead n bs bs"]) -> Float[Array, "*lead r r"]:
    """The dense ``(n bs) x (n bs)`` block-diagonal matrix of ``n`` blocks."""
    *lead, n, bs, _ = blocks.shape
    eye = jnp.eye(n, dtype=blocks.dtype)
    dense = jnp.einsum("...nij,nm->...nimj", blocks, eye)
    return dense.reshape(*lead, n * bs, n * bs)


def orthogonality_error(r: Float[Array, "*lead k k"]) -> Array:
    """``max |R^T R - I|``: zero for an orthogonal matrix."""
    return jnp.max(jnp.abs(jnp.swapaxes(r, -1, -2) @ r - _eye_like(r)))


def rotation_angles(r: Float[Array, "*lead k k"]) -> Array:
    """The rotation angles of orthogonal matrices: ``|arg|`` of their eigenvalues."""
    return jnp.abs(jnp.angle(jnp.linalg.eigvals(r)))
