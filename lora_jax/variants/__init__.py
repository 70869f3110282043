"""One file per adapter method. ``VARIANTS`` maps a config's ``name`` to its class; it is
written out here, not filled by import side effects, so the list is one place to read."""

from lora_jax.adapter import VariantConfig
from lora_jax.variants.eva import EVA, EVAConfig
from lora_jax.variants.lora import LoRA, LoRAConfig

VARIANTS: dict[str, type[VariantConfig]] = {cls.name: cls for cls in (LoRAConfig, EVAConfig)}

__all__ = ["VARIANTS", "EVA", "EVAConfig", "LoRA", "LoRAConfig"]
