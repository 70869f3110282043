"""Put adapters into a model, find them, steer them, fold them back in.

``apply_adapters`` and ``merge_adapters`` return a new model (``nnx.clone``: new
Variables, shared immutable arrays) and leave the caller's model as it was, also when
they raise: everything is validated and built before the copy is returned.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, TypeVar

import jax
from flax import nnx

from lora_jax import ragged, shardings, stacked
from lora_jax.adapter import Adapter, Target, as_alpha
from lora_jax.config import AdapterConfig, Rule
from lora_jax.layer_kinds import SUPPORTED_TYPES, describe, owns_params
from lora_jax.named_layer import refuse_named
from lora_jax.paths import (
    NoMatchError,
    dotted,
    iter_adapters,
    layer_index,
    matches,
    module_paths,
    replace_module,
    select,
)
from lora_jax.progress import Progress
from lora_jax.variants import VARIANTS
from lora_jax.views import UnsupportedLayerError, spec_of

__all__ = [
    "apply_adapters",
    "merge_adapters",
    "iter_adapters",
    "find_targets",
    "with_shared",
    "set_alpha",
    "AlreadyAdaptedError",
    "NoMatchError",
]

M = TypeVar("M", bound=nnx.Module)


class AlreadyAdaptedError(ValueError):
    """A rule matched a layer that already carries an adapter."""


@dataclasses.dataclass(frozen=True)
class _Candidate:
    """A module that could be adapted, or the reason it cannot."""

    parts: tuple[Any, ...]
    target: Target | None
    error: ValueError | None  # why it is not adaptable (unsupported einsum, already adapted)
    # A module of a type no view covers that holds parameters itself (a norm, a custom
    # layer): a rule that matches only such modules is told so instead of "no match".
    unsupported_type: str | None = None


def _candidates(model: nnx.Module) -> list[_Candidate]:
    adapter_paths: list[tuple[Any, ...]] = []
    found = []
    for parts, module in nnx.iter_modules(model):
        if isinstance(module, Adapter):
            adapter_paths.append(parts)
            found.append(_Candidate(parts, None, AlreadyAdaptedError("it is already adapted")))
            continue
        try:
            info = describe(module)
            if info is None:
                if parts and owns_params(module):
                    found.append(_Candidate(parts, None, None, unsupported_type=_type_name(module)))
                continue
            if stacked.stack_depth(module, info):
                target = stacked.stacked_target(dotted(parts), module, info)
            else:
                target = Target(dotted(parts), module, info, spec_of(module, info))
        except UnsupportedLayerError as err:
            found.append(_Candidate(parts, None, err))
            continue
        found.append(_Candidate(parts, target, None))
    inside_error = AlreadyAdaptedError("it is inside an adapter (already adapted)")

    def is_inside(c: _Candidate) -> bool:
        return any(c.parts[: len(a)] == a and c.parts != a for a in adapter_paths)

    return [
        dataclasses.replace(c, target=None, error=inside_error) if is_inside(c) else c
        for c in found
        if not (c.unsupported_type is not None and is_inside(c))
    ]


def _infer_d_model(targets: list[Target]) -> int:
    counts = collections.Counter(d for t in targets for d in (t.spec.d_in, t.spec.d_out))
    return counts.most_common(1)[0][0]


def _roles(target: Target, d_model: int) -> set[str]:
    """A square d_model -> d_model layer is both a reader and a writer."""
    roles = {"reader"} if target.spec.d_in == d_model else set()
    roles |= {"writer"} if target.spec.d_out == d_model else set()
    return roles or {"inner"}


def _rule_matches(rule: Rule, path: str, target: Target | None, d_model: int) -> bool:
    if not matches(rule.pattern, path) or any(matches(e, path) for e in rule.exclude):
        return False
    if rule.layers is not None:
        if isinstance(target, stacked.StackedTarget):  # layers= picks slices of the stack
            if not set(rule.layers) & set(range(target.size)):
                return False
        elif layer_index(path) not in rule.layers:
            return False
    if rule.roles is not None and (target is None or not _roles(target, d_model) & set(rule.roles)):
        return False
    return True


def _check_stack_claim(target: Target | None, rules: tuple[Rule, ...], first: int, later: int) -> None:
    """Two rules cannot split one stacked layer between them: its layers share arrays."""
    if not isinstance(target, stacked.StackedTarget):
        return
    covered = set(range(target.size)) if rules[first].layers is None else set(rules[first].layers)
    wanted = set(range(target.size)) if rules[later].layers is None else set(rules[later].layers)
    extra = sorted(wanted & set(range(target.size)) - covered)
    if extra:
        raise ValueError(
            f"rule {later} selects layers {extra} of the stacked layer {target.path!r}, which rule {first} "
            f"already adapts (layers={rules[first].layers}); a stack's layers share one adapter config, so "
            "give one rule all the layers it should adapt"
        )


def find_targets(model: nnx.Module, cfg: AdapterConfig) -> list[tuple[Target, Rule]]:
    """Which layer gets which rule, without changing anything. Raises on a rule that
    matches nothing, on a matched layer that cannot be adapted or is already adapted."""
    candidates = _candidates(model)
    adaptable = [c.target for c in candidates if c.target is not None]
    d_model = cfg.d_model or (_infer_d_model(adaptable) if adaptable else 0)
    chosen: list[tuple[Target, Rule]] = []
    claimed: dict[str, int] = {}  # path -> the rule that claimed it
    for i, rule in enumerate(cfg.rules):
        n_matched = 0
        unsupported: list[str] = []
        for c in candidates:
            path = dotted(c.parts)
            if not _rule_matches(rule, path, c.target, d_model):
                continue
            if path in claimed:
                _check_stack_claim(c.target, cfg.rules, claimed[path], i)
                continue
            if c.unsupported_type is not None:
                unsupported.append(f"{path!r} ({c.unsupported_type})")
                continue
            if c.error is not None:
                raise type(c.error)(
                    f"rule {i} (pattern {rule.pattern!r}) matched {path!r}, which cannot be adapted: {c.error}"
                )
            _check_kind(i, rule, c.target)
            claimed[path] = i
            chosen.append((c.target, rule))
            n_matched += 1
        if n_matched == 0 and unsupported:
            raise UnsupportedLayerError(
                f"rule {i} (pattern {rule.pattern!r}) matched only layers of a type lora_jax cannot adapt: "
                f"{', '.join(unsupported[:10])}{' ...' if len(unsupported) > 10 else ''}. Supported: "
                f"{SUPPORTED_TYPES}. Narrow the pattern, or register_view a type that is a linear map"
            )
        if n_matched == 0:
            listing = ", ".join(t.path for t in adaptable[:40]) + (" ..." if len(adaptable) > 40 else "")
            raise NoMatchError(
                f"rule {i} (pattern {rule.pattern!r}, layers={rule.layers}, roles={rule.roles}, "
                f"exclude={rule.exclude}) matched no layer not already claimed by an earlier rule. "
                f"Adaptable layers ({len(adaptable)}, d_model={d_model}): {listing or 'none'}"
            )
    return chosen


def _type_name(module: nnx.Module) -> str:
    cls = type(module)
    return f"nnx.{cls.__qualname__}" if cls.__module__.startswith("flax.nnx") else cls.__qualname__


def _check_kind(i: int, rule: Rule, target: Target) -> None:
    """A variant gets only the layer kinds its math is written for (see layer_kinds)."""
    kind, variant = target.info.kind, rule.variant
    if kind in variant.layer_kinds:
        return
    able = sorted(name for name, cls in VARIANTS.items() if kind in cls.layer_kinds)
    raise UnsupportedLayerError(
        f"rule {i} (pattern {rule.pattern!r}) gives {target.path!r}, a {type(target.module).__name__} "
        f"({kind} layer), to {variant.name}, which adapts only {sorted(variant.layer_kinds)} layers. "
        f"Variants that adapt {kind} layers: {able}; or exclude the layer from this rule"
    )


def with_shared(plan: list[tuple[Target, Rule]], seed: int) -> list[tuple[Target, Rule]]:
    """``plan`` with each target carrying what its variant's ``prepare`` made, called once
    per distinct variant config with all the targets of that config. Grouping by equal
    config, not by rule, keeps one group when a checkpoint rebuilds one rule per path."""
    configs: list[Any] = []  # distinct configs (they may be unhashable: compared, not hashed)
    groups: list[list[Target]] = []
    group_of = []  # the group of each entry of plan
    for target, rule in plan:
        i = next((k for k, config in enumerate(configs) if config == rule.variant), len(configs))
        if i == len(configs):
            configs.append(rule.variant)
            groups.append([])
        groups[i].append(target)
        group_of.append(i)
    shared = [config.prepare(tuple(group), seed=seed) for config, group in zip(configs, groups, strict=True)]
    return [
        (target if shared[i] is None else dataclasses.replace(target, shared=shared[i]), rule)
        for (target, rule), i in zip(plan, group_of, strict=True)
    ]


def _build(target: Target, rule: Rule, seed: int) -> Adapter:
    if isinstance(target, stacked.StackedTarget):
        return stacked.build(target, rule.variant, seed=seed, layers=rule.layers)
    return ragged.build_adapter(target, rule.variant, seed=seed)


def apply_adapters(model: M, cfg: AdapterConfig) -> M:
    """A copy of ``model`` with an adapter around every layer ``cfg`` selects.

    Adapters start at alpha=1 and compute the identity. Train them with
    ``nnx.Optimizer(model, tx, wrt=AdapterParam)``. A layer stacked on a leading layer
    axis (``nnx.vmap``-built blocks run by ``nnx.scan``) gets a stacked adapter; see
    :mod:`lora_jax.stacked`.
    """
    if not isinstance(cfg, AdapterConfig):
        raise TypeError(f"apply_adapters needs an AdapterConfig, got {type(cfg).__name__}")
    refuse_named(model, "apply_adapters")  # lora_jax.named.add adds to such a model
    new = nnx.clone(model)
    plan = with_shared(find_targets(new, cfg), cfg.seed)
    built = []
    # SVD-based inits (PiSSA, AntiPaSTO) over many layers take minutes on a CPU: say how far it got
    with Progress("apply_adapters", len(plan), unit="layers") as bar:
        for t, rule in plan:
            built.append((t.path, _build(t, rule, cfg.seed)))
            if bar.due():  # count layers computed, not merely dispatched
                jax.block_until_ready(nnx.state(built[-1][1]))
            bar.update()
    paths = module_paths(new)
    for path, adapter in built:
        replace_module(new, paths[path], adapter)
    return new


def set_alpha(model: nnx.Module, value: Any, *, pattern: str | None = None) -> int:
    """Set alpha in place on a model's adapters (all, or those whose path matches
    ``pattern``); returns how many it set. The pure form, a new ``nnx.State`` from a
    state inside ``jax.jit`` / ``jax.vmap``, is :func:`lora_jax.transforms.set_alpha`.

    ``value`` is a scalar, or one value per input row (shape ``(batch,)``; a call with a
    batch of another size raises). Changing the value never recompiles a jitted function;
    changing its shape does, once. Returns the number of adapters set. NaN and inf are
    refused (:func:`~lora_jax.adapter.as_alpha`; a traced value cannot be checked).
    Finite but huge alphas are kept: variants whose alpha is an exponent (IA3's gate
    ``l ** alpha``, ROAD's magnitude ``|m| ** alpha``) overflow float32 to inf once
    ``|alpha log l|`` passes about 88, which is the math, not a bug; steer within a few units.
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(
            f"set_alpha takes a model (nnx.Module), got {type(model).__name__}; "
            "for an nnx.State use lora_jax.transforms.set_alpha, which returns a new state"
        )
    alpha = as_alpha(value)
    selected = select(iter_adapters(model), pattern, caller="set_alpha")
    for _, adapter in selected:
        adapter.alpha.value = stacked.alpha_value(alpha, stacked.layer_mask(adapter))
    return len(selected)


def merge_adapters(model: M) -> M:
    """A copy of ``model`` with every adapter folded into its layer's kernel (and bias) at
    its current alpha; the result holds only the original module types."""
    refuse_named(model, "merge_adapters")
    new = nnx.clone(model)
    paths = module_paths(new)
    updates = []  # computed first: a failure leaves no half-merged copy behind
    for path, adapter in iter_adapters(new):
        base, info = adapter.base, adapter.info
        kernel, bias = stacked.merged_arrays(adapter)
        updates.append((path, base, (getattr(base, info.kernel), kernel)))
        if bias is not None:
            updates[-1] += ((getattr(base, info.bias), bias),)
    for path, base, *assignments in updates:
        for var, value in assignments:  # on Explicit mesh axes: back on the layer's own sharding
            var.value = shardings.like(value.astype(var.dtype), var[...])
        replace_module(new, paths[path], base)
    return new
