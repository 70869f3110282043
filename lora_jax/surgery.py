"""Put adapters into a model, find them, steer them, fold them back in.

``apply_adapters`` and ``merge_adapters`` return a new model (``nnx.clone``: new
Variables, shared immutable arrays) and leave the caller's model as it was, also when
they raise: everything is validated and built before the copy is returned.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from collections.abc import Iterator
from typing import Any, TypeVar

from flax import nnx

from lora_jax.adapter import Adapter, Target, as_alpha
from lora_jax.config import AdapterConfig, Rule
from lora_jax.views import UnsupportedLayerError, spec_of, view_of

__all__ = [
    "apply_adapters",
    "merge_adapters",
    "iter_adapters",
    "find_targets",
    "set_alpha",
    "AlreadyAdaptedError",
    "NoMatchError",
]

M = TypeVar("M", bound=nnx.Module)


class AlreadyAdaptedError(ValueError):
    """A rule matched a layer that already carries an adapter."""


class NoMatchError(ValueError):
    """A rule (or an alpha selection) matched no layer."""


def _path(parts: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in parts)


def _layer_index(path: str) -> int | None:
    for part in path.split("."):
        if part.isdigit():
            return int(part)
    return None


@dataclasses.dataclass(frozen=True)
class _Candidate:
    """A module that could be adapted, or the reason it cannot."""

    parts: tuple[Any, ...]
    target: Target | None
    error: ValueError | None  # why it is not adaptable (unsupported einsum, already adapted)


def _candidates(model: nnx.Module) -> list[_Candidate]:
    adapter_paths: list[tuple[Any, ...]] = []
    found = []
    for parts, module in nnx.iter_modules(model):
        if isinstance(module, Adapter):
            adapter_paths.append(parts)
            found.append(_Candidate(parts, None, AlreadyAdaptedError("it is already adapted")))
            continue
        try:
            info = view_of(module)
            if info is None:
                continue
            target = Target(_path(parts), module, info, spec_of(module, info))
        except UnsupportedLayerError as err:
            found.append(_Candidate(parts, None, err))
            continue
        found.append(_Candidate(parts, target, None))
    inside_error = AlreadyAdaptedError("it is inside an adapter (already adapted)")

    def is_inside(c: _Candidate) -> bool:
        return any(c.parts[: len(a)] == a and c.parts != a for a in adapter_paths)

    return [dataclasses.replace(c, target=None, error=inside_error) if is_inside(c) else c for c in found]


def _infer_d_model(targets: list[Target]) -> int:
    counts = collections.Counter(d for t in targets for d in (t.spec.d_in, t.spec.d_out))
    return counts.most_common(1)[0][0]


def _roles(target: Target, d_model: int) -> set[str]:
    """A square d_model -> d_model layer is both a reader and a writer."""
    roles = {"reader"} if target.spec.d_in == d_model else set()
    roles |= {"writer"} if target.spec.d_out == d_model else set()
    return roles or {"inner"}


def _rule_matches(rule: Rule, path: str, target: Target | None, d_model: int) -> bool:
    if not re.search(rule.pattern, path) or any(re.search(e, path) for e in rule.exclude):
        return False
    if rule.layers is not None and _layer_index(path) not in rule.layers:
        return False
    if rule.roles is not None and (target is None or not _roles(target, d_model) & set(rule.roles)):
        return False
    return True


def find_targets(model: nnx.Module, cfg: AdapterConfig) -> list[tuple[Target, Rule]]:
    """Which layer gets which rule, without changing anything. Raises on a rule that
    matches nothing, on a matched layer that cannot be adapted or is already adapted."""
    candidates = _candidates(model)
    adaptable = [c.target for c in candidates if c.target is not None]
    d_model = cfg.d_model or (_infer_d_model(adaptable) if adaptable else 0)
    chosen: list[tuple[Target, Rule]] = []
    claimed: set[str] = set()
    for i, rule in enumerate(cfg.rules):
        n_matched = 0
        for c in candidates:
            path = _path(c.parts)
            if path in claimed or not _rule_matches(rule, path, c.target, d_model):
                continue
            if c.error is not None:
                raise type(c.error)(
                    f"rule {i} (pattern {rule.pattern!r}) matched {path!r}, which cannot be adapted: {c.error}"
                )
            claimed.add(path)
            chosen.append((c.target, rule))
            n_matched += 1
        if n_matched == 0:
            listing = ", ".join(t.path for t in adaptable[:40]) + (" ..." if len(adaptable) > 40 else "")
            raise NoMatchError(
                f"rule {i} (pattern {rule.pattern!r}, layers={rule.layers}, roles={rule.roles}, "
                f"exclude={rule.exclude}) matched no layer not already claimed by an earlier rule. "
                f"Adaptable layers ({len(adaptable)}, d_model={d_model}): {listing or 'none'}"
            )
    return chosen


def _replace(model: nnx.Module, parts: tuple[Any, ...], new: nnx.Module) -> None:
    parent: Any = model
    for p in parts[:-1]:
        parent = parent[p] if isinstance(parent, nnx.List | nnx.Dict | list | dict) else getattr(parent, p)
    key = parts[-1]
    if isinstance(parent, nnx.List | nnx.Dict | list | dict):
        parent[key] = new
    else:
        setattr(parent, key, new)


def apply_adapters(model: M, cfg: AdapterConfig) -> M:
    """A copy of ``model`` with an adapter around every layer ``cfg`` selects.

    Adapters start at alpha=1 and compute the identity. Train them with
    ``nnx.Optimizer(model, tx, wrt=AdapterParam)``.
    """
    if not isinstance(cfg, AdapterConfig):
        raise TypeError(f"apply_adapters needs an AdapterConfig, got {type(cfg).__name__}")
    new = nnx.clone(model)
    plan = find_targets(new, cfg)
    built = [(t.path, rule.variant.build(t, seed=cfg.seed)) for t, rule in plan]
    paths = {_path(parts): parts for parts, _ in nnx.iter_modules(new)}
    for path, adapter in built:
        _replace(new, paths[path], adapter)
    return new


def iter_adapters(model: nnx.Module) -> Iterator[tuple[str, Adapter]]:
    """``(dotted path, adapter)`` for every adapter in the model."""
    for parts, module in nnx.iter_modules(model):
        if isinstance(module, Adapter):
            yield _path(parts), module


def set_alpha(model: nnx.Module, value: Any, *, pattern: str | None = None) -> int:
    """Set alpha in place on all adapters, or on those whose path matches ``pattern``.

    ``value`` is a scalar, or one value per input row (shape ``(batch,)``; a call with a
    batch of another size raises). Changing the value never recompiles a jitted function;
    changing its shape does, once. Returns the number of adapters set. NaN and inf are
    refused (:func:`~lora_jax.adapter.as_alpha`; a traced value cannot be checked).
    Finite but huge alphas are kept: variants whose alpha is an exponent (IA3's gate
    ``l ** alpha``, ROAD's magnitude ``|m| ** alpha``) overflow float32 to inf once
    ``|alpha log l|`` passes about 88, which is the math, not a bug; steer within a few units.
    """
    alpha = as_alpha(value)
    selected = [(p, a) for p, a in iter_adapters(model) if pattern is None or re.search(pattern, p)]
    if not selected:
        paths = [p for p, _ in iter_adapters(model)]
        raise NoMatchError(f"set_alpha(pattern={pattern!r}) matched no adapter; adapters: {paths or 'none'}")
    for _, adapter in selected:
        adapter.alpha.value = alpha
    return len(selected)


def merge_adapters(model: M) -> M:
    """A copy of ``model`` with every adapter folded into its layer's kernel (and bias) at
    its current alpha; the result holds only the original module types."""
    new = nnx.clone(model)
    paths = {_path(parts): parts for parts, _ in nnx.iter_modules(new)}
    updates = []  # computed first: a failure leaves no half-merged copy behind
    for path, adapter in iter_adapters(new):
        spec, info, base = adapter.spec, adapter.info, adapter.base
        kernel_var = getattr(base, info.kernel)
        bias_var = getattr(base, info.bias) if info.bias else None
        kernel = spec.kernel_to_matrix(kernel_var[...]).astype(adapter.dtype)
        bias = None if bias_var is None else spec.bias_to_matrix(bias_var[...]).astype(adapter.dtype)
        new_kernel, new_bias = adapter.merged(kernel, bias)
        updates.append((path, base, (kernel_var, spec.kernel_from_matrix(new_kernel))))
        if bias_var is not None:
            updates[-1] += ((bias_var, spec.bias_from_matrix(new_bias, bias_var.shape)),)
    for path, base, *assignments in updates:
        for var, value in assignments:
            var.value = value.astype(var.dtype)
        _replace(new, paths[path], base)
    return new
