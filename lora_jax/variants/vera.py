"""VeRA: vector-based random matrix adaptation. Kopiczko et al. 2024, https://arxiv.org/abs/2310.11454

    y = base(x) + alpha * ((x A[:d_in]) * lambda_d) (B[:, :d_out] * lambda_b)

``A (max d_in, r)`` and ``B (r, max d_out)`` (PEFT's ``vera_A.T``, ``vera_B.T``) are frozen
random matrices made once per apply and shared by every layer an equal config adapts;
each layer slices the corner its matrix view needs. Trainable per layer: ``lambda_d (r,)``
and ``lambda_b (d_out,)``, one pair per kernel-batch index (MoE experts and per-head
kernels share A and B too). Folded into the sliced factors, the vectors make the forward
pass LoRA's two rank-r products.

Identity at t=0: lambda_b = 0 (PEFT's init; lambda_d = ``d_initial``), so the out factor
is an exact zero and so is the delta; alpha = 0 adds an exact zero too.

Runtime alpha multiplies the delta (alpha = -1 is its exact negation, PEFT's unmerge);
PEFT export folds it into lambda_b. Sharing: :meth:`VeRAConfig.prepare` (called once per
apply by surgery) sizes the projection from all the targets of the config and draws it
kaiming-uniform as PEFT does (``U(+-sqrt(6 / fan_in))`` of the torch tensors: fan_in is
max d_in for A, r for B) from the apply's seed with JAX's PRNG. It is one
:class:`SharedProjection` module that every adapter references, so ``nnx.state`` holds it
once (at the first adapter's ``vera_projection``); its :class:`RandomProjection` leaves are
``AdapterState``: never trained, saved by checkpoints, replicated on a mesh.
Not implemented: stacked layers (the model's ``nnx.scan`` slices every array of a stacked
block on its layer axis, so one unstacked shared array cannot live there; refused), PEFT's ``save_projection=False`` (it
regenerates A and B with torch's PRNG; refused on import). Checked against
``peft.tuners.vera.layer.Linear`` (tests/test_vera.py).
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float

from lora_jax.adapter import Adapter, AdapterParam, AdapterState, Target, VariantConfig
from lora_jax.peft_codec import PeftCodec, PeftFormatError, check_file_rank, host_array, variant_config
from lora_jax.validation import is_int
from lora_jax.variants._checks import check_dropout
from lora_jax.views import UnsupportedLayerError


class RandomProjection(AdapterState):
    """A frozen random matrix that VeRA adapters share."""


class SharedProjection(nnx.Module):
    """``vera_A (max d_in, r)`` and ``vera_B (r, max d_out)``, one module for many adapters."""

    def __init__(self, a: Array, b: Array, kernel: Any):
        self.vera_A, self.vera_B = _replicated(a, kernel), _replicated(b, kernel)


def _replicated(value: Array, kernel: Any) -> RandomProjection:
    """On the mesh of ``kernel`` (a target's kernel Variable), whole on every device, when
    the kernel carries sharding names; plain otherwise."""
    names = kernel.get_metadata().get("out_sharding") if isinstance(kernel, nnx.Variable) else None
    if names is None:
        return RandomProjection(value)
    spec = (None,) * value.ndim
    mesh = getattr(getattr(kernel[...], "sharding", None), "mesh", None)
    if mesh is None:
        with nnx.use_eager_sharding(False):
            return RandomProjection(value, out_sharding=spec)
    whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return RandomProjection(jax.device_put(value, whole), out_sharding=spec, mesh=mesh)


def kaiming_projection(
    key: jax.Array, d_in: int, d_out: int, r: int, dtype: Any
) -> tuple[Float[Array, "d_in r"], Float[Array, "r d_out"]]:
    """PEFT's init in Flax layout: A ~ U(+-sqrt(6 / d_in)), B ~ U(+-sqrt(6 / r))."""
    key_a, key_b = jax.random.split(key)
    bound_a, bound_b = math.sqrt(6.0 / d_in), math.sqrt(6.0 / r)
    return (
        jax.random.uniform(key_a, (d_in, r), dtype, -bound_a, bound_a),
        jax.random.uniform(key_b, (r, d_out), dtype, -bound_b, bound_b),
    )


# -- PEFT's format: peft_type VERA, per layer vera_lambda_d / _b, model level vera_A / _B -
def vera_to_peft(adapter: VeRA) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The delta is linear in alpha, so alpha goes into lambda_b."""
    cfg = adapter.config
    entries = {"r": cfg.r, "d_initial": cfg.d_initial, "vera_dropout": cfg.dropout, "save_projection": True}
    lam_b = host_array(adapter.vera_lambda_b[...]) * np.float32(adapter.scalar_alpha())
    return {**entries, "projection_prng_key": 0}, {
        "vera_lambda_d": host_array(adapter.vera_lambda_d[...]),
        "vera_lambda_b": lam_b,
    }


def vera_shared_to_peft(adapter: VeRA) -> dict[str, np.ndarray]:
    proj = adapter.vera_projection
    return {"vera_A": host_array(proj.vera_A[...]).T, "vera_B": host_array(proj.vera_B[...]).T}


def vera_from_peft(cfg: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> tuple[VeRAConfig, dict]:
    if not cfg.get("save_projection", True):
        raise PeftFormatError(
            "VeRA saved with save_projection=False holds no vera_A / vera_B: PEFT regenerates them from torch's "
            "PRNG (projection_prng_key), which lora_jax cannot reproduce. Re-save it with save_projection=True"
        )
    lam_d = tensors["vera_lambda_d"]
    check_file_rank(cfg, lam_d.shape[0], f"vera_lambda_d (shape {lam_d.shape})")
    options = {"d_initial": float(cfg.get("d_initial", 0.1)), "dropout": float(cfg.get("vera_dropout") or 0.0)}
    config = variant_config(lambda: VeRAConfig(r=lam_d.shape[0], **options))
    return config, {"vera_lambda_d": lam_d, "vera_lambda_b": tensors["vera_lambda_b"]}


def vera_shared_from_peft(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"vera_projection.vera_A": tensors["vera_A"].T, "vera_projection.vera_B": tensors["vera_B"].T}


@dataclasses.dataclass(frozen=True, kw_only=True)
class VeRAConfig(VariantConfig):
    """``r`` rank of the shared projection (not limited by d_in / d_out: A and B are fixed);
    ``d_initial`` lambda_d's initial value; ``dropout`` on the input (train mode)."""

    name = "vera"
    peft_codec = PeftCodec(
        "VERA",
        flags={},
        patterns={},
        suffixes=("vera_lambda_b", "vera_lambda_d"),
        to_peft=vera_to_peft,
        from_peft=vera_from_peft,
        folds_alpha=True,
        shared_names=("vera_A", "vera_B"),
        shared_to_peft=vera_shared_to_peft,
        shared_from_peft=vera_shared_from_peft,
    )
    r: int = 256
    d_initial: float = 0.1
    dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_dropout(self.name, self.dropout)
        if not is_int(self.r) or self.r <= 0:
            raise ValueError(f"vera: r={self.r!r} must be a positive integer")
        if not math.isfinite(self.d_initial):
            raise ValueError(f"vera: d_initial={self.d_initial!r} must be a finite number")

    def prepare(self, targets: Sequence[Target], *, seed: int) -> SharedProjection:
        """One projection for all ``targets``: ``(max d_in, r)`` and ``(r, max d_out)``."""
        for t in targets:
            kernel = getattr(t.module, t.info.kernel)
            if getattr(kernel, "ndim", 0) > len(t.spec.kernel):
                raise UnsupportedLayerError(
                    f"vera: {t.path!r} is a stacked layer (kernel {tuple(kernel.shape)}, one more leading axis "
                    f"than its einsum {t.info.equation!r} names); VeRA's projection is one array shared by "
                    "every layer, and the model's nnx.scan slices every array of a stacked block on its layer "
                    "axis. Exclude the layer, or use another variant (lora) there"
                )
        d_in, d_out = max(t.spec.d_in for t in targets), max(t.spec.d_out for t in targets)
        key = jax.random.fold_in(jax.random.key(seed), zlib.crc32(b"vera projection"))
        a, b = kaiming_projection(key, d_in, d_out, self.r, jnp.dtype(self.dtype))
        return SharedProjection(a, b, getattr(targets[0].module, targets[0].info.kernel))

    def build(self, target: Target, *, seed: int) -> VeRA:
        # Built alone (not through apply_adapters), a layer gets a projection of its own.
        projection = target.shared if target.shared is not None else self.prepare((target,), seed=seed)
        return VeRA(target, self, projection, seed=seed)


class VeRA(Adapter):
    def __init__(self, target: Target, config: VeRAConfig, projection: SharedProjection, *, seed: int):
        super().__init__(target, config)
        spec = target.spec
        self.vera_projection = projection
        lam_d = jnp.full((*spec.batch_shape, config.r), config.d_initial, self.dtype)
        self.vera_lambda_d = self.variable(AdapterParam, lam_d, "-")
        self.vera_lambda_b = self.variable(AdapterParam, jnp.zeros((*spec.batch_shape, spec.d_out), self.dtype), "o")
        self.dropout = (
            nnx.Dropout(config.dropout, rngs=nnx.Rngs(dropout=target.key(seed))) if config.dropout else None
        )

    def factors(self) -> tuple[Float[Array, "*batch d_in r"], Float[Array, "*batch r d_out"]]:
        """``A[:d_in] diag(lambda_d)`` and ``B[:, :d_out] diag(lambda_b)``: the layer's LoRA pair."""
        lead = (1,) * len(self.spec.batch_shape)  # explicit broadcast over kernel-batch axes
        a = self.vera_projection.vera_A[...][: self.spec.d_in]
        b = self.vera_projection.vera_B[...][:, : self.spec.d_out]
        a = a.reshape(*lead, *a.shape) * self.vera_lambda_d[...][..., None, :]
        b = b.reshape(*lead, *b.shape) * self.vera_lambda_b[...][..., None, :]
        return a, b

    def forward(self, x: Array, call_base: Callable[[Array], Array]) -> Array:
        y = call_base(x)
        h = x.astype(self.dtype)
        if self.dropout is not None:
            h = self.dropout(h)
        a, b = self.factors()
        h = self.project_in(h, a) * self.alpha_for("hidden", x.ndim)
        return y + self.project_out(h, b, x.ndim).astype(y.dtype)

    def merged(self, kernel, bias):
        a, b = self.factors()
        return kernel + self.scalar_alpha() * (a @ b), bias
