"""Benchmark: the editability score (salem_jax.locate.editability) of every layer, against MEND.

    python benchmarks/editability_profile.py --out runs/bench-editability-profile.json   # SmolLM2 capitals
    python benchmarks/editability_profile.py --edit-set runs/capitals_smollm2/edit_set --probes 8 --lrs 3e-4
    python benchmarks/editability_profile.py --quick                                     # tiny model, smoke run

Builds (or loads, --edit-set) the experiment's edit set - the same one the main job builds, saved
to --save-edit-set for `salem train-editor` / `benchmarks/mend_sweep.py` to reuse - scores every
layer by editability on the TRAIN split (the val split stays held out for the MEND runs), prints
the profile with the best lr and the val edit accuracy MEND reached on the layers where it is
known (README: --known), and writes JSON. No training: forward and backward passes only.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `experiments` without installing

# val edit accuracy (fail + rephrasings) of the CPU-budget MEND editor after 150 steps, SmolLM2
# capitals (issue 13 / README "The paper's claim on SmolLM2")
KNOWN_MEND = {"layers.0": 0.30, "layers.20": 0.60, "layers.27": 0.91}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experiment", default="capitals_smollm2")
    ap.add_argument("--edit-set", default=None, help="a saved edit set to reuse")
    ap.add_argument("--save-edit-set", default=None, help="save the built edit set here")
    ap.add_argument("--layers", default=None, help="comma-separated layers (default: all)")
    ap.add_argument("--lrs", default="1e-4,3e-4,1e-3")
    ap.add_argument("--probes", type=int, default=16)
    ap.add_argument("--warm", type=int, default=30)
    ap.add_argument("--pass-per-edit", type=int, default=4)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    from salem_jax.locate.editability import EditabilityConfig, editability_profile
    from experiments.common import benchmark_edit_set
    from salem_jax.pipeline import load, read_records

    cfg = importlib.import_module(f"experiments.{args.experiment}").get_config(args.quick)
    cfg.progress = False
    records = read_records(cfg)
    model = load(cfg, records)
    t = time.perf_counter()
    es = benchmark_edit_set(model, records, cfg, args.edit_set, args.save_edit_set)
    t_es = time.perf_counter() - t
    ec = EditabilityConfig(lrs=tuple(float(x) for x in args.lrs.split(",")), probes=args.probes,
                           warm=min(args.warm, 4) if args.quick else args.warm, pass_per_edit=args.pass_per_edit,
                           seed=cfg.seed)
    layers = args.layers.split(",") if args.layers else None
    load0, cpu0 = os.getloadavg()[0], time.process_time()
    prof = editability_profile(model, es.rows("train"), layers=layers, config=ec, top_k=min(3, len(layers or model.layers.names())),
                               progress=True)
    cpu, load1 = time.process_time() - cpu0, os.getloadavg()[0]
    print(f"{model.name}, {args.experiment} (train split; edit set {t_es:.0f} s): editability, "
          f"{prof.examples} rows, {prof.wall_time:.0f} s wall, {cpu:.0f} s CPU (all threads), "
          f"load average {load0:.1f} -> {load1:.1f}")
    print("| layer | editability | fixed | spill | best lr | MEND val EA (150 steps) |")
    print("|---|---|---|---|---|---|")
    for i, n in enumerate(prof.layers):
        known = KNOWN_MEND.get(n, "")
        print(f"| {n} | {prof.scores['fail'][i]:.3f} | {prof.scores['fixed'][i]:.3f} | {prof.scores['spill'][i]:.3f} | "
              f"{prof.extra['best_lr'][i]:g} | {known} |")
    print(f"chosen (top 3): {', '.join(prof.chosen)}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        d = prof.to_dict()
        d.update(experiment=args.experiment, edit_set_seconds=t_es, known_mend=KNOWN_MEND, cpu_seconds=cpu,
                 load_average=[load0, load1])
        Path(args.out).write_text(json.dumps(d, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
