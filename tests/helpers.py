"""Helpers shared by the test files: a one-layer host module, adapting it, moving adapter
weights off their init, relative errors. Import them (``from helpers import ...``); tests/
is on sys.path under pytest's rootdir-relative imports, like tests/layers.py."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

import lora_jax as lj


class Wrap(nnx.Module):
    """Holds one layer at the path ``layer`` and calls it: the smallest model to adapt."""

    def __init__(self, layer: nnx.Module):
        self.layer = layer

    def __call__(self, x):
        return self.layer(x)


def adapt(layer: nnx.Module, variant: lj.VariantConfig, pattern: str = "layer") -> Wrap:
    """``layer`` wrapped and adapted with one rule of ``variant``."""
    return lj.apply_adapters(Wrap(layer), lj.AdapterConfig(rules=(lj.Rule(pattern=pattern, variant=variant),)))


def perturb(model: nnx.Module, scale: float, seed: int) -> None:
    """Move every trainable adapter leaf away from its init (in place), as training would:
    each leaf plus ``scale`` times its own standard normal draw from ``seed``."""
    state = nnx.state(model, lj.AdapterParam)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    moved = [leaf + scale * jax.random.normal(k, leaf.shape, leaf.dtype) for leaf, k in zip(leaves, keys, strict=True)]
    nnx.update(model, jax.tree.unflatten(treedef, moved))


def rel_err(a, b) -> float:
    """Frobenius-norm relative error ||a - b|| / ||b|| in float64 (an exact 0 == 0 is 0)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def max_rel_err(a, b) -> float:
    """Largest elementwise error over the largest magnitude of ``b``, in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def check_to_lora(variant: lj.VariantConfig, layout) -> None:
    """A residual-init variant (PiSSA, OLoRA), trained and at alpha 0.6, converts to a plain
    LoRA of twice its rank with the same output and the same merged kernel."""
    layer, x = layout.build()
    model = adapt(layer, variant)
    perturb(model, 0.3, seed=1)
    lj.set_alpha(model, 0.6)
    lora = lj.to_lora(model.layer)
    assert lora.lora_a.shape[-1] == 2 * variant.r
    assert rel_err(lora(x), model(x)) < 1e-5
    kernel = model.layer.spec.kernel_to_matrix(layer.kernel[...])
    assert rel_err(lora.merged(kernel, None)[0], model.layer.merged(kernel, None)[0]) < 1e-5
