"""Where KV-cached greedy decoding's time goes on a real model: the prefill, one cached
one-token step and one uncached full pass over the same buffer, timed (median of `--repeats`
warm calls) and costed by XLA (`compiled.cost_analysis()`: flops and bytes accessed).

    python benchmarks/kv_cache_step.py --rows 8 --length 16

Rows are 8 copies of an 8-token prompt right padded to `--length`. Prints one line per program
and the load average before and after. Nothing is timed in tests.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from salem_jax.compile_cache import enable_compile_cache  # noqa: E402
from salem_jax.models.loading import load_model  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--length", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    enable_compile_cache()
    model = load_model(args.model)
    if not model.supports_kv_cache:
        raise SystemExit(f"{args.model} has no KV-cached decoding")
    B, L, P = args.rows, args.length, min(8, args.length - 1)
    ids = np.zeros((B, L), np.int32)
    ids[:, :P] = np.arange(100, 100 + P)
    mask = np.zeros((B, L), np.int32)
    mask[:, :P] = 1
    positions = np.broadcast_to(np.arange(L, dtype=np.int32), (B, L))
    zero = np.zeros(B, np.int32)
    last = np.full(B, P - 1, np.int32)
    dec = jax.jit(model.kv_decode)
    _, cache = dec(model.params, None, ids, mask, positions, zero, last[:, None])
    programs = {
        "prefill [B, L], head at 1 position": (dec, (model.params, None, ids, mask, positions, zero, last[:, None])),
        "cached step [B, 1]": (dec, (model.params, cache, ids[:, :1], mask, last[:, None], last, zero[:, None])),
        "uncached full pass [B, L], every position's head": (
            jax.jit(model.apply), (model.params, {"input_ids": ids, "attention_mask": mask})),
    }
    print(f"{args.model}, {B} rows, buffer {L}; load {os.getloadavg()[0]:.1f}")
    for name, (fn, a) in programs.items():
        cost = fn.lower(*a).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        jax.block_until_ready(fn(*a))
        ts = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            jax.block_until_ready(fn(*a))
            ts.append(time.perf_counter() - t)
        print(f"{name}: {np.median(ts):.3f} s, {cost.get('flops', 0) / 1e9:.1f} GFLOP, "
              f"{cost.get('bytes accessed', 0) / 1e6:.0f} MB accessed", flush=True)
    n = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(model.params))
    print(f"parameters: {n / 1e6:.0f} MB; load at the end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
