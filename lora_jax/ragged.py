"""LoRA on MoE experts applied with ``jax.lax.ragged_dot``.

A dropless MoE sorts its tokens by expert and multiplies each expert's run of rows by
that expert's kernel in one call::

    y = jax.lax.ragged_dot(x_sorted, kernel, group_sizes)   # (M, D), (E, D, F), (E,) -> (M, F)

The kernel is E matrices ``(D, F)``: the same matrix view as the einsum ``EMD,EDF->EMF``
(experts are kernel-batch axes), so targeting, inits, merge and checkpoints use the
ordinary machinery. Only the forward differs: the adapter applies its per-expert
factors with ``ragged_dot`` too, ``A (E, D, r)``, ``B (E, r, F)``::

    y = base(x, group_sizes) + alpha * s * ragged_dot(ragged_dot(x, A, gs), B, gs)

so the adapter costs ``M (D + F) r`` multiply-adds, like the base, without padding
tokens to a capacity. Identity at t=0: B = 0 (LoRA's init), and alpha = 0 adds an exact
zero. ``merge_adapters`` folds ``W[e] + alpha s A[e] B[e]`` per expert.

Make a module type adaptable with :func:`register_ragged`. The variant is LoRA
(``LoRAConfig``); other variants are refused on these layers. Alpha is a scalar here:
rows are tokens sorted by expert, not batch rows, so a per-row alpha has no meaning.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
from jaxtyping import Array

from lora_jax.adapter import Adapter, Target, VariantConfig
from lora_jax.variants.lora import LoRA, LoRAConfig
from lora_jax.views import UnsupportedLayerError, ViewInfo, register_view

__all__ = ["RaggedLoRA", "RaggedViewInfo", "build_adapter", "register_ragged"]

EQUATION = "EMD,EDF->EMF"  # the dense per-expert form of the same kernel


@dataclasses.dataclass(frozen=True)
class RaggedViewInfo(ViewInfo):
    """A view whose layer is called as ``layer(..., x, ..., group_sizes, ...)`` and computes
    ``ragged_dot(x, kernel, group_sizes)``; ``group_sizes`` is a position or a keyword."""

    group_sizes: int | str = 1


def register_ragged(
    module_type: type, *, kernel: str = "kernel", input_arg: int = 0, group_sizes: int | str = 1
) -> None:
    """Make ``module_type`` (kernel ``(E, D, F)`` applied with ``jax.lax.ragged_dot``)
    adaptable with LoRA per expert. ``group_sizes`` is the position or the keyword of the
    group-sizes argument of ``__call__``. A bias, if the module has one, is left as is."""
    info = RaggedViewInfo(EQUATION, kernel=kernel, input_arg=input_arg, group_sizes=group_sizes)
    register_view(module_type, lambda module: info)


class RaggedLoRA(LoRA):
    """LoRA with one ``(A, B)`` pair per expert, applied with ``ragged_dot``."""

    def __call__(self, *args: Any, **kwargs: Any) -> Array:
        info: Any = self.info
        x = args[info.input_arg]
        where = info.group_sizes
        group_sizes = kwargs[where] if isinstance(where, str) else args[where]
        alpha = self.alpha[...]
        if alpha.ndim != 0:
            raise ValueError(
                f"a ragged_dot expert layer takes a scalar alpha (its rows are tokens sorted by "
                f"expert, not batch rows), got shape {alpha.shape}; set a scalar with set_alpha"
            )
        y = self.base(*args, **kwargs)
        h = x.astype(self.dtype)
        if self.dropout is not None:
            h = self.dropout(h)
        h = jax.lax.ragged_dot(h, self.lora_a[...], group_sizes) * (alpha.astype(self.dtype) * self.config.scale)
        delta = jax.lax.ragged_dot(h, self.lora_b[...], group_sizes)
        return y + delta.astype(y.dtype)

    def forward(self, x: Array, call_base: Callable[[Array], Array]) -> Array:
        raise TypeError("RaggedLoRA needs the group sizes: call the layer itself, layer(x, group_sizes)")


def build_adapter(target: Target, variant: VariantConfig, *, seed: int) -> Adapter:
    """``variant.build(target)``, or a :class:`RaggedLoRA` for a ragged_dot expert layer."""
    if not isinstance(target.info, RaggedViewInfo):
        return variant.build(target, seed=seed)
    if type(variant) is not LoRAConfig:
        raise UnsupportedLayerError(
            f"{target.path!r} applies its experts with jax.lax.ragged_dot, where lora_jax supports "
            f"LoRA (LoRAConfig), not {variant.name!r}; give this layer a LoRA rule or exclude it"
        )
    variant.build(target, seed=seed)  # LoRA's own checks (rank), then the ragged forward
    return RaggedLoRA(target, variant, seed=seed)

