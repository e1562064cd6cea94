"""The editor's training step with the LM head on the target tokens only (`train_batch(...,
flat=...)`, the default of `train_editor`) against the head at K positions of every row, on an
experiment's real edit set and editor config (capitals: 1 fail + 2 rephrasings + 4 pass rows per
group); then with the pass rows' base logits kept (`with_pass_logits`: no base pass in the step),
and with the fail rows' capture factors kept too (`with_fail_factors`: no capture pass either);
and the main job's path (pass logits kept) with each batch cut after its longest row
(`fit_length`: a 16-position step where the edit set pads to 32).
`train_editor` keeps the pass logits whenever they fit, the factors when the run captures each
fail row at least twice on average.

    python benchmarks/train_step_head.py --edit-set runs/capitals_smollm2/edit_set --layers layers.26 layers.0
    python benchmarks/train_step_head.py --quick       # the experiment's tiny config (smoke run)

For each layer set and each path: XLA's cost analysis of the jitted step (GFLOP, GB accessed: load
independent), the first call (trace + compile) and the median of `--steps` timed steps after it.
The two paths' steps alternate (step i of one, then step i of the other, each waited for), so
both see the same load; only the ratio compares across machines. Both start from the same state
and see the same batches, and their losses are printed side by side. Writes JSON (--out).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from salem_jax.compile_cache import add_flag, enable_compile_cache  # noqa: E402


def _cost(lowered) -> dict:
    ca = lowered.cost_analysis()
    ca = ca[0] if isinstance(ca, list) else ca
    return {"gflop": float(ca.get("flops", 0.0)) / 1e9, "gbytes": float(ca.get("bytes accessed", 0.0)) / 1e9}


def bench(model, data, tcfg, layers: list[str], steps: int) -> dict:
    from salem_jax import sharding
    from salem_jax.mend.editor import EditorSpec
    from salem_jax.mend.train import (fit_length, flat_train_sizes, from_block_data, init_train_state, place_base_params,
                                      place_state, train_batch, train_step, with_fail_factors, with_pass_logits)

    mesh = sharding.make_mesh(1, 1, jax.devices()[:1])
    base = place_base_params(model, model.params, mesh)
    spec = EditorSpec.from_params(model.layers.weights(layers), model.params, tcfg.editor)
    plan, d = from_block_data(model, spec, data, base)
    t0 = time.perf_counter()
    flat = flat_train_sizes(d, tcfg, tcfg.max_steps)
    sizes_s = time.perf_counter() - t0
    kw = dict(apply_fn=model.apply, spec=spec, cfg=tcfg.step_config(), mesh=mesh, from_block=plan)
    state0 = jax.device_get(init_train_state(spec, tcfg))
    t0 = time.perf_counter()
    kept = with_fail_factors(spec, model.apply, base, d, plan)
    factors_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    kept_all = with_pass_logits(model.apply, base, kept, plan)
    logits_s = time.perf_counter() - t0
    kept_logits = with_pass_logits(model.apply, base, d, plan)
    # (data, flat sizes, cut each batch after its longest row)
    paths = {"K positions": (d, None, False), "target tokens": (d, flat, False), "+ kept pass logits": (kept_logits, flat, False),
             "+ kept pass logits and factors": (kept_all, flat, False),
             "+ kept pass logits, cut to the longest row": (kept_logits, flat, True)}
    out = {"layers": layers, "from_block": None if plan is None else plan.start, "flat_sizes": list(flat),
           "flat_sizes_s": round(sizes_s, 3), "kept_factors_s": round(factors_s, 2),
           "kept_pass_logits_s": round(logits_s, 2), "paths": {}}
    def make(dd, f, cut, i):
        b = train_batch(dd, tcfg, i, f)
        return sharding.shard_batch(fit_length(b) if cut else b, mesh)

    states, times, losses = {}, {n: [] for n in paths}, {n: [] for n in paths}
    lengths: dict[str, list[int]] = {n: [] for n in paths}
    for name, (dd, f, cut) in paths.items():
        batch = make(dd, f, cut, 0)
        st = place_state(jax.tree.map(np.array, state0), mesh)
        cost = _cost(train_step.lower(st, base, batch, **kw))
        t = time.perf_counter()
        st, m = train_step(st, base, batch, **kw)
        jax.block_until_ready(m)
        out["paths"][name] = {**cost, "first_call_s": round(time.perf_counter() - t, 2)}
        states[name] = st
        losses[name].append(float(m["loss"]))
    # the cut path meets other lengths in later steps: compile them before timing (each length
    # is one program; a run compiles each once)
    seen = {int(make(*paths[n], 0)["edit"]["input_ids"].shape[-1]) for n in paths if paths[n][2]}
    for i in range(1, steps + 1):
        for name, (dd, f, cut) in paths.items():
            if cut:
                n = int(make(dd, f, cut, i)["edit"]["input_ids"].shape[-1])
                if n not in seen:
                    seen.add(n)
                    jax.block_until_ready(train_step(place_state(jax.tree.map(np.array, state0), mesh), base, make(dd, f, cut, i), **kw))
    for i in range(1, steps + 1):
        for name, (dd, f, cut) in paths.items():
            batch = make(dd, f, cut, i)
            lengths[name].append(int(batch["edit"]["input_ids"].shape[-1]))
            t = time.perf_counter()
            states[name], m = train_step(states[name], base, batch, **kw)
            jax.block_until_ready(m)
            times[name].append(time.perf_counter() - t)
            losses[name].append(float(m["loss"]))
    for name in paths:
        out["paths"][name].update(step_s=round(float(np.median(times[name])), 4), mean_step_s=round(float(np.mean(times[name])), 4),
                                  losses=[round(x, 6) for x in losses[name]],
                                  lengths={str(n): lengths[name].count(n) for n in sorted(set(lengths[name]))})
    k = out["paths"]["K positions"]
    for name in list(paths)[1:]:
        p = out["paths"][name]
        p["ratio_time"] = round(k["step_s"] / p["step_s"], 3)
        p["ratio_mean_time"] = round(k["mean_step_s"] / p["mean_step_s"], 3)
        p["ratio_gflop"] = round(k["gflop"] / max(p["gflop"], 1e-9), 3)
        p["max_loss_diff"] = float(np.max(np.abs(np.array(losses["K positions"]) - np.array(losses[name]))))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experiment", default="capitals_smollm2")
    ap.add_argument("--edit-set", default=None, help="a saved edit set to reuse (else built with the experiment's config)")
    ap.add_argument("--save-edit-set", default=None, help="save the edit set built here to this folder")
    ap.add_argument("--layers", nargs="+", default=["layers.26", "layers.0"], help="layer sets, each comma separated")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per path (after the first call)")
    ap.add_argument("--quick", action="store_true", help="the experiment's tiny config: a smoke run")
    ap.add_argument("--out", default="runs/bench-train-step-head.json")
    add_flag(ap)
    args = ap.parse_args(argv)
    enable_compile_cache(enabled=not args.no_compile_cache)

    from experiments.common import benchmark_edit_set
    from salem_jax.mend.train import prepare_splits
    from salem_jax.methods.mend import train_config
    from salem_jax.pipeline import load, read_records

    cfg = importlib.import_module(f"experiments.{args.experiment}").get_config(args.quick)
    cfg.progress = False
    records = read_records(cfg)
    model = load(cfg, records)
    es = benchmark_edit_set(model, records, cfg, args.edit_set, args.save_edit_set)
    data = prepare_splits(model, {"train": es.rows("train")})["train"]
    tcfg = dataclasses.replace(train_config(cfg)).resolved(1)
    n_layers = len(model.layers.names())
    rep = {"model": model.name, "experiment": args.experiment, "devices": str(jax.devices()),
           "load_average_start": [round(x, 2) for x in os.getloadavg()], "train_rows": data.n_fail,
           "editor": {"pass_per_group": tcfg.pass_per_group, "adapt_per_edit": tcfg.adapt_per_edit,
                      "batch_size": tcfg.batch_size, "max_steps": tcfg.max_steps}, "results": []}
    print(f"{model.name}, {args.experiment}: {data.n_fail} train edits; editor groups of {tcfg.edits_per_group} fail + "
          f"{tcfg.adapt_per_edit} rephrasings x fail + {tcfg.pass_per_group} pass rows, {tcfg.batch_size} per step")
    print("| layers | path | GFLOP (step 0) | GB accessed | first call s | step s (median / mean) | padded lengths | vs K positions |")
    print("|---|---|---|---|---|---|---|---|")
    for s in args.layers:
        layers = [x if not args.quick else f"layers.{min(int(x.split('.')[-1]), n_layers - 1)}" for x in s.split(",")]
        r = bench(model, data, tcfg, list(dict.fromkeys(layers)), args.steps)
        rep["results"].append(r)
        for name, p in r["paths"].items():
            extra = "" if "ratio_time" not in p else (f" {p['ratio_gflop']:.2f}x fewer GFLOP, {p['ratio_time']:.2f}x faster "
                                                      f"(mean {p['ratio_mean_time']:.2f}x); max loss diff {p['max_loss_diff']:.1e}")
            lens = ", ".join(f"{n}: {c}" for n, c in p["lengths"].items())
            print(f"| {s} | {name} | {p['gflop']:.2f} | {p['gbytes']:.2f} | {p['first_call_s']:.1f} | {p['step_s']:.3f} / "
                  f"{p['mean_step_s']:.3f} | {lens} |{extra}")
        print(f"(flat sizes {r['flat_sizes']}, bound computed in {r['flat_sizes_s']:.2f} s; factors kept in "
              f"{r['kept_factors_s']:.1f} s, pass logits in {r['kept_pass_logits_s']:.1f} s, each incl. its compilation)", flush=True)
    rep["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    print(f"load average: start {rep['load_average_start']}, end {rep['load_average_end']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rep, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
