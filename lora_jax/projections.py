"""Activations through adapter factor matrices, with a backward pass chosen for the dots.

Every adapter product is one einsum of an activation with a small factor matrix, in the
layer's own layout (:class:`lora_jax.einsum_spec.EinsumSpec`):

- :func:`project_in`   ``x @ A``    (input layout -> rank space, ``A (*batch, d_in, k)``)
- :func:`project_out`  ``h @ B``    (rank space -> output layout, ``B (*batch, k, d_out)``)
- :func:`project_back` ``h @ A^T``  (rank space -> input layout)

The forward pass is the plain einsum. The backward pass (``custom_vjp=True``) is written
by hand because JAX's own transpose of these einsums contracts the token axes of two
row-major activations (``dA = x^T dh``, ``dB = h^T dy``), which XLA:CPU computes by
copying the big activation into column order or with a slow generic dot. Here the small
rank-space operand (``tokens x k``) is transposed instead, so every backward dot has the
form ``(M, K) @ (K, N)`` with both operands row-major, and ``optimization_barrier``
keeps XLA from folding those small transposes back into the dots
(``benchmarks/bench.py`` times the LoRA train step against qwix's).

A ``custom_vjp`` function supports reverse mode only (``jax.grad``, ``jax.vjp``). With
``custom_vjp=False`` the einsums are differentiated by JAX op by op, so forward mode
(``jax.jvp``, ``jax.jacfwd``, ``jax.hessian``) works too; every variant config carries
this switch (``LoRAConfig(custom_vjp=False)``).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from lora_jax import shardings
from lora_jax.einsum_spec import EinsumSpec

__all__ = ["project_back", "project_in", "project_out"]


@dataclasses.dataclass(frozen=True)
class _Product:
    """``act,factor->out`` with the letter roles the backward pass needs (hashable: static)."""

    act: str
    factor: str
    out: str
    rank: str
    batch: str

    @property
    def free(self) -> str:
        """Token axes: in the activation and the output, not in the factor (summed in dFactor)."""
        return "".join(c for c in self.act if c in self.out and c not in self.factor)


def _pinned_transpose(m: Array, letters: str, order: str) -> Array:
    """``m`` (axes ``letters``) transposed to ``order`` and materialized: the barriers stop
    XLA from folding the transpose into the dot that makes ``m`` or the one that reads it."""
    if letters == order:
        return m
    barrier = jax.lax.optimization_barrier
    return barrier(jnp.transpose(barrier(m), [letters.index(c) for c in order]))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _product(p: _Product, act: Array, factor: Array) -> Array:
    return shardings.einsum(f"{p.act},{p.factor}->{p.out}", act, factor)


def _product_fwd(p: _Product, act: Array, factor: Array) -> tuple[Array, tuple[Array, Array]]:
    return _product(p, act, factor), (act, factor)


def _product_bwd(p: _Product, res: tuple[Array, Array], g: Array) -> tuple[Array, Array]:
    act, factor = res
    # dAct = g @ factor^T: contract the factor letters that are not in the activation,
    # with the factor laid out (batch, contracted, rest) so it is a row-major (K, N).
    contracted = "".join(c for c in p.factor if c not in p.act)
    rest = "".join(c for c in p.factor if c in p.act and c not in p.batch)
    factor_t = p.batch + contracted + rest
    # On Explicit mesh axes each gradient takes the sharding of its primal.
    act_names, factor_names = shardings.explicit_names(act), shardings.explicit_names(factor)
    d_act = shardings.einsum(
        f"{p.out},{factor_t}->{p.act}", g, _pinned_transpose(factor, p.factor, factor_t), act_names
    )
    # dFactor = sum over tokens of (rank-space operand) x (wide operand): the rank-space
    # one (tokens x k, small) is transposed to (batch, k, tokens); the wide one is read as is.
    small, small_letters, wide, wide_letters = (g, p.out, act, p.act) if p.rank in p.out else (act, p.act, g, p.out)
    small_t = p.batch + p.rank + p.free
    dense = "".join(c for c in p.factor if c not in p.batch + p.rank)
    d_letters = p.batch + p.rank + dense
    d_names = None if factor_names is None else tuple(factor_names[p.factor.index(c)] for c in d_letters)
    d_factor = shardings.einsum(
        f"{small_t},{wide_letters}->{d_letters}", _pinned_transpose(small, small_letters, small_t), wide, d_names
    )
    d_factor = _pinned_transpose(d_factor, d_letters, p.factor)
    return d_act.astype(act.dtype), d_factor.astype(factor.dtype)


_product.defvjp(_product_fwd, _product_bwd)


def _project(spec: EinsumSpec, ndim: int, act: Array, matrix: Array, side: str, src: str, dst: str, custom_vjp: bool):
    """``act`` (layout ``src`` of ``spec.layout(ndim)``) times the ``side`` factor, into ``dst``."""
    lay = spec.layout(ndim)
    factor, letters = spec.factor_view(matrix, lay.rank, side)
    p = _Product(getattr(lay, src), letters, getattr(lay, dst), lay.rank, spec.batch)
    if custom_vjp:
        return _product(p, act, factor)
    return shardings.einsum(f"{p.act},{p.factor}->{p.out}", act, factor)


def project_in(spec: EinsumSpec, x: Array, matrix: Float[Array, "*batch d_in k"], *, custom_vjp: bool = True) -> Array:
    """``x @ matrix`` per kernel-batch index, in the rank-space ``hidden`` layout."""
    return _project(spec, x.ndim, x, matrix, "in", "lhs", "hidden", custom_vjp)


def project_out(
    spec: EinsumSpec, h: Array, matrix: Float[Array, "*batch k d_out"], ndim: int, *, custom_vjp: bool = True
) -> Array:
    """``h @ matrix`` into the layer's output layout (``ndim`` is the layer input's)."""
    return _project(spec, ndim, h, matrix, "out", "hidden", "out", custom_vjp)


def project_back(
    spec: EinsumSpec, h: Array, matrix: Float[Array, "*batch d_in k"], ndim: int, *, custom_vjp: bool = True
) -> Array:
    """``h @ matrix^T`` back into the layer's input layout."""
    return _project(spec, ndim, h, matrix, "in", "hidden", "lhs", custom_vjp)
