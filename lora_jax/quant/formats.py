"""Storage formats for a frozen quantized kernel: pure array math, no NNX.

Every format quantizes the kernel's matrix view ``(*batch, d_in, d_out)``
(:meth:`lora_jax.views.EinsumSpec.kernel_to_matrix`) in groups of ``group_size``
consecutive rows of ``d_in`` (one group per output column: ``group_size=None`` is one
group over all of ``d_in``, i.e. per output channel):

- :class:`Int8`: symmetric, ``w = scale * q``, ``q`` int8 in [-127, 127],
  ``scale = absmax / 127``; per output channel by default.
- :class:`Int4`: ``q`` 4-bit. Asymmetric (default, llama.cpp's Q4_1):
  ``w = scale * q + offset``, ``q`` uint4 in [0, 15], ``scale = (max - min) / 15``,
  ``offset = min``; symmetric: ``w = scale * q``, ``q`` int4 in [-7, 7].
  Group 32 with float16 scales is Q4_1's block exactly (5 bits per weight).
- :class:`NF4`: QLoRA's 4-bit NormalFloat (Dettmers et al. 2023,
  https://arxiv.org/abs/2305.14314): ``w = absmax * CODEBOOK[q]``, ``q`` uint4 the
  nearest of 16 quantiles of a standard normal scaled into [-1, 1]; group 64 as QLoRA
  (no double quantization of the scales: +0.5 bit per weight in float32).

Codes are stored in JAX's native ``int8`` / ``int4`` / ``uint4`` dtypes: XLA packs the
4-bit ones two per byte (a compiled step's argument bytes are half an int8's; see
``benchmarks/quant_memory.py``). Dequantization computes in float32 and casts once.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

__all__ = ["NF4_CODEBOOK", "QuantFormat", "Int8", "Int4", "NF4", "Quantized", "quantization_error"]

# The 16 NF4 levels: normal quantiles, 8 positive and 7 negative plus an exact zero,
# scaled so the extremes are +-1 (QLoRA appendix E; tests check them against the definition).
NF4_CODEBOOK = np.array(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    np.float32,
)  # fmt: skip


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Quantized:
    """Codes ``(*batch, d_in, d_out)`` and per-group ``scale`` / ``offset`` ``(*batch, groups, d_out)``."""

    codes: Array
    scale: Array
    offset: Array | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantFormat:
    """A storage format; frozen and hashable (it is static config of a layer)."""

    name: ClassVar[str]
    bits: ClassVar[int]
    group_size: int | None = None
    scale_dtype: str = "float32"

    def __post_init__(self) -> None:
        g = self.group_size
        if g is not None and (not isinstance(g, int) or isinstance(g, bool) or g < 1):
            raise ValueError(f"{self.name}: group_size={g!r} must be a positive integer or None (per output channel)")
        if not jnp.issubdtype(jnp.dtype(self.scale_dtype), jnp.floating):
            raise ValueError(f"{self.name}: scale_dtype={self.scale_dtype!r} must be a float dtype name")

    def groups(self, d_in: int) -> int:
        """Groups per output column; raises if ``d_in`` is not a multiple of the group size."""
        g = self.group_size or d_in
        if d_in % g:
            raise ValueError(
                f"{self.name}: d_in={d_in} is not a multiple of group_size={g}; pick a group size that "
                f"divides it (e.g. {math.gcd(d_in, g)}) or exclude the layer"
            )
        return d_in // g

    def bits_per_weight(self, d_in: int) -> float:
        """Storage bits per kernel entry, scales and offsets included."""
        per_group = jnp.dtype(self.scale_dtype).itemsize * 8 * (2 if self.has_offset else 1)
        return self.bits + per_group * self.groups(d_in) / d_in

    @property
    def has_offset(self) -> bool:
        return False

    def _grouped(self, w: Array) -> Array:
        *batch, d_in, d_out = w.shape
        n = self.groups(d_in)
        return w.reshape(*batch, n, d_in // n, d_out)

    def quantize(self, w: Float[Array, "*batch d_in d_out"]) -> Quantized:
        """``w`` (any float dtype; math in float32) to codes and group scales."""
        raise NotImplementedError

    def dequantize(self, q: Quantized, dtype) -> Float[Array, "*batch d_in d_out"]:
        """The float kernel the codes stand for, computed in float32 and cast to ``dtype``."""
        raise NotImplementedError

    def _expand(self, v: Array, codes: Array) -> Array:
        """A per-group ``(*batch, groups, d_out)`` value against the grouped codes."""
        return v.astype(jnp.float32)[..., :, None, :]


def _safe(scale: Array) -> Array:
    """A zero scale (an all-zero group) becomes 1: its codes are then 0 and dequantize to 0."""
    return jnp.where(scale > 0, scale, jnp.ones_like(scale))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Int8(QuantFormat):
    """Symmetric int8, per output channel by default (``group_size=None``)."""

    name = "int8"
    bits = 8

    def quantize(self, w):
        g = self._grouped(w.astype(jnp.float32))
        scale = (jnp.max(jnp.abs(g), axis=-2) / 127.0).astype(self.scale_dtype)
        s = _safe(scale.astype(jnp.float32))[..., :, None, :]
        codes = jnp.clip(jnp.round(g / s), -127, 127).astype(jnp.int8)
        return Quantized(codes.reshape(w.shape), scale)

    def dequantize(self, q, dtype):
        g = self._grouped(q.codes).astype(jnp.float32)
        return (g * _safe(self._expand(q.scale, g))).reshape(q.codes.shape).astype(dtype)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Int4(QuantFormat):
    """4-bit integers in groups along d_in; asymmetric (Q4_1) by default."""

    name = "int4"
    bits = 4
    group_size: int | None = 32
    scale_dtype: str = "float16"
    symmetric: bool = False

    @property
    def has_offset(self) -> bool:
        return not self.symmetric

    def quantize(self, w):
        g = self._grouped(w.astype(jnp.float32))
        if self.symmetric:
            scale = (jnp.max(jnp.abs(g), axis=-2) / 7.0).astype(self.scale_dtype)
            s = _safe(scale.astype(jnp.float32))[..., :, None, :]
            codes = jnp.clip(jnp.round(g / s), -7, 7).astype(jnp.int4)
            return Quantized(codes.reshape(w.shape), scale)
        low, high = jnp.min(g, axis=-2), jnp.max(g, axis=-2)
        scale = ((high - low) / 15.0).astype(self.scale_dtype)
        offset = low.astype(self.scale_dtype)
        s = _safe(scale.astype(jnp.float32))[..., :, None, :]
        codes = jnp.clip(jnp.round((g - offset.astype(jnp.float32)[..., :, None, :]) / s), 0, 15)
        return Quantized(codes.astype(jnp.uint4).reshape(w.shape), scale, offset)

    def dequantize(self, q, dtype):
        g = self._grouped(q.codes).astype(jnp.float32)
        out = g * _safe(self._expand(q.scale, g))
        if q.offset is not None:
            out = out + self._expand(q.offset, g)
        return out.reshape(q.codes.shape).astype(dtype)


@dataclasses.dataclass(frozen=True, kw_only=True)
class NF4(QuantFormat):
    """QLoRA's NormalFloat4 with a float32 absmax per group of 64."""

    name = "nf4"
    bits = 4
    group_size: int | None = 64

    def quantize(self, w):
        g = self._grouped(w.astype(jnp.float32))
        scale = jnp.max(jnp.abs(g), axis=-2).astype(self.scale_dtype)
        normed = g / _safe(scale.astype(jnp.float32))[..., :, None, :]
        book = jnp.asarray(NF4_CODEBOOK)
        # nearest level = how many midpoints between neighbouring levels lie below the value
        codes = jnp.searchsorted((book[1:] + book[:-1]) / 2, normed, side="left")
        return Quantized(codes.astype(jnp.uint4).reshape(w.shape), scale)

    def dequantize(self, q, dtype):
        g = self._grouped(q.codes)
        levels = jnp.take(jnp.asarray(NF4_CODEBOOK), g.astype(jnp.int32), axis=0)
        return (levels * _safe(self._expand(q.scale, g))).reshape(q.codes.shape).astype(dtype)


def quantization_error(fmt: QuantFormat, w: Float[Array, "*batch d_in d_out"]) -> float:
    """``||w - deq(quant(w))||_F / ||w||_F`` (float32)."""
    w32 = w.astype(jnp.float32)
    err = fmt.dequantize(fmt.quantize(w32), jnp.float32) - w32
    return float(jnp.linalg.norm(err) / jnp.maximum(jnp.linalg.norm(w32), jnp.finfo(jnp.float32).tiny))
