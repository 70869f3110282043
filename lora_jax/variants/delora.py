"""DeLoRA: decoupled low-rank adaptation. Bini et al. 2025, https://arxiv.org/abs/2503.18225

    y = base(x) + alpha * ((x * w) A) diag(lambda / (r |a_i| |b_i|)) B

Flax layout: ``A (d_in, r)`` with columns ``a_i``, ``B (r, d_out)`` with rows ``b_i``,
``w (d_in,)`` the frozen norms of the kernel's input rows (PEFT's ``W.norm(dim=0)``),
``lambda`` a trainable scalar per kernel-batch index (PEFT default 15). Each rank-1 term
is normalised, so the update's norm is bounded by ``|alpha| lambda`` times the input-row
norms whatever A and B grow to. Norms are clamped at 1e-4 as in PEFT (on the squared
norm, so the gradient at B = 0 is finite). Once a row of B leaves the clamp its term has
the full normalised size, so the first optimizer step from B = 0 already moves the layer
by up to lambda / r per rank: a large jump at PEFT's lambda = 15.

Identity at t=0: bit-exact (B = 0, so the last matmul is over exact zeros; B's clamped
norm keeps the scale finite).

Runtime alpha scales the delta: 0 is the base (bit-exact), 1 the trained adapter, -1 the
negated delta (the mirror update, inside the same bound). The paper suggests a learning
rate 10-100x LoRA's; ``lambda`` has its own Variable type for a separate rate. Checked
against ``peft.tuners.delora.layer.DeloraLinear``.

PEFT file (``peft_type`` DELORA): ``delora_A (r, d_in) = A^T``, ``delora_B (d_out, r) = B^T``,
``delora_lambda (1,)``, ``delora_w_norm (d_in,)``; config ``r`` / ``rank_pattern``,
``delora_lambda`` / ``lambda_pattern`` (the initial bound), ``module_dropout`` (PEFT's
dropout on the adapter input, this ``dropout``). The delta is linear in lambda, so export
folds alpha into ``delora_lambda``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from lora_jax.adapter import AdapterParam, AdapterState, Target, VariantConfig
from lora_jax.linalg import column_norms, row_norms
from lora_jax.peft_codec import PeftCodec, check_file_rank, host_array, variant_config
from lora_jax.variants._checks import check_dropout, check_rank
from lora_jax.variants._lowrank import LowRankAdapter, lora_pair

_CLAMP = 1e-4  # PEFT's floor on the factor norms: keeps the scale finite at B = 0


class DeLoRALambda(AdapterParam):
    """DeLoRA's per-layer bound lambda: its own type so it can get its own learning rate."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class DeLoRAConfig(VariantConfig):
    """``r`` rank, ``delora_lambda`` initial bound (PEFT default 15), ``dropout`` on the
    adapter's input (train mode only)."""

    name = "delora"
    r: int = 8
    delora_lambda: float = 15.0
    dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_dropout(self.name, self.dropout)

    def build(self, target: Target, *, seed: int) -> DeLoRA:
        check_rank(self.name, self.r, target)
        w_norm = row_norms(target.kernel_matrix(self.name, self.dtype))
        return DeLoRA(target, self, w_norm, seed=seed)


class DeLoRA(LowRankAdapter):
    def __init__(self, target: Target, config: DeLoRAConfig, w_norm: Array, *, seed: int):
        super().__init__(target, config)
        key_a, key_dropout = jax.random.split(target.key(seed))
        self.lora_a, self.lora_b = lora_pair(self, key_a, config.r)
        lam = jnp.full(target.spec.batch_shape, config.delora_lambda, self.dtype)
        self.delora_lambda = self.variable(DeLoRALambda, lam, "")
        self.w_norm = self.variable(AdapterState, w_norm.astype(self.dtype), "i")
        self.init_dropout(config.dropout, key_dropout)

    def _rank_scale(self) -> Array:
        """``lambda / (r |a_i| |b_i|)``, shape ``(*batch, r)``."""
        norms = column_norms(self.lora_a[...], _CLAMP) * row_norms(self.lora_b[...], _CLAMP)
        return self.delora_lambda[...][..., None] / self.config.r / norms

    def forward(self, x: Array, call_base: Callable[[Array], Array]) -> Array:
        y = call_base(x)
        h = self.adapter_input(x)
        h = self.project_in(h * self.spec.in_broadcast(self.w_norm[...], x.ndim, like=h), self.lora_a[...])
        h = h * (self.spec.rank_broadcast(self._rank_scale(), x.ndim) * self.alpha_for("hidden", x.ndim))
        return y + self.project_out(h, self.lora_b[...], x.ndim).astype(y.dtype)

    def merged(self, kernel, bias):
        a = self.w_norm[...][..., :, None] * self.lora_a[...] * self._rank_scale()[..., None, :]
        return kernel + self.scalar_alpha() * (a @ self.lora_b[...]), bias


def _to_peft(adapter: DeLoRA) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    cfg = adapter.config
    entries = {"r": cfg.r, "delora_lambda": cfg.delora_lambda, "module_dropout": cfg.dropout}
    return entries, {
        "delora_A": host_array(adapter.lora_a[...]).T,
        "delora_B": host_array(adapter.lora_b[...]).T,
        "delora_lambda": host_array(adapter.delora_lambda[...] * adapter.scalar_alpha()).reshape(1),
        "delora_w_norm": host_array(adapter.w_norm[...]),
    }


def _from_peft(cfg: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> tuple[DeLoRAConfig, dict]:
    a, b, lam = tensors["delora_A"].T, tensors["delora_B"].T, tensors["delora_lambda"]
    check_file_rank(cfg, a.shape[1], f"delora_A (shape {a.T.shape})")
    options = {"delora_lambda": float(cfg.get("delora_lambda", 15)), "dropout": float(cfg.get("module_dropout") or 0)}
    config = variant_config(lambda: DeLoRAConfig(r=a.shape[1], **options))
    lam = lam.reshape(()) if lam.size == 1 else lam  # (1,) in PEFT, one scalar per layer here
    return config, {"lora_a": a, "lora_b": b, "delora_lambda": lam, "w_norm": tensors["delora_w_norm"]}


DeLoRAConfig.peft_codec = PeftCodec(
    "DELORA",
    flags={},
    patterns={"r": "rank_pattern", "delora_lambda": "lambda_pattern"},
    suffixes=("delora_A", "delora_B", "delora_lambda", "delora_w_norm"),
    to_peft=_to_peft,
    from_peft=_from_peft,
    folds_alpha=True,
)
