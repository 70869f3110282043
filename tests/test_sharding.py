"""Runs the sharding check scripts on 8 simulated CPU devices, each in a subprocess
(XLA_FLAGS must be set before jax is imported):

- tests/sharded_checks.py: Auto mesh axes, a 4 x 2 data x model mesh;
- tests/explicit_mesh_checks.py: Explicit mesh axes, tensor-parallel and FSDP layouts.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, checks: tuple[str, ...]) -> str:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / script), *checks], env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc.stdout


EVERY_VARIANT = "check_every_variant_trains_and_merges_on_fsdp"
LORA_AND_ANTIPASTO = (
    "check_training_matches_one_device",
    "check_merge_on_sharded_kernels",
    "check_import_peft_and_restore_onto_a_sharded_base",
)
RUNS = {  # the explicit-mesh checks in two processes, so that pytest's workers share them
    "auto": ("sharded_checks.py", (), 6),
    "explicit": ("explicit_mesh_checks.py", LORA_AND_ANTIPASTO, 3),
    "explicit_every_variant": ("explicit_mesh_checks.py", (EVERY_VARIANT,), 1),
}


@pytest.mark.parametrize(("script", "checks", "n_checks"), RUNS.values(), ids=RUNS.keys())
def test_sharded_checks(script, checks, n_checks):
    out = _run(script, checks)
    assert out.count("ok check_") == n_checks, out
