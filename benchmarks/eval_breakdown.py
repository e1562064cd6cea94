"""Where the pipeline's evaluation time goes, piece by piece, on benchmarks/eval_edit.py's stand-in rows.

19 stand-in edits of layers.26 (rank-1 changes of its MLP down-projection; `eval_edit.rows`: 5 own
rows each, 6 pass + 48 keep shared rows, 8 WikiText paragraphs, the first 5 edits with the text),
this tree's code, each piece timed (wall and CPU seconds of the process) `--reps` times in one
process (the first repetition compiles or loads the compiled programs):

  block cache own+shared / text   the base model's blocks 0..25 on every row / text window (once)
  base side own+shared / text     the base model's scores from block 26 on (once)
  evaluate_many ...               the edited models' scoring: 14 edits without text, 5 with
  before+after shared_prefill=... the generations before and after every edit
                                  (`generate.greedy_ids_before_after`) with the edited prefill from
                                  the edited block (True) or every block run (False, the 2E-model
                                  call); "prefill only": 1 new token, i.e. no decoding step

    SALEM_JAX_CACHE=/work/cache15 PYTHONPATH=. python benchmarks/eval_breakdown.py --reps 2
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import eval_edit as EE  # noqa: E402
from salem_jax import generate as G  # noqa: E402
from salem_jax.compile_cache import enable_compile_cache  # noqa: E402
from salem_jax.eval import edits as E  # noqa: E402
from salem_jax.eval.generated import stack_edits, target_tokens  # noqa: E402
from salem_jax.models.loading import load_model  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--edits", type=int, default=19)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--what", default="score,gen", help="score, gen or both")
    a = ap.parse_args(argv)
    enable_compile_cache()
    print("load", os.getloadavg(), flush=True)
    model = load_model("smollm2-135m")
    edits, shared = EE.rows(argparse.Namespace(seed=0, edits=a.edits, rephrasings=4, pass_rows=6, keep_rows=48))
    txt = EE.texts(8)
    kept = [EE.edited_params(model, "layers.26", i, 4.0) for i in range(a.edits)]
    jax.block_until_ready(kept)

    def timed(label, fn):
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        print(f"{label}: {time.perf_counter() - t:.2f} s wall, {time.process_time() - c:.2f} s CPU "
              f"(load {os.getloadavg()[0]:.1f})", flush=True)
        return out

    for rep in range(a.reps):
        if "score" in a.what:
            ev = E.EditEvaluator(model, model.params, edits, shared, texts=txt, text_window=128, batch_size=8)
            timed(f"[{rep}] block cache own+shared", lambda: ev._start_at(kept[0], False))
            app, cache = ev._start_at(kept[0], False)
            timed(f"[{rep}] base side own+shared", lambda: ev._ensure_base(app, cache, False))
            timed(f"[{rep}] block cache text", lambda: ev._start_at(kept[0], True))
            app, cache = ev._start_at(kept[0], True)
            timed(f"[{rep}] base side text", lambda: ev._ensure_base(app, cache, True))
            items = list(enumerate(kept))
            for _ in range(2):
                timed(f"[{rep}] evaluate_many, {len(items) - 5} edits without text", lambda: ev.evaluate_many(items[5:]))
                timed(f"[{rep}] evaluate_many, 5 edits with text", lambda: ev.evaluate_many(items[:5], with_text=True))
        if "gen" in a.what:
            pairs = [(e["fail"][0], e["adapt"]) for e in edits]
            paths, leaves = stack_edits(model.params, kept)
            prompts = [[r["prompt"] for r in (f, *ad)] for f, ad in pairs]
            need = [max(target_tokens(model, r["target"]) for r in (f, *ad)) + 2 for f, ad in pairs]
            for sp in (False, True):
                timed(f"[{rep}] before+after shared_prefill={sp}", lambda: G.greedy_ids_before_after(
                    model, model.params, paths, leaves, prompts, need, shared_prefill=sp))
                timed(f"[{rep}] before+after shared_prefill={sp}, prefill only", lambda: G.greedy_ids_before_after(
                    model, model.params, paths, leaves, prompts, [1] * len(need), shared_prefill=sp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
