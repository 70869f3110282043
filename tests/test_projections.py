"""Factor products in every layout: the forward is the low-rank matrix product, and the
hand-written backward (custom_vjp=True) equals JAX's own derivative of the einsums."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from layers import LAYOUT_IDS, LAYOUTS

import lora_jax as lj
from lora_jax.projections import project_back, project_in, project_out
from lora_jax.views import spec_of

RANK = 3


def _setup(layout):
    layer, x = layout.build()
    spec = spec_of(layer, lj.views.view_of(layer))
    k1, k2 = jax.random.split(jax.random.key(0))
    a = jax.random.normal(k1, (*spec.batch_shape, spec.d_in, RANK))
    b = jax.random.normal(k2, (*spec.batch_shape, RANK, spec.d_out))
    return spec, x, a, b


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_project_in_out_equals_low_rank_matrix_product(layout):
    spec, x, a, b = _setup(layout)
    via_factors = project_out(spec, project_in(spec, x, a), b, x.ndim)
    rows = spec.in_to_matrix(x)
    expect = jnp.einsum("...nd,...do->...no", rows.reshape(*spec.batch_shape, -1, spec.d_in), a @ b)
    expect = spec.out_from_matrix(expect.reshape(rows.shape[:-1] + (spec.d_out,)), x.ndim)
    np.testing.assert_allclose(via_factors, expect, rtol=1e-5, atol=1e-4)
    # project_back is the transpose of project_in: <project_in(x), h> == <x, project_back(h)>.
    h = jax.random.normal(jax.random.key(1), project_in(spec, x, a).shape)
    back = project_back(spec, h, a, x.ndim)
    assert back.shape == x.shape
    np.testing.assert_allclose(jnp.vdot(project_in(spec, x, a), h), jnp.vdot(x, back), rtol=1e-5)


def _chain(spec, ndim, custom_vjp):
    """x -> x A -> (x A) B and (x A) A^T: every projection, each operand differentiated."""

    def f(x, a, b):
        h = project_in(spec, x, a, custom_vjp=custom_vjp)
        out = project_out(spec, jnp.sin(h), b, ndim, custom_vjp=custom_vjp)
        back = project_back(spec, jnp.cos(h), a, ndim, custom_vjp=custom_vjp)
        return jnp.sum(out * jnp.tanh(out)) + jnp.sum(back * back)

    return f


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_custom_backward_equals_autodiff(layout):
    spec, x, a, b = _setup(layout)
    custom = jax.jit(jax.grad(_chain(spec, x.ndim, True), argnums=(0, 1, 2)))(x, a, b)
    plain = jax.jit(jax.grad(_chain(spec, x.ndim, False), argnums=(0, 1, 2)))(x, a, b)
    for got, want in zip(custom, plain, strict=True):
        assert got.shape == want.shape and got.dtype == want.dtype
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(want))))


def test_custom_backward_keeps_operand_dtypes():
    layer, x = LAYOUTS[0].build()
    spec = spec_of(layer, lj.views.view_of(layer))
    x = x.astype(jnp.bfloat16)
    a = jnp.ones((spec.d_in, RANK), jnp.float32)
    dx, da = jax.grad(lambda x, a: jnp.sum(project_in(spec, x, a)), argnums=(0, 1))(x, a)
    assert dx.dtype == jnp.bfloat16 and da.dtype == jnp.float32


def test_forward_mode_needs_custom_vjp_off():
    spec, x, a, _ = _setup(LAYOUTS[0])
    tangent = jnp.ones_like(a)
    _, jvp = jax.jvp(lambda a: project_in(spec, x, a, custom_vjp=False), (a,), (tangent,))
    np.testing.assert_allclose(jvp, project_in(spec, x, tangent), rtol=1e-6)
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(lambda a: project_in(spec, x, a), (a,), (tangent,))


def test_custom_vjp_flag_is_checked():
    with pytest.raises(ValueError, match="custom_vjp=1 must be True or False"):
        lj.LoRAConfig(custom_vjp=1)


def test_adapted_model_forward_mode_with_custom_vjp_off():
    """jax.jvp / jax.hessian through a whole adapted model need custom_vjp=False."""
    from flax import nnx

    layer, x = LAYOUTS[0].build()

    class Host(nnx.Module):
        def __init__(self, layer):
            self.layer = layer

        def __call__(self, x):
            return self.layer(x)

    def loss_of(custom_vjp):
        cfg = lj.AdapterConfig(rules=(lj.Rule(pattern="layer", variant=lj.LoRAConfig(r=2, custom_vjp=custom_vjp)),))
        model = lj.apply_adapters(Host(layer), cfg)
        graphdef, params, rest = nnx.split(model, lj.AdapterParam, ...)
        return (lambda p: jnp.sum(jnp.tanh(nnx.merge(graphdef, p, rest)(x)))), params

    loss, params = loss_of(False)
    hessian = jax.hessian(loss)(params)
    assert all(bool(jnp.isfinite(h).all()) for h in jax.tree.leaves(hessian))
    grads = jax.grad(loss)(params)
    custom_loss, custom_params = loss_of(True)
    for got, want in zip(jax.tree.leaves(jax.grad(custom_loss)(custom_params)), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.hessian(custom_loss)(custom_params)
