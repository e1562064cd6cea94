"""`salem train-editor`: train a MEND editor for the salient layers of a model on an edit set.

    salem train-editor --model smollm2-135m --edit-set runs/es-capitals --layers auto --top-k 1 \\
        --workdir runs/editor-capitals --steps 2000

`--layers auto` runs SaLEM's saliency selection (paper section 3.2) on the edit set's training
rows and edits the top-K layers (`--scorer editability`: the layers where one untrained MEND step
fixes the most edits with the least spill, salem_jax.locate.editability); `--layers h.3,h.4` names them instead (`--part` picks the MLP,
attention or all weights of each). Checkpoints, `metrics.jsonl` and `layers.json` go to the
workdir; running the same command again resumes from the last checkpoint.
"""

from __future__ import annotations

# JAX, the models and the data-set code are imported inside `run` (heavy: seconds), not here:
# `salem --help` builds every command's parser (cli.build_parser) and answers without them.
import argparse
import json
import sys
from pathlib import Path

from salem_jax.commands.locate import SCORERS as SALIENCY_SCORERS
from salem_jax.config import EDITOR_HELP, EDITOR_KEYS, PIPELINE_ONLY_KEYS, editor_values, train_config
from salem_jax.data.tokenize import DEFAULT_MAX_TOKENS
from salem_jax.errors import UserError
from salem_jax.mend.editor import MODES
from salem_jax.mend.train import TrainConfig

SCORERS = SALIENCY_SCORERS + ("editability",)  # --layers auto --scorer NAME


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
    p.add_argument("--scorer", default="salem", choices=SCORERS,
                   help="--layers auto: a saliency scorer (salem = the paper's) or 'editability' "
                        "(one untrained MEND step per layer: edits fixed minus spill; salem_jax.locate.editability)")
    p.add_argument("--saliency-examples", type=int, default=64,
                   help="--layers auto: at most this many train rows per group are profiled (0 = all)")
    p.add_argument("--tiny", action="store_true", help="start from the tiny test configuration (TrainConfig.tiny)")
    p.add_argument("--dtype", default="float32", help="model dtype (float32, bfloat16, float16)")
    p.add_argument("--num-labels", type=int, default=None, help="classifier models: number of classes")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                   help="refuse an edit-set row whose prompt + target is longer (also capped by the model's context)")
    p.add_argument("--devices", type=int, default=None, help="use only the first N devices (default: all of them)")
    p.add_argument("--no-progress", action="store_true")
    add_editor_flags(p)


def add_editor_flags(p) -> None:
    """One flag per key of salem_jax.config.EDITOR_KEYS (the pipeline's `editor` section) plus --seed,
    typed by TrainConfig's defaults; unset flags keep TrainConfig's defaults (or --tiny's)."""
    g = p.add_argument_group("training and editor network (defaults: TrainConfig, i.e. MEND / SaLEM)")
    base = editor_values(TrainConfig())
    for key, default in base.items():
        if key in PIPELINE_ONLY_KEYS:
            continue
        flag, help_ = "--" + key.replace("_", "-"), EDITOR_HELP.get(key)
        if key == "normalize":
            g.add_argument("--no-normalize", action="store_true", help="do not standardise u and delta")
        elif key == "mode":
            g.add_argument(flag, choices=MODES, help=help_)
        else:
            g.add_argument(flag, type=type(default), help=help_)
    g.add_argument("--seed", type=int)


def config_from_args(args) -> TrainConfig:
    """The TrainConfig the flags describe (unset flags keep the defaults, or the tiny ones)."""
    cfg = TrainConfig.tiny() if args.tiny else TrainConfig()
    values = {k: getattr(args, k) for k in EDITOR_KEYS if getattr(args, k, None) is not None}
    if args.no_normalize:
        values["normalize"] = False
    if values.get("steps") is not None and not any(getattr(args, k, None) is not None for k in ("val_every", "checkpoint_every")):
        # a short run still validates and checkpoints at its end; keep the periodic ones sensible
        n = values["steps"]
        values.setdefault("val_every", min(cfg.val_every, n))
        values.setdefault("checkpoint_every", min(cfg.checkpoint_every, n))
    return train_config(values, seed=cfg.seed if args.seed is None else args.seed, base=cfg)


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
    from salem_jax.locate.choose import LocateConfig, locate  # jax: `salem --help` does not need it

    lc = LocateConfig(scorer=args.scorer, part=args.part, top_k=args.top_k, micro_batch=8,
                      max_examples=args.saliency_examples, seed=0)
    method = "editability" if args.scorer == "editability" else "saliency"
    profile = locate(model, es.rows("train"), method, lc, progress=not args.no_progress)
    workdir.mkdir(parents=True, exist_ok=True)
    saved.write_text(profile.to_json())
    print(f"{method} ({args.scorer}, {args.part}) chose: {', '.join(profile.chosen)}", file=sys.stderr)
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
    # tokenised (and every row checked against --max-tokens) before the layer choice's saliency pass
    data = prepare_splits(model, {"train": es.rows("train"), "val": es.rows("val")}, where=f"edit set {args.edit_set}",
                          max_tokens=args.max_tokens)
    names = choose_layers(model, es, args, workdir)
    weights = model.layers.weights(names, part=args.part)
    print(f"editing {len(weights)} weights: {', '.join(w.path for w in weights)}", file=sys.stderr)
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
