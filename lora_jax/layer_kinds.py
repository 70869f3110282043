"""Layers that are linear maps of something other than their input: ``nnx.Conv`` and ``nnx.Embed``.

Both still have a matrix view of their kernel, so merge, transforms and checkpoints
treat them like any einsum layer (:mod:`lora_jax.einsum_spec`); only the forward differs:

- ``nnx.Conv``, kernel ``(*window, c_in, c_out)``: the einsum of the kernel with every
  input patch, ``...wi,wio->...o``; the matrix is ``(prod(window) * c_in, c_out)``. A
  low-rank factor ``A (d_in, r)`` is then the kernel of a convolution with ``r`` output
  channels and the base's window, stride, padding and dilation, and ``B (r, c_out)`` a
  1x1 convolution: a matmul over channels (PEFT's Conv LoRA).
- ``nnx.Embed``, table ``(vocab, features)``: the einsum of the table with the one-hot
  of the ids, ``...v,vf->...f``; the matrix is the table. ``A (vocab, r)`` applies as a
  lookup ``A[ids]`` (PEFT's Embedding LoRA).

:func:`describe` is the one place that says whether a module is adaptable and as what.
"""

from __future__ import annotations

import string
import types

import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from lora_jax.views import UnsupportedLayerError, ViewInfo, view_of

__all__ = ["SUPPORTED_TYPES", "conv_factor", "conv_with_kernel", "describe", "lookup", "owns_params", "per_row"]

SUPPORTED_TYPES = (
    "nnx.Linear, nnx.LinearGeneral, nnx.Einsum (any two-operand string), nnx.Conv (1-D/2-D/3-D, "
    "feature_group_count=1, no mask), nnx.Embed, and types added with lora_jax.register_view"
)


def describe(module: nnx.Module) -> ViewInfo | None:
    """The view of ``module`` if it is adaptable, else ``None``; raises
    :class:`~lora_jax.views.UnsupportedLayerError` for a Conv this library cannot adapt.
    A registered view wins over the built-in kinds."""
    info = view_of(module)
    if info is not None:
        return info
    if isinstance(module, nnx.Conv):
        return _conv_view(module)
    if isinstance(module, nnx.Embed):
        return ViewInfo("...v,vf->...f", kernel="embedding", kind="embed")
    return None


def _conv_view(conv: nnx.Conv) -> ViewInfo:
    if conv.feature_group_count != 1:
        # A grouped kernel is block-diagonal over channels: a dense low-rank delta has no
        # place in it, so the adapter could never be merged (PEFT refuses the merge too).
        raise UnsupportedLayerError(
            f"nnx.Conv with feature_group_count={conv.feature_group_count} (a grouped or depthwise "
            "convolution): a low-rank delta over all channels cannot be merged into a grouped kernel"
        )
    if conv.mask is not None:
        raise UnsupportedLayerError("nnx.Conv with a kernel mask: the adapter's delta would ignore the mask")
    window = string.ascii_lowercase[: len(conv.kernel_size)]
    bias = "bias" if conv.bias is not None else None
    return ViewInfo(f"...{window}i,{window}io->...o", bias=bias, kind="conv")


def conv_with_kernel(
    conv: nnx.Conv, x: Float[Array, "*batch *spatial c_in"], kernel: Float[Array, "*window c_in k"]
) -> Float[Array, "*batch *out_spatial k"]:
    """``conv``'s convolution of ``x`` (its stride, padding mode, dilations and batch-axis
    handling) with another kernel, no bias, computed in ``kernel``'s dtype.

    It runs ``nnx.Conv.__call__`` itself on a stand-in holding the new kernel, so the
    window arithmetic is flax's and cannot drift from the base layer's.
    """
    fields = dict(vars(conv))
    fields.update(
        kernel=kernel,
        kernel_shape=tuple(kernel.shape),
        out_features=kernel.shape[-1],
        bias=None,
        use_bias=False,
        mask=None,
        dtype=kernel.dtype,
        preferred_element_type=None,
    )
    return nnx.Conv.__call__(types.SimpleNamespace(**fields), x)


def conv_factor(conv_kernel_shape: tuple[int, ...], matrix: Float[Array, "d_in k"]) -> Float[Array, "*window c_in k"]:
    """A ``(prod(window) * c_in, k)`` factor as a convolution kernel ``(*window, c_in, k)``."""
    return matrix.reshape(*conv_kernel_shape[:-1], matrix.shape[-1])


def lookup(table: Float[Array, "vocab k"], ids: Int[Array, "..."]) -> Float[Array, "... k"]:
    """Rows of ``table`` for ``ids``: the one-hot einsum ``...v,vk->...k`` without the one-hot."""
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"an embedding's input must be integer ids, got dtype {ids.dtype}")
    return jnp.take(table, ids, axis=0)


def owns_params(module: nnx.Module) -> bool:
    """Whether ``module`` holds an ``nnx.Param`` directly (a layer of its own, such as a
    norm), as opposed to a container whose parameters all sit in sub-modules."""
    return any(isinstance(v, nnx.Param) for v in vars(module).values())


def per_row(alpha: Array, ndim: int) -> Array:
    """A scalar alpha as is; one value per row of the input (axis 0) broadcast to ``ndim`` axes."""
    if alpha.ndim == 0:
        return alpha
    if alpha.ndim != 1:
        raise ValueError(f"alpha must be a scalar or one value per input row, got shape {alpha.shape}")
    return alpha.reshape((alpha.shape[0],) + (1,) * (ndim - 1))
