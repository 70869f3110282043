"""Adapter-only checkpoints with Orbax, restored onto a fresh base model.

    save("ckpt/run1", model)                  # adapter leaves + a JSON record; no base weight
    model = restore("ckpt/run1", base_model)  # apply_adapters(base, saved cfg), then load

A checkpoint holds two Orbax items: ``adapter`` (every ``AdapterParam``,
``AdapterState`` and ``Alpha`` leaf) and ``meta`` (JSON: format, lora_jax version,
adapter paths, ``AdapterConfig``, sha256 digests of config and weights). The config is
read off the model: each adapter already holds its variant config, so the saved
``AdapterConfig`` has one rule per adapter anchored to its exact path. Nothing is
attached to the model and no config argument can disagree with the weights it
describes. The saved ``seed`` is 0: the init it drives is overwritten by the loaded state.

``records`` holds what both kinds share, ``oneshot`` the atomically replaced single
checkpoint (:func:`save`, :func:`restore`), ``train`` the :class:`TrainCheckpointer` of
a training run. Everything that does not fit raises :class:`CheckpointError` naming
what is wrong; the base model passed to :func:`restore` is never modified.
"""

from lora_jax.checkpoint.oneshot import restore, save
from lora_jax.checkpoint.records import CheckpointError, adapter_config
from lora_jax.checkpoint.train import TrainCheckpointer

__all__ = ["CheckpointError", "TrainCheckpointer", "adapter_config", "restore", "save"]
