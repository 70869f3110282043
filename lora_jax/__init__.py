"""lora_jax: adapters (LoRA and friends) for any Flax NNX model.

model = apply_adapters(model, AdapterConfig(rules=(Rule(pattern="proj", variant=LoRAConfig(r=8)),)))
optimizer = nnx.Optimizer(model, optax.adamw(1e-3), wrt=AdapterParam)
"""

from lora_jax.adapter import Adapter, AdapterParam, AdapterState, Alpha, Target, VariantConfig
from lora_jax.config import AdapterConfig, Rule
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
    HRA,
    IA3,
    IA3FF,
    ROAD,
    VARIANTS,
    HRAConfig,
    IA3Config,
    IA3FFConfig,
    LoRA,
    LoRAConfig,
    ROADConfig,
    hra_orthogonality_penalty,
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
    "EinsumSpec",
    "HRA",
    "HRAConfig",
    "IA3",
    "IA3Config",
    "IA3FF",
    "IA3FFConfig",
    "LoRA",
    "LoRAConfig",
    "NoMatchError",
    "ROAD",
    "ROADConfig",
    "Rule",
    "Target",
    "UnsupportedLayerError",
    "VARIANTS",
    "VariantConfig",
    "ViewInfo",
    "apply_adapters",
    "find_targets",
    "hra_orthogonality_penalty",
    "iter_adapters",
    "merge_adapters",
    "register_view",
    "set_alpha",
    "view_of",
]
