"""Benchmark: the paper's layer oracle - the pipeline's MEND editor trained on each layer set - with
the fine-tuning sweep as second oracle, and where the layer scores' choices rank in it.

    python benchmarks/mend_sweep.py --edit-set runs/capitals_smollm2/edit_set --out runs/bench-mend-sweep.json \
        --budget-minutes 120 --profiles runs/bench-editability-profile.json
    python benchmarks/mend_sweep.py --quick                       # tiny model, a smoke run

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
import importlib
import json
import sys
from pathlib import Path

import numpy as np

from salem_jax.data.edit_set import load_edit_set
from salem_jax.edit_set_builder import build_edit_set
from salem_jax.locate import mend_sweep as MS
from salem_jax.locate.choose import group_batch
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
    ap.add_argument("--layer-sets", default=None)
    ap.add_argument("--stride", type=int, default=3)
    ap.add_argument("--steps", type=int, default=None, help="editor steps per set (default: the experiment's)")
    ap.add_argument("--budget-minutes", type=float, default=60.0)
    ap.add_argument("--seconds-per-step", type=float, default=None)
    ap.add_argument("--dd-budget", type=float, default=0.05)
    ap.add_argument("--profiles", nargs="*", default=[], help="LayerProfile JSON files whose choice is ranked")
    ap.add_argument("--workdir", default="runs/mend-sweep")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)



    cfg = importlib.import_module(f"experiments.{args.experiment}").get_config(args.quick)
    cfg.progress = False
    records = read_records(cfg)
    model = load(cfg, records)
    names = model.layers.names()
    sets = ([tuple(s.split(",")) for s in args.layer_sets.split(";")] if args.layer_sets
            else MS.default_layer_sets(names, args.stride))
    sets = MS.check_layer_sets(model, sets)
    tc = train_config(cfg)
    if args.steps:
        tc = dataclasses.replace(tc, max_steps=args.steps, val_every=min(tc.val_every, args.steps),
                                 checkpoint_every=min(tc.checkpoint_every, args.steps))
    sc = MS.MendSweepConfig(drawdown_budget=args.dd_budget, budget_seconds=60 * args.budget_minutes, seed=cfg.seed,
                            part=cfg.saliency.part,
                            **({} if args.seconds_per_step is None else {"seconds_per_step": args.seconds_per_step}))
    es = load_edit_set(args.edit_set) if args.edit_set else build_edit_set(
        model, records, mode=cfg.mode, seed=cfg.seed, val_fraction=cfg.val_fraction, batch_size=cfg.score_batch,
        progress=False, skip_invalid=cfg.skip_invalid)
    data = prepare_splits(model, {"train": es.rows("train"), "val": es.rows("val")})
    res = MS.mend_sweep(model, data, sets, tc, Path(args.workdir), config=sc, progress=False)

    print(f"{model.name}, {args.experiment}: MEND on each layer set ({tc.max_steps} steps), val groups "
          f"{res.rows[0]['groups']}, drawdown budget {sc.drawdown_budget}")
    print("| rank | layers | val EA [95% CI] | fail | adapt | DD [95% CI] | KL | rank CI | P(first) | curve EA | s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for i in res.ranking:
        r = res.rows[i]
        curve = " / ".join(f"{c['edit_acc']:.2f}" for c in r["curve"])
        print(f"| {r['rank']} | {'+'.join(r['layers'])} | {r['edit_acc']:.3f} [{r['edit_acc_ci'][0]:.2f}, "
              f"{r['edit_acc_ci'][1]:.2f}] | {r['fail_acc']:.3f} | {r['adapt_acc']:.3f} | {r['drawdown']:.3f} "
              f"[{r['drawdown_ci'][0]:.2f}, {r['drawdown_ci'][1]:.2f}] | {r['kl']:.3f} | "
              f"{r['rank_ci'][0]:.0f}-{r['rank_ci'][1]:.0f} | {r['p_first']:.2f} | {curve} | {r['seconds']:.0f} |")

    # the second oracle: fine-tuning each single layer on the train fail rows
    train = es.rows("train")
    singles = [s[0] for s in sets if len(s) == 1]
    ft = sweep_layers(model, model.params, group_batch(model, train, "fail"), rephrases=group_batch(model, train, "adapt"),
                      keep=group_batch(model, train, "pass"), layers=singles,
                      config=SweepConfig(learning_rates=(3e-4, 1e-3), steps=10, part=cfg.saliency.part))
    mend_single = [res.rows[i] for i, s in enumerate(sets) if len(s) == 1]
    mend_pos = {r["layers"][0]: r["rank"] for r in mend_single}
    ft_scores = ft.oracle_scores()
    rho = spearman(-np.asarray([mend_pos[n] for n in singles], float), ft_scores)
    print(f"FT sweep ranking of the single layers: {', '.join(ft.ranking())}; Spearman with MEND's: {rho:.2f}")
    choices = []
    for p in args.profiles:
        prof = json.loads(Path(p).read_text())
        top = tuple(prof["chosen"][:1])
        choices.append({"profile": p, "method": prof["method"], "scorer": prof["scorer"], "chosen": top,
                        "mend_rank": res.position(top), "of": len(sets)})
        print(f"{prof['method']}/{prof['scorer']} chose {top[0]}: MEND rank {res.position(top)} of {len(sets)}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"mend": res.to_dict(), "ft": ft.to_profile(model=model.name).to_dict(),
                                              "spearman_mend_ft_singles": rho, "choices": choices}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
