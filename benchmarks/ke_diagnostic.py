"""Benchmark (a diagnosis, not a test): why KE's hyper-network barely edits the classifier.

    python benchmarks/ke_diagnostic.py --experiment fever_minilm --set finetuned=runs/minilm-fever \
        --workdir runs/ke-diag --runs 1e-4:100,1e-3:100,1e-2:100 --out runs/bench-ke-diag.json

On the classifier experiment's own edit set (experiments.classifier.classifier_edit_set) and the
weights KE edits there (the MLP of the last `fixed_layers` blocks), for the first --edits val edits:

1. at KE's initialisation (no training): the size of its update against the edited weights
   (||dW|| / ||W||, all edited weights together), its cosine with the descent direction -g
   (g = grad_W NLL(edit), the gradient KE gates), KE's per-element gate sigmoid(eta) |A|
   (A = softmax(alpha_row) alpha_col^T, salem_jax.baselines.ke.weight_delta), and the plain gradient
   step size s* that flips each edit (the smallest s of a geometric grid with W - s g predicting the
   desired label): KE makes an edit only once its gate on g reaches about s*;
2. for each LR:STEPS of --runs: KE trained as the experiment trains it (cfg.ke, with that Adam
   learning rate and number of steps), then the same statistics plus the experiment's EA / DD on
   the val edits (pipeline.evaluate_method, eval.max_edits / eval.max_pass as Table 3).
Adam moves a parameter by about lr per step at most, so `steps x lr` bounds how far the gate's
logits (softmax over m = 384 or 1536 rows, sigmoid(eta)) can move from initialisation.
Prints a table per run, writes JSON after every run (a stopped run keeps what finished).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `experiments` without installing

from salem_jax import pipeline as P  # noqa: E402
from salem_jax.baselines import ke as K  # noqa: E402
from salem_jax.baselines.meta_data import MetaData, encode_rows  # noqa: E402
from salem_jax.config import ke_config  # noqa: E402
from salem_jax.locate.profile import jsonable  # noqa: E402
from salem_jax.models.base import get_path, set_path  # noqa: E402

GRID = np.geomspace(1e-3, 1e4, 15)  # plain gradient step sizes tried per edit (2 per decade)


def edit_stats(model, ke_params, weights, rows, cfg_ke, grid_flip: bool) -> dict:
    """Per val edit: ||dW||/||W||, cos(dW, -g), median gate, flip before / after, s* (if grid_flip)."""
    apply = jax.jit(model.apply)
    base = model.params
    sub = {w.path: get_path(base, w.path) for w in weights}
    wnorm = float(np.sqrt(sum(float(jnp.sum(jnp.asarray(v, jnp.float32) ** 2)) for v in sub.values())))

    @jax.jit
    def one(kp, base, batch, ids, mask):
        g = K.edit_gradients(model.apply, base, weights, batch)
        c = K.condition_vector(kp, ids, mask)
        d = K.ke_deltas(kp, weights, ids, mask, g, cfg_ke.max_scale)
        gates, etas = [], []
        for w in weights:
            p = kp["weights"][K.weight_key(w.path)]
            gv = g[w.path]
            g_oi = gv.T if w.layout == "in_out" else gv
            m, n = g_oi.shape
            h = K._wn_apply(p["l2"], jnp.tanh(K._wn_apply(p["l1"], c)))
            col_a, row_a, _, _, eta = jnp.split(h, np.cumsum([n, m, n, m]))
            gate = cfg_ke.max_scale * jax.nn.sigmoid(eta[0]) * jnp.abs(jax.nn.softmax(row_a)[:, None] * col_a[None, :])
            gates.append(jnp.median(gate))
            etas.append(jax.nn.sigmoid(eta[0]))
        dv = jnp.concatenate([d[k].ravel().astype(jnp.float32) for k in sorted(d)])
        gv = jnp.concatenate([g[k].ravel().astype(jnp.float32) for k in sorted(d)])
        cos = -jnp.vdot(dv, gv) / (jnp.linalg.norm(dv) * jnp.linalg.norm(gv) + 1e-30)
        edited = base
        for k, v in d.items():
            edited = set_path(edited, k, get_path(base, k) + v)
        return dict(dnorm=jnp.linalg.norm(dv), gnorm=jnp.linalg.norm(gv), cos=cos, gate=jnp.stack(gates),
                    sig_eta=jnp.stack(etas), logits_after=model.apply(edited, batch)[:, 0]), g

    @jax.jit
    def step_logits(base, g, batch, s):
        p = base
        for k, v in g.items():
            p = set_path(p, k, get_path(base, k) - s * v)
        return model.apply(p, batch)[:, 0]

    conds = K.encode_conditions(model, K.condition_texts(model, rows), cfg_ke.cond_length)
    length = encode_rows(model, rows)["input_ids"].shape[1]  # one padded length: one compilation
    recs = []
    for i, r in enumerate(rows):
        batch = encode_rows(model, [r], length=length)
        want = int(r["label"])
        before = int(np.argmax(np.asarray(apply(base, batch)[:, 0])[0]))
        o, g = one(ke_params, base, batch, conds[0][i], conds[1][i])
        rec = dict(dW_over_W=float(o["dnorm"]) / wnorm, g_norm=float(o["gnorm"]), cos_dW_minus_g=float(o["cos"]),
                   gate_median=float(np.median(np.asarray(o["gate"]))), sigmoid_eta=float(np.mean(np.asarray(o["sig_eta"]))),
                   right_before=before == want, right_after=int(np.argmax(np.asarray(o["logits_after"])[0])) == want)
        if grid_flip:
            s_star = None
            for s in GRID:
                if int(np.argmax(np.asarray(step_logits(base, g, batch, float(s)))[0])) == want:
                    s_star = float(s)
                    break
            rec["s_star"] = s_star
        recs.append(rec)
    agg = {k: float(np.median([r[k] for r in recs])) for k in ("dW_over_W", "g_norm", "cos_dW_minus_g", "gate_median",
                                                                "sigmoid_eta")}
    agg["edit_acc"] = float(np.mean([r["right_after"] for r in recs]))
    agg["right_before"] = float(np.mean([r["right_before"] for r in recs]))
    if grid_flip:
        ss = [r["s_star"] for r in recs if r["s_star"] is not None]
        agg["s_star_median"] = float(np.median(ss)) if ss else None
        agg["s_star_found"] = len(ss)
        agg["dW_over_s_star_g"] = float(np.median([r["dW_over_W"] * wnorm / (r["s_star"] * r["g_norm"])
                                                   for r in recs if r["s_star"]])) if ss else None
    return dict(median=agg, n=len(recs), w_norm=wnorm, per_edit=recs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experiment", default="fever_minilm")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--runs", default="1e-4:100,1e-3:100,1e-2:100", help="LR:STEPS,... KE trainings to compare")
    ap.add_argument("--edits", type=int, default=48, help="val edits for the statistics (the first N fail rows)")
    ap.add_argument("--no-eval", action="store_true", help="skip the experiment's EA / DD evaluation per run")
    ap.add_argument("--workdir", default="runs/ke-diag")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    from experiments.classifier import classifier_edit_set
    from experiments.common import experiment_config

    cfg = experiment_config(args.experiment, args.quick, args.set)
    prep = classifier_edit_set(cfg, Path(args.workdir), print)
    model, train_rows, val_rows = prep["model"], prep["train_rows"], prep["val_rows"]
    layers = model.layers.names()[-cfg.fixed_layers:]
    weights = tuple(model.layers.weights(list(layers), part=cfg.saliency.part))
    kc0 = ke_config(cfg)
    vfail = [r for r in val_rows if r["group"] == "fail"][: args.edits]
    out = {"experiment": args.experiment, "overrides": args.set, "layers": list(layers), "ke_config": dataclasses.asdict(kc0),
           "n_edits": len(vfail), "grid": GRID.tolist(), "runs": []}

    def save():
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(jsonable(out), indent=2))

    t = time.perf_counter()
    init = edit_stats(model, K.init_ke(model, weights, kc0), weights, vfail, kc0, grid_flip=True)
    out["init"] = dict(init, seconds=time.perf_counter() - t)
    m = init["median"]
    print(f"KE at init ({len(vfail)} val edits; medians): ||dW||/||W|| {m['dW_over_W']:.2e}, cos(dW, -g) "
          f"{m['cos_dW_minus_g']:+.3f}, gate sigmoid(eta)|A| {m['gate_median']:.2e}, sigmoid(eta) {m['sigmoid_eta']:.3f}; "
          f"plain step s* that flips an edit {m['s_star_median']} ({m['s_star_found']} of {len(vfail)} flip within "
          f"s <= {GRID[-1]:g}); ||dW|| / ||s* g|| {m['dW_over_s_star_g']:.2e}; edits right before {m['right_before']:.3f}, "
          f"after KE-init {m['edit_acc']:.3f}")
    save()
    data = MetaData.from_rows(model, train_rows, seed=cfg.seed, loc_per_step=kc0.loc_per_step)
    for spec in args.runs.split(","):
        lr, steps = float(spec.split(":")[0]), int(spec.split(":")[1])
        kc = dataclasses.replace(kc0, lr=lr, steps=steps)
        t = time.perf_counter()
        res = K.train_ke(model, data, weights, kc, progress=False)
        train_s = time.perf_counter() - t
        st = edit_stats(model, res.params, weights, vfail, kc, grid_flip=False)
        run = dict(lr=lr, steps=steps, train_seconds=train_s, history=res.history, stats=st)
        if not args.no_eval:
            t = time.perf_counter()
            fn = K.ke_edit_fn(model, res)
            ev = P.evaluate_method(model, lambda rows: fn(rows), val_rows, [], cfg, f"ke lr {lr:g} x {steps}")
            run["eval"] = dict(ea=ev.get("ea"), dd_acc=ev.get("dd_acc"), seconds=time.perf_counter() - t)
        out["runs"].append(run)
        save()
        m = st["median"]
        h0, h1 = res.history[0], res.history[-1]
        print(f"lr {lr:g} x {steps} steps ({train_s:.0f} s): train loss edit {h0['edit']:.3f} -> {h1['edit']:.3f}, "
              f"loc {h0['loc']:.4f} -> {h1['loc']:.4f}; ||dW||/||W|| {m['dW_over_W']:.2e}, cos(dW, -g) "
              f"{m['cos_dW_minus_g']:+.3f}, gate {m['gate_median']:.2e}, sigmoid(eta) {m['sigmoid_eta']:.3f}, "
              f"val edits right {m['edit_acc']:.3f}"
              + (f"; experiment EA val {run['eval']['ea']:.3f} DD val {run['eval']['dd_acc']:.3f}" if "eval" in run else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
