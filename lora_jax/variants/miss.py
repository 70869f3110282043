"""MiSS: matrix shard sharing. Kang et al. 2024, https://arxiv.org/abs/2409.15371

    y = base(x) + alpha * fold(dropout(x)) D,      fold(x)_k = sum_j x_{j r + k}

The input's ``d_in`` features are cut into shards of ``r`` (zero-padded at the end when
``r`` does not divide d_in) and summed, and one trainable block ``D (r, d_out)``
(PEFT's ``miss_block.T``) is shared by every shard: the merged kernel is the base
kernel plus D repeated down the rows, ``K[j r + k, :] += D[k, :]``. With ``mini_r``
(PEFT's ``init_weights="mini"``) D is ``(r, mini_r)`` repeated across the outputs too.
One D per kernel-batch index. The fold costs ``d_in`` adds per row, so the adapter
costs one ``(r, d_out)`` product per row, the price of LoRA's B alone.

Identity at t=0: D = 0 (PEFT's init), so the delta is an exact zero.

Runtime alpha multiplies the delta, so alpha = -1 is the exact inverse (PEFT's unmerge
subtracts the same repeated block). Not implemented: ``init_weights="bat"`` (the
block-wise nonlinear ``W D + D`` form, which rebuilds the dense kernel on every call) and
PEFT's random init (``init_weights=False``: not the base at t=0).
Checked against ``peft.tuners.miss.layer.MissLinear`` (tests/test_miss.py).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float

from lora_jax.adapter import Adapter, AdapterParam, Target, VariantConfig
from lora_jax.peft_codec import PeftCodec, PeftFormatError
from lora_jax.variants._checks import check_dropout


# -- PEFT's format: peft_type MISS, tensor miss_block (r, d_out or mini_r) as ours -------
def miss_to_peft(adapter: MiSS) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The delta is linear in alpha, so alpha goes into the block."""
    cfg = adapter.config
    entries = {"r": cfg.r, "mini_r": cfg.mini_r or 1, "init_weights": True if cfg.mini_r is None else "mini"}
    block = np.asarray(adapter.miss_block[...], np.float32) * np.float32(adapter.scalar_alpha())
    return {**entries, "miss_dropout": cfg.dropout}, {"miss_block": block}


def miss_from_peft(cfg: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> tuple[MiSSConfig, dict]:
    block, kind = tensors["miss_block"], cfg.get("init_weights", True)
    if kind not in (True, "mini") or block.ndim != 2:
        raise PeftFormatError(
            f"MiSS with init_weights={kind!r} (block {block.shape}) is not supported by lora_jax; "
            "only the default (balance) and 'mini' forms are"
        )
    if cfg.get("r", block.shape[0]) != block.shape[0]:
        raise PeftFormatError(f"adapter_config.json gives r={cfg['r']!r} but miss_block has {block.shape[0]} rows")
    mini_r = int(cfg.get("mini_r", 1)) if kind == "mini" else None
    dropout = float(cfg.get("miss_dropout") or 0.0)
    return MiSSConfig(r=block.shape[0], mini_r=mini_r, dropout=dropout), {"miss_block": block}


@dataclasses.dataclass(frozen=True, kw_only=True)
class MiSSConfig(VariantConfig):
    """``r`` shard size (at most d_in); ``mini_r`` None, or the width of a D that is
    repeated across the outputs (must divide d_out); ``dropout`` on the input (train mode)."""

    name = "miss"
    peft_codec = PeftCodec(
        "MISS",
        flags={},
        patterns={},
        suffixes=("miss_block",),
        to_peft=miss_to_peft,
        from_peft=miss_from_peft,
        folds_alpha=True,
    )
    r: int = 64
    mini_r: int | None = None
    dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_dropout(self.name, self.dropout)
        for field in ("r", "mini_r"):
            value = getattr(self, field)
            if (value is not None or field == "r") and (
                not isinstance(value, int) or isinstance(value, bool) or value <= 0
            ):
                raise ValueError(f"miss: {field}={value!r} must be a positive integer")

    def build(self, target: Target, *, seed: int) -> MiSS:
        spec = target.spec
        if self.r > spec.d_in:
            raise ValueError(f"miss: r={self.r} at {target.path!r} exceeds d_in={spec.d_in}; lower r")
        if self.mini_r is not None and spec.d_out % self.mini_r:
            raise ValueError(
                f"miss: mini_r={self.mini_r} does not divide d_out={spec.d_out} at {target.path!r}; "
                "pick a divisor of d_out"
            )
        return MiSS(target, self, seed=seed)


def fold(x: Float[Array, "*rows d_in"], r: int) -> Float[Array, "*rows r"]:
    """Sum of the ``r``-wide shards of the last axis, zero-padded to a multiple of r."""
    pad = -x.shape[-1] % r
    if pad:
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
    return x.reshape(*x.shape[:-1], x.shape[-1] // r, r).sum(axis=-2)


class MiSS(Adapter):
    def __init__(self, target: Target, config: MiSSConfig, *, seed: int):
        super().__init__(target, config)
        spec = target.spec
        width, axes = (spec.d_out, "-o") if config.mini_r is None else (config.mini_r, "--")
        self.miss_block = self.variable(AdapterParam, jnp.zeros((*spec.batch_shape, config.r, width), self.dtype), axes)
        self.dropout = (
            nnx.Dropout(config.dropout, rngs=nnx.Rngs(dropout=target.key(seed))) if config.dropout else None
        )

    def block(self) -> Float[Array, "*batch r d_out"]:
        d = self.miss_block[...]
        return d if self.config.mini_r is None else jnp.tile(d, (1,) * (d.ndim - 1) + (self.spec.d_out // d.shape[-1],))

    def forward(self, x: Array, call_base: Callable[[Array], Array]) -> Array:
        y = call_base(x)
        h = x.astype(self.dtype)
        if self.dropout is not None:
            h = self.dropout(h)
        # (*batch, *free, d_in) folded to (*batch, *free, r): the rank-space layout
        h = fold(self.spec.in_to_matrix(h), self.config.r) * self.alpha_for("hidden", x.ndim)
        return y + self.project_out(h, self.block(), x.ndim).astype(y.dtype)

    def merged(self, kernel, bias):
        d = self.block()
        reps = math.ceil(kernel.shape[-2] / d.shape[-2])
        tiled = jnp.tile(d, (1,) * (d.ndim - 2) + (reps, 1))[..., : kernel.shape[-2], :]
        return kernel + self.scalar_alpha() * tiled, bias
