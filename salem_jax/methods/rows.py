"""Edit-set rows as edit requests: the target a row teaches, and the text pairs of classifiers."""

from __future__ import annotations


def target(model, row: dict):
    """What an edit of `row` teaches: its label for classifiers, its target text otherwise."""
    return row["label"] if model.kind == "classifier" else row["target"]


def text_pairs(model, rows: list[dict]) -> list[str] | None:
    """The second sentences of a classifier's sentence-pair rows (NLI), or None when there are none."""
    if model.kind == "classifier" and any(r.get("text_pair") for r in rows):
        return [r.get("text_pair", "") for r in rows]
    return None
