"""Portability (EasyEdit's / KnowEdit's fourth metric): does the edited model answer questions whose
answers *follow from* the new fact?

Data: EasyEdit's zsRE portability file (`zsre_mend_eval_portability_gpt4.json`; Yao et al., "Editing
Large Language Models: Problems, Methods, and Opportunities", EMNLP 2023) gives each edit a GPT-4
written one-hop question that mentions the new answer, e.g. after "IAAF Combined Events Challenge
was founded in 2006": "What type of sports event is the IAAF Combined Events Challenge, which was
established in 2006?" -> "Athletics". `salem_jax.data.readers.read_zsre` keeps them as
`extra["portability_prompts"]` / `extra["portability_targets"]`.

Definition (computed exactly as edit accuracy EA, salem_jax.eval.metrics): a portability question
is answered when every token of its answer is the argmax under teacher forcing; an edit's
portability is the share of its questions answered by the edited model, and the reported
`portability` is the mean over edits (like adapt accuracy). `portability_before` is the same on
the base model. In `evaluate_edit` the rows form the group "portability".

The questions assume the *counterfactual* fact, so the pipeline measures portability in
counterfactual mode only.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

from salem_jax.eval.metrics import accuracy, batch_scores

GROUP = "portability"


def portability_rows(records: Sequence) -> dict[str, list[dict]]:
    """record id -> the record's portability rows (edit-set-like dicts: id, record_id, group
    "portability", prompt, target). Records without portability questions are left out."""
    out: dict[str, list[dict]] = {}
    for rec in records:
        prompts = rec.extra.get("portability_prompts") or []
        targets = rec.extra.get("portability_targets") or []
        if len(prompts) != len(targets):
            raise ValueError(f"record {rec.id!r}: {len(prompts)} portability questions but {len(targets)} answers")
        if prompts:
            out[rec.id] = [
                dict(id=f"{rec.id}#portability[{k}]", record_id=rec.id, group=GROUP, field=f"portability[{k}]",
                     prompt=p, target=t, label=-1, text_pair="")
                for k, (p, t) in enumerate(zip(prompts, targets))
            ]
    return out


def portability_from_logits(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> float:
    """Portability of one edit from its questions' logits [Q, S, V], labels and mask [Q, S]:
    the share of questions whose whole answer is the argmax (teacher forced)."""
    return accuracy(np.asarray(batch_scores(logits, labels, mask)["correct"]))


def portability_over_edits(correct: np.ndarray, counts: Sequence[int]) -> float:
    """Portability of several edits from their questions' `correct` flags (teacher forced, the
    `batch_scores` definition; the questions of edit 0, then of edit 1, ...) and each edit's number
    of questions: per edit the share answered (`accuracy`, what the one-at-a-time evaluation's
    group "portability" reports for that edit), averaged over the edits that have questions (the
    pipeline's mean over edits). NaN when no edit has any. The many-edits study's `portability`
    (salem_jax.eval.sequential) is this over the questions of all T edits made so far."""
    correct = np.asarray(correct)
    counts = [int(c) for c in counts]
    if sum(counts) != correct.size:
        raise ValueError(f"{correct.size} portability answers scored for {sum(counts)} questions")
    ends = np.cumsum(counts)
    shares = [accuracy(correct[e - c:e]) for c, e in zip(counts, ends) if c]
    return float(np.mean(shares)) if shares else float("nan")
