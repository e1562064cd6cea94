"""Benchmark: the editor's optimizer update, `optax.MultiSteps` + `apply_updates` against
`mend.train.optimizer_update` (the same result), on the editor of SmolLM2's `layers.15` MLP
(rank 1920, 32M parameters; no model is loaded: only the editor's shapes matter).

    python benchmarks/optimizer_update.py --out runs/bench-optimizer.json

Prints and writes the median time of one update (after a warm-up call) and XLA's
`cost_analysis()` bytes for accum_steps 1 and 10, both jitted with donated params and state.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

from salem_jax.mend import train as T
from salem_jax.mend.editor import EditorConfig, EditorSpec
from salem_jax.models.base import Weight

MLP = "model/layers/15/mlp/"
SPEC = EditorSpec(
    (Weight(MLP + "gate_proj/kernel"), Weight(MLP + "up_proj/kernel"), Weight(MLP + "down_proj/kernel")),
    ((576, 1536), (576, 1536), (1536, 576)),
    EditorConfig(),
)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", default="runs/bench-optimizer.json")
    args = ap.parse_args(argv)
    rep = {"load_average_start": [round(x, 2) for x in os.getloadavg()], "results": {}}
    for k in (1, 10):
        cfg = T.TrainConfig(batch_size=1, accum_steps=k).resolved(1)
        st = T.init_train_state(SPEC, cfg)
        grads = jax.tree.map(lambda x: jnp.full_like(x, 1e-3), st["params"])

        def multisteps(p, o, g, cfg=cfg):
            u, o = T.make_optimizer(cfg, p).update(g, o, p)
            return optax.apply_updates(p, u), o

        def fast(p, o, g, cfg=cfg):
            return T.optimizer_update(cfg, p, g, o)

        for name, f in (("optax.MultiSteps", multisteps), ("optimizer_update", fast)):
            c = jax.jit(f, donate_argnums=(0, 1)).lower(st["params"], st["opt_state"], grads).compile()
            ca = c.cost_analysis()
            ca = ca[0] if isinstance(ca, list) else ca
            p, o = jax.tree.map(jnp.copy, (st["params"], st["opt_state"]))
            p, o = c(p, o, grads)  # warm-up
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                p, o = c(p, o, grads)
                jax.block_until_ready(p)
                times.append(time.perf_counter() - t0)
            r = {"median_s": statistics.median(times), "bytes_accessed": float(ca.get("bytes accessed", 0))}
            rep["results"][f"accum {k}: {name}"] = r
            print(f"accum_steps {k:2d}  {name:18s} {r['median_s']:.3f} s  {r['bytes_accessed'] / 1e9:.2f} GB", flush=True)
    rep["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    print(f"load average {rep['load_average_start']} -> {rep['load_average_end']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rep, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
