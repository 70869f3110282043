"""Shared test setup. Implicit rank promotion raises, so a broadcasting bug cannot hide.

Fixtures: ``register_view`` registers views for one test only (the registry is global:
a registration left behind would change what later tests see)."""

import sys

import jax
import pytest

import lora_jax as lj

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture
def register_view():
    """``lj.register_view`` whose registrations are undone when the test ends."""
    registry = sys.modules[lj.register_view.__module__]._USER_VIEWS
    saved = dict(registry)
    yield lj.register_view
    registry.clear()
    registry.update(saved)
