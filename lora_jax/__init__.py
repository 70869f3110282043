"""lora_jax: adapters (LoRA and friends) for any Flax NNX model.

model = apply_adapters(model, AdapterConfig(rules=(Rule(pattern="proj", variant=LoRAConfig(r=8)),)))
optimizer = nnx.Optimizer(model, optax.adamw(1e-3), wrt=AdapterParam)
"""

from lora_jax._version import __version__ as __version__
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
from lora_jax.variants import VARIANTS, LoRA, LoRAConfig
from lora_jax.views import EinsumSpec, UnsupportedLayerError, ViewInfo, register_view, view_of

__all__ = [
    "Adapter",
    "AdapterConfig",
    "AdapterParam",
    "AdapterState",
    "Alpha",
    "AlreadyAdaptedError",
    "EinsumSpec",
    "LoRA",
    "LoRAConfig",
    "NoMatchError",
    "Rule",
    "Target",
    "UnsupportedLayerError",
    "VARIANTS",
    "VariantConfig",
    "ViewInfo",
    "apply_adapters",
    "find_targets",
    "iter_adapters",
    "merge_adapters",
    "register_view",
    "set_alpha",
    "view_of",
]
