"""Benchmark: the cost and the quality of choosing the layer to edit, on a real model and real data.

    python benchmarks/layer_selection.py --data countries --out runs/bench-capitals.json
    python benchmarks/layer_selection.py --data zsre --mode counterfactual --out runs/bench-zsre.json
    python benchmarks/layer_selection.py --quick --out runs/bench-quick.json

On SmolLM2-135M (default) and the same N edits of one data set (country capitals the model gets
wrong, or zsRE / CounterFact), measures for each method - SaLEM saliency (one streaming gradient
pass that yields every saliency scorer), Layer Gradient Analysis, causal tracing (ROME) and the
brute-force fine-tuning sweep - its wall time (compilation included) and its peak memory (RSS
sampled every 20 ms in a fresh subprocess per method, minus the RSS after the model and data are
loaded), and then where each scorer's chosen layer sits in the sweep's drawdown-aware ordering,
with Spearman correlations and bootstrap intervals (salem_jax.locate.rank).

Causal tracing costs minutes per fact on a CPU, so it runs on --trace-facts facts and its time
for all N facts is extrapolated linearly (marked "extrapolated" in the output). The sweep runs
on every --layer-stride'th layer with the given learning rates; scorers are compared on those
layers only. Prints a table and writes JSON to --out (plus per-method files beside it).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import threading
import time
from pathlib import Path

from salem_jax.compile_cache import add_flag, enable_compile_cache
from salem_jax.data.spec import DataSpec, read_records

METHODS = ("saliency_fail", "saliency", "lga", "causal_trace", "sweep")
SCORERS = ("salem", "grad_x_weight", "mean_sq", "abs_mean_grad", "contrast")


# ----------------------------------------------------------------------------- memory


def _rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakRSS:
    """Samples this process's RSS every `interval` seconds in a thread; `.peak` since `reset()`."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.peak, self._stop = interval, _rss_bytes(), threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, _rss_bytes())

    def reset(self) -> int:
        self.peak = _rss_bytes()
        return self.peak

    def stop(self) -> int:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss_bytes())
        return self.peak


# ----------------------------------------------------------------------------- data


def build_rows(model, args) -> tuple[list[dict], dict]:
    """Score the data set with the model (cached beside --out) and pick N edits."""
    from salem_jax.edit_set_builder import build_edit_set
    from salem_jax.data.edit_set import load_edit_set, save_edit_set

    es_dir = Path(str(args.out) + f".edit_set-{args.data}-{args.mode}-{args.records}")
    if (es_dir / "info.json").is_file():
        es = load_edit_set(es_dir)
    else:
        records = read_records(data_spec(args))[1]
        es = build_edit_set(model, records, mode=args.mode, seed=args.seed, progress=True, skip_invalid=True)
        es.info["format"] = args.data
        save_edit_set(es, es_dir, overwrite=True)
    rows = es.rows("train") + es.rows("val")
    by_rec: dict[str, list[dict]] = {}
    for r in rows:
        by_rec.setdefault(r["record_id"], []).append(r)
    fail_recs = [rid for rid, rs in by_rec.items() if any(r["group"] == "fail" for r in rs)]
    if len(fail_recs) < args.edits:
        print(f"only {len(fail_recs)} records with a fail row; using them all", file=sys.stderr)
    chosen = fail_recs[: args.edits]
    sel = [r for rid in chosen for r in by_rec[rid] if r["group"] in ("fail", "adapt")]
    sel = [r for r in sel if r["group"] == "fail"] + [r for r in sel if r["group"] == "adapt"][: args.max_adapt]
    passes = [r for r in rows if r["group"] == "pass" and r["record_id"] not in set(chosen)]
    passes = sorted(passes, key=lambda r: not r["base_correct"])[: args.keep]
    return sel + passes, es.info


def data_spec(args) -> DataSpec:
    """--data: countries (capitals, every record), zsre or counterfact (the first --records)."""
    countries = args.data == "countries"
    return DataSpec(data=args.data, format="countries" if countries else args.data, relation="capital",
                    limit=None if countries else args.records, seed=args.seed, skip_invalid=True)


def subjects_for(rows: list[dict], args) -> dict[str, str]:
    recs = read_records(data_spec(args))[1]
    want = {r["record_id"] for r in rows}
    return {r.id: r.subject for r in recs if r.id in want}


# ----------------------------------------------------------------------------- workers


def _batch(model, rows, group, length):
    from salem_jax.data.tokenize import encode

    sel = [r for r in rows if r["group"] == group]
    if not sel:
        return None
    return encode(model, [r["prompt"] for r in sel], [r["target"] for r in sel], length=length, where=group)


def worker(method: str, spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    mon = PeakRSS()
    import jax
    import numpy as np

    from salem_jax.data.tokenize import encode, pad_rows
    from salem_jax.models import load_model

    model = load_model(spec["model"])
    rows = spec["rows"]

    def length(groups_used):  # one fixed length per method: the longest row of the groups it reads
        return max(spec["lengths"][g] for g in groups_used if g in spec["lengths"])

    groups = [r["group"] for r in rows]
    result: dict = {"method": method}
    baseline = mon.reset()
    t0 = time.perf_counter()
    if method in ("saliency_fail", "saliency", "lga"):
        from salem_jax import saliency as S

        use = [r for r in rows if r["group"] == "fail"] if method == "saliency_fail" else [
            r for r in rows if r["group"] in spec["saliency_groups"]
        ]
        mb = spec["micro_batch"]
        L = length({r["group"] for r in use})
        data = []
        for s in range(0, len(use), mb):
            chunk = use[s : s + mb]
            b = encode(model, [r["prompt"] for r in chunk], [r["target"] for r in chunk], length=L)
            data.append((pad_rows(b, mb), [r["group"] for r in chunk]))
        if method == "lga":
            st = S.lga_scores(model, model.params, data, micro_batch=mb, progress=True)
        else:
            st = S.saliency_stats(model, model.params, data, micro_batch=mb, progress=True, track_mean=method == "saliency")
        result.update(examples=st.counts(), traces=st.traces, sequences_fwd_bwd=len(use))
    elif method == "causal_trace":
        from salem_jax.locate import causal_trace as C

        subj = spec["subjects"]
        facts = [r for r in rows if r["group"] == "fail" and subj.get(r["record_id"], "").lower() in r["prompt"].lower()]
        facts = [r for r in facts if subj.get(r["record_id"])][: spec["trace_facts"]]
        prompts = [r["prompt"] for r in facts]
        L = length(["fail"])
        b = encode(model, prompts, [r["target"] for r in facts], length=L)
        sm = C.subject_token_mask(model, prompts, [subj[r["record_id"]] for r in facts], L)
        prof, res = C.trace_profile(model, model.params, b, sm, n_noise=spec["n_noise"],
                                    restorations_per_call=spec["restorations_per_call"], progress=True)
        st = {"profile": prof, "traces": res}
        result.update(examples={"fail": len(facts)}, forward_passes=prof.extra["forward_passes"],
                      sequences=prof.extra["sequences"], restorations=prof.extra["restorations"])
    elif method == "sweep":
        from salem_jax.locate.sweep import SweepConfig, sweep_layers

        cfg = SweepConfig(learning_rates=tuple(spec["lrs"]), steps=spec["steps"], drawdown_budget=spec["budget"])
        names = [b.name for b in model.layers.blocks][:: spec["layer_stride"]]
        batches = {g: _batch(model, rows, g, spec["lengths"].get(g)) for g in ("fail", "adapt", "pass")}
        st = sweep_layers(model, model.params, batches["fail"], rephrases=batches["adapt"], keep=batches["pass"],
                          layers=names, config=cfg, progress=True)
        n_fail = sum(g == "fail" for g in groups)
        result.update(examples={g: sum(x == g for x in groups) for g in ("fail", "adapt", "pass")},
                      train_steps=st.train_steps, compiles=st.compiles,
                      sequences_fwd_bwd=st.train_steps * n_fail)
    else:
        raise ValueError(method)
    jax.effects_barrier()
    result["wall_time"] = time.perf_counter() - t0
    peak = mon.stop()
    result.update(rss_baseline=baseline, rss_peak=peak, rss_increase=peak - baseline)
    out = Path(spec["dir"]) / f"{method}.pkl"
    with open(out, "wb") as f:
        pickle.dump({"result": result, "stats": st}, f)


# ----------------------------------------------------------------------------- parent


def run_method(method: str, spec_path: Path, log) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", method, "--spec", str(spec_path)]
    t = time.perf_counter()
    p = subprocess.run(cmd, stdout=log, stderr=log)
    if p.returncode != 0:
        raise RuntimeError(f"worker {method} failed (exit {p.returncode}); see {log.name}")
    with open(spec_path.parent / f"{method}.pkl", "rb") as f:
        d = pickle.load(f)
    d["result"]["process_time"] = time.perf_counter() - t
    return d


def analyse(outs: dict, spec: dict) -> dict:
    import numpy as np

    from salem_jax.locate import rank as R

    rep: dict = {"methods": {}, "choices": {}, "comparisons": {}}
    n_edits = sum(r["group"] == "fail" for r in spec["rows"])
    for m, d in outs.items():
        rep["methods"][m] = dict(d["result"])
    if "causal_trace" in outs:
        r = rep["methods"]["causal_trace"]
        nf = r["examples"]["fail"]
        r["wall_time_per_fact"] = r["wall_time"] / nf
        r["wall_time_all_edits_extrapolated"] = r["wall_time_per_fact"] * n_edits
    if "sweep" in outs:
        r, st = rep["methods"]["sweep"], outs["sweep"]["stats"]
        runs = len(st.layers) * len(st.config.learning_rates)
        r["layers_swept"], r["learning_rates"] = list(st.layers), list(st.config.learning_rates)
        r["wall_time_per_layer_and_lr"] = r["wall_time"] / runs
        r["wall_time_all_layers_2_lrs_extrapolated"] = r["wall_time_per_layer_and_lr"] * spec["n_layers"] * 2
    sweep = outs.get("sweep", {}).get("stats")
    scores: dict[str, tuple] = {}
    if "saliency" in outs:
        st = outs["saliency"]["stats"]
        for s in SCORERS:
            scores[s] = (st.layers, st.layer_scores(s, "fail"), R.stats_resampler(st, s, "fail"), st.counts())
    if "saliency_fail" in outs and "saliency" not in outs:
        st = outs["saliency_fail"]["stats"]
        scores["salem"] = (st.layers, st.layer_scores("salem", "fail"), R.stats_resampler(st, "salem", "fail"), st.counts())
    if "lga" in outs:
        st = outs["lga"]["stats"]
        scores["lga"] = (st.layers, st.layer_scores("fail"), R.lga_resampler(st, "fail"), st.counts())
    if "causal_trace" in outs:
        prof = outs["causal_trace"]["stats"]["profile"]
        scores["causal_trace"] = (prof.layers, np.asarray(prof.scores["fail"]), None, {})
    for name, (layers, sc, _, _) in scores.items():
        rep["choices"][name] = {"chosen": layers[int(np.argmax(sc))], "scores": [float(x) for x in sc]}
    if sweep is not None:
        rep["sweep"] = {"ranking": list(sweep.ranking()), "best_per_layer": sweep.table(),
                        "all_runs": [o.summary(sweep.pass_acc_before) for o in sweep.outcomes],
                        "pass_acc_before": sweep.pass_acc_before}
        for name, (layers, sc, resample, counts) in scores.items():
            c = R.compare_to_sweep(name, sc, layers, sweep, resample=resample, n_scorer_fail=counts.get("fail"),
                                   n_scorer_pass=counts.get("pass"), n_boot=spec["n_boot"], seed=0)
            rep["comparisons"][name] = c.to_dict()
    t = {m: rep["methods"][m]["wall_time"] for m in rep["methods"]}
    base = t.get("saliency_fail") or t.get("saliency")
    if base:
        rat = {}
        if "causal_trace" in t:
            rat["causal_trace_all_edits_extrapolated / saliency_fail"] = (
                rep["methods"]["causal_trace"]["wall_time_all_edits_extrapolated"] / base)
        for m in ("sweep", "lga", "saliency"):
            if m in t:
                rat[f"{m} / saliency_fail"] = t[m] / base
        if "sweep" in t:
            rat["sweep_all_layers_2_lrs_extrapolated / saliency_fail"] = (
                rep["methods"]["sweep"]["wall_time_all_layers_2_lrs_extrapolated"] / base)
        rep["time_ratios"] = rat
    return rep


def print_table(rep: dict, spec: dict) -> None:
    gb = 1024**3
    print(f"\nmodel {spec['model']}  data {spec['data']} ({spec['mode']})  edits {spec['n_edits']}  "
          f"rows {spec['counts']}  sequence lengths {spec.get('lengths', spec.get('length'))}")
    print(f"{'method':14s} {'examples':>28s} {'wall s':>9s} {'peak RSS GB':>11s} {'+RSS GB':>8s}")
    for m, r in rep["methods"].items():
        ex = ",".join(f"{k}={v}" for k, v in r.get("examples", {}).items())
        print(f"{m:14s} {ex:>28s} {r['wall_time']:9.1f} {r['rss_peak'] / gb:11.2f} {r['rss_increase'] / gb:8.2f}")
        if m == "causal_trace":
            print(f"{'':14s} {'per fact':>28s} {r['wall_time_per_fact']:9.1f}   "
                  f"({r['forward_passes']} forward calls, {r['sequences']} sequences)")
            print(f"{'':14s} {'all edits, extrapolated':>28s} {r['wall_time_all_edits_extrapolated']:9.1f}")
        if m == "sweep":
            print(f"{'':14s} {'per (layer, lr)':>28s} {r['wall_time_per_layer_and_lr']:9.1f}")
            print(f"{'':14s} {'all layers x 2 lrs, extrap.':>28s} {r['wall_time_all_layers_2_lrs_extrapolated']:9.1f}")
    for k, v in rep.get("time_ratios", {}).items():
        print(f"ratio {k}: {v:.1f}x")
    if "sweep" in rep:
        print(f"\nsweep ranking (best first): {' '.join(rep['sweep']['ranking'])}")
        print(f"{'layer':10s} {'lr':>8s} {'EA':>6s} {'RA':>6s} {'locality':>9s} {'pass drop':>9s}")
        for s in rep["sweep"]["best_per_layer"]:
            ra = "-" if s["rephrase_acc"] is None else f"{s['rephrase_acc']:.2f}"
            print(f"{s['layer']:10s} {s['lr']:8.0e} {s['edit_acc']:6.2f} {ra:>6s} {s['locality']:9.3f} "
                  f"{s.get('pass_acc_drop', float('nan')):9.3f}")
        print(f"\n{'scorer':14s} {'chosen':>10s} {'sweep pos':>9s} {'spearman':>9s} {'95% CI':>17s}")
        for name, c in rep["comparisons"].items():
            print(f"{name:14s} {c['top_choice']:>10s} {c['top_choice_position']:9d} {c['spearman']:9.2f} "
                  f"[{c['ci_low']:6.2f}, {c['ci_high']:6.2f}]")


def main(argv=None) -> int:
    # --- flags
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", choices=("countries", "zsre", "counterfact"), default="countries")
    p.add_argument("--mode", choices=("correction", "counterfactual"), default=None,
                   help="default: correction for countries, counterfactual for zsre/counterfact")
    p.add_argument("--records", type=int, default=300, help="zsre/counterfact: records read from the file")
    p.add_argument("--edits", type=int, default=64)
    p.add_argument("--keep", type=int, default=None, help="pass rows (default: as many as edits)")
    p.add_argument("--max-adapt", type=int, default=None, help="adapt rows at most (default: 2 per edit)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--saliency-groups", default="fail,adapt,pass",
                   help="rows the full saliency and LGA passes use (the sweep always uses all three)")
    p.add_argument("--trace-facts", type=int, default=4)
    p.add_argument("--n-noise", type=int, default=10)
    p.add_argument("--restorations-per-call", type=int, default=8)
    p.add_argument("--lrs", default="3e-4,1e-3")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--budget", type=float, default=0.1)
    p.add_argument("--layer-stride", type=int, default=1)
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="16 edits, every 3rd layer, one lr, 1 traced fact")
    p.add_argument("--out", default="runs/layer_selection.json")
    p.add_argument("--analyse-only", action="store_true", help="re-analyse the per-method results of an earlier --out")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    add_flag(p)
    args = p.parse_args(argv)
    enable_compile_cache(enabled=not args.no_compile_cache)
    # --- a worker process runs one method; --quick and defaults
    if args.worker:
        worker(args.worker, args.spec)
        return 0
    if args.quick:
        args.edits, args.layer_stride, args.lrs, args.trace_facts = 16, 3, "1e-3", 1
    args.mode = args.mode or ("correction" if args.data == "countries" else "counterfactual")
    args.keep = args.edits if args.keep is None else args.keep
    args.max_adapt = 2 * args.edits if args.max_adapt is None else args.max_adapt
    out = Path(args.out)
    work = out.with_suffix("")
    work.mkdir(parents=True, exist_ok=True)
    # --- re-analyse an earlier run
    if args.analyse_only:
        spec = json.loads((work / "spec.json").read_text())
        outs = {}
        for m in METHODS:
            if (work / f"{m}.pkl").is_file():
                with open(work / f"{m}.pkl", "rb") as f:
                    outs[m] = pickle.load(f)
        return _finish(outs, spec, out, 0.0)

    # --- the rows (built once, in this process), then one worker process per method
    t0 = time.perf_counter()
    from salem_jax.data.tokenize import token_ids, target_text
    from salem_jax.models import load_model

    model = load_model(args.model)
    rows, info = build_rows(model, args)
    lens: dict[str, int] = {}
    for r in rows:
        n = len(token_ids(model.tokenizer, r["prompt"], True)) + len(token_ids(model.tokenizer, target_text(r["target"], model.kind), False))
        lens[r["group"]] = max(lens.get(r["group"], 0), n)
    spec = dict(
        model=args.model, data=args.data, mode=args.mode, rows=rows, lengths=lens, dir=str(work),
        micro_batch=args.micro_batch, saliency_groups=args.saliency_groups.split(","), trace_facts=args.trace_facts, n_noise=args.n_noise,
        restorations_per_call=args.restorations_per_call, lrs=[float(x) for x in args.lrs.split(",")],
        steps=args.steps, budget=args.budget, layer_stride=args.layer_stride, n_boot=args.n_boot,
        subjects=subjects_for(rows, args), n_layers=len(model.layers), n_edits=sum(r["group"] == "fail" for r in rows),
        counts={g: sum(r["group"] == g for r in rows) for g in ("fail", "adapt", "pass")},
        edit_set_info={k: info.get(k) for k in ("mode", "format", "counts", "records")},
    )
    del model
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(spec))
    print(f"{spec['counts']} rows, lengths {spec['lengths']}; workers log to {work / 'log.txt'}", file=sys.stderr)
    outs = {}
    with open(work / "log.txt", "a") as log:
        for m in [m.strip() for m in args.methods.split(",") if m.strip()]:
            if m not in METHODS:
                raise SystemExit(f"unknown method {m!r}; choose from {METHODS}")
            print(f"running {m} ...", file=sys.stderr)
            outs[m] = run_method(m, spec_path, log)
            print(f"  {m}: {outs[m]['result']['wall_time']:.1f} s", file=sys.stderr)
    return _finish(outs, spec, out, time.perf_counter() - t0)


def _finish(outs: dict, spec: dict, out: Path, total: float) -> int:
    rep = analyse(outs, spec)
    rep["config"] = {k: v for k, v in spec.items() if k not in ("rows", "subjects")}
    rep["config"]["command"] = " ".join(sys.argv)
    rep["total_time"] = total
    out.write_text(json.dumps(rep, indent=2, default=float))
    print_table(rep, spec)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
