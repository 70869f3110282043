"""PEFT format parity: a torch MLP and its NNX mirror (Linear and Einsum layers), PEFT on CPU."""

from __future__ import annotations

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lora_jax import (
    AdapterConfig,
    AdapterParam,
    LoRAConfig,
    Rule,
    apply_adapters,
    iter_adapters,
    set_alpha,
)
from lora_jax.peft_format import CODECS, PEFT_FORMAT_VERSION, PeftFormatError, export_peft, import_peft
from lora_jax.variants import VARIANTS

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

B, T = 2, 3


class Net(nnx.Module):
    """up: Linear 8->16; q: 16 -> (2 heads, 4); o: (2, 4) -> 8 (two contracted axes)."""

    def __init__(self, seed=0):
        rngs = nnx.Rngs(seed)
        init = nnx.initializers.normal(0.5)
        self.up = nnx.Linear(8, 16, rngs=rngs, bias_init=init)
        self.q = nnx.Einsum("BTD,DNH->BTNH", (16, 2, 4), (2, 4), rngs=rngs, bias_init=init)
        self.o = nnx.Einsum("BTNH,NHD->BTD", (2, 4, 8), (8,), rngs=rngs, bias_init=init)

    def __call__(self, x):
        return self.o(jnp.tanh(self.q(jnp.tanh(self.up(x)))))


class TorchNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.q, self.o = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8), torch.nn.Linear(8, 8)

    def forward(self, x):
        h = torch.tanh(self.q(torch.tanh(self.up(x))))  # (B, T, N*H): N-major, as the kernel's N, H order
        return self.o(h)


def torch_mirror(net: Net) -> TorchNet:
    """Same weights: torch weight = kernel matrix.T (d_out, d_in), bias flattened in kernel order."""
    mirror = TorchNet()
    for name in ("up", "q", "o"):
        layer = getattr(net, name)
        matrix = np.asarray(layer.kernel[...]).reshape(-1, getattr(mirror, name).out_features)
        getattr(mirror, name).weight.data = torch.tensor(matrix.T.copy())
        getattr(mirror, name).bias.data = torch.tensor(np.asarray(layer.bias[...]).reshape(-1))
    return mirror


def same_name(path: str) -> str:
    return path


X = np.asarray(jax.random.normal(jax.random.key(0), (B, T, 8)))


def torch_out(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(X)).numpy()


def trained(base: Net) -> nnx.Module:
    """Three Adam steps, different rank and lora_alpha per layer, so patterns are exercised."""
    cfg = AdapterConfig(
        rules=(
            Rule(pattern="up", variant=LoRAConfig(r=4, lora_alpha=8.0)),
            Rule(pattern="q|o", variant=LoRAConfig(r=2, lora_alpha=3.0)),
        )
    )
    model = apply_adapters(base, cfg)
    optimizer = nnx.Optimizer(model, optax.adam(5e-2), wrt=AdapterParam)
    y = jax.random.normal(jax.random.key(1), (B, T, 8))

    @nnx.jit
    def step(model, optimizer):
        grads = nnx.grad(lambda m: jnp.mean((m(X) - y) ** 2), argnums=nnx.DiffState(0, AdapterParam))(model)
        optimizer.update(model, grads)

    for _ in range(3):
        step(model, optimizer)
    return model


def test_export_loads_in_peft_with_the_same_outputs(tmp_path):
    base = Net()
    model = trained(base)
    set_alpha(model, 0.5, pattern="q")  # PEFT has no alpha: exported into B
    export_peft(tmp_path, model, hf_name=same_name)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["r"], config["rank_pattern"], config["alpha_pattern"]) == (2, {"^up": 4}, {"^up": 8.0})
    peft_model = peft.PeftModel.from_pretrained(torch_mirror(base), str(tmp_path))
    ours = np.asarray(model(jnp.asarray(X)))
    assert np.abs(ours - np.asarray(base(jnp.asarray(X)))).max() > 1e-2  # the adapter does something
    np.testing.assert_allclose(torch_out(peft_model), ours, rtol=1e-4, atol=1e-4)


def test_peft_saved_adapter_imports_with_peft_outputs(tmp_path):
    base = Net()
    torch.manual_seed(0)
    cfg = peft.LoraConfig(
        r=4,
        lora_alpha=16,
        target_modules=["up", "q", "o"],
        init_lora_weights=False,  # random B: a non-trivial adapter
        rank_pattern={"o": 2},
        alpha_pattern={"q": 3},
    )
    peft_model = peft.get_peft_model(torch_mirror(base), cfg)
    peft_model.save_pretrained(str(tmp_path))
    model = import_peft(tmp_path, base, hf_name=same_name)
    ranks = {path: a.config.r for path, a in iter_adapters(model)}
    assert ranks == {"o": 2, "q": 4, "up": 4}
    assert dict(iter_adapters(model))["q"].config.lora_alpha == 3.0
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(X))), torch_out(peft_model), rtol=1e-4, atol=1e-4)
    assert list(iter_adapters(base)) == []


# The codec rows whose variant this build has: new variants are covered once they land.
ACTIVE = sorted(name for name in CODECS if name in VARIANTS)


# PiSSA / OLoRA export as a rank-2r LoRA, which must fit min(d_in, d_out) = 8 to import;
# OFT's blocks and MiSS's shards must fit d_in = 8; LoKr with low-rank factors on both sides;
# ROAD's groups must divide every d_out (16, 8, 8).
OPTIONS = {
    "pissa": {"r": 4},
    "olora": {"r": 4},
    "oft": {"oft_block_size": 4},
    "miss": {"r": 4},
    "lokr": {"r": 1, "decompose_both": True},
    "road": {"group_size": 4},
    "adalora": {"r": 4, "target_r": 2, "total_step": 10},
}


def moved(name: str) -> nnx.Module:
    variant = VARIANTS[name](**OPTIONS.get(name, {}))
    model = apply_adapters(Net(), AdapterConfig(rules=(Rule(pattern="up|q|o", variant=variant),), seed=3))
    leaves, treedef = jax.tree.flatten(nnx.state(model, AdapterParam))
    keys = jax.random.split(jax.random.key(4), len(leaves))
    moved = [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    nnx.update(model, treedef.unflatten(moved))
    return model


@pytest.mark.parametrize("name", ACTIVE)
def test_every_codec_loads_in_peft_with_the_same_outputs(tmp_path, name, monkeypatch):
    # PEFT's BOFT tries (and fails, seconds each) to compile its CUDA extension on a CPU: skip that
    monkeypatch.setattr("peft.tuners.boft.layer.get_fbd_cuda", lambda: None)
    model = moved(name)
    export_peft(tmp_path, model, hf_name=same_name)
    peft_model = peft.PeftModel.from_pretrained(torch_mirror(Net()), str(tmp_path))
    np.testing.assert_allclose(torch_out(peft_model), np.asarray(model(jnp.asarray(X))), rtol=1e-4, atol=1e-4)


def test_export_names_the_peft_format_version_so_peft_loads_oft_without_a_warning(tmp_path):
    export_peft(tmp_path, moved("oft"), hf_name=same_name)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_version"] == PEFT_FORMAT_VERSION
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PEFT warns on an OFT file that names no version
        peft.PeftModel.from_pretrained(torch_mirror(Net()), str(tmp_path))


@pytest.mark.parametrize("name", ACTIVE)
def test_round_trip(tmp_path, name):
    model = moved(name)
    export_peft(tmp_path, model, hf_name=lambda p: f"model.{p}_proj")
    back = import_peft(tmp_path, Net(), hf_name=lambda p: f"model.{p}_proj")
    x = jnp.asarray(X)
    if {a.config.name for _, a in iter_adapters(back)} == {name}:
        jax.tree.map(np.testing.assert_array_equal, nnx.state(back), nnx.state(model))
    else:  # an export-only conversion (PiSSA -> LoRA): the same function, other factors
        np.testing.assert_allclose(back(x), model(x), rtol=1e-5, atol=1e-5)


def test_export_rejects_kernel_batch_axes(tmp_path):
    class Experts(nnx.Module):
        def __init__(self):
            self.w = nnx.Einsum("EBD,EDF->EBF", (2, 8, 4), rngs=nnx.Rngs(0))

    model = apply_adapters(Experts(), AdapterConfig(rules=(Rule(pattern="w", variant=LoRAConfig(r=2)),)))
    with pytest.raises(PeftFormatError, match=r"'w': einsum 'EBD,EDF->EBF' has kernel-batch axes \(2,\)"):
        export_peft(tmp_path, model, hf_name=same_name)


def test_import_names_what_does_not_fit(tmp_path):
    export_peft(tmp_path, trained(Net()), hf_name=same_name)
    with pytest.raises(PeftFormatError, match=r"no layer of the base model maps to \['o', 'q', 'up'\]"):
        import_peft(tmp_path, Net(), hf_name=lambda p: f"x.{p}")
    swapped = {"q": "o", "o": "q", "up": "up"}
    with pytest.raises(PeftFormatError, match=r"o.lora_a needs shape \(8, 2\) but the file gives \(16, 2\)"):
        import_peft(tmp_path, Net(), hf_name=lambda p: swapped.get(p))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "FOURIERFT"}))
    unsupported = (
        r"adapter_config.json: peft_type 'FOURIERFT' is not supported "
        r"\(supported: ADALORA, BOFT, DELORA, HRA, IA3, LOHA, LOKR, LORA, MISS, OFT, ROAD, VERA\)"
    )
    with pytest.raises(PeftFormatError, match=unsupported):
        import_peft(tmp_path, Net(), hf_name=same_name)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "r": 8, "rank_pattern": {}}))
    with pytest.raises(PeftFormatError, match=r"module 'o': adapter_config.json gives r=8 .* lora_A.weight has rank 2"):
        import_peft(tmp_path, Net(), hf_name=same_name)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "modules_to_save": ["head"]}))
    with pytest.raises(PeftFormatError, match=r"PEFT options \{'modules_to_save': \['head'\]\} are not supported"):
        import_peft(tmp_path, Net(), hf_name=same_name)


def test_unreadable_files_are_named_and_the_base_is_untouched(tmp_path):
    export_peft(tmp_path, trained(Net()), hf_name=same_name)
    base = Net()
    before = jax.tree.map(np.asarray, nnx.state(base))
    weights = (tmp_path / "adapter_model.safetensors").read_bytes()
    (tmp_path / "adapter_model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(PeftFormatError, match=r"adapter_model.safetensors cannot be read as safetensors .*truncated"):
        import_peft(tmp_path, base, hf_name=same_name)
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA",')
    with pytest.raises(PeftFormatError, match=r"adapter_config.json is not valid JSON"):
        import_peft(tmp_path, base, hf_name=same_name)
    (tmp_path / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(PeftFormatError, match=r"adapter_config.json holds a list, not a JSON object"):
        import_peft(tmp_path, base, hf_name=same_name)
    with pytest.raises(FileNotFoundError, match=r"nowhere/adapter_config.json: no adapter_config.json"):
        import_peft(tmp_path / "nowhere", base, hf_name=same_name)
    assert list(iter_adapters(base)) == []
    jax.tree.map(np.testing.assert_array_equal, nnx.state(base), before)


@pytest.mark.parametrize(("use_dora", "kept"), [(True, 0.0), (False, 0.1)], ids=["dora", "lora"])
def test_lora_dropout_imports_and_changes_nothing_at_inference(tmp_path, use_dora, kept):
    base = Net()
    torch.manual_seed(0)
    cfg = peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["up", "q"], init_lora_weights=False, use_dora=use_dora, lora_dropout=0.1
    )
    peft_model = peft.get_peft_model(torch_mirror(base), cfg)
    peft_model.save_pretrained(str(tmp_path))
    peft_model.eval()
    model = import_peft(tmp_path, base, hf_name=same_name)
    assert {a.config.name for _, a in iter_adapters(model)} == {"dora" if use_dora else "lora"}
    assert {a.config.dropout for _, a in iter_adapters(model)} == {kept}  # DoRA drops it, LoRA keeps it
    model.eval()
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(X))), torch_out(peft_model), rtol=1e-4, atol=1e-4)


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # inside PEFT's save_pretrained
def test_qwen3_adapters_both_ways_match_hf_peft(tmp_path):
    """The reference Qwen3 (Einsum attention, GQA) against HF + PEFT, names via to_hf_name."""
    from test_qwen3 import MASK, _hf_logits, _ours_logits, _write_checkpoint

    from lora_jax.models import load_hf, to_hf_name

    transformers = pytest.importorskip("transformers")
    _write_checkpoint("qwen3", tmp_path / "hf")
    hf = lambda: transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    real = MASK.astype(bool)
    projections = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

    rule = Rule(pattern="|".join(projections), variant=LoRAConfig(r=4, lora_alpha=8.0))
    ours = apply_adapters(load_hf(tmp_path / "hf"), AdapterConfig(rules=(rule,)))
    leaves, treedef = jax.tree.flatten(nnx.state(ours, AdapterParam))
    keys = jax.random.split(jax.random.key(2), len(leaves))
    nnx.update(
        ours, treedef.unflatten([x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)])
    )
    export_peft(tmp_path / "ours", ours, hf_name=to_hf_name)
    loaded = peft.PeftModel.from_pretrained(hf(), str(tmp_path / "ours")).eval()
    want = _hf_logits(loaded)
    assert np.abs(want[real] - _hf_logits(hf())[real]).max() > 1e-2
    np.testing.assert_allclose(_ours_logits(ours)[real], want[real], atol=1e-4, rtol=1e-4)

    torch.manual_seed(3)
    theirs = peft.get_peft_model(
        hf(), peft.LoraConfig(r=2, lora_alpha=5, target_modules=projections, init_lora_weights=False)
    )
    theirs.save_pretrained(str(tmp_path / "theirs"))
    imported = import_peft(tmp_path / "theirs", load_hf(tmp_path / "hf"), hf_name=to_hf_name)
    assert len(list(iter_adapters(imported))) == 7 * 2
    np.testing.assert_allclose(_ours_logits(imported)[real], _hf_logits(theirs.eval())[real], atol=1e-4, rtol=1e-4)


def test_export_needs_alpha_one_where_peft_cannot_hold_it(tmp_path):
    model = moved("dora")  # DoRA is not linear in alpha, so alpha cannot be folded into a tensor
    set_alpha(model, 0.5, pattern="q")
    with pytest.raises(PeftFormatError, match=r"'q': alpha is 0.5; PEFT has no alpha .* set_alpha\(model, 1.0\)"):
        export_peft(tmp_path, model, hf_name=same_name)


# PEFT's own configs for the variants whose codec keeps PEFT's tensor names (DeLoRA, HRA,
# ROAD); init_weights=False gives every one a non-identity adapter.
PEFT_SAVED = {
    "delora": lambda: peft.DeloraConfig(
        r=2,
        delora_lambda=3,
        target_modules=["up", "q", "o"],
        init_weights=False,
        rank_pattern={"o": 4},
        lambda_pattern={"q": 5},
    ),
    "hra": lambda: peft.HRAConfig(r=4, target_modules=["up", "q", "o"], init_weights=False),
    "road": lambda: peft.RoadConfig(
        variant="road_4", group_size=4, target_modules=["up", "q", "o"], init_weights=False
    ),
}


def rel(actual, expected) -> float:
    actual, expected = np.asarray(actual), np.asarray(expected)
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


@pytest.mark.parametrize("name", sorted(PEFT_SAVED))
def test_peft_saved_file_imports_and_exports_back_bit_exact(tmp_path, name):
    """PEFT's file -> lora_jax: PEFT's outputs (fp32, 1e-5 relative); lora_jax -> a file:
    PEFT's tensors bit for bit and PEFT's config entries."""
    from safetensors.numpy import load_file

    base = Net()
    torch.manual_seed(0)
    theirs = peft.get_peft_model(torch_mirror(base), PEFT_SAVED[name]()).eval()
    theirs.save_pretrained(str(tmp_path / "theirs"))
    model = import_peft(tmp_path / "theirs", base, hf_name=same_name)
    assert {a.config.name for _, a in iter_adapters(model)} == {name}
    want = torch_out(theirs)
    assert rel(torch_out(torch_mirror(base)), want) > 1e-2  # PEFT's adapter does something
    assert rel(model(jnp.asarray(X)), want) <= 1e-5
    export_peft(tmp_path / "ours", model, hf_name=same_name)
    ours, original = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("ours", "theirs"))
    assert sorted(ours) == sorted(original)
    for key, value in original.items():
        np.testing.assert_array_equal(ours[key], value, err_msg=key)
    config, peft_config = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("ours", "theirs"))
    entries = {"delora": ("r", "delora_lambda"), "hra": ("r", "apply_GS"), "road": ("variant", "group_size")}[name]
    assert {k: config[k] for k in ("peft_type", *entries)} == {k: peft_config[k] for k in ("peft_type", *entries)}


@pytest.mark.parametrize("name", sorted(PEFT_SAVED))
def test_exported_file_matches_peft_within_1e5(tmp_path, name):
    model = moved(name)
    export_peft(tmp_path, model, hf_name=same_name)
    ours = np.asarray(model(jnp.asarray(X)))
    assert rel(Net()(jnp.asarray(X)), ours) > 1e-2
    assert rel(torch_out(peft.PeftModel.from_pretrained(torch_mirror(Net()), str(tmp_path)).eval()), ours) <= 1e-5


def test_delora_exports_at_any_alpha_and_per_layer_settings(tmp_path):
    """DeLoRA's delta is linear in lambda, so alpha is folded into it; per-layer r and
    lambda go into PEFT's rank_pattern / lambda_pattern."""
    from lora_jax import DeLoRAConfig

    rules = (
        Rule(pattern="up", variant=DeLoRAConfig(r=4, delora_lambda=2.0, dropout=0.1)),
        Rule(pattern="q|o", variant=DeLoRAConfig(r=2, dropout=0.1)),
    )
    model = apply_adapters(Net(), AdapterConfig(rules=rules))
    leaves, treedef = jax.tree.flatten(nnx.state(model, AdapterParam))
    keys = jax.random.split(jax.random.key(4), len(leaves))
    nnx.update(
        model, treedef.unflatten([x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)])
    )
    set_alpha(model, -0.5, pattern="q")
    export_peft(tmp_path, model, hf_name=same_name)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["r"], config["rank_pattern"], config["delora_lambda"], config["lambda_pattern"]) == (
        2,
        {"^up": 4},
        15.0,
        {"^up": 2.0},
    )
    assert config["module_dropout"] == 0.1
    model.eval()
    loaded = peft.PeftModel.from_pretrained(torch_mirror(Net()), str(tmp_path)).eval()
    assert rel(torch_out(loaded), model(jnp.asarray(X))) <= 1e-5
    back = import_peft(tmp_path, Net(), hf_name=same_name)
    assert {p: (a.config.r, a.config.dropout) for p, a in iter_adapters(back)} == {
        "o": (2, 0.1),
        "q": (2, 0.1),
        "up": (4, 0.1),
    }
    back.eval()
    assert rel(back(jnp.asarray(X)), model(jnp.asarray(X))) <= 1e-6


def test_hra_and_road_refuse_what_they_cannot_hold(tmp_path):
    from lora_jax import HRAConfig, ROADConfig

    rules = (Rule(pattern="up", variant=HRAConfig(r=4)), Rule(pattern="q|o", variant=HRAConfig(r=2)))
    mixed = apply_adapters(Net(), AdapterConfig(rules=rules))
    with pytest.raises(PeftFormatError, match=r"PEFT holds one 'r' per adapter; this model has \{2: 2, 4: 1\}"):
        export_peft(tmp_path, mixed, hf_name=same_name)
    road = moved("road")
    set_alpha(road, 0.5)
    with pytest.raises(PeftFormatError, match=r"alpha is 0.5; PEFT has no alpha and road is not linear in it"):
        export_peft(tmp_path, road, hf_name=same_name)
    export_peft(
        tmp_path,
        apply_adapters(Net(), AdapterConfig(rules=(Rule(pattern="up|q|o", variant=ROADConfig(group_size=4)),))),
        hf_name=same_name,
    )
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "variant": "road_3"}))
    with pytest.raises(PeftFormatError, match=r"module 'o': road: kind='road_3' must be one of"):
        import_peft(tmp_path, Net(), hf_name=same_name)
    export_peft(tmp_path, moved("hra"), hf_name=same_name)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "apply_GS": True}))
    with pytest.raises(PeftFormatError, match=r"module 'o': apply_GS=True .* not implemented"):
        import_peft(tmp_path, Net(), hf_name=same_name)
    torch.manual_seed(0)
    odd = peft.get_peft_model(torch_mirror(Net()), peft.HRAConfig(r=3, target_modules=["up"], init_weights=False))
    odd.save_pretrained(str(tmp_path / "odd"))
    with pytest.raises(PeftFormatError, match=r"module 'up': hra: r=3 must be a positive even integer"):
        import_peft(tmp_path / "odd", Net(), hf_name=same_name)
