"""Any adapter served as a plain LoRA: the merged delta, truncated by SVD, in PEFT's LoRA files.

    report = save_as_lora("out/", model, hf_name=to_hf_name, rank=16)        # or max_error=0.05
    report.errors    # {layer path: relative Frobenius error of the written delta}

Serving engines (vLLM, sglang-jax, tpu-inference) load PEFT's LoRA format and little else.
Every lora_jax variant has a merged kernel (:meth:`lora_jax.adapter.Adapter.merged`), so
each adapted layer has an exact delta ``D = merged(alpha) - W`` in the kernel's matrix
view ``(d_in, d_out)`` (:meth:`lora_jax.einsum_spec.EinsumSpec.kernel_to_matrix`). Its SVD
``D = U diag(s) Vh`` truncated to rank ``k`` is the best rank-k approximation
(Eckart-Young), written as ``A = U_k diag(sqrt s_k)``, ``B = diag(sqrt s_k) Vh_k`` with
``lora_alpha = r`` (scale 1), through :func:`lora_jax.peft_format.export_peft`, so ranks
that differ per layer go into PEFT's ``rank_pattern`` and an ``nnx.Conv`` / ``nnx.Embed``
layer becomes PEFT's Conv / Embedding LoRA.

``rank=k`` gives every layer rank ``min(k, d_in, d_out)``; ``max_error=e`` gives each
layer the smallest rank whose relative error ``|D - A B|_F / |D|_F`` is at most ``e``
(from the singular values: ``sqrt(sum_{i>k} s_i^2 / sum s_i^2)``). The reported error is
measured on the written factors. A layer whose delta is exactly zero is written at rank
1 with zero factors (error 0).

Alpha: the delta is taken at ``alpha`` (default 1), whatever alpha the model holds; a
variant that is not linear in alpha (AntiPaSTO's rotations, DoRA, IA3's power) needs one
file per alpha, e.g. :func:`save_as_lora_pair` for the +1 / -1 steering pair.

A bias delta (IA3's output gate and ROAD scale or rotate the bias too) has no place in a
plain LoRA: ``bias="refuse"`` (default) raises, ``bias="drop"`` writes the kernel part
and counts the dropped bias in the reported error, which is then
``|[D; db] - [A B; 0]|_F / |[D; db]|_F``. (PEFT's ``lora_bias`` could hold it, but
lora_jax's LoRA has no bias term and not every serving engine loads one.)

Refused, before anything is written: a layer with kernel-batch axes (MoE experts,
per-head kernels: no torch ``nn.Linear`` mirrors it), a stacked layer (one adapter for L
layers), a kernel that is not a dense float array (quantized: dequantize first), a
non-finite or per-row alpha, ``rank < 1``, ``max_error`` outside [0, 1).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float

from lora_jax import stacked
from lora_jax.adapter import Adapter, Target, as_alpha, layer_kernel
from lora_jax.paths import iter_adapters
from lora_jax.peft_format import PeftFormatError, export_peft
from lora_jax.variants import LoRA, LoRAConfig

__all__ = ["LoraApproximation", "delta_matrix", "save_as_lora", "save_as_lora_pair"]

_BIAS = ("refuse", "drop")


@dataclasses.dataclass(frozen=True)
class LoraApproximation:
    """What :func:`save_as_lora` wrote: the directory, and per layer path the rank and the
    relative Frobenius error of the written delta against the adapter's exact one."""

    path: Path
    ranks: Mapping[str, int]
    errors: Mapping[str, float]

    @property
    def max_error(self) -> float:
        return max(self.errors.values())


def delta_matrix(adapter: Adapter, alpha: float) -> tuple[Float[Array, "d_in d_out"], Float[Array, " d_out"] | None]:
    """The exact change ``adapter`` makes to its layer at ``alpha``: the kernel delta in the
    matrix view and the bias delta (None for a layer without bias), float32 or wider. The
    adapter keeps its own alpha."""
    delta, bias_delta, _, _, _ = _delta_svd(*nnx.split(adapter), jnp.asarray(alpha, jnp.float32))
    return delta, bias_delta


@functools.partial(jax.jit, static_argnums=0)
def _delta_svd(graphdef: nnx.GraphDef, state: nnx.State, alpha: Array) -> tuple[Array, ...]:
    """Delta, bias delta and the delta's thin SVD, in one compiled call per layer type."""
    work = nnx.merge(graphdef, state)  # a copy inside the trace: setting its alpha changes nothing outside
    work.alpha.value = alpha
    target = Target("", work.base, work.info, work.spec)
    dtype = jnp.promote_types(work.dtype, jnp.float32)
    kernel = target.kernel_matrix(work.config.name, dtype)  # _check_layers checked it, naming the layer
    bias = None if target.bias is None else work.spec.bias_to_matrix(target.bias).astype(dtype)
    merged, merged_bias = work.merged(kernel, bias)
    delta = merged.astype(dtype) - kernel
    bias_delta = None if bias is None else merged_bias.astype(dtype) - bias
    u, s, vh = jnp.linalg.svd(delta, full_matrices=False)
    return delta, bias_delta, u, s, vh


def _rank_for(s: np.ndarray, max_error: float, floor: float) -> int:
    """The smallest k whose truncation error ``sqrt(sum_{i>k} s_i^2 + floor^2)`` is at
    most ``max_error`` times ``sqrt(sum s_i^2 + floor^2)``; ``floor`` is the norm of a part
    of the delta that is lost anyway (a dropped bias)."""
    energy = s.astype(np.float64) ** 2
    tail = np.concatenate([np.cumsum(energy[::-1])[::-1], [0.0]]) + floor**2  # tail[k]: lost at rank k
    fits = np.nonzero(tail <= max_error**2 * (energy.sum() + floor**2))[0]
    return int(fits[0]) if fits.size else s.shape[0]


def _check(alpha: Any, rank: Any, max_error: Any, bias: Any) -> float:
    value = as_alpha(alpha, what="save_as_lora: alpha")
    if value.ndim:
        raise ValueError(f"save_as_lora: alpha must be a scalar (one file per alpha), got shape {value.shape}")
    if (rank is None) == (max_error is None):
        raise ValueError(
            f"save_as_lora: give exactly one of rank= (an int) or max_error= (a float); got {rank=}, {max_error=}"
        )
    if rank is not None and (not isinstance(rank, int | np.integer) or isinstance(rank, bool) or rank < 1):
        raise ValueError(
            f"save_as_lora: rank={rank!r} must be an integer >= 1 (a layer smaller than it gets its full rank)"
        )
    if max_error is not None and not (isinstance(max_error, int | float) and 0.0 <= max_error < 1.0):
        raise ValueError(
            f"save_as_lora: max_error={max_error!r} must be a relative error in [0, 1) "
            "(0: exact, every layer at full rank; 0.05: 5% of each delta's Frobenius norm)"
        )
    if bias not in _BIAS:
        raise ValueError(f"save_as_lora: bias={bias!r} must be one of {_BIAS}")
    return float(value)


def _check_layers(model: nnx.Module, hf_name: Callable[[str], str | None]) -> list[tuple[str, Adapter, str]]:
    layers = []
    for path, adapter in iter_adapters(model):
        if stacked.layer_mask(adapter) is not None:
            raise PeftFormatError(
                f"{path!r} is a stacked layer (one adapter for every layer of an nnx.scan stack); a PEFT file names "
                "one torch module per layer: unstack the model's layers, or save another adapter"
            )
        if adapter.spec.batch_shape:
            raise PeftFormatError(
                f"{path!r}: einsum {adapter.spec.equation!r} has kernel-batch axes {adapter.spec.batch_shape}, "
                "which a torch nn.Linear cannot mirror; exclude the layer from the adapter"
            )
        layer_kernel(adapter.base, adapter.info, variant=adapter.config.name, path=path, use="for save_as_lora")
        name = hf_name(path)
        if not name:
            raise PeftFormatError(f"hf_name({path!r}) gave {name!r}; every adapted layer needs a torch module name")
        layers.append((path, adapter, name))
    if not layers:
        raise PeftFormatError("the model holds no adapter to save")
    return layers


def save_as_lora(
    path: str | Path,
    model: nnx.Module,
    *,
    hf_name: Callable[[str], str | None],
    alpha: float = 1.0,
    rank: int | None = None,
    max_error: float | None = None,
    bias: str = "refuse",
) -> LoraApproximation:
    """Write every adapter of ``model`` at ``alpha`` as one PEFT LoRA (``rank=`` or
    ``max_error=``, exactly one); returns the ranks and relative errors per layer.

    ``hf_name`` names each layer's torch module, as in :func:`~lora_jax.peft_format.export_peft`.
    ``model`` is not changed. Raises ``ValueError`` on bad arguments and
    :class:`~lora_jax.peft_format.PeftFormatError` on a layer PEFT cannot hold (or a bias
    delta with ``bias="refuse"``), before anything is written.
    """
    alpha = _check(alpha, rank, max_error, bias)
    return _write(path, _approximate(model, hf_name, alpha, rank, max_error, bias))


def save_as_lora_pair(
    path: str | Path,
    model: nnx.Module,
    *,
    hf_name: Callable[[str], str | None],
    alpha: float = 1.0,
    rank: int | None = None,
    max_error: float | None = None,
    bias: str = "refuse",
) -> dict[float, LoraApproximation]:
    """The steering pair: ``path/plus`` at ``+alpha`` and ``path/minus`` at ``-alpha``
    (:func:`save_as_lora` each, same options), both computed before either is written.
    For AntiPaSTO, whose -1 undoes +1 by an inverse rotation rather than a negated delta,
    the two files differ beyond a sign."""
    alpha = _check(alpha, rank, max_error, bias)
    if alpha == 0:
        raise ValueError("save_as_lora_pair: alpha=0 is the base model on both sides; pass the steering strength")
    pair = {a: _approximate(model, hf_name, a, rank, max_error, bias) for a in (alpha, -alpha)}
    return {a: _write(Path(path) / sub, pair[a]) for a, sub in ((alpha, "plus"), (-alpha, "minus"))}


@dataclasses.dataclass(frozen=True)
class _Layer:
    path: str
    name: str  # the torch module's
    lora: Adapter
    error: float


def _approximate(
    model: nnx.Module,
    hf_name: Callable[[str], str | None],
    alpha: float,
    rank: int | None,
    max_error: float | None,
    bias: str,
) -> list[_Layer]:
    layers = []
    for layer_path, adapter, name in _check_layers(model, hf_name):
        arrays = _delta_svd(*nnx.split(adapter), jnp.asarray(alpha, jnp.float32))
        delta, bias_delta, u, s, vh = (None if x is None else np.asarray(x, np.float64) for x in arrays)
        dropped = 0.0 if bias_delta is None else float(np.linalg.norm(bias_delta))
        if dropped and bias == "refuse":
            raise PeftFormatError(
                f"{layer_path!r}: the {adapter.config.name} adapter changes the layer's bias (by {dropped:.3g} in "
                "norm) and a LoRA file holds no bias: pass bias='drop' to write the kernel part only (the dropped "
                "bias counts in the reported error)"
            )
        full = math.sqrt(float(np.sum(delta**2)) + dropped**2)
        if max_error is not None and full > 0 and dropped / full > max_error:
            raise PeftFormatError(
                f"{layer_path!r}: the dropped bias delta alone is {dropped / full:.3g} of the layer's delta, above "
                f"max_error={max_error}; raise max_error"
            )
        k = max(1, min(rank, s.shape[0]) if rank is not None else _rank_for(s, max_error, dropped))
        root = np.sqrt(s[:k])  # balanced factors: A = U sqrt(s), B = sqrt(s) Vh
        a, b = (u[:, :k] * root[None, :]).astype(np.float32), (root[:, None] * vh[:k]).astype(np.float32)
        # measured on the float32 factors as written (a zero delta: rank 1, zero factors, error 0)
        residual = math.sqrt(float(np.sum((delta - a.astype(np.float64) @ b) ** 2)) + dropped**2)
        layers.append(_Layer(layer_path, name, _lora(adapter, layer_path, a, b), residual / full if full else 0.0))
    return layers


def _lora(adapter: Adapter, path: str, a: np.ndarray, b: np.ndarray) -> Adapter:
    """A LoRA (scale 1) on the adapter's base layer holding the factors ``a``, ``b``."""
    k = a.shape[-1]
    config, target = LoRAConfig(r=k, lora_alpha=float(k)), Target(path, adapter.base, adapter.info, adapter.spec)
    if adapter.info.kind == "einsum":
        return LoRA(target, config, seed=0, factors=(jnp.asarray(a), jnp.asarray(b)))
    lora = config.build(target, seed=0)  # conv / embed LoRAs draw their own init, replaced here
    lora.lora_a.value = jnp.asarray(a, lora.lora_a.dtype)
    lora.lora_b.value = jnp.asarray(b, lora.lora_b.dtype)
    return lora


def _write(path: str | Path, layers: list[_Layer]) -> LoraApproximation:
    """PEFT's files through export_peft: the LoRAs sit in a list, so their paths are indices."""
    export_peft(path, nnx.List([layer.lora for layer in layers]), hf_name=lambda i: layers[int(i)].name)
    ranks = {layer.path: layer.lora.config.r for layer in layers}
    return LoraApproximation(Path(path), ranks, {layer.path: layer.error for layer in layers})
