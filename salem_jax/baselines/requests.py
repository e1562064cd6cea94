"""Edit requests for the locate-then-edit editors (r-ROME, MEMIT, EMMET, AlphaEdit), and their checks.

A request is "after `prompt` (which contains `subject`), say `target_new`". Before any costly
step, `check_requests` sorts a list of them into the ones that can be edited and the ones that
cannot (the subject does not occur in the prompt: skipped and counted, as the `rome` pipeline
method does), and refuses a list in which two requests contradict each other (the same subject
and relation, two different targets), naming both.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence


@dataclasses.dataclass(frozen=True)
class EditRequest:
    """One fact to insert. `relation` (e.g. CounterFact's relation_id "P17") decides which
    requests contradict each other; without it the prompt with the subject replaced by "{}" is
    the relation. `record_id` only names the request in messages."""

    prompt: str
    subject: str
    target_new: str
    relation: str | None = None
    target_true: str | None = None
    record_id: str | None = None

    def name(self, i: int) -> str:
        rid = f"record {self.record_id!r}" if self.record_id is not None else f"request {i}"
        return f"{rid} ({self.prompt!r} -> {self.target_new!r})"

    def relation_key(self) -> tuple[str, str]:
        rel = self.relation if self.relation else self.prompt.replace(self.subject, "{}", 1).strip().lower()
        return (self.subject.strip().lower(), rel)


@dataclasses.dataclass(frozen=True)
class Checked:
    """`kept`: indices into the request list that will be edited; `skipped`: (index, reason)."""

    kept: tuple[int, ...]
    skipped: tuple[tuple[int, str], ...]

    def summary(self) -> dict:
        return {"requested": len(self.kept) + len(self.skipped), "edited": len(self.kept),
                "skipped": len(self.skipped), "skipped_reasons": [r for _, r in self.skipped]}


def as_requests(items: Sequence) -> list[EditRequest]:
    """EditRequests from EditRequests, dicts with the same fields, or EditRecords (the data
    readers' records: prompt, subject, target_new, relation_id in `extra` when present)."""
    out = []
    for i, it in enumerate(items):
        if isinstance(it, EditRequest):
            out.append(it)
        elif isinstance(it, dict):
            unknown = set(it) - {f.name for f in dataclasses.fields(EditRequest)}
            if unknown:
                raise ValueError(f"edit request {i}: unknown fields {sorted(unknown)}")
            out.append(EditRequest(**it))
        else:  # an EditRecord of salem_jax.data.records
            extra = getattr(it, "extra", None) or {}
            out.append(EditRequest(
                prompt=it.prompt, subject=getattr(it, "subject", "") or "", target_new=it.target_new,
                relation=extra.get("relation_id"), target_true=getattr(it, "target_true", None),
                record_id=str(getattr(it, "id", i)),
            ))
    return out


def check_requests(requests: Sequence[EditRequest]) -> Checked:
    """Validate a batch before any model work.

    Raises ValueError for an empty target or subject-less request that cannot even be skipped
    meaningfully (empty target), and for two requests with the same subject and relation but
    different targets (naming both). Requests whose subject does not occur in the prompt are
    skipped with a reason; exact duplicates are edited once (the later copy is skipped)."""
    kept, skipped = [], []
    seen: dict[tuple[str, str], int] = {}
    for i, r in enumerate(requests):
        if not r.target_new or not r.target_new.strip():
            raise ValueError(f"{r.name(i)}: field 'target_new' is empty; give the text the model should produce")
        if not r.subject or r.subject not in r.prompt:
            skipped.append((i, f"{r.name(i)}: subject {r.subject!r} does not occur in the prompt"))
            continue
        key = r.relation_key()
        if key in seen:
            j = seen[key]
            other = requests[j]
            if other.target_new.strip() != r.target_new.strip():
                raise ValueError(
                    f"contradicting edits in one batch: {other.name(j)} and {r.name(i)} give the same subject "
                    f"{r.subject!r} and relation {key[1]!r} two targets; drop one of them"
                )
            skipped.append((i, f"{r.name(i)}: duplicate of {other.name(j)}"))
            continue
        seen[key] = i
        kept.append(i)
    return Checked(tuple(kept), tuple(skipped))
