"""Adapter-only checkpoints with Orbax, restored onto a fresh base model.

    save("ckpt/run1", model)                  # adapter leaves + a JSON record; no base weight
    model = restore("ckpt/run1", base_model)  # apply_adapters(base, saved cfg), then load

A checkpoint is one Orbax directory with two items: ``adapter`` (every
``AdapterParam``, ``AdapterState`` and ``Alpha`` leaf) and ``meta`` (JSON: format,
lora_jax version, adapter paths, ``AdapterConfig``). The config is read off the model:
each adapter already holds its variant config, so the saved ``AdapterConfig`` has one
rule per adapter anchored to its exact path. Nothing is attached to the model and no
config argument can disagree with the weights it describes. The saved ``seed`` is 0:
the init it drives is overwritten by the loaded state.

Orbax writes into a temporary directory and renames it when complete, so a save killed
midway leaves no checkpoint at ``path`` (and the previous one, with ``overwrite=True``,
untouched). :class:`TrainCheckpointer` keeps a training run: step, adapter, RNG and
optimizer state, every N steps, the last K plus the best by a metric, optionally async.

Everything that does not fit raises :class:`CheckpointError` naming the offending
paths; the base model passed to :func:`restore` is never modified.
"""

from __future__ import annotations

import json
import re
import shutil
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx
from orbax.checkpoint import checkpoint_managers as policies

from lora_jax._version import __version__
from lora_jax.adapter import ADAPTER_VARIABLES
from lora_jax.config import AdapterConfig, Rule
from lora_jax.surgery import apply_adapters, iter_adapters

__all__ = ["CheckpointError", "TrainCheckpointer", "adapter_config", "restore", "save"]

FORMAT = 1
M = TypeVar("M", bound=nnx.Module)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or does not fit the model it is restored onto."""


def adapter_config(model: nnx.Module) -> AdapterConfig:
    """The config that rebuilds ``model``'s adapters exactly: one rule per adapter path."""
    rules = tuple(Rule(pattern=f"^{re.escape(path)}$", variant=a.config) for path, a in iter_adapters(model))
    if not rules:
        raise ValueError("the model holds no adapter; call apply_adapters(model, cfg) before saving")
    return AdapterConfig(rules=rules)


def _meta(model: nnx.Module) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "lora_jax_version": __version__,
        "paths": [path for path, _ in iter_adapters(model)],
        "adapter_config": adapter_config(model).to_dict(),
    }


def _config_from_meta(meta: Any, where: Path) -> tuple[AdapterConfig, list[str]]:
    if not isinstance(meta, dict) or not {"format", "paths", "adapter_config"} <= set(meta):
        raise CheckpointError(f"{where}: the 'meta' record is not a lora_jax checkpoint record: {str(meta)[:200]}")
    if meta["format"] != FORMAT:
        raise CheckpointError(
            f"{where}: checkpoint format {meta['format']} (written by lora_jax {meta.get('lora_jax_version')}) "
            f"is not format {FORMAT} that lora_jax {__version__} reads"
        )
    raw, paths = meta["adapter_config"], meta["paths"]
    rules = []
    for path, rule in zip(paths, raw["rules"], strict=True):
        try:
            rules.append(Rule.from_dict(rule))
        except (ValueError, TypeError) as err:
            raise CheckpointError(f"{where}: the adapter at {path!r} cannot be rebuilt: {err}") from err
    return AdapterConfig(rules=tuple(rules), d_model=raw.get("d_model"), seed=raw.get("seed", 0)), paths


# -- pytrees <-> Orbax ----------------------------------------------------------------
def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, Mapping):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
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


def _read_item(pure: Any, item: str, where: Path, metadata: Callable[[], Any], read: Callable[[Any], Any]) -> Any:
    """Check ``item``'s saved tree against the pure dict ``pure``, then read it."""
    try:
        saved = metadata()[item].tree
    except Exception as err:
        raise CheckpointError(
            f"{where}: cannot read the metadata of item {item!r} (missing, truncated or corrupted?): {err}"
        ) from err
    _compare(_flat(pure), _flat(saved), f"{where} item {item!r}")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, pure)
    try:
        return read(ocp.args.Composite(**{item: ocp.args.StandardRestore(abstract)}))[item]
    except Exception as err:
        raise CheckpointError(
            f"{where}: the arrays of item {item!r} cannot be read (truncated or corrupted?): {err}"
        ) from err


def _read_meta(where: Path, read: Callable[[Any], Any]) -> dict[str, Any]:
    try:
        return read(ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as err:
        raise CheckpointError(
            f"{where}: cannot read the 'meta' record (not a lora_jax checkpoint, or corrupted): {err}"
        ) from err


# -- one adapter -----------------------------------------------------------------------
def _checkpointer() -> ocp.Checkpointer:
    # Handlers named up front: one learned lazily from a partial restore hides the rest.
    handler = ocp.CompositeCheckpointHandler(adapter=ocp.StandardCheckpointHandler(), meta=ocp.JsonCheckpointHandler())
    return ocp.Checkpointer(handler)


def save(path: str | Path, model: nnx.Module, *, overwrite: bool = False) -> Path:
    """Write ``model``'s adapter state and config to the directory ``path``.

    With ``overwrite=True`` an existing checkpoint is replaced only after the new one is
    complete (written beside it, then swapped by two renames).
    """
    path = Path(path).resolve()
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    meta = _meta(model)
    state = nnx.to_pure_dict(nnx.state(model, ADAPTER_VARIABLES))
    target = path.with_name(f"{path.name}.new-{uuid.uuid4().hex[:8]}") if path.exists() else path
    checkpointer = _checkpointer()
    try:
        checkpointer.save(
            target, args=ocp.args.Composite(adapter=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        )
    finally:
        checkpointer.close()
    if target != path:
        old = path.with_name(f"{path.name}.old-{uuid.uuid4().hex[:8]}")
        path.rename(old)
        target.rename(path)
        shutil.rmtree(old)
    return path


def restore(path: str | Path, base_model: M) -> M:
    """A copy of ``base_model`` with the saved adapters applied and loaded.

    ``base_model`` is the model without adapters (as passed to ``apply_adapters``); it is
    not modified, also when this raises.
    """
    path = Path(path).resolve()
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint directory at {path}")
    checkpointer = _checkpointer()
    try:
        read = lambda args: checkpointer.restore(path, args=args)
        cfg, paths = _config_from_meta(_read_meta(path, read), path)
        layers = {".".join(str(p) for p in parts) for parts, _ in nnx.iter_modules(base_model)}
        absent = [p for p in paths if p not in layers]
        if absent:
            raise CheckpointError(
                f"{path}: the base model has no layer at {absent} (the checkpoint holds adapters at {paths}); "
                "restore onto the model it was trained on"
            )
        try:
            model = apply_adapters(base_model, cfg)
        except ValueError as err:
            raise CheckpointError(f"{path}: the saved adapters do not fit this base model: {err}") from err
        state = nnx.state(model, ADAPTER_VARIABLES)
        metadata = lambda: checkpointer.metadata(path).item_metadata
        state.replace_by_pure_dict(_read_item(nnx.to_pure_dict(state), "adapter", path, metadata, read))
    finally:
        checkpointer.close()
    nnx.update(model, state)
    return model


# -- a training run --------------------------------------------------------------------
class TrainCheckpointer:
    """Checkpoints of a training run around ``ocp.CheckpointManager``.

        ckpt = TrainCheckpointer("runs/a", save_every=100, keep_last=3, best_metric="val_loss")
        start = ckpt.restore(model, optimizer) or 0      # resumes in place when one exists
        for step in range(start + 1, n_steps + 1):
            loss = train_step(model, optimizer, batch(step))
            ckpt.save(step, model, optimizer, metrics={"val_loss": ...})
        ckpt.close()

    A checkpoint holds the adapter state, the model's RNG state (dropout streams) and
    ``nnx.state(optimizer)``, so a resumed run takes the same steps as an uninterrupted
    one, given the same batches. Steps that are multiples of ``save_every`` are saved;
    the last ``keep_last`` and the ``keep_best`` best by ``best_metric`` are kept.
    ``async_save`` writes in a background thread; :meth:`wait` blocks until done.
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        save_every: int,
        keep_last: int = 3,
        best_metric: str | None = None,
        best_mode: str = "min",
        keep_best: int = 1,
        async_save: bool = True,
    ):
        if save_every < 1 or keep_last < 1 or keep_best < 1:
            raise ValueError(f"save_every={save_every}, keep_last={keep_last}, keep_best={keep_best} must be >= 1")
        if best_mode not in ("min", "max"):
            raise ValueError(f"best_mode={best_mode!r} must be 'min' or 'max'")
        self.directory = Path(directory).resolve()
        self.best_metric, self.best_mode = best_metric, best_mode
        keep: list[Any] = [policies.LatestN(n=keep_last)]
        best_fn = None
        if best_metric is not None:
            best_fn = lambda metrics: metrics[best_metric]
            # BestN keeps the top of an ascending sort; descending keeps the smallest.
            keep.append(policies.BestN(get_metric_fn=best_fn, reverse=best_mode == "min", n=keep_best))
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=policies.FixedIntervalPolicy(save_every),
            preservation_policy=policies.AnyPreservationPolicy(keep),
            best_fn=best_fn,  # only so that Orbax writes the metrics and answers best_step
            best_mode=best_mode,
            enable_async_checkpointing=async_save,
        )
        handlers = {item: ocp.StandardCheckpointHandler() for item in ("adapter", "train")}
        handlers["meta"] = ocp.JsonCheckpointHandler()
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def save(
        self,
        step: int,
        model: nnx.Module,
        optimizer: nnx.Optimizer,
        *,
        metrics: Mapping[str, Any] | None = None,
        force: bool = False,
    ) -> bool:
        """Save when ``step`` is due (or ``force``); returns whether it saved."""
        if self.best_metric is not None and (metrics is None or self.best_metric not in metrics):
            raise ValueError(f"this checkpointer keeps the best by {self.best_metric!r}: pass metrics={{...}} with it")
        pure = lambda *f: nnx.to_pure_dict(nnx.state(*f))
        train = {"rng": pure(model, nnx.RngState), "optimizer": pure(optimizer)}
        args = ocp.args.Composite(
            adapter=ocp.args.StandardSave(pure(model, ADAPTER_VARIABLES)),
            train=ocp.args.StandardSave(train),  # one item: the RNG state alone may be empty
            meta=ocp.args.JsonSave({**_meta(model), "step": step}),
        )
        scalars = None if metrics is None else {k: float(v) for k, v in metrics.items()}
        return self._manager.save(step, args=args, metrics=scalars, force=force)

    def restore(
        self, model: nnx.Module, optimizer: nnx.Optimizer | None = None, *, step: int | None = None
    ) -> int | None:
        """Load step ``step`` (default: the latest) into ``model`` and ``optimizer`` in place.

        Returns the step, or None when the directory holds no checkpoint. Pass
        ``optimizer=None`` to load only the adapter (e.g. the best step for evaluation).
        """
        self._manager.wait_until_finished()
        step = self._manager.latest_step() if step is None else step
        if step is None:
            return None
        if step not in self._manager.all_steps():
            raise CheckpointError(f"{self.directory}: no step {step}; saved steps: {list(self._manager.all_steps())}")
        where = self.directory / str(step)
        read = lambda args: self._manager.restore(step, args=args)
        saved, ours = _read_meta(where, read), json.loads(json.dumps(_meta(model)))
        _config_from_meta(saved, where)  # format and variant names are known
        if (saved["paths"], saved["adapter_config"]) != (ours["paths"], ours["adapter_config"]):
            differ = sorted(set(saved["paths"]) ^ set(ours["paths"])) or saved["paths"]
            raise CheckpointError(
                f"{where}: the checkpoint's adapters differ from the model's (paths or variant configs; "
                f"check {differ}); build the model with the config the run was started with"
            )
        metadata = lambda: self._manager.item_metadata(step)
        adapter = nnx.state(model, ADAPTER_VARIABLES)
        adapter.replace_by_pure_dict(_read_item(nnx.to_pure_dict(adapter), "adapter", where, metadata, read))
        updates = [(model, adapter)]
        if optimizer is not None:  # everything is read and checked before anything is updated
            rng, opt = nnx.state(model, nnx.RngState), nnx.state(optimizer)
            train = {"rng": nnx.to_pure_dict(rng), "optimizer": nnx.to_pure_dict(opt)}
            train = _read_item(train, "train", where, metadata, read)
            rng.replace_by_pure_dict(train["rng"])
            opt.replace_by_pure_dict(train["optimizer"])
            updates += [(model, rng), (optimizer, opt)]
        for obj, state in updates:
            nnx.update(obj, state)
        return step

    def best_step(self) -> int | None:
        """The kept step with the best ``best_metric`` (None without a metric or steps)."""
        return None if self.best_metric is None else self._manager.best_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> TrainCheckpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
