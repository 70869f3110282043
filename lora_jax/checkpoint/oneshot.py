"""One adapter checkpoint, replaced atomically: ``save(path, model)`` / ``restore(path, base)``.

``path`` is a directory holding complete Orbax checkpoints ``v-<id>`` and a pointer file
``CURRENT`` naming the one that counts. A save writes a new version beside the old one
(Orbax itself writes to a temporary directory and renames it when complete), then swaps
the pointer with ``os.replace``, then removes the old version. Killed at any instant,
``path`` names either the old or the new complete checkpoint; whatever the kill left
behind is ignored by :func:`restore` and removed by the next :func:`save`. One writer
per ``path`` at a time: a save removes the versions the pointer does not name.

Checkpoints of format 1 (an Orbax checkpoint directly at ``path``) are still read, and
an overwrite turns them into this layout with the same guarantee.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from pathlib import Path
from typing import TypeVar

import orbax.checkpoint as ocp
from flax import nnx

from lora_jax.adapter import ADAPTER_VARIABLES
from lora_jax.checkpoint.records import (
    ORBAX_TMP,
    CheckpointError,
    check_weights,
    config_from_meta,
    make_meta,
    read_item,
    read_meta,
)
from lora_jax.named_layer import refuse_named
from lora_jax.paths import module_paths
from lora_jax.surgery import apply_adapters

M = TypeVar("M", bound=nnx.Module)

POINTER = "CURRENT"
_VERSION = re.compile(r"v-[0-9a-f]{32}")
# What interrupted saves leave: unreferenced versions, Orbax's temporaries, staged pointers.
_LEFTOVER = re.compile(rf"{_VERSION.pattern}({re.escape(ORBAX_TMP)}.*)?|{POINTER}\.tmp-[0-9a-f]{{32}}")
_FORMAT_1 = ("_CHECKPOINT_METADATA", "adapter", "meta", "commit_success.txt")  # Orbax's files, at path itself


def _reached(step: str) -> None:
    """Called between the steps of a save; the kill-at-every-step test replaces it."""


def _checkpointer() -> ocp.Checkpointer:
    # Handlers named up front: one learned lazily from a partial restore hides the rest.
    handler = ocp.CompositeCheckpointHandler(adapter=ocp.StandardCheckpointHandler(), meta=ocp.JsonCheckpointHandler())
    return ocp.Checkpointer(handler)


def _layout(path: Path) -> str:
    """``"none"``, ``"pointer"`` or ``"format1"``; refuses a path that holds something else."""
    if not path.exists():
        return "none"
    if not path.is_dir():
        raise FileExistsError(f"{path} is a file, not a checkpoint directory; choose another path")
    if (path / POINTER).is_file():
        return "pointer"
    if (path / _FORMAT_1[0]).is_file():
        return "format1"
    foreign = sorted(p.name for p in path.iterdir() if not _LEFTOVER.fullmatch(p.name))
    if foreign:
        raise FileExistsError(
            f"{path} holds files that are not a lora_jax checkpoint ({foreign[:5]}); choose another path, "
            "or remove them"
        )
    return "none"  # empty, or only what an interrupted first save left


def _leftovers(path: Path, current: str | None) -> list[Path]:
    names = [p.name for p in path.iterdir()]
    old = [n for n in names if _LEFTOVER.fullmatch(n) and n != current]
    if current is not None:  # the pointer exists: a format-1 checkpoint here is the old one
        old += [n for n in names if n in _FORMAT_1]
    return [path / n for n in sorted(old)]


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        children = sorted(entry.iterdir())
        if children:  # one child first, so that the test can kill a half-removed version
            _remove(children[0])
            _reached("cleaning")
        shutil.rmtree(entry)
    else:
        entry.unlink(missing_ok=True)


def _current(path: Path) -> str | None:
    pointer = path / POINTER
    return pointer.read_text().strip() if pointer.is_file() else None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(path: str | Path, model: nnx.Module, *, overwrite: bool = False) -> Path:
    """Write ``model``'s adapter state and config to the directory ``path``.

    With ``overwrite=True`` an existing checkpoint is replaced atomically: until the new
    one is complete ``path`` holds the old one, after that the new one.
    """
    path = Path(path).resolve()
    refuse_named(model, "checkpoint.save")  # lora_jax.named.save saves by name
    meta = make_meta(model)  # raises on a model without adapters, before any file is touched
    state = nnx.to_pure_dict(nnx.state(model, ADAPTER_VARIABLES))
    if _layout(path) != "none" and not overwrite:
        raise FileExistsError(f"{path} holds a checkpoint; pass overwrite=True to replace it")
    path.mkdir(parents=True, exist_ok=True)
    for entry in _leftovers(path, _current(path)):
        _remove(entry)
    _reached("started")
    version = f"v-{uuid.uuid4().hex}"
    checkpointer = _checkpointer()
    try:
        args = ocp.args.Composite(adapter=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        checkpointer.save(path / version, args=args)
    finally:
        checkpointer.close()
    _reached("written")
    staged = path / f"{POINTER}.tmp-{uuid.uuid4().hex}"
    with open(staged, "w") as f:
        f.write(version)
        f.flush()
        os.fsync(f.fileno())
    _reached("staged")
    os.replace(staged, path / POINTER)  # the one atomic step: old -> new
    _fsync_dir(path)
    _reached("swapped")
    for entry in _leftovers(path, version):
        _remove(entry)
    return path


def _interrupted_overwrites(path: Path) -> str:
    """Hint for a path that an older lora_jax's two-rename overwrite left empty."""
    siblings = [*path.parent.glob(f"{path.name}.new-*"), *path.parent.glob(f"{path.name}.old-*")]
    found = sorted(p.name for p in siblings if p.is_dir())
    if not found:
        return ""
    return (
        f"; beside it are {found}, left by an overwrite that lora_jax before format 2 did not finish: "
        f"rename the .new-* (newer) or .old-* (older) one to {path.name!r}"
    )


def _checkpoint_dir(path: Path) -> Path:
    """The complete Orbax checkpoint that ``path`` stands for."""
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint directory at {path}{_interrupted_overwrites(path)}")
    current = _current(path)
    if current is not None:
        if not _VERSION.fullmatch(current) or not (path / current).is_dir():
            raise CheckpointError(
                f"{path}: its {POINTER} file names {current[:80]!r}, which is not a checkpoint version there; "
                "the directory was edited or damaged: restore another copy or save again"
            )
        return path / current
    if (path / _FORMAT_1[0]).is_file():
        return path
    found = sorted(p.name for p in path.iterdir())
    raise CheckpointError(
        f"{path} holds no complete checkpoint (found {found[:5]}; a first save killed before it finished "
        "leaves this); save again"
    )


def restore(path: str | Path, base_model: M) -> M:
    """A copy of ``base_model`` with the saved adapters applied and loaded.

    ``base_model`` is the model without adapters (as passed to ``apply_adapters``); it is
    not modified, also when this raises.
    """
    where = _checkpoint_dir(Path(path).resolve())
    checkpointer = _checkpointer()
    try:
        read = lambda args: checkpointer.restore(where, args=args)
        meta = read_meta(where, read)
        cfg, paths = config_from_meta(meta, where)
        layers = set(module_paths(base_model))
        absent = [p for p in paths if p not in layers]
        if absent:
            raise CheckpointError(
                f"{where}: the base model has no layer at {absent} (the checkpoint holds adapters at {paths}); "
                "restore onto the model it was trained on"
            )
        try:
            model = apply_adapters(base_model, cfg)
        except ValueError as err:
            raise CheckpointError(f"{where}: the saved adapters do not fit this base model: {err}") from err
        state = nnx.state(model, ADAPTER_VARIABLES)
        metadata = lambda: checkpointer.metadata(where).item_metadata
        loaded = read_item(nnx.to_pure_dict(state), "adapter", where, metadata, read)
        check_weights(meta, loaded, where)
        state.replace_by_pure_dict(loaded)
    finally:
        checkpointer.close()
    nnx.update(model, state)
    return model
