"""Pure functions on a model's state tree (``nnx.State`` in, ``nnx.State`` out).

They read the static part (paths, Variable types, and for :func:`cat` / :func:`merge`
the graphdef) at trace time and only compute on the arrays, so they run inside
``jax.jit`` and ``jax.vmap``: a sweep over alpha or over mixing weights is one compile::

    graphdef, state = nnx.split(model)
    sweep = jax.jit(jax.vmap(lambda a: nnx.merge(graphdef, set_alpha(state, a))(x)))
    ys = sweep(jnp.linspace(-1.0, 1.0, 9))

Leaves are selected by Variable type (``AdapterParam`` incl. subclasses, ``AdapterState``,
``Alpha``), adapters by a regex searched in their dotted path, as in ``surgery.set_alpha``.
Every function accepts a full state or one holding only adapter leaves.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, ArrayLike

from lora_jax.adapter import ADAPTER_VARIABLES, AdapterParam, AdapterState, Alpha, as_alpha
from lora_jax.paths import dotted, iter_adapters, select
from lora_jax.stacked import LayerMask, alpha_value
from lora_jax.surgery import merge_adapters

__all__ = ["adapter_state", "cast", "cat", "combine", "merge", "negate", "scale", "set_alpha"]

Path = tuple[Any, ...]


def _rebuild(state: nnx.State, fn: Callable[[Path, nnx.Variable], Array | None]) -> nnx.State:
    """A new state with ``fn(path, variable)`` as the value where it is not None."""
    flat = []
    for path, var in nnx.to_flat_state(state):
        new = fn(path, var)
        flat.append((path, var if new is None else var.replace(new)))
    return nnx.from_flat_state(flat)


def _alpha_paths(state: nnx.State, pattern: str | None, caller: str) -> set[Path]:
    alphas = [(dotted(path[:-1]), path) for path, var in nnx.to_flat_state(state) if isinstance(var, Alpha)]
    return {path for _, path in select(alphas, pattern, caller=caller, where=" in this state")}


def adapter_state(state: nnx.State) -> nnx.State:
    """Only the adapter leaves (``AdapterParam``, ``AdapterState``, ``Alpha``)."""
    return state.filter(ADAPTER_VARIABLES)


def set_alpha(state: nnx.State, value: ArrayLike, *, pattern: str | None = None) -> nnx.State:
    """A new state with alpha set to ``value`` (a scalar or one value per input row) on
    all adapters or those whose path matches ``pattern``; ``state`` is not changed. The
    in-place form on a model is :func:`lora_jax.set_alpha`. A concrete NaN or inf is refused; under
    ``jax.jit`` / ``jax.vmap`` the value is traced and cannot be checked. A stacked adapter
    (:mod:`lora_jax.stacked`) stores it once per layer times its ``LayerMask``, found
    beside its alpha."""
    if not isinstance(state, nnx.State):
        raise TypeError(
            f"transforms.set_alpha takes an nnx.State, got {type(state).__name__}; "
            "for a model use lora_jax.set_alpha, which sets alpha in place"
        )
    alpha = as_alpha(value)
    chosen = _alpha_paths(state, pattern, "set_alpha")
    masks = {path[:-1]: var[...] for path, var in nnx.to_flat_state(state) if isinstance(var, LayerMask)}
    return _rebuild(
        state, lambda path, var: alpha_value(alpha, masks.get(path[:-1])) if path in chosen else None
    )


def scale(state: nnx.State, factor: ArrayLike, *, pattern: str | None = None) -> nnx.State:
    """Alpha multiplied by ``factor``: the variant's own steering path. For additive
    variants (LoRA) that scales the delta exactly; for the others it moves along the
    curve their alpha defines (DoRA's magnitude, AntiPaSTO's rotation angle)."""
    chosen = _alpha_paths(state, pattern, "scale")
    factor = as_alpha(factor, what="scale factor")
    return _rebuild(state, lambda path, var: var[...] * factor if path in chosen else None)


def negate(state: nnx.State, *, pattern: str | None = None) -> nnx.State:
    """Alpha negated: the inverse adapter for the variants that have one."""
    return scale(state, -1.0, pattern=pattern)


def _check_same_structure(states: Sequence[nnx.State], caller: str) -> None:
    shapes = [{p: (v[...].shape, v.type) for p, v in nnx.to_flat_state(s)} for s in states]
    for i, other in enumerate(shapes[1:], start=1):
        differ = sorted(dotted(p) for p in set(shapes[0]) ^ set(other))
        differ += sorted(dotted(p) for p in set(shapes[0]) & set(other) if shapes[0][p] != other[p])
        if differ:
            raise ValueError(
                f"{caller}: state {i} differs from state 0 in paths, shapes or Variable types at {differ[:20]}; "
                "combine adapters built with the same config on the same model"
            )


def combine(states: Sequence[nnx.State], weights: Sequence[ArrayLike] | Array) -> nnx.State:
    """Task arithmetic on parameters: ``sum_i weights[i] * trainable_i`` leaf by leaf.

    Only ``AdapterParam`` leaves are combined; frozen state, alpha and base leaves come
    from ``states[0]`` (they must be shared). This combines *parameters* (model soups,
    interpolation). For LoRA it equals the same combination of deltas only when the
    ``A`` factors are shared and the weights sum to 1 (``A (sum w_i B_i)``);
    :func:`cat` gives any weighted sum of LoRA deltas exactly.
    """
    if len(states) == 0 or len(states) != len(weights):
        raise ValueError(f"combine needs one weight per state, got {len(states)} states and {len(weights)} weights")
    _check_same_structure(states, "combine")
    flats = [dict(nnx.to_flat_state(s)) for s in states]

    def mix(path: Path, var: nnx.Variable) -> Array | None:
        if not isinstance(var, AdapterParam):
            return None
        total = sum(jnp.asarray(w, var[...].dtype) * f[path][...] for w, f in zip(weights, flats, strict=True))
        return total.astype(var[...].dtype)

    return _rebuild(states[0], mix)


def cast(state: nnx.State, dtype: Any) -> nnx.State:
    """Floating ``AdapterParam`` / ``AdapterState`` leaves stored as ``dtype``.

    A storage cast: the adapter still computes in its config's dtype (the stored weights
    are promoted there), so outputs equal those of the rounded weights. To compute in
    another dtype, apply a config with that ``dtype`` and restore into it.
    """
    dtype = jnp.dtype(dtype)

    def convert(path: Path, var: nnx.Variable) -> Array | None:
        if isinstance(var, AdapterParam | AdapterState) and jnp.issubdtype(var[...].dtype, jnp.floating):
            return var[...].astype(dtype)
        return None

    return _rebuild(state, convert)


def merge(graphdef: nnx.GraphDef, *states: nnx.State) -> tuple[nnx.GraphDef, nnx.State]:
    """State form of ``merge_adapters``: the graphdef and state of the merged model.

    Jit it as ``jax.jit(lambda s: merge(graphdef, s)[1])``; the merged graphdef does not
    depend on the arrays, so take it from one eager (or ``jax.eval_shape``) call.
    """
    return nnx.split(merge_adapters(nnx.merge(graphdef, *states)))


def cat(
    models: Sequence[tuple[nnx.GraphDef, nnx.State]], weights: Sequence[ArrayLike]
) -> tuple[nnx.GraphDef, nnx.State]:
    """PEFT's ``cat`` combination: one adapter per path whose delta is exactly
    ``sum_i weights[i] * alpha_i * delta_i`` (each delta at its current scalar alpha).

    ``models`` are ``(graphdef, state)`` pairs on the same base with adapters at the same
    paths, of variants that have a concatenation rule (``Adapter.concatenable``; for
    LoRA: one LoRA of rank ``sum r_i``, config ``lora_alpha = r`` so its scale is 1, and
    alpha 1). The shapes change, so the result comes with its own graphdef (the first
    model's, rewritten). Under ``jax.jit`` return the state and take the graphdef from an
    eager call, as for :func:`merge`.
    """
    if len(models) == 0 or len(models) != len(weights):
        raise ValueError(f"cat needs one weight per model, got {len(models)} models and {len(weights)} weights")
    merged = [nnx.merge(graphdef, state) for graphdef, state in models]
    adapters = [dict(iter_adapters(m)) for m in merged]
    for i, other in enumerate(adapters[1:], start=1):
        if set(other) != set(adapters[0]):
            raise ValueError(f"cat: model {i} has adapters at other paths: {sorted(set(other) ^ set(adapters[0]))}")
    no_rule = sorted(
        f"{p} ({type(a).__name__})" for found in adapters for p, a in found.items() if not type(a).concatenable
    )
    if no_rule:
        raise ValueError(
            f"cat concatenates adapter ranks, which these adapters' variants have no rule for (LoRA and EVA "
            f"have one): {no_rule}"
        )
    for path, target in adapters[0].items():
        target.concatenate([found[path] for found in adapters], weights)
    return nnx.split(merged[0])
