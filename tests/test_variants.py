"""register_variant: an out-of-tree variant applies, checkpoints, restores and goes through
PEFT's files like a built-in one."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lora_jax import (
    AdapterConfig,
    LoRAConfig,
    PiSSAConfig,
    Rule,
    VariantConfig,
    apply_adapters,
    iter_adapters,
    register_variant,
)
from lora_jax.adapter import Adapter, AdapterParam
from lora_jax.checkpoint import CheckpointError, restore, save
from lora_jax.peft_codec import PeftCodec
from lora_jax.peft_format import CODECS, export_peft, import_peft
from lora_jax.variants import VARIANTS


def _to_peft(adapter):
    return {}, {"offset": np.asarray(adapter.offset[...])}


def _from_peft(cfg: Mapping, tensors: Mapping):
    return OffsetConfig(), {"offset": tensors["offset"]}


@dataclasses.dataclass(frozen=True, kw_only=True)
class OffsetConfig(VariantConfig):
    """A variant lora_jax does not ship: a learned output offset, ``y = base(x) + alpha * v``."""

    name = "test_offset"
    start: float = 0.0
    peft_codec = PeftCodec("TEST_OFFSET", {}, {}, ("offset",), _to_peft, _from_peft, folds_alpha=False)

    def build(self, target, *, seed):
        return Offset(target, self)


class Offset(Adapter):
    def __init__(self, target, config):
        super().__init__(target, config)
        start = jnp.full((*target.spec.batch_shape, target.spec.d_out), config.start, self.dtype)
        self.offset = self.variable(AdapterParam, start, "o")

    def forward(self, x, call_base):
        y = call_base(x)
        shift = self.alpha_for("out", x.ndim) * self.spec.out_broadcast(self.offset[...], x.ndim, like=y)
        return y + shift.astype(y.dtype)

    def merged(self, kernel, bias):
        return kernel, self.scalar_alpha() * self.offset[...] + (0.0 if bias is None else bias)


class Net(nnx.Module):
    def __init__(self, seed=0):
        rngs = nnx.Rngs(seed)
        self.up, self.down = nnx.Linear(6, 8, rngs=rngs), nnx.Linear(8, 6, rngs=rngs)

    def __call__(self, x):
        return self.down(jax.nn.relu(self.up(x)))


X = jax.random.normal(jax.random.key(7), (3, 6))


@pytest.fixture
def registered():
    """Register the test variant for one test only: the registry is global."""
    register_variant(OffsetConfig)
    yield OffsetConfig
    VARIANTS.pop(OffsetConfig.name)


def trained() -> nnx.Module:
    model = apply_adapters(Net(), AdapterConfig(rules=(Rule(pattern="up|down", variant=OffsetConfig(start=0.5)),)))
    for _, adapter in iter_adapters(model):
        adapter.offset.value = jax.random.normal(jax.random.key(1), adapter.offset.shape)
    return model


def test_out_of_tree_variant_restores_only_once_registered(tmp_path):
    model = trained()
    save(tmp_path / "ckpt", model)  # saving needs no registry: the config is on the model
    with pytest.raises(CheckpointError, match=r"unknown variant 'test_offset'.*register_variant\(ItsConfig\)"):
        restore(tmp_path / "ckpt", Net())
    register_variant(OffsetConfig)
    try:
        back = restore(tmp_path / "ckpt", Net())
    finally:
        VARIANTS.pop(OffsetConfig.name)
    assert {type(a) for _, a in iter_adapters(back)} == {Offset}
    assert dict(iter_adapters(back))["up"].config == OffsetConfig(start=0.5)
    jax.tree.map(np.testing.assert_array_equal, nnx.state(back), nnx.state(model))
    np.testing.assert_array_equal(back(X), model(X))
    assert not np.allclose(back(X), Net()(X))  # the offsets were loaded, not the init


def test_out_of_tree_variant_declares_its_peft_codec(tmp_path, registered):
    assert CODECS["test_offset"] is OffsetConfig.peft_codec
    model = trained()
    export_peft(tmp_path, model, hf_name=lambda p: f"model.{p}")
    back = import_peft(tmp_path, Net(), hf_name=lambda p: f"model.{p}")
    jax.tree.map(np.testing.assert_array_equal, nnx.state(back), nnx.state(model))


def test_register_variant_refuses_what_it_cannot_register():
    assert register_variant(VARIANTS["lora"]) is LoRAConfig  # a built-in again: a no-op

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Impostor(LoRAConfig):
        name = "lora"

    with pytest.raises(ValueError, match=r"'lora' is the built-in LoRAConfig; give .*Impostor another name"):
        register_variant(Impostor)
    with pytest.raises(TypeError, match=r"needs a VariantConfig subclass, got <class 'int'>"):
        register_variant(int)

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Unbuilt(VariantConfig):
        name = "unbuilt"

    with pytest.raises(TypeError, match=r"Unbuilt does not implement \['build'\]"):
        register_variant(Unbuilt)
    assert VARIANTS["lora"] is LoRAConfig and "unbuilt" not in VARIANTS


def test_pissa_reads_its_old_randomized_svd_names_and_saves_the_new_ones():
    """svd_iters / svd_oversample are the one pair of names; PiSSA's configs saved as
    niter / oversample still restore (with a DeprecationWarning) and are re-saved renamed."""
    saved = {"pattern": "^up$", "variant": {"variant": "pissa", "r": 2, "niter": 3, "oversample": 1}}
    with pytest.warns(DeprecationWarning, match=r"pissa: niter= is now called svd_iters="):
        rule = Rule.from_dict(saved)
    assert rule.variant == PiSSAConfig(r=2, svd_iters=3, svd_oversample=1)
    written = AdapterConfig(rules=(rule,)).to_dict()["rules"][0]["variant"]
    assert (written["svd_iters"], written["svd_oversample"]) == (3, 1)
    assert "niter" not in written and "oversample" not in written
    with pytest.raises(TypeError, match=r"pissa: niter= is the old name of svd_iters=; pass only svd_iters"):
        PiSSAConfig(niter=2, svd_iters=4)
