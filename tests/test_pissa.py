"""PiSSA: the factors are the kernel's principal part (full and randomized SVD), the residual
init and forward equal PEFT's, and it converts to a plain LoRA. (Identity, alpha=0, merge and
training are in tests/test_contract.py; what every low-rank variant shares is in
tests/test_lowrank.py.)"""

from __future__ import annotations

import jax.numpy as jnp
import pytest
from helpers import adapt, check_to_lora, rel_err
from layers import LAYOUT_IDS, LAYOUTS
from peft_helpers import check_residual_init_matches_peft, peft_pair, t2j

from lora_jax import PiSSAConfig

PISSA = PiSSAConfig(r=2, lora_alpha=4.0)


@pytest.mark.parametrize("layout", LAYOUTS[::2], ids=LAYOUT_IDS[::2])
@pytest.mark.parametrize("niter", [None, 4])
def test_pissa_factors_are_the_principal_part(layout, niter):
    layer, _ = layout.build()
    model = adapt(layer, PiSSAConfig(r=2, lora_alpha=4.0, niter=niter))
    adapter = model.layer
    w = adapter.spec.kernel_to_matrix(layer.kernel[...])
    top = adapter.config.scale * (adapter.base_a[...] @ adapter.base_b[...])
    tail = jnp.linalg.svd(w, compute_uv=False)[..., 2:]
    # W_res = W - s A0 B0 holds exactly the singular values PiSSA left out.
    tol = 1e-5 if niter is None else 2e-2
    assert rel_err(jnp.linalg.norm(w - top, axis=(-2, -1)), jnp.linalg.norm(tail, axis=-1)) < tol
    full = adapt(layer, PiSSAConfig(r=min(adapter.spec.d_in, adapter.spec.d_out), niter=niter)).layer
    assert rel_err(full.config.scale * (full.base_a[...] @ full.base_b[...]), w) < 1e-5  # W_res + s B A == W


@pytest.mark.parametrize("layout", LAYOUTS[::3], ids=LAYOUT_IDS[::3])
def test_to_lora_gives_the_same_layer(layout):
    check_to_lora(PISSA, layout)


def test_residual_init_and_forward_match_peft():
    check_residual_init_matches_peft("pissa", PISSA)


def test_pissa_randomized_init_finds_peft_principal_part():
    import peft

    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["proj"], init_lora_weights="pissa_niter_16")
    model, theirs, _ = peft_pair(config, PiSSAConfig(r=2, lora_alpha=4.0, niter=16))
    ours = model.layer.base_a[...] @ model.layer.base_b[...]
    their_top = t2j(theirs.lora_B["default"].weight @ theirs.lora_A["default"].weight).T
    assert rel_err(ours, their_top) < 1e-3  # both approximate the same top-2 part


def test_bad_options():
    with pytest.raises(ValueError, match=r"pissa: niter=-1 must be None \(full SVD\) or an integer >= 0"):
        PiSSAConfig(niter=-1)
    with pytest.raises(ValueError, match=r"pissa: oversample=-2 must be an integer >= 0"):
        PiSSAConfig(niter=2, oversample=-2)
