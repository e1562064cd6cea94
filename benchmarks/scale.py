"""Benchmark: speed and memory of saliency, editor training and editing, and how they scale.

    python benchmarks/scale.py --out runs/bench-scale.json           # SmolLM2-135M + scaling sweep
    python benchmarks/scale.py --quick --out runs/bench-scale-quick.json   # tiny models, a minute

Measured on the devices of this process (set XLA_FLAGS / run on an accelerator to change them):

1. On a real model (default SmolLM2-135M, the MLP of its middle layer, MEND's default editor):
   - editor training throughput: edits per second of the jitted training step (after compile);
   - edit latency: milliseconds to apply an editor (identity-initialised: the cost does not depend
     on its values) to 1 and to 10 requests, including tokenisation and the gradient pass that
     produces u and delta (`mend.apply.apply_edits`, batch mode); median of --repeats calls;
   - saliency: seconds per micro-batch of the streaming pass (`saliency.saliency_stats`);
   - peak memory of the saliency step, the editor step and the edit, from XLA's compiled
     `memory_analysis()`: arguments + outputs + temporaries - donated (aliased) bytes, per device.
     This is what XLA plans to allocate, not the process RSS (which adds the Python heap, the
     host copy of the checkpoint and allocator slack), and is the number that matters on a TPU.
2. Scaling: random Llama configs (salem_jax.models.llama), varying one of layers, width and
   sequence length at a time from tiny to SmolLM2's sizes; for each, the run time of a saliency
   micro-batch and of an editor step, with the fitted exponent of time ~ factor^k.
3. For every measurement the first call (trace + compile + run) against the steady-state run.

Prints tables, writes JSON to --out, and checks the targets of issue 7 (on a 2-core CPU with
SmolLM2: an edit under 1 s including its gradient pass; an editor step's peak memory under 4x
the parameter bytes).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from salem_jax import parallel, saliency
from salem_jax.mend.apply import TrainedEditor, edited_kernels, apply_edits, encode_requests
from salem_jax.mend.editor import EditorConfig, EditorSpec
from salem_jax.mend.train import TrainConfig, init_train_state, prepare_splits, train_batch, train_step
from salem_jax.models import llama

FACTS = [  # (country, capital): prompts for a realistic edit set; the values do not change costs
    ("France", "Paris"), ("Peru", "Lima"), ("Kenya", "Nairobi"), ("Japan", "Tokyo"), ("Chile", "Santiago"),
    ("Egypt", "Cairo"), ("Canada", "Ottawa"), ("Norway", "Oslo"), ("Ghana", "Accra"), ("Nepal", "Kathmandu"),
    ("Cuba", "Havana"), ("Iran", "Tehran"), ("Mali", "Bamako"), ("Laos", "Vientiane"), ("Chad", "N'Djamena"),
    ("Fiji", "Suva"),
]


# ----------------------------------------------------------------------------- helpers


def _block(x):
    return jax.block_until_ready(x)


def timed(fn, repeats: int) -> dict:
    """First call (compile + run) and the median of `repeats` further calls, in seconds."""
    t0 = time.perf_counter()
    _block(fn())
    first = time.perf_counter() - t0
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        _block(fn())
        runs.append(time.perf_counter() - t0)
    run = statistics.median(runs)
    return {"first_s": first, "run_s": run, "compile_s": max(first - run, 0.0), "runs_s": runs}


def memory(lowered) -> dict:
    """XLA's planned bytes per device for a lowered computation."""
    m = lowered.compile().memory_analysis()
    if m is None:
        return {}
    peak = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    return {
        "arguments": int(m.argument_size_in_bytes),
        "outputs": int(m.output_size_in_bytes),
        "temp": int(m.temp_size_in_bytes),
        "aliased": int(m.alias_size_in_bytes),
        "peak": int(peak),
    }


def param_bytes(params) -> int:
    return int(sum(x.nbytes for x in jax.tree.leaves(params)))


def fact_rows(n: int) -> list[dict]:
    """Edit-set rows (fail / adapt / pass) for n facts."""
    rows = []
    for i, (c, cap) in enumerate((FACTS * (1 + n // len(FACTS)))[:n]):
        rid = f"f{i}"
        common = dict(record_id=rid, target=" " + cap, label=-1, text_pair="")
        rows.append(dict(id=f"{rid}:fail", group="fail", prompt=f"The capital of {c} is", **common))
        rows.append(dict(id=f"{rid}:a0", group="adapt", prompt=f"{c}'s capital city is", **common))
        rows.append(dict(id=f"{rid}:a1", group="adapt", prompt=f"The seat of government of {c} is", **common))
        rows.append(dict(id=f"p{i}", record_id=f"p{i}", group="pass", prompt=f"{c} is a country in the region of",
                         target=" the", label=-1, text_pair=""))
    return rows


def random_batch(rng: np.random.Generator, rows: int, seq: int, vocab: int, targets: int = 2) -> dict:
    """A causal-LM batch of random tokens whose last `targets` positions are the targets."""
    ids = rng.integers(4, vocab, size=(rows, seq + 1)).astype(np.int32)
    mask = np.zeros((rows, seq), np.int32)
    mask[:, seq - targets :] = 1
    return {"input_ids": ids[:, :-1], "attention_mask": np.ones((rows, seq), np.int32),
            "labels": ids[:, 1:], "label_mask": mask}


def _stack(batches: list[dict]) -> dict:
    return {k: np.stack([b[k] for b in batches], 1) for k in batches[0]}


# ----------------------------------------------------------------------------- one model, one layer


def saliency_cost(model, params, batch: dict, micro_batch: int, repeats: int) -> dict:
    """Time and planned memory of the streaming saliency pass over `batch` (one micro-batch)."""
    out = timed(lambda: saliency.saliency_stats(model, params, batch, micro_batch=micro_batch).per_example, repeats)
    lowered = saliency.lower_step(model, params, {k: np.asarray(v) for k, v in batch.items()}, groups=1)
    out["memory"] = memory(lowered)
    return out


def editor_step_cost(model, params, spec: EditorSpec, cfg: TrainConfig, batch: dict, repeats: int) -> dict:
    """Time and planned memory of the jitted editor training step (one device)."""
    mesh = parallel.data_mesh(jax.devices()[:1])
    cfg = cfg.resolved(1)
    base = parallel.replicate(params, mesh)
    gb = parallel.shard_batch(batch, mesh)
    kw = dict(apply_fn=model.apply, spec=spec, cfg=cfg.step_config(), mesh=mesh)
    holder = {"state": parallel.replicate(init_train_state(spec, cfg), mesh)}
    lowered = train_step.lower(holder["state"], base, gb, **kw)

    def step():
        holder["state"], m = train_step(holder["state"], base, gb, **kw)
        return m

    out = timed(step, repeats)
    out["memory"] = memory(lowered)
    groups = batch["weight"].shape[0]
    out["edits_per_s"] = groups * cfg.edits_per_group / out["run_s"]
    return out


def edit_cost(model, params, spec: EditorSpec, n_requests: int, repeats: int) -> dict:
    """Latency of applying an (identity-initialised) editor to n requests, gradient pass included."""
    st = init_train_state(spec, TrainConfig(editor=spec.config))
    ed = TrainedEditor(spec=spec, params=st["params"], state=st["norm"], model_name=model.name, step=0)
    reqs = [(f"The capital of {c} is", " " + cap) for c, cap in (FACTS * 2)[:n_requests]]
    out = timed(lambda: [saliency.get_path(p, w.path) for p in [apply_edits(model, ed, reqs, params=params, progress=False)]
                         for w in spec.weights], repeats)
    lowered = edited_kernels.lower(ed.params, ed.state, params, {k: jnp.asarray(v) for k, v in encode_requests(model, reqs).items()},
                                    apply_fn=model.apply, spec=spec)
    out["memory"] = memory(lowered)
    return out


def sharded_memory(model, spec: EditorSpec, cfg: TrainConfig, batch: dict, sal_batch: dict, mesh_shape: str, micro_batch: int) -> dict:
    """Per-device planned memory on a (data, model) mesh: compile only (timings on simulated
    devices would mean nothing). Needs data x model devices (XLA_FLAGS on a CPU)."""
    from salem_jax import sharding
    from salem_jax.mend.train import place_base_params, place_state, sharded_train_step

    d, m = (int(x) for x in mesh_shape.lower().split("x"))
    if len(jax.devices()) < d * m:
        raise SystemExit(f"--mesh {mesh_shape} needs {d * m} devices, have {len(jax.devices())}; on a CPU run with "
                         f"XLA_FLAGS=--xla_force_host_platform_device_count={d * m}")
    mesh = sharding.make_mesh(d, m, jax.devices()[: d * m])
    base = place_base_params(model, model.params, mesh)
    info = sharding.describe(base)
    out = {"mesh": {"data": d, "model": m}, "param_bytes_total": info.total_bytes,
           "param_bytes_per_device": info.max_device_bytes, "replicated_leaves": len(info.replicated)}
    cfg = dataclasses.replace(cfg, batch_size=max(cfg.batch_size or 1, d)).resolved(d)
    batch = train_batch_for(batch, cfg.batch_size)
    state = place_state(init_train_state(spec, cfg), mesh)
    print(f"  lowering the sharded editor step on {d}x{m} ...", flush=True)
    out["editor_step"] = memory(sharded_train_step.lower(state, base, parallel.shard_batch(batch, mesh), apply_fn=model.apply,
                                                         spec=spec, cfg=cfg.step_config(), mesh=mesh))
    out["editor_step"]["groups"] = cfg.batch_size
    print(f"  lowering the sharded saliency step on {d}x{m} ...", flush=True)
    out["saliency"] = memory(saliency.lower_step(model, base, sal_batch, groups=3))
    st = init_train_state(spec, cfg)
    reqs = encode_requests(model, [(f"The capital of {c} is", " " + cap) for c, cap in FACTS[:1]])
    out["edit_1"] = memory(edited_kernels.lower(st["params"], st["norm"], base, {k: jnp.asarray(v) for k, v in reqs.items()},
                                                 apply_fn=model.apply, spec=spec))
    return out


def train_batch_for(batch: dict, groups: int) -> dict:
    """`batch` (train_batch layout, G groups) repeated or cut to `groups` groups."""
    g = batch["weight"].shape[0]
    idx = np.arange(groups) % g
    return jax.tree.map(lambda x: np.asarray(x)[idx], batch)


def real_model_bench(args) -> dict:
    from salem_jax.models import load_model

    t0 = time.perf_counter()
    model = llama.tiny_llama(hidden_size=64, intermediate_size=256) if args.quick else load_model(args.model)
    load_s = time.perf_counter() - t0
    params = model.params
    layer = model.layers.names()[len(model.layers.names()) // 2] if args.layer is None else args.layer
    ecfg = EditorConfig(rank=32) if args.quick else EditorConfig()
    spec = EditorSpec.from_params(model.layers.weights([layer]), params, ecfg)
    pbytes = param_bytes(params)
    print(f"{model.name}: {pbytes / 2**20:.0f} MiB of parameters, editing {layer} ({len(spec.weights)} MLP kernels); "
          f"loaded in {load_s:.1f}s", flush=True)

    data = prepare_splits(model, {"train": fact_rows(max(args.groups * 2, 8))})["train"]
    cfg = TrainConfig(editor=ecfg, batch_size=args.groups, adapt_per_edit=2, pass_per_group=1, effective_batch=1)
    batch = train_batch(data, cfg.resolved(1), 0)
    seq = int(batch["edit"]["input_ids"].shape[-1])

    res = {"model": model.name, "layer": layer, "param_bytes": pbytes, "load_s": load_s, "seq_len": seq,
           "groups_per_step": args.groups}
    print("editor step ...", flush=True)
    res["editor_step"] = editor_step_cost(model, params, spec, cfg, batch, args.repeats)
    print("edit latency ...", flush=True)
    res["edit_1"] = edit_cost(model, params, spec, 1, args.repeats)
    res["edit_10"] = edit_cost(model, params, spec, 10, args.repeats)
    print("saliency ...", flush=True)
    sal_batch = {k: v[: args.micro_batch] for k, v in
                 encode_requests(model, [(f"The capital of {c} is", " " + cap) for c, cap in FACTS]).items()}
    res["saliency"] = saliency_cost(model, params, sal_batch, args.micro_batch, args.repeats)
    if args.mesh:
        print(f"sharded memory on a {args.mesh} mesh ...", flush=True)
        res["sharded"] = sharded_memory(model, spec, cfg, batch, sal_batch, args.mesh, args.micro_batch)
    res["targets"] = {
        "edit_under_1s": res["edit_1"]["run_s"] < 1.0,
        "editor_step_peak_under_4x_params": res["editor_step"]["memory"].get("peak", float("inf")) < 4 * pbytes,
    }
    return res


# ----------------------------------------------------------------------------- scaling sweep


def sweep_configs(quick: bool) -> dict[str, list[dict]]:
    """One factor at a time from a base config (tiny -> small -> SmolLM2 sizes)."""
    if quick:
        base = dict(layers=2, width=64, seq=16)
        grid = {"layers": [1, 2, 4], "width": [32, 64, 128], "seq": [8, 16, 32]}
    else:
        base = dict(layers=4, width=192, seq=32)
        grid = {"layers": [2, 6, 18], "width": [64, 192, 576], "seq": [16, 64, 256]}
    return {f: [{**base, f: v} for v in vals] for f, vals in grid.items()}


def llama_of(layers: int, width: int, vocab: int = 4096):
    """A random Llama shaped like SmolLM2 (head_dim 64 where it fits, MLP 8/3 x width, GQA 3:1)."""
    from transformers import LlamaConfig

    from salem_jax.testing import tiny_tokenizer

    heads = max(width // 64, 1)
    kv = 3 if heads % 3 == 0 else 1  # kv heads must divide the heads
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=(8 * width // 3) // 8 * 8,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                      max_position_embeddings=1024, rope_theta=1e5, tie_word_embeddings=True)
    return llama.from_params(f"llama-{layers}x{width}", cfg, llama.init_params(cfg), tiny_tokenizer())


def scaling_bench(args) -> dict:
    out: dict = {}
    rng = np.random.default_rng(0)
    for factor, configs in sweep_configs(args.quick).items():
        rows = []
        for c in configs:
            model = llama_of(c["layers"], c["width"])
            vocab = model.config.vocab_size
            last = model.layers.names()[-1]
            spec = EditorSpec.from_params(model.layers.weights([last]), model.params, EditorConfig(rank=min(1920, 4 * c["width"])))
            sal = saliency_cost(model, model.params, random_batch(rng, args.micro_batch, c["seq"], vocab), args.micro_batch, 2)
            one = lambda: random_batch(rng, 1, c["seq"], vocab)  # noqa: E731
            batch = {"fail": _stack([one()]), "edit": _stack([one(), one()]), "pass": _stack([one()]), "weight": np.ones(1, np.float32)}
            cfg = TrainConfig(editor=spec.config, batch_size=1, adapt_per_edit=1, pass_per_group=1, effective_batch=1)
            step = editor_step_cost(model, model.params, spec, cfg, batch, 2)
            row = {**c, "params": int(sum(x.size for x in jax.tree.leaves(model.params))),
                   "saliency_run_s": sal["run_s"], "saliency_compile_s": sal["compile_s"], "saliency_peak": sal["memory"].get("peak"),
                   "step_run_s": step["run_s"], "step_compile_s": step["compile_s"], "step_peak": step["memory"].get("peak")}
            print(f"  {factor}={c[factor]}: saliency {row['saliency_run_s'] * 1e3:.1f} ms (compile {row['saliency_compile_s']:.1f}s), "
                  f"editor step {row['step_run_s'] * 1e3:.1f} ms (compile {row['step_compile_s']:.1f}s)", flush=True)
            rows.append(row)
        x = np.log([r[factor] for r in rows])
        fit = {k: float(np.polyfit(x, np.log([r[k] for r in rows]), 1)[0]) for k in ("saliency_run_s", "step_run_s", "saliency_peak", "step_peak")}
        out[factor] = {"rows": rows, "exponent": fit}
    return out


# ----------------------------------------------------------------------------- report


def print_report(rep: dict) -> None:
    mib = 2**20
    if "real" in rep:
        r = rep["real"]
        pb = r["param_bytes"]
        print(f"\n{r['model']} (layer {r['layer']}, {pb / mib:.0f} MiB parameters, {rep['devices']} x {rep['platform']})")
        print(f"{'measurement':28s} {'run ms':>9s} {'first s':>8s} {'compile s':>9s} {'peak MiB':>9s} {'x params':>8s}")
        for key, label in (("editor_step", f"editor step ({r['groups_per_step']} group)"), ("edit_1", "edit, 1 request"),
                           ("edit_10", "edit, 10 requests"), ("saliency", "saliency micro-batch")):
            m = r[key]
            peak = m["memory"].get("peak", float("nan"))
            print(f"{label:28s} {m['run_s'] * 1e3:9.1f} {m['first_s']:8.1f} {m['compile_s']:9.1f} {peak / mib:9.0f} {peak / pb:8.2f}")
        print(f"editor training throughput: {r['editor_step']['edits_per_s']:.2f} edits/s")
        if "sharded" in r:
            sh = r["sharded"]
            n = sh["mesh"]["data"] * sh["mesh"]["model"]
            print(f"\nper device on a {sh['mesh']['data']}x{sh['mesh']['model']} mesh (planned by XLA): parameters "
                  f"{sh['param_bytes_per_device'] / mib:.0f} MiB of {sh['param_bytes_total'] / mib:.0f} (ideal {sh['param_bytes_total'] / n / mib:.0f})")
            for key, label in (("editor_step", f"editor step ({sh['editor_step']['groups']} groups)"), ("saliency", "saliency micro-batch"),
                               ("edit_1", "edit, 1 request")):
                peak = sh[key].get("peak", float("nan"))
                print(f"  {label:26s} peak {peak / mib:8.0f} MiB per device = {peak / pb:.2f} x all parameter bytes")
        for k, v in r["targets"].items():
            print(f"target {k}: {'met' if v else 'NOT met'}")
    if "scaling" in rep:
        print(f"\n{'factor':8s} {'value':>6s} {'params':>11s} {'saliency ms':>11s} {'step ms':>9s} {'sal. compile s':>14s} {'step compile s':>14s}")
        for factor, d in rep["scaling"].items():
            for row in d["rows"]:
                print(f"{factor:8s} {row[factor]:6d} {row['params']:11,d} {row['saliency_run_s'] * 1e3:11.1f} {row['step_run_s'] * 1e3:9.1f} "
                      f"{row['saliency_compile_s']:14.1f} {row['step_compile_s']:14.1f}")
            e = d["exponent"]
            print(f"{factor:8s} time ~ {factor}^k: saliency k={e['saliency_run_s']:.2f}, editor step k={e['step_run_s']:.2f}; "
                  f"planned memory k={e['saliency_peak']:.2f} / {e['step_peak']:.2f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="model name or path for the real-model part")
    ap.add_argument("--layer", default=None, help="layer whose MLP is edited (default: the middle one)")
    ap.add_argument("--groups", type=int, default=1, help="edit groups per editor step")
    ap.add_argument("--micro-batch", type=int, default=8, help="saliency micro-batch (rows)")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls after the first")
    ap.add_argument("--quick", action="store_true", help="tiny models only (a smoke run)")
    ap.add_argument("--mesh", default=None, help="also plan per-device memory with sharded parameters on a DATAxMODEL "
                    "mesh, e.g. 2x4 (on a CPU set XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    ap.add_argument("--skip-real", action="store_true")
    ap.add_argument("--skip-scaling", action="store_true")
    ap.add_argument("--out", default="runs/bench-scale.json")
    args = ap.parse_args(argv)

    rep = {"platform": jax.devices()[0].platform, "devices": len(jax.devices()), "jax": jax.__version__,
           "cpu": platform.processor() or platform.machine(), "args": vars(args)}
    t0 = time.perf_counter()
    if not args.skip_real:
        rep["real"] = real_model_bench(args)
    if not args.skip_scaling:
        print("scaling sweep ...", flush=True)
        rep["scaling"] = scaling_bench(args)
    rep["wall_s"] = time.perf_counter() - t0
    print_report(rep)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rep, indent=2, default=float))
    print(f"\nwrote {out} ({rep['wall_s']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
