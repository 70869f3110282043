"""One layer holding several named adapters: the building block of :mod:`lora_jax.named`.

A :class:`NamedLayer` stands where an adapted layer stood. ``base`` is the original layer
and ``adapters`` maps each name to an ordinary :class:`~lora_jax.adapter.Adapter` built
on that same ``base`` object (nothing of the base is copied). It runs in one of two modes:

- **plain** (no route set): the *active* adapters run on every row, chained so that each
  one's ``call_base`` is the previous one: ``y = a2.forward(x, lambda v: a1.forward(v, base))``.
  For delta-form variants (LoRA family, AntiPaSTO) this adds their deltas, as PEFT adds
  the deltas of several active LoRA adapters; an output gate (IA3) multiplies. Each runs
  at its own ``alpha``.
- **routed** (:func:`lora_jax.named.route`): row ``b`` uses adapter ``route[b]`` (an index
  into ``names``, ``-1`` for none) at alpha ``route_alpha[b]``, active or not. The
  adapters are grouped by structure (same variant config and shapes); each group's
  weights are stacked on a slot axis, and the forward is ``jax.vmap`` over rows of
  "gather this row's slot of every group and run the chain at this row's alpha". A group
  the row does not use runs at alpha 0, which every variant guarantees is its
  ``call_base`` bit for bit. So row ``b`` runs the same program as that adapter alone on
  that row alone with a scalar alpha (AntiPaSTO takes its scalar-alpha fast path,
  not its per-row path): one forward, one compilation, and equality with the row alone
  up to how XLA batches a matmul (tests/test_named.py says which cases are bit-exact).

Why gather (``jax.vmap`` with per-row weights) over a one-hot einsum over all K slots or
a grouped ``jax.lax.ragged_dot``: it is the only one of the three that is generic over
variants (the variant's own forward runs per row), it does one adapter's work per row
(one-hot does K), and it needs no sort of the rows by adapter (ragged_dot does);
``benchmarks/multi_adapter.py`` measures the three side by side for LoRA.

An inactive adapter's trainable weights are :class:`Parked` (the type remembers which
``AdapterParam`` subclass they were), so ``nnx.Optimizer(model, tx, wrt=AdapterParam)``
trains exactly the active adapters. The route is :class:`Route` state, not adapter state:
checkpoints skip it, and changing it (same batch size) never recompiles.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array

from lora_jax.adapter import Adapter, AdapterParam, AdapterState, Alpha
from lora_jax.einsum_spec import EinsumSpec
from lora_jax.views import ViewInfo

__all__ = ["NamedLayer", "Parked", "Route", "park", "refuse_named", "unpark"]


class Parked(nnx.Variable):
    """A trainable weight of an inactive adapter; its ``kind`` metadata is the
    ``AdapterParam`` type it has again once the adapter is activated."""


class Route(nnx.Variable):
    """Per-row routing of a :class:`NamedLayer` (adapter index and alpha per row)."""


# The adapter Variables that differ between adapters of one structure (stacked per group).
_OWN = (AdapterParam, AdapterState, Parked)


def _swap_types(adapter: Adapter, make: Callable[[nnx.Variable], nnx.Variable | None]) -> None:
    """Replace Variables of the adapter (not of its base) by ``make(var)`` where not None."""
    found = [(path, var) for path, var in nnx.iter_graph(adapter) if isinstance(var, nnx.Variable)]
    for path, var in found:
        if not path or path[0] == "base":
            continue
        new = make(var)
        if new is None:
            continue
        parent: Any = adapter
        for p in path[:-1]:
            parent = parent[p] if isinstance(parent, nnx.List | nnx.Dict | list | dict) else getattr(parent, p)
        if isinstance(parent, nnx.List | nnx.Dict | list | dict):
            parent[path[-1]] = new
        else:
            setattr(parent, path[-1], new)


def park(adapter: Adapter) -> None:
    """Make the adapter's trainable weights :class:`Parked` (in place)."""

    def make(var: nnx.Variable) -> nnx.Variable | None:
        if not isinstance(var, AdapterParam):
            return None
        return Parked(var.get_value(), **{**var.get_metadata(), "kind": type(var)})

    _swap_types(adapter, make)


def unpark(adapter: Adapter) -> None:
    """Give :class:`Parked` weights their trainable type back (in place)."""

    def make(var: nnx.Variable) -> nnx.Variable | None:
        if not isinstance(var, Parked):
            return None
        meta = dict(var.get_metadata())
        kind = meta.pop("kind")
        return kind(var.get_value(), **meta)

    _swap_types(adapter, make)


def refuse_named(model: nnx.Module, what: str) -> None:
    """Raise if ``model`` holds named adapters: ``what`` (a whole-model service written for
    one adapter per layer) would see each name's adapter as a layer of its own."""
    for parts, module in nnx.iter_modules(model):
        if isinstance(module, NamedLayer):
            where = ".".join(str(p) for p in parts)
            raise ValueError(
                f"{what} got a model with named adapters (at {where!r}); take one with "
                f"lora_jax.named.only(model, name) first, or use lora_jax.named's own add / save"
            )


def _check_rows(name: str, alpha: Array, x: Array) -> None:
    if alpha.ndim == 1 and alpha.shape[0] != x.shape[0]:
        raise ValueError(
            f"adapter {name!r}: alpha has {alpha.shape[0]} values but the input has {x.shape[0]} rows; "
            "set a scalar alpha, or one value per row of this batch"
        )


def _chain(adapter: Adapter, inner: Callable[[Array], Array]) -> Callable[[Array], Array]:
    return lambda v: adapter.forward(v, inner)


class NamedLayer(nnx.Module):
    """A layer with named adapters; see the module docstring."""

    def __init__(self, base: nnx.Module, info: ViewInfo, spec: EinsumSpec):
        self.base = base
        self.info = info
        self.spec = spec
        self.adapters = nnx.Dict()
        self.names: tuple[str, ...] = ()  # order of addition: route indices point into it
        self.active: tuple[str, ...] = ()
        self.serials: tuple[int, ...] = ()  # per name: when it was added to the model (names() order)
        self.route = Route(jnp.zeros((0,), jnp.int32))
        self.route_alpha = Route(jnp.zeros((0,), jnp.float32))

    def __getattr__(self, name: str) -> Any:
        """Read through to the wrapped layer, as an :class:`Adapter` does (model code that
        reads ``self.o_proj.kernel.shape`` keeps working); methods are refused."""
        base = None if name.startswith("_") else vars(self).get("base")
        if base is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        value = getattr(base, name)
        if inspect.ismethod(value) and value.__self__ is base:
            raise AttributeError(
                f"{name!r} is a method of the wrapped {type(base).__name__}; it would run the layer "
                "without its adapters. Call layer.base.{name} for the bare layer"
            )
        return value

    def __call__(self, *args: Any, **kwargs: Any) -> Array:
        i = self.info.input_arg
        x = args[i]

        def call_base(new_x: Array) -> Array:
            return self.base(*args[:i], new_x, *args[i + 1 :], **kwargs)

        if self.route[...].shape[0] == 0:
            run = call_base
            for name in self.active:
                adapter = self.adapters[name]
                _check_rows(name, adapter.alpha[...], x)
                run = _chain(adapter, run)
            return run(x)
        if len(args) != 1 or kwargs:
            raise ValueError(
                f"a routed (mixed-adapter) batch needs a layer called with its input alone; this "
                f"{type(self.base).__name__} got {len(args)} positional and {sorted(kwargs)} keyword arguments"
            )
        return self._routed(x)

    def _groups(self) -> list[tuple[tuple[int, ...], nnx.GraphDef, nnx.State, nnx.State, nnx.State]]:
        """Adapters of one structure: (indices into names, graphdef, stacked own state,
        alpha state, the rest), in order of first appearance."""
        found: dict[Any, list[int]] = {}
        parts: dict[Any, tuple[nnx.GraphDef, list[nnx.State], nnx.State, nnx.State]] = {}
        for k, name in enumerate(self.names):
            graphdef, own, alpha, rest = nnx.split(self.adapters[name], _OWN, Alpha, ...)
            key = (graphdef, tuple((v.shape, v.dtype) for v in jax.tree.leaves(own)))
            if key not in found:
                found[key], parts[key] = [], (graphdef, [], alpha, rest)
            found[key].append(k)
            parts[key][1].append(own)
        groups = []
        for key, members in found.items():
            graphdef, owns, alpha, rest = parts[key]
            stacked = jax.tree.map(lambda *v: jnp.stack(v), *owns)
            groups.append((tuple(members), graphdef, stacked, alpha, rest))
        return groups

    def _routed(self, x: Array) -> Array:
        route, alphas = self.route[...], self.route_alpha[...]
        if self.spec.layout(x.ndim).lhs[0] in self.spec.kernel:
            raise ValueError(f"einsum {self.spec.equation!r} has no row axis to route on")
        if route.shape[0] != x.shape[0]:
            raise ValueError(
                f"the route has {route.shape[0]} rows but the input has {x.shape[0]} (shape {tuple(x.shape)}); "
                "call lora_jax.named.route with one entry per row of this batch"
            )
        for name in self.names:
            dropout = vars(self.adapters[name]).get("dropout")
            if isinstance(dropout, nnx.Dropout) and dropout.rate > 0 and not dropout.deterministic:
                raise ValueError(
                    f"adapter {name!r} has dropout {dropout.rate}, which a routed batch does not apply per row; "
                    "call model.eval() for serving, or train it unrouted (named.unroute)"
                )
        groups = self._groups()
        slots, row_alphas = [], []
        for members, *_ in groups:
            hit = route[:, None] == jnp.asarray(members, jnp.int32)[None, :]
            slots.append(jnp.argmax(hit, axis=1))
            row_alphas.append(jnp.where(hit.any(axis=1), alphas, 0.0))

        def one_row(x_row: Array, row_slots: list[Array], row_alpha: list[Array]) -> Array:
            run = self.base
            for (_, graphdef, stacked, alpha, rest), slot, a in zip(groups, row_slots, row_alpha, strict=True):
                own = jax.tree.map(lambda v, s=slot: v[s], stacked)
                row_alpha_state = jax.tree.map(lambda _, a=a: a, alpha)
                run = _chain(nnx.merge(graphdef, own, row_alpha_state, rest), run)
            return run(x_row[None])[0]

        return jax.vmap(one_row)(x, slots, row_alphas)
