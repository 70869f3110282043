"""lora_jax: adapters (LoRA and friends) for any Flax NNX model.

model = apply_adapters(model, AdapterConfig(rules=(Rule(pattern="proj", variant=LoRAConfig(r=8)),)))
optimizer = nnx.Optimizer(model, optax.adamw(1e-3), wrt=AdapterParam)
"""

from lora_jax.adapter import Adapter, AdapterParam, AdapterState, Alpha, Target, VariantConfig
from lora_jax.calibrate import collect_statistics, moments_init, moments_update
from lora_jax.config import AdapterConfig, Rule
from lora_jax.eva_calibration import EvaPlan, apply_eva_plan, eva_init, eva_plan
from lora_jax.surgery import (
    AlreadyAdaptedError,
    NoMatchError,
    apply_adapters,
    find_targets,
    iter_adapters,
    merge_adapters,
    set_alpha,
)
from lora_jax.variants import (
    EVA,
    VARIANTS,
    AntiPaSTO,
    AntiPaSTOConfig,
    DeLoRA,
    DeLoRAConfig,
    DeltaS,
    DoRA,
    DoRAConfig,
    EVAConfig,
    LoRA,
    LoRAConfig,
    OLoRA,
    OLoRAConfig,
    PiSSA,
    PiSSAConfig,
    RotationParam,
    to_lora,
)
from lora_jax.views import EinsumSpec, UnsupportedLayerError, ViewInfo, register_view, view_of

__version__ = "0.1.0"

__all__ = [
    "Adapter",
    "AdapterConfig",
    "AdapterParam",
    "AdapterState",
    "Alpha",
    "AlreadyAdaptedError",
    "AntiPaSTO",
    "AntiPaSTOConfig",
    "DeltaS",
    "DeLoRA",
    "DeLoRAConfig",
    "DoRA",
    "DoRAConfig",
    "EVA",
    "EVAConfig",
    "EinsumSpec",
    "EvaPlan",
    "LoRA",
    "LoRAConfig",
    "NoMatchError",
    "OLoRA",
    "OLoRAConfig",
    "PiSSA",
    "PiSSAConfig",
    "RotationParam",
    "Rule",
    "Target",
    "UnsupportedLayerError",
    "VARIANTS",
    "VariantConfig",
    "ViewInfo",
    "apply_adapters",
    "apply_eva_plan",
    "collect_statistics",
    "eva_init",
    "eva_plan",
    "find_targets",
    "iter_adapters",
    "merge_adapters",
    "moments_init",
    "moments_update",
    "register_view",
    "set_alpha",
    "to_lora",
    "view_of",
]
