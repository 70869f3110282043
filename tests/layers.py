"""Layer zoo for tests: every layout the library promises to adapt, with an input maker.

Each entry builds a single linear-like layer and an input of a matching shape, so a
test parametrized over ``LAYOUTS`` covers Linear, LinearGeneral and each Einsum layout.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

B, T = 3, 5


@dataclasses.dataclass(frozen=True)
class Layout:
    name: str
    make: Callable[[nnx.Rngs, jnp.dtype], nnx.Module]
    input_shape: tuple[int, ...]

    def build(self, seed: int = 0, dtype=jnp.float32):
        layer = self.make(nnx.Rngs(seed), dtype)
        x = jax.random.normal(jax.random.key(seed + 100), self.input_shape, jnp.float32).astype(dtype)
        return layer, x


def _einsum(eq, kernel_shape, bias_shape=None):
    def make(rngs, dtype):
        return nnx.Einsum(
            eq, kernel_shape, bias_shape, param_dtype=dtype, rngs=rngs, bias_init=nnx.initializers.normal()
        )

    return make


LAYOUTS = [
    Layout(
        "linear",
        lambda r, dt: nnx.Linear(16, 12, param_dtype=dt, rngs=r, bias_init=nnx.initializers.normal()),
        (B, T, 16),
    ),
    Layout(
        "linear_general",
        lambda r, dt: nnx.LinearGeneral((4, 4), (2, 6), axis=(-2, -1), param_dtype=dt, rngs=r),
        (B, T, 4, 4),
    ),
    Layout(
        "linear_general_batch",
        lambda r, dt: nnx.LinearGeneral(8, (2, 3), axis=-1, batch_axis={0: B}, param_dtype=dt, rngs=r),
        (B, T, 8),
    ),
    Layout("q_BTD_DNH", _einsum("BTD,DNH->BTNH", (16, 2, 6), (2, 6)), (B, T, 16)),
    Layout("q_BTD_NDH", _einsum("BTD,NDH->BTNH", (2, 16, 6)), (B, T, 16)),
    Layout("o_BTNH_NHD", _einsum("BTNH,NHD->BTD", (2, 6, 16), (16,)), (B, T, 2, 6)),
    Layout("kv_packed", _einsum("BSD,CKDH->CBSKH", (2, 2, 16, 6)), (B, T, 16)),
    Layout("moe_EBD_EDF", _einsum("EBD,EDF->EBF", (4, 16, 12), (4, 12)), (4, T, 16)),
    Layout("per_head_BTNH_NHK", _einsum("BTNH,NHK->BTNK", (2, 6, 8)), (B, T, 2, 6)),
    Layout("ellipsis", _einsum("...d,df->...f", (16, 12), (12,)), (B, T, 16)),
]
LAYOUT_IDS = [layout.name for layout in LAYOUTS]
