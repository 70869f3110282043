"""Import path of EVA's calibration, which lives beside the variant in
:mod:`lora_jax.variants.eva_calibration`."""

from lora_jax.variants.eva_calibration import EvaPlan, apply_eva_plan, eva_init, eva_plan

__all__ = ["EvaPlan", "apply_eva_plan", "eva_init", "eva_plan"]
