"""LoKr against PEFT (full and decomposed factors: forward, gradients, merge), the
factorization against PEFT's, errors. (The factored forward against the dense merged
kernel on every layout: tests/test_contract.py.)"""

import pytest
from layers import LAYOUTS
from peft import LoKrConfig as PeftLoKrConfig
from peft.tuners.lokr.layer import factorization as peft_factorization
from peft_helpers import FlaxMLP, TorchMLP
from peft_parity import (
    assert_one_alpha_per_row_is_separate_calls,
    assert_parity,
    build,
    exported_matches_peft,
    peft_saved,
    perturbed_copy,
    randomize,
)

from lora_jax import AdapterConfig, Rule, apply_adapters
from lora_jax.peft_format import PeftFormatError, import_peft
from lora_jax.variants import LoKrConfig
from lora_jax.variants.lokr import factorization

NAMES = {n: n for n in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")}
OPTIONS = {
    "full": {"r": 8},
    "w2_low": {"r": 1},
    "both_low": {"r": 1, "decompose_both": True},
    "factor_2": {"r": 1, "decompose_both": True, "decompose_factor": 2},
}


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_lokr_matches_peft(options):
    peft_model, ours = build(
        PeftLoKrConfig(alpha=3.0, target_modules=["up", "down"], **options), LoKrConfig(lora_alpha=3.0, **options)
    )
    their_names = set(peft_model.base_model.model.up.state_dict()) | set(peft_model.base_model.model.down.state_dict())
    for layer in (ours.up, ours.down):  # the same factors are full or decomposed
        for name in NAMES:
            assert (name in vars(layer)) == (f"{name}.default" in their_names), name
    randomize(peft_model, ours, NAMES)
    assert_parity(peft_model, ours, NAMES)


def test_factorization_is_peft_s():
    for dim in range(1, 260):
        for factor in (-1, 1, 2, 3, 4, 8, 16):
            assert factorization(dim, factor) == peft_factorization(dim, factor), (dim, factor)


def test_bad_options():
    with pytest.raises(ValueError, match=r"lokr: decompose_factor=0 must be -1"):
        LoKrConfig(decompose_factor=0)
    with pytest.raises(ValueError, match=r"lokr: r=0 must be a positive integer"):
        LoKrConfig(r=0)


def test_codec_folds_alpha_and_refuses_factors_the_config_does_not_build(tmp_path):
    model = apply_adapters(FlaxMLP(TorchMLP()), AdapterConfig(rules=(Rule(pattern="up|down", variant=LoKrConfig()),)))
    perturbed_copy(model)
    exported_matches_peft(model, tmp_path / "ours", alpha=0.6)  # full W1 and W2
    config = PeftLoKrConfig(r=1, decompose_both=True, target_modules=["up", "down"])
    path = peft_saved(config, tmp_path / "theirs", edit={"r": 8})  # factored tensors, a config for full ones
    with pytest.raises(PeftFormatError, match=r"LoKr tensors .* are not the factors that r=8, decompose_both=True"):
        import_peft(path, FlaxMLP(TorchMLP()), hf_name=lambda p: p)


ROW_LAYOUTS = [lay for lay in LAYOUTS if lay.name in ("linear", "kv_packed", "o_BTNH_NHD", "per_head_BTNH_NHK")]


@pytest.mark.parametrize("layout", ROW_LAYOUTS, ids=[lay.name for lay in ROW_LAYOUTS])
def test_one_alpha_per_row_is_a_sweep_in_one_pass(layout):
    assert_one_alpha_per_row_is_separate_calls(LoKrConfig(r=1, decompose_both=True), layout)
