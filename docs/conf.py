"""Sphinx configuration: the docs site built from docs/*.md and the package's docstrings.

    sphinx-build -W -b html docs docs/_build/html     (tests/test_docs.py runs this)

The API pages (docs/api/*.rst) are written here at every build from each namespace's
public names, so a function added to a namespace appears without editing the docs.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
import types
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS.parent))  # the checkout's lora_jax, not an installed copy

import lora_jax  # noqa: E402

project = "lora_jax"
author = "the lora_jax authors"
copyright = "2026, the lora_jax authors"
release = lora_jax.__version__

extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.mathjax"]
myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
html_theme = "furo"
html_title = f"lora_jax {release}"

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
python_use_unqualified_type_names = True
autodoc_default_options = {"members": False, "show-inheritance": True}
add_module_names = False
# Docstrings use ``literal`` for code; a single-backtick span is a name in plain text.
default_role = "literal"

# -- Docstrings as written in this project ------------------------------------------------
# They are plain text with ````code```` spans and indented examples, not reStructuredText:
# an indented block after a paragraph is an example (made a literal block here), and a
# bare ``*`` or ``|`` is math (``*batch``, ``|alpha|``), not emphasis or a substitution.

_ROLE_OR_LITERAL = re.compile(r"(``.*?``|:[\w:]+:`[^`]*`|`[^`]*`)")


def escape_prose(line: str) -> str:
    pieces = _ROLE_OR_LITERAL.split(line)
    for i in range(0, len(pieces), 2):  # even pieces are outside code spans and roles
        pieces[i] = re.sub(r"(?<!\\)([*|])", r"\\\1", pieces[i])
        pieces[i] = re.sub(r"(\w)_(?=\s|$|[,.;:)])", r"\1\\_", pieces[i])  # name_ is a reference
    return "".join(pieces)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def plain_text_docstring(app, what, name, obj, options, lines: list[str]) -> None:
    out: list[str] = []
    literal_indent = None  # inside a literal block: lines indented deeper than this
    for line in lines:
        if literal_indent is not None:
            if not line.strip() or _indent(line) > literal_indent:
                out.append(line)
                continue
            literal_indent = None
        if line.strip() and out and not out[-1].strip():
            previous = next((x for x in reversed(out) if x.strip()), None)
            if previous is not None and _indent(line) > _indent(previous) and not previous.rstrip().endswith("::"):
                out += ["::", ""]  # an indented example after a paragraph
                literal_indent = _indent(previous)
                out.append(line)
                continue
        if line.rstrip().endswith("::"):
            literal_indent = _indent(line)
            out.append(line)
            continue
        out.append(escape_prose(line))
    lines[:] = out


def setup(app) -> None:
    app.connect("autodoc-process-docstring", plain_text_docstring)
    app.connect("builder-inited", lambda app: write_api_pages())


# -- API pages -----------------------------------------------------------------------------

# namespace -> one line saying what it is for (the page's lead). Order = the index's order.
NAMESPACES = {
    "lora_jax.variants": "One module per adapter method, the variant contract and their helpers.",
    "lora_jax.transforms": "Pure ``nnx.State -> nnx.State`` functions, usable inside ``jax.jit`` and ``jax.vmap``.",
    "lora_jax.steering": "Alpha sweeps with one compilation, their metrics and plots.",
    "lora_jax.checkpoint": "Orbax checkpoints of the adapter alone, restored onto a fresh base model.",
    "lora_jax.peft": "PEFT's adapter files, both ways.",
    "lora_jax.calibrate": "Input statistics of the targeted layers, without hooks.",
    "lora_jax.select": "AntiPaSTO's data-driven choice of singular directions.",
    "lora_jax.linalg": "Top-r and randomized SVD, LQ, norms: plain arrays, no NNX.",
    "lora_jax.views": "The registry of layer types that are linear maps, and their views.",
    "lora_jax.einsum_spec": "The einsum algebra of a layer: the matrix form of its kernel and activations.",
    "lora_jax.ragged": "LoRA per expert through ``jax.lax.ragged_dot``.",
    "lora_jax.progress": "Throttled progress lines that read the same in a terminal and a log.",
    "lora_jax.named": "Several adapters on one base under names: mixed batches, hot-swap.",
    "lora_jax.quant": "A quantized frozen base (int8, int4 / Q4_1, nf4): quantize, merge into it, LoftQ.",
    "lora_jax.models": "The reference Qwen3 / Llama causal LM, its loaders and generation.",
}

# The top level, in groups (every name of ``lora_jax.__all__`` that is not a namespace
# must be in one: the build fails otherwise, so a new export gets a place).
TOP_LEVEL = {
    "Model functions": ["apply_adapters", "iter_adapters", "merge_adapters", "find_targets", "set_alpha"],
    "Data-driven init (EVA)": ["eva_init", "eva_plan", "apply_eva_plan", "EvaPlan"],
    "Configuration": ["AdapterConfig", "Rule", "VariantConfig"],
    "Variant configs": [
        "LoRAConfig", "PiSSAConfig", "OLoRAConfig", "DoRAConfig", "DeLoRAConfig", "IA3Config", "IA3FFConfig",
        "HRAConfig", "ROADConfig", "EVAConfig", "AntiPaSTOConfig", "LoHaConfig", "LoKrConfig", "OFTConfig",
        "MiSSConfig", "VeRAConfig", "BOFTConfig", "AdaLoRAConfig",
    ],
    "The adapter and its Variable types": [
        "Adapter", "AdapterParam", "AdapterState", "Alpha", "DoRAMagnitude", "DeLoRALambda", "DeltaS",
        "RotationParam",
    ],
    "Your own layer types and variants": ["register_view", "ViewInfo", "register_variant"],
    "Errors": ["AlreadyAdaptedError", "NoMatchError", "UnsupportedLayerError"],
}  # fmt: skip


def _public_names(module: types.ModuleType) -> list[str]:
    """``__all__`` when the module has one, else what it defines itself without a ``_``."""
    if hasattr(module, "__all__"):
        return list(module.__all__)
    return [
        name
        for name, obj in vars(module).items()
        if not name.startswith("_")
        and (inspect.isfunction(obj) or inspect.isclass(obj))
        and getattr(obj, "__module__", None) == module.__name__
    ]


def _role(obj: object) -> str:
    return "class" if inspect.isclass(obj) else "func" if callable(obj) else "data"


def _entry(qualified: str, obj: object) -> str:
    if inspect.isclass(obj):
        return f".. autoclass:: {qualified}\n"
    if callable(obj):
        return f".. autofunction:: {qualified}\n"
    # plain data (``VARIANTS``): its type's docstring says nothing, so only the name and type
    return f".. py:data:: {qualified}\n   :type: {type(obj).__name__}\n"


def _summary(obj: object) -> str:
    """The first sentence of ``obj``'s own docstring, cut outside any ````literal```` span."""
    doc = inspect.getdoc(obj) if (inspect.isclass(obj) or callable(obj)) else None
    if not doc:
        return ""
    text = " ".join(doc.split("\n\n")[0].split())
    parts, out = text.split("``"), []
    for i, part in enumerate(parts):
        if i % 2 == 0 and ". " in part:
            out.append(part.split(". ")[0] + ".")
            break
        out.append(part)
    summary = "``".join(out)
    if summary.count("``") % 2:  # the first paragraph ends inside a literal: keep it whole
        summary += "``"
    return escape_prose(summary)


def _table(qualified_names: list[tuple[str, object]]) -> list[str]:
    lines = [".. list-table::", "   :widths: 30 70", ""]
    for qualified, obj in qualified_names:
        lines += [f"   * - :{_role(obj)}:`~{qualified}`", f"     - {_summary(obj) or ' '}"]
    return [*lines, ""]


def _page(title: str, module_name: str, lead: str, names: list[str], elsewhere: list[str]) -> str:
    module = importlib.import_module(module_name)
    lines = [title, "=" * len(title), "", f".. module:: {module_name}", "", lead, ""]
    if module.__doc__ and module_name != "lora_jax":
        lines += [".. automodule:: " + module_name, "   :no-members:", "   :no-index:", ""]
    if elsewhere:
        refs = ", ".join(f":{_role(getattr(module, n))}:`lora_jax.{n}`" for n in elsewhere)
        lines += [f"Also here, documented at the top level: {refs}.", ""]
    lines += _table([(f"{module_name}.{n}", getattr(module, n)) for n in names])
    for name in names:
        lines.append(_entry(f"{module_name}.{name}", getattr(module, name)))
    return "\n".join(lines) + "\n"


def _top_level_page() -> str:
    exported = [n for n in lora_jax.__all__ if not isinstance(getattr(lora_jax, n), types.ModuleType)]
    grouped = [n for names in TOP_LEVEL.values() for n in names]
    missing, extra = sorted(set(exported) - set(grouped)), sorted(set(grouped) - set(exported))
    if missing or extra:
        raise RuntimeError(f"docs/conf.py TOP_LEVEL is out of date: not placed {missing}, not exported {extra}")
    title = "lora_jax (top level)"
    lines = [title, "=" * len(title), "", ".. module:: lora_jax", "", "``import lora_jax as lj``: the core.", ""]
    for group, names in TOP_LEVEL.items():
        lines += [group, "-" * len(group), ""]
        lines += _table([(f"lora_jax.{n}", getattr(lora_jax, n)) for n in names])
        lines += [_entry(f"lora_jax.{n}", getattr(lora_jax, n)) for n in names]
    return "\n".join(lines) + "\n"


def write_api_pages() -> None:
    top = {id(getattr(lora_jax, n)) for n in lora_jax.__all__}
    pages = {"lora_jax": _top_level_page()}
    for module_name, lead in NAMESPACES.items():
        module = importlib.import_module(module_name)
        public = _public_names(module)
        # a class or function also exported at the top level is documented there, once
        elsewhere = [n for n in public if id(getattr(module, n)) in top and not isinstance(getattr(module, n), dict)]
        names = [n for n in public if n not in elsewhere]
        pages[module_name] = _page(module_name, module_name, lead, names, elsewhere)
    index = ["API reference", "=============", "", ".. toctree::", "   :maxdepth: 1", ""]
    index += [f"   {name}" for name in pages]
    pages["index"] = "\n".join(index) + "\n"
    (DOCS / "api").mkdir(exist_ok=True)
    for name, text in pages.items():
        path = DOCS / "api" / f"{name}.rst"
        if not path.exists() or path.read_text() != text:  # unchanged files keep Sphinx's cache valid
            path.write_text(text)

