"""OFT against PEFT (forward, gradients, merge; blocks by size, by count, shared), PEFT's
Neumann series term by term, alpha = -1 as the transpose, and config errors."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from layers import LAYOUTS
from peft import OFTConfig as PeftOFTConfig
from peft.tuners.oft.layer import OFTRotationModule
from peft_helpers import FlaxMLP, TorchMLP, inputs
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
from lora_jax.variants import OFTConfig
from lora_jax.variants.oft import neumann_coefficients, skew

NAMES = {"oft_r": "oft_R"}
OPTIONS = {
    "block_size_4": {"oft_block_size": 4},
    "r_2": {"r": 2, "oft_block_size": 0},
    "shared": {"oft_block_size": 4, "block_share": True},
    "terms_3": {"oft_block_size": 2, "num_cayley_neumann_terms": 3},
    "terms_7": {"oft_block_size": 4, "num_cayley_neumann_terms": 7},
}


def adapt_up(variant):
    return apply_adapters(FlaxMLP(TorchMLP()), AdapterConfig(rules=(Rule(pattern="up", variant=variant),)))


def oft_weight(peft_model, layer):
    return peft_model.base_model.model.get_submodule(layer).oft_R["default"].weight


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_oft_matches_peft(options, monkeypatch):
    peft_model, ours = build(PeftOFTConfig(target_modules=["up", "down"], **options), OFTConfig(**options))
    # PEFT keeps its rotation weight one level down (oft_R[name].weight): point the helper there
    import peft_parity

    monkeypatch.setattr(peft_parity, "peft_tensor", lambda model, layer, name: oft_weight(model, layer))
    randomize(peft_model, ours, NAMES, size=0.2)
    assert_parity(peft_model, ours, NAMES)


@pytest.mark.parametrize("terms", range(1, 8))
def test_series_is_peft_s(terms):
    q = np.random.default_rng(terms).standard_normal((3, 10)).astype(np.float32) * 0.3
    module = OFTRotationModule(3, 10, 5, 15, num_cayley_neumann_terms=terms)
    with torch.no_grad():
        theirs = module._cayley_batch(torch.from_numpy(q), 5, True, terms).numpy()
    generator = skew(jnp.asarray(q), 5)
    ours = np.broadcast_to(np.eye(5), (3, 5, 5)).copy()
    power = np.broadcast_to(np.eye(5), (3, 5, 5))
    for c in neumann_coefficients(terms):
        power = power @ np.asarray(generator)
        ours = ours + c * power
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


def test_negative_alpha_is_the_transposed_rotation():
    model = adapt_up(OFTConfig(r=2, oft_block_size=0))
    model.up.oft_r.value = 0.05 * jnp.asarray(np.random.default_rng(0).standard_normal(model.up.oft_r.shape))
    kernel = model.up.base.kernel[...]
    rotated = np.asarray(model.up.rotation_minus_identity(jnp.float32(1.0))) + np.eye(4)
    set_alpha(model, -1.0)
    blocks = np.asarray(kernel).reshape(2, 4, -1)
    want = np.einsum("nck,nco->nko", np.asarray(rotated), blocks).reshape(kernel.shape)  # R^T K per block
    np.testing.assert_allclose(merge_adapters(model).up.kernel[...], want, rtol=1e-5, atol=1e-6)
    product = rotated @ np.swapaxes(np.asarray(rotated), -1, -2)
    assert 0 < np.abs(product - np.eye(4)).max() < 1e-3  # orthogonal up to the series' truncation


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"r": 2}, r"oft: r=2 and oft_block_size=32: set exactly one of them"),
        ({"oft_block_size": 0}, r"oft: r=0 and oft_block_size=0: set exactly one"),
        ({"oft_block_size": -2}, r"oft: oft_block_size=-2 must be an integer >= 0"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OFTConfig(**kwargs)


def test_block_size_must_divide_d_in():
    with pytest.raises(ValueError, match=r"oft_block_size=5 does not divide d_in=8 at 'up'; pick one of \[1, 2, 4"):
        adapt_up(OFTConfig(oft_block_size=5))


def test_codec_folds_alpha_into_the_generator_and_refuses_coft(tmp_path):
    model = apply_adapters(
        FlaxMLP(TorchMLP()), AdapterConfig(rules=(Rule(pattern="up|down", variant=OFTConfig(oft_block_size=4)),))
    )
    perturbed_copy(model, size=0.2)
    exported_matches_peft(model, tmp_path / "ours", alpha=-0.7)  # PEFT's R at -0.7 Q
    for edit, match in (({"coft": True}, "coft=True"), ({"use_cayley_neumann": False}, "use_cayley_neumann=False")):
        path = peft_saved(PeftOFTConfig(oft_block_size=4, target_modules=["up"]), tmp_path / str(edit), edit=edit)
        with pytest.raises(PeftFormatError, match=rf"OFT with {match} is not supported by lora_jax"):
            import_peft(path, FlaxMLP(TorchMLP()), hf_name=lambda p: p)


ROW_LAYOUTS = [lay for lay in LAYOUTS if lay.name in ("linear", "kv_packed", "o_BTNH_NHD", "per_head_BTNH_NHK")]


@pytest.mark.parametrize("layout", ROW_LAYOUTS, ids=[lay.name for lay in ROW_LAYOUTS])
def test_one_alpha_per_row_is_a_sweep_in_one_pass(layout):
    assert_one_alpha_per_row_is_separate_calls(OFTConfig(oft_block_size=2), layout)


def test_bfloat16_adapter_on_a_float32_layer_is_the_base_at_init():
    """The rotation's change is computed in the adapter's dtype and added in the layer's."""
    x, base = jnp.asarray(inputs()), FlaxMLP(TorchMLP())
    half = adapt_up(OFTConfig(oft_block_size=2, dtype="bfloat16"))
    assert half(x).dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(half(x)), np.asarray(base(x)))
