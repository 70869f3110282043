"""Targeting, apply / merge semantics, runtime alpha and the error messages."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import Wrap

import lora_jax as lj


class Block(nnx.Module):
    def __init__(self, d, rngs):
        self.q_proj = nnx.Einsum("BTD,DNH->BTNH", (d, 2, d // 2), rngs=rngs)
        self.o_proj = nnx.Einsum("BTNH,NHD->BTD", (2, d // 2, d), rngs=rngs)
        self.up_proj = nnx.Linear(d, 2 * d, rngs=rngs)
        self.down_proj = nnx.Linear(2 * d, d, rngs=rngs)

    def __call__(self, x):
        x = x + self.o_proj(self.q_proj(x))
        return x + self.down_proj(jax.nn.gelu(self.up_proj(x)))


class Tiny(nnx.Module):
    def __init__(self, d=16, n=3, seed=0):
        rngs = nnx.Rngs(seed)
        self.layers = nnx.List([Block(d, rngs) for _ in range(n)])
        self.head = nnx.Linear(d, 5, rngs=rngs)

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def cfg(*rules, **kw):
    return lj.AdapterConfig(rules=tuple(lj.Rule(**r) for r in rules), **kw)


LORA = lj.LoRAConfig(r=2)
X = jax.random.normal(jax.random.key(0), (2, 4, 16))


def paths(model):
    return sorted(p for p, _ in lj.iter_adapters(model))


def test_regex_layers_roles_and_exclude():
    model = Tiny()
    adapted = lj.apply_adapters(model, cfg(dict(pattern=r"proj", variant=LORA, layers=(1,), roles=("writer",))))
    assert paths(adapted) == ["layers.1.down_proj", "layers.1.o_proj", "layers.1.q_proj"]  # square = writer too
    adapted = lj.apply_adapters(model, cfg(dict(pattern=r"proj", variant=LORA, roles=("reader",), exclude=(r"up",))))
    assert paths(adapted) == sorted(f"layers.{i}.{n}" for i in range(3) for n in ("q_proj", "o_proj"))
    # An explicit d_model=32 turns up_proj (16 -> 32) into a writer.
    writers = lj.apply_adapters(model, cfg(dict(pattern=r"up_proj", variant=LORA, roles=("writer",)), d_model=32))
    assert paths(writers) == [f"layers.{i}.up_proj" for i in range(3)]
    with pytest.raises(lj.NoMatchError, match="d_model=32"):
        lj.apply_adapters(model, cfg(dict(pattern=r"up_proj", variant=LORA, roles=("inner",)), d_model=32))


def test_first_matching_rule_wins_and_rules_carry_their_own_variant():
    model = Tiny()
    adapted = lj.apply_adapters(
        model,
        cfg(
            dict(pattern=r"layers\.0\.q_proj", variant=lj.LoRAConfig(r=4, lora_alpha=2)),
            dict(pattern=r"q_proj", variant=lj.LoRAConfig(r=1)),
        ),
    )
    ranks = {p: a.config.r for p, a in lj.iter_adapters(adapted)}
    assert ranks == {"layers.0.q_proj": 4, "layers.1.q_proj": 1, "layers.2.q_proj": 1}


def test_apply_returns_copy_and_leaves_caller_model_alone():
    model = Tiny()
    before = jax.tree.map(np.asarray, nnx.state(model))
    adapted = lj.apply_adapters(model, cfg(dict(pattern="proj", variant=LORA)))
    assert adapted is not model and not list(lj.iter_adapters(model))
    for _p, a in lj.iter_adapters(adapted):
        a.lora_b.value = jnp.ones_like(a.lora_b[...])
        a.base.kernel.value = a.base.kernel[...] * 0  # even mutating the copy's base
    after = jax.tree.map(np.asarray, nnx.state(model))
    jax.tree.map(np.testing.assert_array_equal, before, after)


def test_failed_apply_leaves_caller_model_alone():
    model = Tiny()
    with pytest.raises(ValueError, match="rank"):
        # the first rule builds fine; the second fails on its rank after that
        lj.apply_adapters(
            model,
            cfg(dict(pattern="q_proj", variant=LORA), dict(pattern="down_proj", variant=lj.LoRAConfig(r=17))),
        )
    assert not any(isinstance(m, lj.Adapter) for _, m in nnx.iter_modules(model))


def test_rule_matching_nothing_lists_adaptable_paths():
    with pytest.raises(lj.NoMatchError, match=r"rule 1 .*'k_proj'.*layers\.0\.q_proj"):
        lj.apply_adapters(Tiny(), cfg(dict(pattern="q_proj", variant=LORA), dict(pattern="k_proj", variant=LORA)))


def test_double_application_raises():
    adapted = lj.apply_adapters(Tiny(), cfg(dict(pattern="q_proj", variant=LORA)))
    with pytest.raises(lj.AlreadyAdaptedError, match="already adapted"):
        lj.apply_adapters(adapted, cfg(dict(pattern=r"q_proj$", variant=LORA)))
    with pytest.raises(lj.AlreadyAdaptedError, match=r"q_proj\.base"):
        lj.apply_adapters(adapted, cfg(dict(pattern=r"q_proj\.base", variant=LORA)))
    # other layers of an adapted model can still be adapted
    assert len(paths(lj.apply_adapters(adapted, cfg(dict(pattern="o_proj", variant=LORA))))) == 6


@pytest.mark.parametrize(
    ("variant", "message"),
    [
        (lj.LoRAConfig(r=0), r"r=0 at 'layers.0.o_proj' .* \[1, 16\]"),
        (lj.LoRAConfig(r=17), r"r=17"),
        (lj.LoRAConfig(r=2.5), r"integer"),
    ],
)
def test_rank_out_of_range(variant, message):
    with pytest.raises(ValueError, match=message):
        lj.apply_adapters(Tiny(), cfg(dict(pattern="o_proj", variant=variant)))


def test_merge_returns_plain_model_with_same_output():
    adapted = lj.apply_adapters(Tiny(), cfg(dict(pattern="proj", variant=LORA)))
    for _, a in lj.iter_adapters(adapted):
        a.lora_b.value = 0.1 * jax.random.normal(jax.random.key(3), a.lora_b.shape)
    lj.set_alpha(adapted, -0.7)
    merged = lj.merge_adapters(adapted)
    np.testing.assert_allclose(merged(X), adapted(X), rtol=1e-5, atol=1e-5)
    types = {type(m).__name__ for _, m in nnx.iter_modules(merged)}
    assert types == {"Tiny", "List", "Block", "Einsum", "Linear"}
    assert jax.tree.structure(nnx.state(merged)) == jax.tree.structure(nnx.state(Tiny()))


def test_alpha_changes_do_not_retrace_and_semantics():
    model = Tiny()
    adapted = lj.apply_adapters(model, cfg(dict(pattern="proj", variant=LORA)))
    for _, a in lj.iter_adapters(adapted):
        a.lora_b.value = 0.1 * jax.random.normal(jax.random.key(3), a.lora_b.shape)
    traces = []

    @nnx.jit
    def forward(m, x):
        traces.append(1)
        return m(x)

    outs = {}
    for alpha in (0.0, 1.0, -1.0, 0.5, 2.0):
        lj.set_alpha(adapted, alpha)
        outs[alpha] = forward(adapted, X)
    assert len(traces) == 1
    np.testing.assert_array_equal(outs[0.0], forward(model, X))
    # LoRA is linear in alpha: the alpha = -1 delta is the negated alpha = 1 delta, per layer
    layer = Tiny().layers[0].down_proj
    one = lj.apply_adapters(Wrap(layer), cfg(dict(pattern="layer", variant=LORA)))
    one.layer.lora_b.value = jnp.ones_like(one.layer.lora_b[...])
    h = jax.random.normal(jax.random.key(5), (3, 32))
    deltas = {}
    for alpha in (1.0, -1.0):
        lj.set_alpha(one, alpha)
        deltas[alpha] = one(h) - layer(h)
    np.testing.assert_allclose(deltas[-1.0], -deltas[1.0], rtol=1e-5, atol=1e-6)


def test_per_row_alpha_equals_row_by_row_calls():
    adapted = lj.apply_adapters(Tiny(), cfg(dict(pattern="proj", variant=LORA)))
    for _, a in lj.iter_adapters(adapted):
        a.lora_b.value = 0.1 * jax.random.normal(jax.random.key(3), a.lora_b.shape)
    x = jax.random.normal(jax.random.key(4), (4, 3, 16))
    alphas = jnp.array([-1.0, 0.0, 0.5, 2.0])
    lj.set_alpha(adapted, alphas)
    together = adapted(x)
    for i, alpha in enumerate(alphas):
        lj.set_alpha(adapted, alpha)
        np.testing.assert_allclose(together[i], adapted(x[i : i + 1])[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("variant", "pattern"),
    [(LORA, "proj"), (lj.IA3Config(), "proj"), (lj.ROADConfig(group_size=4), "up_proj|down_proj")],
    ids=["lora", "ia3", "road"],
)
def test_per_row_alpha_of_the_wrong_length_is_named(variant, pattern):
    adapted = lj.apply_adapters(Tiny(n=1), cfg(dict(pattern=pattern, variant=variant)))
    lj.set_alpha(adapted, jnp.ones(3))
    with pytest.raises(ValueError, match="alpha has 3 values but the input has 4 rows"):
        adapted(jnp.ones((4, 2, 16)))
    # a batch of one would broadcast to three outputs: refused too, at trace time under jit
    with pytest.raises(ValueError, match="alpha has 3 values but the input has 1 rows"):
        nnx.jit(lambda m, x: m(x))(adapted, jnp.ones((1, 2, 16)))
    assert adapted(jnp.ones((3, 2, 16))).shape == (3, 2, 5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), [0.0, float("nan")], 1e39])
def test_set_alpha_refuses_non_finite_values_and_changes_nothing(bad):
    adapted = lj.apply_adapters(Tiny(n=1), cfg(dict(pattern="proj", variant=LORA)))
    lj.set_alpha(adapted, 0.5)
    with pytest.raises(ValueError, match="alpha must be finite"):
        lj.set_alpha(adapted, bad)
    assert all(float(a.alpha[...]) == 0.5 for _, a in lj.iter_adapters(adapted))


def test_set_alpha_selects_by_pattern_and_rejects_bad_input():
    adapted = lj.apply_adapters(Tiny(), cfg(dict(pattern="proj", variant=LORA)))
    assert lj.set_alpha(adapted, 0.5, pattern=r"layers\.0\.") == 4
    alphas = {p: float(a.alpha[...]) for p, a in lj.iter_adapters(adapted)}
    assert alphas["layers.0.q_proj"] == 0.5 and alphas["layers.1.q_proj"] == 1.0
    with pytest.raises(lj.NoMatchError, match="matched no adapter"):
        lj.set_alpha(adapted, 1.0, pattern="nothing")
    with pytest.raises(ValueError, match="scalar or one value per row"):
        lj.set_alpha(adapted, jnp.ones((2, 2)))
    lj.set_alpha(adapted, jnp.ones(2))
    with pytest.raises(ValueError, match="scalar alpha"):
        lj.merge_adapters(adapted)


def test_dropout_active_in_train_mode_only():
    layer = nnx.Linear(16, 16, rngs=nnx.Rngs(0))
    adapted = lj.apply_adapters(Wrap(layer), cfg(dict(pattern="layer", variant=lj.LoRAConfig(r=4, dropout=0.5))))
    adapted.layer.lora_b.value = jnp.ones_like(adapted.layer.lora_b[...])
    x = jax.random.normal(jax.random.key(1), (8, 16))
    adapted.eval()
    np.testing.assert_array_equal(adapted(x), adapted(x))
    expect = layer(x) + 2.0 * (x @ adapted.layer.lora_a[...]) @ adapted.layer.lora_b[...]
    np.testing.assert_allclose(adapted(x), expect, rtol=1e-5, atol=1e-5)
    adapted.train()
    assert not np.allclose(adapted(x), expect, atol=1e-3)


def test_bf16_base_keeps_dtype_with_fp32_adapter():
    layer = nnx.Linear(16, 8, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    adapted = lj.apply_adapters(Wrap(layer), cfg(dict(pattern="layer", variant=LORA)))
    assert adapted.layer.lora_a[...].dtype == jnp.float32
    assert adapted.layer.base.kernel[...].dtype == jnp.bfloat16
    x = jax.random.normal(jax.random.key(1), (4, 16)).astype(jnp.bfloat16)
    assert adapted(x).dtype == jnp.bfloat16
    bf16 = lj.apply_adapters(Wrap(layer), cfg(dict(pattern="layer", variant=lj.LoRAConfig(r=2, dtype="bfloat16"))))
    assert bf16.layer.lora_a[...].dtype == jnp.bfloat16


class NormedBlock(nnx.Module):
    """A block with norms and a custom layer that holds its weight itself (no view)."""

    class Scale(nnx.Module):
        def __init__(self, d):
            self.w = nnx.Param(jnp.ones((d,)))

        def __call__(self, x):
            return x * self.w[...]

    def __init__(self, d=16, seed=0):
        rngs = nnx.Rngs(seed)
        self.attn_norm = nnx.LayerNorm(d, rngs=rngs)
        self.q_proj = nnx.Linear(d, d, rngs=rngs)
        self.q_norm = nnx.RMSNorm(d, rngs=rngs)
        self.gate = NormedBlock.Scale(d)

    def __call__(self, x):
        return self.gate(self.q_norm(self.q_proj(self.attn_norm(x))))


def test_rule_matching_only_unsupported_types_names_them():
    model = NormedBlock()
    before = jax.tree.map(np.asarray, nnx.state(model))
    with pytest.raises(
        lj.UnsupportedLayerError,
        match=r"matched only layers of a type lora_jax cannot adapt: 'attn_norm' \(nnx.LayerNorm\), "
        r"'q_norm' \(nnx.RMSNorm\)\. Supported: nnx.Linear, .*nnx.Conv.*nnx.Embed.*register_view",
    ):
        lj.apply_adapters(model, cfg(dict(pattern="norm", variant=LORA)))
    with pytest.raises(lj.UnsupportedLayerError, match=r"'gate' \(NormedBlock.Scale\).*register_view"):
        lj.apply_adapters(model, cfg(dict(pattern="gate", variant=LORA)))
    jax.tree.map(np.testing.assert_array_equal, nnx.state(model), before)
    # a pattern that also matches an adaptable layer adapts it and passes over the norms,
    # as a container path does
    assert paths(lj.apply_adapters(model, cfg(dict(pattern="q_", variant=LORA)))) == ["q_proj"]
    assert paths(lj.apply_adapters(Tiny(), cfg(dict(pattern=r"layers\.0", variant=LORA)))) == [
        f"layers.0.{n}" for n in ("down_proj", "o_proj", "q_proj", "up_proj")
    ]
    # and a pattern that matches nothing at all is still a NoMatchError
    with pytest.raises(lj.NoMatchError, match="matched no layer"):
        lj.apply_adapters(model, cfg(dict(pattern="nothing", variant=LORA)))
