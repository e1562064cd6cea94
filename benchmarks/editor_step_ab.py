"""The editor's training step of this checkout against another `mend/train.py` (e.g. main's), in
one process, alternated step by step, on an experiment's edit set, editor config and layer, with
the batches `train_editor` builds (block inputs and pass logits kept, each batch cut after its
longest row; this checkout's FLAT sizes per step, `flat_step_sizes`, against the run-wide
`flat_train_sizes` of the other file).

    python benchmarks/editor_step_ab.py --compare-with /work/main/salem_jax/mend/train.py \
        --edit-set runs/capitals_smollm2/edit_set --layers layers.26 --steps 30

Prints XLA's cost model of both steps at the most common padded length (GFLOP, GB accessed), the
first call of each program, the median step time of each side (both start from the same state and
see the same rows; the order alternates every step), the paired median ratio, the load average,
and how far the metrics and the final states differ. Writes JSON (--out).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import importlib
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from salem_jax.compile_cache import add_flag, enable_compile_cache  # noqa: E402


def _cost(compiled) -> tuple[float, float]:
    c = compiled.cost_analysis()
    c = c[0] if isinstance(c, list) else c
    return round(float(c.get("flops", 0.0)) / 1e9, 2), round(float(c.get("bytes accessed", 0.0)) / 1e9, 3)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compare-with", required=True, help="another mend/train.py (the 'old' side)")
    ap.add_argument("--experiment", default="capitals_smollm2")
    ap.add_argument("--edit-set", default=None, help="a saved edit set (else built with the experiment's config)")
    ap.add_argument("--layers", default="layers.26", help="the edited layers, comma separated")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out", default="runs/bench-editor-step-ab.json")
    add_flag(ap)
    args = ap.parse_args(argv)
    enable_compile_cache(enabled=not args.no_compile_cache)

    from experiments.common import benchmark_edit_set
    from salem_jax import sharding
    from salem_jax.mend import train as NEW
    from salem_jax.mend.editor import EditorSpec
    from salem_jax.methods.mend import train_config
    from salem_jax.pipeline import load, read_records

    spec_ = importlib.util.spec_from_file_location("salem_old_train", args.compare_with)
    OLD = importlib.util.module_from_spec(spec_)
    sys.modules["salem_old_train"] = OLD
    spec_.loader.exec_module(OLD)

    cfg = importlib.import_module(f"experiments.{args.experiment}").get_config(False)
    cfg.progress = False
    records = read_records(cfg)
    model = load(cfg, records)
    es = benchmark_edit_set(model, records, cfg, args.edit_set, None)
    data = NEW.prepare_splits(model, {"train": es.rows("train")})["train"]
    tcfg = dataclasses.replace(train_config(cfg)).resolved(1)
    mesh = sharding.make_mesh(1, 1, jax.devices()[:1])
    base = NEW.place_base_params(model, model.params, mesh)
    spec = EditorSpec.from_params(model.layers.weights(args.layers.split(","), part=cfg.saliency.part), model.params, tcfg.editor)
    # the train split as train_editor prepares it for the main job
    used = NEW.train_rows_used(data, tcfg, tcfg.max_steps)
    plan, td = NEW.from_block_data(model, spec, data, base, True, uses=NEW.train_block_rows(tcfg, tcfg.max_steps), used=used)
    td = NEW.with_pass_logits(model.apply, base, td, plan)
    flat = NEW.flat_train_sizes(td, tcfg, tcfg.max_steps)
    sizes = NEW.flat_step_sizes(td, tcfg, tcfg.max_steps)
    kw = dict(apply_fn=model.apply, spec=spec, cfg=tcfg.step_config(), mesh=mesh, from_block=plan)
    state0 = jax.device_get(NEW.init_train_state(spec, tcfg))

    def fresh():
        return NEW.place_state(jax.tree.map(np.array, state0), mesh)

    def batch(i, new):
        b = NEW.train_batch(td, tcfg, i, tuple(int(x) for x in sizes[i]) if new else flat)
        return sharding.shard_batch(NEW.fit_length(b), mesh)

    sides = {"old": (OLD.train_step, False), "new": (NEW.train_step, True)}
    shape = lambda b: (int(b["edit"]["input_ids"].shape[-1]), int(b[NEW.FLAT]["rows"].shape[-1]))  # noqa: E731
    shapes = {n: [shape(batch(i, new)) for i in range(args.steps)] for n, (_, new) in sides.items()}
    lengths = [s[0] for s in shapes["new"]]
    common = collections.Counter(lengths).most_common(1)[0][0]
    i0 = lengths.index(common)
    rep = {"experiment": args.experiment, "layers": args.layers, "compare_with": args.compare_with, "steps": args.steps,
           "flat_run_wide": list(flat), "load_average_start": [round(x, 2) for x in os.getloadavg()],
           "programs_new_300_steps": {str(k): v for k, v in collections.Counter(
               (NEW.fit_length(NEW.train_batch(td, tcfg, i))["edit"]["input_ids"].shape[-1], int(sizes[i, 0]), int(sizes[i, 1]))
               for i in range(tcfg.max_steps)).items()}}
    rep["cost_at_length"] = common
    for n, (f, new) in sides.items():
        rep[f"cost_{n}"] = _cost(f.lower(fresh(), base, batch(i0, new), **kw).compile())
    print(f"cost at length {common} (GFLOP, GB accessed): old {rep['cost_old']}, new {rep['cost_new']}", flush=True)
    first = {}
    for n, (f, new) in sides.items():  # every program of the timed steps, compiled before timing
        for s in sorted(set(shapes[n])):
            i = shapes[n].index(s)
            t = time.perf_counter()
            jax.block_until_ready(f(fresh(), base, batch(i, new), **kw))
            first[f"{n} {s}"] = round(time.perf_counter() - t, 2)
    rep["first_calls_s"] = first
    print("first calls (s):", first, flush=True)
    states = {n: fresh() for n in sides}
    times = {n: [] for n in sides}
    metrics = {n: [] for n in sides}
    load0 = os.getloadavg()
    for i in range(args.steps):
        for n in (("old", "new") if i % 2 == 0 else ("new", "old")):
            f, new = sides[n]
            b = batch(i, new)
            t = time.perf_counter()
            states[n], m = f(states[n], base, b, **kw)
            jax.block_until_ready(m)
            times[n].append(time.perf_counter() - t)
            metrics[n].append(jax.device_get(m))
    load1 = os.getloadavg()
    rep["times_s"] = times
    rep["median_s"] = {n: round(float(np.median(times[n])), 4) for n in sides}
    rep["paired_median_ratio"] = round(float(np.median(np.array(times["old"]) / np.array(times["new"]))), 3)
    rep["load_average_timed"] = [[round(x, 2) for x in load0], [round(x, 2) for x in load1]]
    print(f"step median: old {rep['median_s']['old']} s, new {rep['median_s']['new']} s; paired median ratio old/new "
          f"{rep['paired_median_ratio']}; load {rep['load_average_timed']}")
    rep["metric_max_abs_diff"] = {}
    for k in metrics["old"][0]:
        a = np.array([float(np.mean(m[k])) for m in metrics["old"]])
        b = np.array([float(np.mean(m[k])) for m in metrics["new"]])
        rep["metric_max_abs_diff"][k] = [float(np.max(np.abs(a - b))), float(np.max(np.abs(a)))]
    print("metrics, max |old - new| (max |old|):", {k: f"{v[0]:.2e} ({v[1]:.3g})" for k, v in rep["metric_max_abs_diff"].items()})
    old_leaves = jax.tree_util.tree_leaves_with_path(jax.device_get(states["old"]))
    new_leaves = jax.tree.leaves(jax.device_get(states["new"]))
    rel = sorted(((float(np.max(np.abs(np.asarray(a, np.float64) - b))) / max(float(np.max(np.abs(a))), 1e-30),
                   jax.tree_util.keystr(p), int(np.size(a))) for (p, a), b in zip(old_leaves, new_leaves) if np.size(a)), reverse=True)
    rep["state_bitwise_equal"] = all(np.array_equal(a, b) for (_, a), b in zip(old_leaves, new_leaves))
    rep["state_worst_leaves"] = rel[:4]
    rep["state_worst_array_leaf"] = next((r for r in rel if r[2] > 1), None)
    print(f"state after {args.steps} steps: bitwise equal {rep['state_bitwise_equal']}; worst leaves (max |diff| / max |old|, "
          f"path, size): {rel[:3]}; worst array leaf {rep['state_worst_array_leaf']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rep, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
