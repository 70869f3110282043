"""The matrix view of every layout agrees with the layer itself; bad layers are refused."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from layers import LAYOUT_IDS, LAYOUTS

import lora_jax as lj
from lora_jax.einsum_spec import EinsumSpec
from lora_jax.views import spec_of


def _spec(layer):
    return spec_of(layer, lj.views.view_of(layer))


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_kernel_matrix_round_trip_and_dense_forward(layout):
    layer, x = layout.build()
    spec = _spec(layer)
    kernel = layer.kernel[...]
    matrix = spec.kernel_to_matrix(kernel)
    assert matrix.shape == (*spec.batch_shape, spec.d_in, spec.d_out)
    np.testing.assert_array_equal(spec.kernel_from_matrix(matrix), kernel)
    # The layer equals rows @ matrix (+ bias) in matrix form.
    rows = spec.in_to_matrix(x)
    dense = jnp.einsum("...nd,...do->...no", rows.reshape(*spec.batch_shape, -1, spec.d_in), matrix)
    dense = dense.reshape(rows.shape[:-1] + (spec.d_out,))
    if layer.bias is not None:
        bias = spec.bias_to_matrix(layer.bias[...])
        np.testing.assert_array_equal(spec.bias_from_matrix(bias, layer.bias.shape), layer.bias[...])
        bias = bias.reshape(*spec.batch_shape, *([1] * (dense.ndim - len(spec.batch_shape) - 1)), spec.d_out)
        dense = dense + bias
    y = spec.out_to_matrix(layer(x), x.ndim)
    np.testing.assert_allclose(dense, y, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(spec.out_from_matrix(y, x.ndim), layer(x))


@pytest.mark.parametrize(
    ("equation", "shape", "message"),
    [
        ("BTD,DO->BO", (4, 3), "input axis 'T' is summed away"),
        ("BD,DXO->BO", (4, 2, 3), "kernel axis 'X' is summed away"),
        ("BDD,DO->BO", (4, 3), "repeats an axis letter"),
        ("BD,DO", (4, 3), "must be explicit"),
        ("BD,DO,OK->BK", (4, 3), "must be explicit"),
        ("BD,DO->BOZ", (4, 3), "comes from neither operand"),
        ("BD,DO->BO", (4, 3, 2), "kernel shape"),
    ],
)
def test_unsupported_einsum_is_refused_with_reason(equation, shape, message):
    with pytest.raises(lj.UnsupportedLayerError, match=message):
        EinsumSpec(equation, shape)


def test_unsupported_layer_error_names_the_layer():
    class Model(nnx.Module):
        def __init__(self, rngs):
            self.pool = nnx.Einsum("BTD,DO->BO", (4, 3), rngs=rngs)

    with pytest.raises(lj.UnsupportedLayerError, match=r"'pool'.*summed away"):
        lj.apply_adapters(
            Model(nnx.Rngs(0)), lj.AdapterConfig(rules=(lj.Rule(pattern="pool", variant=lj.LoRAConfig(r=1)),))
        )


class TunixEinsum(nnx.Module):
    """A tunix-style layer: kernel attribute ``w``, equation passed at call time."""

    def __init__(self, shape, rngs):
        self.w = nnx.Param(jax.random.normal(rngs.params(), shape))

    def __call__(self, eqn, x):
        return jnp.einsum(eqn, x, self.w[...])


def test_registered_view_for_user_module(register_view):
    register_view(TunixEinsum, lambda m: lj.ViewInfo("BTD,NDH->BTNH", kernel="w", input_arg=1))

    class Attn(nnx.Module):
        def __init__(self, rngs):
            self.q = TunixEinsum((2, 8, 4), rngs)

        def __call__(self, x):
            return self.q("BTD,NDH->BTNH", x)

    model = Attn(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 3, 8))
    adapted = lj.apply_adapters(model, lj.AdapterConfig(rules=(lj.Rule(pattern="q", variant=lj.LoRAConfig(r=2)),)))
    np.testing.assert_array_equal(adapted(x), model(x))
    adapter = dict(lj.iter_adapters(adapted))["q"]
    adapter.lora_b.value = jnp.ones_like(adapter.lora_b[...])
    merged = lj.merge_adapters(adapted)
    assert type(merged.q) is TunixEinsum
    np.testing.assert_allclose(merged(x), adapted(x), rtol=1e-5)


def test_register_view_rejects_non_modules():
    with pytest.raises(TypeError, match="nnx.Module subclass"):
        lj.register_view(int, lambda m: None)


def test_unregister_view_forgets_the_type_and_refuses_an_unknown_one(register_view):
    class Custom(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.ones((3, 2)))

        def __call__(self, x):
            return x @ self.w[...]

    register_view(Custom, lambda m: lj.ViewInfo("...i,io->...o", kernel="w"))
    assert lj.views.view_of(Custom()) is not None
    lj.views.unregister_view(Custom)
    assert lj.views.view_of(Custom()) is None
    with pytest.raises(KeyError, match="no view registered with register_view"):
        lj.views.unregister_view(Custom)
