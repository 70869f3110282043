"""Sweeps compile once and match separate calls; sweep metrics match hand computation."""

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lora_jax import AdapterConfig, LoRAConfig, NoMatchError, Rule, apply_adapters, iter_adapters, set_alpha
from lora_jax.steering import format_table, plot_sweep, sweep, sweep_figure, sweep_metrics

ALPHAS = jnp.linspace(-2.0, 2.0, 16)
ROOT = pathlib.Path(__file__).resolve().parents[1]


class Tiny(nnx.Module):
    def __init__(self, rngs):
        self.up = nnx.Linear(8, 16, rngs=rngs)
        self.down = nnx.Linear(16, 5, rngs=rngs)

    def __call__(self, x):
        return self.down(jax.nn.gelu(self.up(x)))


def _model():
    model = apply_adapters(Tiny(nnx.Rngs(0)), AdapterConfig(rules=(Rule(pattern="up|down", variant=LoRAConfig(r=4)),)))
    for i, (_, adapter) in enumerate(iter_adapters(model)):  # B = 0 at init: give alpha something to do
        adapter.lora_b.value = 0.5 * jax.random.normal(jax.random.key(i), adapter.lora_b.shape)
    return model


def _x():
    return jax.random.normal(jax.random.key(7), (3, 4, 8))


def _separate(model, fn, alphas, *, pattern=None):
    rows = []
    for a in alphas:
        m = nnx.clone(model)
        set_alpha(m, a, pattern=pattern)
        rows.append(fn(m, _x()))
    return jnp.stack(rows)


@pytest.mark.parametrize(("mode", "batch_size"), [("vmap", None), ("vmap", 1), ("vmap", 5), ("rows", None)], ids=str)
def test_sweep_compiles_once_and_matches_separate_calls(mode, batch_size):
    model, traces = _model(), []

    def fn(m, x):
        traces.append(1)  # runs only while tracing
        return m(x)

    out = sweep(model, fn, ALPHAS, inputs=_x(), mode=mode, batch_size=batch_size)
    # lax.map with a remainder (16 = 3 x 5 + 1) traces the chunk and the remainder once each
    assert len(traces) == (2 if batch_size == 5 else 1)
    assert out.shape == (16, 3, 4, 5)
    np.testing.assert_allclose(out, _separate(model, fn, ALPHAS), rtol=1e-5, atol=1e-5)
    assert not np.allclose(out[0], out[-1])  # the alphas really differ
    traces.clear()
    sweep(model, fn, ALPHAS * 0.5, inputs=_x(), mode=mode, batch_size=batch_size)  # same count: cached
    assert traces == []


def test_sweep_without_inputs_and_pytree_outputs():
    model, x = _model(), _x()
    out = sweep(model, lambda m: {"y": m(x), "norm": jnp.linalg.norm(m(x))}, ALPHAS[:3])
    np.testing.assert_allclose(out["y"], _separate(model, lambda m, x: m(x), ALPHAS[:3]), rtol=1e-5, atol=1e-5)
    assert out["norm"].shape == (3,)


@pytest.mark.parametrize("mode", ["vmap", "rows"])
def test_sweep_pattern_leaves_other_adapters_and_model_alone(mode):
    model = _model()
    set_alpha(model, 0.5, pattern="down")
    before = [a.alpha[...] for _, a in iter_adapters(model)]
    out = sweep(model, lambda m, x: m(x), ALPHAS[:4], inputs=_x(), pattern="up", mode=mode)
    expected = _separate(model, lambda m, x: m(x), ALPHAS[:4], pattern="up")
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    assert [a.alpha[...] for _, a in iter_adapters(model)] == before


def test_sweep_errors():
    model, fn = _model(), lambda m, x: m(x)
    with pytest.raises(ValueError, match="alphas is empty"):
        sweep(model, fn, [], inputs=_x())
    with pytest.raises(ValueError, match="1-D vector"):
        sweep(model, fn, [[0.0, 1.0]], inputs=_x())
    with pytest.raises(ValueError, match="alphas must be finite"):
        sweep(model, fn, [0.0, float("nan")], inputs=_x())
    with pytest.raises(ValueError, match="mode='batch' is not one of"):
        sweep(model, fn, ALPHAS, inputs=_x(), mode="batch")
    with pytest.raises(NoMatchError, match="matched no adapter"):
        sweep(model, fn, ALPHAS, inputs=_x(), pattern="nothing")
    with pytest.raises(NoMatchError, match="no adapters"):
        sweep(Tiny(nnx.Rngs(0)), fn, ALPHAS, inputs=_x())
    with pytest.raises(ValueError, match="needs inputs"):
        sweep(model, lambda m: m(_x()), ALPHAS, mode="rows")
    with pytest.raises(ValueError, match="one row per input row"):
        sweep(model, lambda m, x: m(x).mean(), ALPHAS, inputs=_x(), mode="rows")
    with pytest.raises(ValueError, match="batch_size=0 must be a positive integer"):
        sweep(model, fn, ALPHAS, inputs=_x(), batch_size=0)
    with pytest.raises(ValueError, match="batch_size applies to mode='vmap' only"):
        sweep(model, fn, ALPHAS, inputs=_x(), mode="rows", batch_size=2)


def _two_way(p):
    return np.log(np.array([p, 1.0 - p]))


def test_metrics_match_hand_computation():
    alphas = np.array([2.0, -1.0, 0.0, 1.0, -2.0])  # unsorted on purpose
    effect = np.array([8.0, -2.0, 1.0, 4.0, -5.0])
    logprobs = np.stack([_two_way(p) for p in (0.9, 0.4, 0.5, 0.8, 0.1)])[:, None, :]  # one position
    m = sweep_metrics(alphas, effect, logprobs, kl_budget=0.25)
    np.testing.assert_allclose(m.alphas, [-2, -1, 0, 1, 2])
    # least squares by hand: mean(a) = 0, sum a^2 = 10, sum a e = 32, mean(e) = 1.2
    assert m.slope == pytest.approx(3.2)
    assert m.intercept == pytest.approx(1.2)
    assert m.r2 == pytest.approx(1 - 0.4 / 102.8)
    assert m.spearman == pytest.approx(1.0)
    assert m.monotone_frac == 1.0
    assert m.symmetry == pytest.approx(1 - 1 / 19)  # |3-3| + |7-6| over 3+3+7+6
    kl_08 = 0.5 * np.log(0.5 / 0.8) + 0.5 * np.log(0.5 / 0.2)
    assert m.kl[3] == pytest.approx(kl_08)
    assert m.kl[2] == 0.0
    np.testing.assert_allclose(m.tv, [0.4, 0.1, 0.0, 0.3, 0.4])
    # KL at +-1 are 0.020 and 0.193, at +-2 they are 0.511: the budget 0.25 stops at |alpha| = 1
    assert m.max_alpha_in_budget == 1.0
    table = format_table(m)
    assert "| +1 | +4.0000 |" in table and "slope +3.2" in table


def test_metrics_monotone_fraction_and_logits_input():
    alphas = np.array([-1.0, 0.0, 1.0, 2.0, 3.0])
    effect = np.array([[0.0, 0.0], [1.0, 1.0], [0.5, 0.5], [2.0, 2.0], [3.0, 3.0]])  # averaged over rows
    logits = jax.random.normal(jax.random.key(0), (5, 2, 3, 11))
    m = sweep_metrics(alphas, effect, logits)
    assert m.monotone_frac == 0.75  # three of four steps go up with the slope
    assert m.spearman == pytest.approx(0.9)  # ranks 0 2 1 3 4 against 0 1 2 3 4
    logp = jax.nn.log_softmax(logits)
    kl = (jnp.exp(logp[1]) * (logp[1] - logp[3])).sum(-1).mean()
    assert m.kl[3] == pytest.approx(float(kl), rel=1e-5)


def test_metrics_mask_leaves_padding_out():
    logits = jax.random.normal(jax.random.key(1), (3, 2, 4, 7))
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], bool)
    m = sweep_metrics([-1.0, 0.0, 1.0], [0.0, 0.0, 1.0], logits, mask=mask)
    logp = np.asarray(jax.nn.log_softmax(logits), np.float64)
    kl_tok = (np.exp(logp[1]) * (logp[1] - logp[2])).sum(-1)
    assert m.kl[2] == pytest.approx(kl_tok[mask].mean(), rel=1e-6)
    with pytest.raises(ValueError, match="mask must have shape"):
        sweep_metrics([-1.0, 0.0, 1.0], [0.0, 0.0, 1.0], logits, mask=mask[:, :3])


def test_metrics_errors():
    with pytest.raises(ValueError, match="include alpha=0"):
        sweep_metrics([1.0, 2.0], [0.0, 1.0], np.zeros((2, 3)))
    with pytest.raises(ValueError, match="one leading row per alpha"):
        sweep_metrics([0.0, 1.0], [0.0, 1.0, 2.0], np.zeros((2, 3)))


def test_plot_writes_png(tmp_path):
    logprobs = np.stack([_two_way(p) for p in (0.3, 0.5, 0.7)])
    m = sweep_metrics([-1.0, 0.0, 1.0], [-1.0, 0.0, 1.5], logprobs)
    path = plot_sweep(m, str(tmp_path / "sweep.png"))
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_plot_labels_every_line_and_gives_kl_and_tv_their_own_axes():
    logprobs = np.stack([_two_way(p) for p in (0.3, 0.5, 0.7)])
    m = sweep_metrics([-1.0, 0.0, 1.0], [-1.0, 0.0, 1.5], logprobs, kl_budget=0.05)
    fig = sweep_figure(m, title="t")
    effect_ax, kl_ax, tv_ax = fig.axes  # the effect panel; below it KL (left) and its twin TV axis (right)
    assert effect_ax.get_ylabel() == "effect" and effect_ax.get_title() == "t"
    assert "nats" in kl_ax.get_ylabel() and "KL" in kl_ax.get_ylabel()
    assert "TV" in tv_ax.get_ylabel() and tv_ax.get_shared_x_axes().joined(tv_ax, kl_ax)
    assert kl_ax.get_xlabel() == "alpha"
    for ax, legend_ax in ((effect_ax, effect_ax), (kl_ax, kl_ax), (tv_ax, kl_ax)):
        drawn = [line.get_label() for line in ax.get_lines()]
        shown = [t.get_text() for t in legend_ax.get_legend().get_texts()]
        assert drawn and set(drawn) <= set(shown), (drawn, shown)  # no line is missing from a legend
    assert "KL budget (0.05 nats)" in [t.get_text() for t in kl_ax.get_legend().get_texts()]
    budget = next(line for line in kl_ax.get_lines() if "budget" in line.get_label())
    assert np.allclose(budget.get_ydata(), 0.05)
    np.testing.assert_allclose(tv_ax.get_lines()[0].get_ydata(), m.tv)  # TV is on the TV axis, not the KL one
    np.testing.assert_allclose(kl_ax.get_lines()[0].get_ydata(), m.kl)


def test_sweep_modes_agree_on_qwen3_with_antipasto():
    from lora_jax import AntiPaSTOConfig
    from lora_jax.models import Qwen3, tiny_config

    cfg = AdapterConfig(rules=(Rule(pattern="o_proj|down_proj", variant=AntiPaSTOConfig(r=8)),))
    model = apply_adapters(Qwen3(tiny_config(n_layers=2), rngs=nnx.Rngs(0)), cfg)
    for i, (_, adapter) in enumerate(iter_adapters(model)):  # rotations and shifts start at 0
        adapter.rot_in.value = jax.random.normal(jax.random.key(i), adapter.rot_in.shape)
        adapter.delta_s.value = 0.3 * jax.random.normal(jax.random.key(i + 10), adapter.delta_s.shape)
    tokens = jax.random.randint(jax.random.key(3), (2, 6), 0, 259)
    mask = jnp.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], bool)
    fn = lambda m, b: m(b["tokens"], b["mask"])
    alphas = jnp.array([-1.0, 0.0, 0.5, 1.0])
    by_vmap = sweep(model, fn, alphas, inputs={"tokens": tokens, "mask": mask})
    by_rows = sweep(model, fn, alphas, inputs={"tokens": tokens, "mask": mask}, mode="rows")
    separate, forward = [], nnx.jit(lambda m, t, k: m(t, k))  # alpha is state: one compile for all four
    for a in alphas:
        m = nnx.clone(model)
        set_alpha(m, a)
        separate.append(forward(m, tokens, mask))
    np.testing.assert_allclose(by_vmap, jnp.stack(separate), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(by_rows, jnp.stack(separate), rtol=1e-4, atol=1e-4)
    assert np.abs(separate[0] - separate[1]).max() > 1e-2  # the adapters do something


def _hide_matplotlib(monkeypatch):
    """Make every ``import matplotlib...`` fail, as if the ``plot`` extra were not installed."""
    for name in [n for n in sys.modules if n == "matplotlib" or n.startswith("matplotlib.")] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)


def test_plot_without_matplotlib_names_the_extra(monkeypatch, tmp_path):
    logprobs = np.stack([_two_way(p) for p in (0.3, 0.5, 0.7)])
    m = sweep_metrics([-1.0, 0.0, 1.0], [-1.0, 0.0, 1.5], logprobs)
    _hide_matplotlib(monkeypatch)
    with pytest.raises(ImportError, match=r"pip install lora_jax\[plot\]"):
        sweep_figure(m)
    with pytest.raises(ImportError, match=r"pip install lora_jax\[plot\]"):
        plot_sweep(m, str(tmp_path / "sweep.png"))
    assert not (tmp_path / "sweep.png").exists()


def test_sweeps_and_metrics_need_no_matplotlib():
    """A fresh interpreter where matplotlib cannot be imported still sweeps and measures."""
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"
        "import jax.numpy as jnp, numpy as np\n"
        "from lora_jax.steering import format_table, sweep, sweep_metrics\n"
        "m = sweep_metrics([-1.0, 0.0, 1.0], [-1.0, 0.0, 1.0], np.zeros((3, 2)))\n"
        "print(format_table(m).splitlines()[0])\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("| alpha | effect |")
