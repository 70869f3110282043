"""Configs are plain data: JSON round trip, and clear errors for what JSON cannot hold."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj


def test_json_round_trip_with_several_rules():
    cfg = lj.AdapterConfig(
        rules=(
            lj.Rule(pattern=r"q_proj", variant=lj.LoRAConfig(r=4, lora_alpha=16, rslora=True), layers=(0, 2)),
            lj.Rule(pattern=r"proj", variant=lj.LoRAConfig(r=2, dropout=0.1), roles=("writer",), exclude=("up",)),
        ),
        d_model=64,
        seed=3,
    )
    again = lj.AdapterConfig.from_json(cfg.to_json())
    assert again == cfg
    assert isinstance(again.rules[0].layers, tuple)


def test_non_jsonable_value_is_refused_at_construction():
    with pytest.raises(TypeError, match=r"lora\.lora_alpha = .*does not serialize to JSON"):
        lj.AdapterConfig(rules=(lj.Rule(pattern="x", variant=lj.LoRAConfig(lora_alpha=jnp.float32(2))),))


def test_unknown_variant_and_option_messages():
    good = lj.AdapterConfig(rules=(lj.Rule(pattern="x", variant=lj.LoRAConfig()),)).to_dict()
    bad_variant = {**good, "rules": [{**good["rules"][0], "variant": {"variant": "lorax", "r": 2}}]}
    with pytest.raises(ValueError, match=r"unknown variant 'lorax'; known variants: .*lora"):
        lj.AdapterConfig.from_dict(bad_variant)
    bad_option = {**good, "rules": [{**good["rules"][0], "variant": {"variant": "lora", "rank": 2}}]}
    with pytest.raises(ValueError, match=r"unknown option\(s\) for variant 'lora': \['rank'\]"):
        lj.AdapterConfig.from_dict(bad_option)
    with pytest.raises(TypeError, match="unexpected keyword argument 'rank'"):
        lj.LoRAConfig(rank=2)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(pattern="x", variant="lora"), TypeError, "must be a variant config such as LoRAConfig"),
        (dict(pattern="(", variant=lj.LoRAConfig()), ValueError, "not a valid regular expression"),
        (dict(pattern="x", variant=lj.LoRAConfig(), roles=("head",)), ValueError, "unknown role"),
        (dict(pattern="x", variant=lj.LoRAConfig(), roles=("writer", "x")), ValueError, r"unknown role\(s\) \['x'\]"),
        (dict(pattern="x", variant=lj.LoRAConfig(), layers=("0",)), TypeError, r"layer indices .* got \['0'\]"),
        (dict(pattern="x", variant=lj.LoRAConfig(), layers=(True,)), TypeError, "layer indices"),
        (dict(pattern="x", variant=lj.LoRAConfig(), layers=(-1,)), ValueError, "no counting from the end"),
        (dict(pattern="x", variant=lj.LoRAConfig(), layers=1.0), TypeError, r"Rule.layers must be a tuple of int"),
        (dict(pattern="x", variant=lj.LoRAConfig(), exclude=(3,)), TypeError, "regular expression strings"),
        (dict(pattern=3, variant=lj.LoRAConfig()), TypeError, "Rule.pattern must be a regular expression"),
    ],
)
def test_bad_rules(kwargs, error, message):
    with pytest.raises(error, match=message):
        lj.Rule(**kwargs)


def test_single_layer_role_or_exclude_is_a_one_element_tuple():
    rule = lj.Rule(pattern="x", variant=lj.LoRAConfig(), layers=5, roles="writer", exclude="up")
    assert (rule.layers, rule.roles, rule.exclude) == ((5,), ("writer",), ("up",))
    assert rule == lj.Rule(pattern="x", variant=lj.LoRAConfig(), layers=(5,), roles=("writer",), exclude=("up",))
    assert lj.Rule.from_dict(rule.to_dict()) == rule
    numpy_layers = lj.Rule(pattern="x", variant=lj.LoRAConfig(), layers=np.arange(2).tolist() + [np.int64(4)])
    assert numpy_layers.layers == (0, 1, 4) and all(type(i) is int for i in numpy_layers.layers)


def test_bad_variant_options():
    with pytest.raises(ValueError, match=r"dropout=1.5 must be in \[0, 1\)"):
        lj.LoRAConfig(dropout=1.5)
    with pytest.raises(ValueError, match="not a dtype name"):
        lj.LoRAConfig(dtype="float33")
    with pytest.raises(TypeError, match="non-empty tuple of Rule"):
        lj.AdapterConfig(rules=())
