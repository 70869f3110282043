"""IA3 (output gate) and IA3-FF (input gate) against PEFT, in one config on two layers."""

import copy

import jax.numpy as jnp
import numpy as np
import torch
from peft import IA3Config as PeftIA3Config
from peft import get_peft_model
from peft_helpers import (
    FlaxMLP,
    TorchMLP,
    assert_forward_matches,
    assert_merged_matches,
    assert_rel_close,
    inputs,
)

from lora_jax import IA3Config, IA3FFConfig, iter_adapters, merge_adapters, set_alpha
from lora_jax.peft_format import import_peft
from lora_jax.rotations import gate_power


def peft_and_ours(tmp_path):
    """PEFT's IA3 on ``up`` and IA3-FF on ``down`` with non-identity gates, and ours loaded
    from PEFT's saved adapter through ``import_peft``."""
    torch_model = TorchMLP()
    peft_model = get_peft_model(
        copy.deepcopy(torch_model),
        PeftIA3Config(target_modules=["up", "down"], feedforward_modules=["down"]),
    )
    rng = np.random.default_rng(1)
    for name in ("up", "down"):
        layer = getattr(peft_model.base_model.model, name)
        gate = layer.ia3_l["default"]
        value = (1 + 0.5 * rng.standard_normal(gate.shape)).astype(np.float32)
        with torch.no_grad():
            gate.copy_(torch.from_numpy(value))
    peft_model.save_pretrained(tmp_path)
    ours = import_peft(tmp_path, FlaxMLP(torch_model), hf_name=lambda path: path)
    assert {p: type(a.config) for p, a in iter_adapters(ours)} == {"up": IA3Config, "down": IA3FFConfig}
    return peft_model, ours


def test_ia3_and_ia3_ff_match_peft_forward_and_merge(tmp_path):
    peft_model, ours = peft_and_ours(tmp_path)
    assert peft_model.base_model.model.down.is_feedforward and not peft_model.base_model.model.up.is_feedforward
    assert_forward_matches(peft_model, ours)
    # up: kernel columns and bias gated; down: kernel rows gated, bias untouched
    assert_merged_matches(peft_model.merge_and_unload(), merge_adapters(ours))


def test_ia3_alpha_minus_one_is_the_inverse_gate(tmp_path):
    _, ours = peft_and_ours(tmp_path)
    x = jnp.asarray(inputs())
    h = jnp.tanh(x @ jnp.ones((8, 12)))  # some input for the down layer
    set_alpha(ours, -1.0)
    assert_rel_close(ours.up(x), ours.up.base(x) / ours.up.ia3_l[...][None, :])
    assert_rel_close(ours.down(h), ours.down.base(h / ours.down.ia3_l[...][None, :]))


def test_gate_power_branches():
    g = jnp.array([2.0, -2.0, 0.0, 0.5])
    np.testing.assert_array_equal(gate_power(g, jnp.float32(0.0)), jnp.ones(4))
    np.testing.assert_allclose(gate_power(g, jnp.float32(1.0)), g, rtol=1e-6)
    inv = gate_power(g, jnp.float32(-1.0))
    np.testing.assert_allclose(inv[jnp.array([0, 1, 3])], 1 / g[jnp.array([0, 1, 3])], rtol=1e-6)
    assert float(inv[2]) == 1e6  # a zero gate has no inverse: |g| floored at 1e-6, output stays finite
    half = gate_power(g, jnp.float32(0.5))
    np.testing.assert_allclose(half, jnp.array([2**0.5, 0.0, 0.0, 0.5**0.5]), atol=1e-6)  # Re(sqrt(-2)) = 0
