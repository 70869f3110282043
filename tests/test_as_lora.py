"""save_as_lora: every variant of the contract suite written as a plain PEFT LoRA, loaded by
HF PEFT onto a torch model with the same base weights."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_contract import CASES

from lora_jax import AdapterConfig, AdapterParam, IA3Config, LoRAConfig, ROADConfig, Rule, apply_adapters, set_alpha
from lora_jax.as_lora import delta_matrix, save_as_lora, save_as_lora_pair
from lora_jax.peft_format import PeftFormatError
from lora_jax.surgery import iter_adapters

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

X = np.asarray(jax.random.normal(jax.random.key(0), (2, 3, 8)))
LAYERS = ("up", "q", "o")


class Net(nnx.Module):
    """up: Linear 8->16; q: 16 -> (2 heads, 4); o: (2, 4) -> 8 (two contracted axes)."""

    def __init__(self, bias: bool = False):
        rngs = nnx.Rngs(0)
        init = nnx.initializers.normal(0.5)
        self.up = nnx.Linear(8, 16, use_bias=bias, rngs=rngs, bias_init=init)
        self.q = nnx.Einsum("BTD,DNH->BTNH", (16, 2, 4), (2, 4) if bias else None, rngs=rngs, bias_init=init)
        self.o = nnx.Einsum("BTNH,NHD->BTD", (2, 4, 8), (8,) if bias else None, rngs=rngs, bias_init=init)

    def __call__(self, x):
        return self.o(jnp.tanh(self.q(jnp.tanh(self.up(x)))))


class TorchNet(torch.nn.Module):
    def __init__(self, net: Net):
        super().__init__()
        bias = net.up.bias is not None
        self.up, self.q, self.o = (torch.nn.Linear(i, o, bias=bias) for i, o in ((8, 16), (16, 8), (8, 8)))
        for name in LAYERS:  # torch weight = kernel matrix.T; q's (N, H) outputs flattened N-major
            layer, mirror = getattr(net, name), getattr(self, name)
            matrix = np.asarray(layer.kernel[...]).reshape(-1, mirror.out_features)
            mirror.weight.data = torch.tensor(matrix.T.copy())
            if bias:
                mirror.bias.data = torch.tensor(np.asarray(layer.bias[...]).reshape(-1))

    def forward(self, x):
        return self.o(torch.tanh(self.q(torch.tanh(self.up(x)))))


def same_name(path: str) -> str:
    return path


def moved(config, *, bias: bool = False, rules: tuple[Rule, ...] = ()) -> nnx.Module:
    """The variant on every layer (or ``rules``) with its trainable weights moved off the identity."""
    rules = rules or (Rule(pattern="up|q|o", variant=config),)
    return nudged(apply_adapters(Net(bias), AdapterConfig(rules=rules, seed=3)))


def nudged(model: nnx.Module) -> nnx.Module:
    leaves, treedef = jax.tree.flatten(nnx.state(model, AdapterParam))
    keys = jax.random.split(jax.random.key(4), len(leaves))
    moved = [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    nnx.update(model, treedef.unflatten(moved))
    return model


def peft_model(path, net: Net):
    return peft.PeftModel.from_pretrained(TorchNet(net), str(path)).eval()


def torch_out(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(X)).numpy()


def rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


def peft_deltas(path, net: Net) -> dict[str, np.ndarray]:
    """The kernel delta PEFT applies per layer, in lora_jax's (d_in, d_out) matrix view."""
    merged = peft_model(path, net).merge_and_unload()
    base = TorchNet(net)
    return {n: (merged.get_submodule(n).weight - base.get_submodule(n).weight).detach().numpy().T for n in LAYERS}


def exact_deltas(model, alpha: float) -> dict[str, np.ndarray]:
    return {p: np.asarray(delta_matrix(a, alpha)[0]) for p, a in iter_adapters(model)}


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_variant_as_lora_in_peft(tmp_path, name):
    """Full rank reproduces the adapted model; rank 2 applies exactly the reported error."""
    model = moved(CASES[name].config)
    report = save_as_lora(tmp_path / "full", model, hf_name=same_name, rank=8)  # 8 = min(d_in, d_out) everywhere
    assert report.ranks == {"o": 8, "q": 8, "up": 8}
    assert report.max_error <= 1e-5
    ours = np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(X)))  # one compile, not one per op
    assert rel(Net()(jnp.asarray(X)), ours) > 1e-2  # the adapter does something
    assert rel(torch_out(peft_model(tmp_path / "full", Net())), ours) <= 1e-5

    set_alpha(model, 0.3)  # the file is written at alpha=-1 whatever alpha the model holds
    report = save_as_lora(tmp_path / "low", model, hf_name=same_name, alpha=-1.0, rank=2)
    assert report.ranks == {"o": 2, "q": 2, "up": 2}
    written, exact = peft_deltas(tmp_path / "low", Net()), exact_deltas(model, -1.0)
    for layer in LAYERS:
        np.testing.assert_allclose(rel(written[layer], exact[layer]), report.errors[layer], rtol=1e-3, atol=1e-6)
    assert {float(a.alpha[...]) for _, a in iter_adapters(model)} == {np.float32(0.3)}  # the model keeps its alpha


def test_auto_rank_finds_a_lora_s_own_ranks(tmp_path):
    rules = (Rule(pattern="up", variant=LoRAConfig(r=1)), Rule(pattern="q|o", variant=LoRAConfig(r=3)))
    model = moved(None, rules=rules)
    report = save_as_lora(tmp_path, model, hf_name=same_name, max_error=1e-4)
    assert report.ranks == {"o": 3, "q": 3, "up": 1}
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["r"], config["rank_pattern"], config["alpha_pattern"]) == (3, {"^up": 1}, {"^up": 1.0})
    assert rel(torch_out(peft_model(tmp_path, Net())), model(jnp.asarray(X))) <= 1e-5


def test_auto_rank_meets_the_target_with_the_fewest_ranks(tmp_path):
    model = moved(CASES["antipasto"].config)
    report = save_as_lora(tmp_path, model, hf_name=same_name, max_error=0.1)
    exact = exact_deltas(model, 1.0)
    for layer, k in report.ranks.items():
        assert report.errors[layer] <= 0.1
        if k > 1:  # one rank fewer misses the target
            s = np.linalg.svd(exact[layer], compute_uv=False)
            assert np.sqrt(np.sum(s[k - 1 :] ** 2) / np.sum(s**2)) > 0.1
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert {config["rank_pattern"].get(f"^{n}", config["r"]) for n in LAYERS} == set(report.ranks.values())
    written = peft_deltas(tmp_path, Net())
    for layer in LAYERS:
        np.testing.assert_allclose(rel(written[layer], exact[layer]), report.errors[layer], rtol=1e-3, atol=1e-6)


def test_max_error_zero_is_full_rank_and_a_zero_delta_is_rank_one(tmp_path):
    model = moved(CASES["hra"].config)
    report = save_as_lora(tmp_path / "exact", model, hf_name=same_name, max_error=0.0)
    assert report.ranks == {"o": 8, "q": 8, "up": 8} and report.max_error <= 1e-5
    fresh = apply_adapters(Net(), AdapterConfig(rules=(Rule(pattern="up|q|o", variant=LoRAConfig(r=2)),)))
    zero = save_as_lora(tmp_path / "zero", fresh, hf_name=same_name, max_error=0.1)
    assert zero.ranks == {"o": 1, "q": 1, "up": 1} and zero.errors == {"o": 0.0, "q": 0.0, "up": 0.0}
    np.testing.assert_array_equal(torch_out(peft_model(tmp_path / "zero", Net())), torch_out(TorchNet(Net())))


def test_antipasto_pair_is_plus_and_minus_alpha(tmp_path):
    model = moved(CASES["antipasto"].config)
    reports = save_as_lora_pair(tmp_path, model, hf_name=same_name, rank=8)
    assert sorted(reports) == [-1.0, 1.0]
    assert {r.path.name for r in reports.values()} == {"plus", "minus"}
    for alpha, report in reports.items():
        set_alpha(model, alpha)
        assert rel(torch_out(peft_model(report.path, Net())), model(jnp.asarray(X))) <= 1e-5
    plus, minus = peft_deltas(tmp_path / "plus", Net()), peft_deltas(tmp_path / "minus", Net())
    assert rel(minus["up"], -plus["up"]) > 1e-3  # rotation: -1 is the inverse, not the negated delta


def test_bias_delta_is_refused_or_dropped_and_counted(tmp_path):
    model = moved(ROADConfig(group_size=2), bias=True)
    with pytest.raises(PeftFormatError, match=r"'o': the road adapter changes the layer's bias .* bias='drop'"):
        save_as_lora(tmp_path / "refused", model, hf_name=same_name, rank=8)
    assert not (tmp_path / "refused").exists()
    report = save_as_lora(tmp_path, model, hf_name=same_name, rank=8, bias="drop")
    for path, adapter in iter_adapters(model):
        delta, bias_delta = (np.asarray(d) for d in delta_matrix(adapter, 1.0))
        expected = np.linalg.norm(bias_delta) / np.sqrt(np.sum(delta**2) + np.sum(bias_delta**2))
        np.testing.assert_allclose(report.errors[path], expected, rtol=1e-4)
    with pytest.raises(PeftFormatError, match=r"the dropped bias delta alone is .* above max_error=1e-06"):
        save_as_lora(tmp_path, model, hf_name=same_name, max_error=1e-6, bias="drop")
    ia3 = moved(IA3Config(), bias=True)  # IA3's output gate scales the bias too
    with pytest.raises(PeftFormatError, match=r"the ia3 adapter changes the layer's bias"):
        save_as_lora(tmp_path / "ia3", ia3, hf_name=same_name, rank=8)


def test_bad_input_is_refused_before_anything_is_written(tmp_path):
    model = moved(LoRAConfig(r=2))
    before = jax.tree.map(np.asarray, nnx.state(model))
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"save_as_lora: alpha must be finite, got nan"):
        save_as_lora(out, model, hf_name=same_name, alpha=float("nan"), rank=2)
    with pytest.raises(ValueError, match=r"save_as_lora: alpha must be a scalar \(one file per alpha\)"):
        save_as_lora(out, model, hf_name=same_name, alpha=[1.0, -1.0], rank=2)
    with pytest.raises(ValueError, match=r"rank=0 must be an integer >= 1"):
        save_as_lora(out, model, hf_name=same_name, rank=0)
    with pytest.raises(ValueError, match=r"rank=2.5 must be an integer >= 1"):
        save_as_lora(out, model, hf_name=same_name, rank=2.5)
    with pytest.raises(ValueError, match=r"give exactly one of rank= \(an int\) or max_error="):
        save_as_lora(out, model, hf_name=same_name, rank=2, max_error=0.1)
    with pytest.raises(ValueError, match=r"give exactly one of rank="):
        save_as_lora(out, model, hf_name=same_name)
    with pytest.raises(ValueError, match=r"max_error=1.5 must be a relative error in \[0, 1\)"):
        save_as_lora(out, model, hf_name=same_name, max_error=1.5)
    with pytest.raises(ValueError, match=r"bias='keep' must be one of \('refuse', 'drop'\)"):
        save_as_lora(out, model, hf_name=same_name, rank=2, bias="keep")
    with pytest.raises(PeftFormatError, match=r"hf_name\('o'\) gave None"):
        save_as_lora(out, model, hf_name=lambda p: None if p == "o" else p, rank=2)
    with pytest.raises(ValueError, match=r"save_as_lora: alpha must be finite"):
        save_as_lora_pair(out, model, hf_name=same_name, alpha=float("inf"), rank=2)
    with pytest.raises(ValueError, match=r"save_as_lora_pair: alpha=0 is the base model on both sides"):
        save_as_lora_pair(out, model, hf_name=same_name, alpha=0.0, rank=2)

    class Experts(nnx.Module):
        def __init__(self):
            self.w = nnx.Einsum("EBD,EDF->EBF", (2, 8, 4), rngs=nnx.Rngs(0))

    experts = apply_adapters(Experts(), AdapterConfig(rules=(Rule(pattern="w", variant=LoRAConfig(r=2)),)))
    with pytest.raises(PeftFormatError, match=r"'w': einsum 'EBD,EDF->EBF' has kernel-batch axes \(2,\)"):
        save_as_lora(out, experts, hf_name=same_name, rank=2)
    assert not out.exists()
    jax.tree.map(np.testing.assert_array_equal, nnx.state(model), before)


def test_conv_and_embed_layers_become_peft_conv_and_embedding_loras(tmp_path):
    from test_lora_conv_embed import ConvEmbed, TorchConvEmbed

    torch.manual_seed(0)
    torch_base = TorchConvEmbed()
    ids = np.random.default_rng(0).integers(0, 11, (2, 7))
    rules = (Rule(pattern="conv|embed", variant=LoRAConfig(r=2, lora_alpha=6)),)
    ours = nudged(apply_adapters(ConvEmbed(torch_base), AdapterConfig(rules=rules)))
    report = save_as_lora(tmp_path, ours, hf_name=same_name, rank=100)  # clamped to each layer's full rank
    assert report.ranks == {"conv": 5, "embed": 4} and report.max_error <= 1e-5
    loaded = peft.PeftModel.from_pretrained(torch_base, str(tmp_path)).eval()
    with torch.no_grad():
        expected = loaded(torch.from_numpy(ids)).numpy()
    assert rel(ours(jnp.asarray(ids)), expected) <= 1e-5
