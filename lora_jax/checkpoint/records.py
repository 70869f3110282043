"""What both checkpoint kinds share: the JSON record, its digest, and checked reads.

The record (item ``meta``) holds the format, the adapter paths, an exact
``AdapterConfig`` and, from format 2 on, a sha256 digest of each part: ``config``
over the canonical JSON of the paths and config, ``weights`` over every adapter leaf's
key, shape, dtype and bytes. A restore recomputes both and names the part that changed.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from flax import nnx

from lora_jax._version import __version__
from lora_jax.adapter import ADAPTER_VARIABLES
from lora_jax.config import AdapterConfig, Rule
from lora_jax.paths import iter_adapters

FORMAT = 2  # 2: the record carries a digest; 1 (no digest) is still read
READABLE_FORMATS = (1, 2)
ORBAX_TMP = ".orbax-checkpoint-tmp"  # the suffix of Orbax's directory for a save in progress


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or does not fit the model it is restored onto."""


def adapter_config(model: nnx.Module) -> AdapterConfig:
    """The config that rebuilds ``model``'s adapters exactly: one rule per adapter path."""
    rules = tuple(Rule(pattern=f"^{re.escape(path)}$", variant=a.config) for path, a in iter_adapters(model))
    if not rules:
        raise ValueError("the model holds no adapter; call apply_adapters(model, cfg) before saving")
    return AdapterConfig(rules=rules)


# -- digest ----------------------------------------------------------------------------
def config_digest(meta: Mapping[str, Any]) -> str:
    canonical = json.dumps(
        {"paths": meta["paths"], "adapter_config": meta["adapter_config"]}, sort_keys=True, separators=(",", ":")
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def weights_digest(pure: Any) -> str:
    sha = hashlib.sha256()
    for key, leaf in sorted(flat(pure).items()):
        if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        array = np.ascontiguousarray(np.asarray(leaf))
        sha.update(f"{key}|{array.shape}|{array.dtype.str}|".encode())
        sha.update(array.tobytes())
    return sha.hexdigest()


def describe(model: nnx.Module) -> dict[str, Any]:
    """The record's paths and config of ``model``'s adapters, as JSON would give them back."""
    paths = [path for path, _ in iter_adapters(model)]
    return json.loads(json.dumps({"paths": paths, "adapter_config": adapter_config(model).to_dict()}))


def make_meta(model: nnx.Module) -> dict[str, Any]:
    meta: dict[str, Any] = {"format": FORMAT, "lora_jax_version": __version__, **describe(model)}
    weights = weights_digest(nnx.to_pure_dict(nnx.state(model, ADAPTER_VARIABLES)))
    return {**meta, "digest": {"config": config_digest(meta), "weights": weights}}


def check_weights(meta: Mapping[str, Any], pure: Any, where: Path) -> None:
    """Refuse arrays whose digest differs from the one saved (format 1 saved none)."""
    if "digest" in meta and weights_digest(pure) != meta["digest"]["weights"]:
        raise CheckpointError(
            f"{where}: the adapter weights changed since they were saved (their sha256 digest differs from the "
            "record's): the files are corrupted or were edited; restore another copy or save again"
        )


def config_from_meta(meta: Any, where: Path) -> tuple[AdapterConfig, list[str]]:
    """The saved config and paths, after checking the record's shape, format and config digest."""
    if not isinstance(meta, dict) or not {"format", "paths", "adapter_config"} <= set(meta):
        raise CheckpointError(f"{where}: the 'meta' record is not a lora_jax checkpoint record: {str(meta)[:200]}")
    if meta["format"] not in READABLE_FORMATS:
        raise CheckpointError(
            f"{where}: checkpoint format {meta['format']} (written by lora_jax {meta.get('lora_jax_version')}) "
            f"is not one of the formats {READABLE_FORMATS} that lora_jax {__version__} reads"
        )
    raw, paths = meta["adapter_config"], meta["paths"]
    rules = raw.get("rules") if isinstance(raw, dict) else None
    if not isinstance(paths, list) or not isinstance(rules, list):
        raise CheckpointError(f"{where}: the 'meta' record's paths or rules are not lists; the record is damaged")
    repeated = sorted({p for p in paths if paths.count(p) > 1})
    if len(paths) != len(rules) or repeated:
        unmatched = paths[len(rules) :] or [r.get("pattern") if isinstance(r, dict) else r for r in rules[len(paths) :]]
        raise CheckpointError(
            f"{where}: the 'meta' record lists {len(paths)} adapter paths {paths} for {len(rules)} rules, one per "
            f"path expected (without a partner: {unmatched}; repeated: {repeated}); the record is damaged: "
            "restore another copy or save again"
        )
    out = []
    for path, rule in zip(paths, rules, strict=True):
        try:
            out.append(Rule.from_dict(rule))
        except (ValueError, TypeError, KeyError) as err:
            raise CheckpointError(f"{where}: the adapter at {path!r} cannot be rebuilt: {err}") from err
        if not re.fullmatch(out[-1].pattern, path):
            raise CheckpointError(
                f"{where}: the rule for {path!r} has pattern {out[-1].pattern!r}, which does not match it; "
                "the record is damaged: restore another copy or save again"
            )
    if meta["format"] >= 2:
        digest = meta.get("digest")
        if not isinstance(digest, dict) or not {"config", "weights"} <= set(digest):
            raise CheckpointError(f"{where}: the 'meta' record of format {meta['format']} has no digest; it is damaged")
        if config_digest(meta) != digest["config"]:
            raise CheckpointError(
                f"{where}: the adapter config in the 'meta' record changed since it was saved (its sha256 digest "
                "differs from the record's): the record was edited or corrupted; restore another copy or save again"
            )
    return AdapterConfig(rules=tuple(out), d_model=raw.get("d_model"), seed=raw.get("seed", 0)), paths


# -- pytrees <-> Orbax ----------------------------------------------------------------
def flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, Mapping):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flat(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: tree}


def _signature(leaf: Any) -> tuple[tuple[int, ...], str]:
    if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):  # Orbax stores a key as its raw data
        leaf = jax.random.key_data(leaf)
    return tuple(leaf.shape), str(jnp.dtype(leaf.dtype))


def _compare(expected: dict[str, Any], found: dict[str, Any], where: str) -> None:
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    differ = [
        f"{k}: checkpoint {_signature(found[k])} vs model {_signature(expected[k])}"
        for k in sorted(set(expected) & set(found))
        if _signature(found[k]) != _signature(expected[k])
    ]
    problems = []
    if missing:
        problems.append(f"missing from the checkpoint: {missing}")
    if extra:
        problems.append(f"in the checkpoint but not in the model: {extra}")
    if differ:
        problems.append(f"shape/dtype differs (shape, dtype): {differ}")
    if problems:
        raise CheckpointError(
            f"{where} does not match the model; " + "; ".join(problems) + ". Restore onto the architecture and "
            "adapter config it was saved from."
        )


def _read_every_byte(item_dir: Path, item: str, where: Path) -> None:
    """Read the item's OCDBT store key by key, synchronously, before Orbax opens it.

    Orbax opens all arrays at once in an event loop it closes at the first failure; the
    other opens then complete onto the closed loop and print "Event loop is closed"
    tracebacks from tensorstore's threads. A damaged store fails here instead, quietly.
    """
    if not (item_dir / "manifest.ocdbt").is_file():
        return  # not an OCDBT store: Orbax reports what it finds
    try:
        store = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{item_dir}/"}).result()
        for key in store.list().result():
            store.read(key).result()
    except Exception as err:
        raise CheckpointError(
            f"{where}: the arrays of item {item!r} cannot be read (truncated or corrupted?): {err}"
        ) from err


def read_item(pure: Any, item: str, where: Path, metadata: Callable[[], Any], read: Callable[[Any], Any]) -> Any:
    """Check ``item``'s saved tree against the pure dict ``pure``, then read it."""
    _read_every_byte(where / item, item, where)
    try:
        saved = metadata()[item].tree
    except Exception as err:
        raise CheckpointError(
            f"{where}: cannot read the metadata of item {item!r} (missing, truncated or corrupted?): {err}"
        ) from err
    _compare(flat(pure), flat(saved), f"{where} item {item!r}")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, pure)
    try:
        return read(ocp.args.Composite(**{item: ocp.args.StandardRestore(abstract)}))[item]
    except Exception as err:
        raise CheckpointError(
            f"{where}: the arrays of item {item!r} cannot be read (truncated or corrupted?): {err}"
        ) from err


def read_meta(where: Path, read: Callable[[Any], Any]) -> dict[str, Any]:
    try:
        return read(ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as err:
        raise CheckpointError(
            f"{where}: cannot read the 'meta' record (not a lora_jax checkpoint, or corrupted): {err}"
        ) from err
