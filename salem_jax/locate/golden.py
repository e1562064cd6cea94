"""The golden-layer test: per-edit oracle layers, the best fixed layer, and the third-party LGA.

The golden-layers claim (arXiv 2602.20207; ../shared/papers/golden-layers-*.txt): one fixed layer
edits almost as well as each edit's own best layer, and Layer Gradient Analysis finds it from a
small proxy set. Given a table of metrics for every (edit, candidate layer) - from r-ROME at each
layer (`benchmarks/golden_layers.py`) - this module computes

* `per_edit_oracle`: each edit's best layer (lexicographic on the metric columns given, e.g.
  rewrite, then rephrase, then locality; ties go to the earlier layer) and its metrics there;
* `best_fixed_layer`: the single layer with the best mean (same ordering) - a brute-force search;
* `bootstrap_gap`: mean of a paired difference with a percentile bootstrap interval over edits;
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
