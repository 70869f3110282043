"""lora_jax.linalg: randomized SVD against the full SVD, rank-deficient kernels, LQ."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from helpers import rel_err

from lora_jax import linalg


def test_randomized_svd_top_r_error_matches_full_svd():
    m = jax.random.normal(jax.random.key(0), (2, 64, 48))  # flat spectrum: the hard case
    full = linalg.svd_error(m, *linalg.top_r_svd(m, 8))
    approx = linalg.svd_error(m, *linalg.randomized_svd(m, 8, niter=4, key=jax.random.key(1)))
    assert np.all(np.asarray(approx - full) < 1e-3), (approx, full)
    no_power = linalg.svd_error(m, *linalg.randomized_svd(m, 8, niter=0, key=jax.random.key(1)))
    assert np.all(np.asarray(no_power - full) > 1e-3)  # the power iterations are what close the gap
    wide = linalg.svd_error(m, *linalg.randomized_svd(m, 8, niter=0, oversample=24, key=jax.random.key(1)))
    assert np.all(np.asarray(wide) < np.asarray(no_power))  # and so does a wider sketch


def test_randomized_svd_of_rank_deficient_kernels_is_finite_and_exact():
    k1, k2 = jax.random.split(jax.random.key(0))
    rank_two = jax.random.normal(k1, (64, 2)) @ jax.random.normal(k2, (2, 48))
    for m in (jnp.zeros((64, 48)), rank_two):  # zero pivots in the LU renormalization
        u, s, vh = linalg.randomized_svd(m, 4, niter=4, key=jax.random.key(1))
        assert all(bool(jnp.isfinite(t).all()) for t in (u, s, vh))
        np.testing.assert_allclose((u * s[None, :]) @ vh, m, atol=1e-4)
        np.testing.assert_allclose(u.T @ u, np.eye(4), atol=1e-5)  # orthonormal even past the rank


def test_lq_and_full_rank_svd_reconstruct():
    m = jax.random.normal(jax.random.key(0), (3, 7, 5))
    low, q = linalg.lq(m)
    assert rel_err(low @ q, m) < 1e-6
    np.testing.assert_allclose(q @ jnp.swapaxes(q, -1, -2), np.broadcast_to(np.eye(5), (3, 5, 5)), atol=1e-6)
    assert np.all(np.asarray(linalg.svd_error(m, *linalg.top_r_svd(m, 5))) < 1e-6)
