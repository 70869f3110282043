"""EVA: A equals PEFT's EVA components (same data, same model mirrored in torch) and the
same rank allocation; A is the exact PCA of the rows seen; rank redistribution, alpha
scaling and rank 0; kernel-batch layers; errors; the caller's model is untouched."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from peft import LoraConfig
from peft.tuners.lora.config import EvaConfig
from peft.tuners.lora.eva import get_eva_state_dict

import lora_jax as lj
from lora_jax.views import spec_of, view_of
from tests.layers import LAYOUTS

V, D, H = 256, 16, 32


class TorchLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(V, D)
        self.q = torch.nn.Linear(D, D)
        self.up = torch.nn.Linear(D, H)
        self.down = torch.nn.Linear(H, D)

    def forward(self, input_ids, attention_mask=None):
        x = self.embed(input_ids)
        x = x + torch.tanh(self.q(x))
        return self.down(torch.relu(self.up(x)))


class LM(nnx.Module):
    """TorchLM's weights in nnx layers."""

    def __init__(self, t: TorchLM):
        self.embed = nnx.Embed(V, D, rngs=nnx.Rngs(0))
        self.embed.embedding[...] = jnp.asarray(t.embed.weight.detach().numpy())
        for name in ("q", "up", "down"):
            tl = getattr(t, name)
            layer = nnx.Linear(tl.in_features, tl.out_features, rngs=nnx.Rngs(0))
            layer.kernel[...] = jnp.asarray(tl.weight.detach().numpy().T)
            layer.bias[...] = jnp.asarray(tl.bias.detach().numpy())
            setattr(self, name, layer)

    def __call__(self, ids):
        x = self.embed(ids)
        x = x + jnp.tanh(self.q(x))
        return self.down(jax.nn.relu(self.up(x)))


def _lm_and_data(n_batches=30, b=8, t=32):
    torch.manual_seed(0)
    model = TorchLM()
    with torch.no_grad():  # a decaying input spectrum: clear eigengaps, unequal layers
        model.embed.weight.mul_(3 * 0.6 ** torch.arange(D))
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(n_batches):
        lengths = rng.integers(t // 3, t + 1, b)
        mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int64)
        batches.append({"input_ids": rng.integers(0, V, (b, t)), "attention_mask": mask})
    return model, batches


def _forward(m, batch):
    return m(jnp.asarray(batch["input_ids"]))


def _mask(batch):
    return batch["attention_mask"]


def _abs_cos(a, b):
    """|cos| between matching columns of two (d, k) matrices."""
    return np.abs(np.sum(a * b, 0)) / (np.linalg.norm(a, axis=0) * np.linalg.norm(b, axis=0))


def test_matches_peft_eva_with_padding():
    torch_model, batches = _lm_and_data()
    peft_cfg = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q", "up", "down"], init_lora_weights="eva", eva_config=EvaConfig()
    )
    torch_batches = [{k: torch.tensor(v) for k, v in b.items()} for b in batches]
    reference = get_eva_state_dict(torch_model, dataloader=torch_batches, peft_config=peft_cfg, show_progress_bar=False)

    cfg = lj.AdapterConfig(rules=(lj.Rule(pattern="q|up|down", variant=lj.EVAConfig(r=4, lora_alpha=8)),))
    plan = lj.eva_plan(LM(torch_model), cfg, batches, forward=_forward, mask=_mask)
    assert plan.converged and plan.n_batches < len(batches)
    ranks = {p: a.shape[-1] for p, a in plan.components.items()}
    assert ranks == {p: a.shape[0] for p, a in reference.items()}
    assert sorted(ranks.values()) != [4, 4, 4], "the test data should make EVA redistribute ranks"
    for path, a in plan.components.items():
        assert np.all(_abs_cos(np.asarray(a), reference[path].numpy().T) >= 0.99), path


def test_components_are_the_exact_pca_of_the_rows_seen():
    torch_model, batches = _lm_and_data(n_batches=1)
    model = LM(torch_model)
    cfg = lj.AdapterConfig(rules=(lj.Rule(pattern="^q$", variant=lj.EVAConfig(r=3, rho=1.0, whiten=True)),))
    with pytest.warns(UserWarning, match="did not converge"):  # one batch: nothing to compare with
        plan = lj.eva_plan(model, cfg, batches, forward=_forward, mask=_mask)
    rows = np.concatenate(
        [np.asarray(model.embed(jnp.asarray(b["input_ids"])))[b["attention_mask"] > 0] for b in batches]
    )
    centered = rows.astype(np.float64) - rows.mean(0)
    values, vectors = np.linalg.eigh(centered.T @ centered)
    values, vectors = values[::-1][:3], vectors[:, ::-1][:, :3]
    a = np.asarray(plan.components["q"])
    np.testing.assert_allclose(np.linalg.norm(a, axis=0), values**-0.25, rtol=1e-4)  # PEFT's whitening
    assert np.all(_abs_cos(a, vectors) >= 0.9999)
    np.testing.assert_allclose(plan.ratios["q"], values / np.trace(centered.T @ centered), rtol=1e-4)


class TwoBranch(nnx.Module):
    def __init__(self):
        self.a = nnx.Linear(8, 8, rngs=nnx.Rngs(1))
        self.b = nnx.Linear(16, 8, rngs=nnx.Rngs(2))
        self.c = nnx.Linear(16, 8, rngs=nnx.Rngs(3))

    def __call__(self, batch):
        return self.a(batch["x"]) + self.b(batch["y"]) + self.c(batch["y"])


def _branch_batches(n=6):
    keys = jax.random.split(jax.random.key(0), 2 * n)
    scale = jnp.array([3.5, 3.2, 2.9, 2.6, 0.05, 0.05, 0.05, 0.05])  # x: 4 strong directions, y: isotropic
    return [
        {"x": jax.random.normal(keys[2 * i], (40, 8)) * scale[None], "y": jax.random.normal(keys[2 * i + 1], (40, 16))}
        for i in range(n)
    ]


def test_rank_redistribution_rank_zero_and_alpha():
    model = TwoBranch()
    cfg = lj.AdapterConfig(
        rules=(
            lj.Rule(pattern="^(a|b)$", variant=lj.EVAConfig(r=2, lora_alpha=6.0, tau=0.9)),
            lj.Rule(pattern=".", variant=lj.LoRAConfig(r=1)),  # must not pick up b once EVA drops it
        )
    )
    before = jax.tree.map(np.asarray, nnx.state(model))
    batches = _branch_batches()
    plan = lj.eva_plan(model, cfg, batches, forward=lambda m, b: m(b))
    adapted = lj.apply_eva_plan(model, plan)
    assert isinstance(adapted.a, lj.variants.EVA) and adapted.a.config.r == 4 and adapted.a.config.lora_alpha == 12.0
    assert adapted.a.config.scale == cfg.rules[0].variant.scale
    assert isinstance(adapted.b, nnx.Linear), "rank 0: the layer stays unadapted"
    assert isinstance(adapted.c, lj.variants.LoRA) and not isinstance(adapted.c, lj.variants.EVA)
    np.testing.assert_array_equal(adapted.a.lora_a[...], plan.components["a"])
    assert lj.AdapterConfig.from_json(plan.config.to_json()) == plan.config
    rebuilt = lj.apply_adapters(model, plan.config)  # what a checkpoint restore starts from
    shapes = [jax.tree.map(jnp.shape, nnx.state(m, lj.AdapterParam)) for m in (rebuilt, adapted)]
    assert shapes[0] == shapes[1]
    np.testing.assert_array_equal(adapted(batches[0]), model(batches[0]))  # identity at init
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, nnx.state(model)))
    assert isinstance(model.a, nnx.Linear) and isinstance(model.b, nnx.Linear)


@pytest.mark.filterwarnings("ignore:eva_init")
@pytest.mark.parametrize("name", ["moe_EBD_EDF", "per_head_BTNH_NHK"])
def test_kernel_batch_layers_get_one_pca_per_matrix(name):
    layout = next(lay for lay in LAYOUTS if lay.name == name)
    layer, x = layout.build(seed=1)
    x2 = layout.build(seed=2)[1]
    model = nnx.Sequential(layer)
    cfg = lj.AdapterConfig(rules=(lj.Rule(pattern="layers", variant=lj.EVAConfig(r=2, rho=1.0)),))
    adapted = lj.eva_init(model, cfg, [x, x2])
    spec = spec_of(layer, view_of(layer))
    rows = np.concatenate(
        [np.asarray(spec.in_to_matrix(v)).reshape(*spec.batch_shape, -1, spec.d_in) for v in (x, x2)], axis=-2
    )
    rows = rows.reshape(-1, *rows.shape[-2:])
    a = np.asarray(adapted.layers[0].lora_a[...]).reshape(-1, spec.d_in, 2)
    for i, r in enumerate(rows):
        c = r.astype(np.float64) - r.mean(0)
        vectors = np.linalg.eigh(c.T @ c)[1][:, ::-1][:, :2]
        assert np.all(_abs_cos(a[i], vectors) >= 0.999)


@pytest.mark.filterwarnings("ignore:eva_init. the components did not converge:UserWarning")  # two batches only
def test_non_finite_activations_name_the_layers():
    model = TwoBranch()
    eva = lj.AdapterConfig(rules=(lj.Rule(pattern="^(a|b|c)$", variant=lj.EVAConfig(r=2)),))
    batches = _branch_batches(2)
    batches[1] = {**batches[1], "y": batches[1]["y"].at[3, 0].set(jnp.inf)}
    with pytest.raises(ValueError, match=r"EVA: the calibration data produced non-finite .* layer\(s\) \['b', 'c'\]"):
        lj.eva_init(model, eva, batches)
    assert list(lj.iter_adapters(model)) == []
    # the same row masked out as padding: calibration goes through, with finite components
    mask = lambda b: jnp.isfinite(b["y"]).all(-1).astype(jnp.float32)
    adapted = lj.eva_init(model, eva, batches, mask=mask)
    assert all(bool(jnp.isfinite(a.lora_a[...]).all()) for _, a in lj.iter_adapters(adapted))


def test_errors():
    model = TwoBranch()
    eva = lj.AdapterConfig(rules=(lj.Rule(pattern="^a$", variant=lj.EVAConfig(r=4)),))
    with pytest.raises(ValueError, match="no calibration data"):
        lj.eva_init(model, eva, [])
    few = [{"x": jnp.ones((3, 8)), "y": jnp.ones((3, 16))}]  # 3 tokens < round(rho * r) = 8 candidates
    with pytest.raises(ValueError, match=r"'a' saw 3 calibration rows .* needs more than 8"):
        lj.eva_init(model, eva, few)
    with pytest.raises(ValueError, match="no rule of the config uses EVAConfig"):
        lj.eva_init(model, lj.AdapterConfig(rules=(lj.Rule(pattern="a", variant=lj.LoRAConfig(r=2)),)), few)
    with pytest.raises(ValueError, match=r"rank r=9 at 'a' must be an integer in \[1, 8\]"):
        lj.eva_init(model, lj.AdapterConfig(rules=(lj.Rule(pattern="^a$", variant=lj.EVAConfig(r=9)),)), few)
    with pytest.raises(ValueError, match=r"rho=0\.5 must be >= 1"):
        lj.EVAConfig(rho=0.5)
    with pytest.raises(ValueError, match="tau=2 must be in"):
        lj.EVAConfig(tau=2)


class TorchTwoInputs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(4, 6)
        self.b = torch.nn.Linear(4, 6)

    def forward(self, x, y):
        return self.a(x) + self.b(y)


class TwoInputs(nnx.Module):
    def __init__(self):
        self.a = nnx.Linear(4, 6, rngs=nnx.Rngs(0))
        self.b = nnx.Linear(4, 6, rngs=nnx.Rngs(1))

    def __call__(self, batch):
        return self.a(batch["x"]) + self.b(batch["y"])


def _exact_ratios(rows: np.ndarray) -> np.ndarray:
    centered = rows.astype(np.float64) - rows.mean(0)
    values = np.linalg.eigvalsh(centered.T @ centered)[::-1]
    return values / values.sum()


def test_near_tie_allocation_follows_peft_freezing_rule():
    """a's 2nd and b's 3rd variance ratios tie (0.2) in the population, so the small-sample
    estimates decide which layer gets the 4th rank. a converges first; PEFT stops feeding
    it data then, b runs on. Feeding a until b converges (the old rule) flips the tie."""
    rng = np.random.default_rng(1)
    scale_a, scale_b = np.sqrt([0.7, 0.2, 0.05, 0.05]), np.sqrt([0.4, 0.35, 0.2, 0.05])
    batches = [
        {"x": (rng.standard_normal((16, 4)) * scale_a).astype(np.float32),
         "y": (rng.standard_normal((16, 4)) * scale_b).astype(np.float32)}
        for _ in range(40)
    ]  # fmt: skip
    peft_cfg = LoraConfig(
        r=2, lora_alpha=4, target_modules=["a", "b"], init_lora_weights="eva", eva_config=EvaConfig(rho=2.0)
    )
    reference = get_eva_state_dict(
        TorchTwoInputs(),
        dataloader=[{k: torch.tensor(v) for k, v in b.items()} for b in batches],
        peft_config=peft_cfg,
        forward_fn=lambda m, b: m(b["x"], b["y"]),
        prepare_model_inputs_fn=None,
        prepare_layer_inputs_fn=None,
        show_progress_bar=False,
    )  # rho * r = d_in: PEFT's incremental PCA is exact, only the rule can differ
    peft_ranks = {path: a.shape[0] for path, a in reference.items()}

    cfg = lj.AdapterConfig(rules=(lj.Rule(pattern="^(a|b)$", variant=lj.EVAConfig(r=2, lora_alpha=4, rho=2.0)),))
    plan = lj.eva_plan(TwoInputs(), cfg, [{k: jnp.asarray(v) for k, v in b.items()} for b in batches])
    assert plan.converged
    assert {path: a.shape[-1] for path, a in plan.components.items()} == peft_ranks == {"a": 1, "b": 3}

    seen = {key: np.concatenate([b[key] for b in batches[: plan.n_batches]]) for key in ("x", "y")}
    np.testing.assert_allclose(plan.ratios["b"], _exact_ratios(seen["y"]), atol=1e-5)  # b saw every batch
    assert not np.allclose(plan.ratios["a"], _exact_ratios(seen["x"]), atol=1e-5), "a should have stopped early"
    # the old rule: a kept taking data until b converged, and won the tie
    pooled = np.concatenate([_exact_ratios(seen["x"]), _exact_ratios(seen["y"])])
    assert list(np.argsort(-pooled, kind="stable")[:4] < 4).count(True) == 2
