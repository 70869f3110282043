"""The storage formats as pure array math: codes in range, rounding within half a step,
NF4's levels from their definition, bits per weight."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import norm

from lora_jax import quant
from lora_jax.quant.formats import NF4_CODEBOOK


def test_nf4_levels_are_normal_quantiles_scaled_to_one():
    # QLoRA: 8 positive quantiles (incl. the top) and 7 negative, with an exact zero between
    offset = 0.5 * (1 / 32 + 1 / 30)
    positive = norm.ppf(np.linspace(1 - offset, 0.5, 9)[:-1])
    negative = -norm.ppf(np.linspace(1 - offset, 0.5, 8)[:-1])
    levels = np.sort(np.concatenate([positive, [0.0], negative]))
    np.testing.assert_allclose(NF4_CODEBOOK, levels / levels.max(), atol=2e-7)


@pytest.mark.parametrize(
    "fmt, lo, hi",
    [
        (quant.Int8(), -127, 127),
        (quant.Int8(group_size=8), -127, 127),
        (quant.Int4(group_size=8), 0, 15),
        (quant.Int4(group_size=8, symmetric=True), -7, 7),
        (quant.NF4(group_size=8), 0, 15),
    ],
    ids=["int8", "int8_g8", "int4", "int4_sym", "nf4"],
)
def test_codes_in_range_and_rounding_within_half_a_step(fmt, lo, hi):
    w = jax.random.normal(jax.random.key(0), (3, 32, 6)) * jnp.linspace(0.1, 3, 6)[None, None, :]
    w = w.at[0, :8, 0].set(0.0)  # an all-zero group dequantizes to zeros
    q = fmt.quantize(w)
    codes = np.asarray(q.codes.astype(jnp.int32))
    assert codes.min() >= lo and codes.max() <= hi and q.codes.shape == w.shape
    back = np.asarray(fmt.dequantize(q, jnp.float32))
    assert (back[0, :8, 0] == 0).all()
    g = fmt.group_size or 32
    grouped = np.asarray(w).reshape(3, 32 // g, g, 6)
    absmax = np.repeat(np.abs(grouped).max(axis=2), g, axis=1)
    # half a step: absmax/127 (int8), (max - min)/15 <= 2 absmax/15 (int4), absmax/7 (int4
    # symmetric), the widest gap between NF4 levels (1 - 0.696, at the ends) times absmax
    step = {"int8": 1 / 127, "int4": 2 / 15, "int4_sym": 1 / 7, "nf4": 1 - 0.6961928}[
        "int4_sym" if getattr(fmt, "symmetric", False) else fmt.name
    ] / 2
    assert (np.abs(back - np.asarray(w)) <= absmax * step * 1.002 + 1e-7).all()
    assert 0 < quant.quantization_error(fmt, w) < (0.01 if fmt.bits == 8 else 0.15)


def test_bits_per_weight_counts_scales_and_offsets():
    assert quant.Int8().bits_per_weight(1024) == 8 + 32 / 1024
    assert quant.Int4().bits_per_weight(576) == 4 + 2 * 16 / 32  # Q4_1: 5 bits
    assert quant.NF4().bits_per_weight(1024) == 4.5
    with pytest.raises(ValueError, match="d_in=30 is not a multiple of group_size=32"):
        quant.Int4().groups(30)
    with pytest.raises(ValueError, match="scale_dtype='int8' must be a float dtype"):
        quant.NF4(scale_dtype="int8")
