"""Edit until the request's own target is reached: a trained editor applied again on the weights its
first edit produced, at most `retries` more times, while the edited model still does not give the
request's target after its prompt.

Why: MEND's editor maps one gradient to one weight change; on SmolLM2's capitals the main job's
editor leaves a few edits short on their own prompt after that one change (Grenada "St. George's",
Kazakhstan "Nur-Sultan", Libya "Tripoli", at editor seed 0 on session 28's machine), and a
second application - the editor fed the gradient of the *edited* model, i.e. `apply_edits(...,
mode="sequential")` with the request twice - reaches them (session 29's probe, README "The main
job"). The request itself says whether the edit took: the check is the teacher-forced exact match of
its target (the EA criterion, `eval.metrics.batch_scores`'s `correct`) on its own prompt, so an
edit that is reached the first time is never changed, and no held-out row is looked at. A retry is kept
only when it reaches more of the requests than the edit before it: an edit the retries cannot bring to its
target comes back as its first application. Locate-then-edit methods have the same check built in (ROME's
v* is optimised until the prompt gives the target).

    reached(model, params, rows) -> bool [N]   each row's target is the argmax after its prompt
    edit_until_reached(model, edit, params, rows, retries, first=None) -> (params, applications kept, tried)
    with_retries(model, edit, edit_each, retries, info, name) -> (edit, edit_each) that retry

`edit(params, rows) -> params` and `edit_each(params, rows) -> [params]` are a method's functions
(`methods.registry.Prepared`); retries go through the same function as the first edit (with its
null-space projection, its padding to `like`), so a retry is exactly a second sequential edit. Used by
the MEND methods (`config.eval.mend_edit_retries`) and the locate-then-edit ones (`config.locate_edit.retries`,
whose edit function carries AlphaEdit's memory into a retry).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

# rows per scoring call (padded): one compiled program for any number of rows up to it
CHECK_ROWS = 8


def check_retries(value, name: str = "config.eval.mend_edit_retries") -> int:
    """`value` as an int >= 0 (the number of extra applications allowed), or a ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < 0:
        raise ValueError(f"{name}={value!r}: give an integer >= 0 (0 = each edit applied once, as trained)")
    return int(value)


def reached(model, params: Any, rows: Sequence[dict]) -> np.ndarray:
    """bool [N]: whether each row's whole target (row["target"], after row["prompt"]) is the argmax at
    every target position on `params`, teacher forced - `eval.metrics.score_rows`'s `correct`, the
    per-edit EA, CHECK_ROWS rows per call (padded), so checks of rows of similar length share one
    compiled program."""
    from salem_jax.eval.metrics import score_rows

    rows = list(rows)
    if not rows:
        return np.zeros(0, bool)
    return score_rows(model, params, rows, batch_size=CHECK_ROWS, progress=False, where="edit check")["correct"].astype(bool)


def edit_until_reached(model, edit: Callable, params: Any, rows: Sequence[dict], retries: int,
                       first: Any = None) -> tuple[Any, int, int]:
    """(edited parameters, applications in them, applications tried): `edit(params, rows)` (or `first`,
    its result when already computed), then, while some row's target is not reached and fewer than
    `retries` extra applications were made, `edit(edited, the rows not reached)` on top. What comes back
    is the earliest of the edits tried that reaches the most rows - so a retry is kept only when it
    reaches more than the edit before it, and an edit the retries cannot bring to its target comes back
    as its first application (session 29 on zsRE: three applications of an edit that never reached its
    target tripled its spill onto the keep set and held-out text). retries 0: the first edit, unchecked."""
    retries = check_retries(retries, "retries")
    rows = list(rows)
    edited = edit(params, rows) if first is None else first
    if retries == 0:
        return edited, 1, 1
    tried, best = 1, None
    while True:
        ok = reached(model, edited, rows)
        if best is None or int(ok.sum()) > best[2]:
            best = (edited, tried, int(ok.sum()))
        if ok.all() or tried > retries:
            break
        edited = edit(edited, [r for r, o in zip(rows, ok) if not o])
        tried += 1
    return best[0], best[1], tried


def with_retries(model, edit: Callable, edit_each: Callable | None, retries: int, info: dict,
                 name: str = "config.eval.mend_edit_retries"):
    """A method's (edit, edit_each) that retry each edit up to `retries` times (`edit_until_reached`;
    edit_each: each row on its own, from its first edit computed together); with retries 0 the very
    same functions. info["edit_retries"] = {"max": retries, "option": name, "applications": [...],
    "tried": [...]}: every edit call's number of applications in the edit returned and tried, in the
    order the calls were made (the pipeline's evaluation edits the val fail rows in order, one per row;
    the many-edits study then one call per batch). `name`: the option that set `retries` (messages)."""
    retries = check_retries(retries, name)
    if retries == 0:
        return edit, edit_each
    kept: list[int] = []
    tried: list[int] = []
    info["edit_retries"] = {"max": retries, "option": name, "applications": kept, "tried": tried}

    def edit_r(params, rows):
        out, n, t = edit_until_reached(model, edit, params, rows, retries)
        kept.append(n)
        tried.append(t)
        return out

    if edit_each is None:
        return edit_r, None

    def edit_each_r(params, rows):
        rows = list(rows)
        firsts = list(edit_each(params, rows))
        out = []
        for row, first in zip(rows, firsts):
            p, n, t = edit_until_reached(model, edit, params, [row], retries, first=first)
            kept.append(n)
            tried.append(t)
            out.append(p)
        return out

    return edit_r, edit_each_r
