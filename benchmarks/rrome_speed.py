"""Benchmark: one r-ROME edit with prefixes on SmolLM2, v* on live windows (the default) against
the whole-row path, in one process (same-run A/B; the machine is shared, so only the ratio counts).

    python benchmarks/rrome_speed.py --n 4 --layers layers.0,layers.7 --prefixes 5x5,5x10 --v-steps 20

For each of --n CounterFact edits and each layer, `rrome_one` runs with ROMEConfig(window=True) and
window=False, alternating which goes first; the first edit (compilations) is reported apart. Also
the largest relative difference of v* and of |dW| between the two, and the v* steps run. Prints a
table and writes JSON to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from golden_layers import load_edits  # noqa: E402

from salem_jax.baselines.keystats import KeyStats, wikitext_texts  # noqa: E402
from salem_jax.baselines.locate_edit import EditorConfig  # noqa: E402
from salem_jax.baselines.rome import ROMEConfig, rome_weight, value_path  # noqa: E402
from salem_jax.baselines.rrome import rrome_one  # noqa: E402
from salem_jax.compile_cache import add_flag, enable_compile_cache  # noqa: E402
from salem_jax.models import load_model  # noqa: E402


def prefix_lengths(spec: str) -> list[int]:
    out = []
    for part in spec.split(","):
        if part:
            c, n = part.split("x")
            out += [int(n)] * int(c)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n", type=int, default=4, help="CounterFact edits")
    ap.add_argument("--layers", default="layers.0,layers.7")
    ap.add_argument("--prefixes", default="5x5,5x10")
    ap.add_argument("--v-steps", type=int, default=20)
    ap.add_argument("--cov-tokens", type=int, default=10000)
    ap.add_argument("--out", default="runs/rrome_speed.json")
    add_flag(ap)
    args = ap.parse_args(argv)
    enable_compile_cache(enabled=not args.no_compile_cache)
    load0 = os.getloadavg()
    model = load_model(args.model)
    stats = KeyStats(model, model.params, wikitext_texts(2000), max_tokens=args.cov_tokens,
                     prefix_lengths=prefix_lengths(args.prefixes), progress=False)
    prefixes = stats.prefixes()
    layers = args.layers.split(",")
    solvers = {c: stats.solver(c) for c in layers}
    _, reqs, _ = load_edits("counterfact", args.n, 0)
    cfgs = {p: EditorConfig(value=ROMEConfig(v_steps=args.v_steps, window=(p == "window")))
            for p in ("window", "whole")}
    if value_path(model, cfgs["window"].value) != "window" or value_path(model, cfgs["whole"].value) != "from_block":
        raise SystemExit(f"{args.model}: no KV cache (kv_decode), so there is no window path to compare")
    rows = []
    for i, rq in enumerate(reqs):
        for c in layers:
            rec = {"edit": i, "layer": c}
            order = ("window", "whole") if (i + layers.index(c)) % 2 == 0 else ("whole", "window")
            info = {}
            for p in order:
                t = time.perf_counter()
                params, info[p] = rrome_one(model, model.params, rome_weight(model, c), rq, solvers[c], cfgs[p],
                                            prefixes)
                jax.block_until_ready(params)
                rec[f"{p}_s"] = time.perf_counter() - t
            va, vb = info["window"]["value"], info["whole"]["value"]
            rec["v_rel_diff"] = float(np.abs(va - vb).max() / np.abs(vb).max())
            rec["dw_norm"] = [info["window"]["dw_norm"], info["whole"]["dw_norm"]]
            rec["steps"] = [len(info["window"]["losses"]) - 1, len(info["whole"]["losses"]) - 1]
            rec["final_loss"] = [info["window"]["losses"][-1], info["whole"]["losses"][-1]]
            rec["load"] = os.getloadavg()[0]
            rows.append(rec)
            print(f"edit {i} {c}: window {rec['window_s']:.1f}s, whole {rec['whole_s']:.1f}s, v* rel diff "
                  f"{rec['v_rel_diff']:.1e}, |dW| {rec['dw_norm'][0]:.3f} / {rec['dw_norm'][1]:.3f}, "
                  f"steps {rec['steps']}, "
                  f"load {rec['load']:.1f}", flush=True)
    steady = [r for r in rows if r["edit"] > 0] or rows
    w, h = (float(np.mean([r[k] for r in steady])) for k in ("window_s", "whole_s"))
    summary = {"command": "python benchmarks/rrome_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "load_start": load0, "load_end": os.getloadavg(), "rows": rows,
               "steady_window_s": w, "steady_whole_s": h, "speedup": h / w,
               "max_v_rel_diff": max(r["v_rel_diff"] for r in rows)}
    print(f"per (edit, layer), edits 2..{args.n}: window {w:.1f}s, whole rows {h:.1f}s: {h / w:.2f}x; "
          f"max v* rel diff {summary['max_v_rel_diff']:.1e}; load {load0[0]:.1f} -> {os.getloadavg()[0]:.1f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
