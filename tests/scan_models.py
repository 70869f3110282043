"""Model code in the scan-over-layers style (blocks built by ``nnx.vmap``, run by
``nnx.scan``), with an unrolled twin holding the same blocks in a list. Written for
these tests in the style flax documents and MaxText uses, not copied from either."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

D, HEADS, LAYERS = 8, 2, 3


class Block(nnx.Module):
    def __init__(self, d: int, rngs: nnx.Rngs, *, kernel_init=None):
        self.norm = nnx.LayerNorm(d, rngs=rngs)
        self.q = nnx.Einsum("BTD,DNH->BTNH", (d, HEADS, d // HEADS), (HEADS, d // HEADS), rngs=rngs)
        self.o = nnx.Einsum("BTNH,NHD->BTD", (HEADS, d // HEADS, d), rngs=rngs)
        kernel_init = kernel_init or nnx.initializers.lecun_normal()
        self.up = nnx.Linear(d, 2 * d, rngs=rngs, kernel_init=kernel_init, bias_init=nnx.initializers.normal())
        self.down = nnx.Linear(2 * d, d, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.o(jnp.tanh(self.q(self.norm(x))))
        return x + self.down(jax.nn.gelu(self.up(x)))


class ScanModel(nnx.Module):
    """Blocks stacked on a leading layer axis: ``blocks.up.kernel`` is ``(LAYERS, D, 2D)``."""

    def __init__(self, rngs: nnx.Rngs, *, d: int = D, n_layers: int = LAYERS, **block_options):
        @nnx.split_rngs(splits=n_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, **block_options.pop("vmap_options", {}))
        def make(rngs: nnx.Rngs) -> Block:
            return Block(d, rngs, **block_options)

        self.blocks = make(rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def body(h: jax.Array, block: Block) -> jax.Array:
            return block(h)

        return body(x, self.blocks)


class UnrolledModel(nnx.Module):
    """The same computation with one Block object per layer."""

    def __init__(self, blocks: list[Block]):
        self.layers = nnx.List(blocks)

    def __call__(self, x: jax.Array) -> jax.Array:
        for block in self.layers:
            x = block(x)
        return x


def unroll(model: ScanModel, filter_=nnx.Param) -> UnrolledModel:
    """An ``UnrolledModel`` whose layer i holds slice i of ``model``'s ``filter_`` state."""
    n = jax.tree.leaves(nnx.state(model.blocks, nnx.Param))[0].shape[0]
    blocks = [Block(D, nnx.Rngs(100 + i)) for i in range(n)]
    stacked = nnx.state(model.blocks, filter_)
    for i, block in enumerate(blocks):
        nnx.update(block, jax.tree.map(lambda a, i=i: a[i], stacked))
    return UnrolledModel(blocks)


def model_and_input(seed: int = 0, batch: int = 2, seq: int = 5):
    model = ScanModel(nnx.Rngs(seed))
    x = jax.random.normal(jax.random.key(seed + 1), (batch, seq, D))
    return model, x
