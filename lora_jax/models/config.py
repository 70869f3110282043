"""The hyperparameters of a Qwen3 / Llama-family decoder, and how to read them from an HF
``config.json``. Anything this model cannot reproduce exactly is rejected by name rather
than silently approximated."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["ModelConfig", "RopeConfig", "config_from_hf", "tiny_config", "SUPPORTED_MODEL_TYPES"]

# model_type -> (HF architecture, has q/k RMSNorm)
SUPPORTED_MODEL_TYPES = {"qwen3": ("Qwen3ForCausalLM", True), "llama": ("LlamaForCausalLM", False)}
_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeConfig:
    """Rotary embedding: ``theta`` and an optional frequency rescaling (``linear`` or
    Llama 3.1's ``llama3``)."""

    theta: float = 10000.0
    type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.type not in _ROPE_TYPES:
            raise ValueError(
                f"rope type {self.type!r} is not supported; supported: {', '.join(_ROPE_TYPES)}. "
                "Models with yarn / dynamic / longrope scaling need another loader"
            )

    def inv_freq(self, head_dim: int) -> np.ndarray:
        """Inverse frequencies (head_dim // 2,) in float32, computed as HF does."""
        inv = 1.0 / (self.theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)))
        inv = inv.astype(np.float32)
        if self.type == "linear":
            return inv / np.float32(self.factor)
        if self.type == "llama3":
            # Long wavelengths are slowed by `factor`, short ones kept, the band between
            # interpolated (Llama 3.1's context extension).
            old = self.original_max_position_embeddings
            wavelen = 2 * math.pi / inv
            scaled = np.where(wavelen > old / self.low_freq_factor, inv / self.factor, inv)
            smooth = (old / wavelen - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
            smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
            medium = (wavelen >= old / self.high_freq_factor) & (wavelen <= old / self.low_freq_factor)
            return np.where(medium, smoothed, scaled).astype(np.float32)
        return inv


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """A Qwen3 (``qk_norm=True``) or Llama (``qk_norm=False``) decoder. Frozen and hashable."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    rms_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    qk_norm: bool = True
    tie_embeddings: bool = False
    model_type: str = "qwen3"

    def __post_init__(self) -> None:
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")


def tiny_config(vocab_size: int = 259, **overrides: Any) -> ModelConfig:
    """A 2-layer, d=64 Qwen3 for tests and examples (random init, no download).
    The default vocabulary fits :class:`ByteTokenizer`."""
    base = dict(vocab_size=vocab_size, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128)
    return ModelConfig(**{**base, **overrides})


def _rope_from_hf(cfg: Mapping[str, Any]) -> RopeConfig:
    # transformers >= 5 writes `rope_parameters` (theta inside); older files `rope_theta`
    # next to an optional `rope_scaling` (absent or null means plain RoPE).
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in _ROPE_TYPES:
        raise ValueError(
            f"config.json: rope scaling type {kind!r} is not supported; supported: {', '.join(_ROPE_TYPES)}"
        )
    if float(params.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError("config.json: partial_rotary_factor != 1 is not supported")
    fields = {f.name for f in dataclasses.fields(RopeConfig)} - {"theta", "type"}
    return RopeConfig(theta=theta, type=kind, **{k: v for k, v in params.items() if k in fields})


def config_from_hf(cfg: Mapping[str, Any]) -> ModelConfig:
    """Read an HF ``config.json`` (as a dict) of a Qwen3 or Llama causal LM."""
    model_type = cfg.get("model_type")
    archs = cfg.get("architectures") or []
    known = ", ".join(f"{t} ({a})" for t, (a, _) in SUPPORTED_MODEL_TYPES.items())
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"config.json: model_type {model_type!r} (architectures {archs}) is not supported; supported: {known}"
        )
    arch, qk_norm = SUPPORTED_MODEL_TYPES[model_type]
    if archs and archs != [arch]:
        raise ValueError(f"config.json: architecture {archs} is not supported; for {model_type!r} it must be {arch}")
    problems = []
    if cfg.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={cfg['hidden_act']!r} (only 'silu')")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        problems.append("attention_bias / mlp_bias (only bias-free projections)")
    if cfg.get("use_sliding_window") or any(t != "full_attention" for t in cfg.get("layer_types") or ()):
        problems.append("sliding-window attention (only full attention)")
    if problems:
        raise ValueError(f"config.json of {model_type!r} uses what this model does not implement: {problems}")
    n_heads = cfg["num_attention_heads"]
    return ModelConfig(
        vocab_size=cfg["vocab_size"],
        d_model=cfg["hidden_size"],
        n_layers=cfg["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_heads,
        d_ff=cfg["intermediate_size"],
        rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope=_rope_from_hf(cfg),
        qk_norm=qk_norm,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        model_type=model_type,
    )
