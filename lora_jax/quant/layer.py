"""A linear-like layer whose frozen kernel is stored quantized and dequantized on the fly.

    qmodel = quantize(model, Int4())                      # or Int8(), NF4(group_size=64)
    lmodel = apply_adapters(qmodel, cfg)                  # any variant, unchanged
    optimizer = nnx.Optimizer(lmodel, tx, wrt=AdapterParam)

:func:`quantize` replaces every selected layer that has an einsum view (``nnx.Linear``,
``nnx.LinearGeneral``, ``nnx.Einsum``, registered types) by a :class:`QuantizedLayer`
holding the codes and group scales (:class:`QuantizedWeight`, not a ``Param``: never
trained, never in an adapter checkpoint) and the layer's bias unchanged. Its forward
rebuilds the ORIGINAL layer (its graphdef is kept as static config) around the
dequantized kernel and calls it, so dtype promotion, precision and bias handling are the
original layer's own, and a layer whose kernel is already on the format's grid computes
exactly what the float layer computes.

The layer is registered as a view with the original equation; its ``kernel`` attribute
is a :class:`DequantizedKernel`: ``kernel[...]`` is the dequantized float kernel, so
variants whose init reads the weights (PiSSA, OLoRA, DoRA, DeLoRA, AntiPaSTO, EVA's
selection) read the dequantized weights, and every variant's delta sits on top of the
quantized base's output (alpha=0 and init are that base bit for bit). Assigning
``kernel.value = w`` requantizes ``w`` into the layer's format: this is what
``merge_adapters`` does to a quantized base (:mod:`lora_jax.quant.merge` reports the
error it adds, or keeps the merged layer in float).

Not supported: stacked (``nnx.vmap``-built) layers, kernels on Explicit mesh axes,
``nnx.Conv`` / ``nnx.Embed`` (they stay float), double quantization of the scales.
"""

from __future__ import annotations

import functools
import re
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array

from lora_jax.adapter import Adapter
from lora_jax.einsum_spec import EinsumSpec
from lora_jax.layer_kinds import describe
from lora_jax.paths import dotted, replace_module
from lora_jax.quant.formats import QuantFormat, Quantized
from lora_jax.views import ViewInfo, register_view

__all__ = ["DequantizedKernel", "QuantizedLayer", "QuantizedWeight", "dequantize", "quantize", "quantized_layers"]

M = TypeVar("M", bound=nnx.Module)


class QuantizedWeight(nnx.Variable):
    """Frozen quantized storage (codes, scales, offsets): not a Param, not adapter state."""


class DequantizedKernel:
    """What a :class:`QuantizedLayer`'s ``kernel`` attribute reads as: shaped like the
    original kernel; ``[...]`` dequantizes it; setting ``.value`` requantizes."""

    def __init__(self, layer: QuantizedLayer):
        self._layer = layer

    shape = property(lambda self: self._layer.spec.kernel_shape)
    ndim = property(lambda self: len(self._layer.spec.kernel_shape))
    dtype = property(lambda self: jnp.dtype(self._layer.dtype))

    def __getitem__(self, index: Any) -> Array:
        if index is not Ellipsis:
            raise TypeError("a quantized kernel reads whole: use kernel[...]")
        return self._layer.dequantized()

    @property
    def value(self) -> Array:
        return self._layer.dequantized()

    @value.setter
    def value(self, kernel: Array) -> None:
        self._layer.store(kernel)

    def get_metadata(self) -> dict[str, Any]:
        return {}  # no out_sharding: adapters of a quantized layer are laid out plainly

    def __repr__(self) -> str:
        return f"DequantizedKernel({self._layer.fmt}, shape={self.shape}, dtype={self.dtype})"


class QuantizedLayer(nnx.Module):
    """A linear-like layer (``layer_def``: the original's graphdef) over a quantized kernel."""

    def __init__(self, layer: nnx.Module, info: ViewInfo, fmt: QuantFormat, *, codes: Quantized | None = None):
        kernel_var = getattr(layer, info.kernel)
        names = sorted(str(p[0]) for p, _ in nnx.to_flat_state(nnx.state(layer)))
        extra = [n for n in names if n not in (info.kernel, info.bias)]
        if extra or any(len(p) != 1 for p, _ in nnx.to_flat_state(nnx.state(layer))):
            raise ValueError(
                f"quantize: a {type(layer).__name__} holding {names} cannot be quantized; only layers whose "
                f"Variables are the kernel ({info.kernel!r}) and the bias are supported"
            )
        if not jnp.issubdtype(kernel_var.dtype, jnp.floating):
            raise ValueError(f"quantize: the kernel is {kernel_var.dtype}, not a float array (already quantized?)")
        self.layer_def = nnx.graphdef(layer)
        self.equation, self.kernel_name, self.bias_name = info.equation, info.kernel, info.bias
        self.kernel_type = type(kernel_var)
        self.spec = EinsumSpec(info.equation, tuple(kernel_var.shape))
        self.fmt, self.dtype = fmt, jnp.dtype(kernel_var.dtype).name
        self.bias = getattr(layer, info.bias) if info.bias is not None else None
        fmt.groups(self.spec.d_in)  # a group size that does not divide d_in: refused here
        q = codes if codes is not None else _quantize_kernel(self.spec, fmt, kernel_var[...])
        self._check(q)
        self.codes, self.scale = QuantizedWeight(q.codes), QuantizedWeight(q.scale)
        self.offset = None if q.offset is None else QuantizedWeight(q.offset)

    def _check(self, q: Quantized) -> None:
        matrix_shape = (*self.spec.batch_shape, self.spec.d_in, self.spec.d_out)
        if tuple(q.codes.shape) != matrix_shape or (q.offset is None) != (not self.fmt.has_offset):
            raise ValueError(f"quantize: codes of shape {q.codes.shape} for {self.fmt}, expected {matrix_shape}")

    def set_codes(self, q: Quantized) -> None:
        """Replace the stored codes, scales and offsets (same shapes and format), in place."""
        self._check(q)
        self.codes.value, self.scale.value = q.codes, q.scale
        if self.offset is not None:
            self.offset.value = q.offset

    @property
    def kernel(self) -> DequantizedKernel:
        return DequantizedKernel(self)

    def quantized(self) -> Quantized:
        return Quantized(self.codes[...], self.scale[...], None if self.offset is None else self.offset[...])

    def dequantized(self) -> Array:
        """The float kernel (original layout and dtype) the stored codes stand for."""
        return _dequantize_kernel(self.spec, self.fmt, self.dtype, self.quantized())

    def store(self, kernel: Array) -> None:
        """Requantize a float kernel (original layout) into this layer's format, in place."""
        if tuple(kernel.shape) != self.spec.kernel_shape:
            raise ValueError(f"kernel of shape {kernel.shape} for a layer of kernel shape {self.spec.kernel_shape}")
        self.set_codes(_quantize_kernel(self.spec, self.fmt, kernel))

    def float_layer(self) -> nnx.Module:
        """The original layer type holding the dequantized kernel (and the bias)."""
        return self._rebuilt(self.quantized(), None if self.bias is None else self.bias[...])

    def _rebuilt(self, q: Quantized, bias: Array | None) -> nnx.Module:
        state = {self.kernel_name: self.kernel_type(_dequantize_kernel(self.spec, self.fmt, self.dtype, q))}
        if bias is not None:
            state[self.bias_name] = type(self.bias)(bias)
        return nnx.merge(self.layer_def, nnx.State(state))

    def __call__(self, *args: Any, **kwargs: Any) -> Array:
        def call(q: Quantized, bias: Array | None, args: tuple) -> Array:
            return self._rebuilt(q, bias)(*args, **kwargs)

        return _low_memory_call(call, self.quantized(), None if self.bias is None else self.bias[...], args)


def _low_memory_call(call, q: Quantized, bias: Array | None, args: tuple) -> Array:
    """``call(q, bias, args)`` with the float kernel alive only around its own matmul.

    Left alone, autodiff keeps every layer's dequantized kernel from the forward pass for
    the backward (x's gradient needs it), and XLA hoists dequantizations that depend only
    on the codes to the start of the step: a training step then holds as much kernel
    memory as a float base. Here the backward recomputes the dequantization (a custom
    VJP whose residuals are the codes and the input), and an optimization barrier ties
    each dequantization to the layer's input (forward) or output cotangent (backward), so
    it cannot run before the layer is reached. No gradient flows to the codes.
    """

    @jax.custom_vjp
    def run(q, bias, args):
        q, args = jax.lax.optimization_barrier((q, args))
        return call(q, bias, args)

    def forward(q, bias, args):
        return run(q, bias, args), (q, bias, args)

    def backward(residuals, grad):
        q, bias, args = residuals
        q, grad = jax.lax.optimization_barrier((q, grad))
        _, vjp = jax.vjp(lambda b, a: call(q, b, a), bias, args)
        return (None, *vjp(grad))

    run.defvjp(forward, backward)
    return run(q, bias, args)


# Compiled once per (layout, format): eagerly, op-by-op dispatch of the (de)quantization
# costs more than the layer's matmul; under an outer jit these are inlined.
@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _dequantize_kernel(spec: EinsumSpec, fmt: QuantFormat, dtype: str, q: Quantized) -> Array:
    return spec.kernel_from_matrix(fmt.dequantize(q, dtype))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _quantize_kernel(spec: EinsumSpec, fmt: QuantFormat, kernel: Array) -> Quantized:
    return fmt.quantize(spec.kernel_to_matrix(kernel))


def _view(layer: QuantizedLayer) -> ViewInfo:
    return ViewInfo(layer.equation, kernel="kernel", bias=None if layer.bias is None else "bias")


register_view(QuantizedLayer, _view)


def _select(model: nnx.Module, pattern: str, exclude: tuple[str, ...]) -> list[tuple[tuple[Any, ...], ViewInfo]]:
    found = []
    for parts, module in nnx.iter_modules(model):
        path = dotted(parts)
        if isinstance(module, Adapter):
            raise ValueError(f"quantize: {path!r} already carries an adapter; quantize the base first, then adapt")
        if isinstance(module, QuantizedLayer) or not parts:
            continue
        if not re.search(pattern, path) or any(re.search(e, path) for e in exclude):
            continue
        info = describe(module)
        if info is None or info.kind != "einsum":
            continue
        kernel = getattr(module, info.kernel)
        letters = info.equation.replace(" ", "").split("->")[0].split(",")[1]
        if getattr(kernel, "ndim", len(letters)) != len(letters):
            raise ValueError(
                f"quantize: {path!r} is a stacked layer (kernel {tuple(kernel.shape)} for einsum "
                f"{info.equation!r}); stacked layers are not supported: exclude it"
            )
        found.append((parts, info))
    return found


def quantize(model: M, fmt: QuantFormat, *, pattern: str = ".", exclude: tuple[str, ...] = ()) -> M:
    """A copy of ``model`` whose einsum-view layers matching ``pattern`` (regex on the
    dotted path) and no ``exclude`` are :class:`QuantizedLayer` in ``fmt``. Embeddings,
    convolutions and norms stay float. Raises, before changing anything, on an adapted
    model, a stacked layer, a d_in the group size does not divide, or no match."""
    if not isinstance(fmt, QuantFormat):
        raise TypeError(f"quantize needs a format such as Int8(), Int4() or NF4(), got {fmt!r}")
    new = nnx.clone(model)
    chosen = _select(new, pattern, tuple(exclude))
    if not chosen:
        raise ValueError(f"quantize: no linear-like layer matches pattern={pattern!r} exclude={exclude!r}")
    built = []
    for parts, info in chosen:  # every layer built (and validated) before any is swapped in
        module = new
        for p in parts:
            module = module[p] if isinstance(module, nnx.List | nnx.Dict | list | dict) else getattr(module, p)
        path = dotted(parts)
        try:
            built.append((parts, QuantizedLayer(module, info, fmt)))
        except ValueError as err:
            raise ValueError(f"{path!r}: {err}") from None
    for parts, layer in built:
        replace_module(new, parts, layer)
    return new


def quantized_layers(model: nnx.Module) -> list[tuple[str, QuantizedLayer]]:
    """``(dotted path, layer)`` of every quantized layer, also the bases inside adapters."""
    found = nnx.iter_modules(model)
    return [(dotted(parts), m) for parts, m in found if isinstance(m, QuantizedLayer)]


def dequantize(model: M) -> M:
    """A copy of ``model`` with every unadapted :class:`QuantizedLayer` back as its original
    float layer type holding the dequantized kernel (adapters: merge them first)."""
    new = nnx.clone(model)
    for parts, module in list(nnx.iter_modules(new)):
        if isinstance(module, Adapter):
            raise ValueError(f"dequantize: {dotted(parts)!r} carries an adapter; merge_adapters first")
    for parts, module in list(nnx.iter_modules(new)):
        if isinstance(module, QuantizedLayer):
            replace_module(new, parts, module.float_layer())
    return new


def kernel_bytes(model: nnx.Module) -> dict[str, int]:
    """Bytes of the model's weights by kind: quantized storage (4-bit codes counted at half
    a byte, as XLA stores them) and everything else."""
    quant = rest = 0
    for _, var in nnx.to_flat_state(nnx.state(model)):
        value = var[...]
        bits = jnp.iinfo(value.dtype).bits if jnp.issubdtype(value.dtype, jnp.integer) else value.dtype.itemsize * 8
        nbytes = value.size * bits // 8
        if isinstance(var, QuantizedWeight):
            quant += nbytes
        else:
            rest += nbytes
    return {"quantized": quant, "other": rest}

