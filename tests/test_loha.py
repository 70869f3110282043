"""LoHa against PEFT (forward, gradients, merge), its Khatri-Rao form against the dense
Hadamard product, and its init."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from layers import LAYOUTS
from peft import LoHaConfig as PeftLoHaConfig
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

from lora_jax.peft_format import import_peft
from lora_jax.variants import LoHaConfig
from lora_jax.variants.loha import hadamard_factors

NAMES = {n: n for n in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}


@pytest.mark.parametrize("r", [1, 3])
def test_loha_matches_peft(r):
    peft_model, ours = build(PeftLoHaConfig(r=r, alpha=2.0 * r + 1, target_modules=["up", "down"]),
                             LoHaConfig(r=r, lora_alpha=2.0 * r + 1))
    randomize(peft_model, ours, NAMES)
    assert_parity(peft_model, ours, NAMES)


def test_init_is_peft_shaped_and_zero_only_in_w2_b():
    peft_model, ours = build(PeftLoHaConfig(r=3, target_modules=["up", "down"]), LoHaConfig(r=3))
    torch_up = peft_model.base_model.model.up
    for name in NAMES:
        ours_value = np.asarray(getattr(ours.up, name)[...])
        assert ours_value.T.shape == tuple(torch_up.__getattr__(name)["default"].shape)
        bound = float(np.abs(torch_up.__getattr__(name)["default"].detach().numpy()).max())
        if name == "hada_w2_b":
            assert bound == 0 and not ours_value.any()
        else:  # same uniform bound as torch's kaiming-uniform on the same shape
            fan_in = torch_up.__getattr__(name)["default"].shape[1]
            assert 0.5 / np.sqrt(fan_in) < np.abs(ours_value).max() <= 1 / np.sqrt(fan_in)
            assert bound <= 1 / np.sqrt(fan_in)


def test_khatri_rao_form_is_the_hadamard_product():
    keys = jax.random.split(jax.random.key(0), 4)
    b1, b2 = (jax.random.normal(k, (2, 7, 3)) for k in keys[:2])
    a1, a2 = (jax.random.normal(k, (2, 3, 5)) for k in keys[2:])
    p, q = hadamard_factors(b1, a1, b2, a2)
    assert p.shape == (2, 7, 9) and q.shape == (2, 9, 5)
    np.testing.assert_allclose(p @ q, (b1 @ a1) * (b2 @ a2), rtol=1e-5, atol=1e-5)
    assert jnp.linalg.matrix_rank(p[0] @ q[0]) == 5  # beyond r = 3: the point of LoHa


def test_codec_folds_alpha_and_reads_per_layer_ranks(tmp_path):
    config = PeftLoHaConfig(r=2, alpha=3, rank_pattern={"^down$": 3}, target_modules=["up", "down"])
    model = import_peft(peft_saved(config, tmp_path / "theirs"), FlaxMLP(TorchMLP()), hf_name=lambda p: p)
    assert (model.up.config.r, model.down.config.r, model.down.config.lora_alpha) == (2, 3, 3.0)
    perturbed_copy(model)
    exported_matches_peft(model, tmp_path / "ours", alpha=0.4)


ROW_LAYOUTS = [lay for lay in LAYOUTS if lay.name in ("linear", "kv_packed", "o_BTNH_NHD", "per_head_BTNH_NHK")]


@pytest.mark.parametrize("layout", ROW_LAYOUTS, ids=[lay.name for lay in ROW_LAYOUTS])
def test_one_alpha_per_row_is_a_sweep_in_one_pass(layout):
    assert_one_alpha_per_row_is_separate_calls(LoHaConfig(r=2), layout)
