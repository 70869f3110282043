"""Pure math for the rotation-like variants (IA3 gates, HRA, ROAD); no NNX.

Every function takes a runtime ``alpha`` (scalar, or an array that broadcasts against
the data with the same number of axes) and is exactly the identity at ``alpha = 0``.

- :func:`gate_power`: ``Re(g ** alpha)`` on the principal branch, the IA3 gates.
- HRA: pairs of Householder reflections ``H_u H_v`` are plane rotations by twice the
  angle between ``u`` and ``v``; :func:`hra_coords` applies ``alpha`` times those angles
  in rank space, pair by pair, and :func:`hra_rotation` gives the dense matrix.
- ROAD: :func:`road_columns` builds the two elementwise columns of the grouped 2x2
  rotations, :func:`road_inverse` inverts them in the same form, :func:`road_apply`
  applies them with a rotate-half permutation.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float

from lora_jax import shardings

__all__ = ["gate_power", "hra_basis", "hra_coefficients", "hra_coords", "hra_rotation", "road_apply", "road_columns"]


def safe_norm(v: Array, axis: int) -> Array:
    """Euclidean norm whose gradient is 0 (not NaN) at the zero vector."""
    sq = jnp.sum(v * v, axis=axis)
    ok = sq > 0
    return jnp.where(ok, jnp.sqrt(jnp.where(ok, sq, 1.0)), 0.0)


def gate_power(g: Float[Array, "*b d"], alpha: Array, *, floor: float = 1e-6) -> Float[Array, "*b d"]:
    """``Re(g ** alpha)``: ``|g|**alpha``, times ``cos(pi alpha)`` where ``g < 0``.

    Exact ``g ** alpha`` at integer alpha (so -1 gives ``1/g``), 1 at alpha = 0. A negative
    gate passes through 0 on its way from 1 to ``g``. For alpha < 0 ``|g|`` is floored at
    ``floor``: a gate of exactly 0 has no inverse, the floor keeps the output finite.
    """
    mag = jnp.abs(g)
    mag = jnp.where(alpha < 0, jnp.maximum(mag, floor), mag)
    return jnp.power(mag, alpha) * jnp.where(g < 0, jnp.cos(jnp.pi * alpha), 1.0)


# -- HRA --------------------------------------------------------------------------------
def hra_basis(u: Float[Array, "*b d r"]) -> tuple[Float[Array, "*b d r"], Array, Array]:
    """Pair basis of the column-normalized reflection vectors.

    For each pair ``(u, v) = (u_2k, u_2k+1)`` returns columns ``delta = u/|u| - v/|v|`` and
    ``sigma = u/|u| + v/|v|`` (orthogonal, since both are unit vectors) and their norms
    ``(*b, r/2)``. An equal pair (the identity init) gives ``delta = 0`` bit for bit, also
    under ``jit``: ``delta`` is built from the raw difference ``u - v`` (exactly 0), not as
    a difference of two normalized columns, whose reductions compiled code may round apart.
    """
    first, second = u[..., 0::2], u[..., 1::2]
    n_first, n_second = jnp.linalg.norm(first, axis=-2), jnp.linalg.norm(second, axis=-2)
    diff = first - second
    # |v| - |u| = -(u - v).(u + v) / (|u| + |v|), so u/|u| - v/|v| = diff/|u| - v (|u| - |v|) / (|u| |v|)
    gap = jnp.sum(diff * (first + second), axis=-2) / ((n_first + n_second) * n_first * n_second)
    delta = diff / n_first[..., None, :] - second * gap[..., None, :]
    sigma = first / n_first[..., None, :] + second / n_second[..., None, :]
    basis = jnp.stack([delta, sigma], axis=-1).reshape(u.shape)
    return basis, safe_norm(delta, -2), safe_norm(sigma, -2)


def hra_coefficients(n_delta: Array, n_sigma: Array, alpha: Array) -> tuple[Array, Array, Array]:
    """``(a, b, c)`` with ``H_u H_v (alpha) - I = a dd^T + b ss^T + c (d s^T - s d^T)``.

    ``H_u H_v`` rotates the plane of ``u, v`` by ``2 phi`` (``phi`` the angle between
    them, ``tan(phi/2) = |d| / |s|``); we rotate by ``theta = 2 alpha phi``. At ``d = 0``
    the ratios take their limits, so the gradient at the paired init is finite and right.
    An anti-parallel pair (``s = 0``) has no defined plane: its ``s`` terms are dropped.
    """
    theta = 4.0 * alpha * jnp.arctan2(n_delta, n_sigma)
    d_ok, s_ok = n_delta > 0, n_sigma > 0
    nd = jnp.where(d_ok, n_delta, 1.0)
    ns = jnp.where(s_ok, n_sigma, 1.0)
    half_sq = jnp.sin(theta / 2) ** 2
    a = jnp.where(d_ok, -2.0 * half_sq / nd**2, -8.0 * alpha**2 / ns**2)
    b = jnp.where(s_ok, -2.0 * half_sq / ns**2, 0.0)
    c = jnp.where(d_ok, jnp.sin(theta) / (nd * ns), 4.0 * alpha / ns**2)
    return a, b, c


def hra_coords(
    h0: Float[Array, "*rows r"], gram: Float[Array, "*rows r r"], coef: tuple[Array, Array, Array], alpha: Array
) -> Float[Array, "*rows r"]:
    """Coordinates ``g`` with ``R(alpha) x = x + basis @ g``, from ``h0 = basis^T x``.

    ``gram = basis^T basis`` and ``coef`` broadcast against ``h0`` (same ndim). The pairs
    apply last-to-first for alpha >= 0 (``R = P_1 ... P_m`` as PEFT) and first-to-last for
    alpha < 0, so ``R(-alpha) = R(alpha)^-1``; both orders are computed and selected per
    element, which also serves one alpha per row. Cost: O(r^2) per row.
    """
    a, b, c = coef
    m = h0.shape[-1] // 2

    def run(order: range) -> Array:
        g = jnp.zeros_like(h0, jnp.result_type(h0, a))  # zeros_like: h0's sharding too
        for k in order:
            pair = slice(2 * k, 2 * k + 2)
            p = h0[..., pair] + jnp.einsum("...r,...rk->...k", g, gram[..., :, pair])
            pd, ps = p[..., 0:1], p[..., 1:2]
            ak, bk, ck = a[..., k : k + 1], b[..., k : k + 1], c[..., k : k + 1]
            g = g.at[..., pair].add(jnp.concatenate([ak * pd + ck * ps, bk * ps - ck * pd], axis=-1))
        return g

    return jnp.where(alpha >= 0, run(range(m - 1, -1, -1)), run(range(m)))


def hra_rotation(u: Float[Array, "*b d r"], alpha: Array) -> Float[Array, "*b d d"]:
    """Dense ``R(alpha)``: ``H_1 H_2 ... H_r`` at alpha = 1, its inverse at -1 (columns act)."""
    basis, n_delta, n_sigma = hra_basis(u)
    coef = hra_coefficients(n_delta[..., None, :], n_sigma[..., None, :], alpha)
    gram = jnp.einsum("...dr,...ds->...rs", basis, basis)[..., None, :, :]
    g = hra_coords(basis, gram, coef, alpha)  # row i: coordinates of R e_i
    eye = jnp.broadcast_to(jnp.eye(u.shape[-2], dtype=g.dtype), (*g.shape[:-1], u.shape[-2]))
    return eye + jnp.einsum("...dr,...er->...ed", g, basis)


# -- ROAD -------------------------------------------------------------------------------
def _halves(v: Array, group: int) -> Array:
    return shardings.reshape(v, (*v.shape[:-1], -1, 2, group // 2))


def road_columns(
    kind: str, group: int, theta: Float[Array, "*b n"], magnitude: Float[Array, "*b n"], alpha: Array
) -> tuple[Float[Array, "*b d"], Float[Array, "*b d"]]:
    """ROAD's ``(first, second)`` columns at runtime ``alpha`` (PEFT's parameter layout).

    ``road_1``: one (theta, magnitude) per pair; ``road_2``: one per output; ``road_4``:
    separate ones for the cos and sin columns. A negative magnitude is folded into the
    angle (``m cos t = |m| cos(t + pi)``), then angles scale by alpha and magnitudes are
    raised to alpha. Valid for alpha >= 0; negative alpha goes through :func:`road_inverse`.
    """
    lead = theta.shape[:-1]
    if kind == "road_1":  # the pair (i, i + group/2) shares one angle and magnitude
        h = group // 2
        shape = (*lead, theta.shape[-1] // h, 2, h)
        th_c = th_s = jnp.broadcast_to(theta.reshape(*lead, -1, 1, h), shape).reshape(*lead, -1)
        m_c = m_s = jnp.broadcast_to(magnitude.reshape(*lead, -1, 1, h), shape).reshape(*lead, -1)
    elif kind == "road_2":
        th_c = th_s = theta
        m_c = m_s = magnitude
    else:  # road_4: per group, g cos angles then g sin angles
        split = theta.reshape(*lead, -1, 2, group)
        mags = magnitude.reshape(split.shape)
        th_c, th_s = (split[..., i, :].reshape(*lead, -1) for i in (0, 1))
        m_c, m_s = (mags[..., i, :].reshape(th_c.shape) for i in (0, 1))
    th_c = th_c + jnp.where(m_c < 0, jnp.pi, 0.0)
    th_s = th_s + jnp.where(m_s < 0, jnp.pi, 0.0)
    first = jnp.power(jnp.abs(m_c), alpha) * jnp.cos(alpha * th_c)
    second = jnp.power(jnp.abs(m_s), alpha) * jnp.sin(alpha * th_s)
    return first, second


def _swap_halves(v: Array, group: int) -> Array:
    return jnp.flip(_halves(v, group), axis=-2).reshape(v.shape)


def road_inverse(first: Array, second: Array, group: int, *, floor: float = 1e-12) -> tuple[Array, Array]:
    """The inverse of every 2x2 block, again as ``(first, second)`` columns.

    A singular block (determinant 0) has no inverse: its determinant is floored at
    ``floor`` so the output stays finite.
    """
    f_sw = _swap_halves(first, group)
    det = first * f_sw + second * _swap_halves(second, group)
    det = jnp.where(det < 0, -1.0, 1.0) * jnp.maximum(jnp.abs(det), floor)
    return f_sw / det, -second / det


def road_apply(y: Float[Array, "*rows d"], first: Array, second: Array, group: int) -> Float[Array, "*rows d"]:
    """``y * first + rotate_half(y) * second``, rotate_half ``(y1, y2) -> (-y2, y1)`` per group."""
    halves = _halves(y, group)
    rotated = jnp.stack([-halves[..., 1, :], halves[..., 0, :]], axis=-2).reshape(y.shape)
    return y * first + rotated * second
