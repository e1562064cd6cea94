"""Editor checkpoints: resume after an interruption, best/latest retention, clear errors."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from test_mend_train import tiny_setup, trained_run

from salem_jax.mend.apply import load_editor
from salem_jax.mend.checkpoint import CheckpointError, CheckpointMismatch, restore_editor, steps_in
from salem_jax.mend.train import train_editor
from salem_jax.models.base import set_path


def _assert_trees_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _metrics(workdir):
    return [json.loads(x) for x in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def test_interrupted_run_resumes_as_if_never_interrupted(tmp_path):
    model, data, weights, cfg, mesh = tiny_setup()
    full, full_dir, _, _ = trained_run()
    # "Crash" at step 60: checkpoints exist for 25 and 50, steps 51-60 are lost.
    part = train_editor(model, data, weights, cfg, tmp_path, mesh=mesh, progress=False, stop_after=60)
    assert part.step == 60 and steps_in(tmp_path / "checkpoints")[-1] == 50
    resumed = train_editor(model, data, weights, cfg, tmp_path, mesh=mesh, progress=False)
    assert resumed.step == cfg.max_steps
    _assert_trees_equal(resumed.params, full.params)
    _assert_trees_equal(resumed.norm, full.norm)
    assert resumed.best_step == full.best_step and resumed.best_val_loss == full.best_val_loss
    # metrics.jsonl is rewritten from the checkpoint on: identical to the uninterrupted run's
    assert _metrics(tmp_path) == _metrics(full_dir)

    # a finished run is not silently restarted
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        train_editor(model, data, weights, cfg, tmp_path, mesh=mesh, progress=False, resume=False)


def test_mismatched_checkpoints_are_refused(tmp_path):
    model, data, weights, cfg, mesh = tiny_setup()
    _, full_dir, _, _ = trained_run()
    work = tmp_path / "w"
    shutil.copytree(full_dir, work)
    other_weights = model.layers.weights(["h.0"], part="attention")
    with pytest.raises(CheckpointMismatch, match="edits weights"):
        train_editor(model, data, other_weights, cfg, work, mesh=mesh, progress=False)
    renamed = dataclasses.replace(model, name="another-model")
    with pytest.raises(CheckpointMismatch, match="another-model"):
        train_editor(renamed, data, weights, cfg, work, mesh=mesh, progress=False)
    with pytest.raises(CheckpointMismatch, match="lr: saved 0.001, now 0.5"):
        train_editor(model, data, weights, dataclasses.replace(cfg, lr=0.5), work, mesh=mesh, progress=False)
    with pytest.raises(CheckpointMismatch, match="another-model"):
        load_editor(work, renamed)
    assert load_editor(work, renamed, check_name=False).spec.weights == tuple(weights)  # e.g. an edited copy
    path = weights[0].path
    wider = dataclasses.replace(model, params=set_path(model.params, path, np.zeros((64, 32), np.float32)))
    with pytest.raises(CheckpointMismatch, match=r"shape \(32, 128\), but this model's is \(64, 32\)"):
        load_editor(work, wider, check_name=False)


def test_retention_best_and_corruption(tmp_path):
    model, data, weights, cfg, mesh = tiny_setup()
    full, full_dir, _, _ = trained_run()
    ckpts = tmp_path / "checkpoints"
    shutil.copytree(full_dir / "checkpoints", ckpts)
    # checkpoints at 25, 50 (val), 75, 100 (val); keep the last 2 and the best validated one
    assert cfg.keep_checkpoints == 2 and full.best_step in (50, 100)
    assert steps_in(ckpts) == sorted({75, 100, full.best_step})
    spec, params, _, meta = restore_editor(ckpts, "latest")
    assert meta["step"] == 100 and spec == full.spec
    _assert_trees_equal(params, full.params)
    assert restore_editor(ckpts, "best")[3]["step"] == full.best_step

    # an interrupted save leaves only a temporary folder: it is not a checkpoint
    (ckpts / "125.orbax-checkpoint-tmp-1234567").mkdir()
    assert steps_in(ckpts) == sorted({75, 100, full.best_step})

    # damage the latest checkpoint's arrays: a clear error that names the older ones, which stay
    for f in (ckpts / "100" / "editor").rglob("*"):
        if f.is_file():
            f.write_bytes(b"\0garbage")
    with pytest.raises(CheckpointError, match=r"100 cannot be read.*Older checkpoints kept.*75"):
        restore_editor(ckpts, 100)
    assert restore_editor(ckpts, 75)[3]["step"] == 75
    (ckpts / "75" / "meta" / "metadata").write_text("{not json")
    with pytest.raises(CheckpointError, match="75 cannot be read"):
        restore_editor(ckpts, 75)
    with pytest.raises(CheckpointError, match="no editor checkpoint"):
        restore_editor(tmp_path / "empty")


_CHILD = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {tests!r})
    import salem_jax.mend.train as train
    from test_mend_train import tiny_setup

    slow = train.train_batch
    def train_batch(*a, **k):  # slow the run down so the parent can kill it mid-way
        time.sleep(0.2)
        return slow(*a, **k)
    train.train_batch = train_batch
    model, data, weights, cfg, mesh = tiny_setup()
    train.train_editor(model, data, weights, cfg, {workdir!r}, mesh=mesh, progress=False)
    """
)


@pytest.mark.slow
def test_sigkill_then_resume(tmp_path):
    """A real `kill -9` mid-run, then a resume in this process: same final editor."""
    model, data, weights, cfg, mesh = tiny_setup()
    full, _, _, _ = trained_run()
    work = tmp_path / "killed"
    script = tmp_path / "child.py"
    script.write_text(_CHILD.format(tests=str(Path(__file__).parent), workdir=str(work)))
    child = subprocess.Popen([sys.executable, str(script)], env=dict(os.environ), stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 600
        while not (work / "checkpoints" / "50").is_dir():
            assert child.poll() is None, "the child finished or died before its step-50 checkpoint"
            assert time.time() < deadline
            time.sleep(0.2)
        time.sleep(1.0)
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signal.SIGKILL
    left = steps_in(work / "checkpoints")
    assert 50 in left and max(left) < cfg.max_steps
    for step in left:  # whatever the kill interrupted, every checkpoint that is listed is whole
        assert restore_editor(work / "checkpoints", step)[3]["step"] == step
    resumed = train_editor(model, data, weights, cfg, work, mesh=mesh, progress=False)
    _assert_trees_equal(resumed.params, full.params)
    _assert_trees_equal(resumed.norm, full.norm)


def test_early_stopping_is_kept_across_a_resume(tmp_path):
    model, data, weights, cfg, mesh = tiny_setup()
    # patience 0: stop at the first validation (only loop settings change: no recompilation)
    cfg = dataclasses.replace(cfg, val_every=10, patience=0)
    res = train_editor(model, data, weights, cfg, tmp_path, mesh=mesh, progress=False)
    assert res.stopped_early and res.step == 10 and res.best_step == 10 and res.recompiles == 0
    lines = (tmp_path / "metrics.jsonl").read_text()
    again = train_editor(model, data, weights, cfg, tmp_path, mesh=mesh, progress=False)
    assert again.stopped_early and again.step == 10
    assert (tmp_path / "metrics.jsonl").read_text() == lines


@pytest.mark.parametrize("field", ["extra_pass_per_group", "own_pass_per_group"])
def test_checkpoints_without_a_later_field_still_resume(field):
    """A checkpoint written before `field` existed was written with its default, 0: it resumes a run
    with 0 and is refused for a run with 2 (the field changes the trajectory)."""
    from salem_jax.mend.checkpoint import check_compatible
    from salem_jax.mend.editor import EditorSpec
    from salem_jax.mend.train import TrainConfig
    from salem_jax.models import hf

    model = hf.tiny("gpt2", n_layer=1)
    spec = EditorSpec.from_params(model.layers.weights(["h.0"]), model.params)
    cfg = TrainConfig.tiny(pass_per_group=4)
    old = cfg.to_dict()
    del old[field]
    meta = {"model": "m", "spec": spec.to_dict(), "config": old}
    check_compatible(meta, "m", spec, cfg, where="ckpt")  # no error
    with pytest.raises(CheckpointMismatch, match=f"{field}: saved 0, now 2"):
        check_compatible(meta, "m", spec, dataclasses.replace(cfg, **{field: 2}), where="ckpt")

