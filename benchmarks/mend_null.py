"""Benchmark: a saved MEND editor's edits projected on the null space of each edited kernel's input
covariance (AlphaEdit's P; `salem_jax.mend.nullspace`, `config.eval.mend_null_energy`), at several
energies, in one process.

    python benchmarks/mend_null.py --workdir runs/null-base --energies 0,0.01,0.05,0.2,0.5 \
        --out runs/bench-mend-null.json
    python benchmarks/mend_null.py --quick --workdir runs/null-tiny --energies 0,0.5   # tiny model

--workdir is a finished pipeline run of the experiment (`python -m experiments.capitals_smollm2
--workdir ...`): its saved edit set (`edit_set/`) and its editor (`editor_<method>/`, the
lowest-validation-loss checkpoint, as the pipeline evaluates). Each energy is evaluated exactly as
the pipeline's `run_method` does (`pipeline.evaluate_method` on the val split, each edit from the
base weights, the same keep set and held-out text), so the energy-0 row is the workdir's own
results.json row (checked: printed side by side) and every other row differs only by the
projection. Saliency, editability and training are not rerun: the editor fixes the layers, which
is what makes several energies cheap (the pipeline's eval-only run repeats the layer scores).
The key statistics (one pass over WikiText for the kernels missing from the cache) are paid once.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `experiments` without installing

COLUMNS = (("ea", "EA"), ("ea_token", "EA (tokens)"), ("adapt_acc", "adapt"), ("dd_acc", "DD (pass)"),
           ("dd_keep_acc", "DD (keep)"), ("locality", "locality"), ("keep/locality", "keep locality"), ("dd_ppl_text_rel", "DD (text ppl, rel)"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experiment", default="capitals_smollm2")
    ap.add_argument("--workdir", required=True, help="a finished run of the experiment (edit_set/, editor_<method>/)")
    ap.add_argument("--method", default="salem_edit", help="whose editor: workdir/editor_<method>")
    ap.add_argument("--energies", default="0,0.01,0.05,0.2,0.5", help="comma-separated; 0 = the edit as trained")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override as the experiments' --config.KEY=VALUE")
    ap.add_argument("--quick", action="store_true", help="the experiment's tiny config")
    ap.add_argument("--out", default=None, help="JSON of every row")
    args = ap.parse_args(argv)

    from experiments.common import experiment_config
    from salem_jax import pipeline as P
    from salem_jax.mend.apply import load_editor
    from salem_jax.mend.nullspace import check_energy
    from salem_jax.mend.train import prepare_splits
    from salem_jax.methods.mend import mend_edit_each_fn, mend_edit_fn, with_null_projection

    energies = [check_energy(float(e), f"--energies {e!r}") for e in args.energies.split(",")]
    cfg = experiment_config(args.experiment, args.quick, args.set)
    cfg.eval.generate = False  # teacher-forced metrics only (greedy generation is not what the projection targets)
    cfg.progress = False
    work = Path(args.workdir)
    edir = work / f"editor_{args.method}"
    if not (work / "edit_set" / "info.json").is_file() or not edir.is_dir():
        raise SystemExit(f"--workdir {work}: needs edit_set/ and editor_{args.method}/ of a finished pipeline run")
    t0 = time.perf_counter()
    records = P.read_records(cfg)
    model = P.load(cfg, records)
    texts, _ = P.held_out_text_for(model, cfg)
    es = P.edit_set(model, records, cfg, work)  # the saved one (refused if the config differs)
    train_rows, val_rows = P.split_rows(es)
    keep, keep_note = P.keep_set(model, cfg, exclude_prompts=[r["prompt"] for r in train_rows + val_rows])
    print(f"keep set: {keep_note}", flush=True)
    like = prepare_splits(model, {"train": train_rows, "val": val_rows})["val"].fail
    editor = load_editor(edir, model, step="best")
    print(f"editor {edir} step {editor.step}: {', '.join(w.path for w in editor.spec.weights)} "
          f"(setup {time.perf_counter() - t0:.0f} s)", flush=True)
    ref = {}
    if (work / "results.json").is_file():
        ref = json.loads((work / "results.json").read_text())["methods"].get(args.method, {})
    rows = []
    for e in energies:
        t = time.perf_counter()
        cfg.eval.mend_null_energy = e
        info: dict = {}
        edit, edit_each = with_null_projection(
            model, cfg, editor.spec.weights, mend_edit_fn(model, editor, like=like),
            mend_edit_each_fn(model, editor, like=like), info, say=lambda m: print(f"energy {e:g}: {m}", flush=True),
            trained=editor)
        t_eval = time.perf_counter()
        res = P.evaluate_method(model, lambda rows_: edit(model.params, rows_), val_rows, list(texts), cfg, args.method,
                                keep=keep, edit_each=lambda rows_: edit_each(model.params, rows_))
        row = {"energy": e, **{k: res.get(k) for k, _ in COLUMNS}, "keep_acc_after": res.get("keep/acc_after"),
               "seconds": time.perf_counter() - t, "eval_seconds": time.perf_counter() - t_eval}
        if "null_projection" in info:
            row["null_projection"] = info["null_projection"].summary()
        rows.append(row)
        print(f"energy {e:g}: " + ", ".join(f"{n} {row[k]:.3f}" for k, n in COLUMNS if row[k] is not None)
              + f" ({row['seconds']:.0f} s)", flush=True)
    if ref:
        print("workdir results.json: " + ", ".join(f"{n} {ref[k]:.3f}" for k, n in COLUMNS if ref.get(k) is not None))
    print("\n| energy | null dim (per kernel) | |P dW| / |dW| (mean) | " + " | ".join(n for _, n in COLUMNS) + " |")
    print("|---|---|---|" + "---|" * len(COLUMNS))
    for r in rows:
        npj = r.get("null_projection", {}).get("kernels", {})
        dims = " / ".join(f"{v['null_dim']} of {v['fan_in']}" for v in npj.values()) or "- (off)"
        kept = " / ".join(f"{v['retained_mean']:.2f}" for v in npj.values() if "retained_mean" in v) or "1"
        print(f"| {r['energy']:g} | {dims} | {kept} | "
              + " | ".join("-" if r[k] is None else f"{r[k]:.3f}" for k, _ in COLUMNS) + " |")
    if args.out:
        Path(args.out).write_text(json.dumps(dict(workdir=str(work), editor_step=editor.step, rows=rows,
                                                  reference=ref and {k: ref.get(k) for k, _ in COLUMNS}), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
