"""Failure modes of the `salem` commands on tiny models: each bad input or fault gives one line
`salem <command>: error: ...` and exit code 2 (before any costly step where it can), and the
library keeps its data safe (issue 18; README "Failure modes")."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from test_mend_train import COUNTRIES, synthetic_rows, tiny_setup, trained_run

from salem_jax import cli
from salem_jax.errors import UserError
from salem_jax.models import save_model
from salem_jax.models.base import get_path, set_path


def error_line(capsys, command: str) -> str:
    """The one error line a failed command printed (and no traceback)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [x for x in err.splitlines() if x.startswith(f"salem {command}: error: ")]
    assert len(lines) == 1, err
    return lines[0][len(f"salem {command}: error: "):]


# ------------------------------------------------------------------------------- salem edit


@pytest.fixture(scope="module")
def edit_setup(tmp_path_factory):
    """(folder, base model folder, editor workdir, a good request) for `salem edit`."""
    model = tiny_setup()[0]
    _, work, _, _ = trained_run()
    d = tmp_path_factory.mktemp("edit")
    base = save_model(model, model.params, d / "tiny-gpt2")  # a folder's model is named after it
    other = save_model(model, model.params, d / "another-model")
    return d, base, other, work, {"prompt": "the capital of peru is", "target": "lima"}


def _edit(d, base, work, requests: str, *extra):
    (d / "r.jsonl").write_text(requests)
    return cli.main(["edit", "--model", str(base), "--editor", str(work), "--requests", str(d / "r.jsonl"),
                     "--out", str(d / "edited"), "--no-progress", *extra])


@pytest.mark.parametrize(
    "requests, message",
    [
        ('{"prompt": "a", "target": "b"}\nnot json\n', "line 2: not valid JSON"),
        ('{"prompt": "a"}\n', "line 1: field 'target' is missing"),
        ('{"prompt": "a", "target": "  "}\n', "line 1: field 'target' must be a non-empty string"),
        ('{"prompt": "a", "target": null}\n', "line 1: field 'target' must be a non-empty string"),
        ("[1, 2]\n", "line 1: expected an object"),
        ("\n\n", "no edit requests"),
    ],
)
def test_edit_bad_requests_are_one_line_before_the_model_loads(edit_setup, capsys, monkeypatch, requests, message):
    from salem_jax import models

    d, base, _, work, _ = edit_setup
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model must not be loaded"))
    assert _edit(d, base, work, requests) == 2
    assert message in error_line(capsys, "edit")


def test_edit_refuses_bad_editor_and_out_before_loading(edit_setup, capsys, monkeypatch, tmp_path):
    from salem_jax import models

    d, base, _, work, req = edit_setup
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model must not be loaded"))
    good = json.dumps(req) + "\n"
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("mine")
    assert _edit(d, base, work, good, "--out", str(tmp_path / "notes")) == 2
    assert "does not look like a saved model; not replacing it" in error_line(capsys, "edit")
    assert (tmp_path / "notes" / "a.txt").read_text() == "mine"
    assert _edit(d, base, tmp_path / "notes", good) == 2
    assert "holds no editor checkpoint" in error_line(capsys, "edit")
    assert _edit(d, base, tmp_path / "nowhere", good) == 2
    assert "no such folder" in error_line(capsys, "edit")
    assert _edit(d, base, work, good, "--step", "x7") == 2
    assert "expected best, latest or a step number" in error_line(capsys, "edit")


def test_edit_refuses_an_editor_of_another_model(edit_setup, capsys):
    d, _, other, work, req = edit_setup
    assert _edit(d, other, work, json.dumps(req) + "\n") == 2
    assert "was trained for model 'tiny-gpt2', not 'another-model'" in error_line(capsys, "edit")
    assert not (d / "edited").exists()


def test_edit_long_request_is_named_with_its_length(edit_setup, capsys):
    d, base, _, work, req = edit_setup
    long = {"prompt": " ".join(["red"] * 70), "target": "lima"}  # the tiny GPT-2 has 64 positions
    assert _edit(d, base, work, json.dumps(req) + "\n\n" + json.dumps(long) + "\n") == 2
    msg = error_line(capsys, "edit")
    assert msg.startswith(f"{d / 'r.jsonl'} line 3: prompt + target is 72 tokens, more than the model's context (64 tokens)")
    assert _edit(d, base, work, json.dumps(req) + "\n", "--max-tokens", "4") == 2
    msg = error_line(capsys, "edit")
    assert "line 1: prompt + target is 7 tokens, more than the limit of 4 tokens" in msg
    assert not (d / "edited").exists()


def test_edited_model_with_non_finite_weights_is_never_written(edit_setup, tmp_path):
    from salem_jax.mend.apply import save_edited

    model = tiny_setup()[0]
    path = "transformer/h/0/mlp/c_fc/kernel"
    bad = set_path(model.params, path, get_path(model.params, path).at[0, 0].set(np.nan))
    with pytest.raises(UserError, match="non-finite values .* in transformer/h/0/mlp/c_fc/kernel"):
        save_edited(model, bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    inf = set_path(model.params, path, get_path(model.params, path).at[1, 2].set(np.inf))
    with pytest.raises(UserError, match="c_fc/kernel"):
        save_edited(model, inf, tmp_path / "out")
    assert save_edited(model, model.params, tmp_path / "out")  # finite: written


# ------------------------------------------------------------------- checkpoints and training


def _copy_run(tmp_path):
    import shutil

    _, work, _, _ = trained_run()
    shutil.copytree(work, tmp_path / "run")
    return tmp_path / "run"


def test_resume_falls_back_past_a_truncated_checkpoint(tmp_path, capfd):
    from salem_jax.mend.checkpoint import steps_in
    from salem_jax.mend.train import train_editor

    model, data, weights, cfg, mesh = tiny_setup()
    full = trained_run()[0]
    run = _copy_run(tmp_path)
    assert max(steps_in(run / "checkpoints")) == 100
    # truncate every array file of the newest step, as a full disk or a copy cut short would
    for f in (run / "checkpoints" / "100").rglob("*"):
        if f.is_file() and f.stat().st_size > 64 and "meta" not in f.parts:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    capfd.readouterr()
    res = train_editor(model, data, weights, cfg, run, mesh=mesh, progress=False)
    err = capfd.readouterr().err
    assert "Traceback" not in err and "ERROR" not in err, err
    lines = [x for x in err.splitlines() if x.strip() and not x.startswith("train-editor: ")]  # (what it keeps, runs)
    assert len(lines) == 2, err
    assert lines[0].startswith("checkpoint step 100 cannot be read (") and f"moved it to {run / 'checkpoints.damaged'}/100-" in lines[0]
    assert lines[1] == f"resuming from step 75 of 100 ({run / 'checkpoints'})"
    # the damaged step is kept aside, and the resumed run ends where the uninterrupted one did
    moved = list((run / "checkpoints.damaged").iterdir())
    assert len(moved) == 1 and moved[0].name.startswith("100-") and any(moved[0].rglob("*"))
    assert res.step == 100 and 100 in steps_in(run / "checkpoints")
    for a, b in zip(jax.tree.leaves(res.params), jax.tree.leaves(full.params)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(x)["split"] == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == 100


def test_non_finite_loss_stops_at_once_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    import dataclasses

    from salem_jax.mend import train
    from salem_jax.mend.checkpoint import restore_editor, steps_in

    model, data, weights, cfg, mesh = tiny_setup()
    cfg = dataclasses.replace(cfg, max_steps=30, val_every=10, checkpoint_every=10, log_every=5)
    real = train.train_batch

    def poisoned(d, c, step, flat=None):  # from step index 22 (the 23rd step) the loss weights are NaN
        b = real(d, c, step, flat)
        return {**b, "weight": b["weight"] * np.float32("nan")} if step >= 22 else b

    monkeypatch.setattr(train, "train_batch", poisoned)
    with pytest.raises(train.TrainingDiverged) as e:
        train.train_editor(model, data, weights, cfg, tmp_path / "run", mesh=mesh, progress=False)
    msg = str(e.value)
    # (the logged loss is the unweighted mean over groups; the NaN weights reach the gradient)
    assert msg.startswith("step 23: the editor's training diverged (non-finite gradient; loss ") and "gradient norm nan" in msg
    assert "latest checkpoint is step 20" in msg
    assert "\n" not in msg
    assert steps_in(tmp_path / "run" / "checkpoints")[-1] == 20  # nothing of step 23 or later was saved
    logged = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in logged) == 20
    assert all(np.isfinite(v) for r in logged for k, v in r.items() if isinstance(v, float) and k != "drawdown")
    _, params, norm, meta = restore_editor(tmp_path / "run" / "checkpoints", "best")
    assert meta["step"] <= 20 and all(np.isfinite(x).all() for x in jax.tree.leaves((params, norm)))


def test_an_exploding_learning_rate_is_caught(tmp_path):
    """Not an injected NaN: an editor learning rate that overflows the weights."""
    import dataclasses

    from salem_jax.mend import train

    model, data, weights, cfg, mesh = tiny_setup()
    cfg = dataclasses.replace(cfg, max_steps=10, val_every=10, checkpoint_every=10, log_every=5, lr=1e38, lr_lr=1e38)
    with pytest.raises(train.TrainingDiverged, match=r"^step [0-9]+: the editor's training diverged .*no checkpoint was written"):
        train.train_editor(model, data, weights, cfg, tmp_path / "run", mesh=mesh, progress=False)


# ------------------------------------------------------------------------------ workdir lock


def test_second_run_on_a_workdir_is_refused_and_a_stale_lock_taken_over(tmp_path):
    import os
    import socket
    import subprocess
    import sys

    from salem_jax.runlock import LOCK_NAME, RunLock, WorkdirBusy, read_lock

    notes = []
    with RunLock(tmp_path, command="first", log=notes.append) as lock:
        info = read_lock(tmp_path / LOCK_NAME)
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname() and info["command"] == "first"
        with pytest.raises(WorkdirBusy, match=rf"in use by another run \(pid {os.getpid()} on .*: first\)"):
            RunLock(tmp_path, command="second").acquire()
        assert lock.info == info
    assert not (tmp_path / LOCK_NAME).exists()  # released

    # a lock left by a killed run (its pid is gone): taken over with a one-line note
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "then"}))
    with RunLock(tmp_path, command="third", log=notes.append):
        assert read_lock(tmp_path / LOCK_NAME)["command"] == "third"
    assert len(notes) == 1 and f"taking over the lock of a run that is gone (pid {dead.pid}" in notes[0]
    # another host's lock is never taken over
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "then"}))
    with pytest.raises(WorkdirBusy, match="pid 1 on elsewhere"):
        RunLock(tmp_path).acquire()


def _edit_set_folder(model, out, val_pass=True, long_val_prompt=None):
    """The synthetic facts as an edit-set folder (without the val split's pass rows if asked; with
    the first val row's prompt replaced by `long_val_prompt` if given)."""
    import datasets

    from salem_jax.data.edit_set import COLUMNS, EditSet, edit_set_features, save_edit_set

    splits = {"train": synthetic_rows(model, COUNTRIES[:8], 0, "tr"), "val": synthetic_rows(model, COUNTRIES[8:], 1, "va")}
    if not val_pass:
        splits["val"] = [r for r in splits["val"] if r["group"] != "pass"]
    if long_val_prompt is not None:
        splits["val"][0] = {**splits["val"][0], "prompt": long_val_prompt}
    extra = dict(field="prompt", target_true="", base_correct=False, base_token_acc=0.0)
    table = {s: {c: [{**extra, **r}[c] for r in rows] for c in COLUMNS} for s, rows in splits.items()}
    data = datasets.DatasetDict({s: datasets.Dataset.from_dict(t, features=edit_set_features()) for s, t in table.items()})
    save_edit_set(EditSet(data=data, info={"mode": "correction", "model": model.name, "seed": 0}), out)
    return out


def _train_argv(es, work, *extra):
    return ["train-editor", "--model", "tiny", "--edit-set", str(es), "--workdir", str(work), "--tiny",
            "--batch-size", "8", "--steps", "2", "--devices", "1", "--no-progress", *extra]


def test_train_editor_refusals_are_one_line(tmp_path, capsys, monkeypatch):
    import os
    import socket

    from salem_jax import models
    from salem_jax.runlock import LOCK_NAME

    model = tiny_setup()[0]
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model must not be loaded"))
    # a split without pass rows: the command says so, and how to fix it, before loading the model
    es = _edit_set_folder(model, tmp_path / "es-nopass", val_pass=False)
    assert cli.main(_train_argv(es, tmp_path / "w1")) == 2
    msg = error_line(capsys, "train-editor")
    assert "split 'val' has no 'pass' rows" in msg and "--val-fraction" in msg and "--limit" in msg
    # a workdir in use by a live run (this process)
    es = _edit_set_folder(model, tmp_path / "es")
    (tmp_path / "w2").mkdir()
    (tmp_path / "w2" / LOCK_NAME).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                                         "started": "now", "command": "salem train-editor"}))
    assert cli.main(_train_argv(es, tmp_path / "w2")) == 2
    assert f"is in use by another run (pid {os.getpid()}" in error_line(capsys, "train-editor")
    # --top-k above the number of layers: after loading the model, before any saliency
    monkeypatch.setattr(models, "load_model", lambda *a, **k: model)
    assert cli.main(_train_argv(es, tmp_path / "w3", "--top-k", "3")) == 2
    assert error_line(capsys, "train-editor") == "--top-k 3: model 'tiny-gpt2' has 1 layers; use 1..1"
    assert not (tmp_path / "w3" / LOCK_NAME).exists()  # released after the error
    # a row longer than --max-tokens: named with its length, before the saliency pass of --layers auto
    from salem_jax.commands import train_editor as te

    monkeypatch.setattr(te, "choose_layers", lambda *a, **k: pytest.fail("no layer choice before the length check"))
    es = _edit_set_folder(model, tmp_path / "es-long", long_val_prompt=" ".join(["word"] * 40))
    assert cli.main(_train_argv(es, tmp_path / "w4", "--max-tokens", "20")) == 2
    msg = error_line(capsys, "train-editor")
    assert "split 'val' row 0" in msg and "more than the limit of 20 tokens" in msg, msg


# ------------------------------------------------------------------------------ salem dataset


def _zsre(n, long_at=None, words=5000):
    rows = []
    for i in range(n):
        src = " ".join(["red"] * words) if i == long_at else f"what is the capital of country {i}?"
        rows.append({"subject": f"country {i}", "src": src, "answers": ["paris"], "alt": "rome", "rephrase": src,
                     "loc": "nq question: who wrote it", "loc_ans": "someone"})
    return rows


def test_dataset_long_record_named_before_scoring_and_small_split_warned(tmp_path, capsys, monkeypatch):
    from salem_jax.commands import dataset as cmd
    from salem_jax.models import hf

    big = hf.tiny("gpt2", n_positions=8192)  # a long context, like SmolLM2's: the length check is ours
    monkeypatch.setattr(cmd, "_load_model", lambda *a, **k: big)
    data = tmp_path / "z.json"
    data.write_text(json.dumps(_zsre(6, long_at=4)))
    argv = ["dataset", "--model", "tiny", "--data", str(data), "--format", "zsre", "--out", str(tmp_path / "es"),
            "--no-progress"]
    assert cli.main(argv) == 2
    msg = error_line(capsys, "dataset")
    assert msg.startswith(f"{data}: record 4: field 'prompt': prompt + target is 50")
    assert "more than the limit of 1024 tokens" in msg and not (tmp_path / "es").exists()
    # skipped with --skip-invalid; the tiny val split (1 record) lacks groups: a warning with the fix
    assert cli.main(argv + ["--skip-invalid", "--val-fraction", "0.2"]) == 0
    err = capsys.readouterr().err
    warned = [x for x in err.splitlines() if x.startswith("warning: split 'val' has no")]
    assert len(warned) == 1 and "--val-fraction" in warned[0]
    # --out that is not an edit set: refused before the model is loaded
    monkeypatch.setattr(cmd, "_load_model", lambda *a, **k: pytest.fail("the model must not be loaded"))
    (tmp_path / "mine").mkdir()
    assert cli.main(argv[:-3] + ["--out", str(tmp_path / "mine"), "--no-progress"]) == 2
    assert "exists and is not an edit set" in error_line(capsys, "dataset")


def test_scoring_batches_respect_the_token_budget(monkeypatch):
    from salem_jax import edit_set_builder
    from salem_jax.data.records import EditRecord
    from salem_jax.models import hf

    model = hf.tiny("gpt2", n_positions=512)
    recs = [EditRecord(id=f"r{i}", prompt=" ".join(["red"] * (3 + 40 * (i % 3))), target_true="paris")
            for i in range(12)]
    seen = []
    real = edit_set_builder._scorer

    def spy(m):
        fn = real(m)

        def scored(params, batch):
            seen.append(batch["input_ids"].shape)
            return fn(params, batch)

        return scored

    monkeypatch.setattr(edit_set_builder, "_scorer", spy)
    small = edit_set_builder.build_edit_set(model, recs, batch_size=16, progress=False, token_budget=100)
    assert seen and all(b * length <= 100 or b == 1 for b, length in seen)
    assert {length: b for b, length in seen} == {16: 6, 64: 1, 128: 1}
    seen.clear()
    large = edit_set_builder.build_edit_set(model, recs, batch_size=16, progress=False, token_budget=None)
    assert all(b == 16 for b, _ in seen)
    for s in ("train", "val"):  # the same scores whatever the batching
        a, b = small.rows(s), large.rows(s)
        assert [r["group"] for r in a] == [r["group"] for r in b]
        np.testing.assert_allclose([r["base_token_acc"] for r in a], [r["base_token_acc"] for r in b], atol=1e-6)


def test_an_experiment_refuses_a_busy_workdir(tmp_path, capsys, monkeypatch):
    import os
    import socket

    from salem_jax import pipeline
    from salem_jax.runlock import LOCK_NAME

    exp = __import__("experiments.capitals_smollm2", fromlist=["main"])
    ran = []
    monkeypatch.setattr(pipeline, "run_pipeline", lambda cfg, workdir: ran.append(workdir))
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                                  "started": "now", "command": "experiments.capitals_smollm2"}))
    assert exp.main(["--tiny", "--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"experiments.capitals_smollm2: error: {tmp_path} is in use by another run (pid {os.getpid()}")
    assert ran == []
    (tmp_path / LOCK_NAME).unlink()
    assert exp.main(["--tiny", "--workdir", str(tmp_path)]) == 0
    assert ran == [str(tmp_path)] and not (tmp_path / LOCK_NAME).exists()
