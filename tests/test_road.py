"""ROAD against PEFT (road_1 / road_2 / road_4), the elementwise form against the explicit
block matrix, alpha=-1 against the matrix inverse, and config errors."""

import copy

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from peft import RoadConfig, get_peft_model
from peft.tuners.road.layer import _get_delta_weight
from peft_helpers import (
    FlaxMLP,
    TorchMLP,
    assert_forward_matches,
    assert_merged_matches,
    assert_rel_close,
)

from lora_jax import AdapterConfig, ROADConfig, Rule, apply_adapters, merge_adapters, set_alpha
from lora_jax.rotations import road_apply, road_columns

KINDS = ["road_1", "road_2", "road_4"]
GROUP = 4


def peft_and_ours(kind):
    torch_model = TorchMLP()
    ours = apply_adapters(
        FlaxMLP(torch_model),
        AdapterConfig(rules=(Rule(pattern="up|down", variant=ROADConfig(kind=kind, group_size=GROUP)),)),
    )
    cfg = RoadConfig(variant=kind, group_size=GROUP, target_modules=["up", "down"])
    peft_model = get_peft_model(copy.deepcopy(torch_model), cfg)
    rng = np.random.default_rng(4)
    for name in ("up", "down"):
        layer = peft_model.base_model.model.get_submodule(name)
        theta = (0.7 * rng.standard_normal(layer.road_theta["default"].shape)).astype(np.float32)
        magnitude = (1 + 0.4 * rng.standard_normal(theta.shape)).astype(np.float32)
        magnitude[0] = -0.8  # a negative magnitude must work too
        with torch.no_grad():
            layer.road_theta["default"].copy_(torch.from_numpy(theta))
            layer.road_alpha["default"].copy_(torch.from_numpy(magnitude))
        getattr(ours, name).theta.value = jnp.asarray(theta)
        getattr(ours, name).magnitude.value = jnp.asarray(magnitude)
    return peft_model, ours


def rotation_matrix(layer) -> np.ndarray:
    with torch.no_grad():
        return _get_delta_weight(
            layer.variant["default"], GROUP, layer.road_theta["default"], layer.road_alpha["default"]
        ).numpy()


@pytest.mark.parametrize("kind", KINDS)
def test_road_matches_peft_forward_merge_and_inverse(kind):
    peft_model, ours = peft_and_ours(kind)
    x = assert_forward_matches(peft_model, ours)
    # alpha = -1 is the matrix inverse of PEFT's block rotation (what PEFT's unmerge uses)
    up = peft_model.base_model.model.up
    with torch.no_grad():
        y = up.base_layer(torch.from_numpy(x)).numpy()
    set_alpha(ours, -1.0)
    assert_rel_close(ours.up(jnp.asarray(x)), y @ np.linalg.inv(rotation_matrix(up).astype(np.float64)).T)
    set_alpha(ours, 1.0)
    assert_merged_matches(peft_model.merge_and_unload(), merge_adapters(ours))  # R W and R b


def explicit_blocks(kind: str, theta: np.ndarray, m: np.ndarray, d: int) -> np.ndarray:
    """The block matrix from the paper's definition, element by element."""
    h, out = GROUP // 2, np.zeros((d, d))
    for i in range(d):
        group, pos = divmod(i, GROUP)
        j = i + h if pos < h else i - h  # partner
        if kind == "road_1":
            k = group * h + pos % h
            c, s = m[k] * np.cos(theta[k]), m[k] * np.sin(theta[k])
        elif kind == "road_2":
            c, s = m[i] * np.cos(theta[i]), m[i] * np.sin(theta[i])
        else:
            c = m[2 * GROUP * group + pos] * np.cos(theta[2 * GROUP * group + pos])
            s = m[2 * GROUP * group + GROUP + pos] * np.sin(theta[2 * GROUP * group + GROUP + pos])
        out[i, i] = c
        out[i, j] = -s if pos < h else s
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_elementwise_form_equals_explicit_matrix(kind):
    d = 12
    n = {"road_1": d // 2, "road_2": d, "road_4": 2 * d}[kind]
    rng = np.random.default_rng(5)
    theta, m = rng.standard_normal(n).astype(np.float32), (1 + 0.5 * rng.standard_normal(n)).astype(np.float32)
    first, second = road_columns(kind, GROUP, jnp.asarray(theta), jnp.asarray(m), jnp.float32(1.0))
    y = rng.standard_normal((3, d)).astype(np.float32)
    got = road_apply(jnp.asarray(y), first[None], second[None], GROUP)
    matrix = explicit_blocks(kind, theta, m, d)
    np.testing.assert_allclose(got, y @ matrix.T, atol=1e-5)
    peft = _get_delta_weight(kind, GROUP, torch.from_numpy(theta), torch.from_numpy(m)).numpy()
    np.testing.assert_allclose(matrix, peft, atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "road_3"}, r"road: kind='road_3' must be one of \['road_1', 'road_2', 'road_4'\]"),
        ({"group_size": 5}, r"road: group_size=5 must be a positive even integer"),
        ({"group_size": 0}, r"road: group_size=0 must be a positive even integer"),
    ],
)
def test_bad_config_is_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ROADConfig(**kwargs)


def test_group_size_must_divide_d_out():
    with pytest.raises(ValueError, match=r"road: group_size=8 does not divide d_out=12 at 'up'; .* \[2, 4, 6, 12\]"):
        apply_adapters(
            FlaxMLP(TorchMLP()), AdapterConfig(rules=(Rule(pattern="up", variant=ROADConfig(group_size=8)),))
        )
