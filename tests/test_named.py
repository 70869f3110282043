"""Named adapters on one base: add / activate / delete / save / restore by name, training
only the active ones, mixed-adapter batches (each row alone, exactly), hot-swap without
tracing again, and batched generation with one adapter and alpha per row."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lora_jax import (
    AdapterConfig,
    AdapterParam,
    AntiPaSTOConfig,
    DeLoRAConfig,
    DoRAConfig,
    HRAConfig,
    IA3Config,
    IA3FFConfig,
    LoRAConfig,
    OLoRAConfig,
    PiSSAConfig,
    ROADConfig,
    Rule,
    apply_adapters,
    checkpoint,
    merge_adapters,
    named,
    set_alpha,
)
from lora_jax.models import Qwen3, generate, generate_scored, tiny_config
from lora_jax.models import qwen3 as qwen3_module
from lora_jax.peft_format import export_peft


class Net(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.up = nnx.Linear(16, 24, rngs=rngs)
        self.down = nnx.Linear(24, 16, rngs=rngs)

    def __call__(self, x):
        return self.down(jax.nn.gelu(self.up(x)))


def cfg(variant, pattern="up|down", seed=0):
    return AdapterConfig(rules=(Rule(pattern=pattern, variant=variant),), seed=seed)


def randomize(model, seed):
    """Trained-looking weights: B = 0 at init would hide every routing mistake."""
    state = nnx.state(model, (AdapterParam, named.Parked))
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    new = [v + 0.3 * jax.random.normal(k, v.shape, v.dtype) for v, k in zip(leaves, keys, strict=True)]
    nnx.update(model, jax.tree.unflatten(treedef, new))


forward = nnx.jit(lambda m, x: m(x))
X = jax.random.normal(jax.random.key(1), (6, 5, 16))


@pytest.fixture(scope="module")
def base():
    return Net(nnx.Rngs(0))


def three_loras(base):
    model = base
    for i, name in enumerate(("a", "b", "c")):
        model = named.add(model, name, cfg(LoRAConfig(r=4), seed=i))
    randomize(model, 3)
    return model


# -- names -------------------------------------------------------------------------------
def test_apply_adapters_model_keeps_its_adapter_as_default(base):
    plain = apply_adapters(base, cfg(LoRAConfig(r=4)))
    randomize(plain, 1)
    model = named.add(plain, "extra", cfg(LoRAConfig(r=2), pattern="up"), active=False)
    assert named.names(model) == ["default", "extra"] and named.active(model) == ["default"]
    assert type(plain.up).__name__ == "LoRA"  # the caller's model is untouched
    np.testing.assert_array_equal(forward(model, X), forward(plain, X))
    assert model.up.kernel.shape == (16, 24)  # read-through to the base layer


def test_plain_mode_chains_the_active_adapters(base):
    model = three_loras(base)
    named.deactivate(model, "b", "c")
    np.testing.assert_array_equal(forward(model, X), forward(named.only(model, "a"), X))
    named.activate(model, "b")
    assert named.active(model) == ["a", "b"]
    y = forward(model, X)
    # two LoRAs on one layer add their deltas (PEFT's combination of active adapters)
    only_a, only_b = named.only(model, "a"), named.only(model, "b")
    up = lambda m: m.up(X)
    np.testing.assert_allclose(up(model), up(only_a) + up(only_b) - base.up(X), rtol=1e-5, atol=1e-5)
    assert not np.allclose(y, forward(only_a, X))
    assert named.set_alpha(model, "a", 0.0) == 2  # layers set; alpha 0 is an exact no-op
    np.testing.assert_array_equal(forward(model, X), forward(only_b, X))
    named.set_alpha(model, "a", 1.0)
    named.deactivate(model, "a", "b")
    np.testing.assert_array_equal(forward(model, X), forward(base, X))


def test_only_active_adapters_train(base):
    model = three_loras(base)
    named.deactivate(model, "b")
    before = nnx.to_pure_dict(nnx.state(model))
    kernels = [np.asarray(model.up.base.kernel[...]), np.asarray(model.down.base.kernel[...])]
    optimizer = nnx.Optimizer(model, optax.adamw(1e-2, weight_decay=0.1), wrt=AdapterParam)

    @nnx.jit
    def step(model, optimizer):
        grads = nnx.grad(lambda m: jnp.mean(m(X) ** 2), argnums=nnx.DiffState(0, AdapterParam))(model)
        optimizer.update(model, grads)

    step(model, optimizer)
    after = nnx.to_pure_dict(nnx.state(model))
    for layer in ("up", "down"):
        for name in ("a", "c"):
            trained = after[layer]["adapters"][name]["lora_a"]
            assert not np.array_equal(trained, before[layer]["adapters"][name]["lora_a"])
        for leaf in ("lora_a", "lora_b"):
            np.testing.assert_array_equal(after[layer]["adapters"]["b"][leaf], before[layer]["adapters"]["b"][leaf])
    np.testing.assert_array_equal(model.up.base.kernel[...], kernels[0])
    np.testing.assert_array_equal(model.down.base.kernel[...], kernels[1])
    named.activate(model, "b")  # trainable again, with its own type back
    assert type(model.up.adapters["b"].lora_a) is AdapterParam


def test_delete(base):
    model = three_loras(base)
    model = named.add(model, "d", cfg(IA3Config(), pattern="down"))
    fewer = named.delete(model, "a")
    assert named.names(fewer) == ["b", "c", "d"] and "a" in named.names(model)
    bare = fewer
    for name in ("b", "c", "d"):
        bare = named.delete(bare, name)
    assert type(bare.up) is nnx.Linear and type(bare.down) is nnx.Linear
    np.testing.assert_array_equal(forward(bare, X), forward(base, X))


def test_names_keep_the_order_of_addition_across_layers(base):
    model = named.add(base, "first", cfg(LoRAConfig(r=2), pattern="up"))
    model = named.add(model, "second", cfg(LoRAConfig(r=2), pattern="down"))  # "down" comes first in the graph
    assert named.names(model) == ["first", "second"] == named.active(model)


def test_bad_names_and_routes_are_refused(base):
    model = three_loras(base)
    with pytest.raises(ValueError, match="already has an adapter named 'a'"):
        named.add(model, "a", cfg(LoRAConfig(r=2)))
    with pytest.raises(ValueError, match="must be a string of letters"):
        named.add(model, "a.b", cfg(LoRAConfig(r=2)))
    with pytest.raises(KeyError, match=r"no adapter named \['zz'\]"):
        named.activate(model, "zz")
    with pytest.raises(KeyError, match=r"route: no adapter named \['q'\]"):
        named.route(model, ["a", "q"])
    with pytest.raises(ValueError, match="route alpha has 3 values for 2 rows"):
        named.route(model, ["a", "b"], alpha=[1.0, 2.0, 3.0])
    named.route(model, ["a", "b"])
    with pytest.raises(ValueError, match="the route has 2 rows but the input has 6"):
        model(X)
    with pytest.raises(TypeError, match="needs an AdapterConfig"):
        named.add(model, "e", LoRAConfig(r=2))


def test_single_adapter_services_refuse_a_named_model(base, tmp_path):
    model = three_loras(base)
    for call, what in [
        (lambda: merge_adapters(model), "merge_adapters"),
        (lambda: apply_adapters(model, cfg(LoRAConfig(r=2))), "apply_adapters"),
        (lambda: checkpoint.save(tmp_path / "c", model), "checkpoint.save"),
    ]:
        with pytest.raises(ValueError, match=rf"{what} got a model with named adapters .*named.only"):
            call()
    assert not (tmp_path / "c").exists()
    merged = merge_adapters(named.only(model, "a"))  # the way to merge one name
    np.testing.assert_allclose(forward(merged, X), forward(named.only(model, "a"), X), rtol=1e-5, atol=1e-5)


def test_a_routed_batch_refuses_dropout_in_training(base):
    model = named.add(base, "drop", cfg(LoRAConfig(r=2, dropout=0.1)))
    named.route(model, ["drop"] * 6)
    with pytest.raises(ValueError, match="has dropout 0.1, which a routed batch does not apply"):
        model(X)
    model.eval()
    np.testing.assert_array_equal(model(X), named.only(model, "drop")(X))


# -- files --------------------------------------------------------------------------------
def test_save_and_restore_by_name_and_all(base, tmp_path):
    model = three_loras(base)
    model = named.add(model, "steer", cfg(AntiPaSTOConfig(r=4, block_size=2), pattern="down"))
    randomize(model, 5)
    named.deactivate(model, "b")
    named.save(tmp_path / "one", model, "steer")
    restored = named.restore(tmp_path / "one", base, "steer")
    np.testing.assert_array_equal(forward(restored, X), forward(named.only(model, "steer"), X))

    named.save(tmp_path / "all", model)
    again = named.restore(tmp_path / "all", base)
    assert named.names(again) == named.names(model) and named.active(again) == named.active(model)
    rows = ["a", "b", "c", "steer", None, "a"]
    for m in (model, again):
        named.route(m, rows, alpha=[1.0, 1.0, -1.0, 0.5, 1.0, 2.0])
    np.testing.assert_array_equal(forward(again, X), forward(model, X))
    with pytest.raises(checkpoint.CheckpointError, match="not a save of every name"):
        named.restore(tmp_path / "one", base)


def test_import_peft_into_a_name(base, tmp_path):
    model = three_loras(base)
    hf_name = lambda path: path
    export_peft(tmp_path / "peft", named.only(model, "b"), hf_name=hf_name)
    imported = named.import_peft(tmp_path / "peft", model, "b2", hf_name=hf_name)
    assert named.names(imported) == ["a", "b", "c", "b2"]
    np.testing.assert_allclose(
        forward(named.only(imported, "b2"), X), forward(named.only(model, "b"), X), rtol=1e-6, atol=1e-6
    )


# -- mixed batches ------------------------------------------------------------------------
VARIANTS = {
    "lora": LoRAConfig(r=4),
    "olora": OLoRAConfig(r=4),
    "pissa": PiSSAConfig(r=4),
    "delora": DeLoRAConfig(r=4),
    "hra": HRAConfig(r=4),
    "road": ROADConfig(group_size=4),
    "ia3": IA3Config(),
    "ia3_ff": IA3FFConfig(),
    "dora": DoRAConfig(r=4),
    "antipasto": AntiPaSTOConfig(r=4, block_size=2),
}
# Row b of a mixed batch runs the same program as its adapter alone on row b alone, under
# jax.vmap over rows. For matmuls XLA keeps each row's arithmetic, so the results are
# bit-identical. DoRA's column norm of the adapted kernel and AntiPaSTO's Cayley solve are
# per-row matrix computations here (each row gathers its own weights), and XLA's batched
# reduction / batched LU round differently from the single one: agreement to a few ulps.
ROUNDING = {"dora": 2e-6, "antipasto": 2e-6}
# IA3-FF is bit-exact at XLA's default optimization level; at backend optimization level 0
# (what scripts/test.sh compiles with, for speed) the batched program rounds the gated input
# differently from the single one (seen: 4.8e-7).
if "--xla_backend_optimization_level=0" in os.environ.get("XLA_FLAGS", ""):
    ROUNDING["ia3_ff"] = 1e-6


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_mixed_batch_equals_each_row_alone(base, variant):
    model = base
    for i, name in enumerate(("a", "b", "c")):
        model = named.add(model, name, cfg(VARIANTS[variant], seed=i))
    model = named.add(model, "lora2", cfg(LoRAConfig(r=2), pattern="up"))  # a second group, other layers
    randomize(model, 3)
    rows, alphas = ["a", None, "b", "c", "lora2", "a"], [1.0, 0.7, -1.0, 0.5, 2.0, 0.0]
    named.route(model, rows, alpha=alphas)
    y = forward(model, X)
    for b, (name, alpha) in enumerate(zip(rows, alphas, strict=True)):
        alone = base
        if name is not None:
            alone = named.only(model, name)
            set_alpha(alone, alpha)
        want = forward(alone, X[b : b + 1])[0]
        tol = ROUNDING.get(variant, 0.0)
        np.testing.assert_allclose(y[b], want, rtol=tol, atol=tol, err_msg=f"row {b} ({name}, alpha {alpha})")


def test_changing_the_route_does_not_trace_again(base):
    model = three_loras(base)
    traces = []

    @nnx.jit
    def run(m, x):
        traces.append(1)
        return m(x)

    named.route(model, ["a", "b", "c", None, "a", "b"])
    first = run(model, X)
    named.route(model, ["c", "c", "a", "b", None, None], alpha=-1.0)
    second = run(model, X)
    assert len(traces) == 1
    assert not np.allclose(first, second)
    named.unroute(model)
    np.testing.assert_array_equal(run(model, X), forward(model, X))  # plain mode: a + b + c
    assert len(traces) == 2


# -- hot-swap -----------------------------------------------------------------------------
def test_hot_swap_loads_weights_without_tracing_again(base, tmp_path):
    model = three_loras(base)
    donor = named.add(base, "new", cfg(LoRAConfig(r=2, lora_alpha=4.0), seed=9))  # lower rank: padded
    randomize(donor, 11)
    named.save(tmp_path / "ckpt", donor, "new")
    hf_name = lambda path: path
    export_peft(tmp_path / "peft", named.only(donor, "new"), hf_name=hf_name)
    traces = []

    @nnx.jit
    def run(m, x):
        traces.append(1)
        return m(x)

    named.route(model, ["a", "b", "c", None, "b", "a"], alpha=[1.0, 0.5, 1.0, 1.0, -1.0, 2.0])
    before = run(model, X)
    for source in (tmp_path / "ckpt", tmp_path / "peft"):
        named.load(model, "b", source, hf_name=hf_name)
        y = run(model, X)
        # the rank zero-padded and lora_alpha / r folded into B: equal up to rounding
        np.testing.assert_allclose(y[1], _at(donor, X[1:2], 0.5), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(y[4], _at(donor, X[4:5], -1.0), rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(y[0], before[0])  # the other slots are untouched
    assert len(traces) == 1 and not np.allclose(y[1], before[1])
    with pytest.raises(ValueError, match="rank 4 is more than the slot's 2"):
        named.load(donor, "new", _saved(model, "a", tmp_path / "a"))
    narrow = named.add(base, "n", cfg(LoRAConfig(r=4), pattern="up"))
    with pytest.raises(ValueError, match="adapts layers"):
        named.load(model, "a", _saved(narrow, "n", tmp_path / "n"))


def test_hot_swap_of_a_steering_adapter_is_exact(base, tmp_path):
    steer = cfg(AntiPaSTOConfig(r=4, block_size=2), pattern="down")
    model = named.add(three_loras(base), "steer", steer)
    donor = named.add(base, "steer", cfg(AntiPaSTOConfig(r=4, block_size=2), pattern="down", seed=3))
    randomize(donor, 17)
    named.route(model, ["steer", "a", "steer", None, "b", "c"], alpha=[1.0, 1.0, -1.0, 1.0, 1.0, 1.0])
    before = forward(model, X)
    named.load(model, "steer", _saved(donor, "steer", tmp_path / "steer"))
    after = forward(model, X)
    np.testing.assert_array_equal(after[0], _at(donor, X[0:1], 1.0))  # same slot shapes: bit for bit
    np.testing.assert_array_equal(after[1:2], before[1:2])
    wrong = named.add(base, "steer", cfg(AntiPaSTOConfig(r=4, block_size=4), pattern="down"))
    with pytest.raises(ValueError, match="a slot takes weights of the same variant config"):
        named.load(model, "steer", _saved(wrong, "steer", tmp_path / "wrong"))
    np.testing.assert_array_equal(forward(model, X), after)  # nothing changed by the refused load


def _at(model, x, alpha):
    alone = named.only(model, named.names(model)[0])
    set_alpha(alone, alpha)
    return forward(alone, x)[0]


def _saved(model, name, path):
    named.save(path, model, name)
    return path


# -- generation ---------------------------------------------------------------------------
def qwen_pair():
    base = Qwen3(tiny_config(), rngs=nnx.Rngs(0))
    model = named.add(base, "sft", cfg(LoRAConfig(r=4), pattern="q_proj|v_proj|down_proj"))
    model = named.add(model, "steer", cfg(AntiPaSTOConfig(r=8, block_size=4), pattern="o_proj|up_proj"))
    randomize(model, 7)
    return base, model


def test_generate_with_an_adapter_and_alpha_per_row(tmp_path):
    base, model = qwen_pair()
    tokens = jax.random.randint(jax.random.key(2), (4, 6), 3, 250)
    rows, alphas = ["sft", "steer", "steer", None], [1.0, -1.0, 1.0, 1.0]
    named.route(model, rows, alpha=alphas)
    out = generate(model, tokens, max_new_tokens=5)
    # each row as if the whole batch were its request: no row sees another row's adapter
    for b, (name, alpha) in enumerate(zip(rows, alphas, strict=True)):
        named.route(model, [name] * 4, alpha=alpha)
        np.testing.assert_array_equal(generate(model, tokens, max_new_tokens=5)[b], out[b])
    # and against the adapter alone (a plain model, its own compile)
    np.testing.assert_array_equal(generate(named.only(model, "sft"), tokens[:1], max_new_tokens=5)[0], out[0])
    assert not np.array_equal(out[1], out[2])  # the steering sign matters
    compiled = qwen3_module._generate._cache_size()
    # hot-swap under generate: new weights, the same compiled program
    donor = named.add(base, "sft", cfg(LoRAConfig(r=4), pattern="q_proj|v_proj|down_proj", seed=5))
    randomize(donor, 13)
    named.load(model, "sft", _saved(donor, "sft", tmp_path / "sft"))
    named.route(model, rows, alpha=alphas)
    swapped = generate(model, tokens, max_new_tokens=5)
    np.testing.assert_array_equal(swapped[1:], out[1:])
    assert not np.array_equal(swapped[0], out[0])
    assert qwen3_module._generate._cache_size() == compiled


def test_generate_scored_with_routes():
    _, model = qwen_pair()
    tokens = jax.random.randint(jax.random.key(2), (3, 6), 3, 250)
    named.route(model, ["sft", "steer", None], alpha=[1.0, 1.0, 0.0])
    reference = nnx.clone(model)
    named.route(reference, [None, None, None])  # same structure: the base model on every row
    out, kl, _, _ = generate_scored(
        model,
        tokens,
        jnp.ones(tokens.shape, bool),
        reference=reference,
        reference_tokens=tokens,
        reference_mask=jnp.ones(tokens.shape, bool),
        reference_rows=jnp.arange(3),
        max_new_tokens=3,
    )
    assert out.shape == (3, 3)
    assert float(kl[2].max()) == pytest.approx(0.0, abs=1e-6) and float(kl[0].max()) > 0
