"""Sharding checks, run by test_sharding.py in a subprocess with 8 simulated CPU devices
(XLA_FLAGS must be set before jax is imported, so they cannot share the test process).

Each check is a function ``check_*``; the script runs them all and exits non-zero on the
first failure. ``python tests/sharded_checks.py`` runs them by hand.
"""

from __future__ import annotations

import functools
import os

# 8 simulated devices. The models are tiny, so XLA's backend optimizations cost more
# compile time than they save (as in test_readme); the sharding logic is unaffected.
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + (
    " --xla_force_host_platform_device_count=8"
    " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
)

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import lora_jax as lj

jax.config.update("jax_default_matmul_precision", "highest")

D, HEADS, HEAD_DIM, FF = 16, 4, 4, 32


def sharded_init(names):
    return nnx.with_partitioning(nnx.initializers.lecun_normal(), names)


class Block(nnx.Module):
    """Tensor-parallel layout: heads and the MLP hidden axis are sharded over 'model'."""

    def __init__(self, rngs):
        self.q_proj = nnx.Einsum(
            "BTD,DNH->BTNH", (D, HEADS, HEAD_DIM), kernel_init=sharded_init((None, "model", None)), rngs=rngs
        )
        self.o_proj = nnx.Einsum(
            "BTNH,NHD->BTD", (HEADS, HEAD_DIM, D), kernel_init=sharded_init(("model", None, None)), rngs=rngs
        )
        self.up_proj = nnx.Linear(D, FF, use_bias=False, kernel_init=sharded_init((None, "model")), rngs=rngs)
        self.down_proj = nnx.Linear(FF, D, use_bias=False, kernel_init=sharded_init(("model", None)), rngs=rngs)

    def __call__(self, x):
        x = x + self.o_proj(jnp.tanh(self.q_proj(x)))
        return x + self.down_proj(jax.nn.gelu(self.up_proj(x)))


class Model(nnx.Module):
    def __init__(self, seed=0):
        rngs = nnx.Rngs(seed)
        self.layers = nnx.List([Block(rngs) for _ in range(2)])

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


CFG = lj.AdapterConfig(rules=(lj.Rule(pattern="proj", variant=lj.LoRAConfig(r=4, lora_alpha=8)),))
# Auto axes (GSPMD propagation). Explicit-axis meshes need out_sharding on every sharded
# contraction, the base layers included; see the README.
MESH = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto, AxisType.Auto))


def data(step):
    x = jax.random.normal(jax.random.key(step), (8, 3, D))
    return x, jnp.sin(x)


# Compiled forward: on 8 devices an eager call dispatches (and compiles) op by op.
forward = nnx.jit(lambda model, x: model(x))


def train(model, steps=5, shard_data=None):
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=lj.AdapterParam)

    @nnx.jit
    def step(model, optimizer, x, y):
        def loss_fn(m):
            return jnp.mean((m(x) - y) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, lj.AdapterParam))(model)
        optimizer.update(model, grads)
        return loss

    losses = []
    for _ in range(steps):
        x, y = data(0)  # one batch: the loss must fall step by step
        if shard_data is not None:
            x, y = (jax.device_put(t, shard_data) for t in (x, y))
        losses.append(float(step(model, optimizer, x, y)))
    return losses


def check_adapters_inherit_kernel_sharding():
    with jax.set_mesh(MESH):
        adapted = lj.apply_adapters(Model(), CFG)
    specs = {p: (a.lora_a[...].sharding.spec, a.lora_b[...].sharding.spec) for p, a in lj.iter_adapters(adapted)}
    assert specs["layers.0.q_proj"] == (P(None, None), P(None, "model")), specs["layers.0.q_proj"]
    assert specs["layers.0.o_proj"] == (P("model", None), P(None, None)), specs["layers.0.o_proj"]
    assert specs["layers.1.up_proj"] == (P(None, None), P(None, "model")), specs["layers.1.up_proj"]
    assert specs["layers.1.down_proj"] == (P("model", None), P(None, None)), specs["layers.1.down_proj"]
    pspecs = nnx.get_partition_spec(nnx.state(adapted, lj.AdapterParam))
    assert pspecs["layers"][0]["q_proj"]["lora_b"].get_value() == P(None, "model")


ANTIPASTO = lj.AdapterConfig(
    rules=(lj.Rule(pattern="proj", variant=lj.AntiPaSTOConfig(r=4, block_size=2, delta_s_init=1e-3)),)
)


CONFIGS = {"lora": (CFG, "lora_b"), "antipasto": (ANTIPASTO, "vh")}


@functools.cache
def trained(cfg_name: str):
    """Five adam steps on one device and on the 4 x 2 mesh: (the sharded model, its losses,
    the one-device losses). Cached: the checkpoint check saves the trained AntiPaSTO model
    instead of compiling a training step of its own."""
    cfg, sharded_leaf = CONFIGS[cfg_name]
    with nnx.use_eager_sharding(False):  # the same annotated model, on one device
        single_model = lj.apply_adapters(Model(), cfg)
    assert len(getattr(single_model.layers[0].up_proj, sharded_leaf)[...].devices()) == 1
    single = train(single_model)
    with jax.set_mesh(MESH):
        sharded_model = lj.apply_adapters(Model(), cfg)
        sharded = train(sharded_model, shard_data=NamedSharding(MESH, P("data")))
    return sharded_model, sharded, single


def check_sharded_training_matches_single_device():
    for cfg_name, (cfg, sharded_leaf) in CONFIGS.items():
        sharded_model, sharded, single = trained(cfg_name)
        with jax.set_mesh(MESH):
            # the base stays sharded; the adapter's output-side factor is sharded like it
            assert sharded_model.layers[0].up_proj.base.kernel[...].sharding.spec == P(None, "model")
            leaf = getattr(sharded_model.layers[0].up_proj, sharded_leaf)[...]
            assert leaf.sharding.spec == P(None, "model"), (cfg, leaf.sharding)
        np.testing.assert_allclose(sharded, single, rtol=1e-5, atol=1e-7)
        assert sharded[-1] < sharded[0], sharded


def check_sweep_and_merge_on_sharded_model():
    with jax.set_mesh(MESH):
        model = lj.apply_adapters(Model(), CFG)
        for _, adapter in lj.iter_adapters(model):
            adapter.lora_b.value = 0.1 * jnp.ones_like(adapter.lora_b[...])
        x = jax.device_put(data(0)[0], NamedSharding(MESH, P("data")))
        lj.set_alpha(model, jnp.linspace(-1.0, 1.0, 8))
        rows = forward(model, x)
        lj.set_alpha(model, 0.5)
        merged = lj.merge_adapters(model)
        np.testing.assert_allclose(forward(merged, x), forward(model, x), rtol=1e-5, atol=1e-6)
        assert merged.layers[0].up_proj.kernel[...].sharding.spec == P(None, "model")
    lj.set_alpha(model, 1.0)
    np.testing.assert_allclose(rows[-1], forward(model, x)[-1], rtol=1e-5, atol=1e-6)


def check_checkpoint_saved_on_4x2_restores_on_2x1():
    import tempfile

    from lora_jax.checkpoint import restore, save

    small_mesh = jax.sharding.Mesh(
        np.array(jax.devices()[:2]).reshape(2, 1), ("data", "model"), axis_types=(AxisType.Auto, AxisType.Auto)
    )
    x = data(0)[0]
    model = trained("antipasto")[0]  # outside the mesh: trained() builds its one-device model too
    with tempfile.TemporaryDirectory() as tmp:
        with jax.set_mesh(MESH):
            expect = np.asarray(forward(model, x))
            saved = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, lj.AdapterParam)))
            save(f"{tmp}/ckpt", model)
        with jax.set_mesh(small_mesh):
            restored = restore(f"{tmp}/ckpt", Model())
            vh = restored.layers[0].up_proj.vh[...]
            assert vh.sharding.mesh.shape == {"data": 2, "model": 1}, vh.sharding
            assert vh.sharding.spec == P(None, "model")
            got = np.asarray(forward(restored, x))
            loaded = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(restored, lj.AdapterParam)))
    jax.tree.map(np.testing.assert_array_equal, loaded, saved)  # every adapter bit restored
    # Outputs agree up to the summation order that a different mesh implies.
    np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-5)


def check_eva_calibration_on_8_data_shards_equals_single_device():
    """The statistics are sums over rows: sharding the rows over 8 devices must not change
    what EVA finds (XLA inserts the cross-device reduction)."""
    cfg = lj.AdapterConfig(rules=(lj.Rule(pattern="proj", variant=lj.EVAConfig(r=2, lora_alpha=2)),))
    batches = [jax.random.normal(jax.random.key(20 + i), (16, 6, D)) for i in range(4)]
    with nnx.use_eager_sharding(False):
        single = lj.eva_plan(Model(), cfg, batches, desc="eva 1 device")
    data_mesh = jax.make_mesh((8, 1), ("data", "model"), axis_types=(AxisType.Auto, AxisType.Auto))
    with jax.set_mesh(data_mesh):
        sharded_batches = [jax.device_put(b, NamedSharding(data_mesh, P("data"))) for b in batches]
        sharded = lj.eva_plan(Model(), cfg, sharded_batches, desc="eva 8 shards")
    assert single.components.keys() == sharded.components.keys()
    for path, a in single.components.items():
        b = sharded.components[path]
        assert a.shape == b.shape, (path, a.shape, b.shape)
        cos = np.abs(np.sum(np.asarray(a) * np.asarray(b), axis=-2)) / (
            np.linalg.norm(np.asarray(a), axis=-2) * np.linalg.norm(np.asarray(b), axis=-2)
        )
        assert cos.min() >= 0.999, (path, cos)


class ShortSpecAttention(nnx.Module):
    """3-D attention kernels given the 2-entry spec ``P(None, "model")`` (JAX pads a short
    spec with replicated axes; flax's miniGPT example writes its kernels this way)."""

    def __init__(self, seed=0):
        rngs = nnx.Rngs(seed)
        q_shape, o_shape = (D, HEADS, HEAD_DIM), (HEADS, HEAD_DIM, D)
        self.q_proj = nnx.Einsum("BTD,DNH->BTNH", q_shape, kernel_init=sharded_init((None, "model")), rngs=rngs)
        self.o_proj = nnx.Einsum("BTNH,NHD->BTD", o_shape, kernel_init=sharded_init(("model",)), rngs=rngs)

    def __call__(self, x):
        return x + self.o_proj(jnp.tanh(self.q_proj(x)))


def check_short_partition_specs_apply_train_merge():
    with nnx.use_eager_sharding(False):
        single = train(lj.apply_adapters(ShortSpecAttention(), CFG))
    with jax.set_mesh(MESH):
        model = lj.apply_adapters(ShortSpecAttention(), CFG)
        q, o = model.q_proj, model.o_proj
        assert q.base.kernel.get_metadata()["out_sharding"] == (None, "model")
        assert (q.lora_a[...].sharding.spec, q.lora_b[...].sharding.spec) == (P(None, None), P(None, "model"))
        assert (o.lora_a[...].sharding.spec, o.lora_b[...].sharding.spec) == (P("model", None), P(None, None))
        sharded = train(model, shard_data=NamedSharding(MESH, P("data")))
        x = jax.device_put(data(0)[0], NamedSharding(MESH, P("data")))
        merged = lj.merge_adapters(model)
        np.testing.assert_allclose(forward(merged, x), forward(model, x), rtol=1e-5, atol=1e-6)
        assert merged.q_proj.kernel[...].sharding.spec == q.base.kernel[...].sharding.spec
    np.testing.assert_allclose(sharded, single, rtol=1e-5, atol=1e-7)
    assert sharded[-1] < sharded[0], sharded


if __name__ == "__main__":
    assert jax.device_count() == 8, jax.devices()
    for name, fn in sorted(globals().items()):
        if name.startswith("check_"):
            fn()
            print("ok", name, flush=True)
