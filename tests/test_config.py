"""One configuration: every default comes from salem_jax.config's dataclasses, and every field of them
is reachable from `--config.*` (experiments) and from `salem train-editor`'s flags."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from experiments.common import apply_overrides, paper_editor
from salem_jax import config as C
from salem_jax.baselines.finetune import FTConfig
from salem_jax.baselines.rome import ROMEConfig
from salem_jax.commands import train_editor
from salem_jax.mend.editor import EditorConfig
from salem_jax.mend.train import TrainConfig
from salem_jax.methods.mend import train_config
from salem_jax.methods.rome import rome_config


def _fields(dc) -> set[str]:
    return {f.name for f in dataclasses.fields(dc)}


def test_every_train_and_editor_field_has_a_key():
    keys = set(C.EDITOR_KEYS.values())
    assert keys == (_fields(TrainConfig) - {"editor", "seed"}) | {f"editor.{f}" for f in _fields(EditorConfig)}
    assert _fields(ROMEConfig) | {"layer", "covariance"} == set(C.default_config().rome.keys())
    assert _fields(FTConfig) == set(C.default_config().ft.keys())


def test_pipeline_editor_defaults_are_the_cpu_budget():
    # the values the pipeline has always used, written out by hand
    expected = TrainConfig(
        editor=EditorConfig(rank=1920, n_hidden=1, edit_lr_init=1e-4), adapt_per_edit=2, batch_size=None,
        effective_batch=1, c_fail=0.1, lr=1e-4, lr_lr=1e-4, max_steps=150, val_every=50, val_groups=32,
        patience=1000, checkpoint_every=50, seed=0,
    )
    assert train_config(C.default_config()) == expected
    assert rome_config(C.default_config()) == ROMEConfig()
    # the paper's schedule is TrainConfig's own defaults
    paper = train_config(paper_editor(C.default_config()))
    assert paper == TrainConfig(editor=expected.editor, adapt_per_edit=2)


# a value for each key that differs from its default
NEW = dict(steps=7, lr=0.5, lr_lr=0.25, rank=5, n_hidden=2, mode="combined", normalize=False, edit_lr_init=0.125,
           norm_eps=1e-3, c_fail=0.3, c_loc=2.0, grad_clip=5.0, effective_batch=4, batch_size=2, accum_steps=3,
           edits_per_group=2, adapt_per_edit=3, pass_per_group=4, extra_pass_per_group=2, own_pass_per_group=1, val_every=6, val_groups=9,
           patience=11, checkpoint_every=12, keep_checkpoints=5, log_every=13, null_energy=0.25, null_tokens=5000,
           null_facts="countries:region", null_facts_weight=2.0)


def _check(tc: TrainConfig, skip=()):
    for key, field in C.EDITOR_KEYS.items():
        if key in skip:
            continue
        obj = tc
        for part in field.split("."):
            obj = getattr(obj, part)
        assert obj == NEW[key], key


def test_every_editor_key_reaches_train_config_from_config_overrides():
    assert set(NEW) == set(C.EDITOR_KEYS)
    cfg = apply_overrides(C.default_config(), [f"--config.editor.{k}={v}" for k, v in NEW.items()] + ["--config.seed=3"])
    tc = train_config(cfg)
    _check(tc)
    assert tc.seed == 3
    cfg = apply_overrides(C.default_config(), ["--config.rome.stop_loss=0.5", "--config.rome.prefixes=('a', 'b')",
                                               "--config.ft.max_change=0.1"])
    assert rome_config(cfg).stop_loss == 0.5 and rome_config(cfg).prefixes == ("a", "b")
    assert C.ft_config(cfg, kl=True).max_change == 0.1 and C.ft_config(cfg, kl=False).kl_weight == 0.0
    # comma lists of numbers are numbers (they were strings: lrs=0.001 gave ("0.001",))
    cfg = apply_overrides(C.default_config(), ["--config.editability.lrs=0.001,3e-4", "--config.saliency.groups=fail,pass"])
    assert cfg.editability.lrs == (0.001, 3e-4) and all(type(x) is float for x in cfg.editability.lrs)
    assert cfg.saliency.groups == ("fail", "pass")


def test_every_editor_key_is_a_train_editor_flag():
    ap = argparse.ArgumentParser()
    train_editor.add_parser(ap.add_subparsers())
    argv = ["train-editor", "--model", "m", "--edit-set", "e", "--workdir", "w", "--seed", "3"]
    for k, v in NEW.items():
        if k == "normalize":
            argv.append("--no-normalize")
        elif k not in C.PIPELINE_ONLY_KEYS:
            argv += ["--" + k.replace("_", "-"), str(v)]
    tc = train_editor.config_from_args(ap.parse_args(argv))
    _check(tc, skip=C.PIPELINE_ONLY_KEYS)
    assert tc.seed == 3
    # the fact keys of null_facts come from the pipeline's splits and keep set: no flag
    for k in C.PIPELINE_ONLY_KEYS:
        with pytest.raises(SystemExit):
            ap.parse_args(argv + ["--" + k.replace("_", "-"), str(NEW[k])])


def test_unknown_editor_key_is_an_error():
    with pytest.raises(KeyError, match="unknown keys.*'stepz'"):
        C.train_config({"stepz": 3}, seed=0)


def test_environment_is_read_in_one_module(monkeypatch, tmp_path):
    from salem_jax.data import paths
    from salem_jax.models import gguf

    monkeypatch.setenv("SALEM_JAX_CACHE", str(tmp_path / "c"))
    assert gguf.default_cache_root() == paths.cache_dir() == tmp_path / "c"
    monkeypatch.setenv("SALEM_JAX_DATA", str(tmp_path))
    assert paths.data_dir() == tmp_path
    import pathlib

    import salem_jax

    root = pathlib.Path(salem_jax.__file__).parent
    readers = [str(p.relative_to(root)) for p in root.rglob("*.py")
               if p.name != "env.py" and ("os.environ" in p.read_text() or "getenv(" in p.read_text())]
    assert readers == []


def test_experiment_config_applies_the_benchmarks_set_overrides():
    from experiments.capitals_smollm2 import get_config
    from experiments.common import experiment_config

    cfg = experiment_config("capitals_smollm2", True, ["editor.steps=7", "eval.max_edits=2"])
    plain = get_config(True)
    assert (cfg.editor.steps, cfg.eval.max_edits, cfg.progress) == (7, 2, False)
    assert (plain.editor.steps, plain.eval.max_edits) != (7, 2)
    with pytest.raises(ValueError):
        experiment_config("capitals_smollm2", True, ["editor.steps"])  # no "=": refused, named
