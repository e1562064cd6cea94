"""ROME's CounterFact metrics: efficacy, paraphrase and neighborhood score and magnitude.

Probabilities. For a prompt x and a target y of tokens y_1..y_m (a space is put between
them, as ROME does), P(y | x) here is ROME's length-normalised probability
``exp(-(1/m) * sum_i -log p(y_i | x, y_<i))``, i.e. exp of minus the *mean* token NLL under
teacher forcing (not the product of the token probabilities). P(new) uses the record's
counterfactual target `target_new`, P(true) its true target `target_true`.

Metrics (each first averaged over the prompts of one record, then over records, as ROME's
`summarize.py` does; comparisons are strict, a tie is a failure):

| metric | prompts | definition |
|---|---|---|
| ES (efficacy score) | the rewrite prompt | share with P(new) > P(true) |
| EM (efficacy magnitude) | the rewrite prompt | mean of P(new) - P(true) |
| PS / PM | paraphrase prompts | the same on the record's paraphrases |
| NS (neighborhood score) | neighborhood prompts | share with P(true) > P(new) |
| NM | neighborhood prompts | mean of P(true) - P(new) |
| Score | | harmonic mean of ES, PS and NS (0 if any is 0) |

Before an edit ES is low (the model prefers the truth); a good edit drives ES and PS to 1
and keeps NS where it was (near 1): neighborhood prompts are about other subjects that
share the true answer, and must keep it.

`counterfact_metrics` is the pure core (probabilities in, metrics out); `evaluate_counterfact`
runs a model on records (`salem_jax.data.records.EditRecord` or mappings with the same
fields: prompt, target_new, target_true, rephrases, loc_prompts).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

from salem_jax.eval.metrics import score_rows


@dataclasses.dataclass(frozen=True)
class PromptProbs:
    """P(new) and P(true) for a set of prompts; `record[i]` says which record prompt i
    belongs to (None: every prompt is its own record)."""

    p_new: np.ndarray  # [N]
    p_true: np.ndarray  # [N]
    record: np.ndarray | None = None  # [N] int

    def __post_init__(self):
        n, t = np.shape(self.p_new), np.shape(self.p_true)
        if n != t or len(n) != 1:
            raise ValueError(f"p_new {n} and p_true {t} must be 1-D of one length")
        if self.record is not None and np.shape(self.record) != n:
            raise ValueError(f"record {np.shape(self.record)} must match p_new {n}")


def probs_from_nll(mean_nll: np.ndarray) -> np.ndarray:
    """ROME's probability of a target: exp(-mean token NLL)."""
    return np.exp(-np.asarray(mean_nll, np.float64))


def _per_record_mean(values: np.ndarray, record: np.ndarray | None) -> float:
    values = np.asarray(values, np.float64)
    if values.size == 0:
        return float("nan")
    if record is None:
        return float(values.mean())
    record = np.asarray(record)
    keys, inv = np.unique(record, return_inverse=True)
    sums = np.bincount(inv, weights=values, minlength=len(keys))
    counts = np.bincount(inv, minlength=len(keys))
    return float(np.mean(sums / counts))


def success_and_magnitude(p_a: np.ndarray, p_b: np.ndarray, record: np.ndarray | None = None) -> tuple[float, float]:
    """(mean of [p_a > p_b], mean of p_a - p_b), each averaged per record then over records."""
    p_a, p_b = np.asarray(p_a, np.float64), np.asarray(p_b, np.float64)
    return _per_record_mean(p_a > p_b, record), _per_record_mean(p_a - p_b, record)


def harmonic_mean(values: Sequence[float]) -> float:
    """Harmonic mean of non-negative numbers; 0 if any is 0, NaN if any is NaN."""
    v = np.asarray(values, np.float64)
    if np.any(np.isnan(v)):
        return float("nan")
    if np.any(v <= 0):
        return 0.0
    return float(len(v) / np.sum(1.0 / v))


def counterfact_metrics(
    rewrite: PromptProbs, paraphrase: PromptProbs | None = None, neighborhood: PromptProbs | None = None
) -> dict[str, float]:
    """ES, EM, PS, PM, NS, NM and Score (see the module docstring) from probabilities.

    A missing group gives NaN for its two metrics and for Score."""
    nan = float("nan")
    es, em = success_and_magnitude(rewrite.p_new, rewrite.p_true, rewrite.record)
    ps, pm = (nan, nan) if paraphrase is None else success_and_magnitude(
        paraphrase.p_new, paraphrase.p_true, paraphrase.record
    )
    ns, nm = (nan, nan) if neighborhood is None else success_and_magnitude(
        neighborhood.p_true, neighborhood.p_new, neighborhood.record
    )
    return {"ES": es, "EM": em, "PS": ps, "PM": pm, "NS": ns, "NM": nm, "Score": harmonic_mean([es, ps, ns])}


# --------------------------------------------------------------------------- model-facing


def target_probs(
    model, params: Any, prompts: Sequence[str], targets: Sequence[str], *, batch_size: int = 16,
    progress: bool = True, where: str = "counterfact",
) -> np.ndarray:
    """ROME's P(target | prompt) = exp(-mean token NLL) for each pair: [N] (causal or seq2seq)."""
    if model.kind == "classifier":
        raise ValueError("CounterFact probabilities need a language model, not a classifier")
    rows = [{"prompt": p, "target": t} for p, t in zip(prompts, targets, strict=True)]
    s = score_rows(model, params, rows, batch_size=batch_size, progress=progress, where=where)
    return probs_from_nll(s["nll_sum"] / np.maximum(s["n_tokens"], 1.0))


def _field(rec, name: str, i: int):
    value = rec.get(name) if isinstance(rec, Mapping) else getattr(rec, name, None)
    if value is None:
        rid = rec.get("id", i) if isinstance(rec, Mapping) else getattr(rec, "id", i)
        raise ValueError(f"CounterFact record {rid!r}: missing field {name!r}")
    return value


def counterfact_probs(
    model, params: Any, records: Sequence[Any], *, batch_size: int = 16, progress: bool = True
) -> dict[str, PromptProbs]:
    """P(new) and P(true) on every rewrite, paraphrase (`rephrases`) and neighborhood
    (`loc_prompts`) prompt of `records`, in one batched pass: {"rewrite", "paraphrase",
    "neighborhood"} -> PromptProbs (record = index in `records`)."""
    prompts: list[str] = []
    new: list[str] = []
    true: list[str] = []
    spans: dict[str, list[int]] = {"rewrite": [], "paraphrase": [], "neighborhood": []}
    owners: dict[str, list[int]] = {k: [] for k in spans}
    for i, rec in enumerate(records):
        t_new, t_true = _field(rec, "target_new", i), _field(rec, "target_true", i)
        if not t_new or not t_true:
            rid = rec.get("id", i) if isinstance(rec, Mapping) else getattr(rec, "id", i)
            raise ValueError(f"CounterFact record {rid!r}: 'target_new' and 'target_true' must be non-empty")
        kinds = {
            "rewrite": [_field(rec, "prompt", i)],
            "paraphrase": list(_field(rec, "rephrases", i)),
            "neighborhood": list(_field(rec, "loc_prompts", i)),
        }
        for kind, ps in kinds.items():
            for p in ps:
                spans[kind].append(len(prompts))
                owners[kind].append(i)
                prompts.append(p)
                new.append(t_new)
                true.append(t_true)
    if not prompts:
        raise ValueError("CounterFact: no records")
    both = target_probs(
        model, params, prompts + prompts, new + true, batch_size=batch_size, progress=progress
    )
    p_new, p_true = both[: len(prompts)], both[len(prompts) :]
    return {
        k: PromptProbs(p_new[idx], p_true[idx], np.asarray(owners[k], np.int64))
        for k, idx in ((k, np.asarray(v, np.int64)) for k, v in spans.items())
    }


def evaluate_counterfact(
    model, params: Any, records: Sequence[Any], *, batch_size: int = 16, progress: bool = True
) -> dict[str, float]:
    """CounterFact metrics of `params` on `records` (see the module docstring): ES, EM, PS,
    PM, NS, NM, Score, plus the number of records and prompts of each kind."""
    probs = counterfact_probs(model, params, records, batch_size=batch_size, progress=progress)
    out = counterfact_metrics(
        probs["rewrite"],
        probs["paraphrase"] if probs["paraphrase"].p_new.size else None,
        probs["neighborhood"] if probs["neighborhood"].p_new.size else None,
    )
    out["n_records"] = len(records)
    out.update({f"n_{k}_prompts": int(v.p_new.size) for k, v in probs.items()})
    return out
