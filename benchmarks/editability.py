"""Benchmark: how much can one *untrained* MEND edit fix at a given layer?

    python benchmarks/editability.py --out runs/bench-editability.json          # SmolLM2 capitals
    python benchmarks/editability.py --layers layers.0 layers.27,layers.28,layers.29 --edit-set runs/capitals_smollm2/edit_set
    python benchmarks/editability.py --quick                                     # tiny random model, a smoke run

The editor starts as the identity (salem_jax.mend.editor): its first edit is one step of
gradient descent on the *standardised* rank-1 factors, `W - lr * sum_t u~_t^T delta~_t`. This
benchmark fills the editor's running statistics from `--warm` training groups (what the first
training steps do), then scores that identity editor on the validation groups at a grid of edit
learning rates, for each set of edited layers: val fail / adapt accuracy, the KL on the pass
rows and the pass-accuracy drawdown. It shows, before any training, how far a plain normalised
gradient step at that layer goes and how much it spills onto the pass inputs - the ceiling the
editor starts from. One run, no training: minutes on a CPU.

Data: the edit set of an experiment (`--experiment`, default capitals_smollm2, built with that
experiment's config unless `--edit-set DIR` points at a saved one). Prints a table and writes
JSON to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
import time
from pathlib import Path

from salem_jax.compile_cache import add_flag, enable_compile_cache

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `experiments` without installing


def one_step_scores(model, data, layers, tcfg, lrs, warm: int):
    """{lr: val summary} of the identity editor on `layers` after `warm` groups of statistics."""
    import jax
    import jax.numpy as jnp

    from salem_jax import parallel
    from salem_jax.mend.editor import EditorSpec, update_norm_state
    from salem_jax.mend.train import evaluate, group_factors, init_train_state, train_batch

    spec = EditorSpec.from_params(model.layers.weights(layers, part="mlp"), model.params, tcfg.editor)
    state = init_train_state(spec, tcfg)
    factors = jax.jit(lambda p, b: group_factors(model.apply, spec, p, b))
    norm = state["norm"]
    for step in range(warm):
        norm = update_norm_state(spec, norm, factors(model.params, train_batch(data["train"], tcfg, step)["fail"]))
    mesh = parallel.data_mesh()
    out = {}
    for lr in lrs:
        params = {**state["params"], "lr": {k: jnp.asarray(lr, jnp.float32) for k in state["params"]["lr"]}}
        out[lr] = evaluate(model, spec, tcfg, mesh, params, norm, model.params, data["val"])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experiment", default="capitals_smollm2")
    ap.add_argument("--edit-set", default=None, help="a saved edit set (salem_jax.data.edit_set) to reuse")
    ap.add_argument("--layers", nargs="+", default=None,
                    help="layer sets, each comma separated (default: the first block and the last three)")
    ap.add_argument("--lrs", default="1e-5,1e-4,3e-4,1e-3,3e-3,1e-2")
    ap.add_argument("--warm", type=int, default=30, help="training groups folded into the statistics first")
    ap.add_argument("--val-groups", type=int, default=64)
    ap.add_argument("--quick", action="store_true", help="the experiment's tiny config: a smoke run")
    ap.add_argument("--out", default=None)
    add_flag(ap)
    args = ap.parse_args(argv)
    enable_compile_cache(enabled=not args.no_compile_cache)

    from salem_jax.mend.train import prepare_splits
    from salem_jax.methods.mend import train_config
    from experiments.common import benchmark_edit_set
    from salem_jax.pipeline import load, read_records

    cfg = importlib.import_module(f"experiments.{args.experiment}").get_config(args.quick)
    cfg.progress = False
    records = read_records(cfg)
    model = load(cfg, records)
    es = benchmark_edit_set(model, records, cfg, args.edit_set)
    data = prepare_splits(model, {"train": es.rows("train"), "val": es.rows("val")})
    tcfg = dataclasses.replace(train_config(cfg), val_groups=args.val_groups).resolved(1)
    names = model.layers.names()
    layer_sets = [s.split(",") for s in args.layers] if args.layers else [names[:1], names[-3:]]
    lrs = [float(x) for x in args.lrs.split(",")]
    rows = []
    print(f"{model.name}, {args.experiment}: identity editor after {args.warm} groups of statistics")
    print("| layers | edit lr | val fail acc | val adapt acc | KL (pass) | DD (pass acc) | s |")
    print("|---|---|---|---|---|---|---|")
    for layers in layer_sets:
        t = time.perf_counter()
        scores = one_step_scores(model, data, layers, tcfg, lrs, args.warm)
        secs = (time.perf_counter() - t) / len(lrs)
        for lr, v in scores.items():
            rows.append({"layers": layers, "lr": lr, **v, "seconds_per_lr": secs})
            print(f"| {','.join(layers)} | {lr:g} | {v['fail_acc']:.3f} | {v['adapt_acc']:.3f} | {v['kl']:.3f} | "
                  f"{v['drawdown']:.3f} | {secs:.0f} |", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"model": model.name, "experiment": args.experiment, "warm": args.warm,
                                              "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
