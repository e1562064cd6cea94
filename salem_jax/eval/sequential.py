"""Many edits: what happens to edit 1 after edit 100? Sequential and batch editing, scored on retention.

A method's edit function `edit(params, rows) -> params` (salem_jax.methods: `Prepared.edit`) is
applied to the val fail rows r_1, r_2, ... in one of these ways (`MODES`, and `sequential:N`):

* **sequential** - "apply the editor again to the edited weights": p_t = edit(p_{t-1}, [r_t]),
  p_0 = the base weights. Each edit sees the weights the earlier edits produced (a MEND editor
  captures its gradient factors there; fine-tuning starts there).
* **independent** - "apply the editor to the original weights each time": each edit is computed on
  the base weights, d_t = edit(p_0, [r_t]) - p_0, and the changes are summed,
  p_t = p_{t-1} + d_t. No edit knows of the others (the weights they produce are the same whatever
  the order); the difference from `sequential` is what seeing the edited weights buys or costs.
* **batch** - all T edits in one update: p_T = edit(p_0, [r_1, ..., r_T]) (MEND: one combined
  edit; fine-tuning: one run on all rows; ROME: its rows one after another, as ROME's own multi-row
  edit is defined).
* **sequential:N** - sequential batches of N edits (AlphaEdit's own protocol): the editor applied
  again to the edited weights, N rows a call, p_b = edit(p_{b-1}, [r_{N(b-1)+1} .. r_{Nb}]);
  `sequential:1` is `sequential`. Every T of `steps` must be a multiple of N (a batch is never cut).
  A locate-then-edit method makes one closed-form update per call when its
  `config.locate_edit.batch_size` >= N, and continues its state (AlphaEdit: the null-space
  projection and sum k k^T of every earlier batch's keys) because each call gets the parameters the
  previous call returned (`salem_jax.methods.locate_edit`).

The edits are the val fail rows in record order (`split_val`), unless `config.eval.sequential_order_seed`
is >= 0: then the edits the study makes (the first max(steps) fail rows, the same set as in record
order) are applied in a seeded order, `order_edits`: position i gets row
`perm[i]` of `numpy.random.default_rng(seed).permutation(max(steps))`. Each edit's rephrasings (adapt rows)
go with it (they are looked up by record id); the train/val split, the pass rows, the keep set and every
other seeded step are unchanged, so two order seeds edit the same rows in two orders. `ea_first` is then
over the first 10 edits of the permuted order. -1 (the default) = record order, as before the key existed.

After T = steps[0], steps[1], ... edits the weights p_T are scored (`score_after`):

* retention: `ea` = EA (teacher forced, every target token the argmax) over ALL T edit prompts
  made so far, `ea_first` over the first min(10, T) of them, `adapt_acc` over all their
  rephrasings (row weighted); `ea_before` / `adapt_before` are the base model's on the same rows;
* what must not change, against the untouched base model: the val pass rows (`dd_acc`,
  `locality`), the held-out keep set (`keep_acc`, `dd_keep_acc` = base minus edited accuracy) and,
  when given, held-out text perplexity (`dd_ppl_text_rel`);
* portability (salem_jax.eval.portability), when the edits have portability questions (zsRE's
  portability file, counterfactual mode): `portability` = the teacher-forced accuracy of the
  questions of ALL T edits made so far, per edit the share answered and averaged over the edits
  that have questions (`portability_over_edits`: the one-at-a-time `portability` definition);
  `portability_before` the base model's on the same questions; `n_portability` questions of
  `portability_edits` edits. Edits without questions contribute none; absent when none of the T has any;
* generated answers (salem_jax.eval.generated), when asked: the share of the T edit prompts whose
  greedy continuation starts with / contains the new target (`gen_starts`, `gen_contains`), and the
  base model's on the same prompts (`gen_starts_before`, `gen_contains_before`: the base model's
  generations of the max(steps) edit prompts are made once per study and sliced). Every generation
  of a study gets the same budget, the longest target of its max(steps) edits + extra_tokens
  (`study_gen_tokens`), so before and after, and every T, decode the same number of tokens.

An edit that makes a weight NaN or infinite stops the run with `NonFiniteEdit`, which names the
edit (its number and row id) and carries the results so far and the last good parameters; the
pipeline's driver (`pipeline_study`) writes the results so far before re-raising it, and
`pipeline.run_pipeline` then writes results.json / results.md (the methods evaluated so far, the
stopped method's one-at-a-time scores and study so far, and `stopped`: which method, mode and edit)
before re-raising it again.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from salem_jax.errors import UserError
from salem_jax.eval.metrics import base_scores, evaluate_edit, score_rows
from salem_jax.eval.portability import portability_over_edits

MODES = ("sequential", "independent", "batch")
FIRST = 10  # `ea_first`: retention of the first FIRST edits
SHARES = ("ea", "ea_first", "keep_acc", "adapt_acc", "locality")  # plotted on [0, 1]


class NonFiniteEdit(UserError):
    """An edit produced non-finite weights. `.edit` (1-based number), `.row_id`, `.leaves` (paths),
    `.results` (the scores so far) and `.params` (the last good parameters)."""

    def __init__(self, message: str, *, edit: int, row_id: str, leaves: list[str], results: list[dict], params: Any):
        super().__init__(message)
        self.edit, self.row_id, self.leaves, self.results, self.params = edit, row_id, leaves, results, params
        # set on the way up: `pipeline_study` (the method, the mode, {mode: results so far}) and
        # `pipeline.run_method` (the method's (results entry, training entry) so far)
        self.method: str | None = None
        self.mode: str | None = None
        self.study: dict[str, list[dict]] | None = None
        self.partial: tuple[dict, dict] | None = None


# ----------------------------------------------------------------------------- requests


def parse_steps(spec: str, where: str = "config.eval.sequential") -> tuple[int, ...]:
    """"1,10,50,100" -> (1, 10, 50, 100): positive, strictly increasing integers."""
    try:
        steps = tuple(int(s) for s in str(spec).split(",") if s.strip())
    except ValueError:
        raise UserError(f"{where}={spec!r}: expected edit counts like 1,10,50,100") from None
    if not steps or any(t < 1 for t in steps) or list(steps) != sorted(set(steps)):
        raise UserError(f"{where}={spec!r}: edit counts must be positive and strictly increasing, e.g. 1,10,50,100")
    return steps


def split_mode(mode: str) -> tuple[str, int]:
    """"sequential:10" -> ("sequential", 10); "sequential" -> ("sequential", 1); "batch" -> ("batch", 0)
    (0: the mode has no edits-per-call count). ValueError for anything else."""
    kind, sep, n = str(mode).partition(":")
    if kind not in MODES or (sep and kind != "sequential"):
        raise ValueError(f"mode {mode!r}: choose one of {', '.join(MODES)} or sequential:N (N edits per call)")
    if not sep:
        return kind, 1 if kind == "sequential" else 0
    if not n.isdigit() or int(n) < 1:
        raise ValueError(f"mode {mode!r}: N of sequential:N must be a positive integer (edits per call)")
    return kind, int(n)


def parse_modes(spec: str, where: str = "config.eval.sequential_modes",
                steps: Sequence[int] | None = None) -> tuple[str, ...]:
    """"sequential,batch,sequential:10" -> the modes, checked (with `steps`: every T a multiple of
    the N of each sequential:N)."""
    modes = tuple(m.strip() for m in str(spec).split(",") if m.strip())
    if not modes:
        raise UserError(f"{where}={spec!r}: choose among {', '.join(MODES)}, sequential:N (comma separated)")
    for m in modes:
        try:
            kind, n = split_mode(m)
        except ValueError as e:
            raise UserError(f"{where}={spec!r}: {e}") from None
        bad = [t for t in steps or () if kind == "sequential" and t % n]
        if bad:
            raise UserError(f"{where}={spec!r}: mode {m!r} edits {n} rows per call, so every edit count must be a "
                            f"multiple of {n}; {', '.join(map(str, bad))} is not")
    return modes


def check_enough_edits(steps: Sequence[int], n_fail: int, where: str) -> None:
    """A clear error when more edits are asked than there are val fail rows to edit."""
    if steps and max(steps) > n_fail:
        raise UserError(
            f"config.eval.sequential asks for {max(steps)} edits but {where} has only {n_fail} val fail rows to edit; "
            f"ask for at most {n_fail} edits, or use more records (--config.limit) or a larger --config.val_fraction"
        )


# ----------------------------------------------------------------------------- weights


def changed_leaves(new: Any, old: Any) -> list[tuple[str, Any]]:
    """(path, leaf) of the leaves of `new` that are not the very same array as in `old` (edit
    functions return trees that share their untouched leaves with their input)."""
    out = []
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(new)[0], jax.tree.leaves(old)):
        if a is not b:
            out.append((jax.tree_util.keystr(path, simple=True, separator="/"), a))
    return out


def non_finite(new: Any, old: Any) -> list[str]:
    """Paths of the changed leaves of `new` that hold a NaN or an infinity."""
    return [p for p, x in changed_leaves(new, old)
            if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact) and not bool(jnp.isfinite(x).all())]


def add_change(params: Any, edited: Any, base: Any) -> Any:
    """params + (edited - base), leaf by leaf (leaves the edit left alone are kept as they are)."""
    return jax.tree.map(lambda p, e, b: p if e is b else p + (e - b).astype(p.dtype), params, edited, base)


# ----------------------------------------------------------------------------- scoring


def adapt_rows_of(fails: Sequence[dict], adapts: Mapping[str, list[dict]]) -> list[dict]:
    return [a for r in fails for a in adapts.get(r["record_id"], [])]


def portability_of(fails: Sequence[dict], portability: Mapping[str, list[dict]] | None) -> list[list[dict]]:
    """Per edit of `fails`, its portability question rows (record id -> rows; [] for none)."""
    return [list((portability or {}).get(r["record_id"], [])) for r in fails]


def study_gen_tokens(model, fails: Sequence[dict], extra_tokens: int) -> int:
    """The new-token budget of every generation of a study of `fails` (its max(steps) edits): the
    longest target + extra_tokens (`salem_jax.eval.generated.answer_budget`)."""
    from salem_jax.eval.generated import answer_budget

    return answer_budget(model, [r["target"] for r in fails], extra_tokens)


def base_generations_of(model, fails: Sequence[dict], extra_tokens: int) -> list[str]:
    """The base model's greedy generations of the edit prompts of `fails` (a study's max(steps)
    edits) with the study's budget: made once per study, sliced to each T's first T."""
    from salem_jax.eval.generated import generate_answers

    return generate_answers(model, model.params, [r["prompt"] for r in fails], [r["target"] for r in fails],
                            max_new_tokens=study_gen_tokens(model, fails, extra_tokens))


def score_after(model, params: Any, fails: Sequence[dict], adapts: Mapping[str, list[dict]], fixed: Mapping[str, list],
                base, *, before: Mapping[str, Any], batch_size: int, texts: Sequence[str] | None = None,
                text_window: int | None = None, generate: bool = False, extra_tokens: int = 2,
                portability: Sequence[Sequence[dict]] | None = None, gen_tokens: int | None = None) -> dict:
    """The scores of `params` after the edits of `fails` (see the module docstring). `base`: the
    `base_scores` of `fixed` (and texts); `before`: the base model's `correct` arrays of all the fail
    rows ("fail"), of their adapt rows ("adapt", in `adapt_rows_of` order) and of their portability
    questions ("portability", in `portability` order), and its generations of the fail prompts
    ("gen"). portability: per edit of the study (at least the T of `fails`), its question rows
    (`portability_of`); gen_tokens: the study's generation budget (None: `study_gen_tokens` of `fails`)."""
    T = len(fails)
    ad = adapt_rows_of(fails, adapts)
    f = score_rows(model, params, fails, batch_size=batch_size, progress=False, where="retention fail rows")
    out: dict[str, Any] = dict(
        edits=T, ea=float(np.mean(f["correct"])), ea_first=float(np.mean(f["correct"][:FIRST])),
        ea_before=float(np.mean(before["fail"][:T])), n_first=min(FIRST, T),
    )
    if ad:
        a = score_rows(model, params, ad, batch_size=batch_size, progress=False, where="retention adapt rows")
        out["adapt_acc"] = float(np.mean(a["correct"]))
        out["adapt_before"] = float(np.mean(before["adapt"][: len(ad)]))
    if fixed:
        m = evaluate_edit(model, model.params, params, fixed, texts=texts or None, batch_size=batch_size,
                          text_window=text_window, progress=False, base=base,
                          lost_rows=("keep",) if "keep" in fixed else ())
        for k in ("dd_acc", "locality", "dd_ppl_text_rel", "text_ppl_after"):
            if k in m:
                out[k] = m[k]
        if "keep/acc_after" in m:
            out["keep_acc"] = m["keep/acc_after"]
            out["keep_acc_before"] = m["keep/acc_before"]
            out["dd_keep_acc"] = m["keep/acc_before"] - m["keep/acc_after"]
            # which keep facts the T edits broke (right on the base model, wrong now), by row id
            out["keep_lost"] = [fixed["keep"][j].get("id") or fixed["keep"][j]["prompt"] for j in m["keep/lost"]]
    qs = [list(q) for q in (portability or [])[:T]]
    counts = [len(q) for q in qs]
    if sum(counts):  # salem_jax.eval.portability: the questions of every edit made so far
        pq = [q for x in qs for q in x]
        c = score_rows(model, params, pq, batch_size=batch_size, progress=False, where="retention portability rows")
        out["portability"] = portability_over_edits(c["correct"], counts)
        out["portability_before"] = portability_over_edits(before["portability"][: len(pq)], counts)
        out["n_portability"], out["portability_edits"] = len(pq), sum(1 for n in counts if n)
    if generate and model.kind != "classifier":
        from salem_jax.eval.generated import generate_answers, match_shares

        targets = [r["target"] for r in fails]
        n = study_gen_tokens(model, fails, extra_tokens) if gen_tokens is None else gen_tokens
        gens = generate_answers(model, params, [r["prompt"] for r in fails], targets, max_new_tokens=n)
        sh = match_shares(gens, targets)
        out["gen_starts"], out["gen_contains"] = sh["starts"], sh["contains"]
        if before.get("gen") is not None:
            sh0 = match_shares(list(before["gen"])[:T], targets)
            out["gen_starts_before"], out["gen_contains_before"] = sh0["starts"], sh0["contains"]
    return out


# ----------------------------------------------------------------------------- the loop


def many_edits(model, edit: Callable[[Any, list[dict]], Any], fails: Sequence[dict], adapts: Mapping[str, list[dict]],
               fixed: Mapping[str, list], *, steps: Sequence[int], mode: str, batch_size: int = 8,
               texts: Sequence[str] | None = None, text_window: int | None = None, generate: bool = False,
               extra_tokens: int = 2, on_result: Callable[[list[dict]], None] | None = None, progress: bool = False,
               base=None, portability: Mapping[str, list[dict]] | None = None,
               base_generations: Sequence[str] | None = None) -> list[dict]:
    """Apply the edits of `fails` in `mode` and score after each T in `steps`; one dict per T.

    fails: val fail rows in edit order (edit-set rows: record_id, id, prompt, target); adapts: record
    id -> its adapt rows; fixed: {"pass": rows, "keep": rows} scored against the base model;
    portability: record id -> its portability question rows (salem_jax.eval.portability.portability_rows;
    None or no questions: no portability scores); base_generations: the base model's generations of the
    first max(steps) fail prompts with the budget `study_gen_tokens` (`base_generations_of`; None: made here).
    `on_result(results so far)` is called after every T (e.g. to write them). Raises
    `NonFiniteEdit` when an edit produces NaN/inf weights."""
    from tqdm.auto import tqdm

    kind, per_call = split_mode(mode)
    steps = tuple(steps)
    parse_modes(mode, "mode", steps)
    check_enough_edits(steps, len(fails), "the edit list")
    fails = list(fails)[: max(steps)]
    p0 = model.params
    if base is None and fixed:
        base = base_scores(model, p0, fixed, texts=texts or None, batch_size=batch_size, text_window=text_window,
                           progress=False)
    before = {"fail": score_rows(model, p0, fails, batch_size=batch_size, progress=False)["correct"]}
    all_ad = adapt_rows_of(fails, adapts)
    if all_ad:
        before["adapt"] = score_rows(model, p0, all_ad, batch_size=batch_size, progress=False)["correct"]
    port = portability_of(fails, portability)
    all_port = [q for qs in port for q in qs]
    if all_port:
        before["portability"] = score_rows(model, p0, all_port, batch_size=batch_size, progress=False,
                                           where="portability rows")["correct"]
    gen_tokens = None
    if generate and model.kind != "classifier":
        gen_tokens = study_gen_tokens(model, fails, extra_tokens)
        if base_generations is None:
            base_generations = base_generations_of(model, fails, extra_tokens)
        if len(base_generations) < len(fails):
            raise ValueError(f"{len(base_generations)} base generations for the study's {len(fails)} edits")
        before["gen"] = list(base_generations)[: len(fails)]
    kw = dict(before=before, batch_size=batch_size, texts=texts, text_window=text_window, generate=generate,
              extra_tokens=extra_tokens, portability=port, gen_tokens=gen_tokens)
    results: list[dict] = []
    params, done, seconds = p0, 0, 0.0
    bar = tqdm(total=max(steps), desc=f"{mode} edits", disable=not progress)
    for T in steps:
        if kind == "batch":
            t0 = time.perf_counter()
            new = edit(p0, fails[:T])
            jax.block_until_ready(new)
            seconds = time.perf_counter() - t0
            bad = non_finite(new, p0)
            if bad:
                raise NonFiniteEdit(
                    f"batch edit of the first {T} val fail rows (the last is {fails[T - 1]['id']!r}) produced "
                    f"non-finite weights in {', '.join(bad)}; results of the earlier batches are kept",
                    edit=T, row_id=fails[T - 1]["id"], leaves=bad, results=results, params=params)
            params = new
            bar.update(T - bar.n)
        else:
            while done < T:
                n = per_call if kind == "sequential" else 1
                rows = fails[done : done + n]
                t0 = time.perf_counter()
                if kind == "sequential":
                    new = edit(params, rows)
                else:
                    new = add_change(params, edit(p0, rows), p0)
                jax.block_until_ready(new)
                seconds += time.perf_counter() - t0
                bad = non_finite(new, params)
                if bad:
                    what = (f"edit {done + 1} (val fail row {rows[0]['id']!r})" if n == 1 else
                            f"update of edits {done + 1}-{done + n} (val fail rows {rows[0]['id']!r} .. "
                            f"{rows[-1]['id']!r})")
                    raise NonFiniteEdit(
                        f"{mode} {what} produced non-finite weights in {', '.join(bad)}; stopped there, keeping "
                        f"the weights after edit {done} and the results so far",
                        edit=done + n, row_id=rows[-1]["id"], leaves=bad, results=results, params=params)
                params, done = new, done + n
                bar.update(n)
        r = dict(T=T, mode=mode, **score_after(model, params, fails[:T], adapts, fixed, base, **kw),
                 edit_seconds=seconds)
        results.append(r)
        if on_result is not None:
            on_result(results)
    bar.close()
    return results


# ----------------------------------------------------------------------------- the pipeline's study


def write_json(path: Path, payload: dict) -> None:
    """Atomic JSON write (a killed run leaves the previous file, never half of one)."""
    from salem_jax.pipeline import jsonable

    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(jsonable(payload), indent=2))
    os.replace(tmp, path)


ORDER_RECORD = -1  # config.eval.sequential_order_seed's default: the val fail rows in record order


def check_order_seed(value, name: str = "config.eval.sequential_order_seed") -> int:
    """config.eval.sequential_order_seed as an int: >= 0 (a seeded order) or ORDER_RECORD (-1, record
    order); anything else (a bool, a float, a string, < -1) is a UserError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise UserError(f"{name}={value!r}: give an integer seed >= 0 for a seeded edit order, or {ORDER_RECORD} "
                        "for the val fail rows' record order")
    if value < ORDER_RECORD:
        raise UserError(f"{name}={value}: give a seed >= 0 for a seeded edit order, or {ORDER_RECORD} for the "
                        "val fail rows' record order")
    return int(value)


def order_edits(fails: Sequence[dict], n: int, seed: int) -> list[dict]:
    """The first `n` of `fails` (the edits a study of max(steps) = n makes), in record order when
    `seed` is ORDER_RECORD (-1), else permuted: position i gets fails[perm[i]] with
    perm = numpy.random.default_rng(seed).permutation(n). The rows after the first n are not used."""
    seed = check_order_seed(seed)
    head = list(fails)[:n]
    if seed == ORDER_RECORD:
        return head
    perm = np.random.default_rng(seed).permutation(len(head))
    return [head[i] for i in perm]


def split_val(rows: Sequence[dict], max_pass: int) -> tuple[list[dict], dict[str, list[dict]], list[dict]]:
    """(fail rows in order, record id -> adapt rows, the first max_pass pass rows) of val rows."""
    fails = [r for r in rows if r["group"] == "fail"]
    adapts: dict[str, list[dict]] = {}
    for r in rows:
        if r["group"] == "adapt":
            adapts.setdefault(r["record_id"], []).append(r)
    return fails, adapts, [r for r in rows if r["group"] == "pass"][:max_pass]


def pipeline_study(model, edit, val_rows: Sequence[dict], keep: Sequence[dict], texts: Sequence[str], cfg, name: str,
                   work: Path, portability: Mapping[str, list[dict]] | None = None) -> dict:
    """config.eval.sequential for one method: every mode of config.eval.sequential_modes, written to
    work/many_edits_<name>.json after every T. A `NonFiniteEdit` is written there (with the results so
    far) and re-raised, carrying `.method` (name), `.mode` and `.study` ({mode: results so far}, the
    modes done and the stopped one's earlier T) for the pipeline's results.json. Returns {mode: [result
    per T]}. portability: record id -> portability question rows (as the one-at-a-time evaluation gets
    them; None: not scored). With config.eval.generate the base model's generations of the edit prompts
    are made once here for every mode."""
    steps = parse_steps(cfg.eval.sequential)
    modes = parse_modes(cfg.eval.sequential_modes, steps=steps)
    order_seed = check_order_seed(cfg.eval.get("sequential_order_seed", ORDER_RECORD))
    fails, adapts, passes = split_val(val_rows, cfg.eval.max_pass)
    check_enough_edits(steps, len(fails), f"method {name!r}")
    fails = order_edits(fails, max(steps), order_seed)  # record order, or seeded (config.eval.sequential_order_seed)
    fixed = {"pass": passes, **({"keep": list(keep)} if keep else {})}
    texts = list(texts) if texts and cfg.eval.ppl_edits else []
    base = base_scores(model, model.params, fixed, texts=texts or None, batch_size=cfg.eval.batch_size,
                       text_window=cfg.eval.text_window, progress=False)
    generate = bool(cfg.eval.generate) and model.kind != "classifier"
    base_gens = base_generations_of(model, fails, cfg.eval.gen_extra_tokens) if generate else None
    path = work / f"many_edits_{name}.json"
    payload: dict[str, Any] = dict(method=name, steps=list(steps), modes=list(modes), n_pass=len(passes),
                                   n_keep=len(keep), texts=len(texts), order_seed=order_seed,
                                   edit_order=[r["id"] for r in fails], results={})
    for mode in modes:
        def save(results, mode=mode):
            payload["results"][mode] = list(results)
            write_json(path, payload)

        try:
            many_edits(model, edit, fails, adapts, fixed, steps=steps, mode=mode, batch_size=cfg.eval.batch_size,
                       texts=texts, text_window=cfg.eval.text_window, generate=bool(cfg.eval.generate),
                       extra_tokens=cfg.eval.gen_extra_tokens, on_result=save, progress=cfg.progress, base=base,
                       portability=portability, base_generations=base_gens)
        except NonFiniteEdit as e:
            payload["results"][mode] = list(e.results)
            payload["error"] = dict(mode=mode, edit=e.edit, row_id=e.row_id, leaves=e.leaves, message=str(e))
            write_json(path, payload)
            e.method, e.mode, e.study = name, mode, payload["results"]  # for the pipeline's results.json
            raise
    return payload["results"]


def plot_many_edits(studies: Mapping[str, Mapping[str, list[dict]]], path: str | os.PathLike,
                    goals: Mapping[str, float] | None = None) -> None:
    """Retention EA and keep accuracy (or pass-row accuracy drawdown without a keep set) against T,
    one line per (method, mode). studies: method -> {mode: results} (a "method" may be any label, e.g.
    "alphaedit order 3" when benchmarks/plot_many_edits.py overlays runs). Shares are drawn on [0, 1];
    goals: panel key -> a grey dotted line (e.g. {"ea_first": 0.8, "keep_acc": 0.95})."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    has_keep = any("keep_acc" in r for s in studies.values() for rs in s.values() for r in rs)
    panels = [("ea", "retention EA (all edits so far)"), ("ea_first", f"EA of the first {FIRST} edits"),
              ("keep_acc", "keep-set accuracy") if has_keep else ("dd_acc", "DD (val pass accuracy)")]
    fig, ax = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6))
    styles = {"sequential": "-", "independent": "--", "batch": ":"}  # equal values stay visible; sequential:N "-."
    for method, by_mode in studies.items():
        for mode, rs in by_mode.items():
            xs = [r["T"] for r in rs]
            for a, (key, _) in zip(ax, panels):
                a.plot(xs, [r.get(key, np.nan) for r in rs], marker="o", linestyle=styles.get(mode, "-."),
                       label=f"{method} {mode}")
    for a, (key, title) in zip(ax, panels):
        a.set(xscale="log", xlabel="edits made (T)", title=title)
        if key in SHARES:  # a share on the full [0, 1] scale: autoscaling made 0.90-1.00 look like a collapse
            a.set_ylim(-0.02, 1.02)
        if goals and key in goals:
            a.axhline(goals[key], color="grey", linestyle=":", linewidth=1)
        a.set_xticks(sorted({r["T"] for s in studies.values() for rs in s.values() for r in rs}))
        a.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        a.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summary_table(studies: Mapping[str, Mapping[str, list[dict]]]) -> str:
    """Markdown: one row per (method, mode, T); '-' where a score is absent (e.g. `portability`
    without portability questions, `gen_*` without config.eval.generate)."""
    cols = [("ea", "retention EA"), ("ea_first", "EA first 10"), ("adapt_acc", "adapt"), ("portability", "portability"),
            ("gen_starts", "gen starts"), ("gen_contains", "gen contains"), ("dd_acc", "DD pass"), ("locality", "locality"),
            ("keep_acc", "keep acc"), ("dd_keep_acc", "DD keep"),
            ("dd_ppl_text_rel", "DD text ppl"), ("edit_seconds", "edit s")]
    lines = ["| method | mode | T | " + " | ".join(c for _, c in cols) + " |", "|---|---|---|" + "---|" * len(cols)]
    for method, by_mode in studies.items():
        for mode, rs in by_mode.items():
            for r in rs:
                vals = ["-" if r.get(k) is None else _number(r[k]) for k, _ in cols]
                lines.append(f"| {method} | {mode} | {r['T']} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def _number(x: float) -> str:
    """Three decimals, or three significant digits beyond 1e6: a collapsed model's perplexity ratio
    (1.9e69 after 100 MEND edits) printed with %.3f was a 70-digit cell."""
    return f"{x:.3g}" if abs(x) >= 1e6 else f"{x:.3f}"


def keep_lost_lines(studies: Mapping[str, Mapping[str, list[dict]]]) -> str:
    """Markdown: per (method, mode) and T, the keep facts lost after the T edits (`keep_lost` of
    `score_after`: row ids - a keep row without an id is named by its prompt - of the facts right on
    the base model and wrong after the T edits) and those lost for the first time at that T; '' when
    no result has `keep_lost` (no keep set, or a study written before it existed)."""
    lines = []
    for method, by_mode in studies.items():
        for mode, rs in by_mode.items():
            seen: set = set()
            for r in rs:
                if "keep_lost" not in r:
                    continue
                new = [i for i in r["keep_lost"] if i not in seen]
                seen.update(r["keep_lost"])
                lines.append(f"- {method} {mode}, T = {r['T']}: {len(r['keep_lost'])} lost"
                             + (f" ({', '.join(map(str, r['keep_lost']))}); new: {', '.join(map(str, new)) or 'none'}"
                                if r["keep_lost"] else ""))
    return ("Keep facts lost (right on the base model, wrong after T edits):\n\n" + "\n".join(lines)) if lines else ""
