"""How a variant is written in PEFT's adapter files: the :class:`PeftCodec` a variant declares.

A variant config that PEFT can hold sets the class attribute ``peft_codec``
(:attr:`lora_jax.adapter.VariantConfig.peft_codec`); :mod:`lora_jax.peft_format` reads
and writes the files and asks each adapter's codec for its config entries and tensors.
This module sits below the variants so that each of them can declare its codec in its
own file; it knows no concrete variant.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import jax.numpy as jnp
import numpy as np

if TYPE_CHECKING:
    from lora_jax.adapter import Adapter, VariantConfig

__all__ = ["PeftCodec", "PeftFormatError", "check_file_rank", "host_array", "variant_config"]


class PeftFormatError(ValueError):
    """An adapter that PEFT's format cannot hold, or PEFT files that do not fit the model."""


@dataclasses.dataclass(frozen=True)
class PeftCodec:
    """How one variant is written in PEFT's format.

    ``to_peft(adapter) -> (layer config entries, {tensor suffix: array})``;
    ``from_peft(layer config, {suffix: array}) -> (variant config, {attribute: array})``
    where the layer config is the PEFT config with per-layer patterns already resolved;
    ``from_peft=None`` for an export-only conversion (PiSSA is written as LoRA).
    ``flags`` are the config entries that select this codec on import (``use_dora``),
    ``patterns`` the per-layer config entries and PEFT's pattern dict for each
    (``rank_pattern``). ``member_of`` names the PEFT config list that marks this codec's
    layers (IA3's ``feedforward_modules``). ``folds_alpha``: the codec writes the delta at
    the current alpha; otherwise export needs alpha = 1, since PEFT has no alpha.
    ``alt_suffixes``: the tensor set a layer may have instead (LoRA on an embedding:
    ``lora_embedding_A`` / ``lora_embedding_B``). ``partial``: a layer holds some of
    ``suffixes`` and ``from_peft`` checks which (LoKr's factors are full or low-rank).
    ``shared_names``: model-level tensors ``base_model.<name>`` that every layer of the
    adapter uses (VeRA's projections): ``shared_to_peft(adapter) -> {name: array}``, the
    same for every adapter; ``shared_from_peft({name: array}) -> {attribute path: array}``,
    written on every imported adapter (a dotted path, e.g. into a shared module).
    ``module_keyed``: config entries PEFT keys by tensor name, ``{entry: suffix}``: the
    file holds ``{"<module>.<suffix>": value}`` (AdaLoRA's ``rank_pattern``); ``to_peft``
    gives each layer's value (None: no key for it, and None for the entry if no layer has
    one) and ``from_peft`` gets it (None when absent).
    """

    peft_type: str
    flags: Mapping[str, Any]
    patterns: Mapping[str, str]
    suffixes: tuple[str, ...]
    to_peft: Callable[[Adapter], tuple[dict[str, Any], dict[str, np.ndarray]]]
    from_peft: Callable[[Mapping[str, Any], Mapping[str, np.ndarray]], tuple[VariantConfig, dict]] | None
    member_of: str | None = None
    folds_alpha: bool = False
    alt_suffixes: tuple[str, ...] = ()
    partial: bool = False
    shared_names: tuple[str, ...] = ()
    shared_to_peft: Callable[[Adapter], dict[str, np.ndarray]] | None = None
    shared_from_peft: Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]] | None = None
    module_keyed: Mapping[str, str] = dataclasses.field(default_factory=dict)


def host_array(x: Any) -> np.ndarray:
    """``x`` as a numpy array for a safetensors file (bfloat16 as float32: numpy has none)."""
    x = jnp.asarray(x)
    return np.asarray(x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x)


def check_file_rank(cfg: Mapping[str, Any], rank: int, tensor: str) -> None:
    """The file's ``r`` (after ``rank_pattern``) is the rank its tensors have, as PEFT checks."""
    if "r" in cfg and cfg["r"] != rank:
        raise PeftFormatError(
            f"adapter_config.json gives r={cfg['r']!r} (after rank_pattern) but {tensor} has rank {rank}; "
            "PEFT refuses this too. Fix r or rank_pattern in adapter_config.json"
        )


def variant_config(make: Callable[[], VariantConfig]) -> VariantConfig:
    """``make()``, a variant config built from a file's entries; the variant's own ValueError
    (what is wrong, what is allowed) becomes a :class:`PeftFormatError`."""
    try:
        return make()
    except ValueError as err:
        raise PeftFormatError(str(err)) from err
