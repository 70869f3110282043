"""The package's top level: every exported name resolves, the namespaces are reachable
without an explicit import, names that moved say where to, and ``import lora_jax``
loads neither the optional extras nor the lazily imported namespaces."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

import lora_jax as lj

ROOT = Path(__file__).resolve().parents[1]
NAMESPACES = (
    "calibrate", "checkpoint", "einsum_spec", "linalg", "models", "named", "peft", "progress", "quant", "ragged",
    "select", "steering", "transforms", "variants", "views",
)  # fmt: skip


def test_every_exported_name_resolves_and_every_namespace_is_listed():
    for name in lj.__all__:
        assert getattr(lj, name) is not None, name
    modules = {name for name in lj.__all__ if isinstance(getattr(lj, name), types.ModuleType)}
    assert modules == set(NAMESPACES)
    assert set(NAMESPACES) <= set(dir(lj))


def test_variable_types_users_filter_on_are_at_the_top_level():
    for name in ("DoRAMagnitude", "DeLoRALambda", "DeltaS", "RotationParam"):
        assert issubclass(getattr(lj, name), lj.AdapterParam), name
    assert lj.DoRAMagnitude is lj.variants.DoRAMagnitude


def test_a_moved_name_says_where_it_lives_now():
    with pytest.raises(AttributeError, match=r"lora_jax.LoRA is now lora_jax.variants.LoRA"):
        lj.LoRA
    with pytest.raises(AttributeError, match=r"lora_jax.collect_statistics is now lora_jax.calibrate"):
        lj.collect_statistics
    with pytest.raises(AttributeError, match=r"module 'lora_jax' has no attribute 'no_such_name'"):
        lj.no_such_name


def test_import_is_light_and_lazy_namespaces_load_on_first_use():
    heavy = [
        "orbax.checkpoint", "lora_jax.checkpoint", "lora_jax.models", "lora_jax.named", "matplotlib", "torch",
        "safetensors",
    ]  # fmt: skip
    code = (
        "import json, sys; import lora_jax as lj; "
        f"before = [m for m in {heavy!r} if m in sys.modules]; "
        "lj.checkpoint.save; lj.models.Qwen3; "
        "print(json.dumps([before, 'lora_jax.checkpoint' in sys.modules, 'lora_jax.models' in sys.modules]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300, check=True
    ).stdout
    loaded_by_import, checkpoint_loaded, models_loaded = json.loads(out.strip().splitlines()[-1])
    assert loaded_by_import == [], f"`import lora_jax` imported {loaded_by_import}"
    assert checkpoint_loaded and models_loaded
