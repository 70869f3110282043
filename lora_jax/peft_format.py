"""PEFT's adapter files (``adapter_model.safetensors`` + ``adapter_config.json``), both ways.

    export_peft("out/", model, hf_name=lambda path: path)    # then PeftModel.from_pretrained(torch_model, "out/")
    model = import_peft("out/", base_model, hf_name=lambda path: path)

``hf_name(nnx_path) -> str | None`` names the torch module that mirrors a layer (``None``:
no counterpart). Tensors are stored as PEFT names them:
``base_model.model.<hf name>.lora_A.weight``.

Matrix convention: a layer is the matrix ``(d_in, d_out)`` of ``EinsumSpec.kernel_to_matrix``,
contracted axes and output axes each flattened in the kernel's axis order. The torch
``nn.Linear`` that computes the same map on the flattened input has ``weight = matrix.T``
``(d_out, d_in)``, so ``lora_A.weight = A.T (r, d_in)`` and ``lora_B.weight = B.T (d_out, r)``.
Kernel-batch axes (MoE experts, per-head kernels) have no ``nn.Linear`` counterpart and
are rejected. LoRA on an ``nnx.Conv`` is written as PEFT's Conv LoRA (``lora_A.weight``
``(r, c_in, *window)``, ``lora_B.weight`` ``(c_out, r, 1, ...)``), on an ``nnx.Embed`` as
its Embedding LoRA (``lora_embedding_A`` ``(r, vocab)``, ``lora_embedding_B``
``(features, r)``).

Each variant plugs in by declaring one :class:`~lora_jax.peft_codec.PeftCodec` as its
config's ``peft_codec`` (``CODECS`` lists them by variant name): its PEFT type, the
config flags that identify it on import (``use_dora``), which config entries PEFT allows
per layer (``rank_pattern``), and two functions between an adapter and its tensors. This
module names no variant. Today: LoRA; DoRA; IA3 and IA3-FF (``feedforward_modules``);
DeLoRA, HRA, ROAD, LoHa, LoKr, OFT, MiSS and BOFT (PEFT's files of those types); VeRA
(its shared ``base_model.vera_A`` / ``vera_B`` as the codec's model-level tensors);
AdaLoRA (its ``rank_pattern`` keyed by tensor name); EVA exports as its LoRA, PiSSA and
OLoRA as the equivalent rank-2r LoRA (as PEFT saves them); those three import as LoRA.
Any adapter, AntiPaSTO included, can also be written as a plain LoRA by
:func:`lora_jax.as_lora.save_as_lora` (SVD-truncated delta).

Import checks what PEFT itself would refuse (a per-layer ``r`` that is not the tensors'
rank, a ``peft_type`` no codec reads) and names the file. ``lora_dropout`` acts in
training only, so it never changes what an imported adapter computes: LoRA keeps it in
its config, DoRA (whose lora_jax form has no dropout) imports without it.
"""

from __future__ import annotations

import collections
import json
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import jax
import numpy as np
from flax import nnx

from lora_jax.config import AdapterConfig, Rule
from lora_jax.layer_kinds import describe
from lora_jax.paths import dotted, iter_adapters
from lora_jax.peft_codec import PeftCodec, PeftFormatError
from lora_jax.surgery import apply_adapters
from lora_jax.variants import VARIANTS

__all__ = ["CODECS", "PeftCodec", "PeftFormatError", "export_peft", "import_peft"]

M = TypeVar("M", bound=nnx.Module)
PREFIX = "base_model.model."
SHARED_PREFIX = "base_model."  # a model-level tensor shared by every layer (VeRA's vera_A)
WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
# The PEFT release whose file format the codecs were checked against (tests/test_peft_format.py
# loads every export with it). PEFT reads this field to choose between old and new forms
# of a method (e.g. OFT's Cayley-Neumann series changed in 0.18, and PEFT warns without it).
PEFT_FORMAT_VERSION = "0.21.0"


class _Codecs(Mapping[str, PeftCodec]):
    """``{variant name: PeftCodec}`` of the known variants (``VARIANTS``, including those
    added by ``register_variant``) that declare one; read afresh on every access."""

    def _live(self) -> dict[str, PeftCodec]:
        return {name: cls.peft_codec for name, cls in VARIANTS.items() if cls.peft_codec is not None}

    def __getitem__(self, name: str) -> PeftCodec:
        return self._live()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._live())

    def __len__(self) -> int:
        return len(self._live())


# Each variant declares its codec (VariantConfig.peft_codec); this is the view over them.
CODECS: Mapping[str, PeftCodec] = _Codecs()


def _codecs() -> dict[str, PeftCodec]:
    return dict(CODECS)


# Options PEFT can save that would change the model in ways these codecs do not carry.
_UNSUPPORTED = {
    "modules_to_save": None,
    "bias": "none",
    "lora_bias": False,
    "layer_replication": None,
    "trainable_token_indices": None,
}


def _pattern_key(patterns: Mapping[str, Any], name: str) -> str | None:
    """PEFT's rule (``peft.utils.other.get_pattern_key``): a key matches a name suffix."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


def _names_regex(names: list[str]) -> str:
    return "^(" + "|".join(re.escape(n) for n in names) + ")$"


def export_peft(path: str | Path, model: nnx.Module, *, hf_name: Callable[[str], str | None]) -> Path:
    """Write ``model``'s adapters as PEFT's ``adapter_model.safetensors`` + ``adapter_config.json``."""
    from safetensors.numpy import save_file  # interop dependency, needed only here

    codecs = _codecs()
    layers: list[tuple[str, PeftCodec, dict[str, Any]]] = []
    tensors: dict[str, np.ndarray] = {}
    shared: dict[str, np.ndarray] = {}  # model-level tensors (base_model.<name>)
    for nnx_path, adapter in iter_adapters(model):
        codec = codecs.get(adapter.config.name)
        if codec is None:
            raise PeftFormatError(
                f"{nnx_path!r}: variant {adapter.config.name!r} has no PEFT codec; exportable: {sorted(codecs)}"
            )
        if adapter.spec.batch_shape:
            raise PeftFormatError(
                f"{nnx_path!r}: einsum {adapter.spec.equation!r} has kernel-batch axes {adapter.spec.batch_shape}, "
                "which a torch nn.Linear cannot mirror; exclude the layer from export"
            )
        if not codec.folds_alpha and float(adapter.scalar_alpha()) != 1.0:
            raise PeftFormatError(
                f"{nnx_path!r}: alpha is {float(adapter.scalar_alpha())}; PEFT has no alpha and "
                f"{adapter.config.name} is not linear in it: set_alpha(model, 1.0) before export"
            )
        name = hf_name(nnx_path)
        if not name:
            raise PeftFormatError(f"hf_name({nnx_path!r}) gave {name!r}; every adapted layer needs a torch module name")
        entries, arrays = codec.to_peft(adapter)
        layers.append((name, codec, entries))
        tensors.update({f"{PREFIX}{name}.{suffix}": np.ascontiguousarray(a) for suffix, a in arrays.items()})
        for key, array in (codec.shared_to_peft(adapter) if codec.shared_to_peft else {}).items():
            if key in shared and not np.array_equal(shared[key], array):
                raise PeftFormatError(
                    f"{nnx_path!r}: its {key} differs from another adapter's, and one PEFT file holds one "
                    f"base_model.{key} (adapters of different configs do not share it): export them separately"
                )
            shared[key] = np.ascontiguousarray(array)
    if not layers:
        raise PeftFormatError("the model holds no adapter to export")
    kinds = sorted({(c.peft_type, tuple(c.flags.items())) for _, c, _ in layers})
    if len(kinds) > 1:
        raise PeftFormatError(f"one PEFT adapter has one type; this model mixes {kinds}: export them separately")
    codec = layers[0][1]
    config: dict[str, Any] = {"peft_type": codec.peft_type, **codec.flags, "modules_to_save": None}
    for key, suffix in codec.module_keyed.items():
        keyed = {f"{n}.{suffix}": e[key] for n, _, e in layers if e[key] is not None}
        config[key] = keyed or None
    for key in (k for k in layers[0][2] if k not in codec.module_keyed):
        values = collections.Counter(entries[key] for _, _, entries in layers)
        config[key] = values.most_common(1)[0][0]
        if key in codec.patterns:  # exact-name keys: "^" stops PEFT's suffix match at the start
            odd = {f"^{re.escape(n)}": e[key] for n, _, e in layers if e[key] != config[key]}
            config[codec.patterns[key]] = odd
        elif len(values) > 1:
            raise PeftFormatError(f"PEFT holds one {key!r} per adapter; this model has {dict(values)}")
    lists = {c.member_of for c in codecs.values() if c.member_of and c.peft_type == codec.peft_type}
    for member_of in sorted(lists):
        members = [n for n, c, _ in layers if c.member_of == member_of]
        config[member_of] = _names_regex(members) if members else []
    config.update(
        target_modules=_names_regex([name for name, _, _ in layers]),
        task_type=None,
        base_model_name_or_path=None,
        inference_mode=True,
        peft_version=PEFT_FORMAT_VERSION,
    )
    tensors.update({f"{SHARED_PREFIX}{key}": array for key, array in shared.items()})
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / WEIGHTS), metadata={"format": "pt"})
    (path / CONFIG).write_text(json.dumps(config, indent=2))
    return path


def _is_member(listing: Any, name: str) -> bool:
    """PEFT's rule for lists like ``feedforward_modules``: a regex string fully matches,
    a list entry is a suffix of the name."""
    if isinstance(listing, str):
        return re.fullmatch(listing, name) is not None
    return any(name.endswith(entry) for entry in listing or ())


def _codec_for(config: Mapping[str, Any], name: str) -> PeftCodec:
    """The importing codec of one module: PEFT type and flags, then list membership."""
    fits = [
        c
        for c in _codecs().values()
        if c.from_peft is not None
        and config.get("peft_type") == c.peft_type
        and all(config.get(k, False) == v for k, v in c.flags.items())
    ]
    for codec in fits:
        if codec.member_of is not None and _is_member(config.get(codec.member_of), name):
            return codec
    for codec in fits:
        if codec.member_of is None:
            return codec
    readable = sorted({(c.peft_type, tuple(c.flags.items())) for c in _codecs().values() if c.from_peft})
    flags = {k: config.get(k) for c in _codecs().values() for k in c.flags}
    raise PeftFormatError(f"no codec reads peft_type={config.get('peft_type')!r} with {flags}; readable: {readable}")


def _read_config(path: Path) -> dict[str, Any]:
    file = path / CONFIG
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no {CONFIG}; pass the directory PEFT's save_pretrained wrote")
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PeftFormatError(f"{file} is not valid JSON ({err}); re-save the adapter or fix the file") from err
    if not isinstance(config, dict):
        raise PeftFormatError(f"{file} holds a {type(config).__name__}, not a JSON object of PEFT config entries")
    return config


def _read_weights(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError  # interop dependency, needed only here
    from safetensors.numpy import load_file

    file = path / WEIGHTS
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no {WEIGHTS} (only safetensors adapters import, PEFT's default format)")
    try:
        return load_file(str(file))
    except SafetensorError as err:  # its message names neither the file nor a fix
        raise PeftFormatError(
            f"{file} cannot be read as safetensors ({err}); is it truncated or not a safetensors file? "
            "Re-save the adapter"
        ) from err


def import_peft(path: str | Path, base_model: M, *, hf_name: Callable[[str], str | None]) -> M:
    """A copy of ``base_model`` with the PEFT adapter at ``path`` applied and loaded.

    Raises :class:`PeftFormatError` (naming the file) on an unreadable or inconsistent
    adapter and on PEFT options lora_jax does not support, before touching anything:
    ``base_model`` is never changed. ``lora_dropout`` is kept by LoRA and dropped by DoRA
    (training only; the imported adapter computes the same either way).
    """
    path = Path(path)
    config = _read_config(path)
    odd = {k: config[k] for k, v in _UNSUPPORTED.items() if config.get(k, v) not in (v, [], {})}
    if odd:
        raise PeftFormatError(f"{path}: PEFT options {odd} are not supported by lora_jax; re-save without them")
    readable = sorted({c.peft_type for c in _codecs().values() if c.from_peft is not None})
    if config.get("peft_type") not in readable:
        raise PeftFormatError(
            f"{path / CONFIG}: peft_type {config.get('peft_type')!r} is not supported "
            f"(supported: {', '.join(readable)})"
        )
    codecs = [c for c in _codecs().values() if c.peft_type == config.get("peft_type")]
    suffixes = {s for c in codecs for s in (*c.suffixes, *c.alt_suffixes)}
    shared_names = {n for c in codecs for n in c.shared_names}
    groups: dict[str, dict[str, np.ndarray]] = collections.defaultdict(dict)
    shared: dict[str, np.ndarray] = {}
    for key, value in _read_weights(path).items():
        if key.removeprefix(SHARED_PREFIX) in shared_names:
            shared[key.removeprefix(SHARED_PREFIX)] = value
            continue
        suffix = next((s for s in suffixes if key.endswith("." + s)), None)
        if suffix is None or not key.startswith(PREFIX):
            raise PeftFormatError(f"{path}: tensor {key!r} is not '{PREFIX}<module>.<{'|'.join(sorted(suffixes))}>'")
        groups[key[len(PREFIX) : -len(suffix) - 1]][suffix] = value
    by_name: dict[str, str] = {}
    for parts, module in nnx.iter_modules(base_model):
        nnx_path = dotted(parts)
        name = hf_name(nnx_path) if parts and describe(module) is not None else None
        if name in groups:
            if name in by_name:
                raise PeftFormatError(f"hf_name maps both {by_name[name]!r} and {nnx_path!r} to {name!r}")
            by_name[name] = nnx_path
    unmatched = sorted(set(groups) - set(by_name))
    if unmatched:
        raise PeftFormatError(f"{path}: no layer of the base model maps to {unmatched} under hf_name")
    rules, values = [], {}
    model_level: dict[str, dict[str, np.ndarray]] = {}  # a codec's shared tensors, as adapters hold them
    for name, nnx_path in sorted(by_name.items(), key=lambda item: item[1]):
        codec = _codec_for(config, name)
        held = set(groups[name])
        fits = held in ({*codec.suffixes}, {*codec.alt_suffixes}) or (codec.partial and held <= set(codec.suffixes))
        if not fits:
            expected = " or ".join(str(sorted(s)) for s in (codec.suffixes, codec.alt_suffixes) if s)
            raise PeftFormatError(f"{path}: module {name!r} has tensors {sorted(groups[name])}, expected {expected}")
        layer = dict(config)
        for key, pattern_name in codec.patterns.items():
            patterns = config.get(pattern_name) or {}
            hit = _pattern_key(patterns, name)
            if hit is not None:
                layer[key] = patterns[hit]
        for key, suffix in codec.module_keyed.items():
            keyed = config.get(key) or {}
            if not isinstance(keyed, Mapping):
                raise PeftFormatError(f"{path / CONFIG}: {key} must map '<module>.{suffix}' to a value, got {keyed!r}")
            layer[key] = keyed.get(f"{name}.{suffix}")
        try:
            variant, values[nnx_path] = codec.from_peft(layer, groups[name])
        except PeftFormatError as err:
            raise PeftFormatError(f"{path}: module {name!r}: {err}") from err
        if codec.shared_names:
            missing = sorted(set(codec.shared_names) - set(shared))
            if missing:
                raise PeftFormatError(
                    f"{path}: {codec.peft_type} layers need the model-level tensors "
                    f"{[SHARED_PREFIX + n for n in missing]}, which {WEIGHTS} lacks; re-save the adapter with them"
                )
            if codec.peft_type not in model_level:  # one conversion per file, not per layer
                model_level[codec.peft_type] = codec.shared_from_peft({n: shared[n] for n in codec.shared_names})
            values[nnx_path] = {**values[nnx_path], **model_level[codec.peft_type]}
        rules.append(Rule(pattern=f"^{re.escape(nnx_path)}$", variant=variant))
    model = apply_adapters(base_model, AdapterConfig(rules=tuple(rules)))
    adapters = dict(iter_adapters(model))
    for nnx_path, arrays in values.items():
        for attr, array in arrays.items():
            var = adapters[nnx_path]
            for part in attr.split("."):  # a dotted path reaches into a module the adapter holds
                var = getattr(var, part)
            if tuple(var.shape) != array.shape:
                raise PeftFormatError(
                    f"{path}: {nnx_path}.{attr} needs shape {tuple(var.shape)} but the file gives {array.shape} "
                    f"(module {hf_name(nnx_path)!r}); check hf_name and the kernel's d_in/d_out order"
                )
            # Onto the sharding apply_adapters gave this array (the kernel's, on a mesh).
            var.value = jax.device_put(np.asarray(array, dtype=var.dtype), var[...].sharding)
    return model
