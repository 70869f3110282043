"""DoRA: forward, merge and gradients equal PEFT's ``use_dora=True`` at init (our magnitude
init against PEFT's) and with trained weights loaded through ``import_peft``. (Identity,
alpha=0, merge and training are in tests/test_contract.py; what every low-rank variant
shares is in tests/test_lowrank.py.)"""

from __future__ import annotations

import jax
import pytest
from peft_helpers import (
    LORA_WEIGHTS,
    check_forward_and_merge,
    check_grads,
    import_into_base,
    peft_model_pair,
    randomize,
    t2j,
)

from lora_jax import DoRAConfig

NAMES = {**LORA_WEIGHTS, "magnitude": lambda m: m.lora_magnitude_vector["default"].weight}


def test_forward_merge_and_grads_match_peft(tmp_path):
    import peft

    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["proj"], use_dora=True)
    model, peft_model, x = peft_model_pair(config, DoRAConfig(r=2, lora_alpha=4.0))
    theirs = peft_model.base_model.model.proj
    g = jax.random.normal(jax.random.key(9), (*x.shape[:-1], 12))
    model.layer.lora_a.value = t2j(NAMES["lora_a"](theirs)).T  # the random part of the init
    check_grads(model, theirs, NAMES, x, g)  # at init: B = 0
    randomize(theirs, NAMES)
    peft_model.save_pretrained(tmp_path)
    model = import_into_base(tmp_path)
    check_grads(model, theirs, NAMES, x, g)
    check_forward_and_merge(model, theirs, x)


def test_dropout_is_refused():
    with pytest.raises(ValueError, match=r"dora: dropout=0.5 is not supported; use dropout=0.0"):
        DoRAConfig(dropout=0.5)
