"""Reference models for lora_jax: a compact NNX Qwen3 / Llama causal LM that loads HF
checkpoints or GGUF files. The core package never imports this one."""

from lora_jax.models.config import ModelConfig, RopeConfig, config_from_hf, tiny_config
from lora_jax.models.gguf import config_from_gguf, load_gguf, load_gguf_tokenizer, smollm2_path
from lora_jax.models.hf import from_hf_name, hf_tensor_name, load_hf, to_hf_name
from lora_jax.models.qwen3 import KVCache, Qwen3, generate, positions_from_mask
from lora_jax.models.scored import generate_scored
from lora_jax.models.tokenizer import ByteTokenizer, load_tokenizer

__all__ = [
    "ByteTokenizer",
    "KVCache",
    "ModelConfig",
    "Qwen3",
    "RopeConfig",
    "config_from_gguf",
    "config_from_hf",
    "from_hf_name",
    "generate",
    "generate_scored",
    "load_gguf",
    "load_gguf_tokenizer",
    "hf_tensor_name",
    "load_hf",
    "load_tokenizer",
    "positions_from_mask",
    "smollm2_path",
    "tiny_config",
    "to_hf_name",
]
