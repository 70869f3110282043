"""collect_statistics: recorded rows equal the layer inputs computed by hand, masks drop
padding rows, the caller's model is untouched, bad input raises a clear error."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import Wrap

from lora_jax import AdapterConfig, LoRAConfig, Rule, apply_adapters
from lora_jax.calibrate import collect_statistics
from tests.layers import LAYOUT_IDS, LAYOUTS


def _sums_init(target):
    spec = target.spec
    return {"sum": jnp.zeros((*spec.batch_shape, spec.d_in)), "count": jnp.zeros(()), "calls": jnp.zeros((), jnp.int32)}


def _sums_update(stat, rows, mask):
    return {
        "sum": stat["sum"] + jnp.einsum("...nd,n->...d", rows, mask),
        "count": stat["count"] + mask.sum(),
        "calls": stat["calls"] + 1,
    }


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.up = nnx.Linear(6, 10, rngs=rngs)
        self.down = nnx.Linear(10, 4, rngs=rngs)

    def __call__(self, x):
        return self.down(jax.nn.relu(self.up(x)))


def _batches(n, shape, seed=0):
    keys = jax.random.split(jax.random.key(seed), n)
    return [jax.random.normal(k, shape) for k in keys]


def test_mean_of_rows_matches_numpy_with_padding_mask():
    model = MLP(nnx.Rngs(0))
    batches = _batches(3, (2, 5, 6))
    masks = [np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.float32)] * 3
    lookup = {id(b): m for b, m in zip(batches, masks, strict=True)}
    stats = collect_statistics(
        model, batches, paths=["up", "down"], init=_sums_init, update=_sums_update, mask=lambda b: lookup[id(b)]
    )
    xs = np.concatenate([np.asarray(b)[m > 0] for b, m in zip(batches, masks, strict=True)])
    hidden = np.asarray(jax.nn.relu(model.up(jnp.asarray(xs))))
    for path, rows in (("up", xs), ("down", hidden)):
        s = stats[path]
        assert int(s["calls"]) == 3
        assert float(s["count"]) == len(rows) == 24
        np.testing.assert_allclose(np.asarray(s["sum"]) / float(s["count"]), rows.mean(0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_rows_are_the_kernel_matrix_inputs(layout):
    layer, x = layout.build(seed=1)

    model = Wrap(layer)
    stats = collect_statistics(model, [x, 2 * x], paths=["layer"], init=_sums_init, update=_sums_update)
    from lora_jax.views import spec_of, view_of

    spec = spec_of(layer, view_of(layer))
    rows = np.asarray(spec.in_to_matrix(x)).reshape(*spec.batch_shape, -1, spec.d_in)
    np.testing.assert_allclose(np.asarray(stats["layer"]["sum"]), 3 * rows.sum(-2), rtol=1e-5, atol=1e-5)
    assert float(stats["layer"]["count"]) == 2 * rows.shape[-2]


def test_caller_model_untouched_and_adapters_recorded():
    model = MLP(nnx.Rngs(0))
    adapted = apply_adapters(model, AdapterConfig(rules=(Rule(pattern="down", variant=LoRAConfig(r=2)),)))
    before = jax.tree.map(np.asarray, nnx.state(adapted))
    stats = collect_statistics(adapted, _batches(2, (3, 6)), paths=["down"], init=_sums_init, update=_sums_update)
    assert float(stats["down"]["count"]) == 6
    after = jax.tree.map(np.asarray, nnx.state(adapted))
    jax.tree.map(np.testing.assert_array_equal, before, after)
    assert type(adapted.down).__name__ == "LoRA" and isinstance(adapted.up, nnx.Linear)


def test_until_stops_early():
    seen = []

    def until(stats):
        seen.append(int(stats["up"]["calls"]))
        return len(seen) == 2

    stats = collect_statistics(
        MLP(nnx.Rngs(0)), _batches(5, (3, 6)), paths=["up"], init=_sums_init, update=_sums_update, until=until
    )
    assert seen == [1, 2] and int(stats["up"]["calls"]) == 2


def test_non_finite_statistics_name_the_layers():
    model = MLP(nnx.Rngs(0))
    batches = _batches(2, (3, 6))
    batches[1] = batches[1].at[0, 2].set(jnp.nan)
    kw = dict(paths=["up", "down"], init=_sums_init, update=_sums_update)
    with pytest.raises(ValueError, match=r"non-finite activations .* layer\(s\) \['up', 'down'\]"):
        collect_statistics(model, batches, **kw)
    stats = collect_statistics(model, batches, check_finite=False, **kw)
    assert np.isnan(np.asarray(stats["up"]["sum"])).any()


def test_errors():
    model = MLP(nnx.Rngs(0))
    kw = dict(init=_sums_init, update=_sums_update)
    with pytest.raises(ValueError, match="no calibration data"):
        collect_statistics(model, [], paths=["up"], **kw)
    with pytest.raises(ValueError, match="no module at path"):
        collect_statistics(model, _batches(1, (3, 6)), paths=["nope"], **kw)
    with pytest.raises(ValueError, match="paths is empty"):
        collect_statistics(model, _batches(1, (3, 6)), paths=[], **kw)
    with pytest.raises(ValueError, match="not an adaptable layer"):
        collect_statistics(nnx.Sequential(MLP(nnx.Rngs(0))), _batches(1, (3, 6)), paths=["layers.0"], **kw)
    with pytest.raises(ValueError, match=r"the mask has shape \(4,\)"):
        collect_statistics(model, _batches(1, (3, 6)), paths=["up"], mask=lambda b: jnp.ones(4), **kw)


def test_conv_and_embed_layers_are_refused():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(9, 6, rngs=rngs)
            self.conv = nnx.Conv(6, 4, (3,), rngs=rngs)

        def __call__(self, ids):
            return self.conv(self.embed(ids))

    adapted = apply_adapters(Net(nnx.Rngs(0)), AdapterConfig(rules=(Rule(pattern="conv", variant=LoRAConfig(r=2)),)))
    ids = [jnp.zeros((2, 5), jnp.int32)]
    kw = dict(init=_sums_init, update=_sums_update)
    with pytest.raises(ValueError, match="'conv' is a layer of kind 'conv'; input statistics are collected for einsum"):
        collect_statistics(adapted, ids, paths=["conv"], **kw)
    with pytest.raises(ValueError, match="'embed' is a layer of kind 'embed'"):
        collect_statistics(adapted, ids, paths=["embed"], **kw)
