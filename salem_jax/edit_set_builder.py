"""Building the paper's edit set: score records with the base model into fail / adapt / pass rows.

Moved here from `salem_jax/data/edit_set.py` (which keeps the rows' format, saving, loading and
batching: everything that runs no model), so the data layer does not run the model; the
layers point one way: models <- data <- this module <- pipeline / commands.

Two modes (SaLEM appendix A):

correction (the paper's setting): target = the true answer. Each record's prompt is scored;
    a record the model gets wrong gives one "fail" row plus one "adapt" row per rephrase; a
    record it gets right gives one "pass" row (its prompt).
counterfactual (ROME/MEND's setting): every record is an edit: a "fail" row toward
    `target_new` plus "adapt" rows (rephrases toward `target_new`); its locality prompts become
    "pass" rows with their given answers (or, where none is given, the base model's own greedy
    answer). For classification records (FEVER, NLI) the paper samples the edit labels with a
    Bernoulli(0.5): each record is flipped with probability `flip_probability`; a flipped record
    becomes a "fail" row toward another label (the other one, for binary labels), an unflipped
    one a "pass" row with its true label.

"Correct" for generation means every target token is the argmax under teacher forcing
(`losses.example_correct`, the paper's edit accuracy); the share of target tokens that are
(`base_token_acc`) is kept too. For classifiers it is the argmax label.

Scoring is batched and jitted: every row is tokenized once to find its length bucket
(`tokenize.bucket_length`), rows of one bucket are encoded to that fixed length in batches of
exactly `batch_size` (the last one padded with `pad_rows`), so the scorer compiles once per
bucket. The LM head runs at the target positions only (`salem_jax.scored_logits`, one K per
bucket): correctness needs the argmax there and nowhere else. The split into train / val is by record (all rows of a record stay together),
deterministic for a seed and the same for every model and mode given the same records.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections import defaultdict
from typing import Any, Sequence

import datasets
import jax
import numpy as np
from tqdm.auto import tqdm

from salem_jax import losses
from salem_jax.data.edit_set import (
    COLUMNS,
    CORRECT_CRITERION,
    GROUPS,
    MODES,
    SPLITS,
    EditSet,
    edit_set_features,
    encode_rows,
    split_records,
)
from salem_jax.data.records import EditRecord, RecordError, Skipped
from salem_jax.data.tokenize import (
    DEFAULT_BUCKETS,
    DEFAULT_TOKEN_BUDGET,
    bucket_length,
    pad_rows,
    rows_per_batch,
    slice_rows,
    target_text,
    token_ids,
    token_limit,
)
from salem_jax.generate import greedy
from salem_jax.scored_logits import scored_logits, with_score_positions


# ---------------------------------------------------------------------------------------------
# Rows and their tokenized lengths (mirrors tokenize.encode, to find each row's bucket)


@dataclasses.dataclass
class _Row:
    rec: int  # index of the record
    field: str
    group: str
    prompt: str
    target: str
    target_true: str
    label: int = -1
    text_pair: str = ""
    shape: tuple = ()  # (length,) or (source length, target length): the bucket key
    correct: bool = False
    token_acc: float = 0.0


def _shape(model, row: _Row, buckets, max_tokens: int | None = None) -> tuple:
    """The row's padded shape; raises ValueError if it does not fit the model's context (or
    `max_tokens`). Buckets are capped by the context, as in `tokenize.encode`."""
    tok, kind, ctx = model.tokenizer, model.kind, int(model.max_length)
    max_len, limit_text = token_limit(model, max_tokens)
    if kind == "causal":
        p = token_ids(tok, row.prompt, True)
        t = token_ids(tok, target_text(row.target, kind), False)
        if not p:
            raise ValueError("the prompt tokenizes to nothing")
        if not t:
            raise ValueError(f"the target {row.target!r} tokenizes to nothing")
        n = len(p) + len(t)
        if n > max_len:
            raise ValueError(f"prompt + target is {n} tokens, more than {limit_text}")
        return (bucket_length(n, ctx, buckets),)
    if kind == "seq2seq":
        p = token_ids(tok, row.prompt, True)
        t = token_ids(tok, row.target, False)
        eos = tok.eos_token_id
        if not t:
            raise ValueError(f"the target {row.target!r} tokenizes to nothing")
        if eos is not None and t[-1] != eos:
            t = t + [eos]
        for what, n in (("the prompt", len(p)), ("the target", len(t))):
            if n > max_len:
                raise ValueError(f"{what} is {n} tokens, more than {limit_text}")
        return (bucket_length(len(p), ctx, buckets), bucket_length(len(t), ctx, buckets))
    if kind == "classifier":
        enc = tok(row.prompt, row.text_pair, add_special_tokens=True) if row.text_pair else tok(row.prompt, add_special_tokens=True)
        n = len(enc["input_ids"])
        if n > max_len:
            raise ValueError(f"the text is {n} tokens, more than {limit_text}")
        return (bucket_length(n, ctx, buckets),)
    raise ValueError(f"unknown model kind {kind!r}")


def _record_error(rec: EditRecord, field: str, reason: str) -> RecordError:
    return RecordError(rec.source or "records", rec.extra.get("record", rec.id), field, reason)


# ---------------------------------------------------------------------------------------------
# Scoring


_SCORERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _scorer(model):
    """The jitted scorer of a model, cached by its apply function (compiles once per shape)."""
    fn = _SCORERS.get(model.apply)
    if fn is None:
        fn = _SCORERS[model.apply] = _make_scorer(model)
    return fn


def _make_scorer(model):
    def score(params, batch):
        # logits at the `score_pos` positions only (every target token is one of them): the
        # same argmaxes as the full [B, S, V] logits, a K-position head instead of an S-position one
        logits, labels, mask = scored_logits(model.apply, params, batch)
        return losses.example_correct(logits, labels, mask), losses.example_token_accuracy(logits, labels, mask)

    return jax.jit(score)


def _score_rows(
    model, params, rows: list[_Row], batch_size: int, progress: bool, desc: str, buckets, scorer,
    token_budget: int | None = DEFAULT_TOKEN_BUDGET,
) -> None:
    """Fill correct / token_acc of every row, batching rows of one bucket together.

    A bucket of L padded tokens per row (seq2seq: source + target) is scored in batches of
    `tokenize.rows_per_batch(batch_size, L, token_budget)` rows, so a batch's logits hold at most
    about `token_budget` x vocabulary numbers whatever the rows' lengths (one shape per bucket:
    it still compiles once per bucket). A bucket's rows are encoded together, with one K of
    scored positions (`with_score_positions`: the most target tokens of any of its rows, rounded
    up to a power of two), so the head runs at K positions per row, not L."""
    if not rows:
        return
    by_shape: dict[tuple, list[_Row]] = defaultdict(list)
    for r in rows:
        by_shape[r.shape].append(r)
    size = {shape: rows_per_batch(batch_size, sum(shape), token_budget) for shape in by_shape}
    n_batches = sum(-(-len(v) // size[k]) for k, v in by_shape.items())
    with tqdm(total=n_batches, desc=desc, unit="batch", disable=not progress) as bar:
        for shape in sorted(by_shape):
            group, n = by_shape[shape], size[shape]
            full = with_score_positions(encode_rows(
                model, group, length=shape[0], target_length=shape[1] if len(shape) > 1 else None, buckets=buckets))
            for start in range(0, len(group), n):
                chunk = group[start : start + n]
                correct, acc = jax.device_get(scorer(params, pad_rows(slice_rows(full, start, start + n), n)))
                for i, r in enumerate(chunk):
                    r.correct, r.token_acc = bool(correct[i]), float(acc[i])
                bar.update(1)


def _greedy_fill(model, params, rows: list[_Row], max_new_tokens: int) -> None:
    """Targets of locality rows that have none: the base model's own greedy continuation."""
    todo = [r for r in rows if r.target == ""]
    if not todo:
        return
    outs = greedy(model, params, [r.prompt for r in todo], max_new_tokens=max_new_tokens)
    for r, text in zip(todo, outs):
        r.target = text.strip()


# ---------------------------------------------------------------------------------------------
# Building


def _label_set(model, records: Sequence[EditRecord]) -> tuple[str, ...]:
    sets = {r.labels for r in records}
    if len(sets) != 1:
        raise ValueError(f"classification records carry different label sets: {sorted(sets)}")
    labels = next(iter(sets))
    if not labels:
        raise ValueError(
            f"model {model.name!r} is a classifier but the records have no label set "
            f"(read them with read_fever / read_nli / read_classification)"
        )
    n = int(getattr(model.config, "num_labels", 0) or 0)
    if n != len(labels):
        raise ValueError(
            f"model {model.name!r} has {n} output classes but the label set {list(labels)} has {len(labels)}; "
            f"load the model with num_labels={len(labels)}"
        )
    return labels


def _candidate_rows(rec: EditRecord, i: int, mode: str, labels, flip: float | None, rng) -> list[_Row]:
    """The rows a record may give (groups are provisional in correction mode)."""
    if labels is not None:
        true_idx = labels.index(rec.target_true) if rec.target_true in labels else -1
        if true_idx < 0:
            raise _record_error(rec, "target_true", f"label {rec.target_true!r} is not in the label set {list(labels)}")
        if mode == "counterfactual" and flip is not None and flip < 1.0 and rng.random() >= flip:
            return [_Row(i, "prompt", "pass", rec.prompt, rec.target_true, rec.target_true, true_idx, rec.text_pair)]
        if mode == "counterfactual":
            others = [k for k in range(len(labels)) if k != true_idx]
            idx = others[0] if len(others) == 1 else others[int(rng.integers(len(others)))]
        else:
            idx = true_idx
        rows = [_Row(i, "prompt", "fail", rec.prompt, labels[idx], rec.target_true, idx, rec.text_pair)]
        rows += [
            _Row(i, f"rephrases[{k}]", "adapt", p, labels[idx], rec.target_true, idx, rec.text_pair)
            for k, p in enumerate(rec.rephrases)
        ]
        return rows
    if mode == "correction":
        target = rec.target_true
        if not target.strip():
            raise _record_error(rec, "target_true", "empty: correction mode needs the true answer")
        rows = [_Row(i, "prompt", "fail", rec.prompt, target, rec.target_true)]
        rows += [_Row(i, f"rephrases[{k}]", "adapt", p, target, rec.target_true) for k, p in enumerate(rec.rephrases)]
        return rows
    target = rec.target_new
    if not target.strip():
        raise _record_error(rec, "target_new", "empty: counterfactual mode needs a new target (zsRE 'alt', CounterFact 'target_new')")
    rows = [_Row(i, "prompt", "fail", rec.prompt, target, rec.target_true)]
    rows += [_Row(i, f"rephrases[{k}]", "adapt", p, target, rec.target_true) for k, p in enumerate(rec.rephrases)]
    rows += [
        _Row(i, f"loc_prompts[{k}]", "pass", p, t, t) for k, (p, t) in enumerate(zip(rec.loc_prompts, rec.loc_targets))
    ]
    return rows


def build_edit_set(
    model,
    records: Sequence[EditRecord],
    mode: str = "correction",
    seed: int = 0,
    val_fraction: float = 0.1,
    batch_size: int = 16,
    progress: bool = True,
    *,
    skip_invalid: bool = False,
    flip_probability: float = 0.5,
    params: Any = None,
    max_new_tokens: int = 8,
    buckets: Sequence[int] = DEFAULT_BUCKETS,
    max_tokens: int | None = None,
    token_budget: int | None = DEFAULT_TOKEN_BUDGET,
) -> EditSet:
    """Score `records` with `model` (a LoadedModel; `params` default to its own) and build the
    fail / adapt / pass rows (see the module docstring). Deterministic for a given seed.

    A record that cannot be used (a row longer than the model's context, no `target_new` in
    counterfactual mode, a label outside the set) raises a RecordError naming its file, record
    and field; with `skip_invalid=True` it is left out and listed in `EditSet.skipped` (together
    with whatever the reader skipped, when `records` is a RecordList). `max_tokens` lowers the
    limit below the context; every row is checked before anything is scored. `token_budget`
    bounds the padded tokens of one scoring batch (see `_score_rows`).
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose 'correction' or 'counterfactual'")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    records_in = records
    records = _checked_records(records)
    params = model.params if params is None else params
    classifier = model.kind == "classifier"
    has_labels = any(r.labels for r in records)
    if has_labels and not classifier:
        raise ValueError(f"classification records need a classifier model; {model.name!r} is {model.kind!r}")
    labels = _label_set(model, records) if classifier else None
    if not 0.0 <= flip_probability <= 1.0:
        raise ValueError(f"flip_probability must be in [0, 1], got {flip_probability}")

    skipped: list[Skipped] = list(getattr(records_in, "skipped", []))
    per_record = _record_rows(records, mode, labels, flip_probability if classifier else None, seed, skip_invalid, skipped)
    if mode == "counterfactual" and not classifier:
        _greedy_fill(model, params, [r for rows in per_record.values() for r in rows if r.group == "pass"], max_new_tokens)
    _fit_rows(model, records, per_record, buckets, max_tokens, skip_invalid, skipped)
    if not per_record:
        raise ValueError(f"every record was skipped ({len(skipped)}); first: {skipped[0].message() if skipped else '-'}")

    _score_records(model, params, per_record, mode, batch_size, progress, buckets, token_budget)
    data, n_records, counts, shapes = _tables(records, per_record, seed, val_fraction)
    info = {
        "mode": mode,
        "formats": sorted({r.format for r in records if r.format}),
        "sources": sorted({s for r in records for s in [r.source] if s}),
        "model": model.name,
        "arch": model.arch,
        "kind": model.kind,
        "seed": seed,
        "val_fraction": val_fraction,
        "batch_size": batch_size,
        "records": n_records,
        "counts": counts,
        "skipped": len(skipped),
        "excluded": dict(getattr(records_in, "excluded", {}) or {}),
        "label_names": list(labels) if labels else None,
        "flip_probability": flip_probability if (classifier and mode == "counterfactual") else None,
        "correct_criterion": CORRECT_CRITERION,
        "shapes": sorted(list(s) for s in shapes),
    }
    return EditSet(data=data, info=info, skipped=skipped)


def _score_records(model, params, per_record, mode, batch_size, progress, buckets, token_budget) -> None:
    """Score every kept row (in place). Correction mode decides the groups as it goes: each
    record's own prompt first (right: the record becomes one "pass" row), then the rephrases of
    the records it got wrong."""
    scorer = _scorer(model)
    desc = f"scoring with {model.name}"
    if mode == "correction":
        mains = [rows[0] for rows in per_record.values()]
        _score_rows(model, params, mains, batch_size, progress, desc + " (prompts)", buckets, scorer, token_budget)
        for i, rows in per_record.items():
            if rows[0].correct:
                rows[0].group = "pass"
                per_record[i] = [rows[0]]
        adapt = [r for rows in per_record.values() for r in rows[1:]]
        _score_rows(model, params, adapt, batch_size, progress, desc + " (rephrases)", buckets, scorer, token_budget)
    else:
        every = [r for rows in per_record.values() for r in rows]
        _score_rows(model, params, every, batch_size, progress, desc, buckets, scorer, token_budget)


def _checked_records(records: Sequence[EditRecord]) -> list[EditRecord]:
    """`records` as a list: non-empty, every item an EditRecord, ids unique."""
    records = list(records)
    if not records:
        raise ValueError("no records to build an edit set from")
    seen: dict[str, int] = {}
    for i, r in enumerate(records):
        if not isinstance(r, EditRecord):
            raise TypeError(f"records[{i}] is a {type(r).__name__}, not an EditRecord")
        if r.id in seen:
            raise ValueError(f"duplicate record id {r.id!r} (records {seen[r.id]} and {i})")
        seen[r.id] = i
    return records


def _record_rows(records, mode, labels, flip, seed, skip_invalid, skipped) -> dict[int, list[_Row]]:
    """{record index: its candidate rows}; a record that cannot give rows raises, or (with
    `skip_invalid`) is appended to `skipped` and left out."""
    per_record: dict[int, list[_Row]] = {}
    for i, rec in enumerate(records):
        # One generator per record for the label draws: independent of the split's generator
        # and of which other records were skipped.
        rng = np.random.default_rng([seed, 1, i])
        try:
            rows = _candidate_rows(rec, i, mode, labels, flip, rng)
        except RecordError as e:
            if not skip_invalid:
                raise
            skipped.append(e.skipped)
            continue
        per_record[i] = rows
    return per_record


def _fit_rows(model, records, per_record, buckets, max_tokens, skip_invalid, skipped) -> None:
    """Set every row's bucket shape (in place); a record with a row that has no answer or does
    not fit the context raises, or (with `skip_invalid`) is dropped from `per_record`."""
    for i in list(per_record):
        try:
            for r in per_record[i]:
                if r.group == "pass" and not r.target.strip():
                    field = r.field.replace("loc_prompts", "loc_targets")
                    raise _record_error(records[i], field, "no answer for this locality prompt (and the model's greedy answer is empty)")
                try:
                    r.shape = _shape(model, r, buckets, max_tokens)
                except ValueError as e:
                    raise _record_error(records[i], r.field, str(e)) from None
        except RecordError as e:
            if not skip_invalid:
                raise
            skipped.append(e.skipped)
            del per_record[i]


def _tables(records, per_record, seed, val_fraction):
    """(DatasetDict of the kept rows by split, records per split, group counts per split, the
    bucket shapes used)."""
    # Split over ALL records, so a record's split depends only on the records and the seed:
    # not on the model (which records were skipped, e.g. for length) nor on the mode.
    in_val = split_records(len(records), seed, val_fraction)
    table = {s: {c: [] for c in COLUMNS} for s in SPLITS}
    counts = {s: {g: 0 for g in GROUPS} for s in (*SPLITS, "total")}
    n_records = {s: 0 for s in (*SPLITS, "total")}
    shapes = set()
    for i in sorted(per_record):
        split = "val" if in_val[i] else "train"
        rec = records[i]
        n_records[split] += 1
        n_records["total"] += 1
        for r in per_record[i]:
            values = dict(
                id=f"{rec.id}#{r.field}", record_id=rec.id, group=r.group, field=r.field, prompt=r.prompt,
                target=r.target, target_true=r.target_true, label=r.label, text_pair=r.text_pair,
                base_correct=r.correct, base_token_acc=r.token_acc,
            )
            for c in COLUMNS:
                table[split][c].append(values[c])
            counts[split][r.group] += 1
            counts["total"][r.group] += 1
            shapes.add(r.shape)
    features = edit_set_features()
    data = datasets.DatasetDict({s: datasets.Dataset.from_dict(table[s], features=features) for s in SPLITS})
    return data, n_records, counts, shapes
