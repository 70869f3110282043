"""examples/eva.py in quick mode: EVA calibrates, redistributes ranks, trains and restores."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import eva as eva_example


def test_eva_example_calibrates_and_trains(tmp_path):
    runs = eva_example.main(["--steps", "20", "--quiet", "--out", str(tmp_path)])
    eva, lora = runs["eva"], runs["lora"]
    assert len(set(eva["ranks"].values())) > 1, "EVA should move rank between layers"
    assert sum(eva["ranks"].values()) <= sum(lora["ranks"].values())  # the same total budget
    for h in (eva, lora):
        assert h["final_eval_loss"] < h["initial_eval_loss"] - 1.0
        assert h["restore_identical"]
