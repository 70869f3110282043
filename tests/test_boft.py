"""BOFT against PEFT (forward, gradients, merge; blocks by size and by count, 1-3 butterfly
factors), PEFT's permutations and Cayley map, identity and alpha = 0 bit for bit, alpha = -1
as the exact inverse, the PEFT codec both ways and config errors.

PEFT runs more than one butterfly factor only with its CUDA extension ``fbd_cuda`` (without
it, it silently keeps one factor). That extension only assembles block-diagonal matrices;
``peft_parity.TorchBlockDiag`` does the same with torch on the CPU so PEFT's own butterfly
code runs here. Every test patches the loader so that PEFT does not try (and fail, seconds
each) to compile the extension."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from layers import LAYOUTS
from peft import BOFTConfig as PeftBOFTConfig
from peft import PeftModel
from peft.tuners.boft import layer as peft_boft
from peft_helpers import FlaxMLP, TorchMLP, inputs
from peft_parity import (
    TorchBlockDiag,
    assert_one_alpha_per_row_is_separate_calls,
    assert_parity,
    build,
    exported_matches_peft,
    peft_saved,
    perturbed_copy,
    randomize,
    rel,
)

from lora_jax import AdapterConfig, Rule, apply_adapters, merge_adapters, set_alpha
from lora_jax.peft_format import PeftFormatError, export_peft, import_peft
from lora_jax.variants import BOFTConfig
from lora_jax.variants.boft import butterfly_permutation, cayley_minus_identity


@pytest.fixture(autouse=True)
def peft_on_cpu(monkeypatch):
    """PEFT without its CUDA extension, as on this machine (one butterfly factor)."""
    monkeypatch.setattr(peft_boft, "get_fbd_cuda", lambda: None)


@pytest.fixture
def peft_butterfly(monkeypatch):
    """PEFT as with its CUDA extension: every butterfly factor."""
    monkeypatch.setattr(peft_boft, "get_fbd_cuda", lambda: TorchBlockDiag)


NAMES = {"boft_r": "boft_R", "boft_s": "boft_s"}
# (options, layers): the MLP's d_in is 8 (up) and 12 (down); three factors of 2-blocks need 8
OPTIONS = {
    "block_size_4": ({"boft_block_size": 4}, "up|down"),
    "butterfly_2": ({"boft_block_size": 2, "boft_n_butterfly_factor": 2}, "up|down"),
    "butterfly_3": ({"boft_block_size": 2, "boft_n_butterfly_factor": 3}, "up"),
    "block_num_butterfly_2": ({"boft_block_num": 2, "boft_block_size": 0, "boft_n_butterfly_factor": 2}, "up|down"),
}


def adapt_up(variant):
    return apply_adapters(FlaxMLP(TorchMLP()), AdapterConfig(rules=(Rule(pattern="up", variant=variant),)))


@pytest.mark.parametrize("case", OPTIONS.values(), ids=OPTIONS.keys())
def test_boft_matches_peft(case, monkeypatch):
    options, layers = case
    if options.get("boft_n_butterfly_factor", 1) > 1:  # else PEFT's own CPU path
        monkeypatch.setattr(peft_boft, "get_fbd_cuda", lambda: TorchBlockDiag)
    peft_model, ours = build(
        PeftBOFTConfig(target_modules=layers.split("|"), **options), BOFTConfig(**options), pattern=layers
    )
    assert tuple(peft_model.base_model.model.up.boft_R["default"].shape) == ours.up.boft_r.shape
    randomize(peft_model, ours, NAMES, size=0.3, offset={"boft_s": 1.0})
    assert_parity(peft_model, ours, NAMES)


@pytest.mark.parametrize(("d_in", "block", "factors"), [(16, 2, 2), (16, 2, 4), (24, 4, 2), (16, 4, 3), (48, 6, 3)])
def test_permutations_are_peft_s(d_in, block, factors):
    for k in range(factors):
        theirs = peft_boft.BOFTLayer.block_butterfly_perm(None, d_in, d_in // block // 2**k, block // 2, factors - 1)
        np.testing.assert_array_equal(butterfly_permutation(d_in, block, k), theirs.numpy())


def test_cayley_is_peft_s_and_orthogonal():
    a = np.random.default_rng(0).standard_normal((6, 5, 5)).astype(np.float32)
    theirs = peft_boft.BOFTLayer.cayley_batch(None, torch.from_numpy(a)).numpy()
    ours = np.asarray(cayley_minus_identity(jnp.asarray(a), jnp.float32(1.0))) + np.eye(5)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours @ np.swapaxes(ours, -1, -2), np.broadcast_to(np.eye(5), ours.shape), atol=1e-5)


def test_identity_and_alpha_zero_are_the_base_bit_for_bit():
    model = adapt_up(BOFTConfig(boft_block_size=2, boft_n_butterfly_factor=3))
    x = jnp.asarray(inputs())
    base = FlaxMLP(TorchMLP())
    assert jnp.array_equal(model(x), base(x))  # A = 0, s = 1
    perturbed_copy(model, size=0.3)
    assert rel(model(x), base(x)) > 1e-2
    set_alpha(model, 0.0)
    assert jnp.array_equal(model(x), base(x))
    assert jnp.array_equal(merge_adapters(model).up.kernel[...], base.up.kernel[...])


def test_bfloat16_adapter_on_a_float32_layer():
    """LAPACK has no bfloat16: the Cayley solve runs in float32; identity stays bit-exact."""
    x, base = jnp.asarray(inputs()), FlaxMLP(TorchMLP())
    options = {"boft_block_size": 2, "boft_n_butterfly_factor": 2}
    half, full = (adapt_up(BOFTConfig(dtype=dtype, **options)) for dtype in ("bfloat16", "float32"))
    assert jnp.array_equal(half(x), base(x))
    perturbed_copy(full, size=0.3)
    half.up.boft_r.value, half.up.boft_s.value = (v[...].astype(jnp.bfloat16) for v in (full.up.boft_r, full.up.boft_s))
    assert half(x).dtype == jnp.float32
    assert rel(half(x), full(x)) < 2e-2 and rel(full(x), base(x)) > 5e-2


def peft_order(adapter, alpha: float) -> np.ndarray:
    """``B_m ... B_1`` as dense matrices, PEFT's order, generators times ``alpha`` (8 features)."""
    product = np.eye(8)
    for k in reversed(range(adapter.boft_r.shape[0])):
        blocks = np.asarray(cayley_minus_identity(adapter.boft_r[k], jnp.float32(alpha)), np.float64) + np.eye(2)
        dense = np.zeros((8, 8))
        for j, block in enumerate(blocks):
            dense[2 * j : 2 * j + 2, 2 * j : 2 * j + 2] = block
        perm = np.eye(8)[butterfly_permutation(8, 2, k)]  # P[i, perm[i]] = 1
        product = product @ perm @ dense @ perm.T
    return product


@pytest.mark.parametrize("factors", [1, 3])
def test_negative_alpha_is_the_exact_inverse(factors):
    model = adapt_up(BOFTConfig(boft_block_size=2, boft_n_butterfly_factor=factors))
    perturbed_copy(model, size=0.5)
    adapter, eye = model.up, jnp.eye(8)
    forward, backward = (np.asarray(adapter.rotate(eye, jnp.float32(a)), np.float64) for a in (1.0, -1.0))
    np.testing.assert_allclose(backward, forward.T, atol=1e-6)  # R(-1) = R^T
    np.testing.assert_allclose(forward @ backward, np.eye(8), atol=1e-6)  # = R^-1
    if factors > 1:  # the reversed order is what makes it so: PEFT's order at -A is no inverse
        np.testing.assert_allclose(peft_order(adapter, 1.0), forward, atol=1e-6)
        assert np.abs(forward @ peft_order(adapter, -1.0) - np.eye(8)).max() > 1e-2
    s = np.asarray(adapter.boft_s[...])
    kernel = np.asarray(adapter.base.kernel[...])
    set_alpha(model, -1.0)
    np.testing.assert_allclose(merge_adapters(model).up.kernel[...], backward @ kernel / s, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"boft_block_num": 2}, r"boft: boft_block_size=4 and boft_block_num=2: set exactly one of them"),
        ({"boft_block_size": 0}, r"boft: boft_block_size=0 and boft_block_num=0: set exactly one"),
        ({"boft_block_size": -2}, r"boft: boft_block_size=-2 must be an integer >= 0"),
        ({"boft_n_butterfly_factor": 0}, r"boft: boft_n_butterfly_factor=0 must be an integer >= 1"),
        ({"boft_block_num": 2.0, "boft_block_size": 0}, r"boft: boft_block_num=2.0 must be an integer >= 0"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BOFTConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"boft_block_size": 3}, r"boft_block_size=3 does not divide d_in=8 at 'up'; pick one of \[1, 2, 4, 8\]"),
        ({"boft_block_num": 3, "boft_block_size": 0}, r"boft_block_num=3 does not divide d_in=8 at 'up'"),
        (
            {"boft_block_size": 4, "boft_n_butterfly_factor": 3},
            r"boft_n_butterfly_factor=3 at 'up' \(d_in=8\) needs an even block size and a block count divisible "
            r"by 4; got 2 blocks of 4",
        ),
        ({"boft_block_num": 8, "boft_block_size": 0, "boft_n_butterfly_factor": 2}, r"got 8 blocks of 1"),
    ],
)
def test_blocks_must_fit_d_in(kwargs, match):
    with pytest.raises(ValueError, match=match):
        adapt_up(BOFTConfig(**kwargs))


def two_layers(**options):
    variant = BOFTConfig(**options)
    return apply_adapters(FlaxMLP(TorchMLP()), AdapterConfig(rules=(Rule(pattern="up|down", variant=variant),)))


def test_codec_folds_alpha_into_the_generators_and_the_scale(tmp_path):
    model = perturbed_copy(two_layers(boft_block_size=2), size=0.2)
    exported_matches_peft(model, tmp_path / "inverse", alpha=-0.7)  # PEFT's R at -0.7 S, s ** -0.7
    back = import_peft(tmp_path / "inverse", FlaxMLP(TorchMLP()), hf_name=lambda p: p)
    x = jnp.asarray(inputs())
    assert rel(back(x), model(x)) < 1e-5


def test_codec_with_butterfly_factors_both_ways(tmp_path, peft_butterfly):
    model = perturbed_copy(two_layers(boft_block_size=2, boft_n_butterfly_factor=2), size=0.2)
    exported_matches_peft(model, tmp_path / "half", alpha=0.6)
    set_alpha(model, 1.0)
    export_peft(tmp_path / "one", model, hf_name=lambda p: p)
    back = import_peft(tmp_path / "one", FlaxMLP(TorchMLP()), hf_name=lambda p: p)
    for layer in ("up", "down"):  # bit for bit
        for name in NAMES:
            ours, theirs = (getattr(getattr(m, layer), name)[...] for m in (back, model))
            np.testing.assert_array_equal(ours, theirs)
    set_alpha(model, -1.0)
    with pytest.raises(PeftFormatError, match=r"boft: alpha=-1.0 applies the 2 butterfly factors in reverse"):
        export_peft(tmp_path / "reverse", model, hf_name=lambda p: p)


def test_file_saved_by_peft_without_cuda_imports_with_its_single_factor_and_exports_back(tmp_path):
    config = PeftBOFTConfig(boft_block_size=2, boft_n_butterfly_factor=2, init_weights=False, target_modules=["up"])
    path = peft_saved(config, tmp_path / "cpu")  # config says 2 factors, the tensors hold 1
    theirs = PeftModel.from_pretrained(TorchMLP(), str(path))
    ours = import_peft(path, FlaxMLP(TorchMLP()), hf_name=lambda p: p)
    assert ours.up.config.boft_n_butterfly_factor == 1
    x = inputs()
    want = theirs(torch.from_numpy(x)).detach().numpy()
    assert rel(TorchMLP()(torch.from_numpy(x)).detach().numpy(), want) > 1e-2
    assert rel(ours(jnp.asarray(x)), want) < 1e-5
    from safetensors.numpy import load_file

    export_peft(tmp_path / "back", ours, hf_name=lambda p: p)  # PEFT's tensors back, bit for bit
    back, original = (load_file(str(d / "adapter_model.safetensors")) for d in (tmp_path / "back", path))
    assert sorted(back) == sorted(original)
    for key, value in original.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_codec_refuses_tensors_of_another_shape(tmp_path):
    from safetensors.numpy import load_file, save_file

    path = peft_saved(PeftBOFTConfig(boft_block_size=2, target_modules=["up"]), tmp_path / "flat")
    tensors = load_file(str(path / "adapter_model.safetensors"))
    tensors["base_model.model.up.boft_R"] = tensors["base_model.model.up.boft_R"].reshape(4, 2, 2)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    with pytest.raises(PeftFormatError, match=r"module 'up': boft_R \(4, 2, 2\) / boft_s \(12, 1\) are not"):
        import_peft(path, FlaxMLP(TorchMLP()), hf_name=lambda p: p)


# Two butterfly factors of 2-blocks need d_in % 4 == 0: the per-head layout (d_in 6) gets one.
ROW_CASES = {"linear": 2, "o_BTNH_NHD": 2, "per_head_BTNH_NHK": 1}
ROW_LAYOUTS = [lay for lay in LAYOUTS if lay.name in ROW_CASES]


@pytest.mark.parametrize("layout", ROW_LAYOUTS, ids=[lay.name for lay in ROW_LAYOUTS])
def test_one_alpha_per_row_is_a_sweep_in_one_pass(layout):
    factors = ROW_CASES[layout.name]
    assert_one_alpha_per_row_is_separate_calls(BOFTConfig(boft_block_size=2, boft_n_butterfly_factor=factors), layout)
