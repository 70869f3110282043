"""A GGUF model with its 4-bit Q4_1 blocks kept: the file's codes, scales and minimums become
the storage of :class:`~lora_jax.quant.layer.QuantizedLayer` in ``Int4(group_size=32)``.

llama.cpp's Q4_1 block is 32 consecutive inputs of one output row: float16 ``d`` and
``m``, then 16 bytes of 4-bit codes (byte j: input j in the low nibble, input j + 16 in
the high one), ``w = d q + m``. That is :class:`~lora_jax.quant.formats.Int4`'s
asymmetric group of 32 along d_in with float16 scales exactly, so the kept layers
dequantize to the same float32 values ``gguf.quants`` gives (tested bit for bit on the
real SmolLM2 file). Linear layers stored in another type are quantized from their
dequantized values into ``fallback``; embeddings and norms stay float.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from lora_jax.models.gguf import gguf_param_path, load_gguf, read_gguf, unpermute_rotary
from lora_jax.paths import dotted
from lora_jax.quant.formats import Int4, QuantFormat, Quantized
from lora_jax.quant.layer import quantize, quantized_layers

__all__ = ["Q4_1_FORMAT", "load_gguf_quantized"]

Q4_1_FORMAT = Int4(group_size=32, scale_dtype="float16")


def _q4_1_blocks(data: np.ndarray, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Raw Q4_1 bytes of a ``(rows, cols)`` weight -> codes ``(rows, cols)`` uint8 and
    ``d``, ``m`` ``(rows, cols / 32)`` float16."""
    blocks = np.asarray(data, np.uint8).reshape(rows, cols // 32, 20)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0]
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0]
    packed = blocks[..., 4:]
    codes = np.concatenate([packed & 0x0F, packed >> 4], axis=-1)  # inputs 0..15, then 16..31
    return codes.reshape(rows, cols), d, m


def load_gguf_quantized(
    path: str | Path, *, fallback: QuantFormat = Q4_1_FORMAT, tokenizer: bool = True
) -> tuple[nnx.Module, Any, dict[str, list[str]]]:
    """``(model, tokenizer, {"kept": [...], "requantized": [...]})``: :func:`load_gguf`'s
    model with every linear layer quantized; layers whose tensor is Q4_1 hold the file's
    own blocks (``Int4(group_size=32)``), the others ``fallback``-quantized values."""
    model, tok = load_gguf(path, tokenizer=tokenizer)
    reader = read_gguf(path)
    from gguf import GGMLQuantizationType

    q4 = {
        gguf_param_path(t.name): t
        for t in reader.tensors
        if GGMLQuantizationType(t.tensor_type).name == "Q4_1" and gguf_param_path(t.name) is not None
    }
    kept_paths = {p.rsplit(".", 1)[0] for p in q4 if p.endswith(".kernel")}
    qmodel = quantize(model, Q4_1_FORMAT, pattern=_any_of(kept_paths)) if kept_paths else model
    others = [p for p, _ in _linear_paths(qmodel) if p not in kept_paths]
    if others:
        qmodel = quantize(qmodel, fallback, pattern=_any_of(set(others)))
    cfg = getattr(model, "config", None)
    for path, layer in quantized_layers(qmodel):
        tensor = q4.get(path + ".kernel")
        if tensor is None:
            continue
        rows, cols = (int(d) for d in reversed(tensor.shape))  # GGUF lists dims innermost first
        codes, d, m = _q4_1_blocks(tensor.data, rows, cols)
        for name, heads in (("q_proj", "n_heads"), ("k_proj", "n_kv_heads")):
            if path.endswith(name) and cfg is not None:
                codes, d, m = (unpermute_rotary(a, getattr(cfg, heads)) for a in (codes, d, m))
        # (out, in) rows -> the layer's (d_in, d_out) matrix view, groups along d_in
        layer.set_codes(Quantized(jnp.asarray(codes.T, jnp.uint4), jnp.asarray(d.T), jnp.asarray(m.T)))
    return qmodel, tok, {"kept": sorted(kept_paths), "requantized": sorted(others)}


def _any_of(paths: set[str]) -> str:
    import re

    return "^(" + "|".join(re.escape(p) for p in sorted(paths)) + ")$"


def _linear_paths(model: nnx.Module) -> list[tuple[str, nnx.Module]]:
    from lora_jax.layer_kinds import describe
    from lora_jax.quant.layer import QuantizedLayer

    out = []
    for parts, module in nnx.iter_modules(model):
        if not parts or isinstance(module, QuantizedLayer):
            continue
        info = describe(module)
        if info is not None and info.kind == "einsum":
            out.append((dotted(parts), module))
    return out
