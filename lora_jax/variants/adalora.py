"""AdaLoRA: adaptive budget allocation for LoRA. Zhang et al. 2023, https://arxiv.org/abs/2303.10512

    y = base(x) + alpha * s * dropout(x) (P diag(E)) Q,     s = lora_alpha / (r + 1e-5)

an SVD-shaped delta of r triplets: ``P (d_in, r)`` (PEFT's ``lora_A.T``), singular values
``E (r,)`` (``lora_E[:, 0]``), ``Q (r, d_out)`` (``lora_B.T``), one set per kernel-batch
index. ``r`` is PEFT's ``init_r`` and stays the divisor while triplets are pruned (PEFT's
``ranknum``). The rank allocation (the paper's point) runs from the training loop:
:mod:`lora_jax.variants.adalora_schedule` scores each triplet, zeroes E outside the
cubic budget and records what it kept in ``rank_mask`` (PEFT's ``rank_pattern``); the
forward reads E alone, as PEFT's does. :func:`adalora_orthogonality_penalty` is PEFT's
regulariser ``||P^T P - I||_F`` and ``||Q Q^T - I||_F`` for the loss.

Identity at t=0: E = 0 (PEFT's init; P, Q ~ N(0, 0.02^2)), so P diag(E) = 0 exactly and
the delta is an exact zero; alpha = 0 adds an exact zero too.

Runtime alpha multiplies the delta: alpha = -1 is the negated delta.
PEFT file (``peft_type`` ADALORA): ``lora_A``, ``lora_B``, ``lora_E`` (no ``ranknum``:
PEFT rebuilds it as ``init_r``), cut to the kept triplets when ``rank_pattern``
(``{"<module>.lora_E": [bool] * init_r}``) is set; import puts the dropped triplets back
as zeros and sets ``rank_mask``. Not implemented: PEFT's ``SVDConv2d``.
Checked against ``peft.tuners.adalora.layer.SVDLinear`` (tests/test_adalora.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float

from lora_jax.adapter import AdapterParam, AdapterState, Target, VariantConfig
from lora_jax.peft_codec import PeftCodec, PeftFormatError, host_array, variant_config
from lora_jax.rotations import safe_norm
from lora_jax.validation import is_int
from lora_jax.variants._checks import check_dropout, check_rank
from lora_jax.variants._lowrank import LowRankAdapter

# Our field -> PEFT's AdaLoraConfig entry, for the schedule and the regulariser.
SCHEDULE = {"target_r": "target_r", "tinit": "tinit", "tfinal": "tfinal", "delta_t": "deltaT", "beta1": "beta1",
            "beta2": "beta2", "orth_reg_weight": "orth_reg_weight", "total_step": "total_step"}  # fmt: skip


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdaLoRAConfig(VariantConfig):
    """``r`` triplets per matrix at the start (PEFT's ``init_r``), ``target_r`` the average
    left at the end, ``lora_alpha`` the scale numerator, ``dropout`` on the input. The
    schedule (PEFT's names): warm-up ``tinit`` steps at full budget, a cubic decrease,
    ``tfinal`` steps at the target; allocation every ``delta_t`` steps (``deltaT``) of
    ``total_step``; EMA factors ``beta1`` (sensitivity), ``beta2`` (uncertainty);
    ``orth_reg_weight`` for :func:`adalora_orthogonality_penalty`. The training loop runs
    the schedule through :func:`lora_jax.variants.adalora_allocator`."""

    name = "adalora"
    r: int = 12
    target_r: int = 8
    lora_alpha: float = 8.0
    dropout: float = 0.0
    tinit: int = 0
    tfinal: int = 0
    delta_t: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_dropout(self.name, self.dropout)
        fail = lambda what: ValueError(f"adalora: {what}")
        if not is_int(self.r) or self.r <= 0:
            raise fail(f"r={self.r!r} (PEFT's init_r) must be a positive integer")
        if not is_int(self.target_r) or self.target_r < 0:  # <= r: checked by adalora_allocator
            raise fail(f"target_r={self.target_r!r} must be an integer >= 0")
        if not self.lora_alpha > 0:
            raise fail(f"lora_alpha={self.lora_alpha!r} must be > 0 (PEFT's 0 means lora_alpha = r)")
        if not (is_int(self.tinit) and is_int(self.tfinal) and self.tinit >= 0 and self.tfinal >= 0):
            raise fail(f"tinit={self.tinit!r} and tfinal={self.tfinal!r} must be integers >= 0")
        if not is_int(self.delta_t) or self.delta_t < 1:
            raise fail(f"delta_t={self.delta_t!r} (PEFT's deltaT) must be an integer >= 1")
        if not (0 < self.beta1 < 1 and 0 < self.beta2 < 1):
            raise fail(f"beta1={self.beta1!r} and beta2={self.beta2!r} must be in (0, 1)")
        if not self.orth_reg_weight >= 0:
            raise fail(f"orth_reg_weight={self.orth_reg_weight!r} must be >= 0")
        if self.total_step is not None and (
            not is_int(self.total_step) or not self.tinit < self.total_step - self.tfinal
        ):
            raise fail(
                f"total_step={self.total_step!r} leaves no budget phase after tinit={self.tinit} and before the "
                f"last tfinal={self.tfinal} steps: raise total_step or lower tinit / tfinal"
            )

    @property
    def scale(self) -> float:
        """PEFT's ``scaling / (ranknum + 1e-5)``, ``ranknum`` the initial rank."""
        return float(np.float32(self.lora_alpha) / (np.float32(self.r) + np.float32(1e-5)))

    def build(self, target: Target, *, seed: int) -> AdaLoRA:
        check_rank(self.name, self.r, target)
        return AdaLoRA(target, self, seed=seed)


class AdaLoRA(LowRankAdapter):
    def __init__(self, target: Target, config: AdaLoRAConfig, *, seed: int):
        super().__init__(target, config)
        batch, spec, r = target.spec.batch_shape, target.spec, config.r
        key_a, key_b, key_dropout = jax.random.split(target.key(seed), 3)
        a = 0.02 * jax.random.normal(key_a, (*batch, spec.d_in, r), self.dtype)
        b = 0.02 * jax.random.normal(key_b, (*batch, r, spec.d_out), self.dtype)
        self.lora_a = self.variable(AdapterParam, a, "i-")
        self.lora_e = self.variable(AdapterParam, jnp.zeros((*batch, r), self.dtype), "-")
        self.lora_b = self.variable(AdapterParam, b, "-o")
        self.rank_mask = self.variable(AdapterState, jnp.ones((*batch, r), jnp.bool_), "-")
        self.init_dropout(config.dropout, key_dropout)

    def scaled_in(self) -> Float[Array, "*batch d_in r"]:
        """``P diag(E)``: E folded into the input factor (r d_in products, no rank-space layout)."""
        return self.lora_a[...] * self.lora_e[...][..., None, :]

    def forward(self, x: Array, call_base: Callable[[Array], Array]) -> Array:
        y = call_base(x)
        h = self.project_in(self.adapter_input(x), self.scaled_in())
        h = h * (self.alpha_for("hidden", x.ndim) * self.config.scale)
        return y + self.project_out(h, self.lora_b[...], x.ndim).astype(y.dtype)

    def merged(self, kernel, bias):
        return kernel + (self.scalar_alpha() * self.config.scale) * (self.scaled_in() @ self.lora_b[...]), bias


def adalora_orthogonality_penalty(model: nnx.Module) -> Float[Array, ""]:
    """PEFT's regulariser (``AdaLoraModel.forward``): ``orth_reg_weight`` times the mean, over
    every P and Q matrix of the model's AdaLoRA adapters, of ``||P^T P - I||_F`` and
    ``||Q Q^T - I||_F``; add it to the loss. 0.0 if there is none."""
    norms, weights = [], set()
    for _, module in nnx.iter_modules(model):
        if isinstance(module, AdaLoRA):
            weights.add(module.config.orth_reg_weight)
            for gram in (jnp.swapaxes(module.lora_a[...], -1, -2) @ module.lora_a[...],
                         module.lora_b[...] @ jnp.swapaxes(module.lora_b[...], -1, -2)):  # fmt: skip
                gap = gram - jnp.eye(gram.shape[-1], dtype=gram.dtype)
                norms.append(safe_norm(gap.reshape(-1, gap.shape[-1] ** 2), -1).astype(jnp.float32))
    if len(weights) > 1:
        raise ValueError(f"AdaLoRA adapters disagree on orth_reg_weight {sorted(weights)}; PEFT has one per model")
    if not norms:
        return jnp.zeros((), jnp.float32)
    return weights.pop() * jnp.mean(jnp.concatenate(norms))


# -- PEFT's format: peft_type ADALORA ------------------------------------------------------
def _to_peft(adapter: AdaLoRA) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Alpha goes into E (the delta is linear in it); only the kept triplets are written."""
    cfg = adapter.config
    if cfg.total_step is None:
        raise PeftFormatError("PEFT's AdaLoraConfig needs total_step > 0: set total_step in AdaLoRAConfig")
    keep = np.asarray(adapter.rank_mask[...])
    e = host_array(adapter.lora_e[...] * adapter.scalar_alpha())
    if np.any(e[~keep]):
        raise PeftFormatError(
            "a triplet outside rank_mask has a non-zero E (trained since the last allocation), which PEFT's file "
            "would drop: call update_and_allocate after the optimizer step before export"
        )
    entries = {"init_r": cfg.r, "lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.dropout}
    entries |= {peft: getattr(cfg, ours) for ours, peft in SCHEDULE.items()}
    entries["rank_pattern"] = None if keep.all() else keep.tolist()
    a, b = host_array(adapter.lora_a[...]), host_array(adapter.lora_b[...])
    return entries, {"lora_A": a[:, keep].T, "lora_B": b[keep].T, "lora_E": e[keep][:, None]}


def _from_peft(cfg: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> tuple[AdaLoRAConfig, dict]:
    odd = {k: cfg[k] for k in ("use_dora", "loftq_config") if cfg.get(k)}
    if odd:
        raise PeftFormatError(f"AdaLoRA with {odd} is not supported (PEFT's AdaLoraConfig refuses it too)")
    missing = sorted({"lora_A", "lora_B", "lora_E"} - set(tensors))
    if missing:
        raise PeftFormatError(f"AdaLoRA module without {missing}")
    a, b, e = tensors["lora_A"], tensors["lora_B"], tensors["lora_E"]
    init_r, pattern = int(cfg.get("init_r", 12)), cfg.get("rank_pattern")
    keep = np.ones(init_r, bool) if pattern is None else np.asarray(pattern, bool)
    if keep.shape != (init_r,) or keep.sum() != a.shape[0] or b.shape[1] != a.shape[0] or e.shape != (a.shape[0], 1):
        raise PeftFormatError(
            f"init_r={init_r} and rank_pattern {pattern} do not fit lora_A {a.shape}, lora_B {b.shape}, "
            f"lora_E {e.shape}: PEFT keeps sum(rank_pattern) of the init_r triplets"
        )
    if "ranknum" in tensors and float(np.ravel(tensors["ranknum"])[0]) != init_r:
        raise PeftFormatError(f"ranknum {tensors['ranknum']} is not init_r={init_r}, which lora_jax divides by")
    full_a, full_b = np.zeros((a.shape[1], init_r), a.dtype), np.zeros((init_r, b.shape[0]), b.dtype)
    full_e = np.zeros(init_r, e.dtype)
    full_a[:, keep], full_b[keep], full_e[keep] = a.T, b.T, e[:, 0]
    alpha = float(cfg.get("lora_alpha", 8))  # PEFT's scaling: lora_alpha, or init_r when it is <= 0
    options = {ours: cfg[peft] for ours, peft in SCHEDULE.items() if peft in cfg}
    config = variant_config(
        lambda: AdaLoRAConfig(
            r=init_r, lora_alpha=alpha if alpha > 0 else float(init_r), dropout=float(cfg.get("lora_dropout") or 0.0),
            **options,
        )
    )  # fmt: skip
    return config, {"lora_a": full_a, "lora_b": full_b, "lora_e": full_e, "rank_mask": keep}


AdaLoRAConfig.peft_codec = PeftCodec(
    "ADALORA",
    flags={},
    patterns={},
    suffixes=("lora_A", "lora_B", "lora_E", "ranknum"),
    to_peft=_to_peft,
    from_peft=_from_peft,
    folds_alpha=True,
    partial=True,
    module_keyed={"rank_pattern": "lora_E"},
)
