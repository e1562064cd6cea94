"""Benchmark: the paper's layer oracle - the pipeline's MEND editor trained on each layer set - with
the fine-tuning sweep as second oracle, and where the layer scores' choices rank in it.

    python benchmarks/mend_sweep.py --edit-set runs/capitals_smollm2/edit_set --out runs/bench-mend-sweep.json \
        --budget-minutes 120 --profiles runs/bench-editability-profile.json
    python benchmarks/mend_sweep.py --quick                       # tiny model, a smoke run
    python benchmarks/mend_sweep.py --experiment fever_minilm --set finetuned=runs/minilm-fever \
        --contiguous 3 --random-sets 2 --scorers --out runs/bench-table6-fever.json   # the paper's Table 6

Classifier experiments (fever_minilm, nli_minilm: configs with a `finetuned` key) build their edit
set exactly as the experiment does (experiments.classifier.classifier_edit_set: the fine-tuned
folder's `edit` split, the same flips and train / val split), and with --table3 each set's editor
(its lowest-val-loss checkpoint, as the experiment's MEND methods use) is also scored by the
experiment's own evaluation (EA / DD val on eval.max_edits edits and eval.max_pass pass rows), so
its rows compare with Table 3's. --contiguous K adds every run of K consecutive layers,
--random-sets N adds N seeded random K-sets (salem_jax.locate.mend_sweep.random_layer_sets).
--scorers profiles the train rows with every saliency scorer (salem_jax.saliency.SCORERS) and
reports where each scorer's top-1 layer and top-K set fall in the ranking. The FT sweep runs only
when single layers are swept.

Layer sets: --layer-sets ("a,b;c") or every --stride-th layer, the last, and three triples
(salem_jax.locate.mend_sweep.default_layer_sets). Each set trains the experiment's editor config
(the CPU budget: 150 steps, effective batch 1, lr 1e-4, val every 50) in --workdir/<set> (a
killed run resumes). The estimate (sets x steps x --seconds-per-step) is printed first and a sweep
over --budget-minutes is refused before anything trains. Then the FT sweep (salem_jax.locate.sweep,
10 Adam steps per layer) on the same single layers, the Spearman correlation of the two oracles'
single-layer rankings, and for each --profiles JSON (a LayerProfile: salem saliency, editability,
...) the MEND rank of its chosen layer. Prints tables, writes JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

from salem_jax.locate import mend_sweep as MS
from salem_jax import pipeline as P
from salem_jax.locate.choose import group_batch
from salem_jax.locate.profile import jsonable, top_k_layers
from salem_jax.locate.rank import spearman
from salem_jax.locate.sweep import SweepConfig, sweep_layers
from salem_jax.mend.train import prepare_splits
from salem_jax.methods.mend import train_config
from salem_jax.pipeline import load, read_records

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `experiments` without installing


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experiment", default="capitals_smollm2")
    ap.add_argument("--edit-set", default=None)
    ap.add_argument("--save-edit-set", default=None, help="build the experiment's edit set and save it here (reuse with --edit-set)")
    ap.add_argument("--layer-sets", default=None)
    ap.add_argument("--stride", type=int, default=3)
    ap.add_argument("--steps", type=int, default=None, help="editor steps per set (default: the experiment's)")
    ap.add_argument("--budget-minutes", type=float, default=60.0)
    ap.add_argument("--seconds-per-step", type=float, default=None)
    ap.add_argument("--dd-budget", type=float, default=0.05)
    ap.add_argument("--stop-after-minutes", type=float, default=None,
                    help="start a set only if it should end by then (mean time per set so far); rank the finished ones")
    ap.add_argument("--no-ft", action="store_true", help="skip the FT sweep (the second oracle)")
    ap.add_argument("--locality-floor", type=float, default=None,
                    help="rank a set within budget only if its val locality is >= this (zsRE: drawdown is 0 by construction)")
    ap.add_argument("--profiles", nargs="*", default=[], help="LayerProfile JSON files whose choice is ranked")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override as the experiments' --config.KEY=VALUE (e.g. finetuned=runs/minilm-fever)")
    ap.add_argument("--contiguous", type=int, default=0, help="add every run of this many consecutive layers")
    ap.add_argument("--random-sets", type=int, default=0, help="add this many seeded random sets of --contiguous layers")
    ap.add_argument("--random-seed", type=int, default=0)
    ap.add_argument("--scorers", action="store_true", help="rank every saliency scorer's choice (needs the train rows)")
    ap.add_argument("--table3", action="store_true", help="classifier experiments: also the experiment's EA / DD per set")
    ap.add_argument("--workdir", default="runs/mend-sweep")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    from experiments.common import benchmark_edit_set, experiment_config

    cfg = experiment_config(args.experiment, args.quick, args.set)
    if args.steps:
        cfg.editor.steps = args.steps
        cfg.editor.val_every = min(cfg.editor.val_every, args.steps)
        cfg.editor.checkpoint_every = min(cfg.editor.checkpoint_every, args.steps)
    classifier = "finetuned" in cfg
    work = Path(args.workdir)
    if classifier:  # the experiment's own classifier and edit set
        from experiments.classifier import classifier_edit_set

        prep = classifier_edit_set(cfg, work, print)
        model, es = prep["model"], prep["es"]
    else:
        records = read_records(cfg)
        model = load(cfg, records)
        if args.edit_set and args.save_edit_set:
            raise SystemExit("--edit-set and --save-edit-set: give one (load a saved edit set, or build and save it)")
        es = benchmark_edit_set(model, records, cfg, args.edit_set, args.save_edit_set)
    names = model.layers.names()
    sets = ([tuple(s.split(",")) for s in args.layer_sets.split(";")] if args.layer_sets
            else [] if args.contiguous else MS.default_layer_sets(names, args.stride))
    if args.contiguous:
        sets += [s for s in MS.contiguous_sets(names, args.contiguous) if frozenset(s) not in map(frozenset, sets)]
        if args.random_sets:
            rand = MS.random_layer_sets(names, args.contiguous, args.random_sets, args.random_seed, exclude=sets)
            print(f"random sets (seed {args.random_seed}): {['+'.join(r) for r in rand]}")
            sets += rand
    sets = MS.check_layer_sets(model, sets)
    tc = train_config(cfg)
    sc = MS.MendSweepConfig(drawdown_budget=args.dd_budget, budget_seconds=60 * args.budget_minutes, seed=cfg.seed,
                            part=cfg.saliency.part, locality_floor=args.locality_floor,
                            stop_after_seconds=None if args.stop_after_minutes is None else 60 * args.stop_after_minutes,
                            **({} if args.seconds_per_step is None else {"seconds_per_step": args.seconds_per_step}))
    train, val = es.rows("train"), es.rows("val")
    data = prepare_splits(model, {"train": train, "val": val})
    scorer_top = {}
    if args.scorers:  # every scorer's choice on the train rows, before the (long) sweep
        t = time.perf_counter()
        prof = P.saliency(model, train, cfg)
        by = dict(prof.extra["scores_by_scorer"])
        with cfg.unlocked():
            cfg.saliency.scorer = "lga"
        by["lga"] = P.saliency(model, train, cfg).scores
        cfg.saliency.scorer = prof.scorer
        k = args.contiguous or 3
        for name, groups in by.items():
            g = prof.select_group if prof.select_group in groups else "overall"
            scorer_top[name] = {"group": g, "scores": groups[g], "top1": top_k_layers(groups[g], prof.layers, 1),
                                f"top{k}": top_k_layers(groups[g], prof.layers, k)}
        print(f"scorers profiled in {time.perf_counter() - t:.0f} s: " + "; ".join(
            f"{n} -> {v['top1'][0]} / {'+'.join(v[f'top{k}'])}" for n, v in scorer_top.items()))
    res = MS.mend_sweep(model, data, sets, tc, work, config=sc, progress=False)
    if res.skipped:
        print(f"skipped (stop after {args.stop_after_minutes} min): {['+'.join(s) for s in res.skipped]}")
    sets = list(res.layer_sets)  # the sets trained

    print(f"{model.name}, {args.experiment}: MEND on each layer set ({tc.max_steps} steps), val groups "
          f"{res.rows[0]['groups']}, drawdown budget {sc.drawdown_budget}, locality floor {sc.locality_floor}")
    print("| rank | layers | val EA [95% CI] | fail | adapt | DD [95% CI] | locality [95% CI] | KL | rank CI | P(first) "
          "| curve EA | s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for i in res.ranking:
        r = res.rows[i]
        curve = " / ".join(f"{c['edit_acc']:.2f}" for c in r["curve"])
        print(f"| {r['rank']} | {'+'.join(r['layers'])} | {r['edit_acc']:.3f} [{r['edit_acc_ci'][0]:.2f}, "
              f"{r['edit_acc_ci'][1]:.2f}] | {r['fail_acc']:.3f} | {r['adapt_acc']:.3f} | {r['drawdown']:.3f} "
              f"[{r['drawdown_ci'][0]:.2f}, {r['drawdown_ci'][1]:.2f}] | {r['locality']:.3f} "
              f"[{r['locality_ci'][0]:.3f}, {r['locality_ci'][1]:.3f}] | {r['kl']:.3f} | "
              f"{r['rank_ci'][0]:.0f}-{r['rank_ci'][1]:.0f} | {r['p_first']:.2f} | {curve} | {r['seconds']:.0f} |")

    # the second oracle: fine-tuning each single layer on the train fail rows
    singles = [s[0] for s in sets if len(s) == 1]
    ft, rho = None, None
    if args.no_ft:
        print("FT sweep skipped (--no-ft)")
    elif len(singles) < 2:  # one layer has no ranking to correlate (it used to stop the run here)
        print(f"FT sweep skipped: {len(singles)} single-layer set(s), a Spearman correlation needs two or more")
    else:
        ft = sweep_layers(model, model.params, group_batch(model, train, "fail"), rephrases=group_batch(model, train, "adapt"),
                          keep=group_batch(model, train, "pass"), layers=singles,
                          config=SweepConfig(learning_rates=(3e-4, 1e-3), steps=10, part=cfg.saliency.part))
        mend_single = [res.rows[i] for i, s in enumerate(sets) if len(s) == 1]
        mend_pos = {r["layers"][0]: r["rank"] for r in mend_single}
        rho = spearman(-np.asarray([mend_pos[n] for n in singles], float), ft.oracle_scores())
        print(f"FT sweep ranking of the single layers: {', '.join(ft.ranking())}; Spearman with MEND's: {rho:.2f}")
    table3 = {}
    if args.table3 and classifier:
        import functools

        from salem_jax.methods.mend import mend_edit_fn, train_mend

        for s in sets:  # resumes the finished run (no training) and takes its best checkpoint
            t = time.perf_counter()
            editor, _ = train_mend(model, data, s, cfg, work / MS.set_name(s))
            edit = functools.partial(mend_edit_fn(model, editor, like=data["val"].fail), model.params)
            m = P.evaluate_method(model, edit, val, [], cfg, f"mend {'+'.join(s)} (val)")
            table3["+".join(s)] = {"evaluated_step": editor.step, "ea": m.get("ea"), "dd_acc": m.get("dd_acc"),
                                   "seconds": time.perf_counter() - t}
            print(f"  table 3 evaluation of {'+'.join(s)} (step {editor.step}): EA val {m.get('ea'):.3f} "
                  f"DD val {m.get('dd_acc'):.3f} ({table3['+'.join(s)]['seconds']:.0f} s)")
    for name, v in scorer_top.items():
        for key in [x for x in v if x.startswith("top")]:
            v[f"{key}_rank"] = res.position(v[key])
            v[f"{key}_sets_containing"] = [("+".join(res.layer_sets[i]), p) for p, i in enumerate(res.ranking, 1)
                                           if set(v[key]) <= set(res.layer_sets[i])]
        print(f"{name}: top-1 {v['top1'][0]} (in sets ranked {[p for _, p in v['top1_sets_containing']]}), "
              + ", ".join(f"{key} {'+'.join(v[key])} rank {v[key + '_rank']}" for key in v
                          if key.startswith("top") and not key.endswith(("_rank", "_containing")) and key != "top1"))
    choices = []
    for p in args.profiles:
        prof = json.loads(Path(p).read_text())
        top = tuple(prof["chosen"][:1])
        choices.append({"profile": p, "method": prof["method"], "scorer": prof["scorer"], "chosen": top,
                        "mend_rank": res.position(top), "of": len(sets)})
        print(f"{prof['method']}/{prof['scorer']} chose {top[0]}: MEND rank {res.position(top)} of {len(sets)}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(jsonable({
            "experiment": args.experiment, "overrides": args.set, "layer_sets": sets, "skipped": res.skipped, "random_seed": args.random_seed,
            "mend": res.to_dict(), "ft": ft.to_profile(model=model.name).to_dict() if ft else None,
            "spearman_mend_ft_singles": rho, "choices": choices, "scorers": scorer_top, "table3": table3}), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
