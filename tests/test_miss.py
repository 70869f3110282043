"""MiSS against PEFT (forward, gradients, merge; shards that divide d_in or not, mini),
alpha = -1 as PEFT's unmerge, and config errors."""

import numpy as np
import pytest
import torch
from layers import LAYOUTS
from peft import MissConfig as PeftMissConfig
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

from lora_jax import AdapterConfig, Rule, apply_adapters, merge_adapters, set_alpha
from lora_jax.peft_format import PeftFormatError, import_peft
from lora_jax.variants import MiSSConfig
from lora_jax.variants.miss import fold

NAMES = {"miss_block": "miss_block"}
OPTIONS = {  # d_in is 8 (up) and 12 (down)
    "r_4": ({"r": 4}, {"r": 4}),
    "r_5_padded": ({"r": 5}, {"r": 5}),
    "mini": ({"r": 4, "init_weights": "mini", "mini_r": 2}, {"r": 4, "mini_r": 2}),
}


@pytest.mark.parametrize(("theirs", "ours"), OPTIONS.values(), ids=OPTIONS.keys())
def test_miss_matches_peft(theirs, ours):
    peft_model, model = build(PeftMissConfig(target_modules=["up", "down"], **theirs), MiSSConfig(**ours))
    randomize(peft_model, model, NAMES)
    assert_parity(peft_model, model, NAMES)


def test_negative_alpha_is_peft_s_unmerge():
    peft_model, model = build(PeftMissConfig(r=5, target_modules=["up", "down"]), MiSSConfig(r=5))
    randomize(peft_model, model, NAMES)
    up = peft_model.base_model.model.up
    with torch.no_grad():
        unmerged = up.get_delta_weight_miss("default", up.base_layer.weight.detach().clone(), reverse=True)
    set_alpha(model, -1.0)
    np.testing.assert_allclose(merge_adapters(model).up.kernel[...], unmerged.numpy().T, rtol=1e-6, atol=1e-6)


def test_fold_pads_and_sums_shards():
    x = np.arange(7.0, dtype=np.float32)[None]
    np.testing.assert_array_equal(fold(x, 3), [[0 + 3 + 6, 1 + 4, 2 + 5]])


def adapt_up(variant):
    return apply_adapters(FlaxMLP(TorchMLP()), AdapterConfig(rules=(Rule(pattern="up", variant=variant),)))


def test_bad_config():
    with pytest.raises(ValueError, match=r"miss: r=0 must be a positive integer"):
        MiSSConfig(r=0)
    with pytest.raises(ValueError, match=r"miss: r=9 at 'up' exceeds d_in=8; lower r"):
        adapt_up(MiSSConfig(r=9))
    with pytest.raises(ValueError, match=r"miss: mini_r=5 does not divide d_out=12 at 'up'"):
        adapt_up(MiSSConfig(r=2, mini_r=5))


def test_codec_folds_alpha_and_refuses_bat(tmp_path):
    model = adapt_up(MiSSConfig(r=5))
    perturbed_copy(model)
    exported_matches_peft(model, tmp_path / "ours", alpha=-1.0)
    path = peft_saved(PeftMissConfig(r=4, init_weights="bat", target_modules=["up"]), tmp_path / "bat")
    with pytest.raises(PeftFormatError, match=r"MiSS with init_weights='bat' \(block \(3, 4, 4\)\) is not supported"):
        import_peft(path, FlaxMLP(TorchMLP()), hf_name=lambda p: p)


ROW_LAYOUTS = [lay for lay in LAYOUTS if lay.name in ("linear", "kv_packed", "o_BTNH_NHD", "per_head_BTNH_NHK")]


@pytest.mark.parametrize("layout", ROW_LAYOUTS, ids=[lay.name for lay in ROW_LAYOUTS])
def test_one_alpha_per_row_is_a_sweep_in_one_pass(layout):
    assert_one_alpha_per_row_is_separate_calls(MiSSConfig(r=4), layout)
