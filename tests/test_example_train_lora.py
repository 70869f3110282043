"""The LoRA training example fits its toy task and never touches the base weights."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import train_lora


def test_train_lora_example_fits_and_freezes_base(monkeypatch, capfd):
    monkeypatch.setenv("LORA_JAX_PROGRESS", "1e-9")  # a progress line at every step
    out = train_lora.train(steps=300)
    err = capfd.readouterr().err.splitlines()  # a pipe, not a terminal: the lines must still come
    counts = [line.split(",")[0] for line in err if line.startswith("train ")]
    assert counts[:2] == ["train 1/300 steps", "train 2/300 steps"] and len(counts) == 301, counts[-3:]
    assert err[-1].startswith("train 300/300 steps, loss") and err[-1].endswith("done)"), err[-3:]
    losses = out["losses"]
    assert losses[-1] < 0.02 * losses[0], (losses[0], losses[-1])
    assert out["base_unchanged"]
    assert out["n_train"] < out["n_base"] / 4
