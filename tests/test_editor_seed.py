"""config.editor.seed: the MEND editor's own seed (initialisation and data order), the rest of the run
(edit set, keep set, editability probes) on the top-level seed; -1 (the default) = the top-level seed."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from experiments import capitals_smollm2
from experiments.common import apply_overrides
from salem_jax import config as C
from salem_jax.methods.mend import train_config
from salem_jax.testing import refused_up_front


def _cfg(*overrides):
    return apply_overrides(C.default_config(), list(overrides))


def test_default_follows_the_top_level_seed():
    assert C.default_config().editor.seed == -1
    for top in (0, 3):
        cfg = _cfg(f"--config.seed={top}")
        assert train_config(cfg).seed == top
        assert C.editability_config(cfg).seed == top


@pytest.mark.parametrize("top, editor", [(0, 2), (3, 5), (3, 0)])  # (3, 0): 0 is a seed, not "unset"
def test_editor_seed_reseeds_the_editor_only(top, editor):
    cfg = _cfg(f"--config.seed={top}", f"--config.editor.seed={editor}")
    tc = train_config(cfg)
    # the TrainConfig written by hand: the pipeline's editor section with only the seed changed
    want = dataclasses.replace(train_config(_cfg(f"--config.seed={top}")), seed=editor)
    assert tc == want
    assert C.editability_config(cfg).seed == top and cfg.seed == top  # layer choice, edit set: the top-level seed
    assert C.ke_config(cfg).seed == top and C.enn_config(cfg).seed == top


@pytest.mark.parametrize("bad", [-2, True, 1.5, "1", None])
def test_bad_editor_seed_is_an_error_naming_the_field(bad):
    with pytest.raises(ValueError, match="config.editor.seed"):
        C.train_config({"seed": bad}, seed=0)
    with pytest.raises(ValueError, match="config.editor.seed"):
        C.check_editor_seed(bad)


def test_train_editor_command_and_presets_unchanged():
    # `salem train-editor` has its own --seed: no editor seed flag, and editor_values has no seed key
    assert "seed" not in C.EDITOR_KEYS and "seed" not in C.editor_values(C.CPU_EDITOR)
    assert C.train_config(C.editor_values(C.CPU_EDITOR), seed=4).seed == 4


def test_pipeline_refuses_a_bad_editor_seed_up_front(tmp_path):
    cfg = capitals_smollm2.get_config(tiny=True)
    cfg.editor.seed = -5
    refused_up_front(cfg, tmp_path / "work", "config.editor.seed=-5")


@pytest.mark.slow  # two whole tiny pipelines: `make test-slow`
def test_pipeline_editor_seed_changes_the_editor_not_the_edit_set(tmp_path):
    from salem_jax.data.edit_set import load_edit_set
    from salem_jax.mend.checkpoint import read_meta, restore_editor, steps_in
    from salem_jax.pipeline import run_pipeline, split_rows

    runs = {}
    for name, seed in (("top", -1), ("s5", 5)):
        cfg = capitals_smollm2.get_config(tiny=True)
        cfg.progress = False
        cfg.editor.seed = seed
        res = run_pipeline(cfg, tmp_path / name)
        ed = tmp_path / name / "editor_salem_edit" / "checkpoints"
        meta = read_meta(ed, steps_in(ed)[-1])
        rows = split_rows(load_edit_set(tmp_path / name / "edit_set"))
        runs[name] = (res, meta, rows, restore_editor(ed, steps_in(ed)[-1])[1])
    (r0, m0, rows0, p0), (r5, m5, rows5, p5) = runs["top"], runs["s5"]
    assert m0["data"]["seed"] == 0 and m0["config"]["seed"] == 0
    assert m5["data"]["seed"] == 5 and m5["config"]["seed"] == 5
    assert r5["config"]["editor"]["seed"] == 5 and r5["config"]["seed"] == 0
    assert json.dumps(rows0, sort_keys=True) == json.dumps(rows5, sort_keys=True)  # the same edit set
    assert r0["chosen_layers"] == r5["chosen_layers"]
    diff = [float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
            for a, b in zip(*(__import__("jax").tree.leaves(p) for p in (p0, p5)))]
    assert max(diff) > 0  # another initialisation / data order: another editor


# ---------------------------------------------------------------------------- config.eval.keep_seed


@pytest.mark.parametrize("top, keep, want", [(0, -1, 0), (3, -1, 3), (0, 4, 4), (3, 0, 0)])  # (3, 0): 0 is a seed
def test_keep_seed_reseeds_the_keep_sample_only(top, keep, want, monkeypatch):
    """config.eval.keep_seed: the country records' draws and keep_rows' order take it (-1 = the
    top-level seed); the editor, editability and edit set keep the top-level seed."""
    from salem_jax import pipeline as P

    seen = {}

    def records(relations, seed):
        seen["records"] = seed
        return [f"{r}:{i}" for r in relations for i in range(3)]

    def rows(model, recs, max_rows, seed, **kw):
        seen["rows"] = seed
        return [dict(id=r) for r in recs[:max_rows]]

    monkeypatch.setattr(P, "country_records", records)
    monkeypatch.setattr(P, "keep_rows", rows)
    cfg = _cfg(f"--config.seed={top}", f"--config.eval.keep_seed={keep}", "--config.eval.keep=countries:region,currency",
               "--config.eval.max_keep=4")
    got, note = P.keep_set(None, cfg)
    assert seen == {"records": want, "rows": want}
    assert [r["id"] for r in got] == ["region:0", "region:1", "region:2", "currency:0"] and "of 6 records" in note
    assert train_config(cfg).seed == top and C.editability_config(cfg).seed == top and cfg.seed == top
    # a keep set read from a file: keep_rows' order takes the keep seed too
    seen.clear()
    monkeypatch.setattr(P, "read_spec", lambda spec: (None, ["a", "b"]))
    monkeypatch.setattr(P, "resolve_spec", lambda spec: ("zsre", "x.json"))
    cfg.eval.keep = "x.json"
    P.keep_set(None, cfg)
    assert seen == {"rows": want}


@pytest.mark.parametrize("bad", [-2, True, 1.5, "1"])
def test_bad_keep_seed_is_an_error_naming_the_field(bad):
    from salem_jax import pipeline as P

    import ml_collections

    cfg = ml_collections.ConfigDict({"seed": 0, "eval": {"keep": "countries:region", "keep_seed": bad}})
    with pytest.raises(ValueError, match="config.eval.keep_seed"):
        P.keep_set(None, cfg)


def test_pipeline_refuses_a_bad_keep_seed_up_front(tmp_path):
    cfg = capitals_smollm2.get_config(tiny=True)
    cfg.eval.keep_seed = -5
    refused_up_front(cfg, tmp_path / "work", "config.eval.keep_seed=-5")
