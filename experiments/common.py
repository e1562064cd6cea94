"""Shared command line for experiments: `python -m experiments.NAME [--tiny] [--workdir W]
[--config.key=value ...]`.

Each experiment module defines `get_config(tiny: bool) -> ml_collections.ConfigDict` and
`main(argv)` that calls `run(get_config, argv)`. Overrides are dotted (`--config.editor.steps=50`)
and typed by the default they replace, so a typo or a wrong type is an error, not a silent no-op.

Why not ml_collections' `config_flags` (checked with ml_collections 1.1.0, `DEFINE_config_dict`
on a private `absl.flags.FlagValues` with `sys_argv=`): it fails two override forms this README
and the tests use.
- `--config.methods=salem,mend_fixed,ft,ft_kl`: its tuple parser `literal_eval`s the text and,
  when that fails, keeps the whole string as ONE element - `("salem,mend_fixed,ft,ft_kl",)`, a
  silent wrong value (only `--config.methods="('salem', 'ft')"` or repeating the flag work).
- A field whose default is None (`--config.ft.max_change=0.1`, FT-L's clamp, tested in
  tests/test_config.py): it raises UnsupportedOperationError ("Type NoneType ... is not
  supported for overriding"), since it types every override by the default's Python type.
Everything else (ints, floats, bools such as `--config.progress=false`, strings, tuples written
as literals, "did you mean" for a typo) it does as `apply_overrides` does; the ConfigDict itself
still type-checks every assignment (`node[key] = value` below).
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
from typing import Callable

import ml_collections

from salem_jax.compile_cache import add_flag, enable_compile_cache
from salem_jax.config import CPU_EDITOR, editor_values
from salem_jax.mend.train import TrainConfig


def _coerce(old, text: str, key: str):
    if isinstance(old, bool):
        low = text.lower()
        if low in ("1", "true", "yes"):
            return True
        if low in ("0", "false", "no"):
            return False
        raise ValueError(f"--config.{key}: expected true/false, got {text!r}")
    if isinstance(old, (int, float)):
        try:
            return type(old)(text)
        except ValueError:
            raise ValueError(f"--config.{key}={text!r}: expected {'an integer' if isinstance(old, int) else 'a number'}"
                             ) from None
    if isinstance(old, (tuple, list)):
        if text[:1] in "([":
            return type(old)(ast.literal_eval(text))
        # a,b,c: each item takes the type of the default's items (lrs=1e-3,3e-4 are numbers, not strings)
        like = old[0] if len(old) else ""
        return type(old)(_coerce(like, t.strip(), key) if isinstance(like, (bool, int, float)) else t
                         for t in text.split(",") if t.strip())
    if old is None:
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text
    return text


def experiment_config(name: str, tiny: bool = False, sets: list[str] = ()) -> ml_collections.ConfigDict:
    """`experiments.<name>.get_config(tiny)` with KEY=VALUE overrides (the benchmarks' `--set`), progress bars off."""
    import importlib

    cfg = importlib.import_module(f"experiments.{name}").get_config(tiny)
    apply_overrides(cfg, [f"--config.{kv}" for kv in sets])
    cfg.progress = False
    return cfg


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: list[str]) -> ml_collections.ConfigDict:
    for item in overrides:
        if not item.startswith("--config.") or "=" not in item:
            raise ValueError(f"unrecognised argument {item!r}; overrides look like --config.key=value")
        key, text = item[len("--config.") :].split("=", 1)
        node = cfg
        parts = key.split(".")
        for p in parts[:-1]:
            if p not in node:
                raise KeyError(f"--config.{key}: no section {p!r}; sections are {sorted(node.keys())}")
            node = node[p]
        if parts[-1] not in node:
            raise KeyError(f"--config.{key}: unknown key; keys here are {sorted(node.keys())}")
        with node.unlocked() if hasattr(node, "unlocked") else _null():
            node[parts[-1]] = _coerce(node[parts[-1]], text, key)
    return cfg


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def parse(get_config: Callable[[bool], ml_collections.ConfigDict], argv: list[str] | None, name: str):
    parser = argparse.ArgumentParser(prog=f"python -m experiments.{name}")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model and a few records (seconds on a CPU)")
    add_flag(parser)
    parser.add_argument("--workdir", default=None, help=f"where results go (default runs/{name}[-tiny])")
    args, rest = parser.parse_known_args(argv)
    enable_compile_cache(enabled=not args.no_compile_cache)
    cfg = apply_overrides(get_config(args.tiny), rest)
    workdir = args.workdir or os.path.join("runs", name + ("-tiny" if args.tiny else ""))
    return cfg, workdir


def main_for(name: str, get_config: Callable[[bool], ml_collections.ConfigDict], argv: list[str] | None = None) -> int:
    """Parse the command line, run the SaLEM pipeline, return an exit code."""
    import jax

    from salem_jax.errors import is_expected, one_line
    from salem_jax.parallel import initialize_distributed
    from salem_jax.pipeline import run_pipeline
    from salem_jax.runlock import RunLock

    initialize_distributed()
    cfg, workdir = parse(get_config, argv, name)
    try:
        # one run per workdir (taken by the first process of a pod; the others share its run)
        with RunLock(workdir, command=f"experiments.{name}", enabled=jax.process_index() == 0):
            run_pipeline(cfg, workdir)
    except Exception as e:  # noqa: BLE001 - expected errors become one line, the rest re-raised
        if not is_expected(e):
            raise
        print(f"experiments.{name}: error: {one_line(e)}", file=sys.stderr)
        return 2
    return 0


def benchmark_edit_set(model, records, cfg: ml_collections.ConfigDict, load_from: str | None = None,
                       save_to: str | None = None):
    """The benchmarks' edit set: read from `load_from` (a saved edit set folder) or built from
    `records` with the experiment's mode, seed and val fraction (and then saved to `save_to`
    when given), so several benchmarks can share one edit set instead of rebuilding it."""
    from salem_jax.data.edit_set import load_edit_set, save_edit_set
    from salem_jax.edit_set_builder import build_edit_set

    if load_from:
        return load_edit_set(load_from)
    es = build_edit_set(model, records, mode=cfg.mode, seed=cfg.seed, val_fraction=cfg.val_fraction,
                        batch_size=cfg.score_batch, progress=False, skip_invalid=cfg.skip_invalid)
    if save_to:
        save_edit_set(es, save_to, overwrite=True)
    return es


def tiny_overrides(c: ml_collections.ConfigDict, model: str) -> ml_collections.ConfigDict:
    """Shrink a config to a tiny random model and a few records: the same code path in seconds."""
    c.model = model
    c.limit = 40
    c.skip_invalid = True  # tiny models have short contexts
    c.saliency.max_examples = 8
    c.editor.update(
        dict(steps=30, rank=16, lr=1e-3, lr_lr=1e-3, edit_lr_init=1e-3, effective_batch=1,
             val_every=15, checkpoint_every=15, val_groups=8)
    )
    # no keep set: a random model knows no country fact (the keep path is tested in tests/test_keep.py)
    c.eval.update(dict(max_edits=3, max_pass=8, ppl_edits=1, n_texts=2, text_window=32, keep=""))
    c.ft.steps = 3
    c.trace.update(dict(facts=2, n_noise=2))
    # ROME's weight decay and norm clamp are relative to |W k + b|, tiny in a random model
    c.rome.update(dict(v_steps=4, v_lr=0.1, clamp_norm_factor=100.0, weight_decay=1e-3))
    return c


def paper_editor(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The paper's editor schedule (section 5.1; `TrainConfig()`'s defaults): at most 150k steps, early
    stop after 30k without a better validation loss, batch 10 by accumulation, c_fail 0.1, lr 1e-6;
    MEND's validation every 5k. Only the keys where it differs from the CPU budget are set."""
    paper, cpu = editor_values(TrainConfig()), editor_values(CPU_EDITOR)  # salem_jax.config's two presets
    c.editor.update({k: v for k, v in paper.items() if v != cpu[k]})
    c.eval.max_edits = 10_000
    c.eval.max_pass = 1_000
    return c
