"""AdaLoRA against PEFT 0.21: the layer (forward, gradients, merge), the rank allocation
(budget per step, EMAs, the triplets kept, E after each call), the orthogonal regulariser,
and the ADALORA file both ways; plus a jitted optax loop driving the allocation."""

import json
import types

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
# PEFT warns about its own AdaLoRA files: rank_pattern keys read as LoRA's rank_pattern, and
# a layer pruned to rank 0 (empty tensors) taken for an ungathered ZeRO-3 shard.
pytestmark = [
    pytest.mark.filterwarnings("ignore:The following rank_pattern keys did not match"),
    pytest.mark.filterwarnings("ignore:Adapter 'default'.*invalid shape"),
]
SCHEDULE = {"tinit": 2, "tfinal": 3, "total_step": 12, "beta1": 0.8, "beta2": 0.7}


def peft_config(**kw):
    return PeftAdaLoraConfig(target_modules=["up", "down"], **kw)


def ours_config(**kw):
    return AdaLoRAConfig(**kw)


@pytest.mark.parametrize("r", [3])
def test_adalora_matches_peft(r):
    peft_model, ours = build(peft_config(init_r=r, target_r=1, lora_alpha=2.0 * r + 1, total_step=10),
                             ours_config(r=r, target_r=1, lora_alpha=2.0 * r + 1, total_step=10))
    randomize(peft_model, ours, NAMES)
    assert_parity(peft_model, ours, NAMES)  # measured: benchmarks/peft_parity.py


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
    allocator = adalora_allocator(ours)
    state = allocator.init()
    allocate = nnx.jit(allocator.update_and_allocate)  # one compilation for every step
    theirs = peft_model.base_model.rankallocator
    gen, seen_masks = torch.Generator().manual_seed(5), set()
    for step in range(SCHEDULE["total_step"] + 2):
        randomize(peft_model, ours, NAMES, seed=100 + step)
        grads = _grads_into_both(peft_model, gen)
        peft_model.base_model.update_and_allocate(step)
        state, budget = allocate(ours, grads, jnp.asarray(step), state)
        assert int(budget) == theirs.budget_schedule(step)[0], step
        pattern = peft_model.peft_config["default"].rank_pattern
        for layer in ("up", "down"):
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


def _peft_allocated(path, steps: int = 10):
    """PEFT's own AdaLoRA, trained with its allocation to the end (pruned triplets), saved."""
    torch.manual_seed(0)
    model = get_peft_model(TorchMLP(), peft_config(init_r=4, target_r=2, lora_alpha=6, **SCHEDULE))
    x = torch.from_numpy(inputs())
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for step in range(steps):
        (model(x) - 1).pow(2).sum().backward()
        opt.step()
        model.base_model.update_and_allocate(step)
        opt.zero_grad()
    model.save_pretrained(str(path))
    return path


def _tensors(path) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def test_import_of_peft_pruned_file_matches_peft_and_round_trips_bit_exact(tmp_path):
    path = _peft_allocated(tmp_path / "theirs")
    pattern = json.loads((path / "adapter_config.json").read_text())["rank_pattern"]
    ours = import_peft(path, FlaxMLP(TorchMLP()), hf_name=lambda p: p)
    theirs = PeftModel.from_pretrained(TorchMLP(), str(path))
    x = inputs()
    want = theirs(torch.from_numpy(x)).detach().numpy()
    assert rel(want, TorchMLP()(torch.from_numpy(x)).detach().numpy()) > 1e-3
    assert rel(ours(jnp.asarray(x)), want) < 1e-5
    kept = 0
    for layer in ("up", "down"):  # (here PEFT gives 'up' rank 0: empty tensors in the file)
        adapter = getattr(ours, layer)
        mask = np.asarray(adapter.rank_mask[...])
        assert mask.tolist() == pattern[f"{layer}.lora_E"] and adapter.config.r == 4
        assert not np.asarray(adapter.lora_e[...])[~mask].any()
        kept += mask.sum()
    assert kept == 4  # target_r x 2 layers
    export_peft(tmp_path / "ours", ours, hf_name=lambda p: p)
    again = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    # a layer that keeps every triplet is left out of rank_pattern: PEFT reads it at init_r
    assert again["rank_pattern"] == {k: v for k, v in pattern.items() if not all(v)}
    assert again["init_r"] == 4 and again["total_step"] == 12 and again["lora_alpha"] == 6
    theirs_t, ours_t = _tensors(path), _tensors(tmp_path / "ours")
    assert sorted(theirs_t) == sorted(ours_t)
    for key, value in theirs_t.items():
        np.testing.assert_array_equal(ours_t[key], value, err_msg=key)


def test_peft_loads_our_export_pruned_or_not(tmp_path):
    fresh = lj.apply_adapters(FlaxMLP(TorchMLP()), lj.AdapterConfig(
        rules=(lj.Rule(pattern="up|down", variant=ours_config(r=3, target_r=1, total_step=20)),)))
    perturbed_copy(fresh)
    exported_matches_peft(fresh, tmp_path / "full", alpha=1.0)
    assert json.loads((tmp_path / "full" / "adapter_config.json").read_text())["rank_pattern"] is None
    pruned = perturbed_copy(import_peft(_peft_allocated(tmp_path / "theirs"), FlaxMLP(TorchMLP()), hf_name=lambda p: p))
    for adapter in (pruned.up, pruned.down):  # what update_and_allocate does after the freeze
        adapter.lora_e.value = jnp.where(adapter.rank_mask[...], adapter.lora_e[...], 0.0)
    exported_matches_peft(pruned, tmp_path / "pruned", alpha=-0.6)


def test_identity_and_alpha_zero_are_bit_exact():
    x = jnp.asarray(inputs())
    base = FlaxMLP(TorchMLP())
    model = lj.apply_adapters(base, lj.AdapterConfig(rules=(lj.Rule(pattern="up|down", variant=ours_config(r=3)),)))
    np.testing.assert_array_equal(model(x), base(x))
    perturbed_copy(model)
    assert rel(model(x), base(x)) > 1e-3
    lj.set_alpha(model, 0.0)
    np.testing.assert_array_equal(model(x), base(x))


def test_bad_configs_are_refused_by_name():
    with pytest.raises(ValueError, match="target_r=-1 must be an integer >= 0"):
        AdaLoRAConfig(target_r=-1)
    with pytest.raises(ValueError, match="leaves no budget phase"):
        AdaLoRAConfig(tinit=5, tfinal=5, total_step=10)
    with pytest.raises(ValueError, match=r"beta1=1.0 and beta2=0.85 must be in \(0, 1\)"):
        AdaLoRAConfig(beta1=1.0)
    with pytest.raises(ValueError, match="delta_t=0"):
        AdaLoRAConfig(delta_t=0)
    with pytest.raises(ValueError, match="lora_alpha=0 must be > 0"):
        AdaLoRAConfig(lora_alpha=0)


def _adapted(*variants):
    rules = tuple(lj.Rule(pattern=f"^{n}$", variant=v) for n, v in zip(("up", "down"), variants, strict=False))
    return lj.apply_adapters(FlaxMLP(TorchMLP()), lj.AdapterConfig(rules=rules))


def test_allocator_and_penalty_errors():
    with pytest.raises(ValueError, match="holds no AdaLoRA adapter"):
        adalora_allocator(FlaxMLP(TorchMLP()))
    with pytest.raises(ValueError, match="set total_step"):
        adalora_allocator(_adapted(ours_config(r=4, target_r=2)))
    with pytest.raises(ValueError, match="disagree on"):
        adalora_allocator(_adapted(ours_config(r=4, target_r=2, total_step=9), ours_config(r=4, target_r=2)))
    with pytest.raises(ValueError, match=r"target_r=6 exceeds r at \['down'\]"):
        adalora_allocator(_adapted(*(ours_config(r=r, target_r=6, total_step=9) for r in (8, 4))))
    with pytest.raises(ValueError, match="disagree on orth_reg_weight"):
        adalora_orthogonality_penalty(_adapted(ours_config(r=4, orth_reg_weight=0.1), ours_config(r=4)))


def test_codec_errors(tmp_path):
    with pytest.raises(PeftFormatError, match="needs total_step > 0"):
        export_peft(tmp_path / "a", _adapted(ours_config(r=4)), hf_name=lambda p: p)
    model = _adapted(ours_config(r=4, target_r=2, total_step=9))
    perturbed_copy(model)
    model.up.rank_mask.value = jnp.asarray([True, False, True, True])
    with pytest.raises(PeftFormatError, match="outside rank_mask has a non-zero E"):
        export_peft(tmp_path / "b", model, hf_name=lambda p: p)
    path = _peft_allocated(tmp_path / "theirs")
    config = json.loads((path / "adapter_config.json").read_text())
    config["rank_pattern"]["up.lora_E"] = [True] * 4
    (path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(PeftFormatError, match=r"module 'up': init_r=4 and rank_pattern \[True, True, True, True\]"):
        import_peft(path, FlaxMLP(TorchMLP()), hf_name=lambda p: p)
    (path / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(PeftFormatError, match=r"AdaLoRA with \{'use_dora': True\} is not supported"):
        import_peft(path, FlaxMLP(TorchMLP()), hf_name=lambda p: p)
    config["rank_pattern"] = ["up"]
    (path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(PeftFormatError, match="rank_pattern must map '<module>.lora_E' to a value"):
        import_peft(path, FlaxMLP(TorchMLP()), hf_name=lambda p: p)


def test_allocation_counts_one_matrix_per_kernel_batch_index():
    """MoE experts (4 kernels of 16 x 12): 4 matrices of r=4 triplets, target 2 each."""
    from helpers import Wrap
    from layers import LAYOUTS

    layer, _ = next(lay for lay in LAYOUTS if lay.name == "moe_EBD_EDF").build()
    cfg = ours_config(r=4, target_r=2, total_step=6)
    model = lj.apply_adapters(Wrap(layer), lj.AdapterConfig(rules=(lj.Rule(pattern="layer", variant=cfg),)))
    perturbed_copy(model)
    allocator = adalora_allocator(model)
    assert (allocator.init_budget, allocator.target_budget) == (16, 8)
    grads = nnx.state(perturbed_copy(nnx.clone(model), seed=2), lj.AdapterParam)  # any values shaped as grads
    allocate, alloc = nnx.jit(allocator.update_and_allocate), allocator.init()
    for step in range(8):
        alloc, budget = allocate(model, grads, jnp.asarray(step), alloc)
    mask = np.asarray(model.layer.rank_mask[...])
    assert mask.shape == (4, 4) and mask.sum() == int(budget) == 8
    assert not np.asarray(model.layer.lora_e[...])[~mask].any()
