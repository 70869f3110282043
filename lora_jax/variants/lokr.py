"""LoKr: low-rank Kronecker product (LyCORIS). Yeh et al. 2024, https://arxiv.org/abs/2309.14859

    y = base(x) + alpha * s * x (W1 kron W2),     s = lora_alpha / r

Flax layout: ``W1 (c, a)``, ``W2 (d, b)`` with ``d_in = c d`` and ``d_out = a b`` (the
divisor pairs of :func:`factorization`, PEFT's split). A factor is either a full matrix
(``lokr_w1`` / ``lokr_w2``) or a rank-r product ``W = B A`` with ``B (., r)`` and
``A (r, .)``: W2 when ``r < max(d, b) / 2``, W1 when also ``decompose_both``. Every
array is PEFT's tensor transposed (``lokr_w1 = lokr_w1.T`` ...), one set per
kernel-batch index. The forward pass never builds the ``d_in x d_out`` delta: the row
``x`` is read as a ``(c, d)`` matrix and ``x (W1 kron W2) = W1^T X W2`` flattened, which
costs ``d_in (a + b)`` per row.

Identity at t=0: W1 = 0 (PEFT zeroes ``lokr_w1``, or ``lokr_w1_a`` when decomposed), so
the delta is an exact zero; alpha = 0 adds an exact zero too.

Init as PEFT (torch kaiming-uniform(a=sqrt 5), U(+-1/sqrt(fan in)) of each torch
tensor). Runtime alpha multiplies the delta: alpha = -1 is the negated delta.
Not implemented: PEFT's ``rank_dropout`` / ``module_dropout`` (training-time only),
``init_weights="lycoris"`` (W2 zeroed instead: a different init of the same layer) and
the conv-only ``use_effective_conv2d``. Checked against ``peft.tuners.lokr.layer.Linear``
(tests/test_lokr.py).
"""

from __future__ import annotations

import dataclasses
import math
import string
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from lora_jax import shardings
from lora_jax.adapter import Adapter, AdapterParam, Target, VariantConfig
from lora_jax.peft_codec import PeftCodec, PeftFormatError


def factorization(dim: int, factor: int = -1) -> tuple[int, int]:
    """``(m, n)`` with ``m n = dim``: ``(factor, dim / factor)`` when ``factor`` divides
    ``dim``; otherwise walk up the divisors of ``dim`` while ``m < n`` and ``m <= factor``
    (no bound for -1), smaller first: the pair closest to ``sqrt(dim)`` (LyCORIS's rule)."""
    if factor > 0 and dim % factor == 0:
        return factor, dim // factor
    limit = dim if factor == -1 else factor
    m = 1
    for divisor in range(2, dim + 1):
        if m >= dim // m:
            break
        if dim % divisor == 0:
            if divisor > limit:
                break
            m = divisor
    return min(m, dim // m), max(m, dim // m)


# -- PEFT's format: peft_type LOKR, each tensor is ours transposed ----------------------
LOKR_TENSORS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")


def lokr_to_peft(adapter: LoKr) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The delta is linear in W1, so alpha goes into ``lokr_w1`` (or ``lokr_w1_a``)."""
    arrays = {n: np.asarray(vars(adapter)[n][...], np.float32) for n in LOKR_TENSORS if n in vars(adapter)}
    first = "lokr_w1" if "lokr_w1" in arrays else "lokr_w1_a"
    arrays[first] = arrays[first] * np.float32(adapter.scalar_alpha())
    cfg = adapter.config
    entries = {"r": cfg.r, "alpha": cfg.lora_alpha, "decompose_both": cfg.decompose_both}
    return {**entries, "decompose_factor": cfg.decompose_factor}, {k: v.T for k, v in arrays.items()}


def lokr_from_peft(cfg: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> tuple[LoKrConfig, dict]:
    """Checks that the file's factors are the ones this config builds (full or decomposed);
    ``rank_dropout`` / ``module_dropout`` act in training only and are dropped."""
    config = LoKrConfig(
        r=int(cfg["r"]),
        lora_alpha=float(cfg["alpha"]),
        decompose_both=bool(cfg.get("decompose_both", False)),
        decompose_factor=int(cfg.get("decompose_factor", -1)),
    )
    w1 = tensors["lokr_w1"] if "lokr_w1" in tensors else tensors["lokr_w1_a"] @ tensors["lokr_w1_b"]
    w2 = tensors["lokr_w2"] if "lokr_w2" in tensors else tensors["lokr_w2_a"] @ tensors["lokr_w2_b"]
    (c, a, w1_low), (d, b, w2_low) = lokr_shapes(config, w1.shape[1] * w2.shape[1], w1.shape[0] * w2.shape[0])
    want = {*(("lokr_w1_a", "lokr_w1_b") if w1_low else ("lokr_w1",))}
    want |= {*(("lokr_w2_a", "lokr_w2_b") if w2_low else ("lokr_w2",))}
    if set(tensors) != want or w1.shape != (a, c) or w2.shape != (b, d):
        raise PeftFormatError(
            f"LoKr tensors {sorted(tensors)} (W1 {w1.shape}, W2 {w2.shape}) are not the factors that r={config.r}, "
            f"decompose_both={config.decompose_both}, decompose_factor={config.decompose_factor} give for this "
            f"layer ({sorted(want)}, W1 {(a, c)}, W2 {(b, d)}); fix r / rank_pattern in adapter_config.json"
        )
    return config, {k: v.T for k, v in tensors.items()}


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoKrConfig(VariantConfig):
    """``r`` rank of a decomposed factor; ``lora_alpha`` the scale numerator (PEFT's
    ``alpha``); ``decompose_both`` lets W1 be decomposed too; ``decompose_factor`` the
    preferred first factor of each dimension (-1: near its square root)."""

    name = "lokr"
    peft_codec = PeftCodec(
        "LOKR",
        flags={},
        patterns={"r": "rank_pattern", "alpha": "alpha_pattern"},
        suffixes=LOKR_TENSORS,
        to_peft=lokr_to_peft,
        from_peft=lokr_from_peft,
        folds_alpha=True,
        partial=True,
    )
    r: int = 8
    lora_alpha: float = 8.0
    decompose_both: bool = False
    decompose_factor: int = -1

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError(f"lokr: r={self.r!r} must be a positive integer")
        f = self.decompose_factor
        if not isinstance(f, int) or isinstance(f, bool) or not (f == -1 or f > 0):
            raise ValueError(f"lokr: decompose_factor={f!r} must be -1 (near the square root) or a positive integer")

    @property
    def scale(self) -> float:
        return self.lora_alpha / self.r

    def build(self, target: Target, *, seed: int) -> LoKr:
        return LoKr(target, self, seed=seed)


def lokr_shapes(config: LoKrConfig, d_in: int, d_out: int) -> tuple[tuple[int, int, bool], tuple[int, int, bool]]:
    """``((c, a, decomposed), (d, b, decomposed))``: W1 and W2's shapes and forms."""
    in_m, in_n = factorization(d_in, config.decompose_factor)
    out_l, out_k = factorization(d_out, config.decompose_factor)
    w1_low = config.decompose_both and config.r < max(out_l, in_m) / 2
    w2_low = config.r < max(out_k, in_n) / 2
    return (in_m, out_l, w1_low), (in_n, out_k, w2_low)


class LoKr(Adapter):
    def __init__(self, target: Target, config: LoKrConfig, *, seed: int):
        super().__init__(target, config)
        batch, dtype, r = target.spec.batch_shape, self.dtype, config.r
        (c, a, w1_low), (d, b, w2_low) = lokr_shapes(config, target.spec.d_in, target.spec.d_out)
        keys = iter(jax.random.split(target.key(seed), 3))

        def param(shape: tuple[int, int], fan_in: int | None) -> AdapterParam:
            """Zeros for ``fan_in=None``, else torch's kaiming-uniform(a=sqrt 5) bound."""
            if fan_in is None:
                return self.variable(AdapterParam, jnp.zeros((*batch, *shape), dtype), "--")
            bound = 1.0 / math.sqrt(fan_in)
            value = jax.random.uniform(next(keys), (*batch, *shape), dtype, -bound, bound)
            return self.variable(AdapterParam, value, "--")  # factor axes split d_in / d_out: replicated

        if w1_low:  # PEFT zeroes lokr_w1_a (torch (a, r)), so W1 = B A starts at 0
            self.lokr_w1_a, self.lokr_w1_b = param((r, a), None), param((c, r), c)
        else:
            self.lokr_w1 = param((c, a), None)
        if w2_low:
            self.lokr_w2_a, self.lokr_w2_b = param((r, b), r), param((d, r), d)
        else:
            self.lokr_w2 = param((d, b), d)

    def _factor(self, which: str) -> Float[Array, "*batch k m"]:
        full = vars(self).get(f"lokr_{which}")
        if full is not None:
            return full[...]
        return getattr(self, f"lokr_{which}_b")[...] @ getattr(self, f"lokr_{which}_a")[...]

    def forward(self, x: Array, call_base: Callable[[Array], Array]) -> Array:
        y = call_base(x)
        spec = self.spec
        w1, w2 = self._factor("w1"), self._factor("w2")
        xm = spec.in_to_matrix(x.astype(self.dtype))  # (*batch, *free, d_in)
        nb = len(spec.batch_shape)
        # split only d_in (row axes stay as they are: they may be sharded)
        xm = shardings.reshape(xm, (*xm.shape[:-1], w1.shape[-2], w2.shape[-2]))
        p, f = string.ascii_uppercase[:nb], string.ascii_lowercase[5 : 5 + xm.ndim - nb - 2]
        h = shardings.einsum(f"{p}{f}cd,{p}db->{p}{f}cb", xm, w2)
        h = shardings.einsum(f"{p}{f}cb,{p}ca->{p}{f}ab", h, w1)
        h = shardings.reshape(h, (*h.shape[:-2], spec.d_out))
        h = h * (self.alpha_for("hidden", x.ndim) * self.config.scale)
        return y + spec.out_from_matrix(h, x.ndim).astype(y.dtype)

    def merged(self, kernel, bias):
        w1, w2 = self._factor("w1"), self._factor("w2")
        kron = (w1[..., :, None, :, None] * w2[..., None, :, None, :]).reshape(kernel.shape)
        return kernel + (self.scalar_alpha() * self.config.scale) * kron, bias
