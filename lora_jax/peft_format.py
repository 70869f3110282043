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

Each variant plugs in with one :class:`PeftCodec` in ``CODECS`` (keyed by variant name):
its PEFT type, the config flags that identify it on import (``use_dora``), which config
entries PEFT allows per layer (``rank_pattern``), and two functions between an adapter
and its tensors. Rows: LoRA; DoRA; IA3 and IA3-FF (``feedforward_modules``); EVA exports
as its LoRA, PiSSA and OLoRA as the equivalent rank-2r LoRA (as PEFT saves them); those
three import as LoRA. A row whose variant is not in ``VARIANTS`` is ignored.

Import checks what PEFT itself would refuse (a per-layer ``r`` that is not the tensors'
rank, a ``peft_type`` no codec reads) and names the file. ``lora_dropout`` acts in
training only, so it never changes what an imported adapter computes: LoRA keeps it in
its config, DoRA (whose lora_jax form has no dropout) imports without it.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lora_jax.adapter import Adapter, VariantConfig
from lora_jax.config import AdapterConfig, Rule
from lora_jax.layer_kinds import describe
from lora_jax.surgery import apply_adapters, iter_adapters
from lora_jax.variants import VARIANTS

__all__ = ["CODECS", "PeftCodec", "PeftFormatError", "export_peft", "import_peft"]

M = TypeVar("M", bound=nnx.Module)
PREFIX = "base_model.model."
WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"


class PeftFormatError(ValueError):
    """An adapter that PEFT's format cannot hold, or PEFT files that do not fit the model."""


@dataclasses.dataclass(frozen=True)
class PeftCodec:
    """How one variant is written in PEFT's format.

    ``to_peft(adapter) -> (layer config entries, {tensor suffix: array})``;
    ``from_peft(layer config, {suffix: array}) -> (variant config, {attribute: array})``
    where the layer config is the PEFT config with per-layer patterns already resolved;
    ``from_peft=None`` for an export-only conversion (PiSSA is written as LoRA).
    ``member_of`` names the PEFT config list that marks this codec's layers (IA3's
    ``feedforward_modules``). ``folds_alpha``: the codec writes the delta at the current
    alpha; otherwise export needs alpha = 1, since PEFT has no alpha. ``alt_suffixes``:
    the tensor set a layer may have instead (LoRA on an embedding: ``lora_embedding_A`` /
    ``lora_embedding_B``).
    """

    peft_type: str
    flags: Mapping[str, Any]  # config entries that select this codec on import
    patterns: Mapping[str, str]  # per-layer config entry -> PEFT's pattern dict for it
    suffixes: tuple[str, ...]
    to_peft: Callable[[Adapter], tuple[dict[str, Any], dict[str, np.ndarray]]]
    from_peft: Callable[[Mapping[str, Any], Mapping[str, np.ndarray]], tuple[VariantConfig, dict]] | None
    member_of: str | None = None
    folds_alpha: bool = False
    alt_suffixes: tuple[str, ...] = ()


def _numpy(x: Any) -> np.ndarray:
    x = jnp.asarray(x)
    return np.asarray(x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x)  # numpy has no bfloat16


def _lora_entries(cfg: Any) -> dict[str, Any]:
    dropout = getattr(cfg, "dropout", 0.0)  # not every low-rank variant has dropout
    return {"r": cfg.r, "lora_alpha": cfg.lora_alpha, "use_rslora": cfg.rslora, "lora_dropout": dropout}


def _lora_to_peft(adapter: Adapter) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    # The delta is linear in alpha, so alpha goes into B.
    a, b = _numpy(adapter.lora_a[...]), _numpy(adapter.lora_b[...] * adapter.scalar_alpha())
    kind, shape = adapter.info.kind, adapter.spec.kernel_shape
    if kind == "embed":  # PEFT's Embedding LoRA: lora_embedding_A (r, vocab), lora_embedding_B (features, r)
        return _lora_entries(adapter.config), {"lora_embedding_A": a.T, "lora_embedding_B": b.T}
    if kind == "conv":  # torch conv weights: A (r, c_in, *window), B a 1x1 conv (c_out, r, 1, ...)
        a = np.moveaxis(a.reshape(*shape[:-1], a.shape[-1]), (-1, -2), (0, 1))
        b = b.T.reshape(*b.T.shape, *(1,) * (len(shape) - 2))
        return _lora_entries(adapter.config), {"lora_A.weight": a, "lora_B.weight": b}
    return _lora_entries(adapter.config), {"lora_A.weight": a.T, "lora_B.weight": b.T}


def _pissa_to_peft(adapter: Adapter) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    from lora_jax.variants.pissa import to_lora  # PEFT too saves PiSSA / OLoRA as a rank-2r LoRA

    return _lora_to_peft(to_lora(adapter))


def _low_rank(variant: str, cfg: Mapping[str, Any], a: np.ndarray, *, keep_dropout: bool) -> VariantConfig:
    """The low-rank config of one layer; ``a`` is A ``(d_in, r)``. ``keep_dropout=False``
    drops ``lora_dropout`` (train-time only, so the imported adapter computes the same)."""
    cls = VARIANTS[variant]
    rank = a.shape[1]
    if "r" in cfg and cfg["r"] != rank:
        raise PeftFormatError(
            f"adapter_config.json gives r={cfg['r']!r} (after rank_pattern) but lora_A.weight has rank {rank} "
            f"(shape {a.T.shape}); PEFT refuses this too. Fix r or rank_pattern in adapter_config.json"
        )
    options = {"r": rank, "lora_alpha": float(cfg["lora_alpha"]), "rslora": bool(cfg.get("use_rslora", False))}
    dropout = float(cfg.get("lora_dropout") or 0.0)
    if dropout and keep_dropout and "dropout" in {f.name for f in dataclasses.fields(cls)}:
        options["dropout"] = dropout
    return cls(**options)


def _lora_from_peft(cfg: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> tuple[VariantConfig, dict]:
    if "lora_embedding_A" in tensors:
        a, b = tensors["lora_embedding_A"].T, tensors["lora_embedding_B"].T
    else:  # a conv's (r, c_in, *window) / (c_out, r, 1, ...) become the (d_in, r) / (r, c_out) matrices
        a, b = tensors["lora_A.weight"], tensors["lora_B.weight"]
        a = np.moveaxis(a, (0, 1), (-1, -2)).reshape(-1, a.shape[0]) if a.ndim > 2 else a.T
        b = b.reshape(b.shape[:2]).T
    # An embedding's input is ids, which PEFT's dropout never touches: dropped there.
    keep_dropout = "lora_embedding_A" not in tensors
    return _low_rank("lora", cfg, a, keep_dropout=keep_dropout), {"lora_a": a, "lora_b": b}


def _dora_to_peft(adapter: Adapter) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    a, b, m = (_numpy(v[...]) for v in (adapter.lora_a, adapter.lora_b, adapter.magnitude))
    return _lora_entries(adapter.config), {"lora_A.weight": a.T, "lora_B.weight": b.T, "lora_magnitude_vector": m}


def _dora_from_peft(cfg: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> tuple[VariantConfig, dict]:
    a, b = tensors["lora_A.weight"].T, tensors["lora_B.weight"].T
    # lora_jax's DoRA has no dropout; without it the adapter computes what PEFT's does at inference
    arrays = {"lora_a": a, "lora_b": b, "magnitude": tensors["lora_magnitude_vector"]}
    return _low_rank("dora", cfg, a, keep_dropout=False), arrays


def _ia3_codec(variant: str, shape: Callable[[int], tuple[int, int]], member_of: str | None) -> PeftCodec:
    """PEFT stores IA3's gate as (d_out, 1) and the feed-forward (input) gate as (1, d_in)."""

    def to_peft(adapter: Adapter) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        gate = _numpy(adapter.ia3_l[...])
        return {}, {"ia3_l": gate.reshape(shape(gate.shape[-1]))}

    def from_peft(cfg: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> tuple[VariantConfig, dict]:
        return VARIANTS[variant](), {"ia3_l": tensors["ia3_l"].reshape(-1)}

    return PeftCodec("IA3", {}, {}, ("ia3_l",), to_peft, from_peft, member_of=member_of)


def _check_rank(cfg: Mapping[str, Any], rank: int, tensor: str) -> None:
    if "r" in cfg and cfg["r"] != rank:
        raise PeftFormatError(
            f"adapter_config.json gives r={cfg['r']!r} (after rank_pattern) but {tensor} has rank {rank}; "
            "PEFT refuses this too. Fix r or rank_pattern in adapter_config.json"
        )


def _config(make: Callable[[], VariantConfig]) -> VariantConfig:
    try:
        return make()
    except ValueError as err:  # the variant's own message says what is wrong
        raise PeftFormatError(str(err)) from err


def _delora_to_peft(adapter: Adapter) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``delora_A (r, d_in)``, ``delora_B (d_out, r)``, ``delora_lambda (1,)``, ``delora_w_norm
    (d_in,)``; the delta is linear in lambda, so alpha is folded into it."""
    cfg = adapter.config
    entries = {"r": cfg.r, "delora_lambda": cfg.delora_lambda, "module_dropout": cfg.dropout}
    return entries, {
        "delora_A": _numpy(adapter.lora_a[...]).T,
        "delora_B": _numpy(adapter.lora_b[...]).T,
        "delora_lambda": _numpy(adapter.delora_lambda[...] * adapter.scalar_alpha()).reshape(1),
        "delora_w_norm": _numpy(adapter.w_norm[...]),
    }


def _delora_from_peft(cfg: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> tuple[VariantConfig, dict]:
    a, b, lam = tensors["delora_A"].T, tensors["delora_B"].T, tensors["delora_lambda"]
    _check_rank(cfg, a.shape[1], f"delora_A (shape {a.T.shape})")
    # module_dropout is PEFT's dropout on the adapter's input, as DeLoRAConfig.dropout
    options = {"delora_lambda": float(cfg.get("delora_lambda", 15)), "dropout": float(cfg.get("module_dropout") or 0)}
    variant = _config(lambda: VARIANTS["delora"](r=a.shape[1], **options))
    lam = lam.reshape(()) if lam.size == 1 else lam  # (1,) in PEFT, a scalar per layer here
    return variant, {"lora_a": a, "lora_b": b, "delora_lambda": lam, "w_norm": tensors["delora_w_norm"]}


def _hra_to_peft(adapter: Adapter) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    return {"r": adapter.config.r, "apply_GS": False}, {"hra_u": _numpy(adapter.hra_u[...])}


def _hra_from_peft(cfg: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> tuple[VariantConfig, dict]:
    if cfg.get("apply_GS", False):
        raise PeftFormatError(
            "apply_GS=True (HRA's Gram-Schmidt form) is not implemented in lora_jax, whose HRA is the product of "
            "reflections (apply_GS=False); retrain with apply_GS=False"
        )
    u = tensors["hra_u"]
    _check_rank(cfg, u.shape[1], f"hra_u (shape {u.shape})")
    return _config(lambda: VARIANTS["hra"](r=u.shape[1])), {"hra_u": u}


def _road_to_peft(adapter: Adapter) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    cfg = adapter.config
    arrays = {"road_theta": _numpy(adapter.theta[...]), "road_alpha": _numpy(adapter.magnitude[...])}
    return {"variant": cfg.kind, "group_size": cfg.group_size}, arrays


def _road_from_peft(cfg: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> tuple[VariantConfig, dict]:
    options = {"kind": cfg.get("variant", "road_1"), "group_size": cfg.get("group_size", 64)}  # PEFT's defaults
    variant = _config(lambda: VARIANTS["road"](**options))
    return variant, {"theta": tensors["road_theta"], "magnitude": tensors["road_alpha"]}


_LORA = {"peft_type": "LORA", "patterns": {"r": "rank_pattern", "lora_alpha": "alpha_pattern"}}
_LORA_AB = ("lora_A.weight", "lora_B.weight")
# Rows for variants this build lacks are ignored (see _codecs).
CODECS: dict[str, PeftCodec] = {
    "lora": PeftCodec(
        **_LORA,
        flags={"use_dora": False},
        suffixes=_LORA_AB,
        to_peft=_lora_to_peft,
        from_peft=_lora_from_peft,
        folds_alpha=True,
        alt_suffixes=("lora_embedding_A", "lora_embedding_B"),
    ),
    # EVA is LoRA with a data-driven init; PEFT saves it as a LoRA too.
    "eva": PeftCodec(
        **_LORA, flags={"use_dora": False}, suffixes=_LORA_AB, to_peft=_lora_to_peft, from_peft=None, folds_alpha=True
    ),
    "pissa": PeftCodec(
        **_LORA, flags={"use_dora": False}, suffixes=_LORA_AB, to_peft=_pissa_to_peft, from_peft=None, folds_alpha=True
    ),
    "olora": PeftCodec(
        **_LORA, flags={"use_dora": False}, suffixes=_LORA_AB, to_peft=_pissa_to_peft, from_peft=None, folds_alpha=True
    ),
    "dora": PeftCodec(
        **_LORA,
        flags={"use_dora": True},
        suffixes=(*_LORA_AB, "lora_magnitude_vector"),
        to_peft=_dora_to_peft,
        from_peft=_dora_from_peft,
    ),
    "delora": PeftCodec(
        "DELORA",
        flags={},
        patterns={"r": "rank_pattern", "delora_lambda": "lambda_pattern"},
        suffixes=("delora_A", "delora_B", "delora_lambda", "delora_w_norm"),
        to_peft=_delora_to_peft,
        from_peft=_delora_from_peft,
        folds_alpha=True,
    ),
    "hra": PeftCodec("HRA", {}, {}, ("hra_u",), _hra_to_peft, _hra_from_peft),
    "road": PeftCodec("ROAD", {}, {}, ("road_theta", "road_alpha"), _road_to_peft, _road_from_peft),
    "ia3": _ia3_codec("ia3", lambda d: (d, 1), None),
    "ia3_ff": _ia3_codec("ia3_ff", lambda d: (1, d), "feedforward_modules"),
}


def _codecs() -> dict[str, PeftCodec]:
    return {name: codec for name, codec in CODECS.items() if name in VARIANTS}


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
    if not layers:
        raise PeftFormatError("the model holds no adapter to export")
    kinds = sorted({(c.peft_type, tuple(c.flags.items())) for _, c, _ in layers})
    if len(kinds) > 1:
        raise PeftFormatError(f"one PEFT adapter has one type; this model mixes {kinds}: export them separately")
    codec = layers[0][1]
    config: dict[str, Any] = {"peft_type": codec.peft_type, **codec.flags, "modules_to_save": None}
    for key in layers[0][2]:
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
    )
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
    groups: dict[str, dict[str, np.ndarray]] = collections.defaultdict(dict)
    for key, value in _read_weights(path).items():
        suffix = next((s for s in suffixes if key.endswith("." + s)), None)
        if suffix is None or not key.startswith(PREFIX):
            raise PeftFormatError(f"{path}: tensor {key!r} is not '{PREFIX}<module>.<{'|'.join(sorted(suffixes))}>'")
        groups[key[len(PREFIX) : -len(suffix) - 1]][suffix] = value
    by_name: dict[str, str] = {}
    for parts, module in nnx.iter_modules(base_model):
        nnx_path = ".".join(str(p) for p in parts)
        name = hf_name(nnx_path) if parts and describe(module) is not None else None
        if name in groups:
            if name in by_name:
                raise PeftFormatError(f"hf_name maps both {by_name[name]!r} and {nnx_path!r} to {name!r}")
            by_name[name] = nnx_path
    unmatched = sorted(set(groups) - set(by_name))
    if unmatched:
        raise PeftFormatError(f"{path}: no layer of the base model maps to {unmatched} under hf_name")
    rules, values = [], {}
    for name, nnx_path in sorted(by_name.items(), key=lambda item: item[1]):
        codec = _codec_for(config, name)
        if set(groups[name]) not in ({*codec.suffixes}, {*codec.alt_suffixes}):
            expected = " or ".join(str(sorted(s)) for s in (codec.suffixes, codec.alt_suffixes) if s)
            raise PeftFormatError(f"{path}: module {name!r} has tensors {sorted(groups[name])}, expected {expected}")
        layer = dict(config)
        for key, pattern_name in codec.patterns.items():
            patterns = config.get(pattern_name) or {}
            hit = _pattern_key(patterns, name)
            if hit is not None:
                layer[key] = patterns[hit]
        try:
            variant, values[nnx_path] = codec.from_peft(layer, groups[name])
        except PeftFormatError as err:
            raise PeftFormatError(f"{path}: module {name!r}: {err}") from err
        rules.append(Rule(pattern=f"^{re.escape(nnx_path)}$", variant=variant))
    model = apply_adapters(base_model, AdapterConfig(rules=tuple(rules)))
    adapters = dict(iter_adapters(model))
    for nnx_path, arrays in values.items():
        for attr, array in arrays.items():
            var = getattr(adapters[nnx_path], attr)
            if tuple(var.shape) != array.shape:
                raise PeftFormatError(
                    f"{path}: {nnx_path}.{attr} needs shape {tuple(var.shape)} but the file gives {array.shape} "
                    f"(module {hf_name(nnx_path)!r}); check hf_name and the kernel's d_in/d_out order"
                )
            # Onto the sharding apply_adapters gave this array (the kernel's, on a mesh).
            var.value = jax.device_put(np.asarray(array, dtype=var.dtype), var[...].sharding)
    return model
