"""Evaluate a model over many alphas with one compilation.

Alpha is state (an ``Alpha`` Variable), so a sweep sets it from a traced value inside one
jitted function instead of baking a Python float into each trace:

- ``mode="vmap"``: ``jax.vmap`` over a scalar alpha; every alpha sees the same inputs.
  ``batch_size=b`` instead maps over the alphas ``b`` at a time (``jax.lax.map``), with
  memory for ``b`` forwards, not all of them. Which is faster depends on the device
  (measured in docs/guides/steering.md); on an accelerator the full vmap fills it.
- ``mode="rows"``: the inputs are repeated once per alpha and each row gets its own alpha
  (shape ``(n_alphas * batch,)``), so the whole sweep is one ordinary forward pass. Needs
  layers whose input's first axis is the batch (not e.g. an expert axis).

The compiled function is cached on (model structure, ``fn``, pattern, shapes), so a second
sweep with other alpha values but the same count does not compile again.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, ArrayLike, Float

from lora_jax.adapter import as_alpha
from lora_jax.paths import NoMatchError, iter_adapters, select
from lora_jax.transforms import set_alpha
from lora_jax.validation import is_int

__all__ = ["sweep"]

MODES = ("vmap", "rows")


def _check_alphas(alphas: ArrayLike) -> Float[Array, " n"]:
    a = jnp.asarray(alphas, jnp.float32)
    if a.ndim != 1:
        raise ValueError(f"alphas must be a 1-D vector of steering values, got shape {a.shape}")
    if a.shape[0] == 0:
        raise ValueError("alphas is empty: pass at least one value, e.g. jnp.linspace(-1, 1, 9)")
    return as_alpha(a, what="alphas")  # refuses NaN / inf while the values are concrete


def _call(fn: Callable, model: nnx.Module, inputs: Any, has_inputs: bool) -> Any:
    return fn(model, inputs) if has_inputs else fn(model)


@functools.partial(jax.jit, static_argnames=("graphdef", "fn", "pattern", "has_inputs", "batch_size"))
def _sweep_vmap(graphdef, state, alphas, inputs, *, fn, pattern, has_inputs, batch_size):
    def one(alpha):
        # copy=True: Variables made at this trace level, or an nnx.scan inside fn (stacked
        # layers) refuses the jit-level ones it would otherwise receive.
        model = nnx.merge(graphdef, set_alpha(state, alpha, pattern=pattern), copy=True)
        return _call(fn, model, inputs, has_inputs)

    if batch_size is None:
        return jax.vmap(one)(alphas)
    return jax.lax.map(one, alphas, batch_size=batch_size)


@functools.partial(jax.jit, static_argnames=("graphdef", "fn", "pattern"))
def _sweep_rows(graphdef, state, alphas, inputs, *, fn, pattern):
    n, batch = alphas.shape[0], jax.tree.leaves(inputs)[0].shape[0]
    # alpha-major: row i * batch + b is input row b at alphas[i]
    tiled = jax.tree.map(lambda x: jnp.tile(x, (n,) + (1,) * (x.ndim - 1)), inputs)
    out = fn(nnx.merge(graphdef, set_alpha(state, jnp.repeat(alphas, batch), pattern=pattern), copy=True), tiled)
    bad = [y.shape for y in jax.tree.leaves(out) if y.ndim == 0 or y.shape[0] != n * batch]
    if bad:
        raise ValueError(
            f"sweep(mode='rows'): every output of fn must keep one row per input row "
            f"({n} alphas x {batch} rows = {n * batch}), got shapes {bad}; reduce over rows "
            "after the sweep, or use mode='vmap'"
        )
    return jax.tree.map(lambda y: y.reshape(n, batch, *y.shape[1:]), out)


def sweep(
    model: nnx.Module,
    fn: Callable[..., Any],
    alphas: ArrayLike,
    *,
    inputs: Any = None,
    pattern: str | None = None,
    mode: str = "vmap",
    batch_size: int | None = None,
) -> Any:
    """``fn(model)`` (or ``fn(model, inputs)``) at every alpha, stacked on a new leading axis.

    Alpha is set on every adapter, or on those whose dotted path matches ``pattern``
    (``re.search``); the others keep their value. ``model`` itself is not changed, and
    state that ``fn`` mutates is discarded. One compilation for the whole sweep.

    ``mode="rows"`` needs ``inputs`` (a pytree whose leaves share a leading batch axis)
    and an ``fn`` whose outputs keep that axis; results have shape ``(n_alphas, batch, ...)``,
    the same as ``mode="vmap"`` gives for such an ``fn``. ``batch_size`` (vmap mode) runs
    the alphas that many at a time instead of all at once.
    """
    a = _check_alphas(alphas)
    if mode not in MODES:
        raise ValueError(f"sweep: mode={mode!r} is not one of {MODES}")
    if batch_size is not None:
        if mode != "vmap":
            raise ValueError(f"sweep: batch_size applies to mode='vmap' only, got mode={mode!r}")
        if not is_int(batch_size) or batch_size < 1:
            raise ValueError(f"sweep: batch_size={batch_size!r} must be a positive integer (alphas per step)")
    if pattern is not None:
        select(iter_adapters(model), pattern, caller="sweep")
    if not any(True for _ in iter_adapters(model)):
        raise NoMatchError("sweep: the model has no adapters; apply_adapters(model, cfg) first")
    graphdef, state = nnx.split(model)
    if mode == "vmap":
        return _sweep_vmap(
            graphdef, state, a, inputs, fn=fn, pattern=pattern, has_inputs=inputs is not None, batch_size=batch_size
        )
    leaves = jax.tree.leaves(inputs)
    if not leaves:
        raise ValueError("sweep(mode='rows') needs inputs=... (the batch to repeat once per alpha)")
    sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in leaves}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(f"sweep(mode='rows'): all inputs need the same leading batch axis, got sizes {sizes}")
    return _sweep_rows(graphdef, state, a, inputs, fn=fn, pattern=pattern)
