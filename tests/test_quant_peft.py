"""PEFT-format export of adapters trained over a quantized base: HF PEFT, applied to a
torch model holding the dequantized kernels, computes what our adapted model computes;
the files import back onto a freshly quantized base."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
from flax import nnx
from peft_helpers import FlaxMLP, TorchMLP, assert_rel_close, inputs, torch_out

import lora_jax as lj
from lora_jax import quant
from lora_jax.peft_format import export_peft, import_peft

FMT = quant.Int4(group_size=4)


def _same_name(path: str) -> str:
    return path


def _quantized_pair():
    """Our quantized MLP, and the torch MLP whose weights are its dequantized kernels."""
    qmodel = quant.quantize(FlaxMLP(TorchMLP()), FMT)
    mirror = TorchMLP()
    with torch.no_grad():
        for name in ("up", "down"):
            getattr(mirror, name).weight.copy_(torch.from_numpy(np.array(getattr(qmodel, name).dequantized()).T))
    return qmodel, mirror


VARIANTS = [lj.LoRAConfig(r=2, lora_alpha=4), lj.DoRAConfig(r=2, lora_alpha=4)]


@pytest.mark.parametrize("variant", VARIANTS, ids=["lora", "dora"])
def test_adapter_trained_over_quantized_base_exports_to_peft(tmp_path, variant):
    qmodel, mirror = _quantized_pair()
    model = lj.apply_adapters(qmodel, lj.AdapterConfig(rules=(lj.Rule(pattern=".", variant=variant),)))
    x = jnp.asarray(inputs(1, rows=16))
    target = jnp.sin(x)
    optimizer = nnx.Optimizer(model, optax.adam(3e-2), wrt=lj.AdapterParam)

    @nnx.jit
    def step(m, opt):
        loss_fn = lambda m: jnp.mean((m(x) - target) ** 2)
        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, lj.AdapterParam))(m)
        opt.update(m, grads)
        return loss

    for _ in range(5):
        step(model, optimizer)
    export_peft(tmp_path, model, hf_name=_same_name)
    peft_model = peft.PeftModel.from_pretrained(mirror, str(tmp_path)).eval()
    probe = inputs(2)
    ours = np.asarray(model(jnp.asarray(probe)))
    assert np.abs(ours - np.asarray(qmodel(jnp.asarray(probe)))).max() > 1e-3, "training moved the adapter"
    assert_rel_close(ours, torch_out(peft_model, probe))
    back = import_peft(tmp_path, quant.quantize(FlaxMLP(TorchMLP()), FMT), hf_name=_same_name)
    assert_rel_close(back(jnp.asarray(probe)), ours, tol=1e-6)
    assert all(isinstance(a.base, quant.QuantizedLayer) for _, a in lj.iter_adapters(back))

