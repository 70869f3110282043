"""One file per adapter method. ``VARIANTS`` maps a config's ``name`` to its class; it is
written out here, not filled by import side effects, so the list is one place to read."""

from lora_jax.adapter import VariantConfig
from lora_jax.variants.antipasto import AntiPaSTO, AntiPaSTOConfig, DeltaS, RotationParam
from lora_jax.variants.lora import LoRA, LoRAConfig

VARIANTS: dict[str, type[VariantConfig]] = {cls.name: cls for cls in (LoRAConfig, AntiPaSTOConfig)}

__all__ = ["VARIANTS", "AntiPaSTO", "AntiPaSTOConfig", "DeltaS", "LoRA", "LoRAConfig", "RotationParam"]
