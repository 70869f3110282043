"""Merging adapters into a quantized base: requantized (error bounded by half a step per
entry, reported) or kept in float (exact)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx
from helpers import max_rel_err as _rel_err
from helpers import perturb
from test_contract import CASES, _adapt
from test_quant_layer import FORMATS, MLP

import lora_jax as lj
from lora_jax import quant
from lora_jax.stacked import merged_arrays


def _adapted(name, fmt, x):
    model = _adapt(CASES[name], quant.quantize(MLP(nnx.Rngs(0)), FORMATS[fmt]), x)
    perturb(model, CASES[name].perturb, seed=7)
    return model


# Largest rounding error per entry of each format, as a fraction of its group's absmax
# (int8: half of absmax/127; int4 asymmetric: half of (max-min)/15 <= absmax/15; nf4: half
# the widest gap between neighbouring levels, which is 1 - 0.696 at the ends).
STEP = {"int8": 0.5 / 127, "int4": 1 / 15, "int4_sym": 0.5 / 7, "nf4": 0.5 * (1 - 0.6961928)}


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("name", ["lora", "dora", "antipasto"])
def test_requantized_merge_error_is_within_half_a_step(name, fmt):
    x = jax.random.normal(jax.random.key(1), (2, 3, 12))
    model = _adapted(name, fmt, x)
    merged, reports = quant.merge_quantized(model)
    assert {r.path for r in reports} == {"up", "heads", "down"}
    assert not list(lj.iter_adapters(merged)) and isinstance(merged.up, quant.QuantizedLayer)
    plain = lj.merge_adapters(model)  # merge_adapters alone requantizes the same way
    np.testing.assert_array_equal(np.asarray(plain(x)), np.asarray(merged(x)))
    for layer_name in ("up", "heads", "down"):
        adapter = getattr(model, layer_name)
        exact_kernel, _ = merged_arrays(adapter)
        spec = adapter.spec
        w = np.asarray(spec.kernel_to_matrix(exact_kernel), np.float64)
        got = np.asarray(spec.kernel_to_matrix(getattr(merged, layer_name).dequantized()), np.float64)
        g = FORMATS[fmt].group_size or spec.d_in
        absmax = np.abs(w.reshape(spec.d_in // g, g, spec.d_out)).max(axis=1)
        bound = np.repeat(absmax, g, axis=0) * STEP[fmt] * (1 + 1e-3) + 1e-6
        assert (np.abs(got - w) <= bound).all(), np.abs(got - w).max()
    report = {r.path: r for r in reports}["up"]
    assert 0 < report.kernel_error < 0.2 and report.delta_norm > 0
    assert _rel_err(merged(x), model(x)) < 0.3


def test_keep_float_merges_exactly_into_the_original_layer_types():
    x = jax.random.normal(jax.random.key(1), (2, 3, 12))
    model = _adapted("pissa", "nf4", x)
    merged, reports = quant.merge_quantized(model, keep_float=True)
    assert type(merged.up) is nnx.Linear and type(merged.heads) is nnx.Einsum
    assert all(r.kernel_error < 1e-6 for r in reports)
    assert _rel_err(merged(x), model(x)) < 1e-5
    assert list(lj.iter_adapters(model)), "the adapted model is left as it was"


def test_small_delta_on_a_4bit_grid_is_mostly_lost_and_the_report_says_so():
    x = jax.random.normal(jax.random.key(1), (2, 3, 12))
    model = _adapt(CASES["lora"], quant.quantize(MLP(nnx.Rngs(0)), quant.NF4(group_size=4)), x)
    perturb(model, 1e-3, seed=7)
    _, reports = quant.merge_quantized(model)
    assert max(r.delta_error for r in reports) > 0.5
    _, exact = quant.merge_quantized(model, keep_float=True)
    assert max(r.delta_error for r in exact) < 1e-3
