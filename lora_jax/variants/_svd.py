"""The randomized-SVD setting of the SVD-initialised variants (PiSSA, AntiPaSTO): one pair
of field names, ``svd_iters`` / ``svd_oversample``, one check and one dispatch.

``svd_iters=None`` takes the exact top-r SVD; an integer K a randomized SVD with K power
iterations and ``r + svd_oversample`` sketch columns (:func:`lora_jax.linalg.randomized_svd`;
PEFT's ``pissa_niter_K`` is K with no oversampling).

PiSSA called these ``niter`` / ``oversample`` before. Configs and checkpoints saved then
still restore: :func:`renamed` keeps an old name as a field that is accepted (with a
DeprecationWarning), moved to the new one, and never saved.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import jax
from jaxtyping import Array, Float

from lora_jax.linalg import randomized_svd, top_r_svd
from lora_jax.validation import is_int

__all__ = ["RENAMED_UNSET", "check_svd_fields", "move_renamed", "renamed", "top_r_factors"]


class _Unset:
    def __repr__(self) -> str:
        return "<unset>"


RENAMED_UNSET: Any = _Unset()


def renamed(new: str) -> Any:
    """A field under a deprecated name: accepted for configs saved before the rename,
    moved to ``new`` by :func:`move_renamed`, left out of saved configs
    (``lora_jax.config`` skips fields with ``renamed_to`` metadata)."""
    return dataclasses.field(default=RENAMED_UNSET, repr=False, compare=False, metadata={"renamed_to": new})


def move_renamed(config: Any) -> dict[str, str]:
    """Move values given under deprecated names to their new fields, with a
    DeprecationWarning; returns ``{new name: the name the caller used}``."""
    used = {}
    defaults = {f.name: f.default for f in dataclasses.fields(config)}
    for f in dataclasses.fields(config):
        new = f.metadata.get("renamed_to")
        value = getattr(config, f.name)
        if new is None or value is RENAMED_UNSET:
            continue
        if getattr(config, new) != defaults[new]:
            raise TypeError(f"{config.name}: {f.name}= is the old name of {new}=; pass only {new}")
        warnings.warn(
            f"{config.name}: {f.name}= is now called {new}= (one name across variants); {f.name}= will be removed",
            DeprecationWarning,
            stacklevel=5,
        )
        object.__setattr__(config, new, value)
        object.__setattr__(config, f.name, RENAMED_UNSET)
        used[new] = f.name
    return used


def check_svd_fields(config: Any, used: dict[str, str] | None = None) -> None:
    """Refuse a bad ``svd_iters`` / ``svd_oversample``, named as the caller wrote them."""
    used = used or {}
    iters, over = used.get("svd_iters", "svd_iters"), used.get("svd_oversample", "svd_oversample")
    if config.svd_iters is not None and not (is_int(config.svd_iters) and config.svd_iters >= 0):
        raise ValueError(f"{config.name}: {iters}={config.svd_iters!r} must be None (full SVD) or an integer >= 0")
    if not is_int(config.svd_oversample) or config.svd_oversample < 0:
        raise ValueError(
            f"{config.name}: {over}={config.svd_oversample!r} must be an integer >= 0 (extra randomized-SVD "
            "sketch columns, e.g. 8)"
        )


def top_r_factors(
    matrix: Float[Array, "*batch d_in d_out"], r: int, config: Any, key: jax.Array
) -> tuple[Float[Array, "*batch d_in r"], Float[Array, "*batch r"], Float[Array, "*batch r d_out"]]:
    """The top-``r`` SVD ``(U, S, Vh)`` of ``matrix`` as ``config.svd_iters`` asks: exact or
    randomized (``key`` draws the sketch)."""
    if config.svd_iters is None:
        return top_r_svd(matrix, r)
    return randomized_svd(matrix, r, niter=config.svd_iters, key=key, oversample=config.svd_oversample)
