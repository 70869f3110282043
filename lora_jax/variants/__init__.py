"""One file per adapter method. ``VARIANTS`` maps a config's ``name`` to its class; the
built-ins are written out here, not filled by import side effects, so the list is one
place to read. An out-of-tree variant joins with one :func:`register_variant` call.

A variant owns everything specific to it: its config and module (``<name>.py``), its PEFT
codec (``VariantConfig.peft_codec``), its concatenation rule (``Adapter.concatenate``),
and services that run a model for it (``antipasto_select.py``, ``eva_calibration.py``:
imported on their own, never from here, since they use surgery and calibrate).
"""

import inspect

from lora_jax.adapter import Target, VariantConfig
from lora_jax.variants.adalora import AdaLoRA, AdaLoRAConfig, adalora_orthogonality_penalty
from lora_jax.variants.adalora_schedule import AdaLoRAAllocator, AdaLoRAAllocatorState, adalora_allocator
from lora_jax.variants.antipasto import AntiPaSTO, AntiPaSTOConfig, DeltaS, RotationParam
from lora_jax.variants.boft import BOFT, BOFTConfig
from lora_jax.variants.delora import DeLoRA, DeLoRAConfig, DeLoRALambda
from lora_jax.variants.dora import DoRA, DoRAConfig, DoRAMagnitude
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
from lora_jax.variants.vera import VeRA, VeRAConfig

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
        VeRAConfig,
        BOFTConfig,
        AdaLoRAConfig,
    )
}

BUILT_IN = frozenset(VARIANTS)


def register_variant(config_cls: type[VariantConfig]) -> type[VariantConfig]:
    """Make a variant defined outside lora_jax known by its ``name``: rules, checkpoints
    (:func:`lora_jax.checkpoint.restore` rebuilds it from the saved name) and, when the
    config declares a ``peft_codec``, PEFT files. Returns the class, so it also works as
    a class decorator. Registering a class again, or a new class under a name an earlier
    out-of-tree registration used (a re-run notebook cell), replaces it; a built-in name
    is refused.
    """
    if not (isinstance(config_cls, type) and issubclass(config_cls, VariantConfig)):
        raise TypeError(f"register_variant needs a VariantConfig subclass, got {config_cls!r}")
    if inspect.isabstract(config_cls):
        missing = sorted(config_cls.__abstractmethods__)
        raise TypeError(f"register_variant: {config_cls.__qualname__} does not implement {missing}")
    name = getattr(config_cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(
            f"register_variant: {config_cls.__qualname__} needs a class attribute name = '...', the variant's "
            "name in configs and checkpoints"
        )
    if name in BUILT_IN and VARIANTS[name] is not config_cls:
        raise ValueError(
            f"register_variant: {name!r} is the built-in {VARIANTS[name].__qualname__}; give "
            f"{config_cls.__qualname__} another name"
        )
    VARIANTS[name] = config_cls
    return config_cls


__all__ = [
    "AdaLoRA",
    "AdaLoRAAllocator",
    "AdaLoRAAllocatorState",
    "AdaLoRAConfig",
    "HRA",
    "IA3",
    "IA3FF",
    "ROAD",
    "VARIANTS",
    "AntiPaSTO",
    "AntiPaSTOConfig",
    "BOFT",
    "BOFTConfig",
    "ConvLoRA",
    "DeLoRA",
    "DeLoRAConfig",
    "DeLoRALambda",
    "DeltaS",
    "DoRA",
    "DoRAConfig",
    "DoRAMagnitude",
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
    "Target",
    "VariantConfig",
    "VeRA",
    "VeRAConfig",
    "adalora_allocator",
    "adalora_orthogonality_penalty",
    "hra_orthogonality_penalty",
    "register_variant",
    "to_lora",
]
