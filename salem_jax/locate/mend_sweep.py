"""The paper's own layer oracle (its Table 6): train the same MEND editor on each candidate layer set.

SaLEM's claim is about the editor it trains on the chosen layer, so the reference for "where
should SaLEM edit" is that editor's result per layer set, not fine-tuning (salem_jax.locate.sweep,
kept as the cheaper second oracle). For every candidate set S (default `default_layer_sets`:
single layers at a stride, the last layer, and three contiguous triples):

    editor_S   = train_editor(model, data, part weights of S, the SAME TrainConfig, workdir/S)
    curve_S    = its validation records (metrics.jsonl): step, edit_acc, fail_acc, adapt_acc,
                 drawdown, kl at every val_every steps
    final_S    = the last editor applied to every val group alone (mend.train.eval_step):
                 per group, its edit rows (fail + rephrasings) correct, its pass rows' accuracy
                 before minus after (drawdown), KL, and locality (salem_jax.eval.metrics.locality:
                 the share of the pass rows' target tokens, teacher forced, whose argmax is the
                 same before and after the edit; token weighted over all groups)

Drawdown-aware ranking (as the FT sweep's): the key (mean drawdown <= budget, edit accuracy,
-drawdown), bigger first. With `locality_floor` set, "within budget" also needs locality >=
the floor - on data where the base model answers no pass row exactly (zsRE's loc questions on
SmolLM2) the drawdown is 0 by construction and only locality says what an edit spilled.
Bootstrap over val groups (resampled with replacement, the same groups for every set) gives
per-set intervals of edit accuracy, drawdown and locality, each set's rank interval and how
often it ranks first.

Bad input is refused before anything trains: unknown layer names (KeyError listing the valid
ones), empty or repeated sets, and a sweep whose estimate (sets x steps x seconds_per_step)
exceeds the time budget - the estimate is in the error.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from salem_jax import parallel, sharding
from salem_jax.mend.train import (EditData, TrainConfig, eval_groups_per_call, eval_step, from_block_data, place_base_params,
                                   place_state, train_editor, val_batches)
from salem_jax.locate.profile import jsonable

# Wall seconds per editor step (training + its share of validation) of the CPU-budget editor on
# one SmolLM2 layer, 2 unloaded CPU cores (README main job: 150 steps in 355 s).
SMOLLM2_CPU_SECONDS_PER_STEP = 2.4


@dataclasses.dataclass(frozen=True)
class MendSweepConfig:
    """drawdown_budget: max mean val drawdown (pass accuracy lost) of a set ranked by accuracy;
    budget_seconds / seconds_per_step: the estimate that refuses a sweep too long to run;
    n_boot, seed: the bootstrap; part: which weights of each layer the editor edits;
    locality_floor: None, or the min locality of a set counted within budget (module docstring);
    stop_after_seconds: see the field."""

    drawdown_budget: float = 0.05
    budget_seconds: float = 3600.0
    seconds_per_step: float = SMOLLM2_CPU_SECONDS_PER_STEP
    n_boot: int = 1000
    seed: int = 0
    part: str = "mlp"
    locality_floor: float | None = None
    # None, or a wall-clock deadline (seconds from the sweep's start): a set is started only if
    # the mean time of the sets done so far says it ends by then; the rest are listed as skipped
    # and the finished ones ranked (list the sets in order of priority)
    stop_after_seconds: float | None = None


def default_layer_sets(names: Sequence[str], stride: int = 3) -> list[tuple[str, ...]]:
    """Single layers 0, stride, 2 stride, ... and the last; triples: the first, middle and last three."""
    n = len(names)
    singles = sorted(set(range(0, n, stride)) | {n - 1})
    sets = [(names[i],) for i in singles]
    if n >= 3:
        mid = (n - 3) // 2
        for s in sorted({0, mid, n - 3}):
            sets.append(tuple(names[s : s + 3]))
    return sets


def contiguous_sets(names: Sequence[str], k: int = 3) -> list[tuple[str, ...]]:
    """Every run of k consecutive layers: (0..k-1), (1..k), ... (the paper's Table 6 rows)."""
    if not 1 <= k <= len(names):
        raise ValueError(f"mend-sweep: sets of {k} layers from {len(names)} layers")
    return [tuple(names[i : i + k]) for i in range(len(names) - k + 1)]


def random_layer_sets(names: Sequence[str], k: int, n: int, seed: int,
                      exclude: Sequence[Sequence[str]] = ()) -> list[tuple[str, ...]]:
    """n distinct sets of k layers (in layer order) drawn uniformly without replacement by
    numpy's default_rng([seed, k]), skipping the sets in `exclude` (as the paper's Table 6 adds two
    random triples, (2,5,9) and (1,2,4), to the contiguous ones). Deterministic in (names, k, n, seed)."""
    from math import comb

    left = comb(len(names), k) - len({frozenset(e) for e in exclude if len(e) == k})
    if n > left:
        raise ValueError(f"mend-sweep: {n} random sets of {k} of {len(names)} layers asked, only {left} not excluded")
    rng = np.random.default_rng([seed, k])
    seen = {frozenset(e) for e in exclude}
    out = []
    while len(out) < n:
        idx = sorted(rng.choice(len(names), size=k, replace=False).tolist())
        s = tuple(names[i] for i in idx)
        if frozenset(s) not in seen:
            seen.add(frozenset(s))
            out.append(s)
    return out


def set_name(layers: Sequence[str]) -> str:
    """A folder-safe name of a layer set: 'layers.27+layers.28+layers.29'."""
    return "+".join(re.sub(r"[^A-Za-z0-9_.-]", "_", n) for n in layers)


def check_layer_sets(model, layer_sets: Sequence[Sequence[str]]) -> list[tuple[str, ...]]:
    """The sets as tuples; KeyError for layers the model does not have, ValueError for empty or repeated sets."""
    out = []
    for s in layer_sets:
        s = tuple(s)
        if not s:
            raise ValueError("mend-sweep: an empty layer set")
        model.layers.select(list(s))  # KeyError naming the valid layers
        if len(set(s)) != len(s):
            raise ValueError(f"mend-sweep: layer set {s} repeats a layer")
        out.append(s)
    if len({frozenset(s) for s in out}) != len(out):
        raise ValueError("mend-sweep: the same layer set is listed twice")
    if not out:
        raise ValueError("mend-sweep: no layer sets")
    return out


def estimate_seconds(n_sets: int, cfg: TrainConfig, seconds_per_step: float) -> float:
    """Sets x steps x seconds per step (each set trains cfg.max_steps steps, validation included)."""
    return float(n_sets * cfg.max_steps * seconds_per_step)


def group_outcomes(model, spec, cfg: TrainConfig, editor_params, norm, data: EditData, mesh=None,
                   projections=None) -> dict[str, np.ndarray]:
    """The editor applied to every val group alone: per group [G] edit / fail / adapt accuracy,
    pass accuracy before and after, KL, and locality's parts (pass target tokens whose argmax is
    unchanged, pass target tokens; groups with weight 0 dropped). projections: the null-space
    projectors the editor was trained through (`TrainResult.projections`; TrainConfig.null_energy)."""
    mesh = mesh if mesh is not None else parallel.data_mesh()
    cfg = cfg.resolved(parallel.n_data(mesh))
    k = cfg.edits_per_group
    # placed and batched as mend.train.evaluate does (from the first edited block on decoder-only
    # models), so the per-group numbers average exactly to the training run's validation
    params, nrm = place_state(editor_params, mesh), place_state(norm, mesh)
    base = place_base_params(model, model.params, mesh)
    plan, data = from_block_data(model, spec, data, base)
    kw = dict(apply_fn=model.apply, spec=spec, cfg=cfg.step_config(), mesh=mesh, from_block=plan)
    per_call = eval_groups_per_call(cfg, data, sharding.axis_size(mesh, sharding.DATA))
    cols = {key: [] for key in ("edit_acc", "fail_acc", "adapt_acc", "pass_before", "pass_after", "kl",
                                "pass_unchanged", "pass_tokens")}
    for b in val_batches(data, dataclasses.replace(cfg, batch_size=per_call)):
        r = parallel.fetch(eval_step(params, nrm, base, parallel.shard_batch(b, mesh), projections, **kw))
        w = np.asarray(b["weight"]) > 0
        ev, ec = np.asarray(r["edit_valid"])[w], np.asarray(r["edit_correct"])[w]
        pv = np.asarray(r["pass_valid"])[w]
        share = lambda c, v: np.where(v.sum(-1) > 0, (c & v).sum(-1) / np.maximum(v.sum(-1), 1), np.nan)  # noqa: E731
        fv, av = ev.copy(), ev.copy()
        fv[:, k:] = False
        av[:, :k] = False
        cols["edit_acc"].append(share(ec, ev))
        cols["fail_acc"].append(share(ec, fv))
        cols["adapt_acc"].append(share(ec, av))
        cols["pass_before"].append(share(np.asarray(r["base_pass_correct"])[w], pv))
        cols["pass_after"].append(share(np.asarray(r["pass_correct"])[w], pv))
        cols["kl"].append(np.asarray(r["kl"])[w])
        tok = np.asarray(r["pass_tokens"])[w] * pv  # rows without targets count no tokens
        cols["pass_unchanged"].append((np.asarray(r["pass_unchanged"])[w] * pv).sum(-1))
        cols["pass_tokens"].append(tok.sum(-1))
    return {key: np.concatenate(v) for key, v in cols.items()}


def ranking_key(edit_acc: float, drawdown: float, budget: float, locality: float | None = None,
                floor: float | None = None) -> tuple:
    """Bigger is better: within the drawdown budget (and, with a floor, locality >= floor) first,
    then edit accuracy, then less drawdown."""
    ok = drawdown <= budget + 1e-12 and (floor is None or (locality is not None and locality >= floor - 1e-12))
    return (ok, edit_acc, -drawdown)


def rank_sets(edit_acc: Sequence[float], drawdown: Sequence[float], budget: float,
              locality: Sequence[float] | None = None, floor: float | None = None) -> list[int]:
    """Indices of the sets, best first (ties keep the listed order)."""
    loc = list(locality) if locality is not None else [None] * len(edit_acc)
    keys = [ranking_key(a, d, budget, lo, floor) for a, d, lo in zip(edit_acc, drawdown, loc)]
    return sorted(range(len(keys)), key=lambda i: keys[i], reverse=True)


def locality_of(o: Mapping[str, np.ndarray], idx=None) -> float:
    """Token-weighted locality of the groups `idx` (all when None): sum unchanged / sum tokens."""
    u, t = (o["pass_unchanged"], o["pass_tokens"]) if idx is None else (o["pass_unchanged"][idx], o["pass_tokens"][idx])
    return float(u.sum() / t.sum()) if t.sum() > 0 else float("nan")


def bootstrap(outcomes: Sequence[Mapping[str, np.ndarray]], budget: float, n_boot: int, seed: int,
              floor: float | None = None) -> dict:
    """Per set: 95% intervals of edit accuracy, drawdown and locality, rank interval (1 = best)
    and the share of resamples where it ranks first; val groups resampled with replacement, the
    same for every set."""
    g = len(outcomes[0]["edit_acc"])
    rng = np.random.default_rng([seed, 6])
    ea, dd, lo, ranks = [], [], [], []
    for _ in range(n_boot):
        idx = rng.integers(0, g, g)
        a = [float(np.nanmean(o["edit_acc"][idx])) for o in outcomes]
        d = [float(np.nanmean(o["pass_before"][idx] - o["pass_after"][idx])) for o in outcomes]
        loc = [locality_of(o, idx) for o in outcomes]
        order = rank_sets(a, d, budget, loc, floor)
        pos = np.empty(len(order), int)
        pos[order] = np.arange(1, len(order) + 1)
        ea.append(a)
        dd.append(d)
        lo.append(loc)
        ranks.append(pos)
    ea, dd, lo, ranks = np.asarray(ea), np.asarray(dd), np.asarray(lo), np.asarray(ranks)
    q = lambda x: np.nanquantile(x, [0.025, 0.975], axis=0).T  # noqa: E731
    return {"edit_acc_ci": q(ea), "drawdown_ci": q(dd), "locality_ci": q(lo), "rank_ci": q(ranks),
            "p_first": (ranks == 1).mean(0)}


@dataclasses.dataclass(frozen=True)
class MendSweepResult:
    layer_sets: tuple[tuple[str, ...], ...]
    rows: tuple[dict, ...]  # per set: final metrics, curve, cost, intervals
    ranking: tuple[int, ...]  # indices into layer_sets, best first
    config: MendSweepConfig
    train_config: dict
    estimate_seconds: float
    wall_time: float
    skipped: tuple[tuple[str, ...], ...] = ()  # sets not started before stop_after_seconds

    def best(self) -> tuple[str, ...]:
        return self.layer_sets[self.ranking[0]]

    def position(self, layers: Sequence[str]) -> int | None:
        """1-based rank of a set, in any order (None if it was not swept)."""
        for p, i in enumerate(self.ranking, 1):
            if frozenset(self.layer_sets[i]) == frozenset(layers):
                return p
        return None

    def to_dict(self) -> dict:
        return jsonable({"layer_sets": self.layer_sets, "rows": self.rows, "ranking": self.ranking,
                         "ranked_sets": [self.layer_sets[i] for i in self.ranking], "config": dataclasses.asdict(self.config),
                         "train_config": self.train_config, "estimate_seconds": self.estimate_seconds,
                         "wall_time": self.wall_time, "skipped": self.skipped})


def read_curve(workdir: Path) -> list[dict]:
    """The validation records of a train_editor run (metrics.jsonl)."""
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    keys = ("step", "edit_acc", "fail_acc", "adapt_acc", "drawdown", "kl", "loss")
    return [{k: r.get(k) for k in keys} for r in recs if r.get("split") == "val"]


def mend_sweep(model, data: Mapping[str, EditData], layer_sets: Sequence[Sequence[str]], train_cfg: TrainConfig,
               workdir: str | Path, *, config: MendSweepConfig = MendSweepConfig(), mesh=None,
               progress: bool = False, say=print) -> MendSweepResult:
    """Train `train_cfg`'s editor on each set (module docstring) in workdir/<set name> (a killed
    sweep resumes: each set from its checkpoints) and rank the sets."""
    sets = check_layer_sets(model, layer_sets)
    for s in sets:
        if not model.layers.weights(list(s), part=config.part):
            raise ValueError(f"mend-sweep: layer set {s} lists no {config.part!r} weights")
    est = estimate_seconds(len(sets), train_cfg, config.seconds_per_step)
    if est > config.budget_seconds:
        raise ValueError(
            f"mend-sweep: {len(sets)} layer sets x {train_cfg.max_steps} steps x {config.seconds_per_step:g} s/step "
            f"= {est / 60:.0f} min estimated, over the budget of {config.budget_seconds / 60:.0f} min: sweep fewer sets "
            "(--layer-sets), fewer steps, or raise the budget (--budget-minutes)"
        )
    say(f"mend-sweep: {len(sets)} layer sets, estimated {est / 60:.1f} min "
        f"({train_cfg.max_steps} steps x {config.seconds_per_step:g} s/step each)")
    t0 = time.perf_counter()
    workdir = Path(workdir)
    rows, outs, done = [], [], []
    for s in sets:
        t = time.perf_counter()
        if rows and config.stop_after_seconds is not None:
            mean = sum(r["seconds"] for r in rows) / len(rows)
            if t - t0 + mean > config.stop_after_seconds:
                say(f"mend-sweep: stopping before {'+'.join(s)}: {(t - t0) / 60:.1f} min spent + {mean / 60:.1f} min per "
                    f"set > stop after {config.stop_after_seconds / 60:.1f} min; {len(sets) - len(rows)} set(s) skipped")
                break
        done.append(s)
        wd = workdir / set_name(s)
        res = train_editor(model, data, model.layers.weights(list(s), part=config.part), train_cfg, wd, mesh=mesh,
                           progress=progress)
        o = group_outcomes(model, res.spec, res.config, res.params, res.norm, data["val"], mesh=mesh,
                           projections=res.projections)
        outs.append(o)
        rows.append({
            "layers": list(s), "steps": res.step, "seconds": time.perf_counter() - t,
            "edit_acc": float(np.nanmean(o["edit_acc"])), "fail_acc": float(np.nanmean(o["fail_acc"])),
            "adapt_acc": float(np.nanmean(o["adapt_acc"])),
            "drawdown": float(np.nanmean(o["pass_before"] - o["pass_after"])), "kl": float(np.mean(o["kl"])),
            "locality": locality_of(o), "groups": len(o["edit_acc"]), "best_step": res.best_step, "last_val": res.last_val,
            "curve": read_curve(wd),
        })
        say(f"  {'+'.join(s)}: val EA {rows[-1]['edit_acc']:.3f} adapt {rows[-1]['adapt_acc']:.3f} "
            f"DD {rows[-1]['drawdown']:.3f} locality {rows[-1]['locality']:.3f} ({rows[-1]['seconds']:.0f} s)")
    order = rank_sets([r["edit_acc"] for r in rows], [r["drawdown"] for r in rows], config.drawdown_budget,
                      [r["locality"] for r in rows], config.locality_floor)
    boot = bootstrap(outs, config.drawdown_budget, config.n_boot, config.seed, config.locality_floor)
    for i, (r, o) in enumerate(zip(rows, outs)):
        r["rank"] = order.index(i) + 1
        r.update({k: v[i] for k, v in boot.items()})
        r["per_group"] = {k: v.tolist() for k, v in o.items()}  # to re-rank later without training
    return MendSweepResult(tuple(done), tuple(rows), tuple(order), config, train_cfg.to_dict(), est,
                           time.perf_counter() - t0, tuple(sets[len(done):]))
