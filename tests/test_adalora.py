"""AdaLoRA against PEFT 0.21: the layer (forward, gradients, merge), the rank allocation
(budget per step, EMAs, the triplets kept, E after each call), the orthogonal regulariser,
and the ADALORA file both ways; plus a jitted optax loop driving the allocation."""

import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx
from peft import AdaLoraConfig as PeftAdaLoraConfig
from peft import PeftModel, get_peft_model
from peft_helpers import FlaxMLP, TorchMLP, inputs
from peft_parity import assert_parity, build, exported_matches_peft, peft_tensor, perturbed_copy, randomize, rel

import lora_jax as lj
from lora_jax.peft_format import PeftFormatError, export_peft, import_peft
from lora_jax.variants import AdaLoRAConfig, adalora_allocator, adalora_orthogonality_penalty

NAMES = {"lora_a": "lora_A", "lora_e": "lora_E", "lora_b": "lora_B"}
SCHEDULE = {"tinit": 2, "tfinal": 3, "total_step": 12, "beta1": 0.8, "beta2": 0.7}


def peft_config(**kw):
    return PeftAdaLoraConfig(target_modules=["up", "down"], **kw)


def ours_config(**kw):
    return AdaLoRAConfig(**kw)


@pytest.mark.parametrize("r", [1, 3])
def test_adalora_matches_peft(r):
    peft_model, ours = build(peft_config(init_r=r, target_r=1, lora_alpha=2.0 * r + 1, total_step=10),
                             ours_config(r=r, target_r=1, lora_alpha=2.0 * r + 1, total_step=10))
    randomize(peft_model, ours, NAMES)
    print(assert_parity(peft_model, ours, NAMES))


def _grads_into_both(peft_model, gen) -> dict:
    """The same random gradient in PEFT's ``.grad`` and in a ``{layer: {name: array}}`` tree."""
    grads = {}
    for layer in ("up", "down"):
        grads[layer] = {}
        for ours_name, peft_name in NAMES.items():
            tensor = peft_tensor(peft_model, layer, peft_name)
            tensor.grad = torch.randn(tensor.shape, generator=gen)
            g = tensor.grad.numpy()
            grads[layer][ours_name] = jnp.asarray(g[:, 0] if ours_name == "lora_e" else g.T)
    return grads


def test_allocation_matches_peft_step_by_step():
    """Each step: the same new factor values (an optimizer step) and gradients in both, then
    PEFT's update_and_allocate and ours: same budget, EMAs, kept triplets and masked E,
    through warm-up, the cubic phase (every deltaT=2 steps), the freeze and after."""
    peft_model, ours = build(peft_config(init_r=4, target_r=2, deltaT=2, **SCHEDULE),
                             ours_config(r=4, target_r=2, delta_t=2, **SCHEDULE))  # fmt: skip
    allocator, state = adalora_allocator(ours), None
    state = allocator.init()
    theirs = peft_model.base_model.rankallocator
    gen, seen_masks = torch.Generator().manual_seed(5), set()
    for step in range(SCHEDULE["total_step"] + 2):
        randomize(peft_model, ours, NAMES, seed=100 + step)
        grads = _grads_into_both(peft_model, gen)
        peft_model.base_model.update_and_allocate(step)
        state, budget = allocator.update_and_allocate(ours, grads, step, state)
        assert int(budget) == theirs.budget_schedule(step)[0], step
        pattern = peft_model.peft_config["default"].rank_pattern
        for i, layer in enumerate(("up", "down")):
            adapter = getattr(ours, layer)
            np.testing.assert_array_equal(adapter.lora_e[...], peft_tensor(peft_model, layer, "lora_E").detach()[:, 0])
            want = [True] * 4 if pattern is None else pattern[f"{layer}.lora_E.default"]
            assert adapter.rank_mask[...].tolist() == want, (step, layer)
            seen_masks.add(tuple(want))
            for j, name in enumerate(NAMES.values()):
                key = f"{layer}.{name}.default"
                for ours_ema, peft_ema in ((state.ipt, theirs.exp_avg_ipt), (state.unc, theirs.exp_avg_unc)):
                    if key not in peft_ema:  # before the first update and after the reset
                        assert not np.asarray(ours_ema[layer][j]).any()
                        continue
                    want_ema = peft_ema[key].numpy()
                    want_ema = want_ema[:, 0] if name == "lora_E" else want_ema.T
                    np.testing.assert_allclose(ours_ema[layer][j], want_ema, rtol=1e-6, atol=1e-9)
    assert budget == 4 and len(seen_masks) > 3  # the allocation moved, and ended at target_r per matrix


@pytest.mark.parametrize(("total", "tinit", "tfinal", "init", "target"),
                         [(10, 0, 0, 24, 16), (100, 10, 20, 96, 64), (37, 3, 5, 60, 0), (1000, 0, 100, 1152, 768)])
def test_budget_table_is_peft_schedule(total, tinit, tfinal, init, target):
    peft_model, _ = build(peft_config(init_r=4, target_r=2, total_step=10), ours_config(r=4, target_r=2))
    theirs = peft_model.base_model.rankallocator
    theirs.peft_config.total_step, theirs.peft_config.tinit, theirs.peft_config.tfinal = total, tinit, tfinal
    theirs.init_bgt, theirs.target_bgt = init, target
    cfg = ours_config(r=4, target_r=2, total_step=total, tinit=tinit, tfinal=tfinal)
    from lora_jax.variants.adalora_schedule import peft_budget

    assert [peft_budget(t, init, target, cfg) for t in range(total + 3)] == [
        theirs.budget_schedule(t)[0] for t in range(total + 3)
    ]


class LossMLP(TorchMLP):
    """PEFT adds its regulariser to ``outputs.loss``: a model whose loss is 0."""

    def forward(self, x):
        return types.SimpleNamespace(loss=0.0 * super().forward(x).sum())


def test_orthogonality_penalty_matches_peft():
    torch_model = LossMLP()
    ours = lj.apply_adapters(FlaxMLP(torch_model), lj.AdapterConfig(
        rules=(lj.Rule(pattern="up|down", variant=ours_config(r=3, orth_reg_weight=0.3, total_step=10)),)))
    torch.manual_seed(0)
    peft_model = get_peft_model(torch_model, peft_config(init_r=3, orth_reg_weight=0.3, total_step=10))
    randomize(peft_model, ours, NAMES)
    loss = peft_model.base_model(torch.from_numpy(inputs())).loss  # AdaLoraModel.forward adds it
    loss.backward()
    value, grads = nnx.value_and_grad(adalora_orthogonality_penalty, argnums=nnx.DiffState(0, lj.AdapterParam))(ours)
    assert float(loss.detach()) > 0.1 and rel(value, loss.detach().numpy()) < 1e-6
    for layer in ("up", "down"):
        for ours_name, peft_name in (("lora_a", "lora_A"), ("lora_b", "lora_B")):
            want = peft_tensor(peft_model, layer, peft_name).grad.numpy().T
            assert rel(getattr(grads, layer)[ours_name][...], want) < 1e-5
    assert float(adalora_orthogonality_penalty(FlaxMLP(TorchMLP()))) == 0.0


def test_jitted_training_drives_the_budget_to_target():
    """A jitted optax step with the allocation inside, the step traced: one compilation;
    the budget falls from 8 (4 triplets x 2 layers) to target_r x 2; after the freeze the
    same triplets are kept and the dropped ones stay exactly zero; the loss falls."""
    cfg = ours_config(r=4, target_r=2, tinit=4, tfinal=8, total_step=30)
    model = lj.apply_adapters(FlaxMLP(TorchMLP()), lj.AdapterConfig(rules=(lj.Rule(pattern="up|down", variant=cfg),)))
    x = jnp.asarray(inputs(rows=16))
    y = jnp.sin(3 * x)
    optimizer = nnx.Optimizer(model, optax.adam(2e-2), wrt=lj.AdapterParam)
    allocator = adalora_allocator(model)
    traces = []

    @nnx.jit
    def train_step(model, optimizer, alloc, step):
        traces.append(step)  # runs only while tracing

        def loss_fn(m):
            return jnp.mean((m(x) - y) ** 2) + adalora_orthogonality_penalty(m)

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, lj.AdapterParam))(model)
        optimizer.update(model, grads)
        alloc, budget = allocator.update_and_allocate(model, grads, step, alloc)
        return loss, alloc, budget

    alloc, losses, budgets, frozen = allocator.init(), [], [], None
    for step in range(36):
        loss, alloc, budget = train_step(model, optimizer, alloc, jnp.asarray(step))
        losses.append(float(loss))
        budgets.append(int(budget))
        masks = [np.asarray(model.up.rank_mask[...]), np.asarray(model.down.rank_mask[...])]
        if step >= 22:  # total_step - tfinal: frozen from here on
            frozen = frozen or [m.copy() for m in masks]
            assert all((a == b).all() for a, b in zip(masks, frozen, strict=True))
            assert sum(m.sum() for m in masks) == 4
            for layer, m in zip((model.up, model.down), masks, strict=True):
                assert not np.asarray(layer.lora_e[...])[~m].any()
    assert len(traces) == 1
    assert budgets[:5] == [8] * 5 and budgets[-1] == 4 and budgets == sorted(budgets, reverse=True)
    assert losses[-1] < 0.5 * losses[0]
