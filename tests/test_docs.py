"""The docs site (docs/, Sphinx) builds with every warning an error, from the docstrings
as they are: a docstring that does not render, a page that links nowhere or an export
with no place on the API page fails here, not on the site."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _conf():
    spec = importlib.util.spec_from_file_location("docs_conf", ROOT / "docs" / "conf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_docs_build_with_warnings_as_errors(tmp_path):
    if importlib.util.find_spec("sphinx") is None or importlib.util.find_spec("myst_parser") is None:
        raise AssertionError("the docs need sphinx, myst-parser and furo: pip install -e '.[docs]' (setup.sh does)")
    out = tmp_path / "html"
    proc = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", "-d", str(tmp_path / "doctrees"),
         "docs", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-6000:]
    api = (out / "api" / "lora_jax.html").read_text()
    assert "apply_adapters" in api and "DoRAMagnitude" in api
    assert "export_peft" in (out / "api" / "lora_jax.peft.html").read_text()
    assert (out / "variants.html").exists() and (out / "guides" / "steering.html").exists()


def test_plain_text_docstrings_become_valid_rest():
    conf = _conf()
    lines = [
        "Sweep over alphas.",
        "",
        "    out = sweep(model, fn, alphas)   # (9, *m(x).shape)",
        "        continued deeper",
        "",
        "The largest |alpha| within ``a | b`` and :func:`f` keeps *batch axes.",
        "Already a literal block::",
        "",
        "    x = 1",
    ]
    conf.plain_text_docstring(None, "function", "f", None, {}, lines)
    assert lines[:5] == ["Sweep over alphas.", "", "::", "", "    out = sweep(model, fn, alphas)   # (9, *m(x).shape)"]
    assert lines[7] == r"The largest \|alpha\| within ``a | b`` and :func:`f` keeps \*batch axes."
    assert lines[-3:] == ["Already a literal block::", "", "    x = 1"]


def test_every_top_level_name_has_a_place_on_the_api_page():
    conf = _conf()
    page = conf._top_level_page()  # raises when lora_jax.__all__ and TOP_LEVEL disagree
    for names in conf.TOP_LEVEL.values():
        for name in names:
            assert f"lora_jax.{name}" in page, name


def test_code_layout_page_names_every_module():
    layout = (ROOT / "docs" / "layout.md").read_text()
    package = ROOT / "lora_jax"
    modules = [p for p in package.glob("*.py") if p.name != "_version.py"]
    packages = [p for p in package.iterdir() if p.is_dir() and (p / "__init__.py").exists()]
    missing = [str(p.relative_to(ROOT)) for p in modules if str(p.relative_to(ROOT)) not in layout]
    missing += [f"{p.relative_to(ROOT)}/" for p in packages if f"{p.relative_to(ROOT)}/" not in layout]
    assert not missing, f"docs/layout.md does not name {missing}: add a line for each"
