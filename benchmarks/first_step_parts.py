"""Benchmark (issue 14, session 26): where the cached first editor step's seconds go.

    PYTHONPATH=. python benchmarks/first_step_parts.py --layers layers.0 --steps-only --repeats 1 --no-torch-val \\
        --out runs/bench-first-step-parts.json

Runs `benchmarks/vs_pytorch.py` with the same arguments and, inside each of its "cached first call"
measurements (jax's in-memory caches cleared, the program loaded from the persistent compilation
cache, as in a second process), records jax's own compile-stage durations (`jax.monitoring`): the
jaxpr trace, the lowering to MLIR, the cache retrieval (deserialising the XLA executable) and the
backend compile (which, on a cache hit, contains the retrieval). What is left of the call is the run
itself and Python between the stages. The stages are printed after each cached first call and written
into the vs_pytorch JSON (`--out`) as "cached_first_parts": a list, one entry per cached first call in
the order vs_pytorch makes them ({"seconds": total, "stages": {event: [sum s, count]}}).
"""

from __future__ import annotations

import collections
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv: list[str]) -> int:
    import jax
    import vs_pytorch as vp

    durs: dict[str, list[float]] = collections.defaultdict(list)
    jax.monitoring.register_event_duration_secs_listener(lambda name, secs, **kw: durs[name].append(secs))
    parts: list[dict] = []
    plain = vp._cached_first

    def cached_first_with_stages(fn) -> float:
        durs.clear()
        dt = plain(fn)
        stages = {k: [round(sum(v), 3), len(v)] for k, v in sorted(durs.items())}
        parts.append({"seconds": round(dt, 3), "stages": stages})
        for k, (s, n) in stages.items():
            print(f"      {k}: {s:.2f}s ({n} events)", flush=True)
        return dt

    vp._cached_first = cached_first_with_stages
    rc = vp.main(argv)
    out = Path(vp_out(argv))
    if out.exists():
        data = json.loads(out.read_text())
        data["cached_first_parts"] = parts
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(out)
    return rc


def vp_out(argv: list[str]) -> str:
    """vs_pytorch's --out (its default when not given)."""
    for i, a in enumerate(argv):
        if a == "--out" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--out="):
            return a.split("=", 1)[1]
    return "runs/bench-vs-pytorch.json"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
