"""examples/steer.py in quick mode (the tiny random Qwen3): the objective trains, the log-prob
sweep is monotone, every method's generations are scored, and the adapter restores exactly.

The real run (SmolLM2, ``bash scripts/demo.sh``) takes minutes; its numbers are in the README."""

import runpy
import types
from pathlib import Path

import numpy as np
import pytest


def _load_example():
    return types.SimpleNamespace(**runpy.run_path(str(Path(__file__).parents[1] / "examples" / "steer.py")))


def test_steer_example_trains_scores_and_restores(tmp_path):
    result = _load_example().run(["--quick", "--out", str(tmp_path)])
    assert np.isfinite(result["losses"]).all()
    assert result["loss_after"] < 0.95 * result["loss_before"], (result["loss_before"], result["loss_after"])
    m = result["lp_metrics"]
    # +1 was trained to raise the positive-minus-negative opener gap, -1 to lower it: monotone over [-1, 1]
    trained = np.abs(m.alphas) <= 1.0
    assert (np.diff(m.effect[trained]) > 0).all(), (m.alphas, m.effect)
    assert set(result["scores"]) == {"AntiPaSTO", "steering vector", "prompting", "LoRA (same objective)"}
    for name, s in result["scores"].items():
        assert 0.0 in s.coefs and np.isfinite(s.effect).all() and np.isfinite(s.ppl).all(), name
        # alpha 0 is the base model; the reference decodes other batch shapes, so rounding only
        assert np.abs(s.kl[s.coefs == 0]).max() < 1e-6, (name, s.kl)
        assert (s.kl >= -1e-6).all(), (name, s.kl)
    rows = result["rows"]
    assert len(result["texts"]) == len(rows.method) == 4 * (5 + 4 + 2)  # one generate call for three methods
    assert result["scores"]["AntiPaSTO"].kl[np.abs(result["scores"]["AntiPaSTO"].coefs) == 1].max() > 0
    for png in (result["png"], result["sweep_png"]):
        assert Path(png).stat().st_size > 5000
    assert result["restore_identical"], "the saved adapter, restored onto a fresh base, must give identical logits"


def test_steer_example_on_hf_checkpoint(tmp_path):
    """``--model PATH``: HF weights and the checkpoint's own tokenizer (character-level here,
    without a chat template, so prompts are plain transcripts)."""
    tokenizers = pytest.importorskip("tokenizers")
    import json

    import transformers
    from test_qwen3 import COMMON, _write_checkpoint

    example = _load_example()
    dst = tmp_path / "qwen3"
    _write_checkpoint("qwen3", dst)
    data = json.loads(example.DATA.read_text())
    text = json.dumps(data) + "system: user: assistant: "
    vocab = {"<pad>": 0, "<unk>": 1, **{c: i + 2 for i, c in enumerate(sorted(set(text) - set(" \n")))}}
    assert len(vocab) <= COMMON["vocab_size"]
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>").save_pretrained(
        dst
    )
    argv = ["--model", str(dst), "--steps", "3", "--batch", "4", "--rank", "4", "--prompts", "2", "--new-tokens", "4"]
    result = example.run([*argv, "--no-baselines", "--out", str(tmp_path / "out")])
    assert np.isfinite(result["losses"]).all()
    m = result["lp_metrics"]
    assert np.isfinite(m.kl).all() and m.kl[m.alphas == 0] == 0
    assert set(result["scores"]) == {"AntiPaSTO"}
