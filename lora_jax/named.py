"""Several named adapters on one base model: add, activate, route rows, save, hot-swap.

    model = named.add(base, "sft", AdapterConfig(rules=(Rule(pattern="proj", variant=LoRAConfig(r=8)),)))
    model = named.add(model, "steer", steer_cfg)          # a second adapter (active too)
    named.deactivate(model, "sft")                        # nnx.Optimizer(..., wrt=AdapterParam) trains "steer" only
    named.route(model, ["sft", None, "steer", "steer"], alpha=[1.0, 0.0, 1.0, -1.0])
    logits = model(tokens)                                # each row its own adapter and alpha, one forward
    named.load(model, "sft", "ckpt/sft-v2")               # hot-swap new weights, nothing recompiles

Every adapted layer becomes a :class:`~lora_jax.named_layer.NamedLayer` holding one
ordinary adapter per name that covers it (a name's rules may cover other layers than
another name's). A model adapted by ``apply_adapters`` keeps its adapter as ``"default"``.

Structure-changing calls (:func:`add`, :func:`delete`, :func:`restore`,
:func:`import_peft`) return a new model and leave the caller's as it was, also when they
raise. :func:`activate`, :func:`deactivate`, :func:`set_alpha`, :func:`route` and
:func:`load` change the model in place, like :func:`lora_jax.set_alpha`: ``route`` and
``load`` change only array values (same shapes), so a jitted forward or
:func:`lora_jax.models.generate` is not traced again; activation changes Variable types
(what trains), so it traces once more.

Plain mode (no route): the active adapters apply to every row, one after the other
(LoRA deltas add up). Routed mode: row ``b`` uses the adapter ``rows[b]`` (or none) at
``alpha[b]``, active or not; see :mod:`lora_jax.named_layer` for the math and why.
Not supported: stacked (scanned) layers and ragged_dot expert layers (refused by name),
and ``merge_adapters`` on a named model (take :func:`only` first).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util
from jaxtyping import ArrayLike

from lora_jax import checkpoint, peft_format, ragged, stacked
from lora_jax.adapter import Adapter, AdapterParam, AdapterState, as_alpha
from lora_jax.config import AdapterConfig
from lora_jax.named_layer import NamedLayer, Parked, Route, park, unpark
from lora_jax.paths import dotted, iter_adapters, module_at, module_paths, replace_module
from lora_jax.surgery import find_targets, with_shared
from lora_jax.variants.lora import LoRA

__all__ = [
    "DEFAULT",
    "NamedLayer",
    "Parked",
    "Route",
    "activate",
    "active",
    "add",
    "deactivate",
    "delete",
    "import_peft",
    "load",
    "names",
    "only",
    "restore",
    "route",
    "save",
    "set_alpha",
    "unroute",
]

M = TypeVar("M", bound=nnx.Module)
DEFAULT = "default"  # the name an apply_adapters adapter gets
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*")
_INDEX = "named.json"  # save(path, model) of every name: the order and which are active
_OWN = (AdapterParam, AdapterState, Parked)


# -- graph helpers ---------------------------------------------------------------------
def layers(model: nnx.Module) -> list[tuple[str, NamedLayer]]:
    """``(dotted path, NamedLayer)`` for every named-adapter layer of the model."""
    return [(dotted(parts), m) for parts, m in nnx.iter_modules(model) if isinstance(m, NamedLayer)]


def _check_name(name: Any) -> None:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(
            f"adapter name {name!r} must be a string of letters, digits, '_' or '-', not starting with a digit"
        )


def _serials(model: nnx.Module) -> dict[str, int]:
    return {n: s for _, layer in layers(model) for n, s in zip(layer.names, layer.serials, strict=True)}


def names(model: nnx.Module) -> list[str]:
    """Every adapter name in the model, in order of addition."""
    serials = _serials(model)
    return sorted(serials, key=serials.get)


def active(model: nnx.Module) -> list[str]:
    """The active adapter names (they run in plain mode and train), in order of addition."""
    on = {n for _, layer in layers(model) for n in layer.active}
    return [n for n in names(model) if n in on]


def _require(model: nnx.Module, wanted: Sequence[str | None], what: str) -> None:
    known = names(model)
    missing = sorted({n for n in wanted if n is not None and n not in known})
    if missing:
        raise KeyError(f"{what}: no adapter named {missing}; the model has {known or 'none'}")


# -- structure: add, delete, convert -----------------------------------------------------
def _to_named(model: nnx.Module) -> None:
    """In place: every plain adapter becomes a NamedLayer holding it as "default"."""
    parts_of = module_paths(model)
    for path, adapter in list(iter_adapters(model)):
        if isinstance(_parent_layer(model, parts_of[path]), NamedLayer):
            continue  # already named
        _refuse_stacked(path, adapter)
        layer = NamedLayer(adapter.base, adapter.info, adapter.spec)
        layer.adapters[DEFAULT] = adapter
        layer.names, layer.active, layer.serials = (DEFAULT,), (DEFAULT,), (0,)
        replace_module(model, parts_of[path], layer)


def _refuse_stacked(path: str, adapter: Adapter) -> None:
    if stacked.layer_mask(adapter) is not None or isinstance(adapter, ragged.RaggedLoRA):
        raise ValueError(
            f"{path!r} is a stacked (scanned) layer or a ragged_dot expert layer; named adapters support "
            "unstacked layers only (exclude it from the rules)"
        )


def _parent_layer(model: nnx.Module, parts: tuple[Any, ...]) -> Any:
    """The module two levels up (a NamedLayer holds adapters at ``layer.adapters.<name>``)."""
    return module_at(model, parts[:-2]) if len(parts) >= 2 else None


def _base_view(model: nnx.Module) -> nnx.Module:
    """A copy with every NamedLayer replaced by its base layer: what a config targets."""
    view = nnx.clone(model)
    for path, layer in layers(view):
        replace_module(view, module_paths(view)[path], layer.base)
    return view


def _adopt(new: nnx.Module, name: str, plain: nnx.Module, *, make_active: bool) -> None:
    """In place on ``new``: put the adapters of the plain adapted model ``plain`` (built on
    a base view of ``new``) into ``new``'s layers under ``name``."""
    parts_of = module_paths(new)
    serial = max(_serials(new).values(), default=-1) + 1
    for path, adapter in iter_adapters(plain):
        _refuse_stacked(path, adapter)
        here = module_at(new, parts_of[path])
        if not isinstance(here, NamedLayer):
            layer = NamedLayer(here, adapter.info, adapter.spec)
            replace_module(new, parts_of[path], layer)
            here = layer
        adapter.base = here.base  # share the one base layer: nothing of it is copied
        if not make_active:
            park(adapter)
        here.adapters[name] = adapter
        here.names, here.serials = (*here.names, name), (*here.serials, serial)
        if make_active:
            here.active = (*here.active, name)


def _prepare(model: M, name: str) -> M:
    """A named copy of ``model`` ready to take ``name``; refuses a taken name."""
    _check_name(name)
    new = nnx.clone(model)
    _to_named(new)
    if name in names(new):
        raise ValueError(f"the model already has an adapter named {name!r}; delete it first or choose another name")
    return new


def add(model: M, name: str, cfg: AdapterConfig, *, active: bool = True) -> M:
    """A copy of ``model`` with a new adapter ``name`` on the layers ``cfg`` selects
    (selected as ``apply_adapters`` would on the base model). A model with plain
    adapters (from ``apply_adapters``) keeps them as ``"default"``. ``active=False``
    adds it parked: it neither runs in plain mode nor trains until :func:`activate`."""
    if not isinstance(cfg, AdapterConfig):
        raise TypeError(f"add needs an AdapterConfig, got {type(cfg).__name__}")
    new = _prepare(model, name)
    view = _base_view(new)
    built = nnx.clone(view)
    parts_of = module_paths(built)
    for target, rule in with_shared(find_targets(built, cfg), cfg.seed):
        if isinstance(target, stacked.StackedTarget):
            raise ValueError(
                f"{target.path!r} is a stacked (scanned) layer; named adapters support unstacked layers only "
                "(exclude it from the rules)"
            )
        replace_module(built, parts_of[target.path], ragged.build_adapter(target, rule.variant, seed=cfg.seed))
    _adopt(new, name, built, make_active=active)
    return new


def delete(model: M, name: str) -> M:
    """A copy of ``model`` without the adapter ``name``; a layer left with no adapter is
    the bare base layer again."""
    _require(model, [name], "delete")
    new = nnx.clone(model)
    parts_of = module_paths(new)
    for path, layer in layers(new):
        if name not in layer.names:
            continue
        del layer.adapters[name]
        keep = [k for k, n in enumerate(layer.names) if n != name]
        layer.serials = tuple(layer.serials[k] for k in keep)
        layer.names = tuple(layer.names[k] for k in keep)
        layer.active = tuple(n for n in layer.active if n != name)
        if not layer.names:
            replace_module(new, parts_of[path], layer.base)
    return new


def only(model: M, name: str) -> M:
    """A copy of ``model`` as ``apply_adapters`` would give it with the adapter ``name``
    alone (trainable, at its alpha): for :func:`lora_jax.checkpoint.save`,
    :func:`lora_jax.peft_format.export_peft`, ``merge_adapters`` or a reference."""
    _require(model, [name], "only")
    new = nnx.clone(model)
    parts_of = module_paths(new)
    for path, layer in layers(new):
        if name in layer.names:
            adapter = layer.adapters[name]
            unpark(adapter)
            replace_module(new, parts_of[path], adapter)
        else:
            replace_module(new, parts_of[path], layer.base)
    return new


# -- state: activate, alpha, route -----------------------------------------------------
def activate(model: nnx.Module, *which: str) -> None:
    """Make the named adapters active (in place): they run in plain mode and train."""
    _require(model, which, "activate")
    for _, layer in layers(model):
        for name in which:
            if name in layer.names and name not in layer.active:
                unpark(layer.adapters[name])
                layer.active = tuple(n for n in layer.names if n in (*layer.active, name))


def deactivate(model: nnx.Module, *which: str) -> None:
    """Make the named adapters inactive (in place): their weights are :class:`Parked`,
    so they neither run in plain mode nor train; a route can still use them."""
    _require(model, which, "deactivate")
    for _, layer in layers(model):
        for name in which:
            if name in layer.active:
                park(layer.adapters[name])
                layer.active = tuple(n for n in layer.active if n != name)


def set_alpha(model: nnx.Module, name: str, value: ArrayLike) -> int:
    """Set the plain-mode alpha of adapter ``name`` (a scalar or one value per row);
    returns the number of layers set."""
    _require(model, [name], "set_alpha")
    alpha = as_alpha(value)
    count = 0
    for _, layer in layers(model):
        if name in layer.names:
            layer.adapters[name].alpha.value = alpha
            count += 1
    return count


def route(model: nnx.Module, rows: Sequence[str | None], alpha: ArrayLike = 1.0) -> None:
    """Mixed batch (in place): row ``b`` of the next inputs uses adapter ``rows[b]``
    (``None``: the base model) at ``alpha[b]`` (a scalar: every row). Changing the route
    keeps the jitted forward; a layer that ``rows[b]`` does not adapt is the base layer
    for row ``b``."""
    rows = list(rows)
    if not rows:
        raise ValueError("route needs one entry per batch row; use unroute for plain mode")
    for r in rows:
        if r is not None and not isinstance(r, str):
            raise TypeError(f"route rows are adapter names or None, got {r!r}")
    _require(model, rows, "route")
    values = as_alpha(alpha, what="route alpha")
    if values.ndim == 1 and values.shape[0] != len(rows):
        raise ValueError(f"route alpha has {values.shape[0]} values for {len(rows)} rows; give one per row or a scalar")
    values = jnp.broadcast_to(values, (len(rows),))
    for _, layer in layers(model):
        index = np.asarray([layer.names.index(r) if r in layer.names else -1 for r in rows], np.int32)
        layer.route.value = jnp.asarray(index)
        layer.route_alpha.value = jnp.where(jnp.asarray(index) >= 0, values, 0.0)


def unroute(model: nnx.Module) -> None:
    """Back to plain mode (in place): the active adapters on every row."""
    for _, layer in layers(model):
        layer.route.value = jnp.zeros((0,), jnp.int32)
        layer.route_alpha.value = jnp.zeros((0,), jnp.float32)


# -- files: save, restore, import, hot-swap --------------------------------------------
def save(path: str | Path, model: nnx.Module, name: str | None = None, *, overwrite: bool = False) -> Path:
    """Save adapter ``name`` as an ordinary lora_jax checkpoint at ``path``
    (:func:`lora_jax.checkpoint.save` of :func:`only`), or with ``name=None`` every
    adapter in ``path/<name>`` plus ``path/named.json`` (order, active ones)."""
    path = Path(path)
    if name is not None:
        return checkpoint.save(path, only(model, name), overwrite=overwrite)
    every = names(model)
    if not every:
        raise ValueError("the model has no named adapters to save")
    singles = {n: only(model, n) for n in every}  # all built before any file is written
    for n, single in singles.items():
        checkpoint.save(path / n, single, overwrite=overwrite)
    (path / _INDEX).write_text(json.dumps({"names": every, "active": active(model)}))
    return path


def restore(path: str | Path, model: M, name: str | None = None, *, active: bool = True) -> M:
    """A copy of ``model`` with the checkpoint at ``path`` added as adapter ``name``;
    with ``name=None``, every adapter a :func:`save` of all names wrote (active as saved)."""
    path = Path(path)
    if name is not None:
        new = _prepare(model, name)
        _adopt(new, name, checkpoint.restore(path, _base_view(new)), make_active=active)
        return new
    index = path / _INDEX
    if not index.is_file():
        raise checkpoint.CheckpointError(
            f"{path} has no {_INDEX}: it is not a save of every name; pass name= to restore one checkpoint"
        )
    record = json.loads(index.read_text())
    new = model
    for n in record["names"]:
        new = restore(path / n, new, n, active=n in record["active"])
    return new


def import_peft(
    path: str | Path, model: M, name: str, *, hf_name: Callable[[str], str | None], active: bool = True
) -> M:
    """A copy of ``model`` with PEFT's adapter files at ``path`` added as adapter ``name``
    (:func:`lora_jax.peft_format.import_peft` on the base layers)."""
    new = _prepare(model, name)
    _adopt(new, name, peft_format.import_peft(path, _base_view(new), hf_name=hf_name), make_active=active)
    return new


def _pad_to(value: np.ndarray, shape: tuple[int, ...], what: str) -> np.ndarray:
    if any(n > m for n, m in zip(value.shape, shape, strict=True)):
        raise ValueError(f"{what}: the new weights have shape {value.shape}, more than the slot's {shape}")
    return np.pad(value, [(0, m - n) for n, m in zip(value.shape, shape, strict=True)])


def _slot_values(path: str, old: Adapter, new: Adapter) -> dict[str, Any]:
    """The new adapter's weights laid out for the old one's slot (rank zero-padded)."""
    old_state = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(old, _OWN)), sep=".")
    new_state = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(new, _OWN)), sep=".")
    where = f"layer {path!r}"
    same = old.config == new.config
    lora_pad = (
        type(old) is LoRA
        and type(new) is LoRA
        and dataclasses.replace(new.config, r=old.config.r, lora_alpha=old.config.lora_alpha, rslora=old.config.rslora)
        == old.config
    )
    if not (same or lora_pad) or set(old_state) != set(new_state):
        raise ValueError(
            f"{where}: the slot holds {old.config} but the new weights are {new.config}; a slot takes weights "
            "of the same variant config (LoRA: any rank up to the slot's, any lora_alpha)"
        )
    if not same and new.config.r > old.config.r:
        raise ValueError(f"{where}: rank {new.config.r} is more than the slot's {old.config.r}; add a larger slot")
    out = {k: np.asarray(v) for k, v in new_state.items()}
    if not same:  # the slot scales by its own lora_alpha / r: fold the ratio into B
        out["lora_b"] = out["lora_b"] * np.asarray(new.config.scale / old.config.scale, out["lora_b"].dtype)
    for k, v in out.items():
        out[k] = _pad_to(v, np.shape(old_state[k]), f"{where}, {k}")
    return out


def load(
    model: nnx.Module, name: str, source: str | Path, *, hf_name: Callable[[str], str | None] | None = None
) -> None:
    """Hot-swap (in place): load new weights into the existing adapter ``name``, from a
    lora_jax checkpoint directory or PEFT adapter files (``hf_name`` as for
    :func:`import_peft`). Shapes stay the slot's: a LoRA of lower rank is zero-padded
    (its ``lora_alpha / r`` folded into B), so jitted forwards and ``generate`` are not
    traced again. The new weights must cover exactly the layers ``name`` covers; the
    model is unchanged when anything does not fit. Alpha is kept."""
    _require(model, [name], "load")
    source = Path(source)
    view = _base_view(model)
    if (source / peft_format.CONFIG).is_file():
        if hf_name is None:
            raise ValueError(f"{source} holds PEFT adapter files: pass hf_name= as for import_peft")
        plain = peft_format.import_peft(source, view, hf_name=hf_name)
    else:
        plain = checkpoint.restore(source, view)
    slots = {path: layer.adapters[name] for path, layer in layers(model) if name in layer.names}
    loaded = dict(iter_adapters(plain))
    if set(slots) != set(loaded):
        raise ValueError(
            f"{source} adapts layers {sorted(loaded)} but adapter {name!r} covers {sorted(slots)}; "
            "hot-swap needs the same layers (use delete + restore / import_peft for another layout)"
        )
    planned = {path: _slot_values(path, slots[path], loaded[path]) for path in slots}
    for path, values in planned.items():
        state = nnx.state(slots[path], _OWN)
        arrays = {k: jnp.asarray(v) for k, v in values.items()}
        state.replace_by_pure_dict(traverse_util.unflatten_dict(arrays, sep="."))
        nnx.update(slots[path], state)

