"""The LoRA training example fits its toy task and never touches the base weights."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import train_lora


def test_train_lora_example_fits_and_freezes_base():
    out = train_lora.train(steps=300, progress=False)
    losses = out["losses"]
    assert losses[-1] < 0.02 * losses[0], (losses[0], losses[-1])
    assert out["base_unchanged"]
    assert out["n_train"] < out["n_base"] / 4
