"""Load an HF checkpoint directory into :class:`Qwen3`, and name modules both ways.

``to_hf_name`` / ``from_hf_name`` map NNX module paths to HF module names and back
(``layers.0.attn.q_proj`` <-> ``model.layers.0.self_attn.q_proj``); PEFT adapters are
keyed by the HF names (PEFT prefixes them with ``base_model.model.``).

Weights: HF stores a linear layer as ``weight (d_out, d_in)`` with heads flattened
``(N, H) -> N * H``. Every kernel here is that matrix transposed and reshaped:
``kernel = weight.T.reshape(kernel.shape)`` (q ``(D, N, H)``, o ``(N, H, D)``, MLP
``(d_in, d_out)``), which is also the ``lora_jax`` matrix view of the kernel, so a PEFT
``lora_A.weight.T`` / ``lora_B.weight.T`` are directly a LoRA adapter's ``lora_a`` / ``lora_b``.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import jax.numpy as jnp
from flax import nnx

from lora_jax.models.config import config_from_hf
from lora_jax.models.qwen3 import Qwen3
from lora_jax.paths import dotted

__all__ = ["load_hf", "to_hf_name", "from_hf_name", "hf_tensor_name"]

# NNX module path <-> HF module name, for everything below the model root.
_RENAMES = (("attn", "self_attn"), ("input_norm", "input_layernorm"), ("post_attn_norm", "post_attention_layernorm"))
_NNX_RE = re.compile(r"^(embed|norm|lm_head|layers(\.\d+(\.(attn|mlp|input_norm|post_attn_norm)(\.\w+)?)?)?)$")
_HF_RE = re.compile(
    r"^(lm_head|model\.(embed_tokens|norm|layers(\.\d+(\.(self_attn|mlp|input_layernorm|post_attention_layernorm)"
    r"(\.\w+)?)?)?))$"
)
_PARAM_NAMES = {"kernel": "weight", "embedding": "weight", "weight": "weight"}


def to_hf_name(path: str) -> str:
    """NNX module path -> HF module name: ``layers.3.mlp.down_proj`` -> ``model.layers.3.mlp.down_proj``."""
    if not _NNX_RE.match(path):
        raise ValueError(f"{path!r} is not a module path of lora_jax.models.Qwen3 (e.g. 'layers.0.attn.q_proj')")
    if path == "lm_head":
        return path
    if path == "embed":
        return "model.embed_tokens"
    parts = path.split(".")
    parts = [dict(_RENAMES).get(p, p) if i == 2 else p for i, p in enumerate(parts)]
    return "model." + ".".join(parts)


def from_hf_name(name: str) -> str:
    """HF module name -> NNX module path. A PEFT prefix ``base_model.model.`` is dropped."""
    name = name.removeprefix("base_model.model.")
    if not _HF_RE.match(name):
        raise ValueError(
            f"{name!r} is not a module name of an HF Qwen3 / Llama causal LM (e.g. 'model.layers.0.self_attn.q_proj')"
        )
    if name == "lm_head":
        return name
    parts = name.removeprefix("model.").split(".")
    if parts == ["embed_tokens"]:
        return "embed"
    back = {hf: ours for ours, hf in _RENAMES}
    return ".".join(back.get(p, p) if i == 2 else p for i, p in enumerate(parts))


def hf_tensor_name(param_path: str) -> str:
    """NNX parameter path -> HF tensor name: ``layers.0.attn.q_proj.kernel`` ->
    ``model.layers.0.self_attn.q_proj.weight``."""
    module, _, param = param_path.rpartition(".")
    if param not in _PARAM_NAMES:
        raise ValueError(f"{param_path!r}: unknown parameter {param!r}")
    return f"{to_hf_name(module)}.{_PARAM_NAMES[param]}"


def _read_json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file} is not valid JSON ({err}); re-download or re-save the checkpoint") from err
    if not isinstance(data, dict):
        raise ValueError(f"{file} holds a {type(data).__name__}, not a JSON object")
    return data


def _read_tensors(path: Path) -> dict:
    from safetensors import SafetensorError, safe_open  # interop dependency: only loading needs it

    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index} has no 'weight_map' object (tensor name -> shard file)")
        files = sorted(set(weight_map.values()))
        missing = [name for name in files if not (path / name).is_file()]
        if missing:
            raise FileNotFoundError(f"{index} lists shard file(s) {missing} that are not in {path}")
    elif (path / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(
            f"{path}: no model.safetensors or model.safetensors.index.json (only safetensors checkpoints load)"
        )
    tensors = {}
    for name in files:
        try:
            with safe_open(str(path / name), framework="flax") as f:
                for key in f.keys():
                    tensors[key] = f.get_tensor(key)
        except SafetensorError as err:  # its message names neither the file nor a fix
            raise ValueError(
                f"{path / name} cannot be read as safetensors ({err}); is it truncated or not a safetensors "
                "file? Re-download or re-save the checkpoint"
            ) from err
    return tensors


def load_hf(path: str | Path, *, param_dtype=jnp.float32) -> Qwen3:
    """Build :class:`Qwen3` from an HF checkpoint directory (``config.json`` plus
    ``model.safetensors`` or a sharded ``model.safetensors.index.json``), offline.
    Float weights (any precision) are cast to ``param_dtype``. Raises, naming the file or
    tensor, on an unsupported architecture, unreadable JSON or safetensors, a missing or
    wrongly shaped tensor, a tensor that is not floating point (an integer or quantized
    weight is never cast to float as if it were the weight), or a tensor the model would
    not use."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path}: no config.json; pass a local HF checkpoint directory")
    cfg = config_from_hf(_read_json(path / "config.json"))
    tensors = _read_tensors(path)
    model = nnx.eval_shape(lambda: Qwen3(cfg, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
    used = set()
    for parts, var in nnx.to_flat_state(nnx.state(model)):
        param_path = dotted(parts)
        name = hf_tensor_name(param_path)
        if name not in tensors:
            raise KeyError(f"{path}: tensor {name!r} (for {param_path}) is missing from the checkpoint")
        value = tensors[name]
        if not jnp.issubdtype(value.dtype, jnp.floating):
            raise ValueError(
                f"{path}: tensor {name!r} has dtype {value.dtype}, not a floating-point dtype; a weight is "
                "loaded only from float tensors (a quantized checkpoint needs dequantizing first)"
            )
        if parts[-1] == "kernel":
            # the HF weight is (d_out, d_in); o_proj contracts (N, H), the others one axis
            split = len(var.shape) - 1 if parts[-2] == "o_proj" else 1
            expected = (math.prod(var.shape[split:]), math.prod(var.shape[:split]))
            value = value.T
        else:
            expected = var.shape
        if tuple(tensors[name].shape) != expected:
            raise ValueError(
                f"{path}: tensor {name!r} has shape {tuple(tensors[name].shape)}, but config.json implies "
                f"{expected} (for {param_path} of shape {var.shape})"
            )
        var.value = value.reshape(var.shape).astype(param_dtype)
        used.add(name)
    ignorable = {"lm_head.weight"} if cfg.tie_embeddings else set()
    extra = sorted(k for k in set(tensors) - used - ignorable if "rotary_emb.inv_freq" not in k)
    if extra:
        raise ValueError(
            f"{path}: the checkpoint has tensors this {cfg.model_type} model does not use: {extra[:8]}"
            f"{' ...' if len(extra) > 8 else ''}; is config.json the right one for these weights?"
        )
    return model
