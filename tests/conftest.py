"""Shared test setup. Implicit rank promotion raises, so a broadcasting bug cannot hide.

Fixtures: ``register_view`` registers views for one test only (the registry is global:
a registration left behind would change what later tests see)."""

import contextlib

import jax
import pytest

import lora_jax as lj

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture
def register_view():
    """``lj.register_view`` whose registrations are undone when the test ends."""
    registered = []

    def register(module_type, describe):
        lj.register_view(module_type, describe)
        registered.append(module_type)

    yield register
    for module_type in dict.fromkeys(registered):
        with contextlib.suppress(KeyError):  # the test may have unregistered it itself
            lj.views.unregister_view(module_type)
