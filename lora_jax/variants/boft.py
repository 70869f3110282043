"""BOFT: orthogonal finetuning by butterfly factorization. Liu et al. 2024,
https://arxiv.org/abs/2311.06243

    y = (base(x R) - b) * s + b,    R = B_m ... B_1,    B_k = P_k diag(Q_k1, ..., Q_kn) P_k^T

``x R`` rotates the ``d_in`` input features (row vector ``x``; ``B_m`` acts first) and ``s``
(``boft_s``, one per output, init 1) scales the output without its bias. Each factor is
``n`` blocks of ``b`` features (``boft_block_size`` or ``boft_block_num``, exactly one set),
each the exact Cayley map ``Q = (I - S)(I + S)^-1`` of ``S = (A - A^T) / 2``, ``A`` a
stored ``b x b`` matrix (``boft_r (*batch, m, n, b, b)``, PEFT's ``boft_R``: the full
matrix, so its symmetric half is inert, as in PEFT). ``P_k`` is PEFT's butterfly
permutation: ``P_1 = I``; ``P_k`` reorders each chunk of ``b 2^(k-1)`` features by
half-blocks of ``b/2``, evens first, so a block of ``B_k`` joins two half-blocks ``b 2^(k-2)``
features apart. ``m = boft_n_butterfly_factor``; ``m = 1`` is OFT with exact Cayley
blocks, plus s.
Delta form: every factor adds ``x P (Q - I) P^T`` with ``Q - I = -2 S (I + S)^-1``, the
base layer keeps its bias and dtype, and the output is ``y + (y - b)(s - 1)``; both
changes are computed in the adapter's dtype and added in the layer's.
Merged: ``R K diag(s)`` (Flax kernel), PEFT's ``(W R^T) * s`` in torch layout.

Identity at t=0: A = 0 and s = 1 (PEFT's init), so every ``Q - I`` and ``s - 1`` is an exact zero.

Runtime alpha scales every generator, ``S -> alpha S``, and raises the scale to ``s ** alpha``
(:func:`lora_jax.rotations.gate_power`, IA3's rule); for alpha < 0 the factors apply in the
reverse order. Since ``Q(-S) = Q(S)^T = Q(S)^-1``, alpha = -1 gives ``R^T = R^-1`` and
``1 / s``: the exact inverse, also for m > 1, where the reversed order is what makes it
one. alpha = 0 is the base bit for bit. One alpha per row builds each row's blocks (the
Cayley map is not polynomial in alpha: ``rows x m x n`` solves of ``b x b``). Not
implemented: ``boft_dropout`` (PEFT's multiplicative dropout, training only: dropped on
import) and Conv2d layers. PEFT without its CUDA extension runs ``m = 1`` whatever the
config says (and saves one factor); import takes ``m`` from the ``boft_R`` tensor.
Checked against ``peft.tuners.boft.layer.Linear`` (tests/test_boft.py).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from lora_jax import shardings
from lora_jax.adapter import Adapter, AdapterParam, Target, VariantConfig
from lora_jax.peft_codec import PeftCodec, PeftFormatError, variant_config
from lora_jax.rotations import gate_power
from lora_jax.validation import is_int
from lora_jax.variants.oft import in_from_matrix


def butterfly_permutation(d_in: int, block: int, k: int) -> np.ndarray:
    """``perm`` of factor ``k`` counted from 0 (``P[i, perm[i]] = 1``): in chunks of ``block 2^k``
    features, the half-blocks in the order 0, 2, 4, ..., 1, 3, 5, ...; the identity for k = 0."""
    if k == 0:
        return np.arange(d_in)
    half = block // 2
    return np.arange(d_in).reshape(-1, 2**k, 2, half).transpose(0, 2, 1, 3).reshape(-1)


@jax.jit  # one compile, not one per primitive of the solve, when run eagerly
def cayley_minus_identity(a: Float[Array, "*lead b b"], alpha: Array) -> Float[Array, "*lead b b"]:
    """``Q - I = -2 S (I + S)^-1`` (S and ``(I + S)^-1`` commute) for ``S = alpha (A - A^T) / 2``,
    solved in at least float32 (LAPACK has no bfloat16) and returned in ``a``'s dtype."""
    s = (alpha * (0.5 * (a - jnp.swapaxes(a, -1, -2)))).astype(jnp.promote_types(a.dtype, jnp.float32))
    eye = jnp.broadcast_to(jnp.eye(a.shape[-1], dtype=s.dtype), s.shape)
    return jnp.linalg.solve(eye + s, -2.0 * s).astype(a.dtype)


@functools.partial(jax.jit, static_argnames="reverse")
def butterfly_product(
    h: Float[Array, "*rows d_in"], q: Float[Array, "*rows m n b b"], *, reverse: bool
) -> Float[Array, "*rows d_in"]:
    """``h B_m ... B_1`` (``B_1 ... B_m`` with ``reverse``) from the blocks ``q = Q - I``,
    whose leading axes broadcast against h's; each factor adds ``h P_k (Q_k - I) P_k^T``."""
    m, n, b = q.shape[-4], q.shape[-3], q.shape[-1]
    for k in range(m) if reverse else range(m - 1, -1, -1):
        perm = butterfly_permutation(n * b, b, k)
        g = h if k == 0 else jnp.take(h, np.argsort(perm), axis=-1)  # h P_k
        g = shardings.reshape(g, (*g.shape[:-1], n, b))
        d = jnp.einsum("...xy,...xyz->...xz", g, q[..., k, :, :, :])
        d = shardings.reshape(d, (*d.shape[:-2], n * b))
        h = h + (d if k == 0 else jnp.take(d, perm, axis=-1))  # (...) P_k^T
    return h


@functools.partial(jax.jit, static_argnames="batch_axes")
def rotate(
    a: Float[Array, "*batch m n b b"], h: Float[Array, "*batch *free d_in"], alpha: Array, *, batch_axes: int
) -> Float[Array, "*batch *free d_in"]:
    """``h R(alpha)`` for the stored matrices ``a``; ``alpha`` a scalar or one per row of h
    (``(*batch, *free, 1)``, ones but on the row axis); the first ``batch_axes`` are the kernel's."""
    a = a.reshape(*a.shape[:batch_axes], *(1,) * (h.ndim - batch_axes - 1), *a.shape[batch_axes:])  # over rows
    q = cayley_minus_identity(a, alpha if alpha.ndim == 0 else alpha[..., None, None, None])
    if q.shape[-4] == 1:
        return butterfly_product(h, q, reverse=False)
    run = functools.partial(butterfly_product, h, q)  # R(alpha < 0) = B_1 ... B_m
    if alpha.ndim == 0:
        return jax.lax.cond(alpha < 0, lambda: run(reverse=True), lambda: run(reverse=False))
    return jnp.where(alpha < 0, run(reverse=True), run(reverse=False))


@jax.jit
def scale_delta(y: Array, scale: Array, bias: Array | None, alpha: Array) -> Array:
    """``(y - bias)(scale ** alpha - 1)``: the change of scaling ``y`` without its bias, an
    exact zero where ``scale ** alpha`` is 1 (all arguments broadcast to y's layout)."""
    return (y if bias is None else y - bias) * (gate_power(scale, alpha) - 1.0)


# -- PEFT's format: peft_type BOFT, boft_R (m, n, b, b) as ours, boft_s (d_out, 1) -------
def boft_to_peft(adapter: BOFT) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Alpha scales the generators and powers the scale; PEFT's factor order is fixed, so a
    negative alpha (reversed order) is written only for one factor."""
    cfg, alpha = adapter.config, float(adapter.scalar_alpha())
    if alpha < 0 and cfg.boft_n_butterfly_factor > 1:
        raise PeftFormatError(
            f"boft: alpha={alpha} applies the {cfg.boft_n_butterfly_factor} butterfly factors in reverse, "
            "an order PEFT's BOFT cannot hold; export at alpha >= 0"
        )
    r, s = np.asarray(adapter.boft_r[...], np.float32), adapter.boft_s[...]
    if alpha != 1.0:
        r, s = r * np.float32(alpha), gate_power(s, jnp.float32(alpha))
    entries = {f: getattr(cfg, f) for f in ("boft_block_size", "boft_block_num", "boft_n_butterfly_factor")}
    return {**entries, "boft_dropout": 0.0}, {"boft_R": r, "boft_s": np.asarray(s, np.float32).reshape(-1, 1)}


def boft_from_peft(cfg: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> tuple[BOFTConfig, dict]:
    """``boft_dropout`` acts in training only and is dropped; the factor count is the tensor's."""
    r, s = tensors["boft_R"], tensors["boft_s"]
    if r.ndim != 4 or r.shape[-1] != r.shape[-2] or s.ndim != 2 or s.shape[1] != 1:
        raise PeftFormatError(f"boft_R {r.shape} / boft_s {s.shape} are not (factors, n, b, b) / (d_out, 1)")
    config = variant_config(
        lambda: BOFTConfig(
            boft_block_size=int(cfg.get("boft_block_size", 4)),
            boft_block_num=int(cfg.get("boft_block_num", 0)),
            boft_n_butterfly_factor=int(r.shape[0]),
        )
    )
    return config, {"boft_r": r, "boft_s": s.reshape(-1)}


@dataclasses.dataclass(frozen=True, kw_only=True)
class BOFTConfig(VariantConfig):
    """Exactly one of ``boft_block_size`` (features per block) and ``boft_block_num`` (blocks
    per layer) is non-zero, as in PEFT; ``boft_n_butterfly_factor`` factors (m >= 1)."""

    name = "boft"
    peft_codec = PeftCodec(
        "BOFT",
        flags={},
        patterns={},
        suffixes=("boft_R", "boft_s"),
        to_peft=boft_to_peft,
        from_peft=boft_from_peft,
        folds_alpha=True,
    )
    boft_block_size: int = 4
    boft_block_num: int = 0
    boft_n_butterfly_factor: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        for field, low in (("boft_block_size", 0), ("boft_block_num", 0), ("boft_n_butterfly_factor", 1)):
            value = getattr(self, field)
            if not is_int(value) or value < low:
                raise ValueError(f"boft: {field}={value!r} must be an integer >= {low}")
        if (self.boft_block_size == 0) == (self.boft_block_num == 0):
            raise ValueError(
                f"boft: boft_block_size={self.boft_block_size} and boft_block_num={self.boft_block_num}: set "
                "exactly one of them (blocks of boft_block_size features, or boft_block_num blocks) and the other to 0"
            )

    def blocks(self, target: Target) -> tuple[int, int]:
        """``(n, b)``: blocks per factor and features per block at ``target``."""
        d_in, want = target.spec.d_in, self.boft_block_size or self.boft_block_num
        what = "boft_block_size" if self.boft_block_size else "boft_block_num"
        if d_in % want:
            options = [k for k in range(1, min(d_in, 256) + 1) if d_in % k == 0]
            raise ValueError(
                f"boft: {what}={want} does not divide d_in={d_in} at {target.path!r}; pick one of {options}"
            )
        n, b = (d_in // want, want) if self.boft_block_size else (want, d_in // want)
        span = 2 ** (self.boft_n_butterfly_factor - 1)
        if span > 1 and (b % 2 or n % span):
            raise ValueError(
                f"boft: boft_n_butterfly_factor={self.boft_n_butterfly_factor} at {target.path!r} (d_in={d_in}) needs "
                f"an even block size and a block count divisible by {span}; got {n} blocks of {b}. Lower the "
                f"factor, or pick a block size that times {span} divides d_in"
            )
        return n, b

    def build(self, target: Target, *, seed: int) -> BOFT:
        return BOFT(target, self, *self.blocks(target))


class BOFT(Adapter):
    def __init__(self, target: Target, config: BOFTConfig, n: int, b: int):
        super().__init__(target, config)
        spec, m = target.spec, config.boft_n_butterfly_factor
        self.boft_r = self.variable(AdapterParam, jnp.zeros((*spec.batch_shape, m, n, b, b), self.dtype), "----")
        self.boft_s = self.variable(AdapterParam, jnp.ones((*spec.batch_shape, spec.d_out), self.dtype), "o")

    def rotate(self, h: Float[Array, "*batch *free d_in"], alpha: Array) -> Float[Array, "*batch *free d_in"]:
        """``h R(alpha)``; ``alpha`` a scalar or ``(*batch, *free, 1)`` (one per row)."""
        return rotate(self.boft_r[...], h, alpha, batch_axes=len(self.spec.batch_shape))

    def forward(self, x: Array, call_base: Callable[[Array], Array]) -> Array:
        # Both changes are computed in the adapter's dtype and added in the layer's, so a
        # zero change leaves x and y bit for bit whatever the two dtypes are.
        spec = self.spec
        h = spec.in_to_matrix(x.astype(self.dtype))
        delta = self.rotate(h, self.alpha_for("hidden", x.ndim)) - h
        y = call_base(x + in_from_matrix(spec, delta, x.ndim).astype(x.dtype))
        scale = spec.out_broadcast(self.boft_s[...], x.ndim, like=y)
        bias = None
        if self.info.bias is not None:
            bias = spec.bias_to_matrix(getattr(self.base, self.info.bias)[...]).astype(self.dtype)
            bias = spec.out_broadcast(bias, x.ndim, like=y)
        return y + scale_delta(y.astype(self.dtype), scale, bias, self.alpha_for("out", x.ndim)).astype(y.dtype)

    def merged(self, kernel, bias):
        alpha, d_in = self.scalar_alpha(), self.spec.d_in
        eye = jnp.broadcast_to(jnp.eye(d_in, dtype=self.dtype), (*self.spec.batch_shape, d_in, d_in))
        # R - I whole on every device (a one-off d_in x d_in, as OFT's merge); rows are e_i R
        rotated = kernel + shardings.einsum("...ec,...co->...eo", self.rotate(eye, alpha) - eye, kernel)
        return rotated * gate_power(self.boft_s[...], alpha)[..., None, :], bias
