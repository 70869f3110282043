"""Explicit-axis mesh checks, run by test_sharding.py in a subprocess on 8 simulated CPU
devices (XLA_FLAGS must be set before jax is imported).

The model is written the way Explicit-axis model code is written (bonsai style): every
kernel carries its partition spec, and every base layer passes ``out_sharding`` to its
own contraction. Two layouts: tensor parallel (heads and the MLP hidden axis over 'tp',
batch over 'data') and FSDP (the model axis of every kernel and the batch over 'fsdp').
"""

from __future__ import annotations

import os

# 8 simulated devices. The models are tiny, so XLA's backend optimizations cost more
# compile time than they save (as in test_readme); the sharding logic is unaffected.
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + (
    " --xla_force_host_platform_device_count=8"
    " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
)

import dataclasses
import functools
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

import lora_jax as lj
from lora_jax.checkpoint import restore, save
from lora_jax.peft import export_peft, import_peft
from lora_jax.variants import AdaLoRAConfig, BOFTConfig, LoHaConfig, LoKrConfig, MiSSConfig, OFTConfig, VeRAConfig

jax.config.update("jax_default_matmul_precision", "highest")

D, HEADS, HEAD_DIM, FF = 16, 4, 4, 32
EXPLICIT = (AxisType.Explicit, AxisType.Explicit)


@dataclasses.dataclass(frozen=True)
class Layout:
    """Which mesh axis each logical axis lives on (None: replicated)."""

    batch: str | None
    embed: str | None
    heads: str | None
    hidden: str | None


TP = Layout(batch="data", embed=None, heads="tp", hidden="tp")
FSDP = Layout(batch="fsdp", embed="fsdp", heads=None, hidden=None)
MESHES = {
    "tp": (TP, ("data", "tp"), (4, 2)),
    "fsdp": (FSDP, ("fsdp", "tp"), (8, 1)),
}


LECUN = nnx.initializers.lecun_normal()


def partitioned(names, init=LECUN):
    return nnx.with_partitioning(init, names)


class Attention(nnx.Module):
    def __init__(self, layout: Layout, rngs: nnx.Rngs):
        self.layout = layout
        self.q_proj = nnx.Einsum(
            "BTD,DNH->BTNH",
            (D, HEADS, HEAD_DIM),
            kernel_init=partitioned((layout.embed, layout.heads, None)),
            rngs=rngs,
        )
        self.o_proj = nnx.Einsum(
            "BTNH,NHD->BTD",
            (HEADS, HEAD_DIM, D),
            kernel_init=partitioned((layout.heads, None, layout.embed)),
            rngs=rngs,
        )

    def __call__(self, x):
        heads = self.q_proj(x, out_sharding=P(self.layout.batch, None, self.layout.heads, None))
        return self.o_proj(jnp.tanh(heads), out_sharding=P(self.layout.batch, None, None))


class Mlp(nnx.Module):
    def __init__(self, layout: Layout, rngs: nnx.Rngs):
        self.layout = layout
        self.up_proj = nnx.Linear(
            D,
            FF,
            kernel_init=partitioned((layout.embed, layout.hidden)),
            bias_init=partitioned((layout.hidden,), nnx.initializers.normal(0.1)),
            rngs=rngs,
        )
        self.down_proj = nnx.Linear(
            FF, D, use_bias=False, kernel_init=partitioned((layout.hidden, layout.embed)), rngs=rngs
        )

    def __call__(self, x):
        hidden = jax.nn.gelu(self.up_proj(x, out_sharding=P(self.layout.batch, None, self.layout.hidden)))
        return self.down_proj(hidden, out_sharding=P(self.layout.batch, None, None))


class Block(nnx.Module):
    def __init__(self, layout: Layout, rngs: nnx.Rngs):
        self.attn = Attention(layout, rngs)
        self.mlp = Mlp(layout, rngs)

    def __call__(self, x):
        x = x + self.attn(x)
        return x + self.mlp(x)


class Model(nnx.Module):
    def __init__(self, layout: Layout, seed: int = 0, blocks: int = 2):
        rngs = nnx.Rngs(seed)
        self.layout = layout
        self.layers = nnx.List([Block(layout, rngs) for _ in range(blocks)])

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def mesh_for(name, n_devices=None):
    _, axes, shape = MESHES[name]
    if n_devices == 1:  # the same axis names on one device: the single-device reference
        return jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), axes, axis_types=EXPLICIT)
    return jax.make_mesh(shape, axes, axis_types=EXPLICIT)


LORA = lj.AdapterConfig(rules=(lj.Rule(pattern="proj", variant=lj.LoRAConfig(r=4, lora_alpha=8)),))
ANTIPASTO = lj.AdapterConfig(
    rules=(lj.Rule(pattern="proj", variant=lj.AntiPaSTOConfig(r=4, block_size=2, delta_s_init=1e-3)),)
)
CONFIGS = {"lora": LORA, "antipasto": ANTIPASTO}


def batch(layout):
    x = jax.random.normal(jax.random.key(0), (8, 3, D))
    x, y = jax.device_put(x, P(layout.batch)), jax.device_put(jnp.sin(x), P(layout.batch))
    return x, y


# Compiled forward: on 8 devices an eager call dispatches (and compiles) op by op, which
# cost seconds per check; the shardings are the same either way.
forward = nnx.jit(lambda model, x: model(x))


def train(model, layout, steps=5):
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=lj.AdapterParam)

    @nnx.jit
    def step(model, optimizer, x, y):
        def loss_fn(m):
            return jnp.mean((m(x) - y) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, lj.AdapterParam))(model)
        optimizer.update(model, grads)
        return loss

    x, y = batch(layout)
    return [float(step(model, optimizer, x, y)) for _ in range(steps)]


@functools.cache
def trained(name: str, cfg_name: str):
    """Five adam steps of one config on one layout, on a one-device mesh and on the 8-device
    mesh: (the sharded model, its losses, the one-device losses). Cached: the merge and
    PEFT / checkpoint checks reuse the trained LoRA model (trained adapters are non-zero)
    instead of compiling their own training step."""
    layout, cfg = MESHES[name][0], CONFIGS[cfg_name]
    with jax.set_mesh(mesh_for(name, 1)):
        single = train(lj.apply_adapters(Model(layout), cfg), layout)
    with jax.set_mesh(mesh_for(name)):
        model = lj.apply_adapters(Model(layout), cfg)
        sharded = train(model, layout)
    return model, sharded, single


def check_training_matches_one_device():
    for name in MESHES:
        layout = MESHES[name][0]
        for cfg_name in CONFIGS:
            model, sharded, single = trained(name, cfg_name)
            up = model.layers[0].mlp.up_proj
            assert up.base.kernel[...].sharding.spec == P(layout.embed, layout.hidden)
            np.testing.assert_allclose(sharded, single, rtol=1e-5, atol=1e-7, err_msg=f"{name} {cfg_name}")
            assert sharded[-1] < sharded[0], (name, sharded)
            print(f"  {name} {cfg_name}: {sharded[0]:.6f} -> {sharded[-1]:.6f}", flush=True)


def check_merge_on_sharded_kernels():
    for name in MESHES:
        layout = MESHES[name][0]
        trained_model = trained(name, "lora")[0]  # outside the mesh: trained() sets its own meshes
        with jax.set_mesh(mesh_for(name)):
            model = nnx.clone(trained_model)  # trained: every lora_b is off its zero init
            assert all(np.abs(np.asarray(a.lora_b[...])).max() > 0 for _, a in lj.iter_adapters(model))
            lj.set_alpha(model, 0.5)
            x, _ = batch(layout)
            merged = lj.merge_adapters(model)
            np.testing.assert_allclose(forward(merged, x), forward(model, x), rtol=1e-5, atol=1e-6)
            base = Model(layout)
            # every merged kernel and bias keeps the base model's sharding
            new, old = nnx.to_flat_state(nnx.state(merged)), nnx.to_flat_state(nnx.state(base))
            assert [p for p, _ in new] == [p for p, _ in old] and len(new) == 10, [p for p, _ in new]
            for (path, a), (_, b) in zip(new, old, strict=True):
                assert a[...].sharding == b[...].sharding, (name, path, a[...].sharding, b[...].sharding)
            assert merged.layers[0].attn.q_proj.kernel[...].sharding.spec == P(layout.embed, layout.heads, None)
            assert not np.allclose(merged.layers[0].attn.q_proj.kernel[...], base.layers[0].attn.q_proj.kernel[...])


def expected_specs(layout):
    """What apply_adapters gives LoRA's factors on each layout (d_in / d_out like the kernel)."""
    return {
        "layers.0.attn.q_proj": (P(layout.embed, None), P(None, layout.heads)),
        "layers.0.attn.o_proj": (P(layout.heads, None), P(None, layout.embed)),
        "layers.0.mlp.up_proj": (P(layout.embed, None), P(None, layout.hidden)),
        "layers.0.mlp.down_proj": (P(layout.hidden, None), P(None, layout.embed)),
    }


def assert_lora_specs(model, layout):
    for path, (spec_a, spec_b) in expected_specs(layout).items():
        adapter = dict(lj.iter_adapters(model))[path]
        got = (adapter.lora_a[...].sharding.spec, adapter.lora_b[...].sharding.spec)
        assert got == (spec_a, spec_b), (path, got, (spec_a, spec_b))
        assert adapter.lora_a[...].sharding.mesh.shape == dict(jax.sharding.get_abstract_mesh().shape)


def check_import_peft_and_restore_onto_a_sharded_base():
    for name in MESHES:
        layout = MESHES[name][0]
        model = trained(name, "lora")[0]  # outside the mesh: trained() sets its own meshes
        with tempfile.TemporaryDirectory() as tmp, jax.set_mesh(mesh_for(name)):
            x, _ = batch(layout)
            expect = np.asarray(forward(model, x))
            assert_lora_specs(model, layout)
            export_peft(f"{tmp}/peft", model, hf_name=lambda path: path)
            save(f"{tmp}/ckpt", model)
            for loaded in (
                import_peft(f"{tmp}/peft", Model(layout), hf_name=lambda path: path),
                restore(f"{tmp}/ckpt", Model(layout)),
            ):
                assert_lora_specs(loaded, layout)
                np.testing.assert_allclose(forward(loaded, x), expect, rtol=1e-5, atol=1e-6)


def check_every_variant_trains_and_merges_on_fsdp():
    """FSDP has both conflicts (the batch and the kernels' model axis on one mesh axis):
    every variant's products, per-feature vectors, init and merge, two steps each. One
    block is enough (it has every layer kind: Einsum in and out, Linear with and without
    a bias); the two-block model is trained above, for LoRA and AntiPaSTO."""
    layout = FSDP
    variants = (
        lj.LoRAConfig(r=4, custom_vjp=False),
        lj.PiSSAConfig(r=4),
        lj.OLoRAConfig(r=4),
        lj.EVAConfig(r=4),
        lj.DoRAConfig(r=4),
        lj.DeLoRAConfig(r=4),
        lj.IA3Config(),
        lj.IA3FFConfig(),
        lj.HRAConfig(r=4),
        lj.ROADConfig(group_size=4),
        LoHaConfig(r=2),
        LoKrConfig(r=1, decompose_both=True),
        OFTConfig(oft_block_size=4),
        MiSSConfig(r=4),
        VeRAConfig(r=4),  # its one projection, shared by every layer, replicated on the mesh
        BOFTConfig(boft_block_size=2, boft_n_butterfly_factor=2),
        AdaLoRAConfig(r=4, target_r=2, total_step=10),
    )
    for variant in variants:
        cfg = lj.AdapterConfig(rules=(lj.Rule(pattern="proj", variant=variant),))
        with jax.set_mesh(mesh_for("fsdp", 1)):
            single = train(lj.apply_adapters(Model(layout, blocks=1), cfg), layout, steps=2)
        with jax.set_mesh(mesh_for("fsdp")):
            model = lj.apply_adapters(Model(layout, blocks=1), cfg)
            sharded = train(model, layout, steps=2)
            x, _ = batch(layout)
            merged = nnx.jit(lj.merge_adapters)(model)  # the eager merge is checked above, for LoRA
            np.testing.assert_allclose(
                forward(merged, x), forward(model, x), rtol=1e-5, atol=3e-6, err_msg=variant.name
            )
            kernel = merged.layers[0].attn.q_proj.kernel[...]
            assert kernel.sharding.spec == P(layout.embed, layout.heads, None), (variant.name, kernel.sharding)
            if variant.name == "vera":  # one projection for every layer, whole on every device
                projection = model.layers[0].attn.q_proj.vera_projection
                assert projection is model.layers[0].mlp.down_proj.vera_projection
                assert projection.vera_A[...].sharding.is_fully_replicated, projection.vera_A[...].sharding
        # DeLoRA divides by the norm of B, which starts at zero (clamped): the first
        # update magnifies the rounding of a different summation order.
        rtol = 1e-4 if variant.name == "delora" else 1e-5
        np.testing.assert_allclose(sharded, single, rtol=rtol, atol=1e-7, err_msg=variant.name)


if __name__ == "__main__":
    assert jax.device_count() == 8, jax.devices()
    only = sys.argv[1:]  # names of checks to run by hand; all by default
    for name, fn in sorted(globals().items()):
        if name.startswith("check_") and (not only or name in only):
            fn()
            print("ok", name, flush=True)
