"""Generated answers: does the edited model *say* the new target when it decodes greedily?

Edit accuracy EA (salem_jax.eval.metrics; SaLEM eq. 7) is teacher forced: every target token is
scored with the gold prefix before it. A model can pass that and still generate something else
(a known complaint of EasyEdit users), so beside EA we report what greedy decoding
(`salem_jax.generate.greedy`) produces, before and after the edit:

* **starts**: the share of prompts whose continuation starts with the target;
* **contains**: the share whose continuation contains the target anywhere.

Matching is on normalised text: whitespace runs collapsed to one space, leading/trailing
whitespace dropped, case folded (" Paris." starts with "paris"). Generation is kept cheap:
`max_new_tokens` = the target's token count + `extra_tokens` (config.eval.gen_extra_tokens, 2 by
default), so "contains" looks only a couple of tokens past the target's length.

Per edit (`edit_generation_metrics`) the prompts are the edit prompt (`gen/fail_*`) and its
rephrasings (`gen/adapt_*`, the share over the rephrasings); each edit's shares are averaged over
edits by the pipeline. ROME's generation fluency (salem_jax.eval.fluency) on CounterFact's
`generation_prompts` is `generation_fluency_metrics`.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def normalise(text: str) -> str:
    """Whitespace collapsed and stripped, case folded."""
    return " ".join(text.split()).casefold()


def answer_match(generation: str, target: str) -> tuple[bool, bool]:
    """(starts, contains): whether the normalised generation starts with / contains the
    normalised target. An empty target matches nothing."""
    t = normalise(target)
    if not t:
        return False, False
    g = normalise(generation)
    return g.startswith(t), t in g


def match_shares(generations: Sequence[str], targets: Sequence[str]) -> dict[str, float]:
    """{"starts", "contains"}: shares of (generation, target) pairs that match (NaN for none)."""
    if len(generations) != len(targets):
        raise ValueError(f"{len(generations)} generations for {len(targets)} targets")
    if not generations:
        return {"starts": float("nan"), "contains": float("nan")}
    m = np.asarray([answer_match(g, t) for g, t in zip(generations, targets)], bool)
    return {"starts": float(m[:, 0].mean()), "contains": float(m[:, 1].mean())}


def target_tokens(model, target: str) -> int:
    """Number of tokens of `target` as an answer (with its leading space for causal LMs)."""
    text = target if model.kind == "seq2seq" else " " + target.lstrip()
    return len(model.tokenizer(text, add_special_tokens=False)["input_ids"])


def answer_budget(model, targets: Sequence[str], extra_tokens: int = 2) -> int:
    """New tokens to generate for `targets`: the longest target's token count + extra_tokens (>= 1)."""
    return max(1, max(target_tokens(model, t) for t in targets) + extra_tokens)


def generate_answers(model, params: Any, prompts: Sequence[str], targets: Sequence[str], *, extra_tokens: int = 2,
                     batch_size: int = 32, kv_cache: bool | None = None,
                     max_new_tokens: int | None = None) -> list[str]:
    """Greedy continuations of `prompts`, each long enough for the longest target + extra_tokens
    (`answer_budget`), or `max_new_tokens` new tokens when given (one budget shared by several
    calls, e.g. the many-edits study's before and after generations).
    kv_cache: as `salem_jax.generate.greedy_ids` (None: cached where the model supports it)."""
    from salem_jax.generate import greedy

    if not prompts:
        return []
    n = answer_budget(model, targets, extra_tokens) if max_new_tokens is None else int(max_new_tokens)
    if n < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: generate at least one new token")
    return greedy(model, params, list(prompts), max_new_tokens=n, batch_size=batch_size, kv_cache=kv_cache)


def generations_per_edit(model, params: Any, edits: Sequence[tuple[dict, Sequence[dict]]], *, extra_tokens: int = 2,
                         batch_size: int = 32, kv_cache: bool | None = None) -> list[list[str]]:
    """Greedy generations of every edit's prompts (its fail row, then its rephrasings) by one
    model, batched across edits: per edit, the list `edit_generation_metrics` makes itself (each
    edit's rows get its own longest target + extra_tokens new tokens; edits that need the same
    number share calls). The base model's side of the pipeline's evaluation, computed once."""
    from salem_jax.generate import greedy

    need = [max(target_tokens(model, r["target"]) for r in (f, *a)) + extra_tokens for f, a in edits]
    out: list[list[str]] = [[] for _ in edits]
    for n in sorted(set(need)):
        which = [i for i, k in enumerate(need) if k == n]
        prompts = [r["prompt"] for i in which for r in (edits[i][0], *edits[i][1])]
        gens = iter(greedy(model, params, prompts, max_new_tokens=max(n, 1), batch_size=batch_size, kv_cache=kv_cache))
        for i in which:
            out[i] = [next(gens) for _ in range(1 + len(edits[i][1]))]
    return out


def stack_edits(base_params: Any, edited: Sequence[Any]) -> tuple[tuple[str, ...], list]:
    """(paths, leaves): the parameter paths any of `edited` changed against `base_params`
    (`salem_jax.models.from_block.changed_paths`: same objects are unchanged, others compared by
    value) and per path the stacked leaves [E, ...] (an edit that left a path alone contributes
    the base leaf). What `salem_jax.generate.greedy_ids_many` takes: E edited models as one base
    plus the few leaves they changed (a MEND edit of one MLP: 3 of ~270 leaves)."""
    import jax.numpy as jnp

    from salem_jax.models.base import get_path
    from salem_jax.models.from_block import changed_paths

    changed = [set(changed_paths(base_params, p)) for p in edited]
    paths = tuple(sorted(set().union(*changed))) if changed else ()
    leaves = [jnp.stack([get_path(p, k) if k in c else get_path(base_params, k) for p, c in zip(edited, changed)])
              for k in paths]
    return paths, leaves


def kept_edit(base_params: Any, edited: Any) -> dict:
    """`edited` as the base tree with only its changed leaves replaced (`set_path` copies the dicts
    along each path, every other leaf is the base's own object): what an evaluation keeps of each
    of many edits until `generations_after_edits` - a few MB per MEND edit of one MLP instead of a
    whole parameter tree when an editor returns new objects for unchanged leaves."""
    from salem_jax.models.base import get_path, set_path
    from salem_jax.models.from_block import changed_paths

    out = base_params
    for k in changed_paths(base_params, edited):
        out = set_path(out, k, get_path(edited, k))
    return out


def generations_after_edits(model, base_params: Any, edited: Sequence[Any], edits: Sequence[tuple[dict, Sequence[dict]]],
                            *, extra_tokens: int = 2, batch_size: int = 32, models_per_call: int = 32,
                            kv_cache: bool | None = None) -> list[list[str]]:
    """Greedy generations of edit e's prompts (its fail row, then its rephrasings) by its own edited
    model `edited[e]`, for every edit in few batched calls (`salem_jax.generate.greedy_many`: the
    weights the edits share are read once per decoding step for all of them). Per edit, the list
    `edit_generation_metrics` would generate after that edit (same prompts, same max_new_tokens =
    the edit's longest target + extra_tokens; tests/test_generate_many.py). Causal LMs."""
    from salem_jax.generate import greedy_many

    if len(edited) != len(edits):
        raise ValueError(f"{len(edited)} edited parameter trees for {len(edits)} edits")
    if not edits:
        return []
    paths, leaves = stack_edits(base_params, edited)
    prompts = [[r["prompt"] for r in (f, *a)] for f, a in edits]
    need = [max(1, max(target_tokens(model, r["target"]) for r in (f, *a)) + extra_tokens) for f, a in edits]
    return greedy_many(model, base_params, paths, leaves, prompts, need, batch_size=batch_size,
                       models_per_call=models_per_call, kv_cache=kv_cache)


def generations_before_after_edits(model, base_params: Any, edited: Sequence[Any],
                                   edits: Sequence[tuple[dict, Sequence[dict]]], *, extra_tokens: int = 2,
                                   batch_size: int = 32, edits_per_call: int = 32,
                                   shared_prefill: bool = True) -> tuple[list[list[str]], list[list[str]]]:
    """(before, after): per edit, the base model's and the edited model `edited[e]`'s greedy
    generations of edit e's prompts (its fail row, then its rephrasings) - what
    `generations_after_edits(model, base_params, [base_params] * E + edited, edits + edits)` gives
    split in two halves (the pipeline's call before session 16), the same tokens - in few batched
    calls (`salem_jax.generate.greedy_ids_before_after`: the edited models' prefill starts at the
    first block the edits changed, on the base prefill's hidden state and keys and values below it;
    shared_prefill=False: every block of both prefills runs). Causal LMs with a KV cache."""
    from salem_jax.generate import _encode_prompts, decode_continuation, greedy_ids_before_after

    if len(edited) != len(edits):
        raise ValueError(f"{len(edited)} edited parameter trees for {len(edits)} edits")
    if not edits:
        return [], []
    paths, leaves = stack_edits(base_params, edited)
    prompts = [[r["prompt"] for r in (f, *a)] for f, a in edits]
    need = [max(1, max(target_tokens(model, r["target"]) for r in (f, *a)) + extra_tokens) for f, a in edits]
    before, after = greedy_ids_before_after(model, base_params, paths, leaves, prompts, need, batch_size=batch_size,
                                            edits_per_call=edits_per_call, shared_prefill=shared_prefill)
    tok = model.tokenizer
    encoded = [_encode_prompts(tok, ps) if ps else [] for ps in prompts]

    def texts(new):
        return [[decode_continuation(tok, p, n) for p, n in zip(enc, ns)] for enc, ns in zip(encoded, new)]

    return texts(before), texts(after)


def edit_generation_metrics(model, base_params: Any, edited_params: Any, fail_row: dict, adapt_rows: Sequence[dict],
                            *, extra_tokens: int = 2, base_generations: list[str] | None = None,
                            edited_generations: list[str] | None = None) -> dict[str, float]:
    """Generated-answer shares of one edit: `gen/fail_starts_before`, `gen/fail_starts_after`,
    `gen/fail_contains_before`, `gen/fail_contains_after` on the edit prompt and the same
    `gen/adapt_*` on its rephrasings (absent when it has none). Rows: edit-set rows (prompt, target).
    base_generations / edited_generations: the two models' generations of the rows, if computed
    already (`generations_per_edit`, `generations_after_edits`); edited_params is then unused."""
    rows = [fail_row, *adapt_rows]
    prompts, targets = [r["prompt"] for r in rows], [r["target"] for r in rows]
    before = base_generations
    if before is None:
        before = generate_answers(model, base_params, prompts, targets, extra_tokens=extra_tokens)
    after = edited_generations
    if after is None:
        after = generate_answers(model, edited_params, prompts, targets, extra_tokens=extra_tokens)
    out = {}
    for when, gens in (("before", before), ("after", after)):
        for group, sl in (("fail", slice(0, 1)), ("adapt", slice(1, None))):
            if not rows[sl]:
                continue
            sh = match_shares(gens[sl], targets[sl])
            out[f"gen/{group}_starts_{when}"] = sh["starts"]
            out[f"gen/{group}_contains_{when}"] = sh["contains"]
    return out


def generation_fluency_metrics(model, base_params: Any, edited_params: Any, prompts: Sequence[str], *,
                               max_new_tokens: int) -> dict[str, float]:
    """ROME's generation fluency (salem_jax.eval.fluency: weighted bi/tri-gram entropy of prompt +
    greedy continuation) of both models: `gen/fluency_before`, `gen/fluency_after`."""
    from salem_jax.eval.fluency import generation_fluency

    return {
        "gen/fluency_before": generation_fluency(model, base_params, prompts, max_new_tokens=max_new_tokens),
        "gen/fluency_after": generation_fluency(model, edited_params, prompts, max_new_tokens=max_new_tokens),
    }
