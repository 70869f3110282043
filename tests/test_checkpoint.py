"""Adapter checkpoints: round trips, size, failures that name paths, killed saves, resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from helpers import perturb as move_adapters

from lora_jax import AdapterConfig, AdapterParam, LoRAConfig, Rule, apply_adapters, iter_adapters, set_alpha
from lora_jax.adapter import ADAPTER_VARIABLES
from lora_jax.checkpoint import CheckpointError, TrainCheckpointer, restore, save

ROOT = Path(__file__).resolve().parents[1]


class MLP(nnx.Module):
    def __init__(self, d_in=16, d_hidden=16, d_out=16, *, seed=0, names=("up", "down")):
        rngs = nnx.Rngs(seed)
        self.names = names
        setattr(self, names[0], nnx.Linear(d_in, d_hidden, rngs=rngs))
        setattr(self, names[1], nnx.Linear(d_hidden, d_out, rngs=rngs))

    def __call__(self, x):
        return getattr(self, self.names[1])(jax.nn.gelu(getattr(self, self.names[0])(x)))


def lora_cfg(seed=0, r=4, dropout=0.0):
    return AdapterConfig(rules=(Rule(pattern="up|down", variant=LoRAConfig(r=r, dropout=dropout)),), seed=seed)


def perturb(model, seed=1):
    """Move every adapter weight away from its init, as training would."""
    move_adapters(model, 0.1, seed)


def snapshot(model):
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))


def assert_same_tree(a, b):
    jax.tree.map(np.testing.assert_array_equal, a, b)


def version_dir(path):
    """The complete Orbax checkpoint that the one-shot checkpoint ``path`` points to."""
    return path / (path / "CURRENT").read_text()


@pytest.fixture
def saved(tmp_path):
    model = apply_adapters(MLP(), lora_cfg(seed=5))
    perturb(model)
    return save(tmp_path / "ckpt", model), model


# Every variant's bit-exact round trip (outputs and every Variable) is in tests/test_contract.py.


def test_checkpoint_holds_no_base_weight(tmp_path):
    class Wide(nnx.Module):
        def __init__(self):
            self.proj = nnx.Linear(512, 512, rngs=nnx.Rngs(0))

    model = apply_adapters(Wide(), AdapterConfig(rules=(Rule(pattern="proj", variant=LoRAConfig(r=64)),)))
    perturb(model)  # random values: zeros would compress to nothing
    adapter_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, ADAPTER_VARIABLES)))
    path = save(tmp_path / "wide", model)
    on_disk = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert on_disk <= 1.1 * adapter_bytes, (on_disk, adapter_bytes)
    assert on_disk < 512 * 512 * 4 / 2  # far below one base kernel


def test_save_refuses_to_overwrite_unless_asked(saved):
    path, model = saved
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save(path, model)
    set_alpha(model, 0.25)
    save(path, model, overwrite=True)
    assert float(next(iter_adapters(restore(path, MLP())))[1].alpha[...]) == 0.25
    assert sorted(p.name for p in path.parent.iterdir()) == ["ckpt"]


def test_save_needs_adapters(tmp_path):
    with pytest.raises(ValueError, match="holds no adapter"):
        save(tmp_path / "x", MLP())


def _expect_failure(path, base, match):
    before = snapshot(base)
    with pytest.raises(CheckpointError, match=match):
        restore(path, base)
    assert_same_tree(snapshot(base), before)
    assert list(iter_adapters(base)) == []


def test_restore_onto_other_paths_names_them(saved):
    _expect_failure(saved[0], MLP(names=("fc1", "fc2")), r"no layer at \['down', 'up'\]")


def test_restore_onto_other_shapes_names_them(saved):
    _expect_failure(saved[0], MLP(d_out=12), r"shape/dtype differs.*down\.lora_b: checkpoint \(\(4, 16\)")


def test_restore_with_missing_and_extra_keys_names_them(tmp_path, saved):
    path, model = saved
    meta = json.loads((version_dir(path) / "meta" / "metadata").read_text())
    tree = nnx.to_pure_dict(nnx.state(model, ADAPTER_VARIABLES))
    del tree["down"]["lora_b"]
    tree["up"]["extra"] = jnp.ones(3)
    bad = tmp_path / "tampered"
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ck:
        ck.save(bad, args=ocp.args.Composite(adapter=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)))
    _expect_failure(bad, MLP(), r"missing from the checkpoint: \['down\.lora_b'\].*not in the model: \['up\.extra'\]")


def test_restore_unknown_variant_names_the_adapter(saved):
    path, _ = saved
    meta_file = version_dir(path) / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    meta["adapter_config"]["rules"][meta["paths"].index("down")]["variant"]["variant"] = "no_such_variant"
    meta_file.write_text(json.dumps(meta))
    _expect_failure(path, MLP(), r"adapter at 'down' cannot be rebuilt: unknown variant 'no_such_variant'")


def _truncate(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _flip(data: bytes) -> bytes:
    mid = len(data) // 2
    return data[:mid] + bytes(b ^ 0xFF for b in data[mid : mid + 8]) + data[mid + 8 :]


# An unraisable exception (Orbax's "Event loop is closed" after a failed read) fails these.
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", [_truncate, _flip], ids=["truncated", "bit_flipped"])
@pytest.mark.parametrize("files", ["d/*", "_METADATA"])
def test_restore_damaged_arrays(saved, files, damage):
    path, _ = saved
    for f in (version_dir(path) / "adapter").glob(files):
        f.write_bytes(damage(f.read_bytes()))
    _expect_failure(path, MLP(), r"item 'adapter'.*truncated or corrupted")


DAMAGED_RESTORE_SCRIPT = """
import gc, sys, time
sys.path.insert(0, {tests!r})
from test_checkpoint import MLP, lora_cfg, perturb, version_dir, _flip, _truncate
from lora_jax import apply_adapters
from lora_jax.checkpoint import CheckpointError, restore, save
model = apply_adapters(MLP(), lora_cfg())
perturb(model)
for i, damage in enumerate([_truncate, _flip]):
    path = save({tmp!r} + f"/c{{i}}", model)
    for f in (version_dir(path) / "adapter").glob("d/*"):
        f.write_bytes(damage(f.read_bytes()))
    try:
        restore(path, MLP())
    except CheckpointError as err:
        print("refused:", str(err)[:80])
gc.collect()
time.sleep(1.0)  # Orbax's leftover reads finish in tensorstore's threads meanwhile
"""


def test_failed_restore_prints_no_traceback(tmp_path):
    script = DAMAGED_RESTORE_SCRIPT.format(tests=str(ROOT / "tests"), tmp=str(tmp_path))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("refused:") == 2, proc.stdout
    assert "Traceback" not in proc.stderr and "Event loop is closed" not in proc.stderr, proc.stderr[-2000:]


def _edit_meta(path, edit):
    meta_file = version_dir(path) / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    edit(meta)
    meta_file.write_text(json.dumps(meta))


def test_restore_meta_with_an_extra_path_names_it(saved):
    _edit_meta(saved[0], lambda meta: meta["paths"].append("head"))
    _expect_failure(saved[0], MLP(), r"lists 3 adapter paths .* for 2 rules.*without a partner: \['head'\]")


def test_restore_edited_config_is_refused(saved):
    def edit(meta):
        meta["adapter_config"]["rules"][0]["variant"]["lora_alpha"] *= 2

    _edit_meta(saved[0], edit)
    _expect_failure(saved[0], MLP(), r"adapter config in the 'meta' record changed since it was saved")


def test_restore_edited_weights_are_refused(tmp_path, saved):
    path, model = saved
    meta = json.loads((version_dir(path) / "meta" / "metadata").read_text())
    perturb(model, seed=7)  # same shapes and record, other values: only the digest can tell
    tree = nnx.to_pure_dict(nnx.state(model, ADAPTER_VARIABLES))
    bad = tmp_path / "edited"
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ck:
        ck.save(bad, args=ocp.args.Composite(adapter=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)))
    _expect_failure(bad, MLP(), r"adapter weights changed since they were saved")


def test_restore_corrupted_meta(saved):
    path, _ = saved
    (version_dir(path) / "meta" / "metadata").write_text("{not json")
    _expect_failure(path, MLP(), "cannot read the 'meta' record")


def test_restore_missing_directory(tmp_path):
    _expect_failure(tmp_path / "nothing", MLP(), "no checkpoint directory")


KILL_SCRIPT = """
import os, signal, sys
from orbax.checkpoint._src.path import atomicity
import orbax.checkpoint as ocp
sys.path.insert(0, {tests!r})
from test_checkpoint import MLP, lora_cfg, perturb
from lora_jax import AdapterParam, apply_adapters
from lora_jax.checkpoint import oneshot, save, TrainCheckpointer
import optax
from flax import nnx

async def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

def die_at(step):
    if step == {where!r}:
        os.kill(os.getpid(), signal.SIGKILL)

if {where!r} == "before_commit":
    atomicity.AtomicRenameTemporaryPath.finalize = die
elif {where!r} == "while_writing":
    ocp.JsonCheckpointHandler.async_save = die
else:
    oneshot._reached = die_at
model = apply_adapters(MLP(), lora_cfg())
perturb(model, seed=99)
if {what!r} == "save":
    save({path!r}, model, overwrite=True)
else:
    ckpt = TrainCheckpointer({path!r}, save_every=2, async_save=False)
    ckpt.save(4, model, nnx.Optimizer(model, optax.adam(1e-3), wrt=AdapterParam))
print("save returned: the kill did not happen")
"""


def _killed(what, path, where):
    script = KILL_SCRIPT.format(tests=str(ROOT / "tests"), where=where, what=what, path=str(path))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stdout + proc.stderr[-2000:]


# In the order a save reaches them; the pointer swap lies between "staged" and "swapped".
SAVE_STEPS = ["started", "while_writing", "before_commit", "written", "staged", "swapped", "cleaning"]


@pytest.mark.parametrize("where", SAVE_STEPS)
def test_overwrite_killed_at_each_step_keeps_old_or_new(tmp_path, where):
    x = jax.random.normal(jax.random.key(0), (3, 16))
    old = apply_adapters(MLP(), lora_cfg())
    perturb(old)
    path = save(tmp_path / "ckpt", old)
    _killed("save", path, where)
    new = apply_adapters(MLP(), lora_cfg())
    perturb(new, seed=99)  # what the killed child was writing
    expected = old if SAVE_STEPS.index(where) < SAVE_STEPS.index("swapped") else new
    np.testing.assert_array_equal(restore(path, MLP())(x), expected(x))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # nothing beside it
    third = apply_adapters(MLP(), lora_cfg())
    perturb(third, seed=3)
    save(path, third, overwrite=True)  # removes whatever the kill left inside
    assert sorted(p.name for p in path.iterdir()) == ["CURRENT", (path / "CURRENT").read_text()]
    np.testing.assert_array_equal(restore(path, MLP())(x), third(x))


def test_first_save_killed_leaves_no_checkpoint_and_a_free_path(tmp_path):
    path = tmp_path / "ckpt"
    _killed("save", path, "staged")
    _expect_failure(path, MLP(), r"holds no complete checkpoint.*a first save killed")
    model = apply_adapters(MLP(), lora_cfg())
    save(path, model)  # no overwrite=True needed: there was no checkpoint
    assert sorted(p.name for p in path.iterdir()) == ["CURRENT", (path / "CURRENT").read_text()]


@pytest.mark.parametrize("where", ["before_commit", "while_writing"])
def test_killed_train_save_leaves_previous_checkpoint(tmp_path, where):
    model = apply_adapters(MLP(), lora_cfg())
    perturb(model)
    run = tmp_path / "run"
    with TrainCheckpointer(run, save_every=2, async_save=False) as ckpt:
        ckpt.save(2, model, nnx.Optimizer(model, optax.adam(1e-3), wrt=AdapterParam))
    _killed("train", run, where)
    assert any(".orbax-checkpoint-tmp" in p.name for p in run.iterdir())  # what the kill left
    x = jax.random.normal(jax.random.key(0), (3, 16))
    fresh = apply_adapters(MLP(), lora_cfg(seed=3))
    with TrainCheckpointer(run, save_every=2) as ckpt:
        assert ckpt.all_steps() == [2]
        assert ckpt.restore(fresh) == 2
    np.testing.assert_array_equal(fresh(x), model(x))
    assert sorted(p.name for p in run.iterdir()) == ["2"]  # the killed save's temporary is gone


def test_reads_and_replaces_a_format_1_checkpoint(tmp_path, saved):
    """Format 1 wrote the Orbax checkpoint at ``path`` itself, without a digest."""
    path, model = saved
    meta = json.loads((version_dir(path) / "meta" / "metadata").read_text())
    meta = {**{k: v for k, v in meta.items() if k != "digest"}, "format": 1}
    tree = nnx.to_pure_dict(nnx.state(model, ADAPTER_VARIABLES))
    old = tmp_path / "format1"
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ck:
        ck.save(old, args=ocp.args.Composite(adapter=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)))
    x = jax.random.normal(jax.random.key(0), (3, 16))
    np.testing.assert_array_equal(restore(old, MLP())(x), model(x))
    with pytest.raises(FileExistsError, match="holds a checkpoint; pass overwrite=True"):
        save(old, model)
    set_alpha(model, 0.5)
    save(old, model, overwrite=True)
    assert sorted(p.name for p in old.iterdir()) == ["CURRENT", (old / "CURRENT").read_text()]
    np.testing.assert_array_equal(restore(old, MLP())(x), model(x))


def test_restore_names_what_an_older_overwrite_left(tmp_path, saved):
    path, _ = saved
    path.rename(path.with_name("ckpt.new-1a2b3c4d"))
    (tmp_path / "ckpt.old-5e6f7a8b").mkdir()
    _expect_failure(path, MLP(), r"no checkpoint directory.*\['ckpt.new-1a2b3c4d', 'ckpt.old-5e6f7a8b'\].*rename")


def test_restore_refuses_a_pointer_to_nothing(saved):
    path, _ = saved
    (path / "CURRENT").write_text("v-" + "0" * 32)
    _expect_failure(path, MLP(), r"CURRENT file names 'v-0+', which is not a checkpoint version there")


def test_save_refuses_a_foreign_directory(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    model = apply_adapters(MLP(), lora_cfg())
    with pytest.raises(FileExistsError, match=r"not a lora_jax checkpoint \(\['todo.txt'\]\)"):
        save(tmp_path / "notes", model, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "notes").iterdir()) == ["todo.txt"]


def _train(model, optimizer, steps, ckpt=None):
    @nnx.jit
    def step_fn(model, optimizer, x, y):
        def loss_fn(model):
            return jnp.mean((model(x) - y) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, AdapterParam))(model)
        optimizer.update(model, grads)
        return loss

    losses = []
    for step in steps:
        kx, ky = jax.random.split(jax.random.key(step))  # the batch depends on the step only
        losses.append(float(step_fn(model, optimizer, jax.random.normal(kx, (8, 16)), jax.random.normal(ky, (8, 16)))))
        if ckpt is not None:
            ckpt.save(step, model, optimizer, metrics={"loss": losses[-1]})
    return losses


def test_resume_gives_the_same_loss_trajectory(tmp_path):
    def fresh(seed):
        model = apply_adapters(MLP(), lora_cfg(seed=seed, dropout=0.2))
        return model, nnx.Optimizer(model, optax.adam(1e-2), wrt=AdapterParam)

    straight = _train(*fresh(0), range(1, 9))
    with TrainCheckpointer(tmp_path / "run", save_every=2, keep_last=2, best_metric="loss") as ckpt:
        first = _train(*fresh(0), range(1, 6), ckpt)  # "crashes" after step 5; step 4 is saved
        ckpt.wait()
    model, optimizer = fresh(1)  # another adapter init and dropout key: both come from the checkpoint
    with TrainCheckpointer(tmp_path / "run", save_every=2, keep_last=2, best_metric="loss") as ckpt:
        start = ckpt.restore(model, optimizer)
        assert start == 4
        resumed = _train(model, optimizer, range(start + 1, 9), ckpt)
        ckpt.wait()
        losses = dict(zip(range(1, 9), first[:4] + resumed, strict=True))
        best = min((losses[s], s) for s in (2, 4, 6, 8))[1]
        assert ckpt.best_step() == best
        assert set(ckpt.all_steps()) == {6, 8, best}
    assert first == straight[:5]
    assert resumed == straight[4:]


def test_train_restore_rejects_another_config(tmp_path):
    model = apply_adapters(MLP(), lora_cfg())
    with TrainCheckpointer(tmp_path / "run", save_every=1, async_save=False) as ckpt:
        ckpt.save(1, model, nnx.Optimizer(model, optax.adam(1e-3), wrt=AdapterParam))
        other = apply_adapters(MLP(), lora_cfg(r=2))
        with pytest.raises(CheckpointError, match="adapters differ from the model's"):
            ckpt.restore(other)
    with TrainCheckpointer(tmp_path / "b", save_every=1, best_metric="loss") as ckpt:
        with pytest.raises(ValueError, match="pass metrics"):
            ckpt.save(1, model, nnx.Optimizer(model, optax.adam(1e-3), wrt=AdapterParam))


def test_train_restore_into_a_model_without_adapters(tmp_path):
    model = apply_adapters(MLP(), lora_cfg())
    with TrainCheckpointer(tmp_path / "run", save_every=1, async_save=False) as ckpt:
        ckpt.save(1, model, nnx.Optimizer(model, optax.adam(1e-3), wrt=AdapterParam))
        with pytest.raises(CheckpointError, match=r"model has no adapters.*call apply_adapters\(model, cfg\)"):
            ckpt.restore(MLP())


def test_train_restore_of_a_damaged_latest_step_names_the_good_ones(tmp_path):
    model = apply_adapters(MLP(), lora_cfg())
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=AdapterParam)
    x = jax.random.normal(jax.random.key(0), (3, 16))
    outputs = {}
    with TrainCheckpointer(tmp_path / "run", save_every=1, keep_last=3, async_save=False) as ckpt:
        for step in (1, 2, 3):
            perturb(model, seed=step)
            outputs[step] = model(x)
            ckpt.save(step, model, optimizer)
    for f in (tmp_path / "run" / "3" / "adapter").glob("d/*"):
        f.write_bytes(_flip(f.read_bytes()))
    fresh = apply_adapters(MLP(), lora_cfg(seed=4))
    fresh_opt = nnx.Optimizer(fresh, optax.adam(1e-3), wrt=AdapterParam)
    before = snapshot(fresh), jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(fresh_opt)))
    with TrainCheckpointer(tmp_path / "run", save_every=1, keep_last=3) as ckpt:
        with pytest.raises(
            CheckpointError,
            match=r"step 3 cannot be restored \(steps that read cleanly: \[2, 1\]; restore one with "
            r"restore\(model, optimizer, step=2\)\).*item 'adapter'.*corrupted",
        ):
            ckpt.restore(fresh, fresh_opt)
        assert_same_tree(snapshot(fresh), before[0])  # the probing of steps 2 and 1 changed nothing
        assert_same_tree(jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(fresh_opt))), before[1])
        assert ckpt.restore(fresh, fresh_opt, step=2) == 2
    np.testing.assert_array_equal(fresh(x), outputs[2])
