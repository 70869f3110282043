"""LoftQ init over a quantized base: it lowers the init error against the float kernel,
and alpha=0 is the LoftQ-quantized base bit for bit."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx
from test_quant_layer import MLP

import lora_jax as lj
from lora_jax import quant


def _cfg(r=4):
    return lj.AdapterConfig(rules=(lj.Rule(pattern=".", variant=lj.LoRAConfig(r=r, lora_alpha=2 * r)),))


@pytest.mark.parametrize(
    "fmt", [quant.NF4(group_size=4), quant.Int4(group_size=4, symmetric=True)], ids=["nf4", "int4"]
)
def test_loftq_init_is_closer_to_the_float_model_than_plain_quantization(fmt):
    x = jax.random.normal(jax.random.key(1), (4, 3, 12))
    model = MLP(nnx.Rngs(0))
    adapted, reports = quant.loftq(model, _cfg(), fmt, iters=3)
    assert {r.path for r in reports} == {"up", "heads", "down"}
    assert all(r.loftq_error < 0.9 * r.quant_error for r in reports), reports
    plain = quant.quantize(model, fmt)
    y = np.asarray(model(x))
    assert np.abs(np.asarray(adapted(x)) - y).max() < np.abs(np.asarray(plain(x)) - y).max()
    # the reported error is the layer's: deq(Q) + s A B against W
    up = adapted.up
    w_init = np.asarray(up.base.dequantized())
    w_init = w_init + up.config.scale * np.asarray(up.lora_a[...] @ up.lora_b[...])
    w = np.asarray(model.up.kernel[...])
    rel = np.linalg.norm(w_init - w) / np.linalg.norm(w)
    np.testing.assert_allclose(rel, {r.path: r for r in reports}["up"].loftq_error, rtol=1e-4)
    lj.set_alpha(adapted, 0.0)
    base_only = quant.quantize(MLP(nnx.Rngs(0)), fmt)
    for name in ("up", "heads", "down"):
        getattr(base_only, name).set_codes(getattr(adapted, name).base.quantized())
    np.testing.assert_array_equal(np.asarray(adapted(x)), np.asarray(base_only(x)))


def test_more_iterations_do_not_increase_the_error():
    model = MLP(nnx.Rngs(0))
    fmt = quant.NF4(group_size=4)
    errors = [sum(r.loftq_error for r in quant.loftq(model, _cfg(), fmt, iters=n)[1]) for n in (1, 4)]
    assert errors[1] <= errors[0] * 1.001


def test_loftq_refuses_other_variants_and_unquantized_targets():
    model = MLP(nnx.Rngs(0))
    pissa = lj.AdapterConfig(rules=(lj.Rule(pattern=".", variant=lj.PiSSAConfig(r=2)),))
    with pytest.raises(ValueError, match=r"plain LoRA only.*PiSSAConfig"):
        quant.loftq(model, pissa, quant.Int8())
    with pytest.raises(ValueError, match=r"\['down'\] are adapted but not quantized"):
        quant.loftq(model, _cfg(), quant.Int8(), exclude=("down",))
    with pytest.raises(ValueError, match="iters=0 must be an integer >= 1"):
        quant.loftq(model, _cfg(), quant.Int8(), iters=0)
