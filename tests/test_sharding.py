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


def _run(script: str) -> str:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / script)], env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc.stdout


@pytest.mark.parametrize(("script", "n_checks"), [("sharded_checks.py", 6), ("explicit_mesh_checks.py", 4)])
def test_sharded_checks(script, n_checks):
    out = _run(script)
    assert out.count("ok check_") == n_checks, out
