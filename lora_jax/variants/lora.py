"""LoRA: low-rank adaptation. Hu et al. 2021, https://arxiv.org/abs/2106.09685

    y = base(x) + alpha * s * dropout(x) A B,     s = lora_alpha / r   (rsLoRA: / sqrt(r))

Flax layout: ``A (d_in, r)``, ``B (r, d_out)`` (PEFT's ``lora_A.weight.T`` and
``lora_B.weight.T``), one pair per kernel-batch index.

Identity at t=0: B = 0, so the delta is exactly zero; and alpha = 0 adds an exact zero.

Init as PEFT: A ~ kaiming-uniform(a=sqrt(5)) = U(+-1/sqrt(d_in)), B = 0. The runtime
``alpha`` (steering) multiplies the whole delta, so alpha = -1 is the negated delta.
Checked against ``peft.tuners.lora.layer.Linear`` (tests/test_lora.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike

from lora_jax.adapter import Adapter, AdapterParam, Alpha, Target
from lora_jax.peft_codec import PeftCodec, host_array
from lora_jax.variants._checks import check_rank
from lora_jax.variants._lowrank import (
    LORA_AB,
    LORA_PEFT,
    LowRankAdapter,
    LowRankConfig,
    from_peft_entries,
    lora_pair,
    peft_entries,
)


def lora_to_peft(adapter: Adapter) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """PEFT's LoRA tensors of an adapter with ``lora_a`` / ``lora_b`` (alpha folded into B:
    the delta is linear in alpha). On an ``nnx.Embed``, PEFT's Embedding LoRA
    (``lora_embedding_A (r, vocab)``, ``lora_embedding_B (features, r)``); on an
    ``nnx.Conv`` its Conv LoRA (``A (r, c_in, *window)``, ``B`` a 1x1 conv ``(c_out, r, 1, ...)``)."""
    a, b = host_array(adapter.lora_a[...]), host_array(adapter.lora_b[...] * adapter.scalar_alpha())
    kind, shape = adapter.info.kind, adapter.spec.kernel_shape
    if kind == "embed":
        return peft_entries(adapter.config), {"lora_embedding_A": a.T, "lora_embedding_B": b.T}
    if kind == "conv":
        a = np.moveaxis(a.reshape(*shape[:-1], a.shape[-1]), (-1, -2), (0, 1))
        b = b.T.reshape(*b.T.shape, *(1,) * (len(shape) - 2))
        return peft_entries(adapter.config), {"lora_A.weight": a, "lora_B.weight": b}
    return peft_entries(adapter.config), {"lora_A.weight": a.T, "lora_B.weight": b.T}


def _lora_from_peft(cfg: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> tuple[LoRAConfig, dict]:
    if "lora_embedding_A" in tensors:
        a, b = tensors["lora_embedding_A"].T, tensors["lora_embedding_B"].T
    else:  # a conv's (r, c_in, *window) / (c_out, r, 1, ...) become the (d_in, r) / (r, c_out) matrices
        a, b = tensors["lora_A.weight"], tensors["lora_B.weight"]
        a = np.moveaxis(a, (0, 1), (-1, -2)).reshape(-1, a.shape[0]) if a.ndim > 2 else a.T
        b = b.reshape(b.shape[:2]).T
    # An embedding's input is ids, which PEFT's dropout never touches: dropped there.
    keep_dropout = "lora_embedding_A" not in tensors
    return from_peft_entries(LoRAConfig, cfg, a, keep_dropout=keep_dropout), {"lora_a": a, "lora_b": b}


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoRAConfig(LowRankConfig):
    """``r``, ``lora_alpha``, ``rslora``, ``dropout``: see :class:`LowRankConfig`."""

    name = "lora"
    layer_kinds = frozenset({"einsum", "conv", "embed"})
    peft_codec = PeftCodec(
        **LORA_PEFT,
        flags={"use_dora": False},
        suffixes=LORA_AB,
        to_peft=lora_to_peft,
        from_peft=_lora_from_peft,
        folds_alpha=True,
        alt_suffixes=("lora_embedding_A", "lora_embedding_B"),
    )

    def build(self, target: Target, *, seed: int) -> LoRA:
        check_rank(self.name, self.r, target)
        if target.info.kind != "einsum":  # nnx.Conv / nnx.Embed: lora_conv_embed.py
            from lora_jax.variants.lora_conv_embed import build_lora

            return build_lora(target, self, seed=seed)
        return LoRA(target, self, seed=seed)


class LoRA(LowRankAdapter):
    concatenable = True

    def __init__(
        self, target: Target, config: LoRAConfig, *, seed: int, factors: tuple[Array, Array] | None = None
    ):
        """PEFT's random init, or the given ``factors`` ``(A, B)`` (no random draw then)."""
        super().__init__(target, config)
        key_a, key_dropout = jax.random.split(target.key(seed))
        if factors is None:
            self.lora_a, self.lora_b = lora_pair(self, key_a, config.r)
        else:
            a, b = (f.astype(self.dtype) for f in factors)
            self.lora_a, self.lora_b = self.variable(AdapterParam, a, "i-"), self.variable(AdapterParam, b, "-o")
        self.init_dropout(config.dropout, key_dropout)

    def forward(self, x: Array, call_base: Callable[[Array], Array]) -> Array:
        y = call_base(x)
        h = self.adapter_input(x)
        # Scaling in rank space touches r numbers per row instead of d_out.
        h = self.project_in(h, self.lora_a[...]) * (self.alpha_for("hidden", x.ndim) * self.config.scale)
        delta = self.project_out(h, self.lora_b[...], x.ndim)
        return y + delta.astype(y.dtype)

    def merged(self, kernel, bias):
        delta = self.lora_a[...] @ self.lora_b[...]
        return kernel + (self.scalar_alpha() * self.config.scale) * delta, bias

    def concatenate(self, group: Sequence[Adapter], weights: Sequence[ArrayLike]) -> None:
        """PEFT's ``cat``: A and B side by side, so the rank is ``sum r_i`` and the delta the
        weighted sum of the group's deltas (each coefficient, scale and alpha folded into
        its block of A); the config gets ``lora_alpha = r`` (scale 1) and alpha is 1."""
        coefs = [
            jnp.asarray(w, a.dtype) * a.scalar_alpha() * a.config.scale for w, a in zip(weights, group, strict=True)
        ]
        rank = sum(a.config.r for a in group)
        lora_a = jnp.concatenate([c * a.lora_a[...] for c, a in zip(coefs, group, strict=True)], -1)
        lora_b = jnp.concatenate([a.lora_b[...] for a in group], -2)
        self.lora_a, self.lora_b = AdapterParam(lora_a), AdapterParam(lora_b)
        self.config = dataclasses.replace(self.config, r=rank, lora_alpha=float(rank), rslora=False)
        self.alpha = Alpha(jnp.ones((), jnp.float32))
