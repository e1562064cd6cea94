"""A held-out *keep set*: facts the base model already gets right, unseen by the editor.

The drawdown of the paper (SaLEM appendix B.2) is the accuracy drop on inputs that must not
change. The val split's pass rows measure it, but a small edit set has few of them (SmolLM2's
capitals val split has 6, so DD moves in steps of 1/6). A keep set is a larger sample of other
facts, e.g. the other relations of the country data (region, currency, official language), of
which the base model answers `max_rows` correctly (whole target the teacher-forced argmax).
Every edit is then scored on them too: `dd_keep_acc` = accuracy before minus after (before is 1
by construction) and `keep/locality` (share of their target tokens whose argmax is unchanged).

    rows = keep_rows(model, records, max_rows=48, seed=0)   # [{"prompt", "target", "group": "keep", ...}]

Records come from any reader (`EditRecord`s with a true target); only generation models
(causal and seq2seq) are supported: a classifier's held-out inputs are its val pass rows.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from salem_jax.data.records import EditRecord


def candidate_rows(records: Sequence[EditRecord], where: str = "keep records") -> list[dict]:
    """One row per record with a true target: {"id", "record_id", "group": "keep", "prompt", "target"}."""
    rows = []
    for i, r in enumerate(records):
        if not r.target_true.strip():
            raise ValueError(f"{where}: record {i} ({r.id!r}) has an empty field 'target_true'; a keep row needs the true answer")
        rows.append({"id": f"keep:{r.id}", "record_id": r.id, "group": "keep", "prompt": r.prompt, "target": r.target_true})
    return rows


def keep_relation(row: Mapping) -> str:
    """The relation of a keep row of the country data (its record id "countryinfo:REL:COUNTRY")."""
    from salem_jax.data.countries import SOURCE

    parts = str(row.get("record_id", "")).split(":")
    if len(parts) < 3 or parts[0] != SOURCE or not parts[1]:
        raise ValueError(f"keep row {row.get('id', '?')!r}: record id {row.get('record_id')!r} is not a country fact "
                         f"('{SOURCE}:RELATION:COUNTRY'); config.eval.keep_split needs a country keep set")
    return parts[1]


def split_by_relation(rows: Sequence[Mapping]) -> tuple[list, dict[str, tuple[int, int]]]:
    """The keep rows grouped by relation (stable; relations in first-seen order) and each relation's
    rows [a, b) in that list."""
    rels = [keep_relation(r) for r in rows]
    order = list(dict.fromkeys(rels))
    out, spans = [], {}
    for rel in order:
        a = len(out)
        out += [r for r, x in zip(rows, rels) if x == rel]
        spans[rel] = (a, len(out))
    return out, spans


def keep_rows(
    model,
    records: Sequence[EditRecord],
    *,
    max_rows: int,
    seed: int = 0,
    params: Any = None,
    batch_size: int = 16,
    exclude_prompts: Sequence[str] = (),
    progress: bool = False,
) -> list[dict]:
    """Up to `max_rows` rows of `records` that the base model gets right, in a seeded order.

    Rows are scored in chunks of `4 * batch_size` (shuffled with `seed`) until `max_rows` are
    correct, so a large record list costs only what is needed. Prompts in `exclude_prompts`
    (e.g. every prompt of the edit set) are left out, so the set is truly held out. Returns
    fewer rows when fewer are correct; raises if none is."""
    from salem_jax.eval.metrics import score_rows

    if model.kind == "classifier":
        raise ValueError("a keep set is for generation models; a classifier's held-out inputs are its val pass rows")
    if max_rows <= 0:
        raise ValueError(f"max_rows must be positive, got {max_rows}")
    params = model.params if params is None else params
    excluded = set(exclude_prompts)
    rows = [r for r in candidate_rows(records) if r["prompt"] not in excluded]
    order = np.random.default_rng(seed).permutation(len(rows))
    chosen: list[dict] = []
    chunk = 4 * batch_size
    for start in range(0, len(order), chunk):
        part = [rows[j] for j in order[start : start + chunk]]
        correct = score_rows(model, params, part, batch_size=batch_size, progress=progress, where="keep rows")["correct"]
        chosen += [r for r, ok in zip(part, correct) if ok]
        if len(chosen) >= max_rows:
            break
    if not chosen:
        raise ValueError(f"the base model gets none of the {len(rows)} keep rows right; a keep set needs facts it knows")
    return chosen[:max_rows]


def country_facts_outside_keep(records, keep, relations, *, countries=None, other_rows=()) -> list:
    """The country-fact records strictly disjoint from the keep set, in input order.

    records: EditRecords of the country data (`extra["country"]`, `extra["relation"]`; pass every
    relation's records, so a keep row of any relation names its country); keep: the keep rows
    (their `record_id`s name country records); relations: the relations a record may have;
    countries: the countries it may be of (None: any); other_rows: rows whose prompts are excluded
    too (e.g. an edit set's). A record qualifies when its relation is in `relations`, its country
    is in `countries` and is the country of no keep row, and its prompt is no keep row's and no
    other row's. Used by `pipeline.train_pass_candidates` (the train countries) and by AlphaEdit's
    country-fact memory (`methods.locate_edit.preserved_fact_requests`, any country)."""
    by_id = {r.id: r for r in records}
    keep_c = {by_id[k["record_id"]].extra.get("country") for k in keep if k["record_id"] in by_id}
    banned = {r["prompt"] for r in list(keep) + list(other_rows)}
    return [
        r for r in records
        if r.extra.get("relation") in relations and r.extra.get("country") is not None
        and (countries is None or r.extra["country"] in countries) and r.extra["country"] not in keep_c
        and r.prompt not in banned
    ]
