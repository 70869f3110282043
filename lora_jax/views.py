"""Which modules are linear maps, and where their kernel and bias sit: the view registry.

A view (:class:`ViewInfo`) names a module's einsum equation, its kernel and bias
attributes and the position of its input; :func:`spec_of` turns it into the
:class:`~lora_jax.einsum_spec.EinsumSpec` that does the algebra.

Built in: ``nnx.Linear`` (``...i,io->...o``), ``nnx.LinearGeneral`` (any ``axis`` and
``batch_axis``) and ``nnx.Einsum`` (any two-operand string given to its constructor);
``nnx.Conv`` and ``nnx.Embed`` are added on top by :mod:`lora_jax.layer_kinds`. Other
module types are added with :func:`register_view`, and a registered view wins over the
built-in ones.
"""

from __future__ import annotations

import dataclasses
import string
from collections.abc import Callable
from typing import Any

from flax import nnx

from lora_jax.einsum_spec import EinsumSpec, UnsupportedLayerError

__all__ = ["UnsupportedLayerError", "ViewInfo", "register_view", "spec_of", "unregister_view", "view_of"]


@dataclasses.dataclass(frozen=True)
class ViewInfo:
    """How to find the pieces of a module that computes ``equation`` with its kernel.

    ``kernel`` and ``bias`` name the module's ``nnx.Param`` attributes (``bias=None``
    when it has none); ``input_arg`` is the position of the activation in ``__call__``.
    ``kind`` says what the equation's input is: ``"einsum"`` the layer's input itself;
    ``"conv"`` each input patch and ``"embed"`` the one-hot of the input ids
    (:mod:`lora_jax.layer_kinds`; only the variants that list the kind adapt it).
    """

    equation: str
    kernel: str = "kernel"
    bias: str | None = None
    input_arg: int = 0
    kind: str = "einsum"


_USER_VIEWS: dict[type, Callable[[nnx.Module], ViewInfo]] = {}


def register_view(module_type: type, describe: Callable[[nnx.Module], ViewInfo]) -> None:
    """Make instances of ``module_type`` adaptable.

    ``describe(module)`` returns a :class:`ViewInfo`, e.g. for a tunix-style einsum that
    stores its kernel as ``w`` and is called as ``layer(x)``::

        register_view(MyEinsum, lambda m: ViewInfo(equation=m.eqn, kernel="w"))
    """
    if not isinstance(module_type, type) or not issubclass(module_type, nnx.Module):
        raise TypeError(f"register_view needs an nnx.Module subclass, got {module_type!r}")
    _USER_VIEWS[module_type] = describe


def unregister_view(module_type: type) -> None:
    """Undo :func:`register_view` for ``module_type`` (models already adapted keep their
    adapters; new ``apply_adapters`` calls no longer see the type)."""
    if module_type not in _USER_VIEWS:
        raise KeyError(f"{module_type!r} has no view registered with register_view; nothing to undo")
    del _USER_VIEWS[module_type]


def _linear_general_equation(module: nnx.LinearGeneral) -> str:
    letters = iter(string.ascii_letters)
    n_batch, axes = len(module.batch_axis), tuple(module.axis)
    if any(a < 0 for a in axes) and any(a >= 0 for a in axes):
        raise UnsupportedLayerError(
            f"nnx.LinearGeneral with mixed-sign axis={axes} depends on the input's ndim; "
            "use all-negative or all-non-negative axes"
        )
    batch = "".join(next(letters) for _ in range(n_batch))
    contracted = "".join(next(letters) for _ in axes)
    output = "".join(next(letters) for _ in module.out_features)
    by_axis = dict(zip(axes, contracted, strict=True))
    if all(a < 0 for a in axes):
        span = range(min(axes), 0)
        tail = "".join(by_axis.get(a) or next(letters) for a in span)
        lhs = batch + "..." + tail
    else:
        span = range(n_batch, max(axes) + 1)
        lhs = batch + "".join(by_axis.get(a) or next(letters) for a in span) + "..."
    free = "".join(c for c in lhs if c not in batch + contracted)
    # dot_general puts batch axes first, then the input's free axes, then the outputs.
    return f"{lhs},{batch}{contracted}{output}->{batch}{free}{output}"


def view_of(module: nnx.Module) -> ViewInfo | None:
    """The view of ``module`` if it is adaptable, else ``None`` (raises if it is broken)."""
    for module_type in type(module).__mro__:
        if module_type in _USER_VIEWS:
            return _USER_VIEWS[module_type](module)
    bias = "bias" if getattr(module, "bias", None) is not None else None
    if isinstance(module, nnx.Linear):
        return ViewInfo("...i,io->...o", bias=bias)
    if isinstance(module, nnx.LinearGeneral):
        return ViewInfo(_linear_general_equation(module), bias=bias)
    if isinstance(module, nnx.Einsum):
        return ViewInfo(module.einsum_str, bias=bias)
    return None


def spec_of(module: nnx.Module, info: ViewInfo) -> EinsumSpec:
    kernel: Any = getattr(module, info.kernel)
    return EinsumSpec(info.equation, tuple(kernel.shape))
