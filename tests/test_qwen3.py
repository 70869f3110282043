"""The NNX Qwen3 / Llama model against HF transformers (PyTorch CPU) and PEFT.

Checkpoints are tiny random-init models written by ``save_pretrained``; their norm
weights are perturbed so that loading them wrongly would show.
"""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import lora_jax
from lora_jax.models import (
    ByteTokenizer,
    Qwen3,
    from_hf_name,
    generate,
    hf_tensor_name,
    load_hf,
    tiny_config,
    to_hf_name,
)

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
safetensors_torch = pytest.importorskip("safetensors.torch")

COMMON = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=128,
    initializer_range=0.2,
)
HF_CONFIGS = {
    "qwen3": lambda: transformers.Qwen3Config(**COMMON, rope_theta=1e6, tie_word_embeddings=False),
    # tied embeddings and Llama 3.1 rope scaling, with a short original context so that
    # all three frequency bands occur at head_dim=16
    "llama": lambda: transformers.LlamaConfig(
        **COMMON,
        tie_word_embeddings=True,
        rope_parameters=dict(
            rope_type="llama3",
            rope_theta=5e5,
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=64,
        ),
    ),
}

# full row, left-padded row, right-padded row
TOKENS = np.array([[5, 17, 33, 2, 90, 41, 7, 64], [0, 0, 0, 12, 3, 55, 9, 21], [44, 8, 71, 30, 6, 0, 0, 0]])
MASK = np.array([[1] * 8, [0, 0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0, 0]])


def _hf_positions(mask):
    return torch.from_numpy(np.maximum(np.cumsum(mask, axis=1) - 1, 0))


def _write_checkpoint(kind, path):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(HF_CONFIGS[kind](), attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module", params=sorted(HF_CONFIGS))
def checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    return request.param, path, _write_checkpoint(request.param, path)


def _ours_logits(model, tokens=TOKENS, mask=MASK):
    return np.asarray(model(jnp.asarray(tokens), jnp.asarray(mask)))


def _hf_logits(hf_model, tokens=TOKENS, mask=MASK):
    with torch.no_grad():
        out = hf_model(
            input_ids=torch.from_numpy(tokens),
            attention_mask=torch.from_numpy(mask),
            position_ids=_hf_positions(mask),
        )
    return out.logits.numpy()


def test_logits_match_hf_with_padding(checkpoint):
    _, path, hf_model = checkpoint
    model = load_hf(path)
    ours, ref = _ours_logits(model), _hf_logits(hf_model)
    real = MASK.astype(bool)
    assert np.abs(ref[real]).max() > 1.0  # not a trivially small output
    np.testing.assert_allclose(ours[real], ref[real], atol=1e-4, rtol=1e-4)
    # padding is invisible: each padded row equals the same tokens alone
    alone = _ours_logits(model, TOKENS[1:2, 3:], MASK[1:2, 3:])
    np.testing.assert_allclose(ours[1, 3:], alone[0], atol=1e-5)


def test_greedy_generation_matches_hf(checkpoint):
    _, path, hf_model = checkpoint
    model = load_hf(path)
    left = np.array([[0, 0, 0, 12, 3, 55, 9, 21], [5, 17, 33, 2, 90, 41, 7, 64]])
    mask = (np.arange(8)[None] >= np.array([[3], [0]])).astype(np.int64)
    n_new = 10
    with torch.no_grad():
        ref = hf_model.generate(
            input_ids=torch.from_numpy(left),
            attention_mask=torch.from_numpy(mask),
            max_new_tokens=n_new,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )[:, left.shape[1] :].numpy()
    ours = np.asarray(generate(model, left, mask, max_new_tokens=n_new))
    assert len(set(ref.ravel().tolist())) > 2  # the comparison is not between constant streams
    np.testing.assert_array_equal(ours, ref)


def test_right_padded_generation_equals_unpadded():
    model = Qwen3(tiny_config(), rngs=nnx.Rngs(1))
    tok = ByteTokenizer()
    batch = tok(["a longer prompt", "short"], padding_side="right")
    together = np.asarray(generate(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=6))
    alone = np.asarray(generate(model, tok(["short"])["input_ids"], max_new_tokens=6))
    np.testing.assert_array_equal(together[1], alone[0])
    # a row that emits eos continues with padding; the greedy tokens before it are unchanged
    eos = int(together[0, 2])
    stopped = np.asarray(
        generate(
            model, batch["input_ids"], batch["attention_mask"], max_new_tokens=6, eos_token_id=eos, pad_token_id=-1
        )
    )
    for got, full in zip(stopped, together, strict=True):
        cut = list(full).index(eos) + 1 if eos in full else len(full)
        np.testing.assert_array_equal(got, np.concatenate([full[:cut], np.full(len(full) - cut, -1)]))
    assert (stopped[0] == -1).any()


def test_lora_matches_peft(checkpoint):
    _, path, hf_model = checkpoint
    r, lora_alpha = 4, 8.0
    rule = lora_jax.Rule(
        pattern=r"attn\.(q|v)_proj|mlp\.down_proj", variant=lora_jax.LoRAConfig(r=r, lora_alpha=lora_alpha)
    )
    ours = lora_jax.apply_adapters(load_hf(path), lora_jax.AdapterConfig(rules=(rule,)))
    ref = peft.get_peft_model(
        transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval(),
        peft.LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=["q_proj", "v_proj", "down_proj"]),
    ).eval()
    torch.manual_seed(1)
    n_copied = 0
    for p, adapter in lora_jax.iter_adapters(ours):
        layer = ref.base_model.model.get_submodule(to_hf_name(p))
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        with torch.no_grad():
            b.copy_(0.3 * torch.randn_like(b))  # non-zero B: the adapter changes the output
        adapter.lora_a.value = jnp.asarray(a.detach().numpy().T)
        adapter.lora_b.value = jnp.asarray(b.detach().numpy().T)
        n_copied += 1
    assert n_copied == 3 * 2
    real = MASK.astype(bool)
    got, want = _ours_logits(ours), _hf_logits(ref)
    assert np.abs(want[real] - _hf_logits(hf_model)[real]).max() > 1e-2
    np.testing.assert_allclose(got[real], want[real], atol=1e-4, rtol=1e-4)


def test_name_mapping_round_trip(checkpoint):
    _, path, hf_model = checkpoint
    model = load_hf(path)
    hf_modules = dict(hf_model.named_modules())
    ours = [".".join(map(str, p)) for p, _ in nnx.iter_modules(model) if p]
    for p in ours:
        name = to_hf_name(p)
        assert name in hf_modules, (p, name)
        assert from_hf_name(name) == p
        assert from_hf_name("base_model.model." + name) == p
    assert to_hf_name("layers.0.attn.q_proj") == "model.layers.0.self_attn.q_proj"
    assert hf_tensor_name("layers.1.mlp.down_proj.kernel") == "model.layers.1.mlp.down_proj.weight"
    with pytest.raises(ValueError, match="not a module path"):
        to_hf_name("layers.0.self_attn.q_proj")
    with pytest.raises(ValueError, match="not a module name"):
        from_hf_name("transformer.h.0.attn")


def _copy_ckpt(path, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(path, dst)
    return dst


def _drop_up_proj(t):
    del t["model.layers.1.mlp.up_proj.weight"]


def _transpose_k_proj(t):  # same size, other shape: must still fail
    t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"].T.contiguous()


def _add_q_bias(t):
    t["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)


def _int_down_proj(t):  # an integer weight must not be cast to float as if it were the weight
    t["model.layers.0.mlp.down_proj.weight"] = (100 * t["model.layers.0.mlp.down_proj.weight"]).to(torch.int32)


@pytest.mark.parametrize(
    ("edit", "error", "message"),
    [
        (_drop_up_proj, KeyError, r"model\.layers\.1\.mlp\.up_proj\.weight.*missing"),
        (_int_down_proj, ValueError, r"'model\.layers\.0\.mlp\.down_proj\.weight' has dtype int32, not a floating"),
        (_transpose_k_proj, ValueError, r"k_proj\.weight' has shape \(64, 32\).*implies \(32, 64\)"),
        (_add_q_bias, ValueError, r"does not use: \['model\.layers\.0\.self_attn\.q_proj\.bias'\]"),
    ],
)
def test_bad_tensors_are_named(checkpoint, tmp_path, edit, error, message):
    _, path, _ = checkpoint
    dst = _copy_ckpt(path, tmp_path)
    tensors = safetensors_torch.load_file(dst / "model.safetensors")
    edit(tensors)
    safetensors_torch.save_file(tensors, dst / "model.safetensors")
    with pytest.raises(error, match=message):
        load_hf(dst)


def test_unreadable_files_are_named(checkpoint, tmp_path):
    _, path, _ = checkpoint
    dst = _copy_ckpt(path, tmp_path)
    weights = (dst / "model.safetensors").read_bytes()
    (dst / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(ValueError, match=r"ckpt/model\.safetensors cannot be read as safetensors .*truncated"):
        load_hf(dst)
    (dst / "config.json").write_text('{"model_type": "qwen3",')
    with pytest.raises(ValueError, match=r"ckpt/config\.json is not valid JSON"):
        load_hf(dst)
    (dst / "model.safetensors").unlink()
    (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": "part-2.st"}}))
    shutil.copy(path / "config.json", dst / "config.json")
    with pytest.raises(FileNotFoundError, match=r"index\.json lists shard file\(s\) \['part-2\.st'\]"):
        load_hf(dst)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, r"model_type 'gpt2'.*GPT2LMHeadModel"),
        ({"architectures": ["Qwen3ForSequenceClassification"]}, r"Qwen3ForSequenceClassification.*not supported"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, r"'yarn' is not supported"),
        ({"attention_bias": True}, r"attention_bias"),
        ({"hidden_act": "gelu"}, r"hidden_act='gelu'"),
    ],
)
def test_unsupported_config_is_named(checkpoint, tmp_path, change, message):
    _, path, _ = checkpoint
    dst = _copy_ckpt(path, tmp_path)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(change)
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=message):
        load_hf(dst)


def test_sharded_checkpoint_loads(checkpoint, tmp_path):
    _, path, hf_model = checkpoint
    dst = tmp_path / "sharded"
    hf_model.save_pretrained(dst, max_shard_size="100KB")
    assert (dst / "model.safetensors.index.json").exists()
    np.testing.assert_array_equal(_ours_logits(load_hf(dst)), _ours_logits(load_hf(path)))


def test_old_style_rope_config(checkpoint, tmp_path):
    """Files written by transformers 4.x carry ``rope_theta`` and ``rope_scaling`` (often null)."""
    _, path, _ = checkpoint
    dst = _copy_ckpt(path, tmp_path)
    cfg = json.loads((dst / "config.json").read_text())
    params = cfg.pop("rope_parameters")
    cfg["rope_theta"] = params.pop("rope_theta")
    cfg["rope_scaling"] = None if params["rope_type"] == "default" else params
    (dst / "config.json").write_text(json.dumps(cfg))
    np.testing.assert_array_equal(_ours_logits(load_hf(dst)), _ours_logits(load_hf(path)))


def _finetune_example():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "examples" / "finetune.py"
    spec = importlib.util.spec_from_file_location("finetune_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return example


def test_finetune_example_reduces_loss(tmp_path):
    history = _finetune_example().main(
        ["--steps", "25", "--eval-every", "25", "--sample-tokens", "8", "--quiet", "--out", str(tmp_path)]
    )
    assert history["final_eval_loss"] < history["initial_eval_loss"] - 1.0, history
    assert history["merge_max_abs_diff"] < 1e-3
    assert history["restore_identical"]
    assert (history["saved"]["peft"] / "adapter_model.safetensors").stat().st_size > 0


def test_finetune_example_on_hf_checkpoint(tmp_path):
    """``--model PATH`` loads the weights and the checkpoint's own tokenizer (character-level here)."""
    tokenizers = pytest.importorskip("tokenizers")
    dst = tmp_path / "qwen3"
    _write_checkpoint("qwen3", dst)
    chars = sorted(set("".join(open(_finetune_example().CORPUS).read().split())))
    vocab = {"<pad>": 0, "<unk>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    assert len(vocab) <= COMMON["vocab_size"]
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")
    fast.save_pretrained(dst)
    history = _finetune_example().main(
        ["--model", str(dst), "--steps", "10", "--eval-every", "10", "--sample-tokens", "0", "--quiet"]
        + ["--out", str(tmp_path / "out")]
    )
    assert history["final_eval_loss"] < history["initial_eval_loss"], history
