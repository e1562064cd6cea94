"""The golden-layer test: per-edit oracle layers, the best fixed layer, and the third-party LGA.

The golden-layers claim (arXiv 2602.20207; ../shared/papers/golden-layers-*.txt): one fixed layer
edits almost as well as each edit's own best layer, and Layer Gradient Analysis finds it from a
small proxy set. Given a table of metrics for every (edit, candidate layer) - from r-ROME at each
layer (`benchmarks/golden_layers.py`) - this module computes

* `per_edit_oracle`: each edit's best layer (lexicographic on the metric columns given, e.g.
  rewrite, then rephrase, then locality; ties go to the earlier layer) and its metrics there;
* `best_fixed_layer`: the single layer with the best mean (same ordering) - a brute-force search;
* `bootstrap_gap`: mean of a paired difference with a percentile bootstrap interval over edits;
* `claim_power`: how often a run of N edits would put that interval's upper end below a bound
  (the claim "within 0.05 of the oracle" established), resampling a finished run's per-edit gaps;
* `lga_inner_product_scores` + `tukey_choice`: the LGA definition of third-party notes on the
  paper (REFERENCE.md, unverified): S(l) = sum_i <grad_{W_l} L(x_i, y_old_i), grad_{W_l}
  L(x_i, y_new_i)> over the layer's MLP weights, layers outside Tukey fences (kappa 1) dropped,
  the largest remaining S chosen. The project's own reading is `salem_jax.saliency.lga_scores`.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from salem_jax.data.tokenize import encode
from salem_jax.losses import example_nll
from salem_jax.scored_logits import with_score_positions
from salem_jax.models.base import get_path


def _order_key(row: np.ndarray) -> tuple:
    return tuple(float(x) for x in row)


def per_edit_oracle(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """table [N, L, M] (metrics in priority order; larger is better) -> (best layer index per edit
    [N], the metrics there [N, M]). Ties: the earlier layer."""
    t = np.asarray(table, np.float64)
    if t.ndim != 3:
        raise ValueError(f"table must be [edits, layers, metrics], got shape {t.shape}")
    best = np.zeros(t.shape[0], int)
    for i in range(t.shape[0]):
        b = 0
        for j in range(1, t.shape[1]):
            if _order_key(t[i, j]) > _order_key(t[i, b]):
                b = j
        best[i] = b
    return best, t[np.arange(t.shape[0]), best]


def best_fixed_layer(table: np.ndarray) -> int:
    """The layer index with the best mean metrics over edits (lexicographic; ties: earlier)."""
    means = np.asarray(table, np.float64).mean(0)  # [L, M]
    b = 0
    for j in range(1, means.shape[0]):
        if _order_key(means[j]) > _order_key(means[b]):
            b = j
    return b


def bootstrap_gap(a: np.ndarray, b: np.ndarray, *, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """mean(a - b) over paired edits with a percentile bootstrap interval: {mean, lo, hi, n}."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    if d.ndim != 1 or d.size == 0:
        raise ValueError(f"need two equal-length 1-D arrays, got difference of shape {d.shape}")
    rng = np.random.default_rng(seed)
    boots = d[rng.integers(0, d.size, size=(n_boot, d.size))].mean(1)
    q = (1 - level) / 2
    return {"mean": float(d.mean()), "lo": float(np.quantile(boots, q)), "hi": float(np.quantile(boots, 1 - q)),
            "n": int(d.size)}


def claim_power(gaps: np.ndarray, ns: Sequence[int], *, bound: float = 0.05, sims: int = 400,
                n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict[int, float]:
    """How many edits would establish "the gap is below `bound`"? For each N in `ns`: the share of
    `sims` simulated runs of N edits - drawn with replacement from a finished run's per-edit gaps
    `gaps` [n] (e.g. oracle rewrite minus the fixed layer's) - whose percentile-bootstrap interval
    (`bootstrap_gap`'s: `n_boot` resamples, two-sided `level`) has its upper end below `bound`.

    A plug-in power estimate: it takes the observed gaps for the truth, so it says what N the
    claim needs if the gap stays what it was, not whether it will. Deterministic by `seed`."""
    g = np.asarray(gaps, np.float64)
    if g.ndim != 1 or g.size == 0:
        raise ValueError(f"gaps must be a non-empty 1-D array, got shape {g.shape}")
    if any(int(n) < 1 for n in ns):
        raise ValueError(f"every N must be >= 1, got {list(ns)}")
    q = 1 - (1 - level) / 2
    rng = np.random.default_rng(seed)
    out = {}
    for n in ns:
        n = int(n)
        ok = 0
        for _ in range(sims):
            run = g[rng.integers(0, g.size, n)]
            boots = run[rng.integers(0, n, size=(n_boot, n))].mean(1)
            ok += bool(np.quantile(boots, q) < bound)
        out[n] = ok / sims
    return out


def tukey_choice(scores: Sequence[float], kappa: float = 1.0) -> tuple[int, list[int]]:
    """Index of the largest score among those inside the Tukey fences [Q1 - kappa IQR,
    Q3 + kappa IQR], and the dropped (outlier) indices."""
    s = np.asarray(scores, np.float64)
    q1, q3 = np.quantile(s, [0.25, 0.75])
    lo, hi = q1 - kappa * (q3 - q1), q3 + kappa * (q3 - q1)
    inside = (s >= lo) & (s <= hi)
    dropped = [int(i) for i in np.flatnonzero(~inside)]
    if not inside.any():
        inside[:] = True
    idx = np.flatnonzero(inside)
    return int(idx[np.argmax(s[idx])]), dropped


@functools.partial(jax.jit, static_argnums=(0, 1))
def _ip_one(apply, paths, params, old, new):
    def nll(p, b):
        return example_nll(apply(p, b), b["labels"], b["label_mask"]).sum()

    def sub(p):
        return {q: get_path(p, q) for q in paths}

    def full(small):  # gradient w.r.t. the tracked kernels only
        out = params
        for q, v in small.items():
            out = _set(out, q, v)
        return out

    g_old = jax.grad(lambda s: nll(full(s), old))(sub(params))
    g_new = jax.grad(lambda s: nll(full(s), new))(sub(params))
    return jnp.stack([jnp.vdot(g_old[q].astype(jnp.float32), g_new[q].astype(jnp.float32)) for q in paths])


def _set(tree: Any, path: str, value) -> Any:
    keys = path.split("/")
    if len(keys) == 1:
        return {**tree, keys[0]: value}
    return {**tree, keys[0]: _set(tree[keys[0]], "/".join(keys[1:]), value)}


def lga_inner_product_scores(model, params: Any, prompts: Sequence[str], old_targets: Sequence[str],
                             new_targets: Sequence[str], layers: Sequence[str] | None = None) -> np.ndarray:
    """The third-party LGA score per layer: sum over proxy edits i of
    <grad_{W_l} NLL(prompt_i -> old_i), grad_{W_l} NLL(prompt_i -> new_i)>, W_l = all MLP kernels
    of layer l (the layer table's `mlp` weights)  [L] float64 (layer order of `layers` or the model)."""
    if not (len(prompts) == len(old_targets) == len(new_targets)) or not prompts:
        raise ValueError("need the same non-zero number of prompts, old targets and new targets")
    names = list(layers) if layers is not None else model.layers.names()
    per_layer = [tuple(w.path for w in model.layers[n].mlp) for n in names]
    paths = tuple(p for ps in per_layer for p in ps)
    total = np.zeros(len(paths))
    for p, o, n in zip(prompts, old_targets, new_targets):
        b_old = encode(model, [p], [o], where="LGA old answer")
        b_new = encode(model, [p], [n], where="LGA new answer")
        L = max(b_old["input_ids"].shape[1], b_new["input_ids"].shape[1])
        b_old = encode(model, [p], [o], length=L)
        b_new = encode(model, [p], [n], length=L)
        total += np.asarray(_ip_one(model.apply, paths, params, b_old, b_new), np.float64)
    out, k = [], 0
    for ps in per_layer:
        out.append(total[k : k + len(ps)].sum())
        k += len(ps)
    return np.asarray(out)


# --------------------------------------------------------------------------- scoring one edit at many layers


def _get(rec, name: str, default=None):
    return rec.get(name, default) if isinstance(rec, dict) else getattr(rec, name, default)


class EditScorer:
    """Scores one edit record on many edited parameter sets (the edit made at each candidate
    layer) with one jitted forward of the edited model per set.

    The rows - rewrite and rephrases with target_new, the locality prompts with their answers,
    and for CounterFact the rewrite / paraphrase / neighbourhood prompts with target_new and
    target_true - are tokenised once into batches of `batch_size` rows (one bucketed length, one
    K), and the base model's argmax on them is computed once, so that each call runs only the
    edited model (`metrics._compare_to_argmax`). Returns the same numbers as scoring each group
    with `score_rows` / `compare_rows` / `evaluate_counterfact` (tested):

      rewrite, rephrase  token accuracy of target_new (teacher-forced argmax)
      locality           share of the locality answers' tokens whose argmax did not move
      ES, PS, NS         CounterFact's (counterfact=True): P(new) > P(true) on the prompt and on
                         the paraphrases, P(true) > P(new) on the neighbourhood prompts
    """

    def __init__(self, model, base_params: Any, rec, target_new: str, *, counterfact: bool, batch_size: int = 16):
        from salem_jax.data.tokenize import pad_rows, slice_rows
        from salem_jax.eval import metrics as M

        self.model, self.counterfact = model, counterfact
        rows: list[tuple[str, str]] = []
        index: dict[tuple[str, str], int] = {}

        def add(pairs):
            out = []
            for pair in pairs:
                if pair not in index:
                    index[pair] = len(rows)
                    rows.append(pair)
                out.append(index[pair])
            return np.asarray(out, np.int64)

        prompt, true = _get(rec, "prompt"), _get(rec, "target_true")
        reph = list(_get(rec, "rephrases", ()) or ())
        locp = list(_get(rec, "loc_prompts", ()) or ())
        loct = list(_get(rec, "loc_targets", ()) or ())
        loct = loct + [""] * (len(locp) - len(loct))
        self.groups = {"rewrite": add([(prompt, target_new)]), "rephrase": add([(p, target_new) for p in reph]),
                       "locality": add([(p, t if t else true) for p, t in zip(locp, loct)])}
        if counterfact:
            for name, ps in (("rw", [prompt]), ("pp", reph), ("nb", locp)):
                self.groups[name + "_new"] = add([(p, target_new) for p in ps])
                self.groups[name + "_true"] = add([(p, true) for p in ps])
        prompts, targets = [p for p, _ in rows], [t for _, t in rows]
        enc = encode(model, prompts, targets, where="golden-layer rows")
        need = int(enc["label_mask"].sum(-1).max())
        # at least 8 scored positions: edits whose targets have 1..8 tokens share one program per length
        full = with_score_positions(enc, k=max(8, 1 << max(need - 1, 0).bit_length()))
        self.n = len(rows)
        self.batches = [pad_rows(slice_rows(full, s, s + batch_size), batch_size)
                        for s in range(0, self.n, batch_size)]
        self.base_argmax = [M._score_with_argmax(model.apply, base_params, b)[1] for b in self.batches]

    def __call__(self, params: Any) -> dict[str, float]:
        from salem_jax.eval import metrics as M
        from salem_jax.eval.counterfact import PromptProbs, counterfact_metrics, probs_from_nll

        outs = jax.device_get([M._compare_to_argmax(self.model.apply, params, b, am)
                               for b, am in zip(self.batches, self.base_argmax)])
        s = {k: np.concatenate([np.asarray(o[k]) for o in outs])[: self.n]
             for k in ("token_correct_after", "n_tokens_after", "nll_sum_after", "unchanged")}

        def ratio(num, g):
            idx = self.groups[g]
            return float(s[num][idx].sum() / max(s["n_tokens_after"][idx].sum(), 1.0))

        out = {"rewrite": ratio("token_correct_after", "rewrite"), "rephrase": ratio("token_correct_after", "rephrase"),
               "locality": ratio("unchanged", "locality")}
        if self.counterfact:
            p = probs_from_nll(s["nll_sum_after"] / np.maximum(s["n_tokens_after"], 1.0))
            pp = {g: PromptProbs(p[self.groups[g + "_new"]], p[self.groups[g + "_true"]]) for g in ("rw", "pp", "nb")}
            m = counterfact_metrics(pp["rw"], pp["pp"] if pp["pp"].p_new.size else None,
                                    pp["nb"] if pp["nb"].p_new.size else None)
            out.update(ES=m["ES"], PS=m["PS"], NS=m["NS"])
        return out
