"""DeLoRA: the kernel-norm buffer, forward, merge and gradients equal PEFT's at init (B = 0:
the clamped-norm regime) and with the same trained weights (copied by hand: PEFT files of
DeLoRA are not a format lora_jax reads). (Identity, alpha=0, merge and training are in
tests/test_contract.py; what every low-rank variant shares is in tests/test_lowrank.py.)"""

from __future__ import annotations

import jax
import pytest
from helpers import rel_err
from peft_helpers import check_forward_and_merge, check_grads, peft_pair, set_random, t2j

from lora_jax import DeLoRAConfig

NAMES = {
    "lora_a": lambda m: m.delora_A["default"],
    "lora_b": lambda m: m.delora_B["default"],
    "delora_lambda": lambda m: m.delora_lambda["default"],
}


def test_forward_merge_and_grads_match_peft():
    import peft

    config = peft.DeloraConfig(r=2, delora_lambda=15, target_modules=["proj"])
    model, theirs, x = peft_pair(config, DeLoRAConfig(r=2))
    assert rel_err(model.layer.w_norm[...], t2j(theirs.delora_w_norm["default"])) < 1e-6
    g = jax.random.normal(jax.random.key(9), (*x.shape[:-1], 12))
    model.layer.lora_a.value = t2j(NAMES["lora_a"](theirs)).T  # the random part of the init
    check_grads(model, theirs, NAMES, x, g)  # at init: B = 0, DeLoRA's clamp regime
    set_random(model.layer, theirs, NAMES)
    check_grads(model, theirs, NAMES, x, g)
    check_forward_and_merge(model, theirs, x)


def test_bad_options():
    with pytest.raises(ValueError, match=r"delora: dropout=1.0 must be in \[0, 1\)"):
        DeLoRAConfig(dropout=1.0)
