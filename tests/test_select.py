"""Dimension selection on synthetic data with planted directions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from layers import LAYOUTS

from lora_jax import AdapterConfig, AntiPaSTOConfig, Rule, apply_adapters, iter_adapters, merge_adapters, set_alpha
from lora_jax.models.config import tiny_config
from lora_jax.models.qwen3 import Qwen3
from lora_jax.select import (
    full_svd,
    l1_trip,
    polarity_interleave,
    projection_stats,
    rebase,
    select_dimensions,
    top_indices,
    wanda_scores,
)

D, K = 24, 24


def planted_svd(batch=(), seed=0):
    """Orthonormal U (D, K), singular values 12, 11, ..., 1 (largest first)."""
    q, _ = jnp.linalg.qr(jax.random.normal(jax.random.key(seed), (*batch, D, K)))
    s = jnp.broadcast_to(jnp.arange(K, 0, -1, dtype=jnp.float32) / 2, (*batch, K))
    return q, s


def rows_along(u, weights, n=64, noise=0.05, seed=1):
    """Rows = small noise + sum_j weights[j] * (1 + |N(0,1)|) * u_j (signed weights)."""
    key_noise, key_amp = jax.random.split(jax.random.key(seed))
    shape = (*u.shape[:-2], n)
    x = noise * jax.random.normal(key_noise, (*shape, D))
    amp = 1.0 + jnp.abs(jax.random.normal(key_amp, (*shape, 1)))
    for j, w in weights.items():
        x = x + w * amp * u[..., None, :, j]
    return x


def test_wanda_picks_a_planted_low_singular_direction():
    u, s = planted_svd()
    planted = 20  # S = 2.0, far outside the top 4 by S
    stats = projection_stats(rows_along(u, {planted: 3.0}), u)
    picked = top_indices(wanda_scores(stats, s), 4)
    assert planted in np.asarray(picked).tolist()
    assert planted not in np.asarray(top_indices(s, 4)).tolist()


def test_projection_stats_stream_and_mask():
    u, _ = planted_svd()
    x = rows_along(u, {3: 1.0}, n=10)
    whole = projection_stats(x, u)
    halves = projection_stats(x[:6], u) + projection_stats(x[6:], u)
    np.testing.assert_allclose(whole.abs_sum, halves.abs_sum, rtol=1e-5)
    padded = jnp.concatenate([x, 100.0 * jnp.ones((3, D))])
    masked = projection_stats(padded, u, mask=jnp.concatenate([jnp.ones(10), jnp.zeros(3)]))
    np.testing.assert_allclose(masked.mean_abs, whole.mean_abs, rtol=1e-5)
    assert float(masked.count) == 10.0


def test_l1_trip_picks_contrastive_dims_in_each_batch_matrix():
    """Per kernel-batch index: dim 18 is +/- between chosen and rejected (diff > 0), dim
    21 the other way round, dim 2 is shared (large |proj| on both sides, no diff)."""
    u, s = planted_svd(batch=(2,))
    chosen = rows_along(u, {18: 2.0, 21: -1.0, 2: 1.0}, seed=3)
    rejected = rows_along(u, {18: -2.0, 21: 1.0, 2: 1.0}, seed=4)
    c, r = projection_stats(chosen, u), projection_stats(rejected, u)
    picked = np.asarray(l1_trip(c, r, s, 6))
    assert picked.shape == (2, 6)
    for row in picked:
        assert {18, 21, 2} <= set(row.tolist())
        assert len(set(row.tolist())) == 6 and list(row) == sorted(row)
    # without the contrast, 18 and 21 do not make the top 6 by S
    assert not {18, 21} & set(np.asarray(top_indices(s, 6)).ravel().tolist())


def test_polarity_interleave_alternates():
    diff = jnp.array([0.5, -0.2, 0.3, 0.1, -0.7, -0.1, 0.9, 0.0])
    indices = jnp.array([0, 2, 3, 6, 7, 1, 4, 5])  # 5 non-negative, 3 negative
    out = np.asarray(polarity_interleave(indices, diff))
    signs = np.asarray(diff)[out] >= 0
    assert sorted(out.tolist()) == sorted(np.asarray(indices).tolist())
    assert signs[:6].tolist() == [True, False] * 3
    assert out.tolist() == [0, 1, 2, 4, 3, 5, 6, 7]


class Host(nnx.Module):
    def __init__(self, layer):
        self.layer = layer

    def __call__(self, x):
        return self.layer(x)


def test_rebase_selects_dims_and_keeps_the_adapter_exact():
    key_x = jax.random.key(1)
    layer = nnx.Einsum("EBD,EDF->EBF", (2, 16, 12), rngs=nnx.Rngs(0))
    host = Host(layer)
    x = jax.random.normal(key_x, (2, 5, 16))
    variant = AntiPaSTOConfig(r=4, block_size=2, rotate="both", delta_s_init=0.1)
    model = apply_adapters(host, AdapterConfig(rules=(Rule(pattern="layer", variant=variant),)))
    [(_, adapter)] = list(iter_adapters(model))
    u, s, vh = full_svd(adapter)
    indices = jnp.array([[9, 2, 11, 5], [0, 7, 3, 10]])
    rebase(adapter, indices)
    np.testing.assert_array_equal(adapter.indices[...], indices)
    np.testing.assert_allclose(adapter.u[...][1, :, 1], u[1, :, 7], atol=1e-6)
    np.testing.assert_allclose(adapter.s[...][0], s[0][np.array([9, 2, 11, 5])], atol=1e-6)
    np.testing.assert_allclose(adapter.vh[...][0, 3], vh[0, 5], atol=1e-6)
    adapter.rot_in.value = 0.4 * jnp.ones_like(adapter.rot_in[...])
    np.testing.assert_allclose(merge_adapters(model)(x), model(x), atol=1e-5)
    set_alpha(model, 0.0)
    np.testing.assert_array_equal(model(x), host(x))
    with pytest.raises(ValueError, match="repeat a singular dim"):
        rebase(adapter, jnp.array([[1, 1, 2, 3], [0, 1, 2, 3]]))
    with pytest.raises(ValueError, match="the adapter needs"):
        rebase(adapter, jnp.array([1, 2, 3, 4]))
    with pytest.raises(ValueError, match=r"must lie in \[0, 12\)"):
        rebase(adapter, jnp.array([[1, 2, 3, 12], [0, 1, 2, 3]]))


def adapted_linear(r=6):
    host = Host(nnx.Linear(16, 12, rngs=nnx.Rngs(0)))
    variant = AntiPaSTOConfig(r=r, block_size=2, rotate="both")
    model = apply_adapters(host, AdapterConfig(rules=(Rule(pattern="layer", variant=variant),)))
    [(_, adapter)] = list(iter_adapters(model))
    return host, model, adapter


def planted_batches(u, signs, n_batches=2, seed=0):
    """(B, T, 16) batches: noise plus 4 * u[:, 10] * sign[b] plus 3 * u[:, 8] on every row."""
    out = []
    for i in range(n_batches):
        noise = 0.05 * jax.random.normal(jax.random.key(seed + i), (len(signs), 3, 16))
        side = jnp.asarray(signs, jnp.float32).reshape(-1, 1, 1)
        out.append(noise + 4.0 * side * u[None, None, :, 10] + 3.0 * u[None, None, :, 8])
    return out


def test_select_dimensions_wanda_end_to_end():
    host, model, adapter = adapted_linear()
    u = full_svd(adapter)[0]
    batches = planted_batches(u, [1, 1, -1, 1])
    x = batches[0]
    got = select_dimensions(model, batches, method="wanda")
    picked = np.asarray(got["layer"]).tolist()
    assert {8, 10} <= set(picked) and picked == sorted(picked)
    np.testing.assert_array_equal(adapter.indices[...], got["layer"])
    set_alpha(model, 0.0)
    np.testing.assert_array_equal(model(x), host(x))


def test_select_dimensions_l1_trip_interleaved_pairs():
    """Pairs differ along u_10 (chosen +, rejected -); u_8 is shared. A third batch with a
    huge u_11 component changes nothing when the mask marks it as padding."""
    host, model, adapter = adapted_linear()
    u = full_svd(adapter)[0]
    batches = planted_batches(u, [1, -1, 1, -1])
    polluted = batches[0] + 100.0 * u[None, None, :, 11]
    masks = [jnp.ones((4, 3)), jnp.ones((4, 3)), jnp.zeros((4, 3))]
    data = list(zip([*batches, polluted], masks, strict=True))
    select = lambda m, d: select_dimensions(m, d, method="l1_trip", forward=lambda m, b: m(b[0]), mask=lambda b: b[1])
    got = np.asarray(select(model, data)["layer"])
    assert {8, 10} <= set(got.tolist())
    _, clean_model, _ = adapted_linear()
    np.testing.assert_array_equal(np.asarray(select(clean_model, data[:2])["layer"]), got)
    _, unmasked_model, _ = adapted_linear()
    unmasked = select(unmasked_model, [(b, jnp.ones((4, 3))) for b, _ in data])["layer"]
    assert 11 in np.asarray(unmasked).tolist()  # the mask is what kept u_11 out
    # polarity interleave: the mean chosen-minus-rejected projection alternates in sign
    x = jnp.concatenate(batches)
    proj = (x @ u).reshape(-1, 2, 3, u.shape[-1])  # (pairs, side, tokens, k)
    diff = np.asarray((proj[:, 0] - proj[:, 1]).mean(axis=(0, 1)))
    assert (diff[got] >= 0).tolist()[:4] == [True, False, True, False]
    np.testing.assert_array_equal(adapter.indices[...], got)
    np.testing.assert_allclose(merge_adapters(model)(x), model(x), atol=1e-5)
    set_alpha(model, 0.0)
    np.testing.assert_array_equal(model(x), host(x))


def test_select_dimensions_errors():
    _, model, adapter = adapted_linear()
    batches = planted_batches(full_svd(adapter)[0], [1, -1, 1])
    with pytest.raises(ValueError, match="unknown method='pca'"):
        select_dimensions(model, batches, method="pca")
    with pytest.raises(ValueError, match="no AntiPaSTO adapter matches"):
        select_dimensions(model, batches, pattern="nothing")
    with pytest.raises(ValueError, match="pass an even batch"):
        select_dimensions(model, batches, method="l1_trip")


@pytest.mark.parametrize(("layout", "method"), [("moe_EBD_EDF", "wanda"), ("per_head_BTNH_NHK", "l1_trip")])
def test_select_dimensions_on_kernel_batch_layouts(layout, method):
    """One index set per kernel-batch matrix (experts, heads); the adapter stays exact."""
    layer, x = {lay.name: lay for lay in LAYOUTS}[layout].build(0)
    x = x[:2] if method == "l1_trip" else x  # one chosen/rejected pair
    host = Host(layer)
    variant = AntiPaSTOConfig(r=4, block_size=2, rotate="both")
    model = apply_adapters(host, AdapterConfig(rules=(Rule(pattern="layer", variant=variant),)))
    got = select_dimensions(model, [x], method=method)["layer"]
    [(_, adapter)] = list(iter_adapters(model))
    assert got.shape == adapter.indices.shape == (*adapter.spec.batch_shape, 4)
    np.testing.assert_allclose(merge_adapters(model)(x), model(x), atol=1e-5)
    set_alpha(model, 0.0)
    np.testing.assert_array_equal(model(x), host(x))


def test_select_dimensions_on_tiny_qwen3_with_padding():
    """The reference model: o_proj (Einsum BTNH,NHD) and down_proj (Linear), pairs on the
    batch axis, a (B, T) attention mask; alpha=0 logits stay the base logits."""
    base = Qwen3(tiny_config(), rngs=nnx.Rngs(1))
    variant = AntiPaSTOConfig(r=8, block_size=4)
    model = apply_adapters(base, AdapterConfig(rules=(Rule(pattern="o_proj|down_proj", variant=variant),)))
    tokens = jax.random.randint(jax.random.key(0), (4, 6), 0, 259)
    mask = jnp.ones((4, 6), bool).at[1, 4:].set(False).at[3, 5:].set(False)
    got = select_dimensions(
        model, [(tokens, mask)], method="l1_trip", forward=lambda m, b: m(b[0], b[1]), mask=lambda b: b[1]
    )
    assert sorted(got) == [f"layers.{i}.{n}" for i in range(2) for n in ("attn.o_proj", "mlp.down_proj")]
    for path, adapter in iter_adapters(model):
        assert len(set(np.asarray(got[path]).tolist())) == 8
        np.testing.assert_array_equal(adapter.indices[...], got[path])
    set_alpha(model, 0.0)
    np.testing.assert_array_equal(model(tokens, mask), base(tokens, mask))
