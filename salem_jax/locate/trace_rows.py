"""Causal tracing of edit-set rows: which rows can be traced, and their traced layer profile.

Causal tracing (and ROME) need each fact's subject, which the edit set does not keep: it comes
from the records (`EditRecord.subject`), keyed by the rows' `record_id`. A row can be traced only
if its subject occurs in its prompt (the noise goes on the subject's tokens). Shared by
`salem locate --method causal-trace` and the pipeline's `causal` / `rome` methods.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence
from salem_jax.data.tokenize import encode
from salem_jax.locate.causal_trace import subject_token_mask, trace_profile


def subject_in_prompt(prompt: str, subject: str) -> str | None:
    """`subject` as spelled in `prompt` (exact match first, then case-insensitive), or None when
    the subject is empty or absent. ROME's token lookup needs the prompt's own spelling."""
    if not subject:
        return None
    if subject in prompt:
        return subject
    low = prompt.lower()
    if len(low) != len(prompt):  # lower-casing changed character offsets (rare Unicode): no safe slice
        return None
    a = low.find(subject.lower())
    return None if a < 0 else prompt[a : a + len(subject)]


def rows_with_subject(
    rows: Sequence[dict], subjects: Mapping[str, str], group: str = "fail"
) -> tuple[list[tuple[dict, str]], list[str]]:
    """Split the rows of `group` into traceable ones and the rest.

    Returns ([(row, subject as spelled in its prompt)], [ids of the group's rows whose record has
    no known subject or whose subject does not occur in the prompt]), both in row order."""
    usable, skipped = [], []
    for r in rows:
        if r["group"] != group:
            continue
        s = subject_in_prompt(r["prompt"], subjects.get(r["record_id"], ""))
        if s is None:
            skipped.append(r["id"])
        else:
            usable.append((r, s))
    return usable, skipped


def trace_edit_rows(
    model,
    params: Any,
    rows: Sequence[dict],
    subjects: Mapping[str, str],
    *,
    group: str = "fail",
    max_facts: int | None = None,
    select: str = "last_subject",
    top_k: int = 1,
    layers: Sequence[str] | None = None,
    n_noise: int = 10,
    restorations_per_call: int = 8,
    seed: int = 0,
    progress: bool = False,
):
    """Causal-trace the first `max_facts` (None = all) rows of `group` whose subject occurs in
    their prompt, in row order; returns the `LayerProfile` of `causal_trace.trace_profile`.

    `profile.extra` also holds `fact_rows` (ids of the traced rows) and `skipped_rows` (ids of the
    group's rows left out for want of a subject in the prompt). Raises ValueError when no row of
    the group can be traced."""

    usable, skipped = rows_with_subject(rows, subjects, group)
    n_group = len(usable) + len(skipped)
    if not n_group:
        raise ValueError(f"no {group!r} rows to trace")
    if not usable:
        raise ValueError(f"none of the {n_group} {group!r} rows has a subject that occurs in its prompt")
    if max_facts is not None:
        if max_facts < 1:
            raise ValueError(f"max_facts must be >= 1, got {max_facts}")
        usable = usable[:max_facts]
    prompts = [r["prompt"] for r, _ in usable]
    batch = encode(model, prompts, [r["target"] for r, _ in usable], where="causal trace")
    sm = subject_token_mask(model, prompts, [s for _, s in usable], batch["input_ids"].shape[1])
    prof, _ = trace_profile(
        model, params, batch, sm, select=select, top_k=top_k, group=group, layers=layers, n_noise=n_noise,
        restorations_per_call=restorations_per_call, seed=seed, progress=progress,
    )
    prof.extra["fact_rows"] = [r["id"] for r, _ in usable]
    prof.extra["skipped_rows"] = skipped
    return prof
