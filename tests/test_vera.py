"""VeRA against PEFT (forward, gradients of lambda_d / lambda_b, merge), the shared
projection (stored once, seen by every adapter after split / merge and under jit, never
trained), checkpoints, the PEFT codec both ways, and errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx
from layers import LAYOUTS
from peft import PeftModel
from peft import VeraConfig as PeftVeraConfig
from peft_helpers import FlaxMLP, TorchMLP, inputs
from peft_parity import (
    assert_one_alpha_per_row_is_separate_calls,
    assert_parity,
    build,
    copy_vera_projection,
    exported_matches_peft,
    peft_saved,
    perturbed_copy,
    randomize,
    rel,
)

from lora_jax import AdapterConfig, AdapterParam, Rule, apply_adapters, merge_adapters, set_alpha
from lora_jax.adapter import ADAPTER_VARIABLES
from lora_jax.checkpoint import restore, save
from lora_jax.peft_format import PeftFormatError, export_peft, import_peft
from lora_jax.variants import VeRAConfig
from lora_jax.variants.vera import RandomProjection
from lora_jax.views import UnsupportedLayerError

NAMES = {"vera_lambda_d": "vera_lambda_d", "vera_lambda_b": "vera_lambda_b"}
SAME = {"hf_name": lambda p: p}


def pair(r: int, **ours):
    peft_model, model = build(PeftVeraConfig(r=r, target_modules=["up", "down"]), VeRAConfig(r=r, **ours))
    copy_vera_projection(peft_model, model)
    randomize(peft_model, model, NAMES)
    return peft_model, model


# r=16 exceeds both layers' d_in (8, 12): A and B are fixed, so VeRA's rank has no such limit
@pytest.mark.parametrize("r", [4, 16])
def test_vera_matches_peft(r):
    assert_parity(*pair(r), NAMES)


def test_negative_alpha_is_peft_s_unmerge():
    peft_model, model = pair(4)
    up = peft_model.base_model.model.up
    with torch.no_grad():
        unmerged = (up.base_layer.weight - up.get_delta_weight("default")).numpy()
    set_alpha(model, -1.0)
    np.testing.assert_allclose(merge_adapters(model).up.kernel[...], unmerged.T, rtol=1e-6, atol=1e-6)


def adapt(variant=None, *, seed: int = 0, pattern: str = "up|down"):
    cfg = AdapterConfig(rules=(Rule(pattern=pattern, variant=variant or VeRAConfig(r=4)),), seed=seed)
    return apply_adapters(FlaxMLP(TorchMLP()), cfg)


def projection_leaves(model) -> list[str]:
    flat = nnx.to_flat_state(nnx.state(model, RandomProjection))
    return [".".join(map(str, path)) for path, _ in flat]


def test_one_projection_sized_for_every_layer_stored_once():
    model = adapt()
    assert model.up.vera_projection is model.down.vera_projection
    assert projection_leaves(model) == ["down.vera_projection.vera_A", "down.vera_projection.vera_B"]
    a, b = model.up.vera_projection.vera_A[...], model.up.vera_projection.vera_B[...]
    assert a.shape == (12, 4) and b.shape == (4, 12)  # max d_in of up (8) / down (12), max d_out
    assert np.abs(a).max() <= np.sqrt(6 / 12) and np.abs(b).max() <= np.sqrt(6 / 4)  # PEFT's kaiming bounds
    trained = [".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, AdapterParam))]
    assert trained == ["down.vera_lambda_b", "down.vera_lambda_d", "up.vera_lambda_b", "up.vera_lambda_d"]

    graphdef, state = nnx.split(model)
    again = nnx.merge(graphdef, state)
    assert again.up.vera_projection is again.down.vera_projection

    @nnx.jit
    def double_then_run(m, x):
        m.up.vera_projection.vera_A.value = 2 * m.up.vera_projection.vera_A[...]
        return m(x)

    perturbed_copy(model)
    x = jnp.asarray(inputs())
    doubled = double_then_run(model, x)
    assert model.down.vera_projection is model.up.vera_projection
    np.testing.assert_array_equal(model.down.vera_projection.vera_A[...], 2 * a)  # the update reached both
    assert rel(doubled, model(x)) < 1e-5  # compiled vs eager: rounding only


def test_identity_and_alpha_zero_bit_exact():
    model, base = adapt(), FlaxMLP(TorchMLP())
    x = jnp.asarray(inputs())
    np.testing.assert_array_equal(model(x), base(x))
    perturbed_copy(model)
    assert rel(model(x), base(x)) > 1e-3
    set_alpha(model, 0.0)
    np.testing.assert_array_equal(model(x), base(x))


def test_training_never_moves_the_projection():
    model = adapt()
    before = jax.tree.map(np.asarray, nnx.state(model, RandomProjection))
    optimizer = nnx.Optimizer(model, optax.adam(1e-1), wrt=AdapterParam)
    x = jnp.asarray(inputs())

    @nnx.jit
    def step(m, opt):
        grads = nnx.grad(lambda m: jnp.mean((m(x) - 1.0) ** 2), argnums=nnx.DiffState(0, AdapterParam))(m)
        opt.update(m, grads)

    for _ in range(3):
        step(model, optimizer)
    assert np.abs(np.asarray(model.up.vera_lambda_b[...])).max() > 0
    jax.tree.map(np.testing.assert_array_equal, nnx.state(model, RandomProjection), before)


def test_checkpoint_restores_the_saved_projection_bit_for_bit(tmp_path):
    model = perturbed_copy(adapt(seed=5))
    set_alpha(model, 0.5, pattern="up")
    restored = restore(save(tmp_path / "ckpt", model), FlaxMLP(TorchMLP()))
    saved = nnx.to_pure_dict(nnx.state(model, ADAPTER_VARIABLES))
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(restored, ADAPTER_VARIABLES)), saved)
    assert restored.up.vera_projection is restored.down.vera_projection
    x = jnp.asarray(inputs())
    np.testing.assert_array_equal(restored(x), model(x))
    # restore rebuilds with seed 0 (another projection) and loads the saved one over it;
    # the same seed regenerates the saved projection exactly
    a = model.up.vera_projection.vera_A[...]
    assert not np.array_equal(adapt(seed=0).up.vera_projection.vera_A[...], a)
    np.testing.assert_array_equal(adapt(seed=5).up.vera_projection.vera_A[...], a)
    np.testing.assert_array_equal(adapt(seed=5).up.vera_projection.vera_B[...], model.up.vera_projection.vera_B[...])


def test_export_import_round_trip_is_bit_exact_and_peft_loads_it(tmp_path):
    model = perturbed_copy(adapt())
    exported_matches_peft(model, tmp_path / "ours", alpha=-0.5)  # alpha folded into lambda_b
    from safetensors.numpy import load_file

    keys = set(load_file(str(tmp_path / "ours" / "adapter_model.safetensors")))
    assert {"base_model.vera_A", "base_model.vera_B", "base_model.model.up.vera_lambda_d"} <= keys
    set_alpha(model, 1.0)
    export_peft(tmp_path / "one", model, **SAME)
    back = import_peft(tmp_path / "one", FlaxMLP(TorchMLP()), **SAME)
    assert back.up.vera_projection is back.down.vera_projection
    jax.tree.map(
        np.testing.assert_array_equal,
        nnx.to_pure_dict(nnx.state(back, ADAPTER_VARIABLES)),
        nnx.to_pure_dict(nnx.state(model, ADAPTER_VARIABLES)),
    )


def test_import_of_peft_s_own_file_matches_peft(tmp_path):
    peft_model, _ = pair(4)
    peft_model.save_pretrained(str(tmp_path / "theirs"))
    ours = import_peft(tmp_path / "theirs", FlaxMLP(TorchMLP()), **SAME)
    theirs = PeftModel.from_pretrained(TorchMLP(), str(tmp_path / "theirs"))
    x = inputs()
    assert rel(ours(jnp.asarray(x)), theirs(torch.from_numpy(x)).detach().numpy()) < 1e-5
    assert rel(ours(jnp.asarray(x)), FlaxMLP(TorchMLP())(jnp.asarray(x))) > 1e-3


def test_import_refuses_a_file_without_the_projection(tmp_path):
    with pytest.warns(UserWarning, match="save_projection"):
        path = peft_saved(PeftVeraConfig(r=4, target_modules=["up"], save_projection=False), tmp_path / "noproj")
    with pytest.raises(PeftFormatError, match=r"save_projection=False holds no vera_A / vera_B.*save_projection=True"):
        import_peft(path, FlaxMLP(TorchMLP()), **SAME)


def test_export_refuses_two_projections_in_one_file(tmp_path):
    unequal = (VeRAConfig(r=4), VeRAConfig(r=4, custom_vjp=False))
    rules = tuple(Rule(pattern=p, variant=v) for p, v in zip(("up", "down"), unequal, strict=True))
    model = apply_adapters(FlaxMLP(TorchMLP()), AdapterConfig(rules=rules))
    assert model.up.vera_projection is not model.down.vera_projection  # unequal configs share nothing
    with pytest.raises(PeftFormatError, match=r"its vera_A differs from another adapter's.*export them separately"):
        export_peft(tmp_path / "two", model, **SAME)
    assert not (tmp_path / "two").exists()


def test_bad_config_and_stacked_layers():
    with pytest.raises(ValueError, match=r"vera: r=0 must be a positive integer"):
        VeRAConfig(r=0)
    with pytest.raises(ValueError, match=r"vera: d_initial=nan must be a finite number"):
        VeRAConfig(d_initial=float("nan"))
    with pytest.raises(ValueError, match=r"vera: dropout=1.5 must be in \[0, 1\)"):
        VeRAConfig(dropout=1.5)
    stacked = FlaxMLP(TorchMLP())  # up's kernel with a leading layer axis, as nnx.vmap'ed blocks hold it
    stacked.up.kernel = nnx.Param(jnp.zeros((2, 8, 12)))
    with pytest.raises(UnsupportedLayerError, match=r"vera: 'up' is a stacked layer .*use another variant"):
        apply_adapters(stacked, AdapterConfig(rules=(Rule(pattern="up", variant=VeRAConfig(r=4)),)))


# per-head kernels: lambda_d / lambda_b per head, A and B shared by the heads
ROW_LAYOUTS = [lay for lay in LAYOUTS if lay.name in ("linear", "per_head_BTNH_NHK")]


@pytest.mark.parametrize("layout", ROW_LAYOUTS, ids=[lay.name for lay in ROW_LAYOUTS])
def test_one_alpha_per_row_is_a_sweep_in_one_pass(layout):
    assert_one_alpha_per_row_is_separate_calls(VeRAConfig(r=4), layout)
