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
