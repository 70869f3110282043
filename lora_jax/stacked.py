"""Stacked layers: one module holding every layer's kernel on a leading layer axis.

Models written the MaxText / flax "scan over layers" way build their blocks once with
``nnx.vmap`` (every Variable gains a leading axis of size L) and run them with
``nnx.scan`` over that axis, so the compiled program holds one block, not L::

    @nnx.split_rngs(splits=L)
    @nnx.vmap(in_axes=0, out_axes=0)
    def make(rngs): return Block(rngs)            # block.mlp.up.kernel: (L, d_in, d_out)

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def body(x, block): return block(x)           # the body sees one layer's slice

**Detection.** A layer's view (:func:`lora_jax.views.view_of`) comes from its static
config: the einsum it computes, whose kernel operand names one letter per kernel axis
(``nnx.Linear``: ``io``). A kernel holding more axes than that is stacked, and the extra
axes are leading (``nnx.vmap(out_axes=0)`` puts them there). This needs no option from
the user and no sharding metadata, and it cannot mistake an MoE expert axis for a layer
axis (experts are a letter of the einsum). Only one stack axis is supported. A
registered view must therefore derive its equation from static config, not from the
kernel's shape.

**Building.** The adapter of a stacked layer is built per layer with ``nnx.vmap`` over
the layer's slices, so data-dependent inits (PiSSA's SVD, AntiPaSTO's bases) run on each
layer's own kernel and every Variable of the adapter gets the same leading axis: the
user's ``nnx.scan`` then hands the body one layer's adapter with one layer's kernel,
unchanged code, nothing unrolled. Random inits fold the layer index into the key, so
layers start different. When the kernel carries ``out_sharding`` names, the vmap strips
and re-adds the stack axis's name (``transform_metadata``) so the adapter's sharding is
derived per slice as for an unstacked layer.

**layers=.** The stack is one array, so a rule's ``layers=`` (stack indices here) cannot
leave some layers without an adapter. Every stacked adapter holds a :class:`LayerMask`
(1 for selected layers, 0 for the others) and its alpha is stored as ``alpha * mask``, one
value per layer (``(L,)``, or ``(L, rows)`` for a per-row alpha). A non-selected layer
thus runs at alpha 0, which every variant guarantees is the base layer bit for bit;
``set_alpha`` (model or state form) keeps the mask, merge keeps those layers' kernels
untouched. The mask is adapter state, so checkpoints restore it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from lora_jax.adapter import Adapter, AdapterState, Target, VariantConfig
from lora_jax.einsum_spec import EinsumSpec, UnsupportedLayerError
from lora_jax.ragged import build_adapter
from lora_jax.views import ViewInfo

__all__ = ["LayerMask", "StackedTarget", "stack_depth", "stacked_target", "build", "alpha_value", "merged_arrays"]


class LayerMask(AdapterState):
    """Per layer of a stacked adapter: 1 where a rule selected the layer, else 0."""


@dataclasses.dataclass(frozen=True)
class StackedTarget(Target):
    """A layer stacked ``size`` times on a leading axis; ``spec`` describes one slice."""

    size: int = 0


@dataclasses.dataclass(frozen=True)
class _SliceTarget(Target):
    """One layer of a stack, as a variant's ``build`` sees it inside ``nnx.vmap``."""

    index: Any = None  # the traced layer index

    def key(self, seed: int) -> jax.Array:
        return jax.random.fold_in(super().key(seed), self.index)


def _kernel_letters(info: ViewInfo) -> str:
    return info.equation.replace(" ", "").split("->")[0].split(",")[1]


def stack_depth(module: nnx.Module, info: ViewInfo) -> int:
    """How many leading kernel axes the view's equation does not name (0: not stacked).
    Conv and Embed views describe their own kernels whole: never stacked."""
    kernel = getattr(module, info.kernel)
    if info.kind != "einsum" or not hasattr(kernel, "ndim"):  # opaque containers: the variant names them
        return 0
    return max(0, kernel.ndim - len(_kernel_letters(info)))


def stacked_target(path: str, module: nnx.Module, info: ViewInfo) -> StackedTarget:
    shape = tuple(getattr(module, info.kernel).shape)
    depth = stack_depth(module, info)
    if depth != 1:
        raise UnsupportedLayerError(
            f"kernel of shape {shape} has {depth} axes more than its einsum {info.equation!r} names; "
            "one leading layer axis (nnx.vmap'ed blocks) is supported, not nested stacks"
        )
    return StackedTarget(path, module, info, EinsumSpec(info.equation, shape[1:]), size=shape[0])


def _mask(size: int, layers: tuple[int, ...] | None) -> Float[Array, " L"]:
    return jnp.asarray([1.0 if layers is None or i in layers else 0.0 for i in range(size)], jnp.float32)


def build(target: StackedTarget, variant: VariantConfig, *, seed: int, layers: tuple[int, ...] | None) -> Adapter:
    """The adapter of a stacked layer: ``variant.build`` per slice under ``nnx.vmap``."""
    kernel = getattr(target.module, target.info.kernel)
    names = kernel.get_metadata().get("out_sharding")
    vmap_options: dict[str, Any] = {}
    if names is not None:
        vmap_options["transform_metadata"] = {nnx.PARTITION_NAME: next(iter(names))}

    def one(module: nnx.Module, index: jax.Array) -> Adapter:
        spec = EinsumSpec(target.info.equation, tuple(getattr(module, target.info.kernel).shape))
        one_layer = _SliceTarget(target.path, module, target.info, spec, index=index, shared=target.shared)
        return build_adapter(one_layer, variant, seed=seed)

    adapter = nnx.vmap(one, in_axes=(0, 0), out_axes=0, **vmap_options)(target.module, jnp.arange(target.size))
    mask = _mask(target.size, layers)
    adapter.alpha.value = adapter.alpha[...] * mask
    adapter.layer_mask = LayerMask(mask)
    return adapter


def layer_mask(adapter: Adapter) -> Float[Array, " L"] | None:
    """The adapter's :class:`LayerMask` values, or None for an adapter that is not stacked."""
    mask = vars(adapter).get("layer_mask")
    return mask[...] if isinstance(mask, LayerMask) else None


def alpha_value(value: Float[Array, "*rows"], mask: Float[Array, " L"] | None) -> Float[Array, "*L_rows"]:
    """The stored alpha for ``value`` (a scalar or one per row): itself, or for a stacked
    adapter one copy per layer times the mask (``(L,)`` or ``(L, rows)``)."""
    if mask is None:
        return value
    return mask.reshape(-1, *([1] * value.ndim)).astype(value.dtype) * value.reshape(1, *value.shape)


def _merged_one(adapter: Adapter) -> tuple[Array, Array | None]:
    spec, info, base = adapter.spec, adapter.info, adapter.base
    kernel_var = getattr(base, info.kernel)
    bias_var = getattr(base, info.bias) if info.bias else None
    kernel = spec.kernel_to_matrix(adapter.base_kernel("to merge")).astype(adapter.dtype)
    bias = None if bias_var is None else spec.bias_to_matrix(bias_var[...]).astype(adapter.dtype)
    new_kernel, new_bias = adapter.merged(kernel, bias)
    new_kernel = spec.kernel_from_matrix(new_kernel).astype(kernel_var.dtype)
    if bias_var is None:
        return new_kernel, None
    return new_kernel, spec.bias_from_matrix(new_bias, bias_var.shape).astype(bias_var.dtype)


def merged_arrays(adapter: Adapter) -> tuple[Float[Array, "*kernel"], Float[Array, "*bias"] | None]:
    """The layer's kernel (and bias, or None) with the adapter folded in at its alpha, in
    the kernel's own layout and dtype. A stacked adapter folds slice by slice
    (``jax.vmap``); layers its mask leaves out keep their kernel bit for bit."""
    mask = layer_mask(adapter)
    if mask is None:
        return _merged_one(adapter)
    graphdef, state = nnx.split(adapter)
    kernel, bias = jax.vmap(lambda s: _merged_one(nnx.merge(graphdef, s)))(state)
    base = adapter.base

    def keep_unselected(new: Array, old: Array) -> Array:
        return jnp.where(mask.reshape(-1, *([1] * (old.ndim - 1))) > 0, new, old)

    kernel = keep_unselected(kernel, adapter.base_kernel("to merge"))
    if bias is not None:
        bias = keep_unselected(bias, getattr(base, adapter.info.bias)[...])
    return kernel, bias
