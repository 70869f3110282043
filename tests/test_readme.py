"""The README's and the docs pages' code runs as written: the blocks are read from
README.md and docs/**/*.md themselves, so the docs and the code cannot drift apart.

- ```python blocks: each runs alone, in a fresh namespace (the rule a reader can rely on:
  copy any one block into a file and it runs), all of them in one subprocess in a
  temporary working directory so files they write do not litter the repository. The
  subprocess sees 8 simulated CPU devices, for the device-mesh block, and compiles with
  XLA's backend optimizations off (tiny models: compile time is the cost).
- ```bash blocks cannot all run here: ``bash scripts/demo.sh`` and ``bash scripts/test.sh``
  install packages and run the example / this whole suite (recursion, minutes). Instead
  every command line is checked for what can drift: the script or example it names
  exists, and each ``--flag`` it passes is one the example's ``--help`` lists.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from functools import cache
from pathlib import Path

import pytest
from readme_blocks import code_blocks

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# README first, then the docs pages in a fixed order (paths relative to ROOT, as reported)
PAGES = [README.relative_to(ROOT), *sorted(p.relative_to(ROOT) for p in (ROOT / "docs").rglob("*.md"))]


def _blocks(lang: str):
    return [b for page in PAGES for b in code_blocks((ROOT / page).read_text(), str(page)) if b.lang == lang]


def _env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "MPLBACKEND": "Agg", **extra}


def test_parser_finds_blocks_lines_and_headings():
    text = "# A\n\n```python\nx = 1\n```\n## B\n```bash\nls\n```\n```\nplain\n```\n"
    blocks = code_blocks(text)
    assert [(b.lang, b.code, b.line, b.heading) for b in blocks] == [
        ("python", "x = 1\n", 4, "A"),
        ("bash", "ls\n", 8, "B"),
        ("", "plain\n", 11, "B"),
    ]
    with pytest.raises(ValueError, match=r"README.md:3: a ```python fence is never closed"):
        code_blocks("# A\n\n```python\nx = 1\n")


# 8 CPU devices for the mesh block; the blocks' models are tiny, so XLA's backend
# optimizations cost more compile time than they save (this halves the blocks' CPU time).
BLOCK_XLA_FLAGS = (
    "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
    "--xla_llvm_disable_expensive_passes=true"
)


def test_every_python_block_runs(tmp_path):
    blocks = _blocks("python")
    assert len(blocks) >= 8, "the README and docs lost their code blocks?"
    report = tmp_path / "report.json"
    work = tmp_path / "work"
    work.mkdir()
    runner = [sys.executable, str(ROOT / "tests" / "readme_blocks.py"), *[str(ROOT / p) for p in PAGES]]
    proc = subprocess.run(
        [*runner, "--report", str(report)],
        cwd=work,
        env=_env(XLA_FLAGS=BLOCK_XLA_FLAGS),
        capture_output=True,
        text=True,
        timeout=900,
    )
    results = json.loads(report.read_text()) if report.exists() else []
    failed = [f"{r['file']}:{r['line']} ({r['heading']}):\n{r['error']}" for r in results if r["error"]]
    rerun = "rerun one block: python tests/readme_blocks.py FILE.md --report r.json --line N"
    assert not failed, "\n\n".join([*failed, rerun])
    assert proc.returncode == 0 and len(results) == len(blocks), proc.stdout[-3000:] + proc.stderr[-3000:]


# -- bash blocks ------------------------------------------------------------------------------------


@cache
def _help(script: str) -> str:
    proc = subprocess.run(
        [sys.executable, script, "--help"], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"python {script} --help failed:\n{proc.stderr[-3000:]}"
    return proc.stdout


def _extras() -> set[str]:
    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])


def _check_command(line: str) -> None:
    words = shlex.split(line, comments=True)
    while words and re.match(r"^[A-Za-z_]\w*=", words[0]):  # VAR=value prefixes
        words = words[1:]
    if not words:
        return
    tool, *rest = words
    if tool == "bash":
        assert (ROOT / rest[0]).is_file(), f"{line!r}: {rest[0]} does not exist"
    elif tool in ("python", "python3") and rest[:1] == ["-m"]:
        assert importlib.util.find_spec(rest[1]) is not None, f"{line!r}: no module {rest[1]!r} is installed"
    elif tool in ("python", "python3"):
        script = rest[0]
        assert (ROOT / script).is_file(), f"{line!r}: {script} does not exist"
        listed = set(re.findall(r"--[\w-]+", _help(script)))
        flags = {w.split("=")[0] for w in rest[1:] if w.startswith("--")}
        assert flags <= listed, f"{line!r}: {sorted(flags - listed)} not in `python {script} --help`"
    elif tool == "pip" and rest[:1] == ["install"]:
        for spec in rest[1:]:
            found = re.match(r"^(?:\.|lora_jax)\[([\w,-]+)\]$", spec)
            if found:
                missing = set(found.group(1).split(",")) - _extras()
                assert not missing, f"{line!r}: pyproject.toml has no extra {sorted(missing)}"
    else:
        raise AssertionError(f"{line!r}: test_readme does not know how to check a {tool!r} command; teach it")


def test_bash_blocks_name_files_and_flags_that_exist():
    lines = [line for b in _blocks("bash") for line in b.code.splitlines() if line.strip()]
    assert any("scripts/demo.sh" in line for line in lines) and any("scripts/test.sh" in line for line in lines)
    for line in lines:
        _check_command(line)


def test_bash_check_catches_a_missing_flag_or_file():
    with pytest.raises(AssertionError, match=r"\['--no-such-flag'\] not in `python examples/finetune.py --help`"):
        _check_command("python examples/finetune.py --steps 3 --no-such-flag 1  # comment")
    with pytest.raises(AssertionError, match="scripts/nope.sh does not exist"):
        _check_command("bash scripts/nope.sh")
    with pytest.raises(AssertionError, match="no module 'no_such_module' is installed"):
        _check_command("python -m no_such_module --flag")
    with pytest.raises(AssertionError, match="no extra"):
        _check_command("pip install '.[nope]'")
