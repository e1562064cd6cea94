"""The one record type every reader returns, and the bookkeeping of records that were skipped.

An `EditRecord` is one fact (or one classified text) with everything the edit-set builder
needs to make its fail / adapt / pass rows: the prompt, the true and the counterfactual
target, rephrasings (adapt rows) and locality prompts (pass rows in counterfactual mode).

Readers validate every record; a bad one raises `RecordError` (naming the file, the record
number and the field) or, with `skip_invalid=True`, becomes a `Skipped` entry on the returned
`RecordList` so that nothing is dropped without a trace.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Iterable, Sequence


@dataclasses.dataclass(frozen=True)
class EditRecord:
    """One fact to correct or rewrite (see interfaces.md, "Records").

    id:          stable id, "<file name>:<record number>" for file readers
    prompt:      the question / rewrite prompt with the subject filled in (causal: text the
                 target continues; seq2seq: the source; classifier: the first text)
    target_true: the true answer (classification: the label name)
    target_new:  the counterfactual answer (zsRE `alt`, CounterFact `target_new`); "" if none
    rephrases:   the same question phrased differently (adapt rows)
    loc_prompts: unrelated inputs whose answers must not change (locality)
    loc_targets: their answers, one per loc prompt ("" when unknown)
    subject:     the entity the fact is about, when known
    text_pair:   the second sentence of an NLI pair ("" otherwise)
    extra:       everything else (format, source file, relation, all answers, label set ...)
    """

    id: str
    prompt: str
    target_true: str
    target_new: str = ""
    rephrases: tuple[str, ...] = ()
    loc_prompts: tuple[str, ...] = ()
    loc_targets: tuple[str, ...] = ()
    subject: str = ""
    text_pair: str = ""
    # A dict is unhashable: keep it out of the generated __hash__ (but in equality).
    extra: dict = dataclasses.field(default_factory=dict, hash=False)

    def __post_init__(self):
        for name in ("rephrases", "loc_prompts", "loc_targets"):
            value = getattr(self, name)
            if isinstance(value, str):
                raise TypeError(f"EditRecord {self.id!r}: {name} must be a sequence of strings, not one string")
            value = tuple(value)
            for i, v in enumerate(value):
                if not isinstance(v, str):
                    raise TypeError(f"EditRecord {self.id!r}: {name}[{i}] is {type(v).__name__}, not str")
            object.__setattr__(self, name, value)
        for name in ("id", "prompt", "target_true", "target_new", "subject", "text_pair"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"EditRecord {self.id!r}: {name} must be a str, got {type(getattr(self, name)).__name__}")
        if len(self.loc_prompts) != len(self.loc_targets):
            raise ValueError(
                f"EditRecord {self.id!r}: {len(self.loc_prompts)} loc_prompts but {len(self.loc_targets)} loc_targets"
            )

    @property
    def format(self) -> str:
        return str(self.extra.get("format", ""))

    @property
    def source(self) -> str:
        return str(self.extra.get("source", ""))

    @property
    def labels(self) -> tuple[str, ...]:
        """The declared label set of a classification record (empty for generation records)."""
        return tuple(self.extra.get("labels", ()))


@dataclasses.dataclass(frozen=True)
class Skipped:
    """One record left out, and why (written to the skip report)."""

    source: str  # file (or "countryinfo", or an edit-set build step)
    record: str  # record number or id
    field: str
    reason: str

    def message(self) -> str:
        return f"{self.source}: record {self.record}: field {self.field!r}: {self.reason}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class RecordError(ValueError):
    """A record failed validation; the message names the file, the record number and the field."""

    def __init__(self, source: str, record, field: str, reason: str):
        self.skipped = Skipped(str(source), str(record), field, reason)
        super().__init__(self.skipped.message())


class RecordList(list):
    """A `list[EditRecord]` that also carries what the reader skipped and where it read from.

    `skipped` lists invalid records left out (empty unless the reader ran with `skip_invalid=True`,
    or the source has records that are always skipped, such as too-short paragraphs);
    `excluded` counts records left out on purpose, by reason (e.g. FEVER's "NOT ENOUGH INFO").
    """

    def __init__(
        self,
        records: Iterable[EditRecord] = (),
        *,
        skipped: Sequence[Skipped] = (),
        sources: Sequence[str] = (),
        excluded: dict[str, int] | None = None,
    ):
        super().__init__(records)
        self.skipped: list[Skipped] = list(skipped)
        self.sources: tuple[str, ...] = tuple(sources)
        self.excluded: dict[str, int] = dict(excluded or {})

    def summary(self) -> str:
        text = f"{len(self)} records from {', '.join(self.sources) or '?'}"
        if self.skipped:
            text += f"; skipped {len(self.skipped)} (see the skip report)"
        if self.excluded:
            text += "; excluded " + ", ".join(f"{n} {why!r}" for why, n in self.excluded.items())
        return text


def write_skip_report(skipped: Sequence[Skipped], path: str | os.PathLike) -> str:
    """Write one JSON object per skipped record (source, record, field, reason); returns the path."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for s in skipped:
            f.write(json.dumps(s.to_dict(), ensure_ascii=False) + "\n")
    return path


def read_skip_report(path: str | os.PathLike) -> list[Skipped]:
    with open(path, encoding="utf-8") as f:
        return [Skipped(**json.loads(line)) for line in f if line.strip()]


def with_template(records: Sequence[EditRecord], template: str, *, loc: bool = True) -> RecordList:
    """The records with every prompt and rephrase (and, when `loc`, every locality prompt)
    wrapped in `template`, whose single "{}" marks the text, e.g. "Question: {}\\nAnswer:" to
    pose zsRE's questions to a model that was not trained on the QA format. Targets are kept.
    Skip information of a RecordList is carried over."""
    if template.count("{}") != 1:
        raise ValueError(f"a prompt template needs exactly one '{{}}' for the text, got {template!r}")

    def fill(text: str) -> str:
        return template.replace("{}", text)

    out = [
        dataclasses.replace(
            r,
            prompt=fill(r.prompt),
            rephrases=tuple(fill(p) for p in r.rephrases),
            loc_prompts=tuple(fill(p) for p in r.loc_prompts) if loc else r.loc_prompts,
            extra={**r.extra, "prompt_template": template},
        )
        for r in records
    ]
    return RecordList(
        out,
        skipped=getattr(records, "skipped", ()),
        sources=getattr(records, "sources", ()),
        excluded=getattr(records, "excluded", None),
    )
