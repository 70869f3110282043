"""LoRA on ``nnx.Conv`` and ``nnx.Embed`` (PEFT's Conv and Embedding LoRA). Hu et al. 2021,
https://arxiv.org/abs/2106.09685

    conv:   y = base(x)   + alpha * s * conv(dropout(x), A) B     A: kernel (*window, c_in, r), B (r, c_out)
    embed:  y = base(ids) + alpha * s * A[ids] B                  A (vocab, r), B (r, features)

``conv(x, A)`` uses the base's window, stride, padding mode and dilations; ``B`` is a 1x1
convolution, i.e. a matmul over channels. Both store ``A (d_in, r)`` and ``B (r, d_out)``
in the layer's matrix view (:mod:`lora_jax.layer_kinds`: ``d_in = prod(window) * c_in``
for a conv, ``vocab`` for an embedding), so the merge ``W + alpha * s * A B`` and every
state transform are LoRA's own.

Identity at t=0: conv B = 0; embed A = 0 (PEFT's embedding init: A zero, B ~ N(0, 1));
either way the delta is exactly zero, and alpha = 0 adds an exact zero.

Differences from PEFT, both for merge-exactness: the A convolution keeps the base's
dilation and padding mode (PEFT's drops them, so its merged layer then differs from its
forward); ``EmbedLoRA.attend`` (tied output head) uses the adapted table, as the merged
model does. Checked against ``peft.tuners.lora.layer.Conv1d/2d/3d`` and ``Embedding``
(tests/test_lora_conv_embed.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array

from lora_jax.adapter import Adapter, AdapterParam, Target
from lora_jax.layer_kinds import conv_factor, conv_with_kernel, lookup, per_row
from lora_jax.variants.lora import LoRA

if TYPE_CHECKING:
    from lora_jax.variants.lora import LoRAConfig


class ConvLoRA(LoRA):
    """LoRA around an ``nnx.Conv``; weights, init and merge are :class:`LoRA`'s."""

    def forward(self, x: Array, call_base: Callable[[Array], Array]) -> Array:
        y = call_base(x)
        h = self.adapter_input(x)
        kernel = conv_factor(self.spec.kernel_shape, self.lora_a[...])
        h = conv_with_kernel(self.base, h, kernel)
        h = h * (per_row(self.alpha[...].astype(self.dtype), h.ndim) * self.config.scale)
        return y + (h @ self.lora_b[...]).astype(y.dtype)


class EmbedLoRA(LoRA):
    """LoRA around an ``nnx.Embed``: a lookup into ``A``, then ``B``; merge is :class:`LoRA`'s."""

    def __init__(self, target: Target, config: LoRAConfig, *, seed: int):
        Adapter.__init__(self, target, config)
        spec, r = self.spec, config.r
        a = jnp.zeros((spec.d_in, r), self.dtype)
        b = jax.random.normal(target.key(seed), (r, spec.d_out), self.dtype)
        self.lora_a, self.lora_b = self.variable(AdapterParam, a, "i-"), self.variable(AdapterParam, b, "-o")
        self.dropout = None

    def forward(self, x: Array, call_base: Callable[[Array], Array]) -> Array:
        y = call_base(x)
        h = lookup(self.lora_a[...], x)
        h = h * (per_row(self.alpha[...].astype(self.dtype), h.ndim) * self.config.scale)
        return y + (h @ self.lora_b[...]).astype(y.dtype)

    def attend(self, query: Array, out_sharding=None) -> Array:
        """The tied output head ``query @ table.T`` with the adapted table, so the adapted
        model equals its merged one also when it shares the embedding as its head."""
        y = self.base.attend(query, out_sharding=out_sharding)
        h = query.astype(self.dtype) @ self.lora_b[...].T
        h = h * (per_row(self.alpha[...].astype(self.dtype), h.ndim) * self.config.scale)
        return y + (h @ self.lora_a[...].T).astype(y.dtype)


def build_lora(target: Target, config: LoRAConfig, *, seed: int) -> LoRA:
    """The LoRA adapter for a conv or embed target (``LoRAConfig.build`` dispatches here)."""
    layer_type = {"conv": nnx.Conv, "embed": nnx.Embed}.get(target.info.kind)
    if layer_type is None or not isinstance(target.module, layer_type):
        raise ValueError(
            f"lora: {target.path!r} is a {type(target.module).__name__} whose view says kind "
            f"{target.info.kind!r}; that kind is for nnx.Conv / nnx.Embed layers only (a registered view is an einsum)"
        )
    if target.info.kind == "conv":
        return ConvLoRA(target, config, seed=seed)
    if config.dropout:
        raise ValueError(
            f"lora: dropout={config.dropout} at {target.path!r}, an embedding: its input is token ids, "
            "which dropout cannot act on (PEFT ignores it there); give embeddings a rule with dropout=0"
        )
    return EmbedLoRA(target, config, seed=seed)
