"""IA3, IA3-FF, HRA and ROAD on the layouts of tests/layers.py: alpha=-1 is the exact
inverse of alpha=+1, and one alpha per row equals separate scalar runs. (Identity, alpha=0,
merge and training are in tests/test_contract.py.) Adapter weights are moved off their
init first, so nothing here passes by the adapter being a no-op."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import Wrap, adapt, perturb
from layers import LAYOUTS

from lora_jax import (
    AdapterConfig,
    AdapterParam,
    HRAConfig,
    IA3Config,
    IA3FFConfig,
    ROADConfig,
    Rule,
    apply_adapters,
    merge_adapters,
    set_alpha,
)

CONFIGS = {
    "ia3": IA3Config(),
    "ia3_ff": IA3FFConfig(),
    "hra": HRAConfig(r=4),
    "road_1": ROADConfig(kind="road_1", group_size=2),
    "road_2": ROADConfig(kind="road_2", group_size=2),
    "road_4": ROADConfig(kind="road_4", group_size=2),
}


def adapted(layout, variant, seed=0):
    base, x = layout.build(seed)
    return Wrap(base), adapt(base, variant), x


def close(a, b, tol=2e-5):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol * float(jnp.abs(b).max()))


# The contract already checks merge == forward at alpha = +-1 on every layout; these four
# cover each kind of axis (plain, output-only N, packed outputs before the rows, experts).
SOME = [lo for lo in LAYOUTS if lo.name in ("linear", "q_BTD_NDH", "kv_packed", "moe_EBD_EDF")]
CASES = [(lo, n) for n in CONFIGS for lo in SOME]


@pytest.mark.parametrize(("layout", "name"), CASES, ids=[f"{lo.name}-{n}" for lo, n in CASES])
def test_alpha_minus_one_undoes_alpha_one(layout, name):
    """The adapter at alpha=-1 on top of the same layer merged at alpha=+1 is the base."""
    base, model, x = adapted(layout, CONFIGS[name])
    y0 = base(x)
    perturb(model, 0.3, seed=1)
    merged = merge_adapters(model)
    assert float(jnp.abs(merged(x) - y0).max()) > 1e-3, "perturbed adapter should change the output"
    undo = apply_adapters(merged, AdapterConfig(rules=(Rule(pattern="layer", variant=CONFIGS[name]),)))
    nnx.update(undo, nnx.state(model, AdapterParam))
    set_alpha(undo, -1.0)
    close(undo(x), y0, 1e-4)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("layout", SOME[:3], ids=lambda lo: lo.name)
def test_per_row_alpha_matches_scalar_runs(layout, name):
    _, model, x = adapted(layout, CONFIGS[name])
    perturb(model, 0.3, seed=1)
    alphas = jnp.array([0.7, 0.0, -1.3])
    set_alpha(model, alphas)
    y = nnx.jit(lambda m, v: m(v))(model, x)
    row_axis = 1 if layout.name == "kv_packed" else 0  # CBSKH: the batch rows are axis 1
    for i, a in enumerate(alphas):
        set_alpha(model, a)
        close(jnp.take(y, i, axis=row_axis), jnp.take(model(x), i, axis=row_axis))


def test_configs_round_trip_through_json():
    """ROAD's option is ``kind``, not ``variant``: the JSON key ``variant`` names the method."""
    cfg = AdapterConfig(rules=tuple(Rule(pattern=name, variant=v) for name, v in CONFIGS.items()))
    assert AdapterConfig.from_json(cfg.to_json()) == cfg
