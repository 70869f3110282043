"""lora_jax: adapters (LoRA and friends) for any Flax NNX model.

    import lora_jax as lj
    model = lj.apply_adapters(model, lj.AdapterConfig(rules=(lj.Rule(pattern="proj", variant=lj.LoRAConfig(r=8)),)))
    optimizer = nnx.Optimizer(model, optax.adamw(1e-3), wrt=lj.AdapterParam)

The top level holds what every user touches: the model functions, the configs, the
Variable types that filter the state, and the errors they raise. Everything else lives in
a namespace, imported with the package:

========================  =================================================================
``lj.variants``           one module class per method (``LoRA``, ``DoRA``, ...), ``VARIANTS``,
                          variant helpers (``to_lora``, ``hra_orthogonality_penalty``)
``lj.transforms``         pure ``nnx.State -> nnx.State`` functions (``set_alpha``, ``cat``, ...)
``lj.steering``           alpha sweeps with one compilation, their metrics and plots
``lj.checkpoint``         Orbax save / restore of the adapter alone, ``TrainCheckpointer``
``lj.peft``               PEFT's adapter files, both ways (``export_peft``, ``import_peft``)
``lj.calibrate``          input statistics of targeted layers without hooks
``lj.select``             AntiPaSTO's data-driven choice of singular directions
``lj.linalg``             top-r / randomized SVD, LQ, norms (plain arrays, no NNX)
``lj.views``              which module types are linear maps (``view_of``, ``spec_of``)
``lj.einsum_spec``        the einsum algebra of a layer (``EinsumSpec``: matrix form of kernel and activations)
``lj.ragged``             LoRA per expert through ``jax.lax.ragged_dot``
``lj.progress``           the throttled progress lines, for your own loops
``lj.models``             the reference Qwen3 / Llama and its loaders (imported on first use)
========================  =================================================================

Two ``set_alpha``: :func:`lora_jax.set_alpha` sets alpha on a model in place (returns how
many adapters it set); :func:`lora_jax.transforms.set_alpha` is the pure form, a new
``nnx.State`` from a state, for use inside ``jax.jit`` / ``jax.vmap``.
"""

import importlib as _importlib

from lora_jax import (
    calibrate,
    einsum_spec,
    linalg,
    peft,
    progress,
    ragged,
    select,
    steering,
    transforms,
    variants,
    views,
)
from lora_jax._version import __version__ as __version__
from lora_jax.adapter import Adapter, AdapterParam, AdapterState, Alpha, VariantConfig
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
from lora_jax.variants import register_variant
from lora_jax.variants.adalora import AdaLoRAConfig
from lora_jax.variants.antipasto import AntiPaSTOConfig, DeltaS, RotationParam
from lora_jax.variants.boft import BOFTConfig
from lora_jax.variants.delora import DeLoRAConfig, DeLoRALambda
from lora_jax.variants.dora import DoRAConfig, DoRAMagnitude
from lora_jax.variants.eva import EVAConfig
from lora_jax.variants.eva_calibration import EvaPlan, apply_eva_plan, eva_init, eva_plan
from lora_jax.variants.hra import HRAConfig
from lora_jax.variants.ia3 import IA3Config
from lora_jax.variants.ia3_ff import IA3FFConfig
from lora_jax.variants.loha import LoHaConfig
from lora_jax.variants.lokr import LoKrConfig
from lora_jax.variants.lora import LoRAConfig
from lora_jax.variants.miss import MiSSConfig
from lora_jax.variants.oft import OFTConfig
from lora_jax.variants.olora import OLoRAConfig
from lora_jax.variants.pissa import PiSSAConfig
from lora_jax.variants.road import ROADConfig
from lora_jax.variants.vera import VeRAConfig
from lora_jax.views import UnsupportedLayerError, ViewInfo, register_view

# Imported on first attribute access: checkpoint pulls in Orbax (a fifth of a second) and
# models the loaders, named the checkpoint too, quant the GGUF reader; `import lora_jax` stays the cost of jax + flax.
_LAZY_NAMESPACES = ("checkpoint", "models", "named", "quant")

# Names the top level exported before it was narrowed, and where they live now: an old
# `lj.LoRA` gets an AttributeError that says where to look rather than a bare one.
_MOVED = {
    **{
        name: "lora_jax.variants"
        for name in (
            "LoRA", "PiSSA", "OLoRA", "DoRA", "DeLoRA", "IA3", "IA3FF", "HRA", "ROAD", "EVA", "AntiPaSTO",
            "VARIANTS", "Target", "to_lora", "hra_orthogonality_penalty",
        )
    },
    **{name: "lora_jax.calibrate" for name in ("collect_statistics", "moments_init", "moments_update")},
    "EinsumSpec": "lora_jax.einsum_spec",
    "view_of": "lora_jax.views",
}


def __getattr__(name: str):
    if name in _LAZY_NAMESPACES:
        module = _importlib.import_module(f"lora_jax.{name}")
        globals()[name] = module
        return module
    if name in _MOVED:
        raise AttributeError(f"lora_jax.{name} is now {_MOVED[name]}.{name} (the top level holds the core only)")
    raise AttributeError(f"module 'lora_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY_NAMESPACES})


__all__ = [
    # the model functions
    "apply_adapters",
    "find_targets",
    "iter_adapters",
    "merge_adapters",
    "set_alpha",
    # data-driven init (EVA): apply_adapters with calibration data
    "eva_init",
    "eva_plan",
    "apply_eva_plan",
    "EvaPlan",
    # the configuration
    "AdapterConfig",
    "Rule",
    "VariantConfig",
    "LoRAConfig",
    "PiSSAConfig",
    "OLoRAConfig",
    "DoRAConfig",
    "DeLoRAConfig",
    "IA3Config",
    "IA3FFConfig",
    "HRAConfig",
    "ROADConfig",
    "EVAConfig",
    "AntiPaSTOConfig",
    "LoHaConfig",
    "LoKrConfig",
    "OFTConfig",
    "MiSSConfig",
    "VeRAConfig",
    "BOFTConfig",
    "AdaLoRAConfig",
    # the module and its Variable types (filters for nnx.state / nnx.Optimizer(wrt=))
    "Adapter",
    "AdapterParam",
    "AdapterState",
    "Alpha",
    "DoRAMagnitude",
    "DeLoRALambda",
    "DeltaS",
    "RotationParam",
    # your own layer types and variants
    "register_view",
    "ViewInfo",
    "register_variant",
    # errors
    "AlreadyAdaptedError",
    "NoMatchError",
    "UnsupportedLayerError",
    # namespaces
    "calibrate",
    "checkpoint",
    "einsum_spec",
    "linalg",
    "models",
    "named",
    "peft",
    "progress",
    "quant",
    "ragged",
    "select",
    "steering",
    "transforms",
    "variants",
    "views",
]
