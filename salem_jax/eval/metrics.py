"""Edit accuracy, adapt accuracy, drawdown and locality: the SaLEM / MEND metrics.

Definitions (x = an input, y = its target; "teacher forced" means the model sees the gold
target prefix when predicting each target token; all argmaxes are over the vocabulary, or
over the classes for a classifier):

* **Edit accuracy EA** (SaLEM eq. 7, MEND): share of edit examples (group "fail") whose
  *whole* target is the argmax, i.e. every target token is the argmax under teacher forcing;
  for a classifier, the argmax class is the label. Computed on the edited model.
* **Token accuracy**: for each example the share of its target tokens that are the argmax,
  averaged over examples (macro average; a classifier has one "token").
* **Adapt accuracy**: EA on the rephrases of the edit inputs (group "adapt").
* **Drawdown DD, accuracy**: accuracy of the base model minus accuracy of the edited model on
  inputs that must not change (group "pass"; SaLEM appendix B.2 for classification). Positive
  = the edit broke something.
* **Drawdown DD, perplexity** (generation): perplexity = exp(total target NLL / total target
  tokens) on a group (token weighted), or on held-out plain text (`salem_jax.eval.perplexity`).
  Reported as the relative increase ``ppl_after / ppl_before - 1`` and the absolute increase
  ``ppl_after - ppl_before``.
* **Locality**: share of a group's target tokens (teacher forced) whose argmax is the *same*
  for the base and the edited model, token weighted. It measures what the edit changed even
  where the base model is wrong (SmolLM2-135M gets 0 of 500 zsRE locality answers exactly
  right before any edit, so an accuracy drop alone says nothing there).

Layout: pure jnp functions on one batch (`batch_scores`, `compare_batch`), pure numpy
aggregates (`accuracy`, `group_perplexity`, `drawdown`, `locality`, ...), and model-facing
functions that tokenize rows, run jitted fixed-shape batches and aggregate (`score_rows`,
`compare_rows`, `evaluate_edit`; `base_scores` caches the base model's side for many edits).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from salem_jax import losses
from salem_jax.data.tokenize import encode, pad_rows, slice_rows
from salem_jax.scored_logits import scored_logits, with_score_positions

Rows = Sequence[Mapping[str, Any]]


# --------------------------------------------------------------------------- one batch (jnp)


def batch_scores(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
    """Per-example scores of one batch (logits [B, S, V], labels / mask [B, S]).

    Returns [B] arrays: `correct` (whole target is the argmax, teacher forced), `token_correct`
    (number of target tokens that are the argmax), `nll_sum` (summed target NLL, nats) and
    `n_tokens` (number of target tokens).
    """
    maskf = mask.astype(jnp.float32)
    ok = losses.token_correct(logits, labels).astype(jnp.float32) * maskf
    return {
        "correct": losses.example_correct(logits, labels, mask),
        "token_correct": ok.sum(-1),
        "nll_sum": -(losses.token_logprobs(logits, labels) * maskf).sum(-1),
        "n_tokens": maskf.sum(-1),
    }


def compare_batch(
    base_logits: jax.Array, new_logits: jax.Array, labels: jax.Array, mask: jax.Array
) -> dict[str, jax.Array]:
    """`batch_scores` of both models (keys suffixed `_before` / `_after`) plus `unchanged`:
    the number of target positions whose argmax is the same for both models: [B] each."""
    before = batch_scores(base_logits, labels, mask)
    after = batch_scores(new_logits, labels, mask)
    same = (jnp.argmax(base_logits, -1) == jnp.argmax(new_logits, -1)) & (mask > 0)
    out = {f"{k}_before": v for k, v in before.items()}
    out.update({f"{k}_after": v for k, v in after.items()})
    out["unchanged"] = same.astype(jnp.float32).sum(-1)
    return out


# The jitted scorers apply the LM head at the scored positions only when the batch has
# `score_pos` (`row_batches` adds it; salem_jax.scored_logits): the same scores, K positions'
# worth of head and log-softmax per row instead of S.


@functools.partial(jax.jit, static_argnums=0)
def _score(apply: Callable, params: Any, batch: dict) -> dict[str, jax.Array]:
    return batch_scores(*scored_logits(apply, params, batch))


@functools.partial(jax.jit, static_argnums=0)
def _compare(apply: Callable, base_params: Any, new_params: Any, batch: dict) -> dict[str, jax.Array]:
    base, labels, mask = scored_logits(apply, base_params, batch)
    return compare_batch(base, scored_logits(apply, new_params, batch)[0], labels, mask)


@functools.partial(jax.jit, static_argnums=0)
def _score_with_argmax(apply: Callable, params: Any, batch: dict) -> tuple[dict[str, jax.Array], jax.Array]:
    logits, labels, mask = scored_logits(apply, params, batch)
    return batch_scores(logits, labels, mask), jnp.argmax(logits, -1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=0)
def _compare_to_argmax(apply: Callable, new_params: Any, batch: dict, base_argmax: jax.Array) -> dict[str, jax.Array]:
    """`compare_batch`'s "after" half and `unchanged`, against stored base argmaxes [B, K]
    (`_score_with_argmax` on the same batch)."""
    return after_vs_argmax(apply, new_params, batch, base_argmax)


def after_vs_argmax(apply: Callable, new_params: Any, batch: dict, base_argmax: jax.Array) -> dict[str, jax.Array]:
    """The body of `_compare_to_argmax`, for use inside other jitted functions: `batch_scores`
    of `new_params` (keys suffixed `_after`) and `unchanged` against base argmaxes [B, K]."""
    logits, labels, mask = scored_logits(apply, new_params, batch)
    out = {f"{k}_after": v for k, v in batch_scores(logits, labels, mask).items()}
    same = (jnp.argmax(logits, -1) == base_argmax) & (mask > 0)
    out["unchanged"] = same.astype(jnp.float32).sum(-1)
    return out


# --------------------------------------------------------------------------- aggregates (numpy)


def accuracy(correct: np.ndarray) -> float:
    """Share of examples that are correct ([N] bool). EA when `correct` comes from edit
    inputs of the edited model; adapt accuracy on their rephrases. NaN for N = 0."""
    correct = np.asarray(correct)
    return float(correct.mean()) if correct.size else float("nan")


def token_accuracy(token_correct: np.ndarray, n_tokens: np.ndarray) -> float:
    """Mean over examples of (target tokens that are the argmax / target tokens)."""
    n = np.asarray(n_tokens, np.float64)
    if n.size == 0:
        return float("nan")
    return float(np.mean(np.asarray(token_correct, np.float64) / np.maximum(n, 1.0)))


def group_perplexity(nll_sum: np.ndarray, n_tokens: np.ndarray) -> float:
    """exp(sum of NLL / number of tokens) over all examples (token weighted)."""
    total = float(np.sum(n_tokens))
    return math.exp(float(np.sum(nll_sum)) / total) if total > 0 else float("nan")


def drawdown(acc_before: float, acc_after: float) -> float:
    """Accuracy drawdown: accuracy before the edit minus accuracy after it (positive = worse)."""
    return acc_before - acc_after


def perplexity_drawdown(ppl_before: float, ppl_after: float) -> dict[str, float]:
    """Perplexity drawdown: `rel` = ppl_after / ppl_before - 1, `abs` = ppl_after - ppl_before."""
    return {"rel": ppl_after / ppl_before - 1.0, "abs": ppl_after - ppl_before}


def locality(unchanged: np.ndarray, n_tokens: np.ndarray) -> float:
    """Share of target tokens whose argmax is the same before and after the edit (token
    weighted): sum(unchanged) / sum(n_tokens)."""
    total = float(np.sum(n_tokens))
    return float(np.sum(unchanged)) / total if total > 0 else float("nan")


# --------------------------------------------------------------------------- rows -> batches


def _rows_to_lists(model, rows: Rows, where: str) -> tuple[list, list, list | None]:
    prompts, targets, pairs = [], [], []
    for i, r in enumerate(rows):
        try:
            prompts.append(r["prompt"])
            if model.kind == "classifier":
                targets.append(int(r["label"]))
            else:
                targets.append(r["target"])
            pairs.append(r.get("text_pair", "") if hasattr(r, "get") else "")
        except (KeyError, TypeError, ValueError) as e:
            field = "label" if model.kind == "classifier" else "prompt/target"
            raise ValueError(f"{where} row {i}: missing or bad field {field!r} ({e!r})") from None
    use_pairs = model.kind == "classifier" and any(pairs)
    return prompts, targets, (pairs if use_pairs else None)


def row_batches(
    model, rows: Rows, batch_size: int, *, length: int | None = None, where: str = "rows"
) -> Iterator[tuple[dict[str, np.ndarray], int]]:
    """Tokenize `rows` (mappings with "prompt" and "target", or "label" and optional
    "text_pair" for classifiers, e.g. edit-set rows) into batches of exactly `batch_size`
    rows and one sequence length; yields (batch, number of real rows). Padded rows have
    all-zero masks and are dropped by the caller. Every batch carries `score_pos` with one K
    for all of `rows` (`salem_jax.scored_logits`), so the scorers compile once per group."""
    rows = list(rows)
    if not rows:
        return
    full = encode_rows(model, rows, length=length, where=where)
    for start in range(0, len(rows), batch_size):
        part = slice_rows(full, start, start + batch_size)
        n = next(iter(part.values())).shape[0]
        yield pad_rows(part, batch_size), n


def encode_rows(model, rows: Rows, *, length: int | None = None, where: str = "rows") -> dict[str, np.ndarray]:
    """All of `rows` as one batch dict [N, S] with `score_pos` [N, K]: one padded length and
    one K for every row (`row_batches` slices it into batches)."""
    prompts, targets, pairs = _rows_to_lists(model, list(rows), where)
    return with_score_positions(encode(model, prompts, targets, text_pairs=pairs, length=length, where=where))


def _n_batches(n: int, batch_size: int) -> int:
    return -(-n // batch_size)


def score_rows(
    model, params: Any, rows: Rows, *, batch_size: int = 16, progress: bool = True, where: str = "rows"
) -> dict[str, np.ndarray]:
    """`batch_scores` of `params` on every row, as numpy [N] arrays (jitted, fixed shapes)."""
    rows = list(rows)
    parts: list[dict] = []
    for batch, n in tqdm(
        row_batches(model, rows, batch_size, where=where),
        total=_n_batches(len(rows), batch_size),
        desc=f"score {where}",
        disable=not progress,
    ):
        out = jax.device_get(_score(model.apply, params, batch))
        parts.append({k: np.asarray(v)[:n] for k, v in out.items()})
    return _concat(parts)


def compare_rows(
    model,
    base_params: Any,
    new_params: Any,
    rows: Rows,
    *,
    batch_size: int = 16,
    progress: bool | tqdm = True,
    where: str = "rows",
) -> dict[str, np.ndarray]:
    """`compare_batch` of base and edited params on every row, as numpy [N] arrays.

    `progress` may be an open tqdm bar, which is advanced once per batch."""
    rows = list(rows)
    bar = progress if isinstance(progress, tqdm) else None
    it = row_batches(model, rows, batch_size, where=where)
    if bar is None:
        it = tqdm(it, total=_n_batches(len(rows), batch_size), desc=f"compare {where}", disable=not progress)
    outs, ns = [], []
    for batch, n in it:
        outs.append(_compare(model.apply, base_params, new_params, batch))
        ns.append(n)
        if bar is not None:
            bar.update(1)
    # one transfer to the host, after every batch was dispatched
    return _concat([{k: np.asarray(v)[:n] for k, v in out.items()} for out, n in zip(jax.device_get(outs), ns)])


def _concat(parts: list[dict]) -> dict[str, np.ndarray]:
    if not parts:
        return {}
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _fingerprint(rows: list) -> int:
    return hash(tuple((r.get("prompt"), str(r.get("target")), r.get("label"), r.get("text_pair")) for r in rows))


@dataclasses.dataclass(frozen=True)
class BaseScores:
    """The base model's scores on fixed groups of rows (and text), computed once and reused
    by `evaluate_edit(..., base=...)` for many edits: each evaluation then runs only the
    edited model. Built by `base_scores`."""

    batch_size: int
    scores: dict  # group -> {name: [N] array} (`batch_scores` keys)
    argmax: dict  # group -> list of [batch_size, S] int32 argmax arrays, one per batch
    fingerprints: dict  # group -> hash of its rows, to refuse different rows
    text: dict | None = None  # {"nll_sum", "n_tokens", "key"} of the held-out text, if any
    # group -> list of (tokenised batch, real rows): each edit's evaluation reuses them instead
    # of tokenising the same rows again
    batches: dict = dataclasses.field(default_factory=dict)


def base_scores(
    model,
    base_params: Any,
    groups: Mapping[str, Rows],
    *,
    texts: Sequence[str] | None = None,
    batch_size: int = 16,
    text_window: int | None = None,
    text_stride: int | None = None,
    progress: bool = True,
) -> BaseScores:
    """Score the base model once on `groups` (and `texts`) for reuse across edits."""
    scores, argmax, prints, batches = {}, {}, {}, {}
    for name, rows in groups.items():
        rows = list(rows)
        parts, am = [], []
        batches[name] = list(row_batches(model, rows, batch_size, where=f"group {name!r}"))
        for batch, n in tqdm(batches[name], desc=f"base {name}", disable=not progress):
            sc, a = _score_with_argmax(model.apply, base_params, batch)
            parts.append({k: np.asarray(v)[:n] for k, v in jax.device_get(sc).items()})
            am.append(a)  # stays on the device: each edit's comparison reads it there
        scores[name], argmax[name], prints[name] = _concat(parts), am, _fingerprint(rows)
    text = None
    if texts:
        from salem_jax.eval.perplexity import perplexity

        r = perplexity(model, base_params, texts, window=text_window, stride=text_stride, progress=progress)
        text = {"nll_sum": r.nll_sum, "n_tokens": r.n_tokens, "key": (hash(tuple(texts)), text_window, text_stride)}
    return BaseScores(batch_size, scores, argmax, prints, text, batches)


def _compare_with_base(model, base: BaseScores, name: str, new_params: Any, rows: list, bar) -> dict[str, np.ndarray]:
    if name not in base.scores:
        raise ValueError(f"group {name!r} is not in the base scores (they have {sorted(base.scores)})")
    if _fingerprint(rows) != base.fingerprints[name]:
        raise ValueError(f"group {name!r}: rows differ from those the base scores were computed on")
    cached = base.batches.get(name)
    it = cached if cached is not None else row_batches(model, rows, base.batch_size, where=f"group {name!r}")
    outs, ns = [], []
    for (batch, n), am in zip(it, base.argmax[name]):
        outs.append(_compare_to_argmax(model.apply, new_params, batch, am))
        ns.append(n)
        bar.update(1)
    # one transfer to the host for the whole group, after every batch was dispatched
    parts = [{k: np.asarray(v)[:n] for k, v in out.items()} for out, n in zip(jax.device_get(outs), ns)]
    got = _concat(parts)
    if got:
        got.update({f"{k}_before": v for k, v in base.scores[name].items()})
    return got


# --------------------------------------------------------------------------- the summary


@dataclasses.dataclass(frozen=True)
class GroupMetrics:
    """Every metric of one group of rows, before and after the edit."""

    n: int
    acc_before: float
    acc_after: float
    token_acc_before: float
    token_acc_after: float
    locality: float
    ppl_before: float = float("nan")  # NaN for classifiers
    ppl_after: float = float("nan")


def group_metrics(scores: dict[str, np.ndarray], *, with_ppl: bool = True) -> GroupMetrics:
    """Aggregate the per-row output of `compare_rows` into a `GroupMetrics`."""
    if not scores:
        nan = float("nan")
        return GroupMetrics(0, nan, nan, nan, nan, nan)
    s = scores
    return GroupMetrics(
        n=int(s["correct_before"].shape[0]),
        acc_before=accuracy(s["correct_before"]),
        acc_after=accuracy(s["correct_after"]),
        token_acc_before=token_accuracy(s["token_correct_before"], s["n_tokens_before"]),
        token_acc_after=token_accuracy(s["token_correct_after"], s["n_tokens_after"]),
        locality=locality(s["unchanged"], s["n_tokens_after"]),
        ppl_before=group_perplexity(s["nll_sum_before"], s["n_tokens_before"]) if with_ppl else float("nan"),
        ppl_after=group_perplexity(s["nll_sum_after"], s["n_tokens_after"]) if with_ppl else float("nan"),
    )


def lost_indices(scores: Mapping[str, Any]) -> list[int]:
    """Indices of the rows an edit broke: right on the base model, wrong after (`correct_before` and
    not `correct_after`, bool [N] each); [] for a group without rows (`scores` empty)."""
    if not scores:
        return []
    broke = np.asarray(scores["correct_before"], bool) & ~np.asarray(scores["correct_after"], bool)
    return [int(j) for j in np.flatnonzero(broke)]


def group_outputs(name: str, gm: GroupMetrics, with_ppl: bool) -> dict[str, float]:
    """`g/n`, `g/acc_before`, ... of one group (see `evaluate_edit`)."""
    return {
        f"{name}/{f.name}": getattr(gm, f.name)
        for f in dataclasses.fields(gm)
        if with_ppl or not f.name.startswith("ppl")
    }


def headline_metrics(per: Mapping[str, GroupMetrics], with_ppl: bool) -> dict[str, float]:
    """`ea`, `ea_token`, `adapt_acc`, `portability(_before)`, `dd_acc`, `locality`, `dd_ppl_pass_*`
    from the groups "fail", "adapt", "portability" and "pass" (each only when its group is in `per`)."""
    out: dict[str, float] = {}
    if "fail" in per:
        out["ea"] = per["fail"].acc_after
        out["ea_token"] = per["fail"].token_acc_after
    if "adapt" in per:
        out["adapt_acc"] = per["adapt"].acc_after
    if "portability" in per:  # salem_jax.eval.portability
        out["portability"] = per["portability"].acc_after
        out["portability_before"] = per["portability"].acc_before
    if "pass" in per:
        p = per["pass"]
        out["dd_acc"] = drawdown(p.acc_before, p.acc_after)
        out["locality"] = p.locality
        if with_ppl and p.n:
            dd = perplexity_drawdown(p.ppl_before, p.ppl_after)
            out["dd_ppl_pass_rel"], out["dd_ppl_pass_abs"] = dd["rel"], dd["abs"]
    return out


def evaluate_edit(
    model,
    base_params: Any,
    edited_params: Any,
    groups: Mapping[str, Rows],
    *,
    texts: Sequence[str] | None = None,
    batch_size: int = 16,
    text_window: int | None = None,
    text_stride: int | None = None,
    progress: bool = True,
    base: BaseScores | None = None,
    lost_rows: Sequence[str] = (),
) -> dict[str, Any]:
    """Every SaLEM/MEND metric of one edited parameter set, in one flat dict.

    `groups` maps a group name to its rows (edit-set rows or any mappings with "prompt" and
    "target"; classifiers need "label" and optionally "text_pair"). The names "fail", "adapt"
    and "pass" get headline metrics; any other name (e.g. "loc") only its per-group ones.
    `texts` (optional) is held-out plain text for the perplexity drawdown (causal LMs only).

    Returns, for each group g: `g/n`, `g/acc_before`, `g/acc_after`, `g/token_acc_before`,
    `g/token_acc_after`, `g/locality` and (not for classifiers) `g/ppl_before`, `g/ppl_after`;
    and the headline numbers (when their group is given):
      `ea` = fail/acc_after, `ea_token` = fail/token_acc_after, `adapt_acc` = adapt/acc_after,
      `portability` / `portability_before` = portability/acc_after / acc_before (group "portability",
      salem_jax.eval.portability),
      `dd_acc` = pass/acc_before - pass/acc_after, `locality` = pass/locality,
      `dd_ppl_pass_rel` / `dd_ppl_pass_abs` (perplexity drawdown of the pass targets),
      `text_ppl_before`, `text_ppl_after`, `dd_ppl_text_rel`, `dd_ppl_text_abs` (held-out text).
    Every batch has `batch_size` rows and one bucketed length per group, so each group's
    forward pass compiles once. The base model is evaluated in the same jitted call, unless
    `base` (from `base_scores` on the same groups, texts and batch size) supplies its scores:
    then only the edited model runs, which halves the cost of evaluating many edits.
    `lost_rows`: groups whose broken rows are also listed, `g/lost` = the row indices (into
    `groups[g]`) right on the base model and wrong on the edited one (as `EditEvaluator`'s), so a
    drawdown can be read as which facts, not only how many.
    """
    unknown = sorted(set(lost_rows) - set(groups))
    if unknown:
        raise ValueError(f"evaluate_edit: lost_rows names {unknown}, which are not groups here ({sorted(groups)})")
    if base is not None and base.batch_size != batch_size:
        raise ValueError(f"base scores were computed with batch_size {base.batch_size}, not {batch_size}")
    groups = {k: list(v) for k, v in groups.items()}
    with_ppl = model.kind != "classifier"
    total = sum(_n_batches(len(v), batch_size) for v in groups.values())
    out: dict[str, float] = {}
    per: dict[str, GroupMetrics] = {}
    with tqdm(total=total, desc="evaluate", disable=not progress) as bar:
        for name, rows in groups.items():
            if base is not None:
                scores = _compare_with_base(model, base, name, edited_params, rows, bar)
            else:
                scores = compare_rows(
                    model, base_params, edited_params, rows, batch_size=batch_size, progress=bar,
                    where=f"group {name!r}",
                )
            per[name] = group_metrics(scores, with_ppl=with_ppl)
            out.update(group_outputs(name, per[name], with_ppl))
            if name in lost_rows:
                out[f"{name}/lost"] = lost_indices(scores) if len(rows) else []
    out.update(headline_metrics(per, with_ppl))
    if texts:
        from salem_jax.eval.perplexity import perplexity, perplexity_change

        if base is not None and base.text is not None:
            if base.text["key"] != (hash(tuple(texts)), text_window, text_stride):
                raise ValueError("texts, text_window or text_stride differ from those of the base scores")
            r = perplexity(model, edited_params, texts, window=text_window, stride=text_stride, progress=progress)
            before = math.exp(base.text["nll_sum"] / base.text["n_tokens"])
            ch = {"before": before, "after": r.ppl, **perplexity_drawdown(before, r.ppl)}
        else:
            ch = perplexity_change(
                model, base_params, edited_params, texts, window=text_window, stride=text_stride, progress=progress
            )
        out["text_ppl_before"], out["text_ppl_after"] = ch["before"], ch["after"]
        out["dd_ppl_text_rel"], out["dd_ppl_text_abs"] = ch["rel"], ch["abs"]
    return out
