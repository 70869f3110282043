"""AntiPaSTO: steering by rotating and shifting the top singular directions.
Clark 2026, https://arxiv.org/abs/2601.07473 (code: github.com/wassname/AntiPaSTO)

    W = W_res + U diag(S) Vh                      top-r SVD of the (in, out) kernel
    W(a) = W_res + U R_in(a) diag(S + a d) R_out(a)^T Vh
    y = base(x) + [h (R_in - I) S' + h diag(a d) + g S' (R_out^T - I)] Vh,
        h = x U, g = h R_in, S' = diag(S + a d)

R(a) is block-diagonal Cayley (variants/antipasto_cayley.py) with angles soft-bounded by
``max_angle``; ``rotate`` picks the input basis U (default), the output basis Vh, both or
none. ``d`` (:class:`DeltaS`) and the rotations (:class:`RotationParam`) are distinct
types, so ``optax.multi_transform`` can give them their own learning rates.

Identity at t=0: rotation parameters are 0 (R = I) and d = ``delta_s_init`` (0: exact;
antipasto3 used 4e-4 so the +1 and -1 passes differ from the first step).

Runtime alpha is ``a``, scaling rotation generator and shift together; each term above
is an exact zero at a = 0. R(-a) = R(a)^-1, so with d = 0 the rotation at -a undoes the
one at +a; a shift d != 0 is additive (S + ad and S - ad average to S) and survives that
undo as U diag(ad) Vh. A per-row alpha (shape (batch,)) builds one rotation per row.

Delta form, not W_res: no second (d_in, d_out) kernel; the base keeps its dtype, bias and
sharding. At a scalar alpha the rank-space steps fold into one (r, r) matrix ``core``
(the same one :meth:`merged` uses), so the forward is ``base(x) + (x U core) Vh``: the
W_res form's matmul FLOPs plus an r x r product (timed against the W_res form by
``benchmarks/antipasto_forms.py``), without W_res's ``d_in x d_out`` copy per layer. A
per-row alpha applies the blocks row by row.

Checked against a float64 numpy dense W_res + U R_in diag(S + ad) R_out^T Vh
(tests/test_antipasto.py). Data-driven dims instead of the top r:
variants/antipasto_select.py.
"""

from __future__ import annotations

import dataclasses
import math
import string
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from lora_jax.adapter import Adapter, AdapterParam, AdapterState, Target, VariantConfig
from lora_jax.variants._checks import check_rank
from lora_jax.variants._svd import check_svd_fields, top_r_factors
from lora_jax.variants.antipasto_cayley import block_diag, bound_skew, cayley_delta, n_params, skew_from_params

ROTATE = ("input", "output", "both", "none")


class DeltaS(AdapterParam):
    """AntiPaSTO singular-value shifts ``d`` (r,)."""


class RotationParam(AdapterParam):
    """AntiPaSTO skew-block parameters (r / bs, bs (bs - 1) / 2)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class AntiPaSTOConfig(VariantConfig):
    """``r`` SVD dims (divisible by ``block_size``), ``max_angle`` in (0, pi), ``rotate``
    one of ROTATE, ``delta_s`` learn shifts, ``svd_iters`` None: full SVD, K: randomized
    with K power iterations and ``r + svd_oversample`` sketch columns
    (:mod:`lora_jax.variants._svd`)."""

    name = "antipasto"
    r: int = 64
    block_size: int = 4
    max_angle: float = math.pi / 4
    rotate: str = "input"
    delta_s: bool = True
    delta_s_init: float = 0.0
    svd_iters: int | None = None
    svd_oversample: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rotate not in ROTATE:
            raise ValueError(f"antipasto: unknown rotate={self.rotate!r}; use one of {ROTATE}")
        if not 0.0 < self.max_angle < math.pi:
            raise ValueError(f"antipasto: max_angle={self.max_angle} must be in (0, pi) radians, e.g. pi/4")
        if not isinstance(self.block_size, int) or self.block_size < 2:
            raise ValueError(f"antipasto: block_size={self.block_size!r} must be an integer >= 2")
        if isinstance(self.r, int) and self.r % self.block_size:
            raise ValueError(
                f"antipasto: r={self.r} is not divisible by block_size={self.block_size}; "
                f"use r={self.r - self.r % self.block_size or self.block_size} or another block_size"
            )
        if self.rotate == "none" and not self.delta_s:
            raise ValueError("antipasto: rotate='none' with delta_s=False leaves nothing to train")
        check_svd_fields(self)

    def build(self, target: Target, *, seed: int) -> AntiPaSTO:
        check_rank(self.name, self.r, target)
        return AntiPaSTO(target, self, seed=seed)


class AntiPaSTO(Adapter):
    def __init__(self, target: Target, config: AntiPaSTOConfig, *, seed: int):
        super().__init__(target, config)
        batch, r, bs = target.spec.batch_shape, config.r, config.block_size
        key_svd, key_s = jax.random.split(target.key(seed))
        kernel = target.kernel_matrix(config.name, self.dtype)
        put = self.variable  # laid out (sharded) like the base kernel
        u, s, vh = (m.astype(self.dtype) for m in top_r_factors(kernel, r, config, key_svd))
        self.u, self.s, self.vh = put(AdapterState, u, "i-"), put(AdapterState, s, "-"), put(AdapterState, vh, "-o")
        self.indices = put(AdapterState, jnp.broadcast_to(jnp.arange(r, dtype=jnp.int32), (*batch, r)), "-")
        noise = jax.random.truncated_normal(key_s, -2.0, 2.0, (*batch, r), self.dtype)
        init = config.delta_s_init * (1.0 + noise) if config.delta_s else jnp.zeros_like(noise)
        self.delta_s = put(DeltaS if config.delta_s else AdapterState, init, "-")  # frozen 0 if off: one code path
        zeros = jnp.zeros((*batch, r // bs, n_params(bs)), self.dtype)
        self.rot_in = put(RotationParam, zeros, "--") if config.rotate in ("input", "both") else None
        self.rot_out = put(RotationParam, zeros, "--") if config.rotate in ("output", "both") else None

    def _delta(self, param: RotationParam, a: Array) -> Array:
        """``R(a) - I`` per block: (*batch, n, bs, bs), or (rows, *batch, n, bs, bs)."""
        return cayley_delta(bound_skew(skew_from_params(param[...]), self.config.max_angle), a)

    def _rotate(self, h: Array, delta: Array, ndim: int) -> Array:
        """``h @ blockdiag(delta)`` in the rank-space layout (rank axis last)."""
        lay, batch = self.spec.layout(ndim), self.spec.batch
        n, i, j = [c for c in string.ascii_letters if c not in lay.hidden][:3]
        rows, free = (lay.lhs[0] if delta.ndim > len(batch) + 3 else ""), lay.hidden[:-1]
        blocks = h.reshape(*h.shape[:-1], -1, delta.shape[-1])
        return jnp.einsum(f"{free}{n}{i},{rows}{batch}{n}{i}{j}->{free}{n}{j}", blocks, delta).reshape(h.shape)

    def forward(self, x: Array, call_base: Callable[[Array], Array]) -> Array:
        y = call_base(x)
        h = self.project_in(x.astype(self.dtype), self.u[...])
        # A scalar alpha folds every rank-space step into one (r, r) matrix (a few small
        # ops instead of elementwise passes and block einsums over every row).
        z = self._rank_map(h, x.ndim) if self.alpha[...].ndim == 0 else self._per_row(h, x.ndim)
        return y + self.project_out(z, self.vh[...], x.ndim).astype(y.dtype)

    def _rank_map(self, h: Array, ndim: int) -> Array:
        """``h @ core(alpha)`` in the rank-space layout."""
        lay, batch = self.spec.layout(ndim), self.spec.batch
        k = next(c for c in string.ascii_letters if c not in lay.hidden)
        core = self._core(self.scalar_alpha())
        return jnp.einsum(f"{lay.hidden},{batch}{lay.rank}{k}->{lay.hidden[:-1]}{k}", h, core)

    def _per_row(self, h: Array, ndim: int) -> Array:
        """The rank-space steps with one alpha per input row (one rotation per row)."""
        spec, a = self.spec, self.alpha[...].astype(self.dtype)
        shift = self.alpha_for("hidden", ndim) * spec.rank_broadcast(self.delta_s[...], ndim)
        s_new = spec.rank_broadcast(self.s[...], ndim) + shift
        z, g = h * shift, h
        if self.rot_in is not None:
            dg = self._rotate(h, self._delta(self.rot_in, a), ndim)
            z, g = z + dg * s_new, h + dg
        if self.rot_out is not None:  # R_out^T - I = R_out(-a) - I
            z = z + self._rotate(g * s_new, self._delta(self.rot_out, -a), ndim)
        return z

    def _core(self, a: Array) -> Float[Array, "*batch r r"]:
        """``(R_in - I) S' + diag(a d) + R_in S' (R_out^T - I)`` at a scalar alpha, so that
        the kernel is ``W + U core Vh``; exact zeros at ``a = 0``."""
        shift = a * self.delta_s[...]
        s_new = self.s[...] + shift
        eye = jnp.eye(s_new.shape[-1], dtype=self.dtype)
        core = jnp.einsum("...i,ij->...ij", shift, eye)  # (S' - S) in the unrotated basis
        g = jnp.einsum("...i,ij->...ij", s_new, eye)  # R_in diag(S')
        if self.rot_in is not None:
            d_in = block_diag(self._delta(self.rot_in, a))
            core, g = core + d_in * s_new[..., None, :], g + d_in * s_new[..., None, :]
        if self.rot_out is not None:
            core = core + g @ jnp.swapaxes(block_diag(self._delta(self.rot_out, a)), -1, -2)
        return core

    def merged(self, kernel, bias):
        return kernel + self.u[...] @ self._core(self.scalar_alpha()) @ self.vh[...], bias
