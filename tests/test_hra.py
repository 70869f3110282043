"""HRA against PEFT, and the rotation's algebra: orthogonal, identity at init, reversed
order is the inverse, fractional alpha a rotation."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx
from peft import HRAConfig as PeftHRAConfig
from peft import get_peft_model
from peft_helpers import (
    FlaxMLP,
    TorchMLP,
    assert_forward_matches,
    assert_merged_matches,
    assert_rel_close,
)

from lora_jax import (
    AdapterConfig,
    AdapterParam,
    HRAConfig,
    Rule,
    apply_adapters,
    merge_adapters,
    set_alpha,
)
from lora_jax.rotations import hra_rotation
from lora_jax.variants import hra_orthogonality_penalty

R = 4


def reflections(u: np.ndarray, order) -> np.ndarray:
    """The product of Householder reflections in ``order``, written out in numpy."""
    out = np.eye(u.shape[0])
    for i in order:
        v = u[:, i] / np.linalg.norm(u[:, i])
        out = out @ (np.eye(u.shape[0]) - 2 * np.outer(v, v))
    return out


def peft_and_ours():
    torch_model = TorchMLP()
    ours = apply_adapters(FlaxMLP(torch_model), AdapterConfig(rules=(Rule(pattern="up|down", variant=HRAConfig(r=R)),)))
    peft_model = get_peft_model(copy.deepcopy(torch_model), PeftHRAConfig(r=R, target_modules=["up", "down"]))
    rng = np.random.default_rng(2)
    for name in ("up", "down"):
        u = peft_model.base_model.model.get_submodule(name).hra_u["default"]
        value = rng.standard_normal(u.shape).astype(np.float32)
        with torch.no_grad():
            u.copy_(torch.from_numpy(value))
        getattr(ours, name).hra_u.value = jnp.asarray(value)
    return peft_model, ours


def test_hra_matches_peft_forward_merge_and_reverse():
    peft_model, ours = peft_and_ours()
    assert_forward_matches(peft_model, ours)
    layer = peft_model.base_model.model.up
    with torch.no_grad():
        reverse = (layer.base_layer.weight @ layer.get_delta_weight("default", reverse=True)).numpy()
    set_alpha(ours, -1.0)
    assert_rel_close(merge_adapters(ours).up.kernel[...], reverse.T)  # alpha=-1 is PEFT's unmerge order
    set_alpha(ours, 1.0)
    assert_merged_matches(peft_model.merge_and_unload(), merge_adapters(ours))


def test_rotation_algebra():
    u = np.random.default_rng(3).standard_normal((9, 6)).astype(np.float32)
    eye = np.eye(9)
    rot = {a: np.asarray(hra_rotation(jnp.asarray(u), jnp.float32(a))) for a in (1.0, -1.0, 0.4, -0.4)}
    np.testing.assert_allclose(rot[1.0], reflections(u, range(6)), atol=1e-6)
    np.testing.assert_allclose(rot[-1.0], reflections(u, reversed(range(6))), atol=1e-6)
    for a in (1.0, 0.4):
        np.testing.assert_allclose(rot[a] @ rot[a].T, eye, atol=1e-6)  # orthogonal
        np.testing.assert_allclose(rot[-a] @ rot[a], eye, atol=1e-6)  # R(-a) = R(a)^-1
    np.testing.assert_array_equal(hra_rotation(jnp.asarray(u), jnp.float32(0.0)), eye)
    paired = jnp.repeat(jnp.asarray(u[:, :3]), 2, axis=1)
    np.testing.assert_array_equal(hra_rotation(paired, jnp.float32(0.7)), eye)  # init: exact identity
    one_pair = jnp.asarray(u[:, :2])  # r = 2: a one-parameter group
    np.testing.assert_allclose(
        hra_rotation(one_pair, jnp.float32(0.3)) @ hra_rotation(one_pair, jnp.float32(0.5)),
        hra_rotation(one_pair, jnp.float32(0.8)),
        atol=1e-6,
    )


def test_gradient_at_paired_init_matches_reflections():
    u = jnp.repeat(jax.random.normal(jax.random.key(0), (7, 2)), 2, axis=1)
    weights = jax.random.normal(jax.random.key(1), (7, 7))

    def by_reflections(v):
        unit = v / jnp.linalg.norm(v, axis=0, keepdims=True)
        out = jnp.eye(7)
        for i in range(4):
            out = out @ (jnp.eye(7) - 2 * jnp.outer(unit[:, i], unit[:, i]))
        return jnp.sum(out * weights)

    ours = jax.grad(lambda v: jnp.sum(hra_rotation(v, jnp.float32(1.0)) * weights))(u)
    expected = jax.grad(by_reflections)(u)
    assert float(jnp.abs(expected).max()) > 1e-2
    np.testing.assert_allclose(ours, expected, atol=1e-5 * float(jnp.abs(expected).max()))


def test_orthogonality_penalty_trains_and_counts_every_adapter():
    _, ours = peft_and_ours()
    penalty = hra_orthogonality_penalty(ours, weight=1.0)
    by_hand = sum(
        np.linalg.norm(np.eye(R) - (u / np.linalg.norm(u, axis=0)).T @ (u / np.linalg.norm(u, axis=0)))
        for u in (np.asarray(ours.up.hra_u[...]), np.asarray(ours.down.hra_u[...]))
    )
    np.testing.assert_allclose(float(penalty), by_hand, rtol=1e-5)
    assert float(hra_orthogonality_penalty(FlaxMLP(TorchMLP()))) == 0.0
    opt = nnx.Optimizer(ours, optax.adam(1e-2), wrt=AdapterParam)
    loss = nnx.jit(lambda m: hra_orthogonality_penalty(m, weight=1.0))
    grad = nnx.jit(nnx.grad(lambda m: hra_orthogonality_penalty(m, weight=1.0), argnums=nnx.DiffState(0, AdapterParam)))
    before = float(loss(ours))
    for _ in range(20):
        opt.update(ours, grad(ours))
    assert float(loss(ours)) < 0.5 * before


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"r": 3}, r"hra: r=3 must be a positive even integer"), ({"r": 0}, r"hra: r=0 must be a positive even")],
)
def test_bad_rank_is_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HRAConfig(**kwargs)


def test_rank_above_d_in_is_rejected():
    with pytest.raises(ValueError, match=r"hra: r=10 reflections at 'up' exceed d_in=8; lower r"):
        apply_adapters(FlaxMLP(TorchMLP()), AdapterConfig(rules=(Rule(pattern="up", variant=HRAConfig(r=10)),)))
