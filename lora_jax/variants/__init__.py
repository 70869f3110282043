"""One file per adapter method. ``VARIANTS`` maps a config's ``name`` to its class; it is
written out here, not filled by import side effects, so the list is one place to read."""

from lora_jax.adapter import VariantConfig
from lora_jax.variants.antipasto import AntiPaSTO, AntiPaSTOConfig, DeltaS, RotationParam
from lora_jax.variants.delora import DeLoRA, DeLoRAConfig
from lora_jax.variants.dora import DoRA, DoRAConfig
from lora_jax.variants.eva import EVA, EVAConfig
from lora_jax.variants.hra import HRA, HRAConfig, hra_orthogonality_penalty
from lora_jax.variants.ia3 import IA3, IA3Config
from lora_jax.variants.ia3_ff import IA3FF, IA3FFConfig
from lora_jax.variants.loha import LoHa, LoHaConfig
from lora_jax.variants.lokr import LoKr, LoKrConfig
from lora_jax.variants.lora import LoRA, LoRAConfig
from lora_jax.variants.lora_conv_embed import ConvLoRA, EmbedLoRA
from lora_jax.variants.miss import MiSS, MiSSConfig
from lora_jax.variants.oft import OFT, OFTConfig
from lora_jax.variants.olora import OLoRA, OLoRAConfig
from lora_jax.variants.pissa import PiSSA, PiSSAConfig, to_lora
from lora_jax.variants.road import ROAD, ROADConfig

VARIANTS: dict[str, type[VariantConfig]] = {
    cls.name: cls
    for cls in (
        LoRAConfig,
        PiSSAConfig,
        OLoRAConfig,
        DoRAConfig,
        DeLoRAConfig,
        IA3Config,
        IA3FFConfig,
        HRAConfig,
        ROADConfig,
        EVAConfig,
        AntiPaSTOConfig,
        LoHaConfig,
        LoKrConfig,
        OFTConfig,
        MiSSConfig,
    )
}

__all__ = [
    "HRA",
    "IA3",
    "IA3FF",
    "ROAD",
    "VARIANTS",
    "AntiPaSTO",
    "AntiPaSTOConfig",
    "ConvLoRA",
    "DeLoRA",
    "DeLoRAConfig",
    "DeltaS",
    "DoRA",
    "DoRAConfig",
    "EmbedLoRA",
    "EVA",
    "EVAConfig",
    "HRAConfig",
    "IA3Config",
    "IA3FFConfig",
    "LoHa",
    "LoHaConfig",
    "LoKr",
    "LoKrConfig",
    "LoRA",
    "LoRAConfig",
    "MiSS",
    "MiSSConfig",
    "OFT",
    "OFTConfig",
    "OLoRA",
    "OLoRAConfig",
    "PiSSA",
    "PiSSAConfig",
    "ROADConfig",
    "RotationParam",
    "hra_orthogonality_penalty",
    "to_lora",
]
