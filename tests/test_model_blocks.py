"""The reference model's block spans, its scan over identical blocks, and scored generation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lora_jax as lj
from lora_jax.models import Qwen3, generate, generate_scored, tiny_config
from lora_jax.models.layers import rope_tables
from lora_jax.models.qwen3 import _same_structure_runs, positions_from_mask

TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 256, (3, 9)), jnp.int32)
MASK = jnp.ones((3, 9), bool).at[0, :3].set(False)  # a left-padded row


def _model(n_layers=5):
    return Qwen3(tiny_config(259, n_layers=n_layers), rngs=nnx.Rngs(0))


def _adapted(model, layers=(1, 2, 3)):
    variant = lj.AntiPaSTOConfig(r=8, delta_s_init=1e-2)
    rule = lj.Rule(pattern="o_proj|down_proj", variant=variant, layers=layers)
    return lj.apply_adapters(model, lj.AdapterConfig(rules=(rule,)))


def _unrolled(model):
    """The plain loop over blocks the scan replaces."""
    cos, sin = rope_tables(positions_from_mask(MASK), jnp.asarray(model.config.rope.inv_freq(model.config.head_dim)))
    x = model.embed(TOKENS)
    for layer in model.layers:
        x, _ = layer(x, cos, sin, MASK)
    return model.head(x)


def test_runs_group_identical_consecutive_blocks():
    assert _same_structure_runs(list(_model().layers)) == [[0, 1, 2, 3, 4]]
    assert _same_structure_runs(list(_adapted(_model()).layers)) == [[0], [1, 2, 3], [4]]


def test_scanned_blocks_equal_the_unrolled_loop():
    adapted = _adapted(_model())
    lj.set_alpha(adapted, jnp.array([1.0, -1.0, 0.5]))
    for model in (_model(), adapted):
        np.testing.assert_allclose(model(TOKENS, MASK), _unrolled(model), rtol=1e-5, atol=1e-5)


def test_alpha_zero_is_the_base_model_bit_for_bit():
    base = _model()
    model = _adapted(base)
    lj.set_alpha(model, 0.0)
    np.testing.assert_array_equal(model(TOKENS, MASK), base(TOKENS, MASK))
    np.testing.assert_array_equal(nnx.jit(lambda m: m(TOKENS, MASK))(model), nnx.jit(lambda m: m(TOKENS, MASK))(base))


def test_block_spans_compose_and_head_gives_the_logits():
    model = _adapted(_model())
    spans = nnx.jit(lambda m: m.head(m.blocks(m.blocks(m.embed(TOKENS), MASK, 0, 2), MASK, 2)))(model)
    whole = nnx.jit(lambda m: m(TOKENS, MASK))(model)
    np.testing.assert_allclose(spans, whole, rtol=1e-6, atol=1e-6)


def test_state_written_inside_a_scanned_block_is_kept():
    """Calibration records statistics in Variables of wrapped layers: the scan must write them back."""

    class Counter(nnx.Module):
        def __init__(self, layer):
            self.layer, self.calls = layer, nnx.Variable(jnp.zeros((), jnp.int32))

        def __call__(self, x):
            self.calls.value = self.calls.value + 1
            return self.layer(x)

    model = _model(3)
    for block in model.layers:
        block.mlp.down_proj = Counter(block.mlp.down_proj)
    model(TOKENS, MASK)
    nnx.jit(lambda m: m(TOKENS, MASK))(model)
    assert [int(b.mlp.down_proj.calls.value) for b in model.layers] == [2, 2, 2]


def test_generate_scored_tokens_equal_generate_and_scores_are_exact():
    base = _model(3)
    model = _adapted(base, layers=(1,))
    alphas = jnp.array([1.0, 0.0, -1.0])
    lj.set_alpha(model, alphas)
    expected = np.asarray(generate(model, TOKENS, MASK, max_new_tokens=6))
    reference = nnx.clone(model)
    lj.set_alpha(reference, 0.0)
    # rows 0 and 2 read the reference prompt 0, row 1 its own prompt 1
    ref_tokens, ref_mask = TOKENS[:2], MASK[:2]
    rows = np.array([0, 1, 0])
    tokens, kl, ref_lp, live = (
        np.asarray(a)
        for a in generate_scored(
            model,
            TOKENS,
            MASK,
            reference=reference,
            reference_tokens=ref_tokens,
            reference_mask=ref_mask,
            reference_rows=rows,
            max_new_tokens=6,
        )
    )
    np.testing.assert_array_equal(tokens, expected)
    assert live.all()
    assert kl[1].max() < 1e-6 and (kl[[0, 2]] > 1e-6).any()  # row 1 is the base model on the base prompt
    # the reference's log-prob of each token, teacher-forced on reference prompt + generated tokens
    for b in range(3):
        seq = jnp.concatenate([ref_tokens[rows[b]], jnp.asarray(tokens[b])])[None]
        seq_mask = jnp.concatenate([ref_mask[rows[b]], jnp.ones(6, bool)])[None]
        logp = jax.nn.log_softmax(base(seq, seq_mask)[0, -7:-1], -1)
        np.testing.assert_allclose(ref_lp[b], logp[jnp.arange(6), tokens[b]], rtol=1e-4, atol=1e-4)


def test_generate_scored_refuses_a_reference_of_another_structure():
    model = _adapted(_model(3), layers=(1,))
    with pytest.raises(ValueError, match="same structure as model"):
        generate_scored(
            model,
            TOKENS,
            MASK,
            reference=_model(3),
            reference_tokens=TOKENS,
            reference_mask=MASK,
            reference_rows=np.arange(3),
            max_new_tokens=2,
        )
