"""`salem train-editor` and `salem edit` end to end, and applying edits in batch / sequence."""

from __future__ import annotations

import argparse
import json

import jax
import numpy as np
import pytest
from test_mend_train import COUNTRIES, synthetic_rows, tiny_setup, trained_run

from salem_jax.commands import edit as edit_cmd
from salem_jax.commands import train_editor as train_cmd
from salem_jax.losses import example_correct
from salem_jax.mend.apply import TrainedEditor, apply_edits, encode_requests, load_editor, read_requests
from salem_jax.mend.checkpoint import restore_editor
from salem_jax.models.base import get_path


def _parse(module, argv):
    parser = argparse.ArgumentParser(prog="salem")
    module.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def _save_edit_set(model, out):
    """The synthetic facts as an edit-set folder in the data helper's format."""
    import datasets

    from salem_jax.data.edit_set import COLUMNS, EditSet, edit_set_features, save_edit_set

    splits = {"train": synthetic_rows(model, COUNTRIES[:8], 0, "tr"), "val": synthetic_rows(model, COUNTRIES[8:], 1, "va")}
    extra = dict(field="prompt", target_true="", base_correct=False, base_token_acc=0.0)
    table = {s: {c: [{**extra, **r}[c] for r in rows] for c in COLUMNS} for s, rows in splits.items()}
    data = datasets.DatasetDict({s: datasets.Dataset.from_dict(t, features=edit_set_features()) for s, t in table.items()})
    save_edit_set(EditSet(data=data, info={"mode": "correction", "model": model.name, "seed": 0}), out)
    return splits


def _correct(model, params, requests):
    batch = encode_requests(model, requests)
    logits = jax.jit(model.apply)(params, batch)
    return np.asarray(example_correct(logits, batch["labels"], batch["label_mask"])), np.asarray(logits)


def test_train_editor_then_edit(tmp_path, monkeypatch, capsys):
    from salem_jax import models
    from salem_jax.models import load_model, save_model

    model, _, _, cfg, _ = tiny_setup()
    full, _, _, _ = trained_run()
    splits = _save_edit_set(model, tmp_path / "es")

    # train-editor, with the model handed over in memory (same object as the shared run, so the
    # compiled step is reused) and the flags of the shared run's configuration
    monkeypatch.setattr(models, "load_model", lambda name, **kw: model)
    work = tmp_path / "editor"
    argv = ["train-editor", "--model", "tiny", "--edit-set", str(tmp_path / "es"), "--workdir", str(work),
            "--layers", "auto", "--top-k", "1", "--tiny", "--batch-size", "8", "--steps", str(cfg.max_steps),
            "--val-every", str(cfg.val_every), "--checkpoint-every", str(cfg.checkpoint_every),
            "--log-every", str(cfg.log_every), "--devices", "1", "--no-progress"]
    args = _parse(train_cmd, argv)
    assert train_cmd.config_from_args(args) == cfg
    assert train_cmd.run(args) == 0
    monkeypatch.undo()
    assert json.loads((work / "layers.json").read_text())["chosen"] == ["h.0"]
    summary = json.loads((work / "summary.json").read_text())
    assert summary["steps"] == cfg.max_steps and summary["weights"] == [w.path for w in full.spec.weights]
    # the command trains exactly what the library call trains
    _, params, _, _ = restore_editor(work / "checkpoints", "latest")
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(full.params)):
        np.testing.assert_array_equal(a, b)

    # edit: base model from a folder, one request, the edited model written to --out
    base_dir = tmp_path / "tiny-gpt2"  # load_model names a folder's model after the folder
    save_model(model, model.params, base_dir)
    fail = next(r for r in splits["train"] if r["group"] == "fail")
    request = {"prompt": fail["prompt"], "target": fail["target"]}
    adapts = [r["prompt"] for r in splits["train"] if r["group"] == "adapt" and r["record_id"] == fail["record_id"]]
    assert adapts
    reph = adapts + [splits["val"][0]["prompt"]]  # its rephrasings and an unrelated prompt
    (tmp_path / "requests.jsonl").write_text(json.dumps({**request, "rephrases": reph}) + "\n")
    keep = [{"prompt": r["prompt"], "target": r["target"]} for r in splits["val"] if r["group"] == "pass"][:4]
    assert keep
    (tmp_path / "keep.jsonl").write_text("".join(json.dumps(k) + "\n" for k in keep))
    out = tmp_path / "edited"
    args = _parse(edit_cmd, ["edit", "--model", str(base_dir), "--editor", str(work), "--requests",
                             str(tmp_path / "requests.jsonl"), "--out", str(out), "--no-progress",
                             "--keep", str(tmp_path / "keep.jsonl")])
    capsys.readouterr()
    assert edit_cmd.run(args) == 0
    lines = capsys.readouterr().out.splitlines()
    report = json.loads(lines[0])
    counts = {k: report.pop(k) for k in ("rephrases", "rephrases_right_before", "rephrases_right_after")}
    assert report == {**request, "correct_before": False, "correct_after": True}

    # the saved edited model reloads and gives the edited answer; the base folder is unchanged
    edited = load_model(out)
    ok, logits = _correct(edited, edited.params, [request])
    assert ok.all()
    base = load_model(base_dir)
    ok_base, _ = _correct(base, base.params, [request])
    assert not ok_base.any()
    editor = load_editor(work, model)  # the best checkpoint, like the command's default
    assert editor.step == full.best_step
    in_memory = apply_edits(model, editor, [request])
    np.testing.assert_allclose(logits, _correct(model, in_memory, [request])[1], atol=1e-5)
    # the rephrasing counts: each rephrase scored on its own, on the base and the edited model
    reqs = [{"prompt": p, "target": request["target"]} for p in reph]
    hand_before = sum(bool(_correct(model, model.params, [q])[0][0]) for q in reqs)
    hand_after = sum(bool(_correct(model, in_memory, [q])[0][0]) for q in reqs)
    assert counts == {"rephrases": len(reph), "rephrases_right_before": hand_before, "rephrases_right_after": hand_after}
    assert lines[-2] == f"{hand_after}/{len(reph)} rephrasings right after editing ({hand_before} before)"
    # the keep facts: each scored on its own, on the base and the edited model
    kb = sum(bool(_correct(model, model.params, [k])[0][0]) for k in keep)
    ka = sum(bool(_correct(model, in_memory, [k])[0][0]) for k in keep)
    assert lines[-1] == (f"{ka}/{len(keep)} keep facts right after editing ({kb} before): "
                         f"drawdown {(kb - ka) / len(keep):.3f}")

    # --retries: this editor reaches the request at once, so one application and the same model
    args = _parse(edit_cmd, ["edit", "--model", str(base_dir), "--editor", str(work), "--requests",
                             str(tmp_path / "requests.jsonl"), "--out", str(tmp_path / "edited-r"), "--no-progress",
                             "--retries", "2", "--mode", "sequential"])
    assert edit_cmd.run(args) == 0
    assert "editor applications: [1] (--retries 2, --mode sequential)" in capsys.readouterr().out.splitlines()
    again = load_model(tmp_path / "edited-r")
    for a, b in zip(jax.tree.leaves(again.params), jax.tree.leaves(edited.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for bad, msg in ((["--retries", "-1"], "give a number >= 0"), (["--retries", "1", "--method", "rrome", "--layers", "h.0"],
                                                                  "--retries is for --method mend")):
        args = _parse(edit_cmd, ["edit", "--model", str(base_dir), "--editor", str(work), "--requests",
                                 str(tmp_path / "requests.jsonl"), "--out", str(tmp_path / "x"), *bad])
        with pytest.raises(SystemExit, match=msg):
            edit_cmd.run(args)


def test_batch_and_sequential_edits():
    model, _, _, _, _ = tiny_setup()
    full, _, before, _ = trained_run()
    editor = TrainedEditor(full.spec, full.params, full.norm, model.name, full.step)
    fails = [r for r in synthetic_rows(model, COUNTRIES[:8], 0, "tr") if r["group"] == "fail"]
    reqs = [{"prompt": r["prompt"], "target": r["target"]} for r in fails[:2]]
    one = [apply_edits(model, editor, [r]) for r in reqs]
    both = apply_edits(model, editor, reqs)
    seq = apply_edits(model, editor, reqs, mode="sequential", progress=False)
    on_top = apply_edits(model, editor, [reqs[1]], params=one[0])
    for w in full.spec.weights:
        w0 = np.asarray(get_path(model.params, w.path))
        # every single edit changes the weight; a batch of edits is the sum of the single ones
        # (summed loss, frozen statistics: the pseudo-gradients add up)
        d = [np.asarray(get_path(p, w.path)) - w0 for p in one]
        assert all(np.abs(x).max() > 0 for x in d)
        # (float32 summation order: one request alone is padded to 8 tokens since EDIT_BUCKETS)
        np.testing.assert_allclose(np.asarray(get_path(both, w.path)) - w0, d[0] + d[1], atol=2e-6)
        # sequential = the second edit captured on the first edit's parameters
        np.testing.assert_array_equal(get_path(seq, w.path), get_path(on_top, w.path))
    # a single request: batch and sequential agree
    seq_one = apply_edits(model, editor, reqs[:1], mode="sequential", progress=False)
    for a, b in zip(jax.tree.leaves(seq_one), jax.tree.leaves(one[0])):
        np.testing.assert_array_equal(a, b)
    # each single edit makes its own fact right, and the base parameters never change
    for r, p in zip(reqs, one):
        assert _correct(model, p, [r])[0].all() and not _correct(model, model.params, [r])[0].any()
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(model.params)):
        np.testing.assert_array_equal(a, np.asarray(b))
    with pytest.raises(ValueError, match="mode"):
        apply_edits(model, editor, reqs, mode="parallel")
    # a batch edited in chunks of rows (rows_per_call: one gradient pass per chunk, the updates
    # summed) is the same edit as one pass over every row, and the sum of the single edits
    five = [{"prompt": r["prompt"], "target": r["target"]} for r in fails[:5]]
    singles = [apply_edits(model, editor, [r]) for r in five]
    whole = apply_edits(model, editor, five)
    chunked = apply_edits(model, editor, five, rows_per_call=2)  # chunks of 2, 2, 1 rows
    for w in full.spec.weights:
        w0 = np.asarray(get_path(model.params, w.path))
        hand = w0 + sum(np.asarray(get_path(p, w.path)) - w0 for p in singles)
        np.testing.assert_allclose(get_path(chunked, w.path), get_path(whole, w.path), atol=2e-6)
        np.testing.assert_allclose(get_path(chunked, w.path), hand, atol=4e-6)
        assert np.abs(np.asarray(get_path(chunked, w.path)) - w0).max() > 100 * 4e-6
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(chunked), jax.tree.leaves(model.params))]
    assert sum(changed) == len(full.spec.weights)  # only the edited kernels move
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="rows_per_call"):
            apply_edits(model, editor, five, rows_per_call=bad)


def test_requests_file_errors(tmp_path):
    f = tmp_path / "r.jsonl"
    f.write_text('{"prompt": "the capital of peru is", "target": "lima"}\n\n{"prompt": "x"}\n')
    with pytest.raises(ValueError, match="line 3: field 'target' is missing"):
        read_requests(f)
    f.write_text("not json\n")
    with pytest.raises(ValueError, match="line 1: not valid JSON"):
        read_requests(f)
    with pytest.raises(FileNotFoundError):
        read_requests(tmp_path / "missing.jsonl")
    f.write_text('{"prompt": "a", "target": "b"}\n')
    assert read_requests(f) == [{"prompt": "a", "target": "b"}]
    f.write_text('{"prompt": "a", "target": "b", "rephrases": ["c", ""]}\n')
    with pytest.raises(ValueError, match="line 1: field 'rephrases' must be a list of non-empty strings"):
        read_requests(f)


def _closed_form_setup(tmp_path, monkeypatch):
    """A tiny GPT-2 served as `--model tiny`, and a tiny WikiText stand-in in a data directory
    (the closed-form editors' key statistics), caches under tmp_path."""
    from salem_jax import models
    from salem_jax.models import hf

    model = hf.tiny("gpt2", seed=2)
    monkeypatch.setattr(models, "load_model", lambda name, **kw: model)
    data = tmp_path / "data"
    (data / "wikitext").mkdir(parents=True)
    (data / "wikitext" / "wiki.test.raw").write_text(
        "\n".join(" ".join([COUNTRIES[i % len(COUNTRIES)]] * 6) + " the capital of is what city" for i in range(40)) + "\n")
    monkeypatch.setenv("SALEM_JAX_DATA", str(data))
    monkeypatch.setenv("SALEM_JAX_CACHE", str(tmp_path / "cache"))
    return model


def test_edit_with_a_locate_then_edit_method(tmp_path, monkeypatch, capsys):
    """`salem edit --method rrome`: no trained editor; WikiText (here a tiny stand-in in a data
    directory) gives the key statistics; a request without its subject is skipped and counted."""
    model = _closed_form_setup(tmp_path, monkeypatch)
    req = tmp_path / "req.jsonl"
    req.write_text(json.dumps({"prompt": "what is the capital of france", "target": "tokyo", "subject": "france"}) + "\n"
                   + json.dumps({"prompt": "what is the capital of peru", "target": "lima", "subject": "chile"}) + "\n")
    args = _parse(edit_cmd, ["edit", "--model", "tiny", "--method", "rrome", "--layers", "h.1", "--requests", str(req),
                             "--out", str(tmp_path / "out"), "--cov-tokens", "300", "--no-progress"])
    assert edit_cmd.run(args) == 0
    out = capsys.readouterr().out
    assert "skipped: record '2'" in out and "'chile' does not occur" in out
    summary = json.loads(next(line for line in out.splitlines() if line.startswith('{"method"')))
    assert summary["method"] == "rrome" and summary["edited"] == 1 and summary["skipped"] == 1
    assert (tmp_path / "cache" / "key_stats").is_dir() and (tmp_path / "out").is_dir()
    with pytest.raises(SystemExit, match="needs --layers"):
        edit_cmd.run(_parse(edit_cmd, ["edit", "--model", "tiny", "--method", "emmet", "--requests", str(req),
                                       "--out", str(tmp_path / "o2")]))
    with pytest.raises(SystemExit, match="--editor is required"):
        edit_cmd.run(_parse(edit_cmd, ["edit", "--model", "tiny", "--requests", str(req), "--out", str(tmp_path / "o3")]))


def test_edit_layers_auto(tmp_path, monkeypatch, capsys):
    """`salem edit --method rrome --layers auto --scorer NAME`: the edited layer is the top-1 of the
    scorer's profile of the requests (each a fail row), computed here directly with saliency_profile
    on the same rows; the profile is saved beside the edited weights; bad combinations are refused
    before the model loads."""
    from salem_jax.data.tokenize import encode
    from salem_jax.saliency import saliency_profile

    model = _closed_form_setup(tmp_path, monkeypatch)
    reqs = [{"prompt": "what is the capital of france", "target": "tokyo", "subject": "france"},
            {"prompt": "what is the capital of peru", "target": "paris", "subject": "peru"}]
    req = tmp_path / "req.jsonl"
    req.write_text("".join(json.dumps(r) + "\n" for r in reqs))
    args = _parse(edit_cmd, ["edit", "--model", "tiny", "--method", "rrome", "--layers", "auto", "--scorer", "salem",
                             "--requests", str(req), "--out", str(tmp_path / "out"), "--cov-tokens", "300", "--no-progress"])
    assert edit_cmd.run(args) == 0
    out = capsys.readouterr().out
    summary = json.loads(next(line for line in out.splitlines() if line.startswith('{"method"')))
    batch = encode(model, [r["prompt"] for r in reqs], [r["target"] for r in reqs])
    ref = saliency_profile(model, model.params, [(batch, ["fail", "fail"])], scorer="salem", part="mlp", top_k=1)
    assert summary["layers"] == [ref.chosen[0]] and summary["edited"] == 2
    saved = json.loads((tmp_path / "out" / "layer_profile.json").read_text())
    assert saved["chosen"] == [ref.chosen[0]]
    with pytest.raises(SystemExit, match="give --keep"):
        edit_cmd.run(_parse(edit_cmd, ["edit", "--model", "tiny", "--method", "rrome", "--layers", "auto", "--scorer",
                                       "contrast", "--requests", str(req), "--out", str(tmp_path / "o2")]))
    with pytest.raises(SystemExit, match="--layers is for the closed-form methods"):
        edit_cmd.run(_parse(edit_cmd, ["edit", "--model", "tiny", "--editor", str(tmp_path), "--layers", "h.0",
                                       "--requests", str(req), "--out", str(tmp_path / "o3")]))
