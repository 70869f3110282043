"""Pure array math for adapter inits: truncated SVDs, LQ, norms. No NNX here.

Every function takes a batch of matrices ``(*batch, m, n)`` (one per kernel-batch index
in the adapter's matrix view) and works on the last two axes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

__all__ = ["top_r_svd", "randomized_svd", "lq", "column_norms", "row_norms", "svd_error"]


def _t(m: Array) -> Array:
    return jnp.swapaxes(m, -1, -2)


@functools.partial(jax.jit, static_argnames=("r",))
def top_r_svd(
    m: Float[Array, "*batch d_in d_out"], r: int
) -> tuple[Float[Array, "*batch d_in r"], Float[Array, "*batch r"], Float[Array, "*batch r d_out"]]:
    """The r largest singular triplets from a full (thin) SVD: ``m ~ U diag(S) Vh``."""
    u, s, vh = jnp.linalg.svd(m, full_matrices=False)
    return u[..., :r], s[..., :r], vh[..., :r, :]


def _small_t(m: Array) -> Array:
    """The transpose of a thin (tall x k) matrix, materialized. ``m^T @ big`` then runs as
    a row-major ``(k, n) @ (n, d)`` dot; left to itself XLA:CPU folds the transpose into
    the dot and transposes the big operand instead, which is much slower."""
    barrier = jax.lax.optimization_barrier
    return barrier(_t(barrier(m)))


def _lu_basis(y: Array) -> Array:
    """A well-conditioned basis of y's columns, ``P L`` of pivoted LU: the same span as QR's
    Q for a fraction of the cost (between power iterations the span is all that matters)."""
    lu, _, perm = jax.lax.linalg.lu(y)
    k = y.shape[-1]
    unit = jnp.eye(y.shape[-2], k, dtype=y.dtype).reshape((1,) * (y.ndim - 2) + (y.shape[-2], k))
    lower = jnp.tril(lu[..., :k], -1) + unit
    return jnp.take_along_axis(lower, jnp.argsort(perm, axis=-1)[..., None], axis=-2)


@functools.partial(jax.jit, static_argnames=("r", "niter", "oversample"))
def randomized_svd(
    m: Float[Array, "*batch d_in d_out"], r: int, *, niter: int, key: jax.Array, oversample: int = 8
) -> tuple[Float[Array, "*batch d_in r"], Float[Array, "*batch r"], Float[Array, "*batch r d_out"]]:
    """Approximate top-r SVD (Halko, Martinsson, Tropp 2011, algorithm 4.4).

    A Gaussian sketch of ``k = r + oversample`` columns, ``niter`` power iterations (each
    half-step renormalized with a pivoted LU, as scikit-learn does, so small singular
    values are not lost to rounding), a QR, then the exact SVD of the small ``(k, d_out)``
    projection. Costs ``O(m n k)`` per iteration instead of the full SVD's
    ``O(m n min(m, n))``. More iterations sharpen a slowly decaying spectrum; a larger
    ``oversample`` helps most on a flat one. PEFT's ``pissa_niter_K`` is this with
    ``oversample=0``. Jitted: one compilation per shape and setting.
    """
    if niter < 0:
        raise ValueError(f"randomized_svd: niter={niter} must be >= 0 (number of power iterations)")
    if oversample < 0:
        raise ValueError(f"randomized_svd: oversample={oversample} must be >= 0 (extra sketch columns)")
    k = min(r + oversample, m.shape[-2], m.shape[-1])
    y = m @ jax.random.normal(key, (*m.shape[:-2], m.shape[-1], k), m.dtype)
    for _ in range(niter):
        z = _small_t(_small_t(_lu_basis(y)) @ m)  # m^T q as (q^T m)^T
        y = m @ _lu_basis(z)
    q = jnp.linalg.qr(y, mode="reduced")[0]
    u_small, s, vh = jnp.linalg.svd(_small_t(q) @ m, full_matrices=False)
    return (q @ u_small)[..., :r], s[..., :r], vh[..., :r, :]


def lq(m: Float[Array, "*batch d_in d_out"]) -> tuple[Float[Array, "*batch d_in k"], Float[Array, "*batch k d_out"]]:
    """``m = L Q`` with ``Q`` having orthonormal rows, ``k = min(d_in, d_out)``.

    This is the QR of the PyTorch-layout weight ``W = m.T = Q' R`` read in the Flax layout
    (``L = R.T``, ``Q = Q'.T``), so the first r columns of L / rows of Q are the factors
    OLoRA takes from ``torch.linalg.qr(W)``.
    """
    q, r = jnp.linalg.qr(_t(m), mode="reduced")
    return _t(r), _t(q)


def _norms(m: Array, axis: int, floor: float) -> Array:
    # Flooring the square before the sqrt, not the norm after it, keeps the gradient
    # finite at a zero vector (d sqrt(0) is inf, and 0 * inf is NaN even behind a max).
    return jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(m), axis=axis), floor * floor))


def column_norms(m: Float[Array, "*batch a b"], floor: float = 0.0) -> Float[Array, "*batch b"]:
    """L2 norm of each column (over axis -2), at least ``floor``. On a Flax kernel
    ``(d_in, d_out)``: one norm per output, PyTorch's ``W.norm(dim=1)``. With ``floor > 0``
    the gradient is finite (zero) at a zero column."""
    return _norms(m, -2, floor)


def row_norms(m: Float[Array, "*batch a b"], floor: float = 0.0) -> Float[Array, "*batch a"]:
    """L2 norm of each row (over axis -1), at least ``floor``. On a Flax kernel: one norm
    per input channel, PyTorch's ``W.norm(dim=0)``."""
    return _norms(m, -1, floor)


def svd_error(m: Float[Array, "*batch a b"], u: Array, s: Array, vh: Array) -> Float[Array, "*batch"]:
    """Relative Frobenius error ``|m - U diag(S) Vh| / |m|`` of a (truncated) SVD."""
    residual = m - (u * s[..., None, :]) @ vh
    return jnp.sqrt(jnp.sum(jnp.square(residual), axis=(-2, -1)) / jnp.sum(jnp.square(m), axis=(-2, -1)))
