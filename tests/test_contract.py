"""The contract every variant keeps, on every layer layout. Adding a variant = adding a
row to CASES; every check below then runs on it.

- identity at init in fp32 (every layout) and bf16 (five layouts of different kinds;
  bit-exact where the case says so, else within 1e-6 relative in fp32 and one bf16
  rounding in bf16);
- alpha = 0 is the base layer bit for bit, after the adapter weights moved (fp32, bf16);
- both of those under ``nnx.jit`` too (compiled adapter against compiled base): XLA's
  rewrites (``x / sqrt(y)`` to ``x * rsqrt(y)``, reordered reductions) must not break them;
- merge_adapters equals the unmerged forward (1e-5 fp32) and leaves only base types;
- training: every trainable leaf gets a non-zero gradient on step 1, only adapter leaves
  change, base leaves stay bit-identical, and a toy task (fit a randomly moved copy of
  the same adapter) drops below ``toy_loss_ratio`` of its initial loss.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import Wrap, max_rel_err, perturb
from layers import LAYOUT_IDS, LAYOUTS

import lora_jax as lj
from lora_jax.variants import AdaLoRAConfig, BOFTConfig, LoHaConfig, LoKrConfig, MiSSConfig, OFTConfig, VeRAConfig


@dataclasses.dataclass(frozen=True)
class Case:
    config: lj.VariantConfig
    bit_exact_init: bool = True
    # adapt(model, cfg, x) -> adapted model; data-driven variants calibrate here.
    adapt: Callable | None = None
    perturb: float = 0.05
    lr: float = 1e-2
    steps: int = 150
    toy_loss_ratio: float = 0.05
    # layouts the config cannot fit: not run, but checked to be refused with a message
    refused_layouts: tuple[str, ...] = ()
    # Leaves whose step-1 gradient is zero by the method's design (LoRA's A while B = 0):
    # asserted zero on step 1 and non-zero on step 2.
    zero_grad_at_init: tuple[str, ...] = ()


def _eva_init(model, cfg, x):
    """EVA calibrated on the test input itself (one batch: tau cannot be met, so quiet)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "eva_init: the components did not converge")
        return lj.eva_init(model, cfg, [x])


CASES: dict[str, Case] = {
    "lora": Case(lj.LoRAConfig(r=4, lora_alpha=8), zero_grad_at_init=("lora_a",)),
    "rslora": Case(lj.LoRAConfig(r=4, lora_alpha=8, rslora=True), zero_grad_at_init=("lora_a",)),
    "antipasto": Case(lj.AntiPaSTOConfig(r=4, block_size=2, rotate="both")),
    "ia3": Case(lj.IA3Config()),
    "ia3_ff": Case(lj.IA3FFConfig()),
    "hra": Case(lj.HRAConfig(r=4)),
    # group_size=2: every layout's d_out is even, not every one is a multiple of 4
    "road_1": Case(lj.ROADConfig(kind="road_1", group_size=2)),
    "road_2": Case(lj.ROADConfig(kind="road_2", group_size=2)),
    "road_4": Case(lj.ROADConfig(kind="road_4", group_size=2)),
    "pissa": Case(lj.PiSSAConfig(r=4, lora_alpha=8)),
    "olora": Case(lj.OLoRAConfig(r=4, lora_alpha=8)),
    "dora": Case(lj.DoRAConfig(r=4, lora_alpha=8), zero_grad_at_init=("lora_a",)),
    # DeLoRA normalises each rank term, so even a small perturbation gives the teacher a
    # full-size delta (lambda / r per term) that the student reaches slowly from B = 0.
    "delora": Case(lj.DeLoRAConfig(r=4), zero_grad_at_init=("lora_a", "delora_lambda"), steps=600),
    # rho=1 keeps r=2 on every layer: the MoE layout has only 5 rows per expert.
    "eva": Case(lj.EVAConfig(r=2, lora_alpha=4, rho=1.0), adapt=_eva_init, zero_grad_at_init=("lora_a",)),
    # B2 = 0: only hada_w2_b has a gradient on step 1
    "loha": Case(LoHaConfig(r=2, lora_alpha=4), zero_grad_at_init=("hada_w1_a", "hada_w1_b", "hada_w2_a")),
    # W1 = 0: W2 (full here, decomposed in lokr_low) has no gradient on step 1
    "lokr": Case(LoKrConfig(r=4, lora_alpha=4), zero_grad_at_init=("lokr_w2",)),
    # block 2 divides every layout's d_in; the shared block is one 2x2 generator
    "oft": Case(OFTConfig(oft_block_size=2)),
    "oft_shared": Case(OFTConfig(oft_block_size=2, block_share=True, num_cayley_neumann_terms=3)),
    # r=4 leaves a padded last shard where d_in is 6 or 12 / 8 (per-head, MLP)
    "miss": Case(MiSSConfig(r=4)),
    "miss_mini": Case(MiSSConfig(r=4, mini_r=2)),
    # lambda_b = 0: lambda_d has no gradient on step 1; one projection shared by all layers
    "vera": Case(VeRAConfig(r=4), zero_grad_at_init=("vera_lambda_d",)),
    "boft": Case(BOFTConfig(boft_block_size=2)),
    # two factors of 2-blocks need d_in % 4 == 0: the per-head layout's d_in is 6
    "boft_butterfly": Case(
        BOFTConfig(boft_block_size=2, boft_n_butterfly_factor=2), refused_layouts=("per_head_BTNH_NHK",)
    ),
    # E = 0: P and Q have no gradient on step 1 (the rank allocation has its own tests)
    "adalora": Case(AdaLoRAConfig(r=4, target_r=2), zero_grad_at_init=("lora_a", "lora_b")),
    "lokr_low": Case(LoKrConfig(r=1, lora_alpha=1, decompose_both=True), zero_grad_at_init=("lokr_w2", "lokr_w1_b")),
}


def _adapt(case: Case, model, x):
    cfg = lj.AdapterConfig(rules=(lj.Rule(pattern=".*", variant=case.config),))
    if case.adapt is not None:
        return case.adapt(model, cfg, x)
    return lj.apply_adapters(model, cfg)


def _on_layouts(pairs, ids):
    """``(name, *pair)`` for every case and pair whose layout the case supports (the others
    are checked to be refused, below), with readable ids."""
    return [
        pytest.param(name, *pair, id=f"{name}-{pair_id}")
        for name in sorted(CASES)
        for pair, pair_id in zip(pairs, ids, strict=True)
        if pair[0].name not in CASES[name].refused_layouts
    ]


REFUSED = [(n, lay) for n in sorted(CASES) for lay in LAYOUTS if lay.name in CASES[n].refused_layouts]


@pytest.mark.parametrize(("name", "layout"), REFUSED, ids=[f"{n}-{lay.name}" for n, lay in REFUSED])
def test_a_layout_a_case_leaves_out_is_refused_with_a_message(name, layout):
    layer, x = layout.build()
    with pytest.raises(ValueError, match=CASES[name].config.name):
        _adapt(CASES[name], Wrap(layer), x)


@nnx.jit
def _jit_call(model, x):
    return model(x)


# bf16 on the layouts whose shapes differ in kind (plain with a bias, two contracted axes,
# a packed output axis, a kernel-batch axis on the output side and on the contracted side):
# the dtype's casts and roundings do not depend on the einsum beyond those.
BF16_LAYOUTS = ("linear", "o_BTNH_NHD", "kv_packed", "moe_EBD_EDF", "per_head_BTNH_NHK")
DTYPE_LAYOUTS = [(layout, jnp.float32) for layout in LAYOUTS]
DTYPE_LAYOUTS += [(layout, jnp.bfloat16) for layout in LAYOUTS if layout.name in BF16_LAYOUTS]
DTYPE_LAYOUT_IDS = [f"{layout.name}-{jnp.dtype(dtype).name}" for layout, dtype in DTYPE_LAYOUTS]


@pytest.mark.parametrize(("name", "layout", "dtype"), _on_layouts(DTYPE_LAYOUTS, DTYPE_LAYOUT_IDS))
def test_identity_at_init_and_alpha_zero_eager_and_under_jit(name, layout, dtype):
    """Compiled adapter against compiled base, eager against eager (one adapted model for
    the four checks: the variant's init, e.g. an SVD, runs once)."""
    case = CASES[name]
    layer, x = layout.build(dtype=dtype)
    base = Wrap(layer)
    adapted = _adapt(case, base, x)
    y0, y0_jit = base(x), _jit_call(base, x)
    for how, y, want in (("eager", adapted(x), y0), ("jit", _jit_call(adapted, x), y0_jit)):
        assert y.dtype == want.dtype, how
        if case.bit_exact_init:
            np.testing.assert_array_equal(np.asarray(y), np.asarray(want), err_msg=f"identity at init ({how})")
        else:
            assert max_rel_err(y, want) < (1e-6 if dtype == jnp.float32 else 1e-2), how
    perturb(adapted, case.perturb, seed=7)
    assert max_rel_err(adapted(x), y0) > 0, "perturbed adapter should change the output"
    lj.set_alpha(adapted, 0.0)
    y = adapted(x)
    assert y.dtype == y0.dtype
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y0), err_msg="alpha=0 (eager)")
    # the same graph as the first compiled call: the compiled function is reused
    np.testing.assert_array_equal(np.asarray(_jit_call(adapted, x)), np.asarray(y0_jit), err_msg="alpha=0 under jit")


@pytest.mark.parametrize(("name", "layout"), _on_layouts([(lay,) for lay in LAYOUTS], LAYOUT_IDS))
def test_merge_equals_unmerged(name, layout):
    case = CASES[name]
    layer, x = layout.build()
    adapted = _adapt(case, Wrap(layer), x)
    perturb(adapted, case.perturb, seed=7)
    for alpha in (1.0, -1.0, 0.5):
        lj.set_alpha(adapted, alpha)
        merged = lj.merge_adapters(adapted)
        assert max_rel_err(merged(x), adapted(x)) < 1e-5, f"alpha={alpha}"
        assert type(merged.layer) is type(layer)
        assert not any(isinstance(m, lj.Adapter) for _, m in nnx.iter_modules(merged))
    assert list(lj.iter_adapters(adapted)), "merge must not touch the adapted model"


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.up = nnx.Linear(12, 24, rngs=rngs)
        self.heads = nnx.Einsum("BTD,DNH->BTNH", (24, 2, 6), (2, 6), rngs=rngs)
        self.down = nnx.Einsum("BTNH,NHD->BTD", (2, 6, 12), rngs=rngs)

    def __call__(self, x):
        return self.down(jnp.tanh(self.heads(jnp.tanh(self.up(x)))))


@pytest.mark.parametrize("name", sorted(CASES))
def test_training_moves_only_adapters_and_fits_toy_task(name):
    case = CASES[name]
    x = jax.random.normal(jax.random.key(1), (8, 6, 12))
    base = MLP(nnx.Rngs(0))
    teacher = _adapt(case, base, x)
    perturb(teacher, 4 * case.perturb, seed=11)
    target = teacher(x)
    model = _adapt(case, base, x)
    base_before = jax.tree.map(np.asarray, nnx.state(model, nnx.Not(lj.AdapterParam)))

    optimizer = nnx.Optimizer(model, optax.adam(case.lr), wrt=lj.AdapterParam)

    def loss_fn(m):
        return jnp.mean((m(x) - target) ** 2)

    @nnx.jit
    def step(m, opt):
        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, lj.AdapterParam))(m)
        opt.update(m, grads)
        return loss, grads

    first_loss, grads = step(model, optimizer)
    _, grads2 = step(model, optimizer)
    for (path, g1), g2 in zip(jax.tree.leaves_with_path(grads), jax.tree.leaves(grads2), strict=True):
        where = jax.tree_util.keystr(path)
        if any(name in where for name in case.zero_grad_at_init):
            assert np.abs(np.asarray(g1)).max() == 0, f"{where}: expected a zero gradient on step 1"
            assert np.abs(np.asarray(g2)).max() > 0, f"zero gradient at {where} on step 2"
        else:
            assert np.abs(np.asarray(g1)).max() > 0, f"zero gradient at {where} on step 1"
    loss = first_loss
    for _ in range(case.steps - 2):
        loss, _ = step(model, optimizer)
    assert float(loss) < case.toy_loss_ratio * float(first_loss), (float(first_loss), float(loss))

    base_after = jax.tree.map(np.asarray, nnx.state(model, nnx.Not(lj.AdapterParam)))
    for (path, before), after in zip(jax.tree.leaves_with_path(base_before), jax.tree.leaves(base_after), strict=True):
        if "alpha" not in jax.tree_util.keystr(path):
            np.testing.assert_array_equal(before, after, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("name", sorted(CASES))
def test_checkpoint_round_trip_is_bit_exact(name, tmp_path):
    from lora_jax.checkpoint import restore, save

    case = CASES[name]
    x = jax.random.normal(jax.random.key(1), (2, 3, 12))
    model = _adapt(case, MLP(nnx.Rngs(0)), x)
    perturb(model, case.perturb, seed=7)
    lj.set_alpha(model, 0.5, pattern="heads")
    fresh = MLP(nnx.Rngs(0))  # restore rebuilds the adapters (without calibration data) and loads them
    restored = restore(save(tmp_path / name, model), fresh)
    np.testing.assert_array_equal(np.asarray(restored(x)), np.asarray(model(x)))
    # every Variable, not only what the output shows (e.g. a masked AdaLoRA triplet, VeRA's projection)
    state, saved_state = (nnx.to_pure_dict(nnx.state(m)) for m in (restored, model))
    jax.tree.map(np.testing.assert_array_equal, state, saved_state)
    assert not list(lj.iter_adapters(fresh))


def test_every_registered_variant_has_a_contract_case():
    """A new variant joins every check above by adding a CASES row: forgetting it fails here."""
    assert {case.config.name for case in CASES.values()} == set(lj.variants.VARIANTS)
