"""PiSSA: principal singular values and vectors adaptation. Meng et al. 2024,
https://arxiv.org/abs/2404.02948

    W = U diag(S) Vh + W_res  (top r),   A0 = U sqrt(S/s),   B0 = sqrt(S/s) Vh
    y = base(x) + alpha * s * x (A B - A0 B0),   A = A0, B = B0 at init,   s = lora_alpha / r

Flax layout: ``A (d_in, r)``, ``B (r, d_out)``, one pair per kernel-batch index; ``A0``,
``B0`` are frozen copies of the init. At alpha=1 this equals PEFT's "LoRA on the
residual" ``x W_res + s x B A`` (``W_res = W - s A0 B0``), written as a delta on the
untouched base: no second copy of the kernel, the base keeps its dtype and sharding, and
the adapter can be removed or steered like any other. The price is a rank-2r adapter
matmul: the delta is computed as the LoRA ``x [A - A0, A0] [B; B - B0]``, which is the
same ``x (A B - A0 B0)`` (the cross terms cancel) and is also what :func:`to_lora` returns.

Identity at t=0: bit-exact. ``A - A0`` and ``B - B0`` are exact zeros, so every product
in the delta is zero (no reliance on two equal products cancelling in rounding).

Runtime alpha scales the delta: 0 is the base (bit-exact), 1 the trained adapter, -1 the
negated delta ``W - s (A B - A0 B0)``. Init: full SVD, or with ``svd_iters`` a randomized
SVD with that many power iterations (PEFT's ``pissa_niter_K``) for big kernels. Checked
against ``peft.tuners.lora.layer.Linear`` with ``init_lora_weights="pissa"``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from lora_jax.adapter import AdapterParam, AdapterState, Target
from lora_jax.peft_codec import PeftCodec
from lora_jax.variants._checks import check_rank
from lora_jax.variants._lowrank import LORA_AB, LORA_PEFT, LowRankAdapter, LowRankConfig
from lora_jax.variants._svd import check_svd_fields, move_renamed, renamed, top_r_factors
from lora_jax.variants.lora import LoRA, LoRAConfig, lora_to_peft


def residual_to_peft(adapter: PiSSA) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """PEFT too saves PiSSA / OLoRA as the equivalent rank-2r LoRA (:func:`to_lora`)."""
    return lora_to_peft(to_lora(adapter))


# Export only: a rank-2r LoRA file imports as LoRA.
RESIDUAL_PEFT_CODEC = PeftCodec(
    **LORA_PEFT, flags={"use_dora": False}, suffixes=LORA_AB, to_peft=residual_to_peft, from_peft=None, folds_alpha=True
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PiSSAConfig(LowRankConfig):
    """``r``, ``lora_alpha``, ``rslora``, ``dropout`` as in LoRA. ``svd_iters=None`` takes a
    full SVD; an integer a randomized SVD with that many power iterations and
    ``r + svd_oversample`` sketch columns (:mod:`lora_jax.variants._svd`). ``niter`` /
    ``oversample`` are their deprecated names (configs saved before still restore)."""

    name = "pissa"
    peft_codec = RESIDUAL_PEFT_CODEC
    svd_iters: int | None = None
    svd_oversample: int = 8
    niter: int | None = renamed("svd_iters")
    oversample: int = renamed("svd_oversample")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_svd_fields(self, move_renamed(self))

    def build(self, target: Target, *, seed: int) -> PiSSA:
        check_rank(self.name, self.r, target)
        w = target.kernel_matrix(self.name, self.dtype)
        u, s, vh = top_r_factors(w, self.r, self, target.key(seed))
        root = jnp.sqrt(s / self.scale)  # s cancels in W_res; it only sets the size of A and B
        return PiSSA(target, self, u * root[..., None, :], root[..., :, None] * vh, seed=seed)


class PiSSA(LowRankAdapter):
    """LoRA on the residual of a frozen init ``(A0, B0)``; OLoRA reuses it with a QR init."""

    def __init__(self, target: Target, config: PiSSAConfig, a0: Array, b0: Array, *, seed: int):
        super().__init__(target, config)
        a0, b0 = a0.astype(self.dtype), b0.astype(self.dtype)
        self.lora_a, self.lora_b = self.variable(AdapterParam, a0, "i-"), self.variable(AdapterParam, b0, "-o")
        self.base_a, self.base_b = self.variable(AdapterState, a0, "i-"), self.variable(AdapterState, b0, "-o")
        key = jax.random.fold_in(target.key(seed), 1)  # not the randomized SVD's key
        self.init_dropout(config.dropout, key)

    def lora_factors(self) -> tuple[Float[Array, "*batch d_in r2"], Float[Array, "*batch r2 d_out"]]:
        """``(A', B')`` of rank 2r with ``A' B' = A B - A0 B0``, zero blocks at init."""
        a, b, a0, b0 = self.lora_a[...], self.lora_b[...], self.base_a[...], self.base_b[...]
        return jnp.concatenate([a - a0, a0], axis=-1), jnp.concatenate([b, b - b0], axis=-2)

    def forward(self, x: Array, call_base: Callable[[Array], Array]) -> Array:
        y = call_base(x)
        h = self.adapter_input(x)
        a, b = self.lora_factors()
        h = self.project_in(h, a) * (self.alpha_for("hidden", x.ndim) * self.config.scale)
        return y + self.project_out(h, b, x.ndim).astype(y.dtype)

    def merged(self, kernel, bias):
        a, b = self.lora_factors()
        return kernel + (self.scalar_alpha() * self.config.scale) * (a @ b), bias


def to_lora(adapter: PiSSA) -> LoRA:
    """The same layer as a plain rank-2r LoRA on the original kernel (``B0 A0`` folded in),
    for tools that only know LoRA; scale, dropout rate and alpha are kept. The factors are
    :meth:`PiSSA.lora_factors`, built directly (no random init to overwrite)."""
    config = adapter.config
    r2 = 2 * config.r
    lora_config = LoRAConfig(r=r2, lora_alpha=config.scale * r2, dropout=config.dropout, dtype=config.dtype)
    # The path only seeds the LoRA's dropout stream; the adapter does not know its own.
    target = Target("", adapter.base, adapter.info, adapter.spec)
    lora = LoRA(target, lora_config, seed=0, factors=adapter.lora_factors())
    lora.alpha.value = adapter.alpha[...]
    return lora
