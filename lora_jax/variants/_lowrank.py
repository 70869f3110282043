"""Pieces the LoRA-shaped variants share, with PEFT's conventions and defaults."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array

from lora_jax.adapter import Adapter, AdapterParam, VariantConfig
from lora_jax.peft_codec import PeftFormatError
from lora_jax.variants._checks import check_dropout

C = TypeVar("C", bound="LowRankConfig")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LowRankConfig(VariantConfig):
    """``r`` rank, ``lora_alpha`` scale numerator (PEFT's ``lora_alpha``), ``rslora``
    for ``lora_alpha / sqrt(r)``, ``dropout`` on the adapter's input (train mode only)."""

    r: int = 8
    lora_alpha: float = 8.0
    rslora: bool = False
    dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_dropout(self.name, self.dropout)

    @property
    def scale(self) -> float:
        """PEFT's ``scaling``."""
        return self.lora_alpha / (math.sqrt(self.r) if self.rslora else self.r)


class LowRankAdapter(Adapter):
    """An adapter whose input may pass dropout (train mode only) before its factors."""

    def init_dropout(self, rate: float, key: jax.Array) -> None:
        """``self.dropout``: an ``nnx.Dropout`` with its own stream, or None at rate 0."""
        self.dropout = nnx.Dropout(rate, rngs=nnx.Rngs(dropout=key)) if rate else None

    def adapter_input(self, x: Array) -> Array:
        """``x`` in the adapter dtype, after dropout when there is one."""
        h = x.astype(self.dtype)
        return h if self.dropout is None else self.dropout(h)


def lora_pair(adapter: Adapter, key: jax.Array, r: int) -> tuple[AdapterParam, AdapterParam]:
    """PEFT's LoRA init as the adapter's Variables: ``A (*batch, d_in, r)`` kaiming-uniform
    (a=sqrt(5)), i.e. U(+-1/sqrt(d_in)), and ``B (*batch, r, d_out)`` zero."""
    spec, dtype = adapter.spec, adapter.dtype
    bound = 1.0 / math.sqrt(spec.d_in)
    a = jax.random.uniform(key, (*spec.batch_shape, spec.d_in, r), dtype, -bound, bound)
    b = jnp.zeros((*spec.batch_shape, r, spec.d_out), dtype)
    return adapter.variable(AdapterParam, a, "i-"), adapter.variable(AdapterParam, b, "-o")


# -- PEFT's LoRA config entries, shared by the LoRA-shaped codecs -------------------------
LORA_PEFT = {"peft_type": "LORA", "patterns": {"r": "rank_pattern", "lora_alpha": "alpha_pattern"}}
LORA_AB = ("lora_A.weight", "lora_B.weight")


def peft_entries(cfg: Any) -> dict[str, Any]:
    """PEFT's per-layer LoRA config entries of a low-rank config."""
    dropout = getattr(cfg, "dropout", 0.0)  # not every low-rank variant has dropout
    return {"r": cfg.r, "lora_alpha": cfg.lora_alpha, "use_rslora": cfg.rslora, "lora_dropout": dropout}


def from_peft_entries(cls: type[C], cfg: Mapping[str, Any], a: np.ndarray, *, keep_dropout: bool) -> C:
    """The low-rank config ``cls`` of one layer from PEFT's entries; ``a`` is A ``(d_in, r)``.
    ``keep_dropout=False`` drops ``lora_dropout`` (train-time only, so the imported
    adapter computes the same)."""
    rank = a.shape[1]
    if "r" in cfg and cfg["r"] != rank:
        raise PeftFormatError(
            f"adapter_config.json gives r={cfg['r']!r} (after rank_pattern) but lora_A.weight has rank {rank} "
            f"(shape {a.T.shape}); PEFT refuses this too. Fix r or rank_pattern in adapter_config.json"
        )
    options = {"r": rank, "lora_alpha": float(cfg["lora_alpha"]), "rslora": bool(cfg.get("use_rslora", False))}
    dropout = float(cfg.get("lora_dropout") or 0.0)
    if dropout and keep_dropout and "dropout" in {f.name for f in dataclasses.fields(cls)}:
        options["dropout"] = dropout
    return cls(**options)
