"""What to adapt, and how: plain, frozen data that round-trips through JSON.

    cfg = AdapterConfig(rules=(
        Rule(pattern=r"down_proj", variant=IA3FFConfig()),
        Rule(pattern=r"(q|v)_proj", variant=LoRAConfig(r=8, lora_alpha=16), layers=(0, 1)),
    ))

Each layer gets the first rule that matches it (so list specific rules before general
ones, like PEFT's ``rank_pattern`` over ``r``). A rule matches a layer when ``pattern``
is found (``re.search``) in its dotted path, the path matches none of ``exclude``, its
layer index (the first integer in the path) is in ``layers`` and its role is in
``roles``: ``reader`` (d_in == d_model), ``writer`` (d_out == d_model; a square layer
is both) or ``inner`` (neither). ``d_model`` defaults to the most common layer width.

``layers``, ``roles`` and ``exclude`` are tuples (a list is accepted); a single value is
accepted as a one-element tuple: ``layers=5`` means ``(5,)``, ``roles="writer"`` means
``("writer",)``, ``exclude="up"`` means ``("up",)``. Their entries are checked when the
rule is built: layer indices are integers >= 0, roles are among ``ROLES``.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from lora_jax.adapter import VariantConfig
from lora_jax.variants import VARIANTS

__all__ = ["AdapterConfig", "Rule", "ROLES"]

ROLES = ("reader", "writer", "inner")


def _check_jsonable(value: Any, where: str) -> None:
    if value is None or isinstance(value, bool | int | float | str):
        return
    if isinstance(value, tuple | list):
        for i, item in enumerate(value):
            _check_jsonable(item, f"{where}[{i}]")
        return
    raise TypeError(
        f"config value {where} = {value!r} ({type(value).__name__}) does not serialize to JSON; "
        "use numbers, strings, booleans, None or tuples of them"
    )


def _variant_to_dict(variant: VariantConfig) -> dict[str, Any]:
    # A field kept under a deprecated name (variants/_svd.renamed) is read, never written.
    fields = {f.name: getattr(variant, f.name) for f in dataclasses.fields(variant) if "renamed_to" not in f.metadata}
    for key, value in fields.items():
        _check_jsonable(value, f"{variant.name}.{key}")
    return {"variant": variant.name, **fields}


def _fields(cls: type, data: Mapping[str, Any], what: str) -> dict[str, Any]:
    """``data`` as constructor keywords of the dataclass ``cls`` (JSON lists as tuples)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; known: {', '.join(sorted(known))}")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}


def _variant_from_dict(data: Mapping[str, Any]) -> VariantConfig:
    data = dict(data)
    name = data.pop("variant", None)
    if name not in VARIANTS:
        raise ValueError(
            f"unknown variant {name!r}; known variants: {', '.join(sorted(VARIANTS))}. A variant defined "
            "outside lora_jax must be registered first: lora_jax.register_variant(ItsConfig)"
        )
    return VARIANTS[name](**_fields(VARIANTS[name], data, f"option(s) for variant {name!r}:"))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Rule:
    """Which layers get which variant. See the module docstring for matching; a single
    layer index, role or exclude pattern stands for a one-element tuple."""

    pattern: str
    variant: VariantConfig
    layers: tuple[int, ...] | None = None
    roles: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.variant, VariantConfig):
            raise TypeError(f"Rule.variant must be a variant config such as LoRAConfig(r=8), got {self.variant!r}")
        if not isinstance(self.pattern, str):
            raise TypeError(f"Rule.pattern must be a regular expression string, got {self.pattern!r}")
        # A single value is a one-element tuple (roles="writer" is not five letters).
        single = {"layers": (numbers.Integral, "int"), "roles": (str, "str"), "exclude": (str, "str")}
        for name, (kind, kind_name) in single.items():
            value = getattr(self, name)
            if isinstance(value, kind) and not isinstance(value, bool):
                value = (value,)
            elif isinstance(value, list):
                value = tuple(value)
            elif value is not None and not isinstance(value, tuple):
                raise TypeError(f"Rule.{name} must be a tuple of {kind_name} (or one {kind_name}), got {value!r}")
            if value is None and name == "exclude":
                value = ()
            object.__setattr__(self, name, value)
        if self.layers is not None:
            what = "Rule.layers must hold layer indices (integers >= 0, the first integer in a layer's path)"
            bad = [i for i in self.layers if not isinstance(i, numbers.Integral) or isinstance(i, bool | np.bool_)]
            if bad:
                raise TypeError(f"{what}, got {bad} in {self.layers!r}")
            object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))  # numpy ints too, for JSON
            if any(i < 0 for i in self.layers):
                raise ValueError(f"{what}, got {self.layers!r} (no counting from the end: name the layer index itself)")
        if self.roles is not None:
            bad = [r for r in self.roles if r not in ROLES]
            if bad:
                raise ValueError(f"unknown role(s) {bad}; roles are {ROLES}")
        for regex in (self.pattern, *self.exclude):
            if not isinstance(regex, str):
                raise TypeError(f"Rule.exclude must hold regular expression strings, got {regex!r}")
            try:
                re.compile(regex)
            except re.error as err:
                raise ValueError(f"Rule pattern {regex!r} is not a valid regular expression: {err}") from err

    def to_dict(self) -> dict[str, Any]:
        out = {"pattern": self.pattern, "variant": _variant_to_dict(self.variant)}
        out.update(layers=self.layers, roles=self.roles, exclude=self.exclude)
        for key in ("layers", "roles", "exclude"):
            _check_jsonable(out[key], f"Rule.{key}")
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Rule:
        fields = _fields(cls, data, "Rule field(s)")
        return cls(**{**fields, "variant": _variant_from_dict(data["variant"])})


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdapterConfig:
    """The rules, the model width used for roles (inferred when None) and the init seed."""

    rules: tuple[Rule, ...]
    d_model: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.rules, Rule):
            object.__setattr__(self, "rules", (self.rules,))
        elif isinstance(self.rules, list):
            object.__setattr__(self, "rules", tuple(self.rules))
        if not self.rules or not all(isinstance(r, Rule) for r in self.rules):
            raise TypeError(f"AdapterConfig.rules must be a non-empty tuple of Rule, got {self.rules!r}")
        self.to_dict()  # fail now, not at save time, on a value JSON cannot hold

    def to_dict(self) -> dict[str, Any]:
        _check_jsonable(self.d_model, "AdapterConfig.d_model")
        _check_jsonable(self.seed, "AdapterConfig.seed")
        return {"rules": [r.to_dict() for r in self.rules], "d_model": self.d_model, "seed": self.seed}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AdapterConfig:
        fields = _fields(cls, data, "AdapterConfig field(s)")
        return cls(**{**fields, "rules": tuple(Rule.from_dict(r) for r in data["rules"])})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> AdapterConfig:
        return cls.from_dict(json.loads(text))
