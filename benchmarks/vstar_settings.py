"""Benchmark (diagnostic): v* of the first edits of a many-edits run under two v* settings - how far
delta moves, whether the clamp binds, and how low the target NLL gets - on the base weights.

    python benchmarks/vstar_settings.py --workdir runs/many-zsre-seqb-ae --n 10 --layer layers.7 \\
        --out runs/vstar-settings.json [--config.KEY=VALUE ...]

Reads the edit set the pipeline wrote into --workdir (the val fail rows in order, as the many-edits
study edits them), the records for the subjects, and the model of --experiment (zsre_smollm2). For each
row and each setting (name, v_steps, v_lr, clamp_norm_factor, clamp_norm): |o| (the MLP output at the
subject's last token), |h0| (the block output there), the clamp bound, |delta|, the loss at the first
and last step, and the NLL of the target after (loss - weight decay - KL is not separated: the total
is what the optimisation sees). Prints a table and writes JSON. Not a test.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SETTINGS = {  # name: (v_steps, v_lr, clamp_norm_factor, clamp_norm)
    "rome (session 12)": (20, 0.5, 4.0, "output"),
    "alphaedit llama3": (25, 0.1, 0.75, "residual"),
    "alphaedit clamp, lr 0.5": (25, 0.5, 0.75, "residual"),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experiment", default="zsre_smollm2")
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--layer", default="layers.7")
    ap.add_argument("--out", required=True)
    args, rest = ap.parse_known_args(argv)

    from experiments.common import apply_overrides
    from salem_jax.baselines import rome as R
    from salem_jax.data.edit_set import load_edit_set
    from salem_jax.locate.trace_rows import subject_in_prompt
    from salem_jax.pipeline import load, read_records, split_rows

    cfg = apply_overrides(importlib.import_module(f"experiments.{args.experiment}").get_config(False), rest)
    records = read_records(cfg)
    subjects = {r.id: r.subject for r in records}
    model = load(cfg, records)
    es = load_edit_set(Path(args.workdir) / "edit_set")
    _, val = split_rows(es)
    rows = []
    for r in val:
        if r["group"] != "fail":
            continue
        s = subject_in_prompt(r["prompt"], subjects.get(r["record_id"], ""))
        if s is not None:
            rows.append((r, s))
        if len(rows) == args.n:
            break
    w = R.rome_weight(model, args.layer)
    out = []
    for name, (steps, lr, f, norm) in SETTINGS.items():
        cfg_v = R.ROMEConfig(v_steps=steps, v_lr=lr, clamp_norm_factor=f, clamp_norm=norm)
        for i, (r, s) in enumerate(rows):
            t = time.perf_counter()
            v, o, hist = R.compute_value(model, model.params, w, r["prompt"], s, r["target"], cfg_v, progress=False)
            batch, idx, _ = R._value_batch(model, r["prompt"], s, r["target"], cfg_v)
            h0 = float(R.reference_norm(model, model.params, w, batch, idx, o,
                                        dataclasses.replace(cfg_v, clamp_norm="residual")))
            o_n = float(np.linalg.norm(np.asarray(o, np.float64)))
            d = float(np.linalg.norm(np.asarray(v, np.float64) - np.asarray(o, np.float64)))
            cap = f * (h0 if norm == "residual" else o_n)
            out.append(dict(setting=name, row=i, id=r["id"], o_norm=o_n, h0_norm=h0, cap=cap, delta_norm=d,
                            clamped=bool(d >= cap * (1 - 1e-4)), loss_first=hist[0], loss_last=hist[-1],
                            steps_run=len(hist) - 1, seconds=time.perf_counter() - t))
            print(json.dumps(out[-1]), flush=True)
    Path(args.out).write_text(json.dumps(dict(layer=args.layer, settings=SETTINGS, rows=out), indent=1))
    print("| setting | rows | mean |o| | mean |h0| | mean cap | mean |delta| | clamped | mean loss first | mean loss last | loss < 0.5 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in SETTINGS:
        x = [e for e in out if e["setting"] == name]
        m = lambda k: np.mean([e[k] for e in x])  # noqa: E731
        print(f"| {name} | {len(x)} | {m('o_norm'):.1f} | {m('h0_norm'):.1f} | {m('cap'):.1f} | {m('delta_norm'):.1f} | "
              f"{sum(e['clamped'] for e in x)} | {m('loss_first'):.2f} | {m('loss_last'):.2f} | "
              f"{sum(e['loss_last'] < 0.5 for e in x)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
