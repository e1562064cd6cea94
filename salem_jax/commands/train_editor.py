"""`salem train-editor`: train a MEND editor for the salient layers of a model on an edit set.

    salem train-editor --model smollm2-135m --edit-set runs/es-capitals --layers auto --top-k 1 \\
        --workdir runs/editor-capitals --steps 2000

`--layers auto` runs SaLEM's saliency selection (paper section 3.2) on the edit set's training
rows and edits the top-K layers; `--layers h.3,h.4` names them instead (`--part` picks the MLP,
attention or all weights of each). Checkpoints, `metrics.jsonl` and `layers.json` go to the
workdir; running the same command again resumes from the last checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from salem_jax.errors import UserError
from salem_jax.mend.editor import MODES, EditorConfig
from salem_jax.mend.train import TrainConfig


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train-editor",
        help="train a MEND editor for the salient (or named) layers on an edit set",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="model name, folder, .gguf file or hub id")
    p.add_argument("--edit-set", required=True, help="edit-set folder written by `salem dataset`")
    p.add_argument("--workdir", required=True, help="folder for checkpoints, metrics.jsonl, layers.json")
    p.add_argument("--layers", default="auto", help="'auto' (saliency selection) or comma-separated layer names")
    p.add_argument("--top-k", type=int, default=1, help="layers chosen by --layers auto")
    p.add_argument("--part", choices=("mlp", "attention", "all"), default="mlp", help="weights of each layer to edit")
    p.add_argument("--scorer", default="salem", help="saliency scorer for --layers auto")
    p.add_argument("--saliency-examples", type=int, default=64,
                   help="--layers auto: at most this many train rows per group are profiled (0 = all)")
    p.add_argument("--tiny", action="store_true", help="start from the tiny test configuration (TrainConfig.tiny)")
    p.add_argument("--dtype", default="float32", help="model dtype (float32, bfloat16, float16)")
    p.add_argument("--num-labels", type=int, default=None, help="classifier models: number of classes")
    p.add_argument("--devices", type=int, default=None, help="use only the first N devices (default: all of them)")
    p.add_argument("--no-progress", action="store_true")
    g = p.add_argument_group("training (defaults: MEND / SaLEM, see TrainConfig)")
    g.add_argument("--steps", type=int, help="maximum number of steps")
    g.add_argument("--batch-size", type=int, help="edit groups per step (default: one per device)")
    g.add_argument("--effective-batch", type=int, help="groups per optimiser update (accumulated)")
    g.add_argument("--accum-steps", type=int, help="steps accumulated per update (overrides --effective-batch)")
    g.add_argument("--lr", type=float, help="Adam learning rate of the editor network")
    g.add_argument("--lr-lr", type=float, help="Adam learning rate of the per-weight edit learning rates")
    g.add_argument("--c-fail", type=float, help="weight of the edit NLL (paper: 0.1)")
    g.add_argument("--c-loc", type=float, help="weight of the locality KL")
    g.add_argument("--grad-clip", type=float)
    g.add_argument("--edits-per-group", type=int)
    g.add_argument("--adapt-per-edit", type=int, help="rephrasings of each edit in its loss")
    g.add_argument("--pass-per-group", type=int)
    g.add_argument("--val-every", type=int)
    g.add_argument("--val-groups", type=int)
    g.add_argument("--patience", type=int, help="early stop after this many steps without a better val loss")
    g.add_argument("--checkpoint-every", type=int)
    g.add_argument("--keep-checkpoints", type=int)
    g.add_argument("--log-every", type=int)
    g.add_argument("--seed", type=int)
    e = p.add_argument_group("editor network")
    e.add_argument("--rank", type=int)
    e.add_argument("--n-hidden", type=int)
    e.add_argument("--mode", choices=MODES)
    e.add_argument("--edit-lr-init", type=float)
    e.add_argument("--no-normalize", action="store_true", help="do not standardise u and delta")


_TRAIN_FIELDS = {
    "steps": "max_steps", "batch_size": "batch_size", "effective_batch": "effective_batch",
    "accum_steps": "accum_steps", "lr": "lr", "lr_lr": "lr_lr", "c_fail": "c_fail", "c_loc": "c_loc",
    "grad_clip": "grad_clip", "edits_per_group": "edits_per_group", "adapt_per_edit": "adapt_per_edit",
    "pass_per_group": "pass_per_group", "val_every": "val_every", "val_groups": "val_groups",
    "patience": "patience", "checkpoint_every": "checkpoint_every", "keep_checkpoints": "keep_checkpoints",
    "log_every": "log_every", "seed": "seed",
}
_EDITOR_FIELDS = {"rank": "rank", "n_hidden": "n_hidden", "mode": "mode", "edit_lr_init": "edit_lr_init"}


def config_from_args(args) -> TrainConfig:
    """The TrainConfig the flags describe (unset flags keep the defaults, or the tiny ones)."""
    cfg = TrainConfig.tiny() if args.tiny else TrainConfig()
    editor = {v: getattr(args, k) for k, v in _EDITOR_FIELDS.items() if getattr(args, k, None) is not None}
    if args.no_normalize:
        editor["normalize"] = False
    train = {v: getattr(args, k) for k, v in _TRAIN_FIELDS.items() if getattr(args, k, None) is not None}
    if train.get("max_steps") is not None and not any(getattr(args, k, None) is not None for k in ("val_every", "checkpoint_every")):
        # a short run still validates and checkpoints at its end; keep the periodic ones sensible
        n = train["max_steps"]
        train.setdefault("val_every", min(cfg.val_every, n))
        train.setdefault("checkpoint_every", min(cfg.checkpoint_every, n))
    return dataclasses.replace(cfg, editor=dataclasses.replace(cfg.editor, **editor), **train)


def choose_layers(model, es, args, workdir: Path) -> tuple[str, ...]:
    """Layer names from --layers; for "auto", SaLEM's saliency on the training rows (saved to
    workdir/layers.json and reused when the run resumes)."""
    if args.layers != "auto":
        names = tuple(n.strip() for n in args.layers.split(",") if n.strip())
        if not names:
            raise ValueError("--layers: no layer names given")
        model.layers.select(names)  # unknown names: KeyError listing the valid ones
        return names
    saved = workdir / "layers.json"
    if saved.is_file():
        info = json.loads(saved.read_text())
        if info.get("top_k") == args.top_k and info.get("part") == args.part and info.get("scorer") == args.scorer:
            print(f"layers from {saved}: {', '.join(info['chosen'])}", file=sys.stderr)
            return tuple(info["chosen"])
    try:
        from salem_jax.saliency import saliency_profile
    except ImportError as e:
        raise RuntimeError(f"--layers auto needs salem_jax.saliency, which cannot be imported ({e}); name the layers instead") from e
    from salem_jax.data.edit_set import edit_set_batches, sample_by_group

    rows = sample_by_group(es.rows("train"), args.saliency_examples, seed=0)
    data = [(b, [r["group"] for r in chunk]) for b, chunk in edit_set_batches(model, rows, batch_size=8)]
    profile = saliency_profile(
        model, model.params, data, scorer=args.scorer, part=args.part, top_k=args.top_k, progress=not args.no_progress
    )
    workdir.mkdir(parents=True, exist_ok=True)
    saved.write_text(profile.to_json())
    print(f"saliency ({args.scorer}, {args.part}) chose: {', '.join(profile.chosen)}", file=sys.stderr)
    return tuple(profile.chosen)


def run(args) -> int:
    from salem_jax import parallel

    parallel.initialize_distributed()

    import jax

    from salem_jax.data.edit_set import load_edit_set
    from salem_jax.runlock import RunLock

    cfg = config_from_args(args)
    workdir = Path(args.workdir)
    if workdir.exists() and not workdir.is_dir():
        raise FileExistsError(f"--workdir {workdir} is a file, not a folder")
    es = load_edit_set(args.edit_set)
    check_groups(es, args.edit_set)
    # one run per workdir (the first process of a pod holds the lock of a shared workdir)
    with RunLock(workdir, command="salem train-editor", enabled=jax.process_index() == 0):
        return _train(args, cfg, workdir, es)


def check_groups(es, where: str) -> None:
    """Training needs fail and pass rows in both splits: say which are missing and the fix."""
    from collections import Counter

    from salem_jax.data.edit_set import SPLITS, missing_groups

    gone = missing_groups({s: Counter(es[s]["group"]) for s in SPLITS})
    if gone:
        what = "; ".join(f"split {s!r} has no {' and no '.join(repr(g) for g in gs)} rows" for s, gs in gone.items())
        raise UserError(
            f"edit set {where}: {what} (the editor learns from fail rows and keeps pass rows, in train and val): "
            f"rebuild it with more records (--limit) or a larger --val-fraction"
        )


def _train(args, cfg, workdir: Path, es) -> int:
    import jax

    from salem_jax import parallel
    from salem_jax.mend.train import prepare_splits, train_editor
    from salem_jax.models import load_model

    model = load_model(args.model, dtype=args.dtype, num_labels=args.num_labels)
    if args.layers == "auto" and not 1 <= args.top_k <= len(model.layers):
        raise UserError(f"--top-k {args.top_k}: model {model.name!r} has {len(model.layers)} layers; use 1..{len(model.layers)}")
    if es.info.get("model") and es.info["model"] != model.name:
        print(
            f"warning: the edit set {args.edit_set} was scored with model {es.info['model']!r}, not {model.name!r}; "
            "its fail/pass groups may not match this model's errors",
            file=sys.stderr,
        )
    names = choose_layers(model, es, args, workdir)
    weights = model.layers.weights(names, part=args.part)
    print(f"editing {len(weights)} weights: {', '.join(w.path for w in weights)}", file=sys.stderr)
    data = prepare_splits(model, {"train": es.rows("train"), "val": es.rows("val")}, where=f"edit set {args.edit_set}")
    devices = jax.devices()
    if args.devices is not None:
        if not 1 <= args.devices <= len(devices):
            raise ValueError(f"--devices {args.devices}: there are {len(devices)} devices")
        devices = devices[: args.devices]
    mesh = parallel.data_mesh(devices)
    result = train_editor(model, data, weights, cfg, workdir, mesh=mesh, progress=not args.no_progress)
    summary = {
        "model": model.name,
        "layers": list(names),
        "weights": [w.path for w in weights],
        "steps": result.step,
        "best_step": result.best_step,
        "best_val_loss": result.best_val_loss,
        "stopped_early": result.stopped_early,
        "last_val": result.last_val,
        "config": result.config.to_dict(),
    }
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    v, nan = result.last_val or {}, float("nan")
    print(
        f"trained {result.step} steps (best val loss {result.best_val_loss:.4f} at step {result.best_step}); "
        f"val edit acc {v.get('edit_acc', nan):.3f} (fail {v.get('fail_acc', nan):.3f}, adapt {v.get('adapt_acc', nan):.3f}; "
        f"{v.get('edit_acc_before', nan):.3f} before editing), drawdown {v.get('drawdown', nan):.4f}; editor in {workdir}"
    )
    return 0
