"""examples/steer.py in quick mode: the steering objective trains and the sweep is monotone."""

import importlib.util
from pathlib import Path

import numpy as np


def _load_example():
    path = Path(__file__).parents[1] / "examples" / "steer.py"
    spec = importlib.util.spec_from_file_location("steer_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_steer_example_trains_a_monotone_steering_direction(tmp_path):
    result = _load_example().run(["--quick", "--out", str(tmp_path)])
    assert np.isfinite(result["losses"]).all()
    assert result["loss_after"] < 0.8 * result["loss_before"], (result["loss_before"], result["loss_after"])
    m = result["metrics"]
    # +1 was trained to raise the honest-minus-dishonest answer gap, -1 to lower it
    assert m.slope > 0
    assert m.monotone_frac == 1.0 and m.spearman == 1.0
    assert m.effect[m.alphas == 1.0] > m.effect[m.alphas == 0.0] > m.effect[m.alphas == -1.0]
    assert Path(result["png"]).stat().st_size > 5000
