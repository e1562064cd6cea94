"""`salem locate`: which layer should be edited? Score every layer and write the profile.

    salem locate --model smollm2-135m --data countries --method saliency --out runs/loc-capitals
    salem locate --model smollm2-135m --data zsre --limit 64 --method lga --out runs/loc-zsre
    salem locate --model smollm2-135m --data runs/es-capitals --method causal-trace --limit 4 --out D
    salem locate --model smollm2-135m --data runs/es-capitals --method sweep --lrs 3e-4,1e-3 --out D

`--data` is a data file (with --format), a known name (zsre, counterfact, countries, ...; see
`salem dataset`), or an edit-set folder written by `salem dataset`. A data file is scored into a
fail/adapt/pass edit set on the fly (--mode correction|counterfactual).

Methods: `saliency` (SaLEM, paper section 3.2; --scorer salem|grad_x_weight|mean_sq|
abs_mean_grad|contrast|lga), `lga` (= saliency with --scorer lga), `causal-trace` (ROME's
causal tracing of hidden states on the fail rows; costly: use --limit), `sweep` (fine-tune
each layer alone and rank by edit/rephrase accuracy within a drawdown budget; costly),
`mend-sweep` (the paper's oracle: the pipeline's CPU-budget MEND editor trained on each layer
set - --layer-sets, default single layers at --stride and three triples - ranked by val edit
accuracy within a drawdown budget, bootstrap intervals; needs an edit-set folder or builds one
with a val split; refuses a sweep whose estimate exceeds --budget-minutes; writes
DIR/mend_sweep.json), `editability` (one untrained MEND step per layer and probe edit: share of edits fixed minus
spill onto pass rows; salem_jax.locate.editability; --probe-lrs, --probes, --warm).

Writes DIR/profile.json (per-layer scores per group, chosen layers, wall time, examples used)
and DIR/profile.png (bar chart, chosen layers in red).
"""

from __future__ import annotations

# JAX, the models and the data-set code are imported inside `run` (heavy: seconds), not here:
# `salem --help` builds every command's parser (cli.build_parser) and answers without them.
import argparse
import json
import os
import sys
import time
from pathlib import Path

from salem_jax.data.spec import DataSpec, read_records
from salem_jax.data.tokenize import DEFAULT_MAX_TOKENS
from salem_jax.locate import METHODS

SCORERS = ("salem", "grad_x_weight", "mean_sq", "abs_mean_grad", "contrast", "lga")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "locate",
        help="score every layer (SaLEM saliency, LGA, causal tracing or a fine-tuning sweep) and choose the layer to edit",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="model name (smollm2-135m, ...), folder, .gguf or hub id")
    p.add_argument("--data", required=True, help="data file, known name, 'countries', or an edit-set folder")
    p.add_argument("--format", default=None, help="record format of a data file (zsre, counterfact, knowns, ...)")
    p.add_argument("--mode", choices=("correction", "counterfactual"), default="correction",
                   help="how a data file becomes an edit set (ignored for an edit-set folder)")
    p.add_argument("--method", choices=METHODS, default="saliency")
    p.add_argument("--scorer", choices=SCORERS, default="salem", help="saliency scorer (salem = the paper's)")
    p.add_argument("--top-k", type=int, default=1, help="how many layers to choose (eq. 5)")
    p.add_argument("--part", choices=("mlp", "attention", "all"), default="mlp", help="which weights make a layer")
    p.add_argument("--group", default="fail", help="rows whose scores choose the layers (fail, adapt, overall)")
    p.add_argument("--split", choices=("train", "val", "all"), default="train", help="edit-set split to use")
    p.add_argument("--limit", type=int, default=None, help="use only the first N records")
    p.add_argument("--layers", default=None, help="comma-separated layer names to score (default: all)")
    p.add_argument("--micro-batch", type=int, default=8, help="saliency/lga: examples per jitted step")
    p.add_argument("--n-noise", type=int, default=10, help="causal-trace: noised copies per fact")
    p.add_argument("--restorations-per-call", type=int, default=8, help="causal-trace: (layer, position) pairs per call")
    p.add_argument("--lrs", default="3e-4,1e-3", help="sweep: comma-separated Adam learning rates")
    p.add_argument("--steps", type=int, default=10, help="sweep: Adam steps per layer")
    p.add_argument("--budget", type=float, default=0.1, help="sweep: drawdown budget (1 - locality)")
    p.add_argument("--probe-lrs", default="1e-4,3e-4,1e-3", help="editability: comma-separated edit learning rates")
    p.add_argument("--probes", type=int, default=16, help="editability: fail rows edited one at a time")
    p.add_argument("--warm", type=int, default=30, help="editability: fail rows that fill the statistics first")
    p.add_argument("--layer-sets", default=None,
                   help="mend-sweep: layer sets separated by ';', layers by ',' (default: every --stride-th layer, "
                        "the last, and the first / middle / last triple)")
    p.add_argument("--stride", type=int, default=3, help="mend-sweep: stride of the default single layers")
    p.add_argument("--editor-steps", type=int, default=None, help="mend-sweep: editor steps per set (default: the pipeline's)")
    p.add_argument("--budget-minutes", type=float, default=60.0, help="mend-sweep: refuse a sweep estimated longer")
    p.add_argument("--seconds-per-step", type=float, default=None,
                   help="mend-sweep: editor seconds per step for the estimate (default: SmolLM2 on 2 CPU cores)")
    p.add_argument("--dd-budget", type=float, default=0.05, help="mend-sweep: drawdown budget of the ranking")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--data-dir", default=None, help="data directory (default $SALEM_JAX_DATA or ../shared/data)")
    p.add_argument("--relation", default="capital", help="countries: capital, region, currency, languages or all")
    p.add_argument("--skip-invalid", action="store_true", help="skip bad records instead of failing")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                   help="a data file's longest prompt + target in tokens (also capped by the model's context)")
    p.add_argument("--no-progress", action="store_true")


# ----------------------------------------------------------------------------- data


def is_edit_set_dir(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "info.json"))


def edit_rows(model, args, progress: bool) -> tuple[list[dict], dict, dict[str, str] | None]:
    """(rows of the chosen split, edit-set info, {record id: subject} when the records are at hand)."""
    from salem_jax.edit_set_builder import build_edit_set
    from salem_jax.data.edit_set import load_edit_set

    subjects = None
    if is_edit_set_dir(args.data):
        es = load_edit_set(args.data)
    else:
        spec = DataSpec(data=args.data, format=args.format, relation=args.relation, limit=args.limit, seed=args.seed,
                        data_dir=args.data_dir, skip_invalid=args.skip_invalid)
        fmt, records = read_records(spec)
        es = build_edit_set(model, records, mode=args.mode, seed=args.seed, progress=progress, skip_invalid=args.skip_invalid,
                            max_tokens=getattr(args, "max_tokens", None))
        es.info["format"] = fmt
        subjects = {r.id: r.subject for r in records}
    splits = ("train", "val") if args.split == "all" else (args.split,)
    rows = [r for s in splits for r in es.rows(s)]
    if args.limit is not None and is_edit_set_dir(args.data):
        keep: set[str] = set()
        for r in rows:
            if r["record_id"] not in keep and len(keep) < args.limit:
                keep.add(r["record_id"])
        rows = [r for r in rows if r["record_id"] in keep]
    if not rows:
        raise ValueError(f"no rows in split {args.split!r} of the edit set")
    return rows, es.info, subjects


def subjects_from_source(info: dict) -> dict[str, str]:
    """Re-read the records an edit set was built from to recover their subjects (the edit set
    itself does not keep them)."""
    fmt = info.get("format") or (info.get("formats") or [None])[0]
    sources = [s for s in info.get("sources", []) if os.path.isfile(s)]
    if fmt != "countries" and (fmt is None or len(sources) != 1):
        raise ValueError(
            f"causal tracing needs each fact's subject; the edit set does not keep it and its source "
            f"({info.get('sources')}, format {fmt}) cannot be re-read: pass the data file with --data/--format"
        )
    data = "countries" if fmt == "countries" else sources[0]
    _, recs = read_records(DataSpec(data=data, format=fmt, relation=info.get("relation", "capital"),
                                    seed=info.get("seed", 0), skip_invalid=True))
    return {r.id: r.subject for r in recs}


# ----------------------------------------------------------------------------- methods


def locate_config(args):
    """The salem_jax.locate.choose.LocateConfig the flags describe."""
    from salem_jax.locate.choose import LocateConfig  # jax: `salem --help` does not need it
    from salem_jax.locate.editability import EditabilityConfig

    return LocateConfig(
        scorer=args.scorer, part=args.part, top_k=args.top_k,
        select_group=args.group if args.method in ("saliency", "lga") or args.group != "overall" else "fail",
        layers=_layers(args), micro_batch=args.micro_batch, seed=args.seed, n_noise=args.n_noise,
        restorations_per_call=args.restorations_per_call,
        learning_rates=tuple(float(x) for x in args.lrs.split(",") if x.strip()), steps=args.steps,
        drawdown_budget=args.budget,
        probe=EditabilityConfig(lrs=tuple(float(x) for x in args.probe_lrs.split(",") if x.strip()),
                                probes=args.probes, warm=args.warm),
    )


def _layers(args):
    return None if not args.layers else [s.strip() for s in args.layers.split(",") if s.strip()]


# ----------------------------------------------------------------------------- entry point


def run_mend_sweep(args) -> int:
    """`--method mend-sweep`: the pipeline's editor trained on each layer set (salem_jax.locate.mend_sweep)."""
    import dataclasses

    from salem_jax.config import CPU_EDITOR, editor_values, train_config
    from salem_jax.edit_set_builder import build_edit_set
    from salem_jax.data.edit_set import load_edit_set
    from salem_jax.locate import mend_sweep as MS
    from salem_jax.mend.train import prepare_splits
    from salem_jax.models import load_model

    model = load_model(args.model, dtype=args.dtype)
    if args.layer_sets:
        sets = [tuple(x.strip() for x in s.split(",") if x.strip()) for s in args.layer_sets.split(";") if s.strip()]
    else:
        sets = MS.default_layer_sets(model.layers.names(), stride=args.stride)
    sets = MS.check_layer_sets(model, sets)  # before building anything
    tc = train_config(editor_values(CPU_EDITOR), seed=args.seed)
    if args.editor_steps is not None:
        tc = dataclasses.replace(tc, max_steps=args.editor_steps, val_every=min(tc.val_every, args.editor_steps),
                                 checkpoint_every=min(tc.checkpoint_every, args.editor_steps))
    sc = MS.MendSweepConfig(drawdown_budget=args.dd_budget, budget_seconds=60 * args.budget_minutes, seed=args.seed,
                            part=args.part, **({} if args.seconds_per_step is None else
                                               {"seconds_per_step": args.seconds_per_step}))
    est = MS.estimate_seconds(len(sets), tc, sc.seconds_per_step)
    if est > sc.budget_seconds:  # the same refusal mend_sweep makes, before the edit set is built
        raise ValueError(f"mend-sweep: {len(sets)} layer sets x {tc.max_steps} steps x {sc.seconds_per_step:g} s/step = "
                         f"{est / 60:.0f} min estimated, over --budget-minutes {args.budget_minutes:g}")
    if is_edit_set_dir(args.data):
        es = load_edit_set(args.data)
    else:
        spec = DataSpec(data=args.data, format=args.format, relation=args.relation, limit=args.limit, seed=args.seed,
                        data_dir=args.data_dir, skip_invalid=args.skip_invalid)
        _, records = read_records(spec)
        es = build_edit_set(model, records, mode=args.mode, seed=args.seed, progress=not args.no_progress,
                            skip_invalid=args.skip_invalid)
    data = prepare_splits(model, {"train": es.rows("train"), "val": es.rows("val")}, where=f"edit set {args.data}")
    out = Path(args.out)
    res = MS.mend_sweep(model, data, sets, tc, out / "editors", config=sc, progress=not args.no_progress,
                        say=lambda s: print(s, file=sys.stderr))
    out.mkdir(parents=True, exist_ok=True)
    (out / "mend_sweep.json").write_text(json.dumps(res.to_dict(), indent=2), encoding="utf-8")
    print("| rank | layers | val EA [95% CI] | fail | adapt | DD (val pass) [95% CI] | KL | P(first) | s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for i in res.ranking:
        r = res.rows[i]
        print(f"| {r['rank']} | {'+'.join(r['layers'])} | {r['edit_acc']:.3f} [{r['edit_acc_ci'][0]:.2f}, "
              f"{r['edit_acc_ci'][1]:.2f}] | {r['fail_acc']:.3f} | {r['adapt_acc']:.3f} | {r['drawdown']:.3f} "
              f"[{r['drawdown_ci'][0]:.2f}, {r['drawdown_ci'][1]:.2f}] | {r['kl']:.3f} | {r['p_first']:.2f} | "
              f"{r['seconds']:.0f} |")
    print(f"wrote {out / 'mend_sweep.json'}")
    return 0


def check_top_k(top_k: int, n_layers: int, what: str = "the model") -> None:
    """--top-k must name between 1 and the number of layers scored."""
    if not 1 <= top_k <= n_layers:
        raise ValueError(f"--top-k {top_k}: {what} has {n_layers} layers to choose from; use 1..{n_layers}")


def run(args) -> int:
    if args.method == "mend-sweep":
        return run_mend_sweep(args)
    from salem_jax.locate.plot import plot_profile

    progress = not args.no_progress
    t0 = time.perf_counter()
    if args.top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {args.top_k}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file, not a folder")
    from salem_jax.models import load_model

    model = load_model(args.model, dtype=args.dtype)
    chosen_from = _layers(args)
    check_top_k(args.top_k, len(chosen_from) if chosen_from else len(model.layers),
                "--layers" if chosen_from else f"model {model.name!r}")
    rows, info, subjects = edit_rows(model, args, progress)
    t1 = time.perf_counter()
    if args.method == "causal-trace" and subjects is None:
        subjects = subjects_from_source(info)
    from salem_jax.locate.choose import locate  # jax: `salem --help` does not need it

    prof = locate(model, rows, args.method, locate_config(args), subjects=subjects, progress=progress)
    if args.method == "causal-trace" and prof.extra["skipped_rows"]:
        print(f"causal trace: {len(prof.extra['skipped_rows'])} rows without their subject in the prompt are left out",
              file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    d = prof.to_dict()
    d["data"] = {"data": args.data, "split": args.split, "mode": info.get("mode"), "format": info.get("format"),
                 "rows": len(rows), "limit": args.limit}
    d["total_time"] = time.perf_counter() - t0
    d["method_time"] = time.perf_counter() - t1
    (out / "profile.json").write_text(json.dumps(d, indent=2), encoding="utf-8")
    plot_profile(prof, out / "profile.png")
    print(f"{prof.method}/{prof.scorer} on {sum(prof.examples.values())} rows {prof.examples}: chosen {', '.join(prof.chosen)}")
    print(f"wrote {out / 'profile.json'} and {out / 'profile.png'}")
    return 0
