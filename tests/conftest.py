"""Shared test setup. Implicit rank promotion raises, so a broadcasting bug cannot hide."""

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_default_matmul_precision", "highest")
