"""LoRA equals PEFT's LoRA (PyTorch, CPU) on the same base and adapter weights (PEFT's
saved adapter loaded through ``import_peft``), and initialises as PEFT does. (Identity,
alpha=0, merge and training are in tests/test_contract.py; LoRA on Conv / Embed in
tests/test_lora_conv_embed.py.)"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from helpers import adapt
from peft import LoraConfig, get_peft_model

import lora_jax as lj
from lora_jax.peft_format import import_peft


class TorchMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(24, 40)
        self.fc2 = torch.nn.Linear(40, 16)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


class JaxMLP(nnx.Module):
    def __init__(self, torch_model):
        rngs = nnx.Rngs(0)
        self.fc1 = nnx.Linear(24, 40, rngs=rngs)
        self.fc2 = nnx.Linear(40, 16, rngs=rngs)
        for name in ("fc1", "fc2"):
            src, dst = getattr(torch_model, name), getattr(self, name)
            dst.kernel.value = jnp.asarray(src.weight.detach().numpy().T)
            dst.bias.value = jnp.asarray(src.bias.detach().numpy())

    def __call__(self, x):
        return self.fc2(jnp.tanh(self.fc1(x)))


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_matches_peft(rslora, tmp_path):
    torch.manual_seed(0)
    base = TorchMLP()
    jax_base = JaxMLP(base)  # before get_peft_model, which adapts ``base`` in place
    peft_model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=12, target_modules=["fc1", "fc2"], use_rslora=rslora, init_lora_weights=False)
    )
    peft_model.eval()
    for name in ("fc1", "fc2"):
        layer = getattr(peft_model.base_model.model, name)
        assert np.abs(layer.lora_B["default"].weight.detach().numpy()).max() > 0  # non-identity adapter
    peft_model.save_pretrained(tmp_path)
    jax_model = import_peft(tmp_path, jax_base, hf_name=lambda path: path)
    assert {p: (type(a.config), a.config.r, a.config.rslora) for p, a in lj.iter_adapters(jax_model)} == {
        p: (lj.LoRAConfig, 4, rslora) for p in ("fc1", "fc2")
    }
    x = np.random.default_rng(0).standard_normal((5, 7, 24)).astype(np.float32)
    with torch.no_grad():
        expect = peft_model(torch.from_numpy(x)).numpy()
    got = np.asarray(jax_model(jnp.asarray(x)))
    np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-6 * np.abs(expect).max())
    # and the merged model, both sides
    with torch.no_grad():
        merged_expect = peft_model.merge_and_unload()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(
        np.asarray(lj.merge_adapters(jax_model)(jnp.asarray(x))), merged_expect, rtol=1e-5, atol=1e-5
    )


def test_lora_init_distribution_matches_peft():
    """A ~ kaiming-uniform(a=sqrt(5)) = U(-1/sqrt(d_in), 1/sqrt(d_in)), B = 0, as PEFT."""
    adapted = adapt(nnx.Linear(400, 300, rngs=nnx.Rngs(0)), lj.LoRAConfig(r=64))
    a = np.asarray(adapted.layer.lora_a[...])
    torch_a = torch.empty(64, 400)
    torch.nn.init.kaiming_uniform_(torch_a, a=5**0.5)
    bound = 1 / np.sqrt(400)
    assert np.abs(a).max() <= bound and np.abs(torch_a.numpy()).max() <= bound
    assert abs(a.std() - torch_a.numpy().std()) < 0.02 * bound
    assert np.all(np.asarray(adapted.layer.lora_b[...]) == 0)
