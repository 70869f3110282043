"""Checkpoints of a training run: step, adapter, RNG and optimizer state, on Orbax's manager.

Every ``save_every`` steps, the last ``keep_last`` plus the ``keep_best`` best by a
metric, optionally written in the background. A restore reads and checks everything
(paths, shapes, the record's digests) before it changes the model or optimizer; when
the step asked for cannot be read, the error names the steps that can.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp
from flax import nnx
from orbax.checkpoint import checkpoint_managers as policies

from lora_jax.adapter import ADAPTER_VARIABLES
from lora_jax.checkpoint.records import (
    ORBAX_TMP,
    CheckpointError,
    check_weights,
    config_from_meta,
    describe,
    make_meta,
    read_item,
    read_meta,
)
from lora_jax.paths import iter_adapters


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
        if self.directory.is_dir():  # what a killed save left; Orbax's own cleanup runs in the background
            for tmp in self.directory.glob(f"*{ORBAX_TMP}*"):
                shutil.rmtree(tmp)
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
        if not force and not self._manager.should_save(step):
            return False  # before the record: its weights digest reads the arrays back to the host
        pure = lambda *f: nnx.to_pure_dict(nnx.state(*f))
        train = {"rng": pure(model, nnx.RngState), "optimizer": pure(optimizer)}
        args = ocp.args.Composite(
            adapter=ocp.args.StandardSave(pure(model, ADAPTER_VARIABLES)),
            train=ocp.args.StandardSave(train),  # one item: the RNG state alone may be empty
            meta=ocp.args.JsonSave({**make_meta(model), "step": step}),
        )
        scalars = None if metrics is None else {k: float(v) for k, v in metrics.items()}
        return self._manager.save(step, args=args, metrics=scalars, force=force)

    def restore(
        self, model: nnx.Module, optimizer: nnx.Optimizer | None = None, *, step: int | None = None
    ) -> int | None:
        """Load step ``step`` (default: the latest) into ``model`` and ``optimizer`` in place.

        Returns the step, or None when the directory holds no checkpoint. Pass
        ``optimizer=None`` to load only the adapter (e.g. the best step for evaluation).
        Nothing changes unless the whole step reads and checks out; when it does not, the
        :class:`CheckpointError` names the other saved steps that do (each is read to tell).
        """
        if not list(iter_adapters(model)):
            raise CheckpointError(
                "the model has no adapters to restore into; call apply_adapters(model, cfg) with the config the "
                "run was started with, then restore"
            )
        self._manager.wait_until_finished()
        steps = list(self._manager.all_steps())
        if step is None:
            step = self._manager.latest_step()
            if step is None:
                return None
        elif step not in steps:
            raise CheckpointError(f"{self.directory}: no step {step}; saved steps: {steps}")
        try:
            updates = self._read(step, model, optimizer)
        except CheckpointError as err:
            readable = []
            for other in sorted(set(steps) - {step}, reverse=True):
                try:
                    self._read(other, model, optimizer)
                    readable.append(other)
                except CheckpointError:
                    pass
            advice = (
                f"steps that read cleanly: {readable}; restore one with restore(model, optimizer, step={readable[0]})"
                if readable
                else f"no other saved step ({sorted(set(steps) - {step})}) reads cleanly either"
            )
            raise CheckpointError(f"step {step} cannot be restored ({advice}): {err}") from err
        for obj, state in updates:  # everything was read and checked before anything is updated
            nnx.update(obj, state)
        return step

    def _read(self, step: int, model: nnx.Module, optimizer: nnx.Optimizer | None) -> list[tuple[Any, nnx.State]]:
        """Step ``step``'s states for ``model`` (and ``optimizer``), read and checked; nothing is updated."""
        where = self.directory / str(step)
        read = lambda args: self._manager.restore(step, args=args)
        saved = read_meta(where, read)
        cfg, _ = config_from_meta(saved, where)  # checks format, variant names, config digest
        ours = describe(model)
        # Compared as rebuilt today, so a config saved under a field's older name still matches.
        theirs = json.loads(json.dumps(cfg.to_dict()))
        if (saved["paths"], theirs) != (ours["paths"], ours["adapter_config"]):
            differ = sorted(set(saved["paths"]) ^ set(ours["paths"])) or saved["paths"]
            raise CheckpointError(
                f"{where}: the checkpoint's adapters differ from the model's (paths or variant configs; "
                f"check {differ}); build the model with the config the run was started with"
            )
        metadata = lambda: self._manager.item_metadata(step)
        adapter = nnx.state(model, ADAPTER_VARIABLES)
        loaded = read_item(nnx.to_pure_dict(adapter), "adapter", where, metadata, read)
        check_weights(saved, loaded, where)
        adapter.replace_by_pure_dict(loaded)
        updates: list[tuple[Any, nnx.State]] = [(model, adapter)]
        if optimizer is not None:
            rng, opt = nnx.state(model, nnx.RngState), nnx.state(optimizer)
            train = {"rng": nnx.to_pure_dict(rng), "optimizer": nnx.to_pure_dict(opt)}
            train = read_item(train, "train", where, metadata, read)
            rng.replace_by_pure_dict(train["rng"])
            opt.replace_by_pure_dict(train["optimizer"])
            updates += [(model, rng), (optimizer, opt)]
        return updates

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
