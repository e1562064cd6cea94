"""Benchmark: steps to convergence (the paper's Table 3 claim: the salient layer's editor converges in
45k steps where MEND's needs 55k) - validation edit accuracy and drawdown against steps for the
same editor trained on each layer set, and the step at which each first reaches val EA 0.9.

    python benchmarks/convergence.py --save-edit-set runs/capitals_smollm2/edit_set \
        --layer-sets "layers.26;layers.27,layers.28,layers.29" --steps 600 --val-every 50 \
        --out runs/bench-convergence.json --plot docs/convergence_smollm2_capitals.png
    python benchmarks/convergence.py --edit-set runs/capitals_smollm2/edit_set ...   # reuse the saved set
    python benchmarks/convergence.py --quick                                         # tiny model, seconds

For each layer set S the experiment's editor config (the CPU budget, salem_jax.config.CPU_EDITOR:
effective batch 1, Adam lr 1e-4) is trained for --steps steps (early stopping off, so every set
gets the whole budget) with validation every --val-every steps on the same val groups
(TrainConfig.val_groups of the edit set's val split), by `salem_jax.mend.train.train_editor` in
--workdir/<set> - the entry point `salem train-editor`, the pipeline and the MEND sweep
(salem_jax.locate.mend_sweep) train with. Training runs in chunks of --val-every steps
(`train_editor(..., stop_after=k)`, then resumed from the checkpoint written at step k): resuming
is exact (tests/test_checkpoint.py), so the curve is the uninterrupted run's validation record
(metrics.jsonl) and each point also gets the wall seconds spent up to it. A killed run resumes.

Per set: the curve (step, val edit acc = fail + rephrasings, fail acc, adapt acc, val drawdown =
pass accuracy before minus after, KL, loss, seconds), the first validated step whose edit acc
reaches --threshold (None if none does: the step is only known to the resolution of --val-every),
the step of the best val loss (the checkpoint MEND's protocol would keep) and the last / best
edit acc. Prints a table, writes JSON, and a PNG (matplotlib) of val EA and val drawdown against
steps for all sets. The estimate (sets x steps x --seconds-per-step) is printed first and a run
over --budget-minutes is refused before anything trains.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Mapping, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `experiments` without installing

from salem_jax.locate import mend_sweep as MS  # noqa: E402
from salem_jax.locate.profile import jsonable  # noqa: E402
from salem_jax.mend.train import EditData, TrainConfig, train_editor  # noqa: E402

CURVE_KEYS = ("step", "edit_acc", "fail_acc", "adapt_acc", "drawdown", "kl", "loss", "seconds")


def first_step_reaching(curve: Sequence[Mapping], threshold: float, key: str = "edit_acc") -> int | None:
    """The smallest validated step whose `key` is >= threshold (None if no point reaches it).
    curve: records with "step" and `key`, in any order; NaN never reaches."""
    hits = [int(c["step"]) for c in curve if c.get(key) is not None and c[key] >= threshold]
    return min(hits) if hits else None


def best_loss_step(curve: Sequence[Mapping]) -> int | None:
    """The validated step of the lowest val loss (the first one on ties), None for an empty curve."""
    pts = [c for c in curve if c.get("loss") is not None]
    return int(min(pts, key=lambda c: (c["loss"], c["step"]))["step"]) if pts else None


def convergence_config(cfg: TrainConfig, steps: int, val_every: int) -> TrainConfig:
    """cfg trained for `steps` steps with validation (and a checkpoint, which the chunked run
    resumes from) every `val_every` steps, early stopping off (patience beyond the run)."""
    if steps < 1 or val_every < 1:
        raise ValueError(f"convergence: steps ({steps}) and val_every ({val_every}) must be >= 1")
    if val_every > steps:
        raise ValueError(f"convergence: val_every {val_every} > steps {steps}: no validation would run; lower --val-every")
    return dataclasses.replace(cfg, max_steps=steps, val_every=val_every, checkpoint_every=val_every,
                               patience=steps + 1)


def train_curve(model, data: Mapping[str, EditData], layers: Sequence[str], cfg: TrainConfig, workdir: str | Path, *,
                part: str = "mlp", until: int | None = None, mesh=None, say=print) -> list[dict]:
    """Train cfg's editor on the `part` weights of `layers` in workdir, in chunks of cfg.val_every
    steps up to step `until` (default cfg.max_steps; a later call with a larger `until` goes on
    from there), and return the validation curve so far: one record per validated step with
    CURVE_KEYS ("seconds": wall time of training + validation from step 0 to that step; chunks
    timed in an earlier, killed process are kept in workdir/seconds.json)."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    times_path = workdir / "seconds.json"
    times = {int(k): v for k, v in json.loads(times_path.read_text()).items()} if times_path.exists() else {}
    weights = model.layers.weights(list(layers), part=part)
    if not weights:
        raise ValueError(f"convergence: layer set {tuple(layers)} lists no {part!r} weights")
    stops = sorted(set(range(cfg.val_every, cfg.max_steps + 1, cfg.val_every)) | {cfg.max_steps})
    done = 0
    until = cfg.max_steps if until is None else until
    for stop in [x for x in stops if x <= until]:
        if stop in times:  # trained (and timed) by an earlier process: train_editor resumes past it
            done = stop
            continue
        t = time.perf_counter()
        res = train_editor(model, data, weights, cfg, workdir, mesh=mesh, progress=False, stop_after=stop)
        if res.step != stop:
            raise RuntimeError(f"convergence: {'+'.join(layers)} stopped at step {res.step}, not {stop}")
        times[stop] = times.get(done, 0.0) + time.perf_counter() - t
        times_path.write_text(json.dumps(times))
        v = res.last_val
        say(f"  {'+'.join(layers)} step {stop}: val EA {v['edit_acc']:.3f} (fail {v['fail_acc']:.3f}, adapt "
            f"{v['adapt_acc']:.3f}) DD {v['drawdown']:.3f} KL {v['kl']:.4f} loss {v['loss']:.4f} "
            f"({times[stop]:.0f} s, load {os.getloadavg()[0]:.1f})")
        done = stop
    curve = MS.read_curve(workdir)
    for c in curve:
        c["seconds"] = times.get(int(c["step"]))
    return [{k: c.get(k) for k in CURVE_KEYS} for c in curve]


def summarize(layers: Sequence[str], curve: Sequence[Mapping], threshold: float) -> dict:
    """One set's row: its curve, first step reaching the threshold, best-val-loss step, last and best EA."""
    last = curve[-1] if curve else {}
    return {
        "layers": list(layers), "curve": list(curve), "threshold": threshold,
        "first_step_reaching": first_step_reaching(curve, threshold),
        "best_loss_step": best_loss_step(curve),
        "last_edit_acc": last.get("edit_acc"), "last_drawdown": last.get("drawdown"),
        "max_edit_acc": max((c["edit_acc"] for c in curve), default=None),
        "seconds": last.get("seconds"),
    }


def plot_curves(rows: Sequence[Mapping], path: str | Path, threshold: float, title: str = "") -> str:
    """A PNG with two panels against editor steps: val edit accuracy (threshold dashed, each set's
    first step reaching it marked) and val drawdown, one line per layer set. Returns the path."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, (ax_ea, ax_dd) = plt.subplots(2, 1, figsize=(7.0, 6.0), sharex=True)
    for r in rows:
        steps = [c["step"] for c in r["curve"]]
        name = "+".join(r["layers"])
        line, = ax_ea.plot(steps, [c["edit_acc"] for c in r["curve"]], marker="o", markersize=3, label=name)
        ax_dd.plot(steps, [c["drawdown"] for c in r["curve"]], marker="o", markersize=3, color=line.get_color(), label=name)
        if r["first_step_reaching"] is not None:
            ax_ea.axvline(r["first_step_reaching"], color=line.get_color(), linestyle=":", linewidth=1)
    ax_ea.axhline(threshold, color="gray", linestyle="--", linewidth=1)
    ax_ea.set_ylabel("val edit acc (fail + rephrasings)")
    ax_ea.legend(fontsize=8, loc="lower right")
    ax_dd.axhline(0.0, color="black", linewidth=0.5)
    ax_dd.set_ylabel("val drawdown (pass acc lost)")
    ax_dd.set_xlabel("editor steps")
    if title:
        ax_ea.set_title(title, fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return str(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experiment", default="capitals_smollm2")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (--config.KEY=VALUE)")
    ap.add_argument("--edit-set", default=None, help="a saved edit set to reuse")
    ap.add_argument("--save-edit-set", default=None, help="save the built edit set here (when --edit-set is not given)")
    ap.add_argument("--layer-sets", default="layers.26;layers.27,layers.28,layers.29",
                    help="';'-separated sets of ','-separated layers (default: salem_edit's choice and mend_fixed on SmolLM2)")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--val-every", type=int, default=50)
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--budget-minutes", type=float, default=120.0)
    ap.add_argument("--seconds-per-step", type=float, default=MS.SMOLLM2_CPU_SECONDS_PER_STEP)
    ap.add_argument("--max-minutes", type=float, default=0.0,
                    help="stop after the first round of validations past this wall time (0: no limit)")
    ap.add_argument("--workdir", default="runs/convergence")
    ap.add_argument("--quick", action="store_true", help="tiny model, a smoke run")
    ap.add_argument("--out", default=None, help="JSON results")
    ap.add_argument("--plot", default=None, help="PNG of val EA and drawdown against steps")
    args = ap.parse_args(argv)

    from experiments.common import benchmark_edit_set, experiment_config
    from salem_jax.methods.mend import train_config
    from salem_jax.mend.train import prepare_splits
    from salem_jax.pipeline import load, read_records

    cfg = experiment_config(args.experiment, args.quick, args.set)
    records = read_records(cfg)
    model = load(cfg, records)
    layer_sets = [tuple(s.split(",")) for s in args.layer_sets.split(";")]
    if args.quick and args.layer_sets == ap.get_default("layer_sets"):
        names = model.layers.names()
        layer_sets = [(names[-2],), tuple(names[-2:])]
    sets = MS.check_layer_sets(model, layer_sets)
    tc = convergence_config(train_config(cfg), args.steps, args.val_every)
    est = MS.estimate_seconds(len(sets), tc, args.seconds_per_step)
    print(f"convergence: {len(sets)} layer sets x {tc.max_steps} steps x {args.seconds_per_step:g} s/step = "
          f"{est / 60:.1f} min estimated (load {os.getloadavg()[0]:.1f})")
    if est > 60 * args.budget_minutes:
        raise SystemExit(f"convergence: estimate {est / 60:.0f} min over the budget of {args.budget_minutes:g} min: "
                         "fewer --steps or sets, or raise --budget-minutes")
    t = time.perf_counter()
    es = benchmark_edit_set(model, records, cfg, args.edit_set, args.save_edit_set)
    data = prepare_splits(model, {"train": es.rows("train"), "val": es.rows("val")})
    print(f"edit set ready in {time.perf_counter() - t:.0f} s; editor: {tc.max_steps} steps, effective batch "
          f"{tc.effective_batch}, lr {tc.lr:g}, val every {tc.val_every} on {tc.val_groups} val groups")
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    stops = sorted(set(range(tc.val_every, tc.max_steps + 1, tc.val_every)) | {tc.max_steps})
    reached = 0
    for stop in stops:  # round-robin: every set to `stop` before any goes further, so a cut run stays comparable
        rows = [summarize(s, train_curve(model, data, s, tc, Path(args.workdir) / MS.set_name(s), part=cfg.saliency.part,
                                         until=stop), args.threshold) for s in sets]
        reached = stop
        write_outputs(args, rows, model.name, tc, est, load0, reached)
        if args.max_minutes and time.perf_counter() - t0 > 60 * args.max_minutes and stop < tc.max_steps:
            print(f"convergence: --max-minutes {args.max_minutes:g} passed at step {stop} of {tc.max_steps}: stopping "
                  "here (rerun with the same arguments to go on)")
            break
    load1 = os.getloadavg()

    print(f"{model.name}, {args.experiment}: val EA / drawdown against steps, {reached} of {tc.max_steps} steps "
          f"(load average {load0[0]:.1f} -> {load1[0]:.1f}, 15-min {load1[2]:.1f})")
    steps = sorted({c["step"] for r in rows for c in r["curve"]})
    print("| step | " + " | ".join(f"{'+'.join(r['layers'])} EA / fail / adapt / DD / KL" for r in rows) + " |")
    print("|---|" + "---|" * len(rows))
    for st in steps:
        cells = []
        for r in rows:
            c = next((c for c in r["curve"] if c["step"] == st), None)
            cells.append("" if c is None else f"{c['edit_acc']:.3f} / {c['fail_acc']:.3f} / {c['adapt_acc']:.3f} / "
                                              f"{c['drawdown']:.3f} / {c['kl']:.4f}")
        print(f"| {st} | " + " | ".join(cells) + " |")
    print("| layers | first step val EA >= %g | best val loss step | max EA | last EA | last DD | seconds |" % args.threshold)
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {'+'.join(r['layers'])} | {r['first_step_reaching']} | {r['best_loss_step']} | {r['max_edit_acc']:.3f} | "
              f"{r['last_edit_acc']:.3f} | {r['last_drawdown']:.3f} | {r['seconds']:.0f} |")
    write_outputs(args, rows, model.name, tc, est, load0, reached, load1)
    if args.plot:
        print(f"plot: {args.plot} ({Path(args.plot).stat().st_size / 1024:.0f} KB)")
    return 0


def write_outputs(args, rows, model_name, tc, est, load0, reached, load1=None) -> None:
    """The JSON (--out) and the PNG (--plot) of the curves so far (rewritten after every round)."""
    if args.plot:
        plot_curves(rows, args.plot, args.threshold,
                    title=f"{model_name}, {args.experiment}: CPU-budget MEND editor, {reached} steps, val every {tc.val_every}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(jsonable({
            "experiment": args.experiment, "overrides": args.set, "model": model_name, "threshold": args.threshold,
            "train_config": tc.to_dict(), "steps_reached": reached, "rows": rows, "estimate_seconds": est,
            "load_average_before": load0, "load_average_after": load1}), indent=2))


if __name__ == "__main__":
    sys.exit(main())
