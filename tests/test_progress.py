"""Progress lines are throttled by the clock, show the count and the values, and reach a
captured (non-terminal) stderr from the library's long loops."""

import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lora_jax as lj
from lora_jax.calibrate import collect_statistics, moments_init, moments_update
from lora_jax.progress import Progress, default_every


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def _bar(clock, **kw):
    out = io.StringIO()
    return Progress("train", 10, unit="steps", every=5.0, clock=clock, stream=out, **kw), out


def test_lines_are_throttled_by_the_clock():
    clock = FakeClock()
    bar, out = _bar(clock)
    for step in range(10):
        clock.now += 2.0  # a step every 2 s: a line at most every 5 s -> after steps 3, 6, 9
        bar.update(loss=1.0 / (step + 1))
    lines = out.getvalue().splitlines()
    assert [line.split(",")[0] for line in lines] == ["train 3/10 steps", "train 6/10 steps", "train 9/10 steps"]
    assert lines[0] == "train 3/10 steps, loss 0.3333 (6.0 s, about 14.0 s left)"  # rate from step 1 on: 2 s/step
    bar.close()
    assert out.getvalue().splitlines()[-1] == "train 10/10 steps, loss 0.1 (20.0 s, done)"
    bar.close()  # closing twice writes nothing more
    assert len(out.getvalue().splitlines()) == 4


def test_short_work_writes_nothing_and_due_tells_when_a_line_comes():
    clock = FakeClock()
    bar, out = _bar(clock)
    with bar:
        for _ in range(10):
            clock.now += 0.4
            assert not bar.due()
            bar.update()
    assert out.getvalue() == ""  # 4 s of work under a 5 s interval: silent, no closing line either
    bar, out = _bar(clock)
    clock.now += 5.0
    assert bar.due()
    bar.update()
    assert not bar.due() and out.getvalue().startswith("train 1/10 steps (5.0 s")


def test_unknown_total_error_note_and_disabled():
    clock = FakeClock()
    out = io.StringIO()
    with pytest.raises(RuntimeError), Progress("calibrating", unit="batches", every=1.0, clock=clock, stream=out) as b:
        clock.now += 1.5
        b.update(3)
        raise RuntimeError("boom")
    assert out.getvalue().splitlines() == [
        "calibrating 3 batches (1.5 s)",
        "calibrating 3 batches (1.5 s, stopped by an error)",
    ]
    bar, out = _bar(clock, enabled=False)
    clock.now += 60
    bar.update()
    bar.close()
    assert out.getvalue() == "" and not bar.due()


def test_interval_from_the_environment(monkeypatch):
    monkeypatch.delenv("LORA_JAX_PROGRESS", raising=False)
    assert default_every() == 10.0
    monkeypatch.setenv("LORA_JAX_PROGRESS", "2.5")
    assert default_every() == 2.5 and Progress("x").every == 2.5
    monkeypatch.setenv("LORA_JAX_PROGRESS", "off")
    assert default_every() is None and not Progress("x").enabled
    monkeypatch.setenv("LORA_JAX_PROGRESS", "soon")
    with pytest.raises(ValueError, match="LORA_JAX_PROGRESS='soon': give the seconds"):
        default_every()
    with pytest.raises(ValueError, match="positive number of seconds"):
        Progress("x", every=0)


def test_values_are_formatted_only_when_a_line_is_written():
    class Loud:
        def __float__(self):
            raise AssertionError("formatted on a step that wrote no line")

    clock = FakeClock()
    bar, out = _bar(clock)
    bar.update(loss=Loud())  # no line due: never converted
    clock.now += 5.0
    bar.update(loss=jnp.float32(0.5), note="warm")
    assert "loss 0.5, note warm" in out.getvalue()


class _Net(nnx.Module):
    def __init__(self, rngs):
        self.layers = nnx.List([nnx.Linear(8, 8, rngs=rngs) for _ in range(3)])

    def __call__(self, x):
        for layer in self.layers:
            x = jnp.tanh(layer(x))
        return x


def test_calibration_and_svd_init_write_progress_to_a_captured_stderr(monkeypatch, capfd):
    """stderr is a pipe here, not a terminal: the lines must still come (tqdm's disable=None would hide them)."""
    monkeypatch.setenv("LORA_JAX_PROGRESS", "1e-9")  # every update is due
    net = _Net(nnx.Rngs(0))
    cfg = lj.AdapterConfig(rules=(lj.Rule(pattern="layers", variant=lj.PiSSAConfig(r=2)),))
    model = lj.apply_adapters(net, cfg)
    batches = [jax.random.normal(jax.random.key(i), (4, 8)) for i in range(3)]
    collect_statistics(model, batches, paths=["layers.1"], init=moments_init, update=moments_update)
    err = capfd.readouterr().err.splitlines()
    assert any(line.startswith("apply_adapters 2/3 layers") for line in err), err
    assert any(line.startswith("apply_adapters 3/3 layers") and "done)" in line for line in err), err
    assert any(line.startswith("calibrating 3/3 batches") for line in err), err
    assert np.isfinite(np.asarray(model(batches[0]))).all()
