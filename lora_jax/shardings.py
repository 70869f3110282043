"""Reshapes and einsums that carry their sharding on meshes with Explicit axes.

With ``AxisType.Explicit`` mesh axes (the default of ``jax.make_mesh``) an array's
sharding is part of its type, and JAX refuses to guess it: a reshape that splits or
merges a sharded axis, a contraction over a sharded axis, and a product whose result
would use one mesh axis twice all need the caller to say the result's sharding. The
functions here derive it from the operands; on Auto-axis meshes and on one device they
are the plain ``jnp`` calls.

Rules (the same that :func:`lora_jax.adapter.shard_spec` uses for adapter factors):

- A flattened axis keeps the mesh axes of its parts only when each device still holds
  one contiguous block: sharded parts first, and only the last sharded part split into
  blocks longer than one. Otherwise the parts are first gathered (replicated), which
  never changes a value, only where it lives.
- An einsum's output axis takes the mesh axes of the operand that has it (the first
  operand wins); a mesh axis already used by an earlier output axis is dropped, and a
  sharded contraction is summed across devices by XLA.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from jaxtyping import Array

__all__ = [
    "einsum",
    "einsum_out_names",
    "explicit_names",
    "like",
    "merged_names",
    "reshape",
    "split_names",
    "whole_matrices",
]

Names = tuple[Any, ...]  # one entry per array axis: None, a mesh-axis name or a tuple of them


def _axes(entry: Any) -> tuple[str, ...]:
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, tuple) else (entry,)


def _entry(axes: Sequence[str]) -> Any:
    return None if not axes else axes[0] if len(axes) == 1 else tuple(axes)


def explicit_names(x: Array) -> Names | None:
    """``x``'s mesh-axis names per axis when it lives on a mesh with Explicit axes, else None."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or mesh.empty or AxisType.Explicit not in tuple(mesh.axis_types):
        return None
    spec = tuple(sharding.spec)
    return spec + (None,) * (x.ndim - len(spec))


def merged_names(names: Names, sizes: Sequence[int], mesh_shape: dict[str, int]) -> tuple[bool, Any]:
    """Mesh axes of the flattening of axes ``sizes`` sharded as ``names``: ``(ok, entry)``.

    ``ok`` is False when a device's share of the flat axis would not be one contiguous
    block (a sharded axis after an unsharded one, or after one split into longer blocks).
    """
    flat: list[str] = []
    contiguous = True  # every axis so far is split into blocks of length one
    for entry, size in zip(names, sizes, strict=True):
        axes = _axes(entry)
        shards = math.prod(mesh_shape[a] for a in axes)
        if axes and not contiguous:
            return False, None
        flat += axes
        contiguous = contiguous and shards == size
    return True, _entry(flat)


def split_names(entry: Any, sizes: Sequence[int], mesh_shape: dict[str, int]) -> Names | None:
    """Names for the axes ``sizes`` that a flat axis sharded as ``entry`` splits into, or
    None when a device's block is not a block of the split axes."""
    rest = list(_axes(entry))
    out: list[Any] = []
    for size in sizes:
        mine: list[str] = []
        # (an axis of length one takes no mesh axis, not even one of a single device)
        while rest and size > 1 and size % (math.prod(mesh_shape[a] for a in mine) * mesh_shape[rest[0]]) == 0:
            mine.append(rest.pop(0))
        shards = math.prod(mesh_shape[a] for a in mine)
        if rest and shards != size:  # the remaining mesh axes would stride, not block
            return None
        out.append(_entry(mine))
    return None if rest else tuple(out)


def _groups(old: Sequence[int], new: Sequence[int]) -> list[tuple[list[int], list[int]]]:
    """Pair runs of ``old`` axes with runs of ``new`` axes of the same total size."""
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(old) and j < len(new):
        a, b = [i], [j]
        size_a, size_b = old[i], new[j]
        while size_a != size_b:
            if size_a < size_b:
                i += 1
                a.append(i)
                size_a *= old[i]
            else:
                j += 1
                b.append(j)
                size_b *= new[j]
        groups.append((a, b))
        i, j = i + 1, j + 1
    if groups:  # trailing size-one axes join the last group
        groups[-1][0].extend(range(i, len(old)))
        groups[-1][1].extend(range(j, len(new)))
    else:
        groups.append((list(range(len(old))), list(range(len(new)))))
    return groups


def _named(x: Array, names: Names) -> NamedSharding:
    return NamedSharding(jax.typeof(x).sharding.mesh, P(*names))


def reshape(x: Array, shape: Sequence[int]) -> Array:
    """``x.reshape(shape)``, keeping every mesh axis that can be kept (see the module rules)."""
    shape = tuple(shape)
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        shape = tuple(x.size // known if s == -1 else s for s in shape)
    names = explicit_names(x)
    if names is None or all(n is None for n in names) or tuple(x.shape) == shape:
        return jnp.reshape(x, shape)
    mesh_shape = dict(jax.typeof(x).sharding.mesh.shape)
    old, new = list(names), [None] * len(shape)
    for a, b in _groups(x.shape, shape):
        ok, entry = merged_names(tuple(names[k] for k in a), [x.shape[k] for k in a], mesh_shape)
        split = split_names(entry, [shape[k] for k in b], mesh_shape) if ok else None
        if split is None:  # gather this group first: correct, only less spread out
            for k in a:
                old[k] = None
            split = (None,) * len(b)
        for k, n in zip(b, split, strict=True):
            new[k] = n
    if tuple(old) != names:
        x = jax.sharding.reshard(x, _named(x, tuple(old)))
    return jnp.reshape(x, shape, out_sharding=_named(x, tuple(new)))


def whole_matrices(m: Array) -> Array:
    """``m`` with its last two axes gathered on every device (batch axes stay sharded):
    what a decomposition (SVD, QR, LU) of a sharded kernel needs on Explicit axes."""
    names = explicit_names(m)
    if names is None or names[-2:] == (None, None):
        return m
    return jax.sharding.reshard(m, _named(m, (*names[:-2], None, None)))


def like(v: Array, x: Array) -> Array:
    """``v``, which broadcasts against ``x``, sharded like ``x`` on the axes they share
    (Explicit axes refuse to broadcast two differently sharded axes against each other);
    its length-one axes are replicated."""
    names = explicit_names(x)
    if names is None:
        return v
    lead = x.ndim - v.ndim
    target = tuple(None if v.shape[k] == 1 else names[lead + k] for k in range(v.ndim))
    return v if explicit_names(v) == target else jax.sharding.reshard(v, _named(x, target))


def einsum_out_names(equation: str, *operand_names: Names | None) -> Names:
    """Mesh axes of an einsum's output from its operands' (see the module rules)."""
    inputs, out = equation.replace(" ", "").split("->")
    by_letter: dict[str, Any] = {}
    n_ellipsis = 0
    for letters, names in zip(inputs.split(","), operand_names, strict=True):
        if "..." in letters:  # stand-in letters for the '...' axes, aligned from the right
            n = (len(names) if names is not None else 0) - (len(letters) - 3)
            n_ellipsis = max(n_ellipsis, n)
            letters = letters.replace("...", "".join(chr(0x100 + n - k) for k in range(n)))
        for c, n in zip(letters, names or (None,) * len(letters), strict=True):
            if by_letter.get(c) is None:
                by_letter[c] = n
    out = out.replace("...", "".join(chr(0x100 + n_ellipsis - k) for k in range(n_ellipsis)))
    used: set[str] = set()
    result = []
    for c in out:
        axes = [a for a in _axes(by_letter.get(c)) if a not in used]
        used |= set(axes)
        result.append(_entry(axes))
    return tuple(result)


def einsum(equation: str, a: Array, b: Array, out_names: Names | None = None) -> Array:
    """``jnp.einsum(equation, a, b)`` with the output sharding that Explicit axes need:
    ``out_names`` when given, else derived from the operands."""
    names_a, names_b = explicit_names(a), explicit_names(b)
    if names_a is None and names_b is None:
        return jnp.einsum(equation, a, b)
    if out_names is None:
        out_names = einsum_out_names(equation, names_a, names_b)
    like = a if names_a is not None else b
    return jnp.einsum(equation, a, b, out_sharding=_named(like, out_names))
