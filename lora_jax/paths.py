"""Graph paths of a model: where a module sits, how to put another in its place, which
adapters a pattern selects, and the one error for a pattern that selects nothing.

A module's path is the tuple of attribute names / indices ``nnx.iter_modules`` gives
(``("layers", 0, "attn", "q")``), written dotted (``"layers.0.attn.q"``) wherever a
user sees or passes it: rules, alpha patterns, checkpoints, PEFT names. Patterns are
regular expressions searched (``re.search``) in the dotted path.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from flax import nnx

from lora_jax.adapter import Adapter

__all__ = [
    "NoMatchError",
    "dotted",
    "iter_adapters",
    "layer_index",
    "matches",
    "module_at",
    "module_paths",
    "replace_module",
    "select",
]

T = TypeVar("T")
Parts = tuple[Any, ...]


class NoMatchError(ValueError):
    """A rule (or an alpha selection) matched no layer."""


def dotted(parts: Iterable[Any]) -> str:
    """``("layers", 0, "q")`` -> ``"layers.0.q"``."""
    return ".".join(str(p) for p in parts)


def layer_index(path: str) -> int | None:
    """The layer index of a dotted path: its first integer part (``layers.3.q`` -> 3)."""
    for part in path.split("."):
        if part.isdigit():
            return int(part)
    return None


def matches(pattern: str | None, path: str) -> bool:
    """Whether ``pattern`` (a regex; ``None`` selects everything) is found in ``path``."""
    return pattern is None or re.search(pattern, path) is not None


def module_paths(model: nnx.Module) -> dict[str, Parts]:
    """``{dotted path: parts}`` of every module in ``model`` (the root is ``""``)."""
    return {dotted(parts): parts for parts, _ in nnx.iter_modules(model)}


def _is_container(node: Any) -> bool:
    return isinstance(node, nnx.List | nnx.Dict | list | dict)


def module_at(model: nnx.Module, parts: Parts) -> Any:
    """The node at ``parts`` in ``model`` (attributes, or entries of a list / dict /
    ``nnx.List`` / ``nnx.Dict``); ``parts`` as ``nnx.iter_modules`` gives them."""
    node: Any = model
    for p in parts:
        node = node[p] if _is_container(node) else getattr(node, p)
    return node


def replace_module(model: nnx.Module, parts: Parts, new: nnx.Module) -> None:
    """Put ``new`` at ``parts`` in ``model``, in place (an attribute, or an entry of a
    list / dict / ``nnx.List`` / ``nnx.Dict``)."""
    parent = module_at(model, parts[:-1])
    key = parts[-1]
    if _is_container(parent):
        parent[key] = new
    else:
        setattr(parent, key, new)


def iter_adapters(model: nnx.Module) -> Iterator[tuple[str, Adapter]]:
    """``(dotted path, adapter)`` for every adapter in the model."""
    for parts, module in nnx.iter_modules(model):
        if isinstance(module, Adapter):
            yield dotted(parts), module


def select(
    items: Iterable[tuple[str, T]], pattern: str | None, *, caller: str, where: str = ""
) -> list[tuple[str, T]]:
    """The ``(path, item)`` pairs whose path ``pattern`` matches; raises
    :class:`NoMatchError` naming ``caller`` and every adapter path when none does
    (``where`` says where they were looked for, e.g. ``" in this state"``)."""
    items = list(items)
    chosen = [(path, item) for path, item in items if matches(pattern, path)]
    if not chosen:
        names = [path for path, _ in items]
        raise NoMatchError(
            f"{caller}(pattern={pattern!r}) matched no adapter; adapters{where}: {names or 'none'}"
        )
    return chosen
