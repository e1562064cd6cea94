"""The main job's evaluation stage, old against new, alternated in one process, with its trained editor.

`benchmarks/eval_edit.py` times the evaluator on stand-in edits; this runs the main job's own
evaluation (`pipeline.evaluate_method`: 19 held-out edits by the trained MEND editor, each scored
on its fail / adapt / pass / keep rows, the text for the first eval.ppl_edits, and the base and
edited models' greedy generations) on a workdir where `python -m experiments.capitals_smollm2
--workdir DIR` ran to the end: the edit set is read back and the editor resumed from its
checkpoint (no step trained; the editability layer choice is read from DIR/results.json instead of
recomputed). Then `--reps` repetitions of each version, alternated (old, new, new, old, ...):

  old   the evaluator of `--old-edits` (another version's salem_jax/eval/edits.py, e.g. main's) and
        the generations as the pipeline made them before session 16: `generations_after_edits` of
        the 2E models [base x E, edited x E] (every block of both prefills run)
  new   this version's pipeline (`EditEvaluator`, `generations_before_after_edits`)

`--ab apply` (session 17) compares instead how the edits are applied, everything else this
version's: "old" calls the method's `edit` once per record, "new" its `edit_each` (all records'
edits in one vmapped call, `mend.apply.apply_each`):

    SALEM_JAX_CACHE=/work/cache17 PYTHONPATH=. python benchmarks/eval_stage.py --workdir runs/cap \\
        --ab apply --reps 3 --out runs/bench-eval-stage-apply.json

Every repetition's metrics must equal the first old one's (rtol 1e-4; generated shares exactly).
Prints and writes (`--out`, JSON) each repetition's wall and CPU seconds and its `eval_seconds`
split (setup, edit, score, generate), the load average before and after, and the warm ratios.

    SALEM_JAX_CACHE=/work/cache15 PYTHONPATH=. python benchmarks/eval_stage.py --workdir runs/cap \\
        --old-edits /work/main/salem_jax/eval/edits.py --reps 3 --out runs/bench-eval-stage.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class _Done(Exception):
    """Raised once the repetitions ran: the pipeline stops before writing results."""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", required=True, help="a finished run of experiments.capitals_smollm2")
    ap.add_argument("--ab", choices=("evaluator", "apply"), default="evaluator",
                    help="evaluator: --old-edits' evaluator and the 2E-model generation against this version's; "
                         "apply: one edit call per record against all records' edits in one call")
    ap.add_argument("--old-edits", default=None, help="the old version's salem_jax/eval/edits.py (--ab evaluator)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of each version (the first of each compiles)")
    ap.add_argument("--only", choices=("old", "new"), default=None, help="time one version only")
    ap.add_argument("--out", default="runs/bench-eval-stage.json")
    args = ap.parse_args(argv)
    work = Path(args.workdir)
    done = json.loads((work / "results.json").read_text())
    layers = tuple(done["methods"]["salem_edit"]["layers"])

    from experiments.capitals_smollm2 import get_config
    from salem_jax import pipeline
    from salem_jax.compile_cache import enable_compile_cache
    from salem_jax.eval import generated

    enable_compile_cache()
    cfg = get_config()
    cfg.progress = False
    new_evaluator, new_gen = pipeline.EditEvaluator, pipeline.generations_before_after_edits
    if args.ab == "evaluator":
        if not args.old_edits:
            ap.error("--ab evaluator needs --old-edits")
        spec = importlib.util.spec_from_file_location("old_edits", args.old_edits)
        old_edits = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(old_edits)

    def old_gen(model, base, kept, pairs, *, extra_tokens, edits_per_call, **kw):
        both = generated.generations_after_edits(model, base, [base] * len(kept) + list(kept), list(pairs) * 2,
                                                 extra_tokens=extra_tokens, models_per_call=min(2 * len(kept), 64))
        return both[: len(kept)], both[len(kept):]

    if args.ab == "evaluator":
        versions = {"old": (old_edits.EditEvaluator, old_gen), "new": (new_evaluator, new_gen)}
    else:
        versions = {"old": (new_evaluator, new_gen), "new": (new_evaluator, new_gen)}
    res: dict = {"args": vars(args), "layers": list(layers), "load_start": os.getloadavg(), "reps": []}
    real_run_method = pipeline.run_method

    def run_method(method, ctx, keep, cf_records, times, portability=None):
        # the layer(s) the finished run chose: editability is not rerun
        t = time.perf_counter()
        prepared = method.prepare(ctx, layers)
        res["prepare_s"] = time.perf_counter() - t
        print(f"editor ready in {res['prepare_s']:.1f} s (load {os.getloadavg()[0]:.1f})", flush=True)
        edit = lambda rows: prepared.edit(ctx.model.params, rows)  # noqa: E731
        each = None if prepared.edit_each is None else (lambda rows: prepared.edit_each(ctx.model.params, rows))
        # --ab evaluator: both versions apply the edits as the pipeline does (edit_each when the method has it)
        edit_each = {"old": None if args.ab == "apply" else each, "new": each}
        if args.ab == "apply" and each is None:
            raise SystemExit(f"{method.name} has no edit_each: nothing to compare")
        if args.ab == "apply":  # the edited weights themselves, per record: one call each vs together
            from salem_jax.models.base import get_path
            from salem_jax.models.from_block import changed_paths

            fails = [r for r in (ctx.val_rows if prepared.eval_rows is None else prepared.eval_rows)
                     if r["group"] == "fail"][: cfg.eval.max_edits]
            alone, together = [edit([r]) for r in fails], each(fails)
            worst_abs = worst_rel = 0.0
            for a, b in zip(alone, together):
                paths = changed_paths(ctx.model.params, a)
                if paths != changed_paths(ctx.model.params, b):
                    raise SystemExit("edit_each changed other weights than edit")
                for p in paths:
                    x, y = np.asarray(get_path(a, p)), np.asarray(get_path(b, p))
                    base = np.asarray(get_path(ctx.model.params, p))
                    worst_abs = max(worst_abs, float(np.abs(x - y).max()))
                    worst_rel = max(worst_rel, float(np.abs(x - y).max() / np.abs(x - base).max()))
            res["kernels_vs_one_call_each"] = {"edits": len(fails), "max_abs": worst_abs,
                                               "max_abs_over_edit_size": worst_rel}
            print(f"edited kernels, together vs one call each ({len(fails)} edits): max abs diff {worst_abs:.3g}, "
                  f"{worst_rel:.3g} of the edit's size", flush=True)
        eval_rows = ctx.val_rows if prepared.eval_rows is None else prepared.eval_rows
        first = None
        names = [args.only] if args.only else ["old", "new"]
        for rep in range(args.reps):
            for name in (names if rep % 2 == 0 else names[::-1]):
                pipeline.EditEvaluator, pipeline.generations_before_after_edits = versions[name]
                load0, t, c = os.getloadavg()[0], time.perf_counter(), time.process_time()
                out = pipeline.evaluate_method(ctx.model, edit, eval_rows, list(ctx.texts), ctx.cfg, method.name,
                                               keep=keep, cf_records=cf_records, portability=portability,
                                               edit_each=edit_each[name])
                wall, cpu = time.perf_counter() - t, time.process_time() - c
                row = {"rep": rep, "version": name, "wall_s": wall, "cpu_s": cpu, "load": [load0, os.getloadavg()[0]],
                       "eval_seconds": out["eval_seconds"]}
                res["reps"].append(row)
                print(f"rep {rep} {name}: {wall:.1f} s wall, {cpu:.1f} s CPU, load {load0:.1f} -> "
                      f"{row['load'][1]:.1f}; " + ", ".join(f"{k} {v:.1f}" for k, v in out["eval_seconds"].items()),
                      flush=True)
                metrics = {k: v for k, v in out.items() if k not in ("eval_seconds", "edit_seconds")}
                if first is None:
                    first = metrics
                    res["metrics"] = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
                    continue
                bad = {k: (v, metrics.get(k)) for k, v in first.items()
                       if isinstance(v, float) and not np.isclose(v, metrics.get(k, np.nan), rtol=1e-4, atol=1e-6,
                                                                  equal_nan=True)}
                bad.update({k: (v, metrics.get(k)) for k, v in first.items() if k.startswith("gen/") and v != metrics.get(k)})
                if bad or sorted(first) != sorted(metrics):
                    raise SystemExit(f"rep {rep} {name}: metrics differ from the first repetition's: {bad}")
        pipeline.EditEvaluator, pipeline.generations_before_after_edits = new_evaluator, new_gen
        raise _Done

    pipeline.run_method = run_method
    try:
        pipeline.run_pipeline(cfg, work)
    except _Done:
        pass
    finally:
        pipeline.run_method = real_run_method
    res["load_end"] = os.getloadavg()
    warm = {}
    for name in ("old", "new"):
        rows = [r for r in res["reps"] if r["version"] == name]
        if len(rows) > 1:
            warm[name] = {k: statistics.median(r[k] for r in rows[1:]) for k in ("wall_s", "cpu_s")}
            warm[name].update({f"{k}_s": statistics.median(r["eval_seconds"][k] for r in rows[1:])
                               for k in rows[0]["eval_seconds"]})
    res["warm_median"] = warm
    print(f"\nthe main job's evaluation ({len(layers)} layer(s) {', '.join(layers)}), load "
          f"{res['load_start'][0]:.1f} -> {res['load_end'][0]:.1f}")
    print("| version | rep | wall s | CPU s | setup | edit | score | generate |\n|---|---|---|---|---|---|---|---|")
    for r in res["reps"]:
        e = r["eval_seconds"]
        print(f"| {r['version']} | {r['rep']} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {e['setup']:.1f} | {e['edit']:.1f} | "
              f"{e['score']:.1f} | {e['generate']:.1f} |")
    if len(warm) == 2:
        res["warm_ratio"] = {k: warm["old"][k] / warm["new"][k] for k in warm["old"] if warm["new"][k] > 0}
        print("warm medians old / new: " + ", ".join(f"{k} {v:.2f}x" for k, v in res["warm_ratio"].items()))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1, default=float))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
