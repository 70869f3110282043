"""The einsum algebra of a linear-like layer: its kernel seen as a batch of ``(d_in, d_out)`` matrices.

Every supported layer is the einsum ``lhs,kernel->out``. Each kernel axis is

- *contracted*: in ``lhs`` and ``kernel``, not in ``out`` (together they make ``d_in``);
- *output*: in ``kernel`` and ``out``, not in ``lhs`` (together ``d_out``);
- *kernel-batch*: in all three (MoE experts, per-head weights): one matrix per index.

``lhs`` axes that are not in the kernel ("free": tokens, rows) must reach ``out``
unchanged; an axis that is summed away entirely is not a per-row linear map and is
rejected. The matrix view of the kernel is
``kernel.transpose(batch + contracted + output).reshape(*batch, d_in, d_out)``; adapter
factors are stored in that matrix form and reshaped (free in XLA) to the kernel's axes
inside one einsum (:mod:`lora_jax.projections`), so the activations are never
transposed for the adapter.

This module knows equations and shapes only, no module types: which layers have an
equation, and where their kernel sits, is :mod:`lora_jax.views`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import string

import jax.numpy as jnp
from jaxtyping import Array, Float

from lora_jax import shardings

__all__ = ["EinsumSpec", "Layout", "UnsupportedLayerError"]


class UnsupportedLayerError(ValueError):
    """The layer cannot be seen as a linear map ``(..., d_in) -> (..., d_out)``."""


def _dedupe_check(name: str, letters: str, equation: str) -> None:
    if len(set(letters)) != len(letters):
        raise UnsupportedLayerError(
            f"einsum {equation!r}: the {name} operand repeats an axis letter (a diagonal "
            "or trace); only plain contractions can be adapted"
        )


@dataclasses.dataclass(frozen=True)
class Layout:
    """The einsum strings of one call, with any ``...`` expanded for the input's ndim."""

    lhs: str
    out: str
    free: str  # lhs axes that are not kernel axes, in lhs order
    hidden: str  # layout of the rank-space activations: batch + free + rank letter
    rank: str  # the rank-axis letter


@dataclasses.dataclass(frozen=True)
class EinsumSpec:
    """Static description of one linear-like layer; hashable so it can live in a graphdef.

    ``lhs`` and ``out`` may hold one ``...`` (expanded per call); ``kernel`` may not.
    """

    equation: str
    kernel_shape: tuple[int, ...]

    def __post_init__(self) -> None:
        eq = self.equation.replace(" ", "")
        object.__setattr__(self, "equation", eq)
        if eq.count("->") != 1 or eq.split("->")[0].count(",") != 1:
            raise UnsupportedLayerError(
                f"einsum {eq!r} must be explicit with exactly two operands, like 'BTD,DNH->BTNH'"
            )
        lhs, kernel, out = self.lhs, self.kernel, self.out
        if "." in kernel:
            raise UnsupportedLayerError(f"einsum {eq!r}: '...' in the kernel operand is not supported")
        if ("..." in lhs) != ("..." in out):
            raise UnsupportedLayerError(f"einsum {eq!r}: '...' must appear in both input and output")
        for name, letters in (
            ("input", lhs.replace("...", "")),
            ("kernel", kernel),
            ("output", out.replace("...", "")),
        ):
            _dedupe_check(name, letters, eq)
            if not all(c in string.ascii_letters for c in letters):
                raise UnsupportedLayerError(f"einsum {eq!r}: axis names must be ASCII letters")
        if len(kernel) != len(self.kernel_shape):
            raise UnsupportedLayerError(
                f"einsum {eq!r}: kernel operand has {len(kernel)} axes but the kernel shape is {self.kernel_shape}"
            )
        for c in kernel:
            if c not in lhs and c not in out:
                raise UnsupportedLayerError(
                    f"einsum {eq!r}: kernel axis {c!r} is summed away inside the kernel, so the "
                    "layer is not a matrix product; fold that axis into the kernel first"
                )
        for c in lhs.replace("...", ""):
            if c not in kernel and c not in out:
                raise UnsupportedLayerError(
                    f"einsum {eq!r}: input axis {c!r} is summed away without the kernel, so the "
                    "output is not a per-row linear map of the input and cannot be adapted"
                )
        for c in out.replace("...", ""):
            if c not in kernel and c not in lhs:
                raise UnsupportedLayerError(f"einsum {eq!r}: output axis {c!r} comes from neither operand")

    # -- the letters ------------------------------------------------------------------
    @property
    def lhs(self) -> str:
        return self.equation.split("->")[0].split(",")[0]

    @property
    def kernel(self) -> str:
        return self.equation.split("->")[0].split(",")[1]

    @property
    def out(self) -> str:
        return self.equation.split("->")[1]

    @property
    def batch(self) -> str:
        return "".join(c for c in self.kernel if c in self.lhs and c in self.out)

    @property
    def contracted(self) -> str:
        return "".join(c for c in self.kernel if c in self.lhs and c not in self.out)

    @property
    def output(self) -> str:
        return "".join(c for c in self.kernel if c not in self.lhs)

    def _sizes(self, letters: str) -> tuple[int, ...]:
        return tuple(self.kernel_shape[self.kernel.index(c)] for c in letters)

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return self._sizes(self.batch)

    @property
    def d_in(self) -> int:
        return math.prod(self._sizes(self.contracted))

    @property
    def d_out(self) -> int:
        return math.prod(self._sizes(self.output))

    @functools.lru_cache(maxsize=32)  # noqa: B019 - specs are few, immutable and long-lived
    def layout(self, ndim: int) -> Layout:
        """Expand ``...`` for an input of ``ndim`` axes and name the rank axis."""
        lhs, out = self.lhs, self.out
        used = set(lhs + self.kernel + out) - {"."}
        spare = [c for c in string.ascii_letters if c not in used]
        if "..." in lhs:
            n_ellipsis = ndim - (len(lhs) - 3)
            if n_ellipsis < 0:
                raise ValueError(f"einsum {self.equation!r} needs an input of at least {len(lhs) - 3} axes, got {ndim}")
            fill = "".join(spare[:n_ellipsis])
            spare = spare[n_ellipsis:]
            lhs, out = lhs.replace("...", fill), out.replace("...", fill)
        elif len(lhs) != ndim:
            raise ValueError(f"einsum {self.equation!r} expects an input of {len(lhs)} axes, got {ndim}")
        free = "".join(c for c in lhs if c not in self.kernel)
        return Layout(lhs, out, free, self.batch + free + spare[0], spare[0])

    # -- kernel and bias as matrices ----------------------------------------------------
    def kernel_to_matrix(self, kernel: Array) -> Float[Array, "*batch d_in d_out"]:
        order = self.batch + self.contracted + self.output
        matrix = jnp.transpose(kernel, [self.kernel.index(c) for c in order])
        return shardings.reshape(matrix, (*self.batch_shape, self.d_in, self.d_out))

    def kernel_from_matrix(self, matrix: Float[Array, "*batch d_in d_out"]) -> Array:
        order = self.batch + self.contracted + self.output
        split = shardings.reshape(matrix, self._sizes(order))
        return jnp.transpose(split, [order.index(c) for c in self.kernel])

    @property
    def _bias_letters(self) -> str:
        """Kernel axes that reach the output, in output order: the layout of every bias."""
        return "".join(c for c in self.out if c in self.kernel)

    def bias_to_matrix(self, bias: Array) -> Float[Array, "*batch d_out"]:
        letters = self._bias_letters
        split = shardings.reshape(bias, self._sizes(letters))
        order = self.batch + self.output
        moved = jnp.transpose(split, [letters.index(c) for c in order])
        return shardings.reshape(moved, (*self.batch_shape, self.d_out))

    def bias_from_matrix(self, matrix: Float[Array, "*batch d_out"], bias_shape: tuple[int, ...]) -> Array:
        order, letters = self.batch + self.output, self._bias_letters
        split = shardings.reshape(matrix, self._sizes(order))
        return shardings.reshape(jnp.transpose(split, [order.index(c) for c in letters]), bias_shape)

    # -- factor matrices in the kernel's own layout (lora_jax.projections uses these) ------
    def factor_view(self, matrix: Array, rank: str, side: str) -> tuple[Array, str]:
        """A ``(*batch, d_in, k)`` (``side="in"``) or ``(*batch, k, d_out)`` (``"out"``)
        factor reshaped to kernel axes, free in XLA, and its einsum letters (``rank``
        names the k axis)."""
        if side == "in":
            shape = (*self.batch_shape, *self._sizes(self.contracted), matrix.shape[-1])
            return shardings.reshape(matrix, shape), self.batch + self.contracted + rank
        shape = (*self.batch_shape, matrix.shape[-2], *self._sizes(self.output))
        return shardings.reshape(matrix, shape), self.batch + rank + self.output

    def _broadcast(self, v: Array, letters: str, sizes: tuple[int, ...], target: str) -> Array:
        """Reshape ``v`` (axes ``letters``) so it broadcasts against layout ``target``."""
        split = shardings.reshape(v, sizes)
        present = [c for c in target if c in letters]
        moved = jnp.transpose(split, [letters.index(c) for c in present])
        return shardings.reshape(moved, [split.shape[letters.index(c)] if c in letters else 1 for c in target])

    # ``like``: the activation the result multiplies; on Explicit mesh axes the result
    # takes its sharding (:func:`lora_jax.shardings.like`).
    def in_broadcast(self, v: Float[Array, "*batch d_in"], ndim: int, like: Array | None = None) -> Array:
        letters = self.batch + self.contracted
        out = self._broadcast(v, letters, self._sizes(letters), self.layout(ndim).lhs)
        return out if like is None else shardings.like(out, like)

    def out_broadcast(self, v: Float[Array, "*batch d_out"], ndim: int, like: Array | None = None) -> Array:
        letters = self.batch + self.output
        out = self._broadcast(v, letters, self._sizes(letters), self.layout(ndim).out)
        return out if like is None else shardings.like(out, like)

    def rank_broadcast(self, v: Float[Array, "*batch k"], ndim: int) -> Array:
        lay = self.layout(ndim)
        letters = self.batch + lay.rank
        return self._broadcast(v, letters, (*self.batch_shape, v.shape[-1]), lay.hidden)

    def in_to_matrix(self, x: Array) -> Float[Array, "*batch *free d_in"]:
        """Input layout -> ``(*batch, *free, d_in)``: the rows each kernel matrix sees."""
        lay = self.layout(x.ndim)
        order = self.batch + lay.free + self.contracted
        moved = jnp.transpose(x, [lay.lhs.index(c) for c in order])
        return shardings.reshape(moved, (*moved.shape[: len(self.batch) + len(lay.free)], self.d_in))

    def out_to_matrix(self, y: Array, ndim: int) -> Float[Array, "*batch rows d_out"]:
        """Output layout -> ``(*batch, *free, d_out)`` (a transpose where the layout needs one)."""
        lay = self.layout(ndim)
        order = self.batch + lay.free + self.output
        moved = jnp.transpose(y, [lay.out.index(c) for c in order])
        return shardings.reshape(moved, (*moved.shape[: len(self.batch) + len(lay.free)], self.d_out))

    def out_from_matrix(self, m: Array, ndim: int) -> Array:
        lay = self.layout(ndim)
        order = self.batch + lay.free + self.output
        split = shardings.reshape(m, (*m.shape[:-1], *self._sizes(self.output)))
        return jnp.transpose(split, [order.index(c) for c in lay.out])

    def rows(self, a: Float[Array, " rows"], target: str, ndim: int) -> Array:
        """Broadcast one value per input row (axis 0 of the input) to a layout.

        ``target`` is ``"out"`` or ``"hidden"``.
        """
        lay = self.layout(ndim)
        row = lay.lhs[0]
        if row in self.kernel:
            raise ValueError(
                f"einsum {self.equation!r}: the input's first axis {row!r} is a kernel axis, "
                "so a per-row alpha has no rows to act on; use a scalar alpha"
            )
        layout = lay.out if target == "out" else lay.hidden
        return shardings.reshape(a, [a.shape[0] if c == row else 1 for c in layout])
