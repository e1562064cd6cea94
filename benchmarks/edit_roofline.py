"""Benchmark: how far applying an edit is from what this machine's memory and arithmetic allow.

    python benchmarks/edit_roofline.py --out runs/bench-edit-roofline.json        # SmolLM2, layers.0 / 15 / 27-29
    python benchmarks/edit_roofline.py --layers layers.15 --edits 1                # one layer set, one size
    python benchmarks/edit_roofline.py --quick                                     # tiny model, a smoke run

Why: issue 14 asks for one edit in <= 0.10 s and >= 3x faster than an eager PyTorch reference
(`benchmarks/vs_pytorch.py`). An edit of one short request is a forward pass through every block
and a backward pass down to the edited block at a handful of tokens: each weight is used for a
few rows only, so the time goes to reading the weights, not to arithmetic, and an eager
reference reads the same weights. This benchmark puts numbers on that, in one run:

  machine  the read bandwidth (GB/s: a jitted sum over every parameter of the model, i.e. the
           weights streamed once) and the matmul throughput (GFLOP/s: a jitted float32 matmul
           of --matmul x --matmul x --matmul), each the median of --repeats calls after a warm-up;
  program for the edit of 1 and of 10 requests ("The capital of X is" -> " Y", batch mode:
           `mend.apply.edited_kernels`, the program `apply_edits` runs), XLA's own cost analysis
           of the compiled program: floating-point operations and bytes accessed;
  time     the median of --repeats calls of `apply_edits` after a warm-up, as vs_pytorch.py
           times it (the edited kernels ready);
  floor    max(bytes / bandwidth, flops / throughput): the time the program would take if it
           ran at the probes' speeds; `time / floor` says how much is left to gain from the
           same program (1.0 = at the probes' limit; below 1 is possible where XLA's byte count
           includes reads served from cache).

The editor is MEND's (rank 1920, combined u|delta input) at its initial values: the cost does not
depend on the editor's values. Prints a table and writes JSON with the hardware and the load.
Timings on a shared machine compare only within one run: the probes and the edits run here one
after the other.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from salem_jax import sharding
from salem_jax.compile_cache import add_flag, enable_compile_cache
from salem_jax.mend.apply import TrainedEditor, apply_edits, edited_kernels, encode_requests, fit_to
from salem_jax.mend.editor import EditorConfig, EditorSpec, init_editor
from salem_jax.mend.train import capture_factors

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale import FACTS  # noqa: E402  (sibling scripts, not a package)
from vs_pytorch import _layer_list, _median_after_warmup  # noqa: E402


def _median(fn, repeats: int) -> float:
    """Median seconds of `repeats` calls after one warm-up call (vs_pytorch.py's timing)."""
    return _median_after_warmup(fn, repeats)[1]


def _cost(compiled) -> tuple[float, float]:
    """(flops, bytes accessed) of a compiled program from XLA's cost analysis."""
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, list) else ca
    return float(ca.get("flops", 0.0)), float(ca.get("bytes accessed", 0.0))


def machine_probes(params, matmul: int, repeats: int) -> dict:
    """Read bandwidth over the model's own parameters and float32 matmul throughput."""
    leaves = jax.tree.leaves(params)
    nbytes = float(sum(x.size * x.dtype.itemsize for x in leaves))
    read_all = jax.jit(lambda p: sum(jnp.sum(x.astype(jnp.float32)) for x in jax.tree.leaves(p)))
    t_read = _median(lambda: jax.block_until_ready(read_all(params)), repeats)
    k = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(k[0], (matmul, matmul), jnp.float32)
    b = jax.random.normal(k[1], (matmul, matmul), jnp.float32)
    mm = jax.jit(jnp.matmul)
    t_mm = _median(lambda: jax.block_until_ready(mm(a, b)), repeats)
    return {"param_bytes": nbytes, "read_s": t_read, "read_gb_s": nbytes / t_read / 1e9,
            "matmul_n": matmul, "matmul_s": t_mm, "matmul_gflop_s": 2.0 * matmul ** 3 / t_mm / 1e9}


def edit_costs(model, layers: list[str], n_edits: tuple[int, ...], probes: dict, repeats: int, rank: int | None) -> dict:
    """For each number of requests: XLA's flops and bytes of the edit program, its measured time
    through `apply_edits`, and the floor from the probes."""
    ecfg = EditorConfig(rank=rank) if rank else EditorConfig()
    spec = EditorSpec.from_params(model.layers.weights(layers), model.params, ecfg)
    ep, es = init_editor(spec, jax.random.PRNGKey(0))
    ed = TrainedEditor(spec=spec, params=ep, state=es, model_name=model.name, step=0)
    out = {}
    for n in n_edits:
        reqs = [(f"The capital of {c} is", " " + cap) for c, cap in (FACTS * (n // len(FACTS) + 1))[:n]]
        batch = fit_to(encode_requests(model, reqs), None)  # as `apply_edits` runs it: the LM head at the targets only
        flops, nbytes = _cost(edited_kernels.lower(ep, es, model.params, batch, None, apply_fn=model.apply,
                                                   spec=spec).compile())
        # its gradient pass alone (forward through every block, backward down to the edited one):
        # the rest of the program is the editor's MLP and the kernel update
        c_flops, c_bytes = _cost(jax.jit(lambda p, b: capture_factors(model.apply, p, b, spec.weights))
                                 .lower(model.params, batch).compile())

        def run(reqs=reqs):
            new = apply_edits(model, ed, reqs, params=model.params, progress=False)
            return jax.block_until_ready([sharding.get_path(new, w.path) for w in spec.weights])

        t = _median(run, repeats)
        t_bytes, t_flops = nbytes / (probes["read_gb_s"] * 1e9), flops / (probes["matmul_gflop_s"] * 1e9)
        floor = max(t_bytes, t_flops)
        out[f"edit_{n}"] = {"rows_x_tokens": list(np.shape(batch["input_ids"])), "gflop": flops / 1e9,
                            "gbytes": nbytes / 1e9, "capture_gflop": c_flops / 1e9,
                            "capture_gbytes": c_bytes / 1e9, "time_s": t, "floor_bytes_s": t_bytes, "floor_flops_s": t_flops,
                            "floor_s": floor, "bound": "memory" if t_bytes >= t_flops else "compute",
                            "time_over_floor": t / floor}
        print(f"  {'+'.join(layers)} edit x{n} ({'x'.join(map(str, np.shape(batch['input_ids'])))} tokens): "
              f"{flops / 1e9:.2f} GFLOP, {nbytes / 1e9:.3f} GB (gradient pass {c_flops / 1e9:.2f} GFLOP, "
              f"{c_bytes / 1e9:.3f} GB) -> floor {floor * 1e3:.1f} ms "
              f"({out[f'edit_{n}']['bound']}-bound; bytes {t_bytes * 1e3:.1f} ms, flops {t_flops * 1e3:.1f} ms); "
              f"measured {t * 1e3:.1f} ms = {t / floor:.2f}x the floor", flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layers", nargs="+", default=None,
                    help="layer sets, e.g. layers.0 layers.15 layers.27-29 (the default; --quick: layers.1)")
    ap.add_argument("--edits", default="1,10", help="numbers of requests per edit call (comma-separated)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--matmul", type=int, default=1024, help="size of the matmul throughput probe")
    ap.add_argument("--quick", action="store_true", help="a tiny random Llama and a small editor (smoke run)")
    ap.add_argument("--out", default=None, help="JSON file for the figures")
    add_flag(ap)
    args = ap.parse_args(argv)
    try:
        n_edits = tuple(int(x) for x in args.edits.split(",") if x.strip())
    except ValueError:
        raise SystemExit(f"--edits {args.edits!r}: give numbers of requests, e.g. 1,10") from None
    if not n_edits or min(n_edits) < 1:
        raise SystemExit(f"--edits {args.edits!r}: give numbers of requests >= 1, e.g. 1,10")
    if args.repeats < 1:
        raise SystemExit(f"--repeats {args.repeats}: give at least 1")
    enable_compile_cache(enabled=not args.no_compile_cache)

    from salem_jax.models import llama, load_model

    t0 = time.perf_counter()
    model = llama.tiny_llama(hidden_size=64, intermediate_size=256) if args.quick else load_model(args.model)
    sets = [_layer_list(s) for s in (args.layers or (["layers.1"] if args.quick else ["layers.0", "layers.15", "layers.27-29"]))]
    known = set(model.layers.names())
    for s in sets:
        missing = [x for x in s if x not in known]
        if missing:
            raise SystemExit(f"--layers: {model.name} has no {', '.join(missing)} (it has {sorted(known)[0]} ... "
                             f"{sorted(known)[-1]})")
    print(f"{model.name} loaded in {time.perf_counter() - t0:.0f}s", flush=True)
    rep = {"model": model.name, "platform": platform.platform(), "processor": platform.processor(),
           "cpus": os.cpu_count(), "devices": [str(d) for d in jax.devices()], "jax": jax.__version__,
           "load_average_start": [round(x, 2) for x in os.getloadavg()], "argv": sys.argv[1:]}
    probes = machine_probes(model.params, 64 if args.quick else args.matmul, args.repeats)
    rep["machine"] = probes
    print(f"machine: read {probes['read_gb_s']:.1f} GB/s (the {probes['param_bytes'] / 1e9:.3f} GB of parameters in "
          f"{probes['read_s'] * 1e3:.1f} ms), matmul {probes['matmul_gflop_s']:.0f} GFLOP/s "
          f"({probes['matmul_n']}^3 in {probes['matmul_s'] * 1e3:.1f} ms)", flush=True)
    rep["layer_sets"] = {}
    for s in sets:
        rep["layer_sets"]["+".join(s)] = edit_costs(model, s, n_edits, probes, args.repeats, 8 if args.quick else None)
    rep["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(str(args.out) + ".tmp")
        tmp.write_text(json.dumps(rep, indent=2))
        os.replace(tmp, args.out)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
