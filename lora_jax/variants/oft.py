"""OFT: orthogonal finetuning. Qiu et al. 2023, https://arxiv.org/abs/2306.07280
(PEFT's OFTv2 form, Qiu et al. 2025, https://arxiv.org/abs/2506.19847)

    y = base(x R),    R = diag(R_1, ..., R_n),    R_j = I + sum_k c_k Q_j^k

per block of ``b = oft_block_size`` input features (``n = d_in / b`` blocks; one shared
block with ``block_share``). ``Q_j`` is skew-symmetric, stored as its strict upper
triangle in row-major order (``oft_r (*batch, n, b(b-1)/2)``, PEFT's ``oft_R.weight``),
and ``R_j`` is PEFT's truncated Neumann series of the Cayley map ``(I + Q)(I - Q)^-1``:
for the default 5 terms ``c = (2, 2, 2, 1)`` (``I + 2Q + 2Q^2 + 2Q^3 + Q^4``). The
rotation acts on the input, so the base layer, its bias and its dtype are used
unchanged, and it is applied in delta form ``x + x (R - I)``. Merged: ``R K`` (Flax
kernel), PEFT's ``W R^T`` in torch layout.

Identity at t=0: Q = 0 (PEFT's init), so ``x (R - I)`` is an exact zero.

Runtime alpha scales the generator, ``Q -> alpha Q``: ``x (R(alpha) - I) = sum_k c_k
alpha^k x Q^k``, a polynomial in alpha (so one alpha per row costs nothing more).
alpha = 0 is the base bit for bit; alpha = -1 is the series at ``-Q``, i.e. ``R^T``: the
inverse of the exact Cayley rotation that PEFT's series approximates, and the inverse of
``R`` itself up to that truncation (``R(1) R(-1) = I + O(|Q|^4)``; R is orthogonal only
up to the same error). Not implemented: ``use_cayley_neumann=False`` (the exact Cayley
solve), ``coft`` (PEFT projects the weights in place during the forward pass),
``module_dropout`` (training only) and PEFT's silent rounding of an ``r`` /
``oft_block_size`` that does not divide d_in (refused here with the divisors).
Checked against ``peft.tuners.oft.layer.Linear`` (tests/test_oft.py).
"""

from __future__ import annotations

import dataclasses
import string
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from lora_jax import shardings
from lora_jax.adapter import Adapter, AdapterParam, Target, VariantConfig
from lora_jax.einsum_spec import EinsumSpec
from lora_jax.peft_codec import PeftCodec, PeftFormatError


def neumann_coefficients(terms: int) -> tuple[int, ...]:
    """``c_1, c_2, ...`` of PEFT's ``num_cayley_neumann_terms`` series: 2 up to the last
    power, which gets 1 (the last power is ``max(3, terms - 1)``; one term is ``I``)."""
    if terms <= 1:
        return ()
    if terms == 2:
        return (2,)
    return (2,) * (max(3, terms - 1) - 1) + (1,)


def skew(upper: Float[Array, "*lead m"], b: int) -> Float[Array, "*lead b b"]:
    """The skew-symmetric ``S - S^T`` whose strict upper triangle (row-major) is ``upper``."""
    rows, cols = np.triu_indices(b, 1)
    s = jnp.zeros((*upper.shape[:-1], b, b), upper.dtype).at[..., rows, cols].set(upper)
    return s - jnp.swapaxes(s, -1, -2)


def in_from_matrix(spec: EinsumSpec, m: Array, ndim: int) -> Array:
    """Inverse of ``spec.in_to_matrix``: ``(*batch, *free, d_in)`` back to the input layout."""
    lay = spec.layout(ndim)
    order = spec.batch + lay.free + spec.contracted
    sizes = tuple(spec.kernel_shape[spec.kernel.index(c)] for c in spec.contracted)
    split = shardings.reshape(m, (*m.shape[:-1], *sizes))
    return jnp.transpose(split, [order.index(c) for c in lay.lhs])


# -- PEFT's format: peft_type OFT, tensor oft_R.weight (n, b(b-1)/2) as ours -------------
def oft_to_peft(adapter: OFT) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Alpha scales the generator, which is what PEFT computes from ``alpha * oft_R.weight``."""
    cfg = adapter.config
    entries = {"r": cfg.r, "oft_block_size": cfg.oft_block_size, "block_share": cfg.block_share}
    entries |= {"num_cayley_neumann_terms": cfg.num_cayley_neumann_terms, "use_cayley_neumann": True, "coft": False}
    weight = np.asarray(adapter.oft_r[...], np.float32) * np.float32(adapter.scalar_alpha())
    return entries, {"oft_R.weight": weight}


def oft_from_peft(cfg: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> tuple[OFTConfig, dict]:
    """``module_dropout`` acts in training only and is dropped."""
    for key, supported in (("coft", False), ("use_cayley_neumann", True)):
        if cfg.get(key, supported) != supported:
            raise PeftFormatError(f"OFT with {key}={cfg[key]!r} is not supported by lora_jax (see variants/oft.py)")
    config = OFTConfig(
        r=int(cfg.get("r", 0)),
        oft_block_size=int(cfg.get("oft_block_size", 0)),
        block_share=bool(cfg.get("block_share", False)),
        num_cayley_neumann_terms=int(cfg.get("num_cayley_neumann_terms", 5)),
    )
    return config, {"oft_r": tensors["oft_R.weight"]}


@dataclasses.dataclass(frozen=True, kw_only=True)
class OFTConfig(VariantConfig):
    """Exactly one of ``r`` (number of blocks) and ``oft_block_size`` is non-zero, as in
    PEFT; ``block_share`` one rotation for every block; ``num_cayley_neumann_terms``."""

    name = "oft"
    peft_codec = PeftCodec(
        "OFT",
        flags={},
        patterns={},
        suffixes=("oft_R.weight",),
        to_peft=oft_to_peft,
        from_peft=oft_from_peft,
        folds_alpha=True,
    )
    r: int = 0
    oft_block_size: int = 32
    block_share: bool = False
    num_cayley_neumann_terms: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        for field in ("r", "oft_block_size", "num_cayley_neumann_terms"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"oft: {field}={value!r} must be an integer >= 0")
        if (self.r == 0) == (self.oft_block_size == 0):
            raise ValueError(
                f"oft: r={self.r} and oft_block_size={self.oft_block_size}: set exactly one of them "
                "(r blocks of d_in / r features, or blocks of oft_block_size features) and the other to 0"
            )

    def block_size(self, target: Target) -> int:
        d_in, want = target.spec.d_in, self.r or self.oft_block_size
        if d_in % want or want > d_in:
            what = "r" if self.r else "oft_block_size"
            options = [k for k in range(1, min(d_in, 256) + 1) if d_in % k == 0]
            raise ValueError(
                f"{self.name}: {what}={want} does not divide d_in={d_in} at {target.path!r}; "
                f"pick one of {options} (PEFT would round it silently)"
            )
        return d_in // self.r if self.r else self.oft_block_size

    def build(self, target: Target, *, seed: int) -> OFT:
        return OFT(target, self, self.block_size(target))


class OFT(Adapter):
    def __init__(self, target: Target, config: OFTConfig, block: int):
        super().__init__(target, config)
        self.block = block
        n = 1 if config.block_share else target.spec.d_in // block
        shape = (*target.spec.batch_shape, n, block * (block - 1) // 2)
        self.oft_r = self.variable(AdapterParam, jnp.zeros(shape, self.dtype), "--")

    def _generator(self) -> Float[Array, "*batch n b b"]:
        q = skew(self.oft_r[...], self.block)
        n = self.spec.d_in // self.block
        return jnp.broadcast_to(q, (*q.shape[:-3], n, *q.shape[-2:]))

    def rotation_minus_identity(self, alpha: Array) -> Float[Array, "*batch n b b"]:
        """``R(alpha) - I`` per block (``alpha`` a scalar)."""
        q = alpha * self._generator()
        power, total = q, jnp.zeros_like(q)
        for k, c in enumerate(neumann_coefficients(self.config.num_cayley_neumann_terms)):
            power = power if k == 0 else power @ q
            total = total + c * power
        return total

    def forward(self, x: Array, call_base: Callable[[Array], Array]) -> Array:
        spec, nb = self.spec, len(self.spec.batch_shape)
        q = self._generator()  # (*batch, blocks, b, b)
        h = spec.in_to_matrix(x.astype(self.dtype))  # (*batch, *free, d_in)
        free = string.ascii_lowercase[: h.ndim - nb - 1]
        bat = string.ascii_uppercase[:nb]
        h = shardings.reshape(h, (*h.shape[:-1], q.shape[-3], self.block))
        alpha = self.alpha_for("hidden", x.ndim)
        product = f"{bat}{free}xy,{bat}xyz->{bat}{free}xz"
        if alpha.ndim == 0:  # one (blocks, b, b) matrix R - I, then one product per row
            delta = shardings.einsum(product, h, self.rotation_minus_identity(alpha))
        else:  # one alpha per row: the series term by term, x Q^k scaled by alpha^k
            alpha = alpha[..., None]  # over (blocks, block) too
            power, delta = h, jnp.zeros_like(h)
            for k, c in enumerate(neumann_coefficients(self.config.num_cayley_neumann_terms)):
                power = shardings.einsum(product, power, q)
                delta = delta + (c * alpha ** (k + 1)) * power
        delta = in_from_matrix(spec, shardings.reshape(delta, (*delta.shape[:-2], spec.d_in)), x.ndim)
        # computed in the adapter's dtype, added in the layer's: a zero change leaves x bit
        # for bit whatever the two dtypes are (a bf16 adapter on an fp32 layer too)
        return call_base(x + delta.astype(x.dtype))

    def merged(self, kernel, bias):
        d = self.rotation_minus_identity(self.scalar_alpha())
        # The dense block-diagonal R - I, built whole on every device (a one-off, d_in x d_in,
        # as HRA's merge): one product with the kernel keeps the kernel's sharding.
        n, b = d.shape[-3], self.block
        dense = jnp.einsum("nm,...nkc->...nkmc", jnp.eye(n, dtype=d.dtype), d).reshape(*d.shape[:-3], n * b, n * b)
        return kernel + shardings.einsum("...ec,...co->...eo", dense, kernel), bias
