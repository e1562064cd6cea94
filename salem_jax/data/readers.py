"""Readers for the real editing benchmarks, each returning `EditRecord`s (see records.py).

Formats (field names as in the public files; /work/shared/data/*/README.md describes them):

* zsRE, MEND/ROME format (`read_zsre`): subject, src, rephrase, alt, answers, loc, loc_ans
  [, pred, cond, portability]. prompt = src, target_true = answers[0], target_new = alt (may be empty:
  then only correction mode can use the record),
  rephrases = (rephrase,), locality = (loc -> loc_ans); EasyEdit's `portability` questions
  (New Question -> New Answer) become extra["portability_prompts"] / ["portability_targets"].
* CounterFact, ROME format (`read_counterfact`): requested_rewrite {prompt with "{}", subject,
  target_true.str, target_new.str}, paraphrase_prompts, neighborhood_prompts. The neighborhood
  prompts are other subjects that share the true answer, so their targets are target_true.
* ROME known facts (`read_knowns`): subject, prompt, attribute (no rephrases, no locality).
* classification (`read_classification`, `read_fever`, `read_nli`): a text field, an optional
  second text field and a label from a declared label set. A label outside the set is an error;
  labels listed in `exclude_labels` (FEVER's "NOT ENOUGH INFO") are left out and counted.
* plain text (`read_text`): WikiText raw files or JSON Lines articles, for perplexity;
  `text_records` cuts paragraphs into (prompt, continuation) records.

JSON and JSON Lines files are loaded with `datasets.load_dataset("json", ...)` (it handles every
file in ../shared/data, FEVER's mixed-type `evidence` included, as a `Json` column). When it
cannot parse a file, the file is parsed again with the `json` module only to locate the broken
record for the error message (or, with `skip_invalid=True`, to skip broken JSON Lines lines).
WikiText raw files are read as plain text.

Every record is validated. A bad record raises `RecordError` naming the file, the record number
(0-based position in the file; JSON Lines also give the line) and the field. With
`skip_invalid=True` it is left out and described in the returned list's `.skipped`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Callable, Sequence

from salem_jax.data.records import EditRecord, RecordError, RecordList, Skipped

# `datasets` is imported inside the two functions that use it (heavy: seconds), so that
# `salem --help` and the record checks that fail early do not wait for it.

log = logging.getLogger(__name__)

FEVER_LABELS = ("SUPPORTS", "REFUTES")
FEVER_EXCLUDED = ("NOT ENOUGH INFO",)
RTE_LABELS = ("entailment", "not_entailment")
MNLI_LABELS = ("entailment", "neutral", "contradiction")

FORMATS = ("zsre", "counterfact", "knowns", "fever", "nli", "classification", "text")

_MISSING = object()


# ---------------------------------------------------------------------------------------------
# Loading rows


def _is_jsonl(path: Path) -> bool:
    return path.suffix.lower() in (".jsonl", ".ndjson")


def _check_file(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file")
    if p.is_dir():
        raise IsADirectoryError(f"{p}: is a directory, expected a data file")
    return p


@contextlib.contextmanager
def quiet_datasets():
    """Silence `datasets`' own per-file progress bars (ours say what is going on) and its error
    logs (a file it cannot read is re-read with `json`, whose error names the record; datasets'
    log would print the offending row whole)."""
    import datasets

    was_disabled = datasets.utils.are_progress_bars_disabled()
    level = datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(level)
        if not was_disabled:
            datasets.enable_progress_bars()


def _load_with_datasets(path: Path) -> list[dict]:
    import datasets

    with quiet_datasets():
        ds = datasets.load_dataset("json", data_files=str(path), split="train")
    return ds.to_list()


def _json_list_error(path: Path, text: str) -> RecordError | None:
    """Parse a JSON list element by element; the error of the first broken element (or None)."""
    dec = json.JSONDecoder()
    ws = " \t\r\n"

    def skip(i):
        while i < len(text) and text[i] in ws:
            i += 1
        return i

    def line_of(pos):
        return text.count("\n", 0, pos) + 1

    i = skip(0)
    if i >= len(text):
        return RecordError(path, "-", "(file)", "the file is empty")
    if text[i] != "[":
        try:
            dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            return RecordError(path, 0, "(json)", f"malformed JSON at line {e.lineno} column {e.colno}: {e.msg}")
        return None
    i = skip(i + 1)
    n = 0
    if i < len(text) and text[i] == "]":
        return None
    while True:
        try:
            _, i = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            return RecordError(path, n, "(json)", f"malformed JSON at line {e.lineno} column {e.colno}: {e.msg}")
        i = skip(i)
        if i < len(text) and text[i] == ",":
            i = skip(i + 1)
            n += 1
            continue
        if i < len(text) and text[i] == "]":
            rest = skip(i + 1)
            if rest < len(text):
                return RecordError(path, n, "(json)", f"malformed JSON: unexpected text after the list at line {line_of(rest)}")
            return None
        where = f"line {line_of(i)}" if i < len(text) else "the end of the file"
        return RecordError(path, n, "(json)", f"malformed JSON at {where}: expected ',' or ']' after record {n}")


def _read_text(path: Path) -> str:
    """The file as text; a RecordError naming the line if it is not UTF-8."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise RecordError(path, "-", "(file)", f"not UTF-8 text: byte {e.start} (line {line}) is {data[e.start:e.start + 1]!r}") from None


def _json_loads(text: str, path: Path, record, line: str = ""):
    """json.loads whose every failure is a RecordError (malformed, or nested too deeply)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise RecordError(path, record, "(json)", f"malformed JSON at {line}column {e.colno}: {e.msg}") from None
    except RecursionError:
        raise RecordError(path, record, "(json)", "JSON nested too deeply") from None


def _starts_with_object(path: Path) -> bool:
    """Whether the first record of a .json list / .jsonl file opens with "{" (cheap peek)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        head = f.read(4096).lstrip()
    if not _is_jsonl(path) and head.startswith("["):
        head = head[1:].lstrip()
    return head.startswith("{")


def _load_rows(path: Path, skip_invalid: bool, skipped: list[Skipped]) -> list[tuple[Any, Any]]:
    """(record number, row) pairs of a .json (list) or .jsonl file."""
    text = _read_text(path)  # not UTF-8: named here, before datasets tries
    try:
        if not _starts_with_object(path):
            # datasets would wrap a list of scalars into {"text": ...} rows; let the json
            # module read it so that validation names the record that is not an object.
            raise ValueError("the first record is not a JSON object")
        rows = _load_with_datasets(path)
        if _is_jsonl(path):
            # datasets numbers JSON Lines rows by non-blank line; give the line numbers too.
            lines = [k + 1 for k, line in enumerate(text.splitlines()) if line.strip()]
            if len(lines) == len(rows):
                return [(f"{i} (line {ln})", r) for i, (ln, r) in enumerate(zip(lines, rows))]
        return list(enumerate(rows))
    except Exception as first:  # noqa: BLE001 - re-diagnosed below, never swallowed
        err = first
    # datasets could not build the file: parse it with `json` to name the broken record.
    if _is_jsonl(path):
        out, n = [], 0
        for k, line in enumerate(text.splitlines()):
            if not line.strip():
                continue
            rec = f"{n} (line {k + 1})"
            try:
                out.append((rec, _json_loads(line, path, rec)))
            except RecordError as bad:
                if not skip_invalid:
                    raise bad from None
                skipped.append(bad.skipped)
            n += 1
        if not out and not skipped:
            raise RecordError(path, "-", "(file)", "the file has no records")
        if out or skipped:
            log.info("%s: read with the json module (datasets failed: %s)", path, err)
            return out
    try:
        bad = _json_list_error(path, text)
    except RecursionError:
        bad = RecordError(path, "-", "(json)", "JSON nested too deeply")
    if bad is not None:
        raise bad from None
    data = _json_loads(text, path, "-")
    if isinstance(data, list):
        if not data:
            raise RecordError(path, "-", "(file)", "the file has no records (an empty JSON list)")
        # Valid JSON that datasets cannot tabulate (e.g. records that are not objects): the
        # validation below will name the offending record.
        log.info("%s: read with the json module (datasets failed: %s)", path, err)
        return list(enumerate(data))
    raise RecordError(path, "-", "(file)", f"expected a JSON list of records, got a JSON {type(data).__name__}") from err


# ---------------------------------------------------------------------------------------------
# Validating fields


class _Fields:
    """Typed access to one raw record; every failure is a RecordError naming file/record/field."""

    def __init__(self, source: str, number, row: Any):
        self.source, self.number, self.row = source, number, row
        if not isinstance(row, dict):
            raise RecordError(source, number, "(record)", f"expected a JSON object, got {type(row).__name__}")

    def error(self, field: str, reason: str) -> RecordError:
        return RecordError(self.source, self.number, field, reason)

    def raw(self, field: str):
        node = self.row
        for part in field.split("."):
            if not isinstance(node, dict):
                raise self.error(field, f"expected an object at {part!r}, got {type(node).__name__}")
            node = node.get(part, _MISSING)
            if node is _MISSING or node is None:
                return _MISSING
        return node

    def str(self, field: str, *, required: bool = True, allow_empty: bool = False) -> str:
        """A string field. required: must be present; allow_empty: present but may be ""."""
        v = self.raw(field)
        if v is _MISSING:
            if required:
                raise self.error(field, "missing (or null)")
            return ""
        if not isinstance(v, str):
            raise self.error(field, f"expected a string, got {type(v).__name__} {v!r:.60}")
        if required and not allow_empty and not v.strip():
            raise self.error(field, "empty")
        return v

    def str_list(self, field: str, *, min_len: int = 1, required: bool = True) -> tuple[str, ...]:
        v = self.raw(field)
        if v is _MISSING:
            if required:
                raise self.error(field, "missing (or null)")
            return ()
        if not isinstance(v, list):
            raise self.error(field, f"expected a list of strings, got {type(v).__name__}")
        if len(v) < min_len:
            raise self.error(field, f"has {len(v)} entries, needs at least {min_len}")
        for i, item in enumerate(v):
            if not isinstance(item, str):
                raise self.error(f"{field}[{i}]", f"expected a string, got {type(item).__name__}")
            if not item.strip():
                raise self.error(f"{field}[{i}]", "empty")
        return tuple(v)


def _read(
    path: str | os.PathLike,
    fmt: str,
    parse: Callable[[_Fields, str], EditRecord | None],
    *,
    limit: int | None,
    skip_invalid: bool,
    excluded: dict | None = None,
) -> RecordList:
    p = _check_file(path)
    source = str(p)
    skipped: list[Skipped] = []
    rows = _load_rows(p, skip_invalid, skipped)
    if limit is not None:
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        rows = rows[:limit]
        skipped = [s for s in skipped if _record_index(s.record) < limit]
    out = []
    for number, row in rows:
        try:
            rec = parse(_Fields(source, number, row), f"{p.name}:{_record_index(number)}")
        except RecordError as e:
            if not skip_invalid:
                raise
            skipped.append(e.skipped)
            continue
        if rec is not None:
            rec.extra.setdefault("format", fmt)
            rec.extra.setdefault("source", source)
            rec.extra.setdefault("record", _record_index(number))
            out.append(rec)
    result = RecordList(out, skipped=skipped, sources=[source])
    result.excluded = dict(excluded or {})
    if skipped:
        log.warning("%s: skipped %d invalid records (see the skip report); first: %s", source, len(skipped), skipped[0].message())
    if result.excluded:
        log.info("%s: excluded by label: %s", source, result.excluded)
    if not out:
        raise RecordError(source, "-", "(file)", f"no valid records (skipped {len(skipped)}, excluded {sum(result.excluded.values())})")
    return result


def _record_index(number) -> int:
    return int(str(number).split(" ", 1)[0])


# ---------------------------------------------------------------------------------------------
# Formats


def read_zsre(path: str | os.PathLike, *, limit: int | None = None, skip_invalid: bool = False) -> RecordList:
    """zsRE in the MEND/ROME format (a JSON list). See the module docstring for the mapping."""

    def parse(f: _Fields, rid: str) -> EditRecord:
        subject = f.str("subject")
        src = f.str("src")
        rephrase = f.str("rephrase")
        # An empty `alt` occurs in the real train file (2 of 1,000): such a record still serves
        # correction mode; counterfactual mode rejects it when it builds the edit set.
        alt = f.str("alt", allow_empty=True).strip()
        answers = f.str_list("answers")
        loc = f.str("loc")
        loc_ans = f.str("loc_ans")
        extra = {"answers": list(answers), "pred": f.str("pred", required=False)}
        extra.update(_zsre_portability(f))
        return EditRecord(
            id=rid,
            prompt=src,
            target_true=answers[0],
            target_new=alt,
            rephrases=(rephrase,),
            loc_prompts=(loc,),
            loc_targets=(loc_ans,),
            subject=subject,
            extra=extra,
        )

    return _read(path, "zsre", parse, limit=limit, skip_invalid=skip_invalid)


def _zsre_portability(f: _Fields) -> dict:
    """EasyEdit's portability questions of a zsRE record (`zsre_mend_eval_portability_gpt4.json`):
    `portability` = {"New Question", "New Answer"[, "Recalled Relation"]} or a list of such
    objects. Returns {} when the record has none, else extra fields `portability_prompts` and
    `portability_targets` (equal-length lists). A question without its answer is an error."""
    raw = f.raw("portability")
    if raw is _MISSING:
        return {}
    items = raw if isinstance(raw, list) else [raw]
    prompts, targets = [], []
    for i, item in enumerate(items):
        where = "portability" if not isinstance(raw, list) else f"portability[{i}]"
        if not isinstance(item, dict):
            raise f.error(where, f"expected an object with 'New Question' and 'New Answer', got {type(item).__name__}")
        sub = _Fields(f.source, f.number, item)
        try:
            q = sub.str("New Question")
            a = sub.raw("New Answer")
            if isinstance(a, list):  # several acceptable answers: the first is the target
                a = sub.str_list("New Answer")[0]
            elif a is _MISSING:
                raise sub.error("New Answer", "missing (or null): a portability question needs its answer")
            else:
                a = sub.str("New Answer")
        except RecordError as e:
            raise f.error(f"{where}.{e.skipped.field}", e.skipped.reason) from None
        prompts.append(q)
        targets.append(a)
    return {"portability_prompts": prompts, "portability_targets": targets}


def read_counterfact(path: str | os.PathLike, *, limit: int | None = None, skip_invalid: bool = False) -> RecordList:
    """CounterFact in the ROME format (a JSON list)."""

    def parse(f: _Fields, rid: str) -> EditRecord:
        template = f.str("requested_rewrite.prompt")
        if "{}" not in template:
            raise f.error("requested_rewrite.prompt", f"has no '{{}}' placeholder for the subject: {template!r:.80}")
        subject = f.str("requested_rewrite.subject")
        true = f.str("requested_rewrite.target_true.str")
        new = f.str("requested_rewrite.target_new.str")
        para = f.str_list("paraphrase_prompts")
        neigh = f.str_list("neighborhood_prompts")
        case_id = f.raw("case_id")
        return EditRecord(
            id=rid,
            # str.replace, not format: some prompts contain other braces.
            prompt=template.replace("{}", subject),
            target_true=true,
            target_new=new,
            rephrases=para,
            loc_prompts=neigh,
            loc_targets=(true,) * len(neigh),
            subject=subject,
            extra={
                "case_id": None if case_id is _MISSING else case_id,
                "relation_id": f.str("requested_rewrite.relation_id", required=False),
                "attribute_prompts": list(f.str_list("attribute_prompts", min_len=0, required=False)),
                "generation_prompts": list(f.str_list("generation_prompts", min_len=0, required=False)),
            },
        )

    return _read(path, "counterfact", parse, limit=limit, skip_invalid=skip_invalid)


def read_knowns(path: str | os.PathLike, *, limit: int | None = None, skip_invalid: bool = False) -> RecordList:
    """ROME's known facts (known_1000.json): prompt -> attribute. No rephrases or locality."""

    def parse(f: _Fields, rid: str) -> EditRecord:
        return EditRecord(
            id=rid,
            prompt=f.str("prompt"),
            target_true=f.str("attribute"),
            subject=f.str("subject"),
            extra={"relation_id": f.str("relation_id", required=False), "template": f.str("template", required=False)},
        )

    return _read(path, "knowns", parse, limit=limit, skip_invalid=skip_invalid)


def read_classification(
    path: str | os.PathLike,
    *,
    labels: Sequence[str],
    text_field: str = "text",
    pair_field: str | None = None,
    label_field: str = "label",
    id_field: str | None = None,
    exclude_labels: Sequence[str] = (),
    fmt: str = "classification",
    limit: int | None = None,
    skip_invalid: bool = False,
) -> RecordList:
    """Texts (and text pairs) with a label from the declared set `labels` (its order = class index).

    A label may be given by name or as an int index into `labels`; anything else is an error.
    Records whose label is in `exclude_labels` are left out and counted in `.excluded`.
    """
    labels = tuple(labels)
    if len(labels) < 2 or len(set(labels)) != len(labels):
        raise ValueError(f"labels must be at least two distinct names, got {labels}")
    exclude = tuple(exclude_labels)
    if set(exclude) & set(labels):
        raise ValueError(f"exclude_labels {exclude} overlap the label set {labels}")
    excluded: dict[str, int] = {}

    def parse(f: _Fields, rid: str) -> EditRecord | None:
        text = f.str(text_field)
        pair = f.str(pair_field) if pair_field else ""
        raw = f.raw(label_field)
        if raw is _MISSING:
            raise f.error(label_field, "missing (or null)")
        if isinstance(raw, bool) or not isinstance(raw, (str, int)):
            raise f.error(label_field, f"expected a label name or index, got {type(raw).__name__} {raw!r:.40}")
        if isinstance(raw, str) and raw in exclude:
            excluded[raw] = excluded.get(raw, 0) + 1
            return None
        if isinstance(raw, int):
            if not 0 <= raw < len(labels):
                raise f.error(label_field, f"label index {raw} is outside the label set {list(labels)}")
            name = labels[raw]
        elif raw in labels:
            name = raw
        else:
            raise f.error(label_field, f"label {raw!r} is not in the label set {list(labels)}")
        extra = {"labels": labels, "label_index": labels.index(name)}
        if id_field:
            orig = f.raw(id_field)
            extra["orig_id"] = None if orig is _MISSING else orig
        return EditRecord(id=rid, prompt=text, target_true=name, text_pair=pair, extra=extra)

    # `excluded` fills while _read parses; _read copies it after the parse.
    return _read(path, fmt, parse, limit=limit, skip_invalid=skip_invalid, excluded=excluded)


def read_fever(
    path: str | os.PathLike,
    *,
    labels: Sequence[str] = FEVER_LABELS,
    exclude_labels: Sequence[str] = FEVER_EXCLUDED,
    limit: int | None = None,
    skip_invalid: bool = False,
) -> RecordList:
    """FEVER (claim, label) as binary SUPPORTS/REFUTES classification, as MEND and SaLEM use it.
    "NOT ENOUGH INFO" claims are excluded (and counted)."""
    return read_classification(
        path, labels=labels, text_field="claim", label_field="label", id_field="id",
        exclude_labels=exclude_labels, fmt="fever", limit=limit, skip_invalid=skip_invalid,
    )


def read_nli(
    path: str | os.PathLike,
    *,
    labels: Sequence[str] = RTE_LABELS,
    premise_field: str = "sentence1",
    hypothesis_field: str = "sentence2",
    label_field: str = "label",
    exclude_labels: Sequence[str] = (),
    limit: int | None = None,
    skip_invalid: bool = False,
) -> RecordList:
    """Sentence-pair entailment (RTE / GLUE field names by default; MNLI: `labels=MNLI_LABELS`).
    prompt = premise, text_pair = hypothesis."""
    return read_classification(
        path, labels=labels, text_field=premise_field, pair_field=hypothesis_field, label_field=label_field,
        id_field="index", exclude_labels=exclude_labels, fmt="nli", limit=limit, skip_invalid=skip_invalid,
    )


# ---------------------------------------------------------------------------------------------
# Plain text

_HEADING = re.compile(r"^\s*=( =)*\s.*\s=( =)*\s*$")
_TOP_HEADING = re.compile(r"^ = [^=].* = $")


def _paragraphs(text: str, drop_headings: bool) -> list[str]:
    out = []
    for line in text.splitlines():
        s = line.strip()
        if not s or (drop_headings and _HEADING.match(line)):
            continue
        out.append(s)
    return out


def read_text(
    path: str | os.PathLike,
    *,
    unit: str = "paragraph",
    field: str = "text",
    drop_headings: bool = True,
    limit: int | None = None,
) -> list[str]:
    """Plain text for perplexity: WikiText raw (`.raw`/`.txt`) or JSON Lines/JSON articles.

    unit="paragraph": the non-blank lines, stripped (WikiText's " = Heading = " lines dropped
    unless `drop_headings=False`). unit="document": whole articles (raw files are split at
    top-level " = Title = " headings; JSON files give one document per record's `field`).
    `limit` keeps the first N units.
    """
    if unit not in ("paragraph", "document"):
        raise ValueError(f"unit must be 'paragraph' or 'document', got {unit!r}")
    p = _check_file(path)
    if p.suffix.lower() in (".json", ".jsonl", ".ndjson"):
        docs = []
        for number, row in _load_rows(p, False, []):
            docs.append(_Fields(str(p), number, row).str(field))
    else:
        text = _read_text(p)
        if not text.strip():
            raise RecordError(str(p), "-", "(file)", "the file is empty")
        docs, cur = [], []
        for line in text.splitlines():
            if _TOP_HEADING.match(line) and any(x.strip() for x in cur):
                docs.append("\n".join(cur))
                cur = []
            cur.append(line)
        if any(x.strip() for x in cur):
            docs.append("\n".join(cur))
    if unit == "document":
        units = [d for d in docs if d.strip()]
    else:
        units = [para for d in docs for para in _paragraphs(d, drop_headings)]
    return units[:limit] if limit is not None else units


def text_records(
    texts: Sequence[str],
    *,
    source: str = "text",
    prompt_words: int = 24,
    target_words: int = 4,
    min_prompt_words: int = 4,
) -> RecordList:
    """(prompt, continuation) records from paragraphs, for next-words editing on WikiText.

    prompt = up to `prompt_words` words, target_true = the `target_words` words that follow.
    Paragraphs shorter than `min_prompt_words + target_words` words are skipped (and reported).
    """
    out, skipped = [], []
    name = Path(source).name
    for i, t in enumerate(texts):
        words = t.split()
        if len(words) < min_prompt_words + target_words:
            skipped.append(Skipped(source, str(i), "text", f"{len(words)} words, fewer than {min_prompt_words + target_words}"))
            continue
        k = min(prompt_words, len(words) - target_words)
        out.append(
            EditRecord(
                id=f"{name}:{i}",
                prompt=" ".join(words[:k]),
                target_true=" ".join(words[k : k + target_words]),
                extra={"format": "text", "source": source, "record": i},
            )
        )
    if not out:
        raise RecordError(source, "-", "text", f"no paragraph has {min_prompt_words + target_words} words or more")
    return RecordList(out, skipped=skipped, sources=[source])


def read_records(path: str | os.PathLike, format: str, **kwargs) -> RecordList:
    """Dispatch on a format name: zsre, counterfact, knowns, fever, nli, classification, text."""
    if format == "zsre":
        return read_zsre(path, **kwargs)
    if format == "counterfact":
        return read_counterfact(path, **kwargs)
    if format == "knowns":
        return read_knowns(path, **kwargs)
    if format == "fever":
        return read_fever(path, **kwargs)
    if format == "nli":
        return read_nli(path, **kwargs)
    if format == "classification":
        return read_classification(path, **kwargs)
    if format == "text":
        text_kw = {k: kwargs.pop(k) for k in ("prompt_words", "target_words", "min_prompt_words") if k in kwargs}
        kwargs.pop("skip_invalid", None)  # short paragraphs are always skipped and reported
        return text_records(read_text(path, **kwargs), source=str(path), **text_kw)
    raise ValueError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
