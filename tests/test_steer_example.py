"""examples/steer.py in quick mode: the steering objective trains and the sweep is monotone."""

import runpy
import types
from pathlib import Path

import numpy as np
import pytest


def _load_example():
    return types.SimpleNamespace(**runpy.run_path(str(Path(__file__).parents[1] / "examples" / "steer.py")))


def test_steer_example_trains_a_monotone_steering_direction(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("LORA_JAX_PROGRESS", "1e-9")  # a progress line at every step
    result = _load_example().run(["--quick", "--out", str(tmp_path)])
    err = capfd.readouterr().err.splitlines()  # a pipe, not a terminal: the training must not be silent
    train_lines = [line for line in err if line.startswith("train ")]
    assert len(train_lines) == len(result["losses"]) + 1 and train_lines[-1].endswith("done)"), err[-5:]
    assert train_lines[0].startswith("train 1/") and ", loss " in train_lines[0], train_lines[0]
    assert np.isfinite(result["losses"]).all()
    assert result["loss_after"] < 0.95 * result["loss_before"], (result["loss_before"], result["loss_after"])
    for name in ("held-out", "train"):
        m = result["metrics"][name]
        # +1 was trained to raise the honest-minus-dishonest answer gap, -1 to lower it: monotone
        # over the trained range [-1, 1]; beyond it the effect may saturate
        trained = np.abs(m.alphas) <= 1.0
        assert (np.diff(m.effect[trained]) > 0).all(), (name, m.alphas, m.effect)
        assert m.slope > 0 and m.spearman > 0.9, (name, m.slope, m.spearman)
    assert Path(result["png"]).stat().st_size > 5000
    assert result["restore_identical"], "the saved adapter, restored onto a fresh base, must give identical logits"


def test_steer_example_on_hf_checkpoint(tmp_path):
    """``--model PATH``: HF weights and the checkpoint's own tokenizer (character-level here)."""
    tokenizers = pytest.importorskip("tokenizers")
    import transformers
    from test_qwen3 import COMMON, _write_checkpoint

    example = _load_example()
    dst = tmp_path / "qwen3"
    _write_checkpoint("qwen3", dst)
    text = "".join(p[k] for p in example.load_pairs(example.DATA) for k in ("chosen", "rejected", "continuation"))
    vocab = {"<pad>": 0, "<unk>": 1, **{c: i + 2 for i, c in enumerate(sorted(set(text) - set(" \n")))}}
    assert len(vocab) <= COMMON["vocab_size"]
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>").save_pretrained(
        dst
    )
    result = example.run(["--model", str(dst), "--steps", "3", "--batch", "4", "--out", str(tmp_path / "out")])
    assert np.isfinite(result["losses"]).all()
    m = result["metrics"]["held-out"]
    assert np.isfinite(m.kl).all() and m.kl[m.alphas == 0] == 0
