"""The paper's edit set: fail / adapt / pass rows scored by the base model (SaLEM appendix A).

* fail:  inputs the base model gets wrong, with the answer to learn;
* adapt: rephrasings of the fail inputs with the same answer (generalisation);
* pass:  inputs whose behaviour must not change (locality / drawdown).

Two modes:

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
bucket. The split into train / val is by record (all rows of a record stay together),
deterministic for a seed and the same for every model and mode given the same records.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import weakref
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from salem_jax.data.readers import quiet_datasets
from salem_jax.data.records import EditRecord, RecordError, Skipped, read_skip_report, write_skip_report
from salem_jax.data.tokenize import (
    DEFAULT_BUCKETS,
    DEFAULT_TOKEN_BUDGET,
    bucket_length,
    encode,
    pad_rows,
    rows_per_batch,
    target_text,
    token_limit,
)

MODES = ("correction", "counterfactual")
GROUPS = ("fail", "adapt", "pass")
SPLITS = ("train", "val")
CORRECT_CRITERION = (
    "generation: every target token is the argmax under teacher forcing (losses.example_correct); "
    "classification: the argmax label"
)
COLUMNS = (
    "id", "record_id", "group", "field", "prompt", "target", "target_true", "label", "text_pair",
    "base_correct", "base_token_acc",
)


def _features():
    import datasets

    v = datasets.Value
    return datasets.Features(
        {
            "id": v("string"),
            "record_id": v("string"),
            "group": v("string"),
            "field": v("string"),
            "prompt": v("string"),
            "target": v("string"),
            "target_true": v("string"),
            "label": v("int64"),
            "text_pair": v("string"),
            "base_correct": v("bool"),
            "base_token_acc": v("float32"),
        }
    )


@dataclasses.dataclass
class EditSet:
    """Rows in a `datasets.DatasetDict` ("train", "val") plus `info` (saved as info.json).

    Row columns (see interfaces.md): id, record_id, group ("fail"|"adapt"|"pass"), field (which
    record field the prompt came from: "prompt", "rephrases[0]", "loc_prompts[3]"), prompt,
    target (the answer to learn / keep; classification: the label name), target_true (the
    record's true answer, which a counterfactual edit moves away from), label (class index, -1
    for generation), text_pair, base_correct, base_token_acc.
    """

    data: Any  # datasets.DatasetDict
    info: dict
    skipped: list[Skipped] = dataclasses.field(default_factory=list)

    def __getitem__(self, split: str):
        if split not in self.data:
            raise KeyError(f"no split {split!r}; splits are {list(self.data)}")
        return self.data[split]

    def rows(self, split: str, group: str | None = None) -> list[dict]:
        """The rows of a split (optionally of one group) as dicts."""
        if group is not None and group not in GROUPS:
            raise ValueError(f"unknown group {group!r}; groups are {GROUPS}")
        rows = self[split].to_list()
        return rows if group is None else [r for r in rows if r["group"] == group]

    @property
    def counts(self) -> dict[str, dict[str, int]]:
        return self.info["counts"]

    def summary(self) -> str:
        lines = [f"edit set: mode={self.info['mode']} model={self.info['model']} seed={self.info['seed']}"]
        for split in (*SPLITS, "total"):
            c = self.info["counts"][split]
            n = self.info["records"][split]
            lines.append(f"  {split:5s}: {n:6d} records  fail {c['fail']:6d}  adapt {c['adapt']:6d}  pass {c['pass']:6d}")
        if self.skipped:
            lines.append(f"  skipped {len(self.skipped)} records (skipped.jsonl)")
        for why, n in (self.info.get("excluded") or {}).items():
            lines.append(f"  excluded {n} records: {why}")
        return "\n".join(lines)


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
    pred: int = -1


# ---------------------------------------------------------------------------------------------
# Tokenized lengths (mirrors tokenize.encode, to find each row's bucket and check the context)


def token_ids(tok, text: str, special: bool) -> list[int]:
    return list(tok(text, add_special_tokens=special)["input_ids"])


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


def _encode_rows(model, rows: Sequence, length: int | None = None, target_length: int | None = None, buckets=DEFAULT_BUCKETS):
    """Encode rows (objects or dicts with prompt/target/label/text_pair) into one batch."""
    get = (lambda r, k: r[k]) if rows and isinstance(rows[0], dict) else getattr
    prompts = [get(r, "prompt") for r in rows]
    if model.kind == "classifier":
        targets = [int(get(r, "label")) for r in rows]
        pairs = [get(r, "text_pair") or None for r in rows]
        text_pairs = pairs if any(p is not None for p in pairs) else None
    else:
        targets = [get(r, "target") for r in rows]
        text_pairs = None
    return encode(model, prompts, targets, text_pairs=text_pairs, length=length, target_length=target_length, buckets=buckets)


_SCORERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _scorer(model):
    """The jitted scorer of a model, cached by its apply function (compiles once per shape)."""
    fn = _SCORERS.get(model.apply)
    if fn is None:
        fn = _SCORERS[model.apply] = _make_scorer(model)
    return fn


def _make_scorer(model):
    import jax
    import jax.numpy as jnp

    from salem_jax import losses

    def score(params, batch):
        logits = model.apply(params, batch)
        labels, mask = batch["labels"], batch["label_mask"]
        return (
            losses.example_correct(logits, labels, mask),
            losses.example_token_accuracy(logits, labels, mask),
            jnp.argmax(logits[:, 0], axis=-1),
        )

    return jax.jit(score)


def _score_rows(
    model, params, rows: list[_Row], batch_size: int, progress: bool, desc: str, buckets, scorer,
    token_budget: int | None = DEFAULT_TOKEN_BUDGET,
) -> None:
    """Fill correct / token_acc / pred of every row, batching rows of one bucket together.

    A bucket of L padded tokens per row (seq2seq: source + target) is scored in batches of
    `tokenize.rows_per_batch(batch_size, L, token_budget)` rows, so a batch's logits hold at most
    about `token_budget` x vocabulary numbers whatever the rows' lengths (one shape per bucket:
    it still compiles once per bucket)."""
    if not rows:
        return
    from tqdm.auto import tqdm

    by_shape: dict[tuple, list[_Row]] = defaultdict(list)
    for r in rows:
        by_shape[r.shape].append(r)
    size = {shape: rows_per_batch(batch_size, sum(shape), token_budget) for shape in by_shape}
    n_batches = sum(-(-len(v) // size[k]) for k, v in by_shape.items())
    with tqdm(total=n_batches, desc=desc, unit="batch", disable=not progress) as bar:
        for shape in sorted(by_shape):
            group, n = by_shape[shape], size[shape]
            for start in range(0, len(group), n):
                chunk = group[start : start + n]
                batch = _encode_rows(
                    model, chunk, length=shape[0], target_length=shape[1] if len(shape) > 1 else None, buckets=buckets
                )
                correct, acc, pred = scorer(params, pad_rows(batch, n))
                correct, acc, pred = np.asarray(correct), np.asarray(acc), np.asarray(pred)
                for i, r in enumerate(chunk):
                    r.correct, r.token_acc, r.pred = bool(correct[i]), float(acc[i]), int(pred[i])
                bar.update(1)


def _greedy_fill(model, params, rows: list[_Row], max_new_tokens: int) -> None:
    """Targets of locality rows that have none: the base model's own greedy continuation."""
    todo = [r for r in rows if r.target == ""]
    if not todo:
        return
    try:
        from salem_jax.generate import greedy
    except ImportError as e:
        raise RuntimeError(
            f"{len(todo)} locality prompts have no answer and salem_jax.generate (to take the base model's "
            f"greedy answer) is not available: {e}"
        ) from None
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


def split_records(n: int, seed: int, val_fraction: float) -> np.ndarray:
    """Boolean mask [n]: True for records in "val". A seeded permutation; round(n * val_fraction)
    records (at least one when n >= 2 and val_fraction > 0) go to val."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = int(np.floor(n * val_fraction + 0.5))
    if val_fraction > 0 and n >= 2:
        n_val = max(n_val, 1)
    mask = np.zeros(n, dtype=bool)
    mask[np.random.default_rng(seed).permutation(n)[:n_val]] = True
    return mask


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
    params = model.params if params is None else params
    classifier = model.kind == "classifier"
    has_labels = any(r.labels for r in records)
    if has_labels and not classifier:
        raise ValueError(f"classification records need a classifier model; {model.name!r} is {model.kind!r}")
    labels = _label_set(model, records) if classifier else None
    if not 0.0 <= flip_probability <= 1.0:
        raise ValueError(f"flip_probability must be in [0, 1], got {flip_probability}")

    skipped: list[Skipped] = list(getattr(records_in, "skipped", []))
    per_record: dict[int, list[_Row]] = {}
    for i, rec in enumerate(records):
        # One generator per record for the label draws: independent of the split's generator
        # and of which other records were skipped.
        rng = np.random.default_rng([seed, 1, i])
        try:
            rows = _candidate_rows(rec, i, mode, labels, flip_probability if classifier else None, rng)
        except RecordError as e:
            if not skip_invalid:
                raise
            skipped.append(e.skipped)
            continue
        per_record[i] = rows
    if mode == "counterfactual" and not classifier:
        _greedy_fill(model, params, [r for rows in per_record.values() for r in rows if r.group == "pass"], max_new_tokens)
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
    if not per_record:
        raise ValueError(f"every record was skipped ({len(skipped)}); first: {skipped[0].message() if skipped else '-'}")

    scorer = _scorer(model)
    desc = f"scoring with {model.name}"
    if mode == "correction":
        # Stage 1: each record's own prompt decides fail / pass; stage 2: rephrases of fails.
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

    kept = sorted(per_record)
    # Split over ALL records, so a record's split depends only on the records and the seed:
    # not on the model (which records were skipped, e.g. for length) nor on the mode.
    in_val = split_records(len(records), seed, val_fraction)
    table = {s: {c: [] for c in COLUMNS} for s in SPLITS}
    counts = {s: {g: 0 for g in GROUPS} for s in (*SPLITS, "total")}
    n_records = {s: 0 for s in (*SPLITS, "total")}
    shapes = set()
    for i in kept:
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

    import datasets

    features = _features()
    data = datasets.DatasetDict({s: datasets.Dataset.from_dict(table[s], features=features) for s in SPLITS})
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


# ---------------------------------------------------------------------------------------------
# Saving and loading


def check_out_dir(out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Raise FileExistsError unless `save_edit_set(..., out_dir, overwrite=overwrite)` would write
    there: call it before any costly step (loading the model, scoring)."""
    out = Path(out_dir)
    if out.exists():
        if not out.is_dir() or not (out / "info.json").is_file():
            raise FileExistsError(f"{out} exists and is not an edit set; choose another --out")
        if not overwrite:
            raise FileExistsError(f"{out} already holds an edit set; pass overwrite=True (--overwrite) to replace it")
    return out


def missing_groups(counts: dict, needed: Sequence[str] = ("fail", "pass")) -> dict[str, list[str]]:
    """{split: the `needed` groups it has no rows of} from an edit set's `info["counts"]`
    (editor training needs fail and pass rows in train and val); empty when nothing is missing."""
    out = {}
    for split in SPLITS:
        gone = [g for g in needed if not (counts.get(split) or {}).get(g)]
        if gone:
            out[split] = gone
    return out


def save_edit_set(es: EditSet, out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write `out_dir/` = the DatasetDict (`datasets.load_from_disk(out_dir)` opens it), info.json
    and skipped.jsonl. Atomic: everything is written to a temporary folder beside `out_dir` and
    renamed into place. An existing edit set there is replaced only with `overwrite=True`; a
    folder that is not an edit set is never replaced."""
    out = check_out_dir(out_dir, overwrite=overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        with quiet_datasets():
            es.data.save_to_disk(str(tmp))
        write_skip_report(es.skipped, tmp / "skipped.jsonl")
        with open(tmp / "info.json", "w", encoding="utf-8") as f:
            json.dump(es.info, f, indent=2, ensure_ascii=False)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_edit_set(path: str | os.PathLike) -> EditSet:
    """Open a folder written by `save_edit_set`; a clear error if it is missing or damaged."""
    import datasets

    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"no edit set at {p} (build one with `salem dataset ... --out {p}`)")
    info_path = p / "info.json"
    if not info_path.is_file():
        raise FileNotFoundError(f"{p} is not an edit set: it has no info.json")
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{info_path} is corrupt ({e}); rebuild the edit set") from None
    try:
        data = datasets.load_from_disk(str(p))
    except Exception as e:  # noqa: BLE001 - re-raised with the folder named
        raise ValueError(f"{p}: the edit set's data cannot be loaded ({type(e).__name__}: {e}); rebuild it") from None
    if not isinstance(data, datasets.DatasetDict) or set(SPLITS) - set(data):
        raise ValueError(f"{p}: expected splits {SPLITS}, found {list(data) if hasattr(data, 'keys') else type(data).__name__}")
    for s in SPLITS:
        missing = set(COLUMNS) - set(data[s].column_names)
        if missing:
            raise ValueError(f"{p}: split {s!r} lacks columns {sorted(missing)}")
    skipped_path = p / "skipped.jsonl"
    skipped = read_skip_report(skipped_path) if skipped_path.is_file() else []
    return EditSet(data=data, info=info, skipped=skipped)


def sample_by_group(rows, max_per_group: int, seed: int = 0, groups: Sequence[str] | None = None) -> list[dict]:
    """At most `max_per_group` rows of each group (all of a smaller group), drawn without
    replacement with `seed` and kept in their original order within each group; groups in sorted
    order, only `groups` when given. `max_per_group` <= 0 keeps every row of the kept groups."""
    by_group: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_group[r["group"]].append(r)
    rng = np.random.default_rng(seed)
    out: list[dict] = []
    for g, rs in sorted(by_group.items()):
        if groups is not None and g not in groups:
            continue
        take = len(rs) if max_per_group <= 0 else min(len(rs), max_per_group)
        out += [rs[i] for i in np.sort(rng.choice(len(rs), size=take, replace=False))]
    return out


def edit_set_batches(
    model,
    rows,
    batch_size: int,
    length: int | None = None,
    *,
    target_length: int | None = None,
    buckets: Sequence[int] = DEFAULT_BUCKETS,
) -> Iterator[tuple[dict[str, np.ndarray], list[dict]]]:
    """Iterate over `rows` (dicts with prompt, target, label, text_pair: a list, or a split of an
    EditSet) in order, `batch_size` at a time: (batch dict padded to exactly `batch_size` rows,
    the rows in it). Lengths are `length` (and `target_length` for seq2seq) when given, else
    the bucket of each batch's longest row, so shapes come from a small fixed set. Padding rows
    have all-zero masks."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rows = list(rows) if not isinstance(rows, list) else rows
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        batch = _encode_rows(model, chunk, length=length, target_length=target_length, buckets=buckets)
        yield pad_rows(batch, batch_size), chunk
