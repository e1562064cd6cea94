"""Benchmark: the golden-layer test with r-ROME on SmolLM2 (is one fixed layer as good as each edit's best?).

    python benchmarks/golden_layers.py --n 20 --layer-stride 3 --out runs/golden.json

For N CounterFact (`counterfact-preknown`) and N zsRE edits, r-ROME edits each one at every
candidate layer (every --layer-stride'th block) and scores it there:

  rewrite   token accuracy (teacher-forced argmax) of target_new after the prompt (EasyEdit's
            rewrite accuracy)
  rephrase  the same on the record's rephrases / paraphrase prompts
  locality  share of the locality prompts' answer tokens whose argmax did not change
  ES/PS/NS  CounterFact's (ROME's) success on prompt / paraphrases / neighbourhood (CF only)

Then the ways of choosing a layer, each as one layer for all edits of a data set (except the
oracle): the per-edit oracle (each edit's best layer, ordered by rewrite, rephrase, locality),
the best fixed layer by brute force over the evaluated edits themselves, and the layer each
scorer picks from a disjoint proxy set of --proxy edits of the same data set: salem (gradient
saliency of the fail rows), contrast (fail minus pass saliency), lga (the project's reading),
lga_ip (the third-party definition: gradient inner product, Tukey fences) and causal tracing
(on --trace-facts proxy facts). Each scorer's choice is restricted to the candidate layers.
Gaps are paired over edits with 95% bootstrap intervals. Costs are this run's wall times
(the machine is shared: the load average is recorded). Also: the France -> Rome edit at the
best fixed CounterFact layer and whether "The capital of Germany is" moves.

Prints a table; writes JSON to --out. On a finished (or stopped) run's JSON, `--markdown` prints
its tables, `--cf-layers` CounterFact's metrics per layer, and `--power` how many edits the
golden-layer claim would need at the gap measured (`salem_jax.locate.golden.claim_power`).
"""

from __future__ import annotations

import argparse
from collections import Counter
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import jax
import numpy as np

from salem_jax import saliency as S
from salem_jax.compile_cache import add_flag, enable_compile_cache
from salem_jax.baselines.keystats import KeyStats, wikitext_texts
from salem_jax.baselines.locate_edit import EditorConfig
from salem_jax.baselines.requests import EditRequest
from salem_jax.baselines.rome import ROMEConfig, rome_weight, value_path
from salem_jax.baselines.rrome import rrome_one
from salem_jax.data.paths import find_data_file
from salem_jax.data.readers import read_records
from salem_jax.data.tokenize import encode, pad_rows
from salem_jax.eval import metrics as M
from salem_jax.eval.counterfact import evaluate_counterfact, target_probs
from salem_jax.generate import greedy
from salem_jax.locate import causal_trace as C
from salem_jax.locate.golden import (EditScorer, best_fixed_layer, bootstrap_gap, claim_power,
                                     lga_inner_product_scores, per_edit_oracle, tukey_choice)
from salem_jax.models import load_model

METRICS = ("rewrite", "rephrase", "locality")
SCORERS = ("salem", "contrast", "lga", "lga_ip", "causal_trace")


def load_edits(name: str, n: int, proxy: int, proxy_at: int | None = None):
    """(n evaluated records, their EditRequests, `proxy` proxy records) of data set `name`.

    The usable records (subject in the prompt, a target, rephrases and locality prompts) are taken
    in file order; the proxy set is the `proxy` of them from position `proxy_at` on (default n,
    i.e. right after the evaluated ones) and the evaluated records are the first n of the others.
    So a run with --n N --proxy-at N0 has the proxy set and, as its first N0 edits, the records of
    a run with --n N0 (the file is read from its start, so a larger --n reads the same prefix):
    it extends that run (--resume) without overlapping its proxy set."""
    proxy_at = n if proxy_at is None else proxy_at
    if not 0 <= proxy_at <= n:
        raise SystemExit(f"--proxy-at {proxy_at}: must be between 0 and --n {n}")
    fname = "counterfact-preknown" if name == "counterfact" else "zsre"
    fmt = "counterfact" if name == "counterfact" else "zsre"
    recs = [r for r in read_records(find_data_file(fname), fmt, limit=20 * (n + proxy))
            if r.subject and r.subject in r.prompt and r.target_new.strip() and r.rephrases and r.loc_prompts]
    if len(recs) < n + proxy:
        raise SystemExit(f"{fname}: only {len(recs)} usable records for --n {n} + --proxy {proxy}")
    def req(r):
        return EditRequest(r.prompt, r.subject, r.target_new, relation=r.extra.get("relation_id"),
                           target_true=r.target_true, record_id=r.id)
    px = recs[proxy_at : proxy_at + proxy]
    ev = recs[:proxy_at] + recs[proxy_at + proxy : n + proxy]
    return ev, [req(r) for r in ev], px


def loc_rows(rec):
    return [{"prompt": p, "target": t if t else rec.target_true} for p, t in zip(rec.loc_prompts, rec.loc_targets)]


def token_acc(out) -> float:
    return float(out["token_correct"].sum() / max(out["n_tokens"].sum(), 1))


def scorer_layers(model, proxy, cand, args, log):
    """{scorer: (chosen candidate layer, per-candidate scores, wall seconds)} from the proxy edits,
    for the scorers named in --scorers only (none: {})."""
    want = set(args.scorers)
    out = {}
    if not want:
        return out
    names = model.layers.names()
    ci = [names.index(c) for c in cand]
    fail = [(r.prompt, r.target_new) for r in proxy]
    keep = [(p, t if t else r.target_true) for r in proxy for p, t in list(zip(r.loc_prompts, r.loc_targets))[:2]]
    rows = [(p, t, "fail") for p, t in fail] + [(p, t, "pass") for p, t in keep]
    L = max(encode(model, [p], [t])["input_ids"].shape[1] for p, t, _ in rows)
    mb = 4
    data = []
    for s in range(0, len(rows), mb):
        ch = rows[s : s + mb]
        b = encode(model, [p for p, _, _ in ch], [t for _, t, _ in ch], length=L)
        data.append((pad_rows(b, mb), [g for _, _, g in ch]))
    if want & {"salem", "contrast"}:
        t = time.perf_counter()
        st = S.saliency_stats(model, model.params, data, micro_batch=mb, track_mean=False)
        dt = time.perf_counter() - t
        for sc in sorted(want & {"salem", "contrast"}):
            v = st.layer_scores(sc, "fail")[ci]
            out[sc] = (cand[int(np.argmax(v))], v.tolist(), dt)
        log(f"saliency {dt:.0f}s")
    if "lga" in want:
        t = time.perf_counter()
        lg = S.lga_scores(model, model.params, data, micro_batch=mb)
        v = lg.layer_scores("fail")[ci]
        out["lga"] = (cand[int(np.argmax(v))], v.tolist(), time.perf_counter() - t)
        log(f"lga {out['lga'][2]:.0f}s")
    if "lga_ip" in want:
        t = time.perf_counter()
        v = lga_inner_product_scores(model, model.params, [r.prompt for r in proxy], [r.target_true for r in proxy],
                                     [r.target_new for r in proxy], layers=cand)
        j, dropped = tukey_choice(v, 1.0)
        out["lga_ip"] = (cand[j], v.tolist(), time.perf_counter() - t)
        out["lga_ip_dropped"] = [cand[i] for i in dropped]
        log(f"lga_ip {out['lga_ip'][2]:.0f}s")
    if "causal_trace" not in want:
        return out
    t = time.perf_counter()
    facts = proxy[: args.trace_facts]
    prompts = [r.prompt for r in facts]
    b = encode(model, prompts, [r.target_true for r in facts])
    sm = C.subject_token_mask(model, prompts, [r.subject for r in facts], b["input_ids"].shape[1])
    prof, _ = C.trace_profile(model, model.params, b, sm, n_noise=args.n_noise, layers=cand)
    v = np.asarray(prof.scores["fail"])  # traced on the candidate layers only
    jax.effects_barrier()
    out["causal_trace"] = (cand[int(np.argmax(v))], v.tolist(), time.perf_counter() - t)
    log(f"causal trace {out['causal_trace'][2]:.0f}s on {len(facts)} facts")
    return out


def main(argv=None) -> int:
    # --- flags
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--datasets", default="counterfact,zsre")
    ap.add_argument("--n", type=int, default=20, help="edits per data set")
    ap.add_argument("--proxy", type=int, default=10, help="proxy edits per data set for the scorers")
    ap.add_argument("--proxy-at", type=int, default=None,
                    help="position of the proxy edits among the usable records (default --n: after the evaluated "
                         "ones); to extend a finished --n N0 run to a larger --n with --resume, give --proxy-at N0")
    ap.add_argument("--layer-stride", type=int, default=3)
    ap.add_argument("--layer-offset", type=int, default=0)
    ap.add_argument("--layers", default="", help="candidate layers, comma separated (instead of stride / offset)")
    ap.add_argument("--cov-tokens", type=int, default=20000)
    ap.add_argument("--prefixes", default="5x5,5x10", help="r-ROME prefixes: count x tokens, comma separated")
    ap.add_argument("--v-steps", type=int, default=20)
    ap.add_argument("--whole-rows", action="store_true",
                    help="v*'s steps on the whole padded rows (the path before session 17) instead of the live "
                         "windows over a KV cache (ROMEConfig.window); same numbers, slower")
    ap.add_argument("--trace-facts", type=int, default=3)
    ap.add_argument("--n-noise", type=int, default=5)
    ap.add_argument("--boot", type=int, default=2000)
    ap.add_argument("--scorers", default=",".join(SCORERS),
                    help=f"scorers to run on the proxy set, comma separated ({', '.join(SCORERS)}); 'none' runs "
                         "none (only the oracle and the brute-force fixed layer are reported)")
    ap.add_argument("--no-spill", dest="spill", action="store_false", help="skip the France -> Rome check")
    ap.add_argument("--spill-only", metavar="LAYER", help="only the France -> Rome check at LAYER (e.g. the best "
                    "fixed layer of a stopped run), written to --out")
    ap.add_argument("--out", default="runs/golden.json")
    ap.add_argument("--resume", action="store_true",
                    help="go on from the edits already in --out (a stopped or killed run: the JSON is rewritten after "
                         "every edit) instead of redoing them; refused when the file's settings or records differ")
    ap.add_argument("--stop-after-minutes", type=float, default=0.0,
                    help="stop (JSON written, resumable) after the edit during which this process passed M minutes")
    ap.add_argument("--stop-after-edits", type=int, default=0,
                    help="stop (JSON written, resumable) after this many edits made by this process")
    ap.add_argument("--markdown", metavar="JSON", help="print the tables of an earlier run's JSON as markdown, run nothing")
    ap.add_argument("--cf-layers", metavar="JSON[,JSON]",
                    help="print CounterFact's ES / PS / NS and rewrite / rephrase / locality per candidate layer of "
                         "a run's JSON with 95%% bootstrap intervals over edits; with two runs also the paired "
                         "difference (first minus second) on the edits both hold; run nothing")
    ap.add_argument("--power", metavar="JSON",
                    help="print, per data set of a run's JSON, how often N edits would put the best scorer's "
                         "rewrite gap to the oracle below --bound by the 95%% interval (resampling the run's "
                         "per-edit gaps; `salem_jax.locate.golden.claim_power`); run nothing")
    ap.add_argument("--power-n", default="50,100,200,400,800", help="the N for --power, comma separated")
    ap.add_argument("--bound", type=float, default=0.05, help="the golden-layer claim's bound for --power")
    add_flag(ap)
    args = ap.parse_args(argv)
    args.scorers = [] if args.scorers in ("", "none") else args.scorers.split(",")
    unknown = [s for s in args.scorers if s not in SCORERS]
    if unknown:
        raise SystemExit(f"--scorers: unknown {unknown}; choose from {', '.join(SCORERS)} or 'none'")
    if args.markdown:
        print_markdown(json.loads(Path(args.markdown).read_text()))
        return 0
    if args.cf_layers:
        print_cf_layers([json.loads(Path(f).read_text()) for f in args.cf_layers.split(",")], args.boot)
        return 0
    if args.power:
        print_power(json.loads(Path(args.power).read_text()), [int(n) for n in args.power_n.split(",")], args.bound)
        return 0
    enable_compile_cache(enabled=not args.no_compile_cache)



    # --- the model, candidate layers and key statistics (shared by every data set)
    t_start = time.perf_counter()
    load0 = os.getloadavg()

    def log(msg):
        print(f"[{time.perf_counter() - t_start:7.0f}s] {msg}", file=sys.stderr, flush=True)

    model = load_model(args.model)
    base = model.params
    names = model.layers.names()
    cand = names[args.layer_offset :: args.layer_stride]
    if args.spill_only:
        args.layers = args.spill_only
    if args.layers:
        cand = args.layers.split(",")
        bad = [c for c in cand if c not in names]
        if bad:
            raise SystemExit(f"--layers: {bad} are not layers of {args.model} ({names[0]} .. {names[-1]})")
    resumed = load_resume(Path(args.out), args, cand) if args.resume and not args.spill_only else None
    lengths = []
    for part in args.prefixes.split(","):
        if part:
            c, n = part.split("x")
            lengths += [int(n)] * int(c)
    stats = KeyStats(model, base, wikitext_texts(2000), max_tokens=args.cov_tokens, prefix_lengths=lengths,
                     progress=False)
    cfg = EditorConfig(value=ROMEConfig(v_steps=args.v_steps, window=not args.whole_rows))
    prefixes = stats.prefixes()
    t = time.perf_counter()
    solvers = {c: stats.solver(c) for c in cand}
    cov_time = time.perf_counter() - t
    log(f"key statistics for {len(cand)} layers: {cov_time:.0f}s")
    command = "python benchmarks/golden_layers.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if resumed is not None:
        report = resumed
        report.setdefault("resumed", []).append(
            {"command": command, "load_start": load0, "cov_seconds": cov_time,
             "edits_before": {d: r["n"] for d, r in report["datasets"].items()}})
        log(f"resuming {args.out}: " + ", ".join(f"{d} {r['n']}/{r['n_planned']}" for d, r in report["datasets"].items()))
    else:
        report = {"command": command, "model": args.model, "candidates": cand, "args": vars(args),
                  "load_start": load0, "cov_seconds": cov_time, "covariance": stats.report(),
                  "v_path": value_path(model, cfg.value), "datasets": {}}
    if args.spill_only:
        report["spill"] = spill_check(model, base, cand[0], solvers[cand[0]], cfg, prefixes)
        report["wall_seconds"], report["load_end"] = time.perf_counter() - t_start, os.getloadavg()
        write_json(Path(args.out), report)
        print_markdown(report)
        return 0
    # --- per data set: scorers on the proxy edits, then the sweep; the JSON is rewritten after every edit
    n_done_here = 0  # edits made by this process (--stop-after-edits / --stop-after-minutes)
    for ds in args.datasets.split(","):
        recs, reqs, proxy = load_edits(ds, args.n, args.proxy, args.proxy_at)
        cf = ds == "counterfact"
        prev = report["datasets"].get(ds)
        if prev is not None:  # --resume: this data set's edits so far, its scorers' choices and times
            check_records(Path(args.out), ds, prev, recs, proxy)
            scorers = prev["scorer_choices"]
            rows, extra = [list(r) for r in prev["table"]], list(prev["extra"])
            t_edit, t_score, t_before = prev["edit_seconds"], prev["scoring_seconds"], prev["sweep_seconds"]
        else:
            if stop_now(args, n_done_here, t_start):  # before the scorers, which a stop would lose
                return stopped(report, args, log)
            scorers = scorer_layers(model, proxy, cand, args, log)
            rows, extra = [], []
            t_edit = t_score = t_before = 0.0
        t = time.perf_counter()
        for i, (rec, rq) in enumerate(zip(recs, reqs)):
            if i < len(rows):
                continue  # made by the run this one resumes
            if stop_now(args, n_done_here, t_start):
                return stopped(report, args, log)
            t0 = time.perf_counter()
            score = EditScorer(model, base, rec, rq.target_new, counterfact=cf)  # base argmax once per edit
            t_score += time.perf_counter() - t0
            row, ex = [], []
            for c in cand:
                t0 = time.perf_counter()
                p, info = rrome_one(model, base, rome_weight(model, c), rq, solvers[c], cfg, prefixes)
                jax.block_until_ready(p)
                t1 = time.perf_counter()
                m = score(p)
                t_score += time.perf_counter() - t1
                t_edit += t1 - t0
                m["v_steps_run"] = len(info["losses"]) - 1
                m["dw_norm"] = info["dw_norm"]
                row.append([m[k] for k in METRICS])
                ex.append(m)
            rows.append(row)
            extra.append(ex)
            n_done_here += 1
            log(f"{ds} edit {i + 1}/{len(reqs)}: rewrite per layer {np.round(np.asarray(row)[:, 0], 2).tolist()} "
                f"(edit {t_edit:.0f}s, scoring {t_score:.0f}s so far; load {os.getloadavg()[0]:.1f})")
            sweep_time = t_before + time.perf_counter() - t
            report["datasets"][ds] = summarize(np.asarray(rows), extra, cand, scorers, sweep_time, t_edit, t_score,
                                               len(proxy), cf, args.boot)
            report["datasets"][ds]["n_planned"] = len(reqs)
            # what a --resume needs to check and to go on without redoing the scorers
            report["datasets"][ds]["record_ids"] = [r.id for r in recs]
            report["datasets"][ds]["proxy_ids"] = [r.id for r in proxy]
            report["datasets"][ds]["scorer_choices"] = scorers
            write_json(Path(args.out), report)  # a stopped or killed run keeps its edits (--resume)
        if args.spill and "spill" not in report:  # the France -> Rome edit at the first data set's best fixed layer
            if stop_now(args, n_done_here, t_start):
                return stopped(report, args, log)
            layer = report["datasets"][ds]["ways"]["brute_force_fixed"]["layer"]
            report["spill"] = spill_check(model, base, layer, solvers[layer], cfg, prefixes)
            write_json(Path(args.out), report)
        log(f"{ds} done")
    # --- report
    report["load_end"] = os.getloadavg()
    report["wall_seconds"] = time.perf_counter() - t_start  # this process's (a resumed run: see "resumed")
    if report.get("resumed"):
        report["resumed"][-1]["wall_seconds"] = report["wall_seconds"]
    write_json(Path(args.out), report)
    print_table(report)
    return 0


def write_json(path: Path, report: dict) -> None:
    """The report to `path`, atomically (a temporary file renamed over it), so that a run killed while
    writing leaves the previous edit's JSON for --resume, not a truncated one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, path)


# the settings a resumed run must share with the file it resumes (--n and --proxy through the records)
RESUME_ARGS = ("model", "prefixes", "v_steps", "cov_tokens", "whole_rows", "scorers", "trace_facts", "n_noise")


def load_resume(path: Path, args, cand: list[str]) -> dict:
    """The report of the run to resume, after checking that it was made with this run's settings:
    SystemExit naming the file and the first field that differs (or what is missing)."""
    if not path.is_file():
        raise SystemExit(f"--resume: {path} does not exist (nothing to resume; run without --resume)")
    try:
        rep = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SystemExit(f"--resume: {path} is not valid JSON ({e})") from None
    old = rep.get("args", {})
    if rep.get("candidates") != cand:
        raise SystemExit(f"--resume: {path}: field 'candidates' is {rep.get('candidates')} in the file, {cand} in this "
                         "run; give the file's --layers or run without --resume")
    for k in RESUME_ARGS:
        if k not in old:
            raise SystemExit(f"--resume: {path}: field 'args.{k}' is missing (a run of an older golden_layers.py?)")
        if old[k] != getattr(args, k):
            raise SystemExit(f"--resume: {path}: field 'args.{k}' is {old[k]!r} in the file, {getattr(args, k)!r} in "
                             f"this run; give the file's --{k.replace('_', '-')} or run without --resume")
    done, want = list(rep.get("datasets", {})), args.datasets.split(",")
    if done != want[: len(done)]:
        raise SystemExit(f"--resume: {path}: field 'datasets' holds {done}, not the start of this run's --datasets {want}")
    # (an earlier data set may hold fewer edits than planned while a later one has started: a finished
    # run extended to a larger --n with --proxy-at goes on with the first data set, then the next)
    for ds, r in rep["datasets"].items():
        missing = [k for k in ("record_ids", "proxy_ids", "scorer_choices", "table", "extra") if k not in r]
        if missing:
            raise SystemExit(f"--resume: {path}: datasets.{ds} has no {missing} (written before --resume existed)")
    return rep


def check_records(path: Path, ds: str, prev: dict, recs, proxy) -> None:
    """SystemExit naming the file, data set and field when this run's evaluated or proxy records
    differ from the ones the resumed run used (e.g. another --n, --proxy or data file). The file's
    evaluated records may be a prefix of this run's (a run extended to a larger --n, --proxy-at);
    its proxy records must be this run's."""
    for field, mine in (("record_ids", [r.id for r in recs]), ("proxy_ids", [r.id for r in proxy])):
        theirs = prev[field]
        ok = theirs == mine[: len(theirs)] if field == "record_ids" else theirs == mine
        if not ok:
            j = next((i for i, (a, b) in enumerate(zip(theirs, mine)) if a != b), min(len(theirs), len(mine)))
            hint = (f"; to extend the file's --n {len(prev['record_ids'])} run to --n {len(recs)}, give --proxy-at "
                    f"{len(prev['record_ids'])}" if len(recs) > len(prev["record_ids"]) else "")
            raise SystemExit(f"--resume: {path}: field 'datasets.{ds}.{field}' differs from this run's records "
                             f"({len(theirs)} ids in the file, {len(mine)} here; first difference at position {j}); "
                             f"give the file's --n / --proxy / --proxy-at or run without --resume{hint}")
    if len(prev["table"]) > len(recs):
        raise SystemExit(f"--resume: {path}: datasets.{ds} holds {len(prev['table'])} edits, more than --n {len(recs)}")


def stop_now(args, n_done_here: int, t_start: float) -> bool:
    """--stop-after-edits / --stop-after-minutes: whether this process should stop before its next edit."""
    if args.stop_after_edits and n_done_here >= args.stop_after_edits:
        return True
    return bool(args.stop_after_minutes) and time.perf_counter() - t_start >= 60 * args.stop_after_minutes


def stopped(report: dict, args, log) -> int:
    """Ends a run stopped by --stop-after-*: the JSON (already written after the last edit) stays resumable."""
    log(f"stopped by --stop-after-*; " + ", ".join(f"{d} {r['n']}/{r['n_planned']}" for d, r in
                                                   report["datasets"].items())
        + f"; go on with the same command and --resume (--out {args.out})")
    return 0


def summarize(table, extra, cand, scorers, sweep_time, t_edit, t_score, n_proxy, cf, n_boot):
    """The golden-layer table of one data set from the (edits, layers, METRICS) array so far."""
    n = table.shape[0]
    per_pair = sweep_time / (n * len(cand))
    best, best_m = per_edit_oracle(table)
    fixed = best_fixed_layer(table)
    ways = {"oracle": {"layer": "per edit", "per_edit": best_m, "cost_s": sweep_time,
                       "cost_note": "r-ROME + scoring at every candidate layer for every evaluated edit"},
            "brute_force_fixed": {"layer": cand[fixed], "per_edit": table[:, fixed],
                                  "cost_s": per_pair * n_proxy * len(cand),
                                  "cost_note": "r-ROME + scoring at every candidate on the proxy set, "
                                               "from this run's time per (edit, layer)"}}
    for sc in (s for s in SCORERS if s in scorers):
        layer, scores, secs = scorers[sc]
        ways[sc] = {"layer": layer, "per_edit": table[:, cand.index(layer)], "cost_s": secs, "scores": scores}
    res = {"n": n, "oracle_layers": [cand[b] for b in best], "sweep_seconds": sweep_time,
           "edit_seconds": t_edit, "scoring_seconds": t_score, "seconds_per_edit_layer": per_pair,
           "lga_ip_dropped": scorers.get("lga_ip_dropped"), "table": table.tolist(), "extra": extra, "ways": {}}
    for w, d in ways.items():
        pe = np.asarray(d["per_edit"])
        row = {"layer": d["layer"], "cost_s": d["cost_s"], **{k: float(pe[:, q].mean()) for q, k in enumerate(METRICS)}}
        for key in ("scores", "cost_note"):
            if key in d:
                row[key] = d[key]
        for q, k in enumerate(METRICS):
            row[f"gap_{k}_vs_oracle"] = bootstrap_gap(best_m[:, q], pe[:, q], n_boot=n_boot)
            row[f"gap_{k}_vs_fixed"] = bootstrap_gap(table[:, fixed, q], pe[:, q], n_boot=n_boot)
        if cf:
            if w == "oracle":
                sel = [extra[i][b] for i, b in enumerate(best)]
            else:
                sel = [extra[i][cand.index(d["layer"])] for i in range(n)]
            for k in ("ES", "PS", "NS"):
                row[k] = float(np.mean([s[k] for s in sel]))
        res["ways"][w] = row
    return res


def spill_check(model, base, layer, solver, cfg, prefixes):

    rq = EditRequest("The capital of France is", "France", " Rome", target_true=" Paris")
    p, _ = rrome_one(model, base, rome_weight(model, layer), rq, solver, cfg, prefixes)
    prompts = ["The capital of France is", "The capital of Germany is", "The capital of Italy is",
               "The capital of Spain is"]
    out = {"layer": layer}
    for name, params in (("before", base), ("after", p)):
        gen = greedy(model, params, prompts, max_new_tokens=3)
        pr = target_probs(model, params, prompts[:2], [" Rome", " Rome"], progress=False)
        pb = target_probs(model, params, prompts[1:2], [" Berlin"], progress=False)
        out[name] = {"greedy": dict(zip(prompts, gen)), "p_rome_france": float(pr[0]),
                     "p_rome_germany": float(pr[1]), "p_berlin_germany": float(pb[0])}
    return out


def _fmt_gap(g):
    return f"{g['mean']:+.2f} [{g['lo']:+.2f},{g['hi']:+.2f}]"


def print_table(rep):
    print(f"model {rep['model']}, candidates {', '.join(rep['candidates'])}, load {rep['load_start'][0]:.1f} -> "
          f"{rep['load_end'][0]:.1f}, wall {rep['wall_seconds']:.0f}s")
    for ds, res in rep["datasets"].items():
        print(f"\n{ds}: N={res['n']}, {res['seconds_per_edit_layer']:.1f}s per (edit, layer)")
        cf = "ES" in res["ways"]["oracle"]
        head = f"{'way':<18}{'layer':<10}{'rewrite':>8}{'rephr':>7}{'local':>7}" + (f"{'ES':>6}{'PS':>6}{'NS':>6}" if cf else "")
        print(head + f"  {'rewrite gap vs oracle':<22}{'vs best fixed':<22}{'cost s':>8}")
        for w, r in res["ways"].items():
            line = f"{w:<18}{r['layer']:<10}{r['rewrite']:>8.3f}{r['rephrase']:>7.3f}{r['locality']:>7.3f}"
            if cf:
                line += f"{r['ES']:>6.2f}{r['PS']:>6.2f}{r['NS']:>6.2f}"
            print(line + f"  {_fmt_gap(r['gap_rewrite_vs_oracle']):<22}{_fmt_gap(r['gap_rewrite_vs_fixed']):<22}"
                         f"{r['cost_s']:>8.0f}")
    if "spill" not in rep:
        return
    s = rep["spill"]
    print(f"\nFrance -> Rome at {s['layer']}: " + "; ".join(
        f"{k}: P(Rome|France) {s[k]['p_rome_france']:.3f}, P(Rome|Germany) {s[k]['p_rome_germany']:.3f}, "
        f"P(Berlin|Germany) {s[k]['p_berlin_germany']:.3f}, greedy Germany -> {s[k]['greedy']['The capital of Germany is']!r}"
        for k in ("before", "after")))


NAMES = {"oracle": "per-edit oracle", "brute_force_fixed": "best fixed (brute force)", "salem": "salem",
         "contrast": "contrast", "lga": "lga (project's reading)", "lga_ip": "lga_ip (third-party definition)",
         "causal_trace": "causal tracing"}


def print_markdown(rep):
    """The README's tables (one per data set) from a run's JSON (complete or stopped)."""
    for ds, res in rep["datasets"].items():
        cf = "ES" in res["ways"]["oracle"]
        print(f"\n{ds}: N = {res['n']} of {res.get('n_planned', res['n'])} edits, {res['seconds_per_edit_layer']:.1f} s "
              f"per (edit, layer) (r-ROME {res['edit_seconds']:.0f} s + scoring {res['scoring_seconds']:.0f} s in all); "
              f"oracle layers {dict(sorted(Counter(res['oracle_layers']).items()))}\n")
        head = "| way of choosing | layer | rewrite | rephrase | locality |" + (" ES | PS | NS |" if cf else "")
        head += " rewrite gap to oracle [95% CI] | rewrite gap to best fixed [95% CI] | cost | brute-force cost / cost |"
        print(head)
        print("|" + "---|" * (head.count("|") - 1))
        for w, r in res["ways"].items():
            g = r["gap_rewrite_vs_oracle"]
            f = r["gap_rewrite_vs_fixed"]
            line = f"| {NAMES.get(w, w)} | {r['layer']} | {r['rewrite']:.3f} | {r['rephrase']:.3f} | {r['locality']:.3f} |"
            if cf:
                line += f" {r['ES']:.2f} | {r['PS']:.2f} | {r['NS']:.2f} |"
            gap = "-" if w == "oracle" else f"{g['mean']:+.3f} [{g['lo']:+.3f}, {g['hi']:+.3f}]"
            gfx = "-" if w in ("oracle", "brute_force_fixed") else f"{f['mean']:+.3f} [{f['lo']:+.3f}, {f['hi']:+.3f}]"
            ratio = "-" if w in ("oracle", "brute_force_fixed") else \
                f"{res['ways']['brute_force_fixed']['cost_s'] / r['cost_s']:.1f}x"
            print(line + f" {gap} | {gfx} | {r['cost_s']:.0f} s | {ratio} |")
        print("\nscores per candidate: " + "; ".join(f"{w} {np.round(r['scores'], 4).tolist()}"
                                                   for w, r in res["ways"].items() if "scores" in r))
    if "spill" in rep:
        s = rep["spill"]
        for k in ("before", "after"):
            print(f"spill {s['layer']} {k}: P(Rome|France) {s[k]['p_rome_france']:.4f}, P(Rome|Germany) "
                  f"{s[k]['p_rome_germany']:.4f}, P(Berlin|Germany) {s[k]['p_berlin_germany']:.4f}, greedy {s[k]['greedy']}")


def print_power(rep: dict, ns: list[int], bound: float = 0.05) -> None:
    """Per data set of a run: the scorer whose layer is nearest the per-edit oracle's rewrite (the
    claim's "best scorer"; ties: SCORERS order), its per-edit gaps from the JSON's table, and
    `claim_power` at each N - the share of simulated N-edit runs that would establish the claim."""
    for ds, res in rep["datasets"].items():
        cand = rep["candidates"]
        table = np.asarray(res["table"], np.float64)
        _, best_m = per_edit_oracle(table)
        scorers = [w for w in SCORERS if w in res["ways"]]
        if not scorers:
            print(f"{ds}: no scorer in this run (--scorers none): nothing to test")
            continue
        w = min(scorers, key=lambda k: res["ways"][k]["gap_rewrite_vs_oracle"]["mean"])
        layer = res["ways"][w]["layer"]
        gaps = best_m[:, 0] - table[:, cand.index(layer), 0]
        power = claim_power(gaps, ns, bound=bound)
        print(f"{ds}: N = {table.shape[0]}, best scorer {NAMES.get(w, w)} ({layer}), rewrite gap to the oracle "
              f"{gaps.mean():+.3f} ({int((gaps > 0).sum())} of {gaps.size} edits below their best layer); share of "
              f"simulated runs whose 95% interval ends below {bound}: "
              + ", ".join(f"N = {n}: {p:.2f}" for n, p in power.items()))


CF_KEYS = ("ES", "PS", "NS", "rewrite", "rephrase", "locality")


def print_cf_layers(reps: list[dict], n_boot: int = 2000) -> None:
    """Per candidate layer of the CounterFact half of one or two runs: the means over edits of
    CF_KEYS with 95% percentile-bootstrap intervals (`bootstrap_gap` against zeros), and with two
    runs the paired difference (first minus second) on the first min(N1, N2) edits (both runs take
    the data set's records in the same order)."""
    res = []
    for r in reps:
        if "counterfact" not in r.get("datasets", {}):
            raise SystemExit(f"--cf-layers: run {r.get('command', '?')!r} has no counterfact results")
        res.append(r["datasets"]["counterfact"])
    n = min(x["n"] for x in res)
    print(f"N = {n} edits" + (f" (the first {n} of each run)" if len({x['n'] for x in res}) > 1 else ""))
    print("| layer | run | " + " | ".join(CF_KEYS) + " |")
    print("|---|---|" + "---|" * len(CF_KEYS))

    def cell(g):
        return f"{g['mean']:.2f} [{g['lo']:.2f}, {g['hi']:.2f}]"

    layers = [c for c in reps[0]["candidates"] if all(c in r["candidates"] for r in reps)]
    for c in layers:
        vals = []
        for r, x in zip(reps, res):
            j = r["candidates"].index(c)
            v = {k: np.asarray([x["extra"][i][j][k] for i in range(n)], np.float64) for k in CF_KEYS}
            vals.append(v)
            print(f"| {c} | prefixes {r['args']['prefixes'] or 'none'}, {r['args']['v_steps']} v* steps | "
                  + " | ".join(cell(bootstrap_gap(v[k], np.zeros(n), n_boot=n_boot)) for k in CF_KEYS) + " |")
        if len(vals) == 2:
            print(f"| {c} | paired difference | " + " | ".join(
                (lambda g: f"{g['mean']:+.2f} [{g['lo']:+.2f}, {g['hi']:+.2f}]")(
                    bootstrap_gap(vals[0][k], vals[1][k], n_boot=n_boot)) for k in CF_KEYS) + " |")


if __name__ == "__main__":
    sys.exit(main())
