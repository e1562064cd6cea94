"""Benchmark: many edits on the same weights - sequential, independent and batch editing, scored on
retention (EA and adapt accuracy over ALL edits made so far), the keep set and locality against the
untouched base model (salem_jax.eval.sequential; the pipeline's `--config.eval.sequential` mode).

    python benchmarks/many_edits.py --experiment zsre_smollm2 --methods ft --steps 1,10,50,100 \\
        --workdir runs/many-zsre --out runs/many-zsre.json [--config.KEY=VALUE ...]
    python benchmarks/many_edits.py --quick                        # tiny random model, a smoke run

--quick: the experiment's tiny config (a tiny random model), 60 records with a 0.2 val split (at
most 12 val fail rows), 2 one-at-a-time edits, and steps 1,2,4 unless --steps is given (the
default 1,10,50,100 asks for more edits than that val split has, which the pipeline refuses).

--experiment names an experiments/ config (zsre_smollm2, counterfact_smollm2, capitals_smollm2, ...)
whose data, model, mode and keep set are used; --methods replaces its methods; --modes picks among
sequential (apply the editor again to the edited weights), independent (each edit on the original
weights, the changes summed), batch (all T edits in one update) and sequential:N (sequential batches
of N edits, each call on the weights the previous produced: AlphaEdit's protocol; every T a multiple
of N; locate-then-edit methods need --config.locate_edit.batch_size >= N for one closed-form update
per call, the default 100 is). The edits are the val fail rows in record order;
--config.eval.sequential_order_seed=N (N >= 0) applies the same first max(steps) rows in a seeded
order (numpy.random.default_rng(N).permutation(max(steps)); the split, keep set and every other seeded
step unchanged, unlike --config.seed, which redraws the split), "EA first 10" being the first 10 of
that order; the seed and the order (row ids) are in many_edits_<method>.json and --out's config.
Any --config.KEY=VALUE override
applies last (e.g. --config.limit=1037 --config.eval.max_edits=5). The method's one-edit-at-a-time
evaluation runs too (config.eval.max_edits edits), as in every pipeline run.

Writes the pipeline's outputs into --workdir (many_edits_<method>.json after every T,
many_edits.png, many_edits.md, results.json/md) and the studies with the timings to --out; prints
the table.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `experiments` without installing


STEPS = "1,10,50,100"  # --steps' default
QUICK_STEPS = "1,2,4"  # with --quick: at most 12 val fail rows (60 records, val 0.2)


def build_config(args: argparse.Namespace, rest: list[str]):
    """The pipeline config of the parsed arguments (`rest`: --config.KEY=VALUE overrides, applied
    last); the steps and modes checked."""
    from experiments.common import apply_overrides
    from salem_jax.eval import sequential as S

    exp = importlib.import_module(f"experiments.{args.experiment}")
    cfg = exp.get_config(args.quick)
    if args.methods:
        cfg.methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    steps = args.steps if args.steps is not None else QUICK_STEPS if args.quick else STEPS
    cfg.eval.sequential, cfg.eval.sequential_modes = steps, args.modes
    if args.quick:
        cfg.limit, cfg.val_fraction, cfg.eval.max_edits = 60, 0.2, 2
    cfg = apply_overrides(cfg, rest)
    S.parse_modes(cfg.eval.sequential_modes, steps=S.parse_steps(cfg.eval.sequential))
    return cfg


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experiment", default="zsre_smollm2")
    ap.add_argument("--methods", default=None, help="comma separated registry names (default: the experiment's)")
    ap.add_argument("--steps", default=None,
                    help=f"score after this many edits (default {STEPS}; with --quick {QUICK_STEPS})")
    ap.add_argument("--modes", default="sequential,independent,batch")
    ap.add_argument("--workdir", default="runs/many_edits")
    ap.add_argument("--out", default=None, help="JSON summary (default WORKDIR/many_edits_summary.json)")
    ap.add_argument("--quick", action="store_true", help="tiny random model, few records (a smoke run)")
    args, rest = ap.parse_known_args(argv)
    cfg = build_config(args, rest)

    from salem_jax.eval import sequential as S
    from salem_jax.pipeline import run_pipeline

    t = time.perf_counter()
    out = run_pipeline(cfg, args.workdir)
    seconds = time.perf_counter() - t
    studies = {k: v["many_edits"] for k, v in out["methods"].items() if "many_edits" in v}
    retries = {k: v["many_edits_retries"] for k, v in out["methods"].items() if "many_edits_retries" in v}
    summary = dict(experiment=args.experiment, model=out["model"], config=out["config"], seconds=seconds,
                   times=out["times"], edit_set=out["edit_set"], keep=out["keep"], text=out["text"], studies=studies,
                   **({"edit_retries": retries} if retries else {}),
                   single_edit={k: {m: v.get(m) for m in ("edits", "ea", "adapt_acc", "dd_acc", "dd_keep_acc",
                                                            "locality", "gen/fail_starts_after", "portability")}
                                for k, v in out["methods"].items()})
    path = Path(args.out) if args.out else Path(args.workdir) / "many_edits_summary.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    S.write_json(path, summary)
    print(S.summary_table(studies))
    lost = S.keep_lost_lines(studies)
    if lost:
        print(lost)
    print(f"[many_edits] {seconds:.0f}s; summary in {path}, plot in {Path(args.workdir) / 'many_edits.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
