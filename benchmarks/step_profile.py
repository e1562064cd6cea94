"""Where the editor's training step does its arithmetic: XLA's cost analysis of each part, running
every block and from the first edited block (mend.train `FromBlockPlan`).

    python benchmarks/step_profile.py --layers layers.0 layers.15 layers.26 layers.27-29
    python benchmarks/step_profile.py --quick                   # a tiny random Llama

Parts (one group: 1 fail + 2 rephrase + 1 pass row, as benchmarks/vs_pytorch.py), each lowered
on its own and costed by `Lowered.cost_analysis()` (XLA's HLO cost model, before compilation: no
compile, no timing - FLOPs and bytes are what the program asks for, independent of load):

  block inputs   the base model to the last skipped block on the edit + pass rows (from-block
                 step with the hidden states computed in the step; 0 when they are kept)
  capture        forward + backward to the edited layer on the fail rows (u, delta)
  base pass      the base model's logits on the pass rows (the KL's targets)
  loss fwd+bwd   the edited model on edit + pass rows and its backward to the editor's params
                 (editor network included)
  optimizer      clip + Adam over the editor's parameters
  whole step     `train_step` as jitted (XLA fuses across parts, so it is not the exact sum)

Writes JSON (--out) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

from salem_jax import sharding
from salem_jax.mend.editor import EditorConfig, EditorSpec, update_norm_state
from salem_jax.mend.train import (
    TrainConfig,
    _base_logits,
    _group_outputs,
    _with_block_inputs,
    from_block_plan,
    group_factors,
    init_train_state,
    optimizer_update,
    place_base_params,
    place_state,
    prepare_splits,
    train_batch,
    train_step,
    with_block_inputs,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale import fact_rows  # noqa: E402
from vs_pytorch import _layer_list  # noqa: E402


def _cost(lowered) -> dict:
    ca = lowered.cost_analysis()
    ca = ca[0] if isinstance(ca, list) else ca
    return {"gflop": float(ca.get("flops", 0.0)) / 1e9, "gbytes": float(ca.get("bytes accessed", 0.0)) / 1e9}


def profile(model, layers: list[str], quick: bool) -> dict:
    ecfg = EditorConfig(rank=32) if quick else EditorConfig()
    spec = EditorSpec.from_params(model.layers.weights(layers), model.params, ecfg)
    cfg = TrainConfig(editor=ecfg, batch_size=1, adapt_per_edit=2, pass_per_group=1, effective_batch=1).resolved(1)
    data = prepare_splits(model, {"train": fact_rows(16)})["train"]
    mesh = sharding.make_mesh(1, 1, jax.devices()[:1])
    base = place_base_params(model, model.params, mesh)
    state = place_state(jax.device_get(init_train_state(spec, cfg)), mesh)
    plan, why = from_block_plan(model, spec, data)
    apply = model.apply
    out = {"from_block": {"start": plan.start, "n_blocks": plan.n_blocks} if plan else {"why_not": why}}
    variants = [("every block", None, data)]
    if plan is not None:
        variants += [("from block, inputs in the step", plan, data), ("from block, inputs kept", plan, with_block_inputs(plan, base, data))]
    for name, p, d in variants:
        batch = sharding.shard_batch(train_batch(d, cfg, 0), mesh)
        parts = {}
        parts["block inputs"] = _cost(jax.jit(lambda b, p=p: _with_block_inputs(p, apply, base, b)[0]).lower(batch)) \
            if p is not None and "block_input" not in d.fail else {"gflop": 0.0, "gbytes": 0.0}
        b2, fn = _with_block_inputs(p, apply, base, batch)
        b2 = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), b2)  # abstract: lowering only
        parts["capture"] = _cost(jax.jit(lambda b, fn=fn: group_factors(fn, spec, base, b["fail"])).lower(b2))
        parts["base pass"] = _cost(jax.jit(lambda b, fn=fn: _base_logits(fn, base, b["pass"])).lower(b2))
        factors = jax.eval_shape(lambda b, fn=fn: group_factors(fn, spec, base, b["fail"]), b2)
        base_pass = jax.eval_shape(lambda b, fn=fn: _base_logits(fn, base, b["pass"]), b2)

        def loss(params, norm, f, b, bl, fn=fn):
            group = jax.vmap(lambda f, e, q, bl: _group_outputs(fn, spec, cfg, params, norm, base, f, e, q, bl))
            return group(f, b["edit"], b["pass"], bl)[0].mean()

        norm = jax.eval_shape(lambda s, f: update_norm_state(spec, s, f), state["norm"], factors)
        parts["loss fwd+bwd"] = _cost(jax.jit(jax.value_and_grad(loss)).lower(state["params"], norm, factors, b2, base_pass))
        parts["optimizer"] = _cost(jax.jit(lambda prm, g, o: optimizer_update(cfg, prm, g, o)).lower(
            state["params"], jax.tree.map(jnp.zeros_like, state["params"]), state["opt_state"]))
        parts["whole step"] = _cost(train_step.lower(state, base, batch, apply_fn=apply, spec=spec, cfg=cfg.step_config(), mesh=mesh,
                                                     from_block=p))
        out[name] = parts
        print(f"  {name}: " + ", ".join(f"{k} {v['gflop']:.2f} GFLOP" for k, v in parts.items()), flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layers", nargs="+", default=["layers.0", "layers.15", "layers.26", "layers.27-29"])
    ap.add_argument("--quick", action="store_true", help="a tiny random Llama (smoke run)")
    ap.add_argument("--out", default="runs/bench-step-profile.json")
    args = ap.parse_args(argv)
    from salem_jax.models import llama, load_model

    model = llama.tiny_llama(hidden_size=64, intermediate_size=256, num_hidden_layers=4) if args.quick else load_model(args.model)
    rep = {"model": model.name, "load_average": [round(x, 2) for x in os.getloadavg()], "layers": {}}
    for s in args.layers:
        layers = _layer_list(s)
        if args.quick:
            layers = list(dict.fromkeys(f"layers.{min(int(x.split('.')[-1]), 3)}" for x in layers))
        print(f"{s} ...", flush=True)
        rep["layers"][s] = profile(model, layers, args.quick)
    print(f"\n{'layers':14s} {'variant':32s} " + " ".join(f"{k:>14s}" for k in next(iter(
        v for v in rep["layers"][args.layers[0]].values() if isinstance(v, dict) and "capture" in v))))
    for s, r in rep["layers"].items():
        for name, parts in r.items():
            if isinstance(parts, dict) and "capture" in parts:
                print(f"{s:14s} {name:32s} " + " ".join(f"{v['gflop']:9.2f} GFLOP" for v in parts.values()))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rep, indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
