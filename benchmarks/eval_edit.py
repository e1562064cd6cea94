"""What one edit's evaluation costs, piece by piece: the pipeline's per-edit scoring on SmolLM2.

The pipeline (`evaluate_method`) scores every val edit on its own rows (the fail row and its
rephrasings), on rows shared by every edit (pass + keep) and, for the first few edits, on
held-out text, and greedily generates the edit's prompts before and after. This benchmark times
those pieces on the main job's shapes, with a stand-in edit: a rank-1 change of one block's MLP
down-projection (one block changed, as a MEND edit of that layer does), so no editor is trained:

  rows       capital facts of the countryinfo package (the main job's data): `--edits` edits, each a
             fail row (counterfactual target: another country's capital) with `--rephrasings`
             rephrasings, `--pass-rows` pass rows and `--keep-rows` keep rows (other relations)
  text       the last `--texts` WikiText paragraphs of the data directory (the pipeline's held-out text)

and reports, per edit (median over edits after a warm-up edit):

  score, all blocks       EditEvaluator.evaluate with skip_unchanged_blocks=False
  score, from the block   the same from the edited block (salem_jax.models.from_block)
  score + text            the same with the text (the pipeline does it for eval.ppl_edits edits)
  ..._kpos                the from-block rows with the head at K positions of every row and at every
                          text position (`EditEvaluator(flat_scores=False)`, the path before issue 14's
                          session 10; the default runs the head on the target tokens only)
  generate, after         greedy generation of the edit's prompts by the edited model, with
                          the KV cache (the default for SmolLM2) and without it (kv_cache=False:
                          the whole buffer re-run every step), same run, same prompts - the
                          two must give the same texts (checked)
  generate, before        the base model's generations, per edit as before this change, and
                          batched across all edits once (eval.generated.generations_per_edit)
  score, batched          every edit's scoring in vmapped calls of 8 edits (EditEvaluator.
                          evaluate_many, the pipeline's path since session 12), checked equal
  generate, after, batched  every edit's generations after it in one call (eval.generated.
                          generations_after_edits, the pipeline's path since session 12): the
                          weights the edits share are read once per decoding step for all of them;
                          checked equal to the per-edit generations

    python benchmarks/eval_edit.py --layer layers.26 --out runs/bench-eval-edit.json
    python benchmarks/eval_edit.py --generate-only --edits 8   # the generation rows alone

`--compare-with OTHER/salem_jax/eval/edits.py` (session 15) instead times two versions of the
evaluator against each other in one process, alternated (old, new, new, old, ...): per
repetition, building an `EditEvaluator` (the base side and kept block outputs included) and
scoring every edit with `evaluate_many`, the first `--ppl-edits` with the text, as the pipeline
does; the first repetition compiles. Checks the two give the same numbers (rtol 1e-4) and
prints each repetition's seconds and the warm ratio. Since session 16 each repetition also times
the generations before and after every edit (unless `--no-generation`): "other" as the pipeline
made them before (`generations_after_edits` of the 2E models, every block of every prefill run),
"this" as it does now (`generations_before_after_edits`: the edited prefill from the edited
block on the base prefill's states); the two must give the same texts. With `--per-edit-ab`
(session 24) it then times one `evaluate` call per edit, without and with the text, the two
versions alternated edit by edit (the first edit compiles and is left out of the medians), and
checks they give the same numbers:

    python benchmarks/eval_edit.py --edits 19 --compare-with /work/main/salem_jax/eval/edits.py \
        --out runs/bench-eval-ab.json

Applying the edit (session 25): the pipeline's per-edit evaluation is applying the edit (MEND:
`mend.apply.apply_each`, every val edit in one vmapped call; `apply_edits` for one request) and
scoring it. The benchmark times applying with an editor of `--layer`'s MLP (gate, up, down, as
the main job's `salem_edit` editor): `--editor WORKDIR` loads a trained one (e.g. a pipeline
run's `editor_salem_edit`), else a fresh one (`init_editor`, with a null-space projector of half
of each kernel's input width, as the main job's editor edits through one: the same shapes and
work as a trained editor's edit, not its values). The stand-in edits are still what is scored.
It prints **one edit's evaluation** - applying + scoring with the text, both as the pipeline runs
them (vmapped across the edits), per edit: issue 14's "<= 1 s" target read off one number
(`one_edit_evaluation_s` in the JSON; with each edit applied and scored one call each too):

    python benchmarks/eval_edit.py --edits 19 --skip-all-blocks --score-only --out runs/bench-eval-edit.json

Prints a table and writes JSON (hardware, load average, every time). Nothing is timed in tests.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from salem_jax.compile_cache import enable_compile_cache  # noqa: E402
from salem_jax.data.countries import country_records  # noqa: E402
from salem_jax.eval.edits import EditEvaluator  # noqa: E402
from salem_jax.eval.generated import generate_answers, generations_after_edits, generations_per_edit  # noqa: E402
from salem_jax.models.base import get_path, set_path  # noqa: E402
from salem_jax.models.loading import load_model  # noqa: E402


def _row(prompt, target, group, i):
    return dict(id=f"{group}{i}", record_id=f"r{i}", group=group, prompt=prompt, target=target, label=-1, text_pair="")


def rows(args):
    caps = list(country_records("capital", seed=args.seed))
    others = list(country_records(("region", "currency", "languages"), seed=args.seed))
    n = args.edits
    if len(caps) < n + args.pass_rows + 1 or len(others) < args.keep_rows:
        raise SystemExit(f"not enough country facts for {n} edits + {args.pass_rows} pass rows")
    edits = []
    for i, r in enumerate(caps[:n]):
        new = caps[(i + 1) % n].target_true  # another country's capital: a counterfactual edit
        edits.append({"fail": [_row(r.prompt, new, "fail", i)],
                      "adapt": [_row(p, new, "adapt", i) for p in r.rephrases[: args.rephrasings]]})
    shared = {"pass": [_row(r.prompt, r.target_true, "pass", i) for i, r in enumerate(caps[n: n + args.pass_rows])],
              "keep": [_row(r.prompt, r.target_true, "keep", i) for i, r in enumerate(others[: args.keep_rows])]}
    return edits, shared


def texts(n: int) -> list[str]:
    """The pipeline's held-out text: the last n paragraphs of the WikiText file (pipeline.held_out_texts)."""
    from salem_jax.data import readers
    from salem_jax.data.paths import find_data_file

    return list(readers.read_text(find_data_file("wikitext")))[-n:] if n > 0 else []


def edited_params(model, layer: str, i: int, scale: float):
    """Base parameters with a rank-1 change of `layer`'s last MLP kernel (deterministic by i)."""
    w = model.layers[layer].mlp[-1]
    k = get_path(model.params, w.path)
    key = jax.random.PRNGKey(i)
    u, v = jax.random.normal(key, (k.shape[0],)), jax.random.normal(jax.random.fold_in(key, 1), (k.shape[1],))
    return set_path(model.params, w.path, k + scale * jnp.outer(u, v) / np.sqrt(k.size))


def bench_editor(model, layer: str, path: str | None):
    """(the editor whose edits are timed, what it is): `path`'s trained editor, else a fresh editor
    of `layer`'s MLP kernels (`init_editor`) with a null-space projector per kernel (identity minus
    a random orthonormal basis of half of its input width: a projector of the trained one's shape)."""
    from salem_jax.mend.apply import TrainedEditor, load_editor
    from salem_jax.mend.editor import EditorSpec, init_editor

    if path:
        ed = load_editor(path, model)
        return ed, f"trained editor {path} (step {ed.step}, weights {[w.path for w in ed.spec.weights]})"
    spec = EditorSpec.from_params(model.layers[layer].mlp, model.params)
    params, state = init_editor(spec, jax.random.PRNGKey(0))
    proj = {}
    for i, w in enumerate(spec.weights):
        fan_in = spec.fans(i)[0]
        q, _ = np.linalg.qr(np.random.default_rng(i).standard_normal((fan_in, fan_in // 2)))
        proj[w.path] = jnp.asarray(np.eye(fan_in, dtype=np.float32) - (q @ q.T).astype(np.float32))
    ed = TrainedEditor(spec=spec, params=params, state=state, model_name=model.name, step=0, projections=proj,
                       null_energy=0.2)
    return ed, f"fresh editor of {layer}'s MLP ({len(spec.weights)} kernels, null-space projectors)"


def time_applying(model, editor, edits) -> dict:
    """Seconds applying each edit's fail row as the pipeline does: every edit in one `apply_each`
    call (vmapped; the first call compiles, the second is timed) and one `apply_edits` call per edit
    (median over the edits after the first). `like`: the edits' fail rows encoded together, as the
    pipeline's val split (one program for every request)."""
    from salem_jax.mend.apply import apply_each, apply_edits, encode_requests
    from salem_jax.scored_logits import with_score_positions

    reqs = [dict(prompt=e["fail"][0]["prompt"], target=e["fail"][0]["target"]) for e in edits]
    like = with_score_positions(encode_requests(model, reqs))
    first = timed(lambda: jax.block_until_ready(apply_each(model, editor, reqs, like=like)))[0]
    again = timed(lambda: jax.block_until_ready(apply_each(model, editor, reqs, like=like)))[0]
    one = [timed(lambda: jax.block_until_ready(apply_edits(model, editor, [r], like=like, progress=False)))[0]
           for r in reqs]
    return {"apply_each_first_call_s": first, "apply_each_total_s": again, "apply_batched_per_edit_s": again / len(reqs),
            "apply_one_call_s": one, "apply_one_call_median_s": statistics.median(one[1:]) if len(one) > 1 else one[0]}


def timed(fn):
    t = time.perf_counter()
    out = fn()
    jax.block_until_ready(out) if not isinstance(out, (dict, list)) else None
    return time.perf_counter() - t, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layer", default="layers.26")
    ap.add_argument("--edits", type=int, default=8)
    ap.add_argument("--rephrasings", type=int, default=4)
    ap.add_argument("--pass-rows", type=int, default=6)
    ap.add_argument("--keep-rows", type=int, default=48)
    ap.add_argument("--texts", type=int, default=8)
    ap.add_argument("--scale", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/bench-eval-edit.json")
    ap.add_argument("--no-compile-cache", action="store_true")
    ap.add_argument("--generate-only", action="store_true",
                    help="time only the generation rows (cached and uncached), not the scoring")
    ap.add_argument("--score-only", action="store_true", help="time only the scoring rows, no generation")
    ap.add_argument("--skip-all-blocks", action="store_true", help="no all-blocks scoring rows")
    ap.add_argument("--text-window", type=int, default=128,
                    help="text window (the pipeline's eval.text_window, 128; sessions 7-8 ran this benchmark at 512)")
    ap.add_argument("--compare-with", default=None,
                    help="another version's salem_jax/eval/edits.py: time its EditEvaluator against this one's, alternated")
    ap.add_argument("--ppl-edits", type=int, default=5, help="--compare-with: edits scored with the text (eval.ppl_edits)")
    ap.add_argument("--ab-reps", type=int, default=3, help="--compare-with: repetitions of each version")
    ap.add_argument("--per-edit-ab", action="store_true",
                    help="--compare-with: also time one `evaluate` call per edit, the two versions alternated edit by edit")
    ap.add_argument("--no-generation", action="store_true",
                    help="--compare-with: time the scoring only (not the generations before and after every edit)")
    ap.add_argument("--editor", default=None,
                    help="a trained MEND editor's workdir to time applying the edits with (default: a fresh editor of --layer's MLP)")
    ap.add_argument("--no-apply", action="store_true", help="do not time applying the edits")
    args = ap.parse_args(argv)
    if not args.no_compile_cache:
        enable_compile_cache()
    load0 = os.getloadavg()
    model = load_model(args.model)
    edits, shared = rows(args)
    txt = texts(args.texts)
    if args.compare_with:
        return compare_evaluators(args, model, edits, shared, txt, load0)
    res: dict = {"args": vars(args), "hardware": {"platform": platform.platform(), "devices": [str(d) for d in jax.devices()],
                                                  "cpu_count": os.cpu_count()}, "load_start": load0}
    print(f"{len(edits)} edits, {sum(map(len, shared.values()))} shared rows, {len(txt)} texts "
          f"({sum(len(t.split()) for t in txt)} words)", flush=True)
    t0 = time.perf_counter()
    ev = {} if args.generate_only else {
        (s, f): EditEvaluator(model, model.params, edits, shared, texts=txt, batch_size=8, skip_unchanged_blocks=s,
                              text_window=args.text_window, flat_scores=f)
        for s, f in ((False, True), (True, True), (True, False)) if s or not args.skip_all_blocks}
    res["evaluator_setup_s"] = (time.perf_counter() - t0) / max(1, len(ev))
    print(f"evaluators built in {len(ev) * res['evaluator_setup_s']:.1f} s", flush=True)
    scoring = () if args.generate_only else ("score_all_blocks", "score_from_block", "score_from_block_kpos") + (
        ("score_text_all_blocks", "score_text_from_block", "score_text_from_block_kpos") if txt else ())  # --texts 0: no text
    if args.skip_all_blocks:
        scoring = tuple(k for k in scoring if "all_blocks" not in k)
    gen = () if args.score_only else ("generate_after", "generate_after_uncached", "generate_before_per_edit")
    times: dict[str, list[float]] = {k: [] for k in (*scoring, *gen)}
    # Compile every generation program first (the edits' targets fall into different length
    # buckets, each compiled once per path), so the medians below are warm calls.
    compile_s = {"generate_cached": 0.0, "generate_uncached": 0.0}
    for e in edits if gen else ():
        rows_ = e["fail"] + e["adapt"]
        for key, kv in (("generate_cached", None), ("generate_uncached", False)):
            compile_s[key] += timed(lambda: generate_answers(model, model.params, [r["prompt"] for r in rows_],
                                                             [r["target"] for r in rows_], kv_cache=kv))[0]
    res["generate_first_pass_s"] = compile_s
    print("first pass over the edits' generations (compiles every bucket): "
          + ", ".join(f"{k} {v:.1f} s" for k, v in compile_s.items()), flush=True)
    kept, after_each = [], []
    for i in range(args.edits):
        scores: dict[str, dict] = {}
        p = edited_params(model, args.layer, i, args.scale)
        kept.append(p)
        jax.block_until_ready(p)
        for name, key, text in (("score_all_blocks", (False, True), False), ("score_from_block", (True, True), False),
                                ("score_from_block_kpos", (True, False), False), ("score_text_all_blocks", (False, True), True),
                                ("score_text_from_block", (True, True), True), ("score_text_from_block_kpos", (True, False), True)):
            if name not in times:
                continue
            dt, m = timed(lambda: ev[key].evaluate(i, p, with_text=text))
            times[name].append(dt)
            if name == "score_from_block":
                assert ev[key].last_start == model.layers.names().index(args.layer), ev[key].last_start
            if name.endswith("_kpos"):  # the same numbers as the flat path just timed
                flat = scores[name[: -len("_kpos")]]
                bad = {k: (v, flat[k]) for k, v in m.items() if not np.isclose(v, flat[k], rtol=1e-4, atol=1e-3, equal_nan=True)}
                if bad:  # (atol 1e-3: dd_ppl_text_abs is a difference of two perplexities ~20, float32 sums)
                    raise SystemExit(f"edit {i}: flat and K-position scores differ: {bad}")
            scores[name] = m
        if not gen:
            print(f"edit {i}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()), flush=True)
            continue
        prompts = [r["prompt"] for g in ("fail", "adapt") for r in edits[i][g]]
        targets = [r["target"] for g in ("fail", "adapt") for r in edits[i][g]]
        dt, fast = timed(lambda: generate_answers(model, p, prompts, targets))
        times["generate_after"].append(dt)
        after_each.append(fast)
        dt, slow = timed(lambda: generate_answers(model, p, prompts, targets, kv_cache=False))
        times["generate_after_uncached"].append(dt)
        if fast != slow:
            raise SystemExit(f"edit {i}: cached and uncached generations differ: {fast} vs {slow}")
        times["generate_before_per_edit"].append(timed(lambda: generate_answers(model, model.params, prompts, targets))[0])
        print(f"edit {i}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()), flush=True)
    if scoring:  # every edit scored in one vmapped call per 8 edits (EditEvaluator.evaluate_many, the pipeline's
        # path since session 12); the first call compiles, the second is timed; both must equal the per-edit scores
        evb = ev[(True, True)]
        for text in (False, True) if txt else (False,):
            key = "score_text_from_block" if text else "score_from_block"
            want = [evb.evaluate(i, p, with_text=text) for i, p in enumerate(kept)]
            first = timed(lambda: evb.evaluate_many(list(enumerate(kept)), with_text=text))
            again = timed(lambda: evb.evaluate_many(list(enumerate(kept)), with_text=text))
            for i, (w, g) in enumerate(zip(want, again[1])):
                bad = {k: (v, g[k]) for k, v in w.items() if not np.isclose(v, g[k], rtol=2e-4, atol=1e-3, equal_nan=True)}
                if bad:
                    raise SystemExit(f"edit {i}: batched and per-edit scores differ: {bad}")
            res[f"{key}_batched_first_call_s"], res[f"{key}_batched_total_s"] = first[0], again[0]
    dt = timed(lambda: generations_per_edit(model, model.params, [(e["fail"][0], e["adapt"]) for e in edits]))[0] if gen else 0.0
    res["generate_before_batched_total_s"] = dt
    if gen:  # every edit's generations after it in one batched call (the pipeline's path since session 12);
        # the first call compiles, the second is timed; both must equal the per-edit generations
        pairs = [(e["fail"][0], e["adapt"]) for e in edits]
        first = timed(lambda: generations_after_edits(model, model.params, kept, pairs))
        again = timed(lambda: generations_after_edits(model, model.params, kept, pairs))
        if first[1] != after_each or again[1] != after_each:
            raise SystemExit(f"batched generations after the edits differ from the per-edit ones: {again[1]} vs {after_each}")
        res["generate_after_batched_first_call_s"], res["generate_after_batched_total_s"] = first[0], again[0]
    res["times_s"] = times
    med = {k: statistics.median(v[1:]) for k, v in times.items()}  # the first edit compiles
    res["median_s"] = med
    whole = {}
    if scoring and not args.no_apply:  # applying each edit (MEND), then one edit's whole evaluation
        editor, res["editor"] = bench_editor(model, args.layer, args.editor)
        res["apply"] = ap = time_applying(model, editor, edits)
        print(f"applying ({res['editor']}): every edit in one apply_each call {ap['apply_each_total_s']:.2f} s "
              f"({ap['apply_batched_per_edit_s']:.3f} s per edit), one call per edit {ap['apply_one_call_median_s']:.3f} s",
              flush=True)
        for key, name in (("score_from_block", "rows"), ("score_text_from_block", "text")):
            if key in med:
                whole[f"{name}_batched"] = ap["apply_batched_per_edit_s"] + res[f"{key}_batched_total_s"] / args.edits
                whole[f"{name}_one_call"] = ap["apply_one_call_median_s"] + med[key]
        res["one_edit_evaluation_s"] = whole
    res["generate_before_batched_per_edit_s"] = dt / args.edits
    if gen:
        res["generate_kv_cache_speedup"] = med["generate_after_uncached"] / med["generate_after"]
    if scoring:
        res["flat_speedup"] = {k: med[k + "_kpos"] / med[k] for k in ("score_from_block", "score_text_from_block") if k in med}
    if not args.generate_only and gen and "score_all_blocks" in med:  # (--skip-all-blocks: no old figure)
        before_now = med["score_from_block"] + med["generate_after"] + dt / args.edits
        before_old = med["score_all_blocks"] + med["generate_after_uncached"] + med["generate_before_per_edit"]
        res["per_edit_old_s"], res["per_edit_new_s"] = before_old, before_now
    res["load_end"] = os.getloadavg()
    print(f"\n{args.model}, edit at {args.layer}: {args.edits} edits x ({1 + args.rephrasings} own rows), "
          f"{args.pass_rows + args.keep_rows} shared rows, {args.texts} text paragraphs; load {load0[0]:.1f} -> {res['load_end'][0]:.1f}")
    print("| piece (median per edit, first edit excluded) | seconds |\n|---|---|")
    for k, v in med.items():
        print(f"| {k} | {v:.3f} |")
    if gen:
        print(f"| generate_before, batched across edits (per edit) | {dt / args.edits:.3f} |")
        print(f"| generation after the edit: uncached / KV-cached, same run | {res['generate_kv_cache_speedup']:.2f}x |")
        per = res["generate_after_batched_total_s"] / args.edits
        res["generate_after_batched_speedup"] = med["generate_after"] / per
        print(f"| generate_after, every edit in one batched call (per edit; first call "
              f"{res['generate_after_batched_first_call_s']:.1f} s) | {per:.3f} |")
        print(f"| generation after the edit: one call per edit / batched across edits, same run | "
              f"{res['generate_after_batched_speedup']:.2f}x |")
    for key in ("score_from_block", "score_text_from_block"):
        if f"{key}_batched_total_s" in res:
            per = res[f"{key}_batched_total_s"] / args.edits
            res[f"{key}_batched_speedup"] = med[key] / per
            print(f"| {key}, every edit in vmapped calls of 8 (per edit; first call "
                  f"{res[key + '_batched_first_call_s']:.1f} s) | {per:.3f} |")
            print(f"| {key}: one call per edit / batched, same run | {res[key + '_batched_speedup']:.2f}x |")
    for k, v in res.get("flat_speedup", {}).items():
        print(f"| {k}: head at K positions / on the target tokens, same run | {v:.2f}x |")
    if whole:
        print(f"| applying the edit: every edit in one apply_each call (per edit) / one apply_edits call | "
              f"{res['apply']['apply_batched_per_edit_s']:.3f} / {res['apply']['apply_one_call_median_s']:.3f} |")
        for name, what in (("rows", "own rows + pass + keep"), ("text", "own rows + pass + keep + text")):
            if f"{name}_batched" in whole:
                print(f"| one edit's evaluation: applying + scoring ({what}), vmapped across edits as the pipeline "
                      f"/ one call each | {whole[name + '_batched']:.3f} / {whole[name + '_one_call']:.3f} |")
        if "text_batched" in whole:
            print(f"\nONE EDIT'S EVALUATION (issue 14's target <= 1 s; applying + scoring with the text, as the pipeline "
                  f"runs them): {whole['text_batched']:.3f} s (one call each: {whole['text_one_call']:.3f} s)")
    if "per_edit_old_s" in res:
        print("| one edit's evaluation without text: all blocks, uncached generation before/after per edit "
              f"| {before_old:.3f} |")
        print(f"| the same from the edited block, KV-cached generation, base generations batched | {before_now:.3f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"wrote {args.out}")
    return 0


def compare_evaluators(args, model, edits, shared, txt, load0) -> int:
    """`--compare-with`: this version's EditEvaluator against another's, alternated (module docstring)."""
    import importlib.util

    from salem_jax.eval import edits as this

    spec = importlib.util.spec_from_file_location("other_edits", args.compare_with)
    other = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(other)
    from salem_jax.eval.generated import generations_before_after_edits

    kept = [edited_params(model, args.layer, i, args.scale) for i in range(args.edits)]
    flags = [i < args.ppl_edits for i in range(args.edits)]
    pairs = [(e["fail"][0], e["adapt"]) for e in edits]
    n = len(kept)

    def gen_other():  # the pipeline's generations before session 16: one call of the 2E models, every block
        both = generations_after_edits(model, model.params, [model.params] * n + kept, pairs * 2,
                                       models_per_call=min(2 * n, 64))
        return both[:n], both[n:]

    def gen_this():  # since session 16: the edited prefill from the edited block
        return generations_before_after_edits(model, model.params, kept, pairs, edits_per_call=min(n, 32))

    times: dict[str, list[float]] = {"other": [], "this": []}
    gen_times: dict[str, list[float]] = {"other": [], "this": []}
    cpu: dict[str, list[float]] = {"score_other": [], "score_this": [], "gen_other": [], "gen_this": []}
    got: dict[str, list] = {}
    evs: dict = {}
    gens: dict[str, tuple] = {}
    for rep in range(args.ab_reps):
        for name in (("other", "this") if rep % 2 == 0 else ("this", "other")):
            mod = other if name == "other" else this
            t, c = time.perf_counter(), time.process_time()
            ev = mod.EditEvaluator(model, model.params, edits, shared, texts=txt or None, text_window=args.text_window,
                                   batch_size=8)
            got[name] = ev.evaluate_many(list(enumerate(kept)), with_text=flags if txt else False)
            evs[name] = ev
            times[name].append(time.perf_counter() - t)
            cpu[f"score_{name}"].append(time.process_time() - c)
            msg = f"rep {rep} {name}: scoring {times[name][-1]:.2f} s (CPU {cpu['score_' + name][-1]:.1f} s)"
            if not args.no_generation:
                t, c = time.perf_counter(), time.process_time()
                gens[name] = gen_other() if name == "other" else gen_this()
                gen_times[name].append(time.perf_counter() - t)
                cpu[f"gen_{name}"].append(time.process_time() - c)
                msg += f", generation before + after {gen_times[name][-1]:.2f} s (CPU {cpu['gen_' + name][-1]:.1f} s)"
            print(msg + f" (load {os.getloadavg()[0]:.1f})", flush=True)
        for i, (a, b) in enumerate(zip(got["other"], got["this"])):
            bad = {k: (v, b[k]) for k, v in a.items() if not np.isclose(v, b[k], rtol=1e-4, atol=1e-4, equal_nan=True)}
            if bad or sorted(a) != sorted(b):
                raise SystemExit(f"edit {i}: the two evaluators differ: {bad}")
        if gens and gens["other"] != gens["this"]:
            raise SystemExit(f"the two generation paths differ: {gens['other']} vs {gens['this']}")

    def med(v):
        return statistics.median(v[1:]) if len(v) > 1 else v[0]

    # one call per edit (`evaluate`, the path the per-edit target row quotes), the two versions
    # alternated edit by edit on the last repetition's evaluators (their programs compiled above
    # by the batched calls are other programs: the first edit compiles and is left out)
    per_edit: dict[str, list[float]] = {f"{k}_{t}": [] for k in ("other", "this") for t in ("rows", "text")}
    per_edit_cpu: dict[str, list[float]] = {k: [] for k in per_edit}  # process CPU seconds (both cores; less load-bound)
    for i in range(args.edits if args.per_edit_ab else 0):
        for name in (("other", "this") if i % 2 == 0 else ("this", "other")):
            outs = {}
            for text in (False, True) if txt else (False,):
                t, c = time.perf_counter(), time.process_time()
                outs[text] = evs[name].evaluate(i, kept[i], with_text=text)
                per_edit[f"{name}_{'text' if text else 'rows'}"].append(time.perf_counter() - t)
                per_edit_cpu[f"{name}_{'text' if text else 'rows'}"].append(time.process_time() - c)
            got[f"{name}_one"] = outs
        for text, a in got["other_one"].items():
            b = got["this_one"][text]
            bad = {k: (v, b[k]) for k, v in a.items() if not np.isclose(v, b[k], rtol=1e-4, atol=1e-4, equal_nan=True)}
            if bad or sorted(a) != sorted(b):
                raise SystemExit(f"edit {i}, one call: the two evaluators differ: {bad}")
        print(f"edit {i}, one call each: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in per_edit.items() if v)
              + f" (load {os.getloadavg()[0]:.1f})", flush=True)

    # XLA's own count of one edit's scoring program with the text (flops, bytes), per version:
    # the arguments of the last `_edited_scores_flat` call, recorded, the program lowered again
    cost = {}
    for name, mod in (("other", other), ("this", this)) if args.per_edit_ab and txt else ():
        seen, fn = [], mod._edited_scores_flat
        mod._edited_scores_flat = lambda *a, _fn=fn: seen.append(a) or _fn(*a)
        try:
            evs[name].evaluate(0, kept[0], with_text=True)
        finally:
            mod._edited_scores_flat = fn
        ca = fn.lower(*seen[-1]).compile().cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        # the text's chunks run in `lax.map` loops, whose body XLA's count includes once: the trips per loop
        trips = ([int(p["windows"]["input_ids"].shape[0]) for p in evs[name].text_parts]
                 if getattr(evs[name], "text_parts", None) else [int(evs[name]._windows["input_ids"].shape[0])])
        cost[name] = {"gflop": ca.get("flops", float("nan")) / 1e9, "gbytes": ca.get("bytes accessed", float("nan")) / 1e9,
                      "text_loop_trips": trips}
        print(f"{name}: one edit's scoring with the text, XLA cost analysis: {cost[name]['gflop']:.1f} GFLOP, "
              f"{cost[name]['gbytes']:.2f} GB (text chunk loops of {trips} trips, each body counted once)", flush=True)

    warm = {k: med(v) for k, v in times.items()}
    cwarm = {k: med(v) for k, v in cpu.items() if v}
    res = {"cpu_s": cpu, "cpu_warm_median_s": cwarm, "args": vars(args), "load_start": load0, "load_end": os.getloadavg(), "times_s": times, "warm_median_s": warm,
           "warm_ratio": warm["other"] / warm["this"], "hardware": {"platform": platform.platform(), "cpu_count": os.cpu_count()}}
    if args.per_edit_ab:
        pmed = {k: med(v) for k, v in per_edit.items() if v}
        pcpu = {k: med(v) for k, v in per_edit_cpu.items() if v}
        res.update(per_edit_s=per_edit, per_edit_warm_median_s=pmed, xla_cost_one_edit_with_text=cost,
                   per_edit_cpu_s=per_edit_cpu, per_edit_cpu_warm_median_s=pcpu)
        if not args.no_apply:  # applying (this tree's code, the same for both) + each version's one-call scoring
            editor, res["editor"] = bench_editor(model, args.layer, args.editor)
            res["apply"] = ap = time_applying(model, editor, edits)
            res["one_edit_evaluation_one_call_s"] = {
                f"{k}_{part}": ap["apply_one_call_median_s"] + pmed[f"{k}_{part}"]
                for k in ("other", "this") for part in ("rows", "text") if f"{k}_{part}" in pmed}
    print(f"\n{args.edits} edits ({args.ppl_edits} with text), load {load0[0]:.1f} -> {res['load_end'][0]:.1f}")
    print("| piece | version | first (compiles) | warm median | warm CPU |\n|---|---|---|---|---|")
    for k in ("other", "this"):
        print(f"| scoring (evaluator built + evaluate_many) | {k} | {times[k][0]:.2f} s | {warm[k]:.2f} s | "
              f"{cwarm['score_' + k]:.2f} s |")
    print(f"| scoring, other / this, warm | | | {res['warm_ratio']:.2f}x | "
          f"{cwarm['score_other'] / cwarm['score_this']:.2f}x |")
    if not args.no_generation:
        gwarm = {k: med(v) for k, v in gen_times.items()}
        res.update(gen_times_s=gen_times, gen_warm_median_s=gwarm, gen_warm_ratio=gwarm["other"] / gwarm["this"])
        for k in ("other", "this"):
            print(f"| generation before + after every edit | {k} | {gen_times[k][0]:.2f} s | {gwarm[k]:.2f} s | "
                  f"{cwarm['gen_' + k]:.2f} s |")
        print(f"| generation, other / this, warm | | | {res['gen_warm_ratio']:.2f}x | "
              f"{cwarm['gen_other'] / cwarm['gen_this']:.2f}x |")
    if args.per_edit_ab:
        for part, what in (("rows", "own rows + shared rows"), ("text", "own rows + shared rows + text")):
            if f"other_{part}" in pmed:
                print(f"| one call per edit ({what}), warm median | other / this | | "
                      f"{pmed['other_' + part]:.3f} / {pmed['this_' + part]:.3f} s | "
                      f"{pmed['other_' + part] / pmed['this_' + part]:.2f}x |")
                print(f"| the same, process CPU seconds (median) | other / this | | "
                      f"{pcpu['other_' + part]:.3f} / {pcpu['this_' + part]:.3f} s | "
                      f"{pcpu['other_' + part] / pcpu['this_' + part]:.2f}x |")
    if "one_edit_evaluation_one_call_s" in res:
        w, ap = res["one_edit_evaluation_one_call_s"], res["apply"]
        print(f"| applying one edit (apply_edits, one call; this tree's) | | | {ap['apply_one_call_median_s']:.3f} s | "
              f"(apply_each: {ap['apply_batched_per_edit_s']:.3f} s per edit) |")
        for part in ("rows", "text"):
            if f"other_{part}" in w:
                print(f"| one edit's evaluation, applying + one call ({part}) | other / this | | "
                      f"{w['other_' + part]:.3f} / {w['this_' + part]:.3f} s | {w['other_' + part] / w['this_' + part]:.2f}x |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
