"""AdaLoRA against PEFT 0.21: the layer (forward, gradients, merge), the rank allocation
(budget per step, EMAs, the triplets kept, E after each call), the orthogonal regulariser,
and the ADALORA file both ways; plus a jitted optax loop driving the allocation."""

import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx
from peft import AdaLoraConfig as PeftAdaLoraConfig
from peft import PeftModel, get_peft_model
from peft_helpers import FlaxMLP, TorchMLP, inputs
from peft_parity import assert_parity, build, exported_matches_peft, peft_tensor, perturbed_copy, randomize, rel

import lora_jax as lj
from lora_jax.peft_format import PeftFormatError, export_peft, import_peft
from lora_jax.variants import AdaLoRAConfig, adalora_allocator, adalora_orthogonality_penalty

NAMES = {"lora_a": "lora_A", "lora_e": "lora_E", "lora_b": "lora_B"}
SCHEDULE = {"tinit": 2, "tfinal": 3, "total_step": 12, "beta1": 0.8, "beta2": 0.7}


def peft_config(**kw):
    return PeftAdaLoraConfig(target_modules=["up", "down"], **kw)


def ours_config(**kw):
    return AdaLoRAConfig(**kw)


@pytest.mark.parametrize("r", [1, 3])
def test_adalora_matches_peft(r):
    peft_model, ours = build(peft_config(init_r=r, target_r=1, lora_alpha=2.0 * r + 1, total_step=10),
                             ours_config(r=r, target_r=1, lora_alpha=2.0 * r + 1, total_step=10))
    randomize(peft_model, ours, NAMES)
    print(assert_parity(peft_model, ours, NAMES))
