"""MEMIT, EMMET and AlphaEdit: many edits in one closed-form update per layer, over a band of layers.

Shared machinery (MEMIT's algorithm, kmeng01/memit `memit_main.py`; REFERENCE.md):

1. **Targets.** For each edit, delta_i added to the output of the band's *last* layer's MLP at the
   subject's last token (the same as adding it to that block's residual output) is optimised as
   ROME's v* (`salem_jax.baselines.rome.compute_value`); z_i = h_i^L + delta_i, with h_i^L the
   block's output at that token of the bare prompt.
2. **Spread.** For each layer l of the band in order, on the partly edited model: keys K_l
   (`compute_key`, averaged over the bare prompt and `KeyStats.prefixes()`) and the remaining
   residual R = (z - h^L) / (layers left); the layer's update solves for R
   (`salem_jax.baselines.closed_form`): MEMIT least squares (`memit_lambda`), EMMET equality
   constrained (`emmet_lambda` relaxation), AlphaEdit null-space projected (`alpha_energy`,
   `alpha_l2`).
3. **Batches.** Requests are edited `batch_size` at a time, each batch on the model the previous
   ones produced. AlphaEdit keeps sum k k^T of the edited keys per layer (recomputed on the
   edited model after each batch) in its `AlphaEditState`, so later batches do not undo earlier
   ones; pass `state=outcome.state` to continue a sequence. A fresh call starts a fresh state, so
   the memory never leaks between independent runs (EasyEdit#613).
4. **v* reuse.** `values` (a dict the caller owns) keeps each request's v* at the band's last layer
   for the parameters passed in: v* of a request on given weights does not depend on the other
   requests of its batch, so a caller that edits the same base weights again with more rows (the
   many-edits study's batch mode at T = 10, 50, 100; the one-at-a-time evaluation; the other band
   editors of the run, which write v* at the same layer with the same settings) computes each v* once.
   Keyed by (kernel path, prompt, subject, target, v* config); used for the first batch only (later
   batches run on weights the earlier ones edited). The caller must pass a dict only with the very
   parameters (of the very model) its entries were computed on.

Differences from the papers' code: keys average the prompt and the prefixes with equal weight
(MEMIT: 0.5 prompt + 0.5 mean of prefixes); the clamp on delta and its weight decay are ROME's
(relative to the MLP output) unless `value.clamp_norm="residual"` (MEMIT / AlphaEdit: relative to the
block output h0, with `clamp_norm_factor` 0.75); AlphaEdit's null space is chosen by an energy share of
trace(C) (suggested in AlphaEdit#38) instead of the absolute eigenvalue threshold 2e-2, which
depends on the model's activation scale.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np
from tqdm.auto import tqdm

from salem_jax.baselines.closed_form import alphaedit_delta, emmet_delta, memit_delta
from salem_jax.baselines.keystats import KeyStats
from salem_jax.baselines.locate_edit import EditOutcome, EditorConfig, apply_delta, to_weights
from salem_jax.baselines.requests import EditRequest, as_requests, check_requests
from salem_jax.baselines.rome import block_output_at, compute_key, compute_value, subject_last_index
from salem_jax.data.tokenize import bucket_length


@dataclasses.dataclass
class AlphaEditState:
    """AlphaEdit's memory: per kernel path, sum of k k^T over the keys of the edits made so far
    [in, in] float64, and the null-space projection P [in, in] (computed once per layer from the
    unedited model's C, unless preset: the pipeline's `methods.locate_edit.facts_projections` puts the
    P of C_text + w_p C_facts here when config.locate_edit.alpha_project_facts_weight > 0)."""

    prior: dict = dataclasses.field(default_factory=dict)
    projection: dict = dataclasses.field(default_factory=dict)
    n_edits: int = 0
    n_preserved: int = 0  # keys of facts not edited that the memory started with (`preserving`)

    @classmethod
    def preserving(cls, keys: dict, weight: float = 1.0) -> "AlphaEditState":
        """A fresh memory that starts with the keys of m facts to preserve, per kernel path K_f [in, m]:
        prior = weight * K_f K_f^T. AlphaEdit's update then spares them exactly as it spares the keys of
        its own earlier edits (its `cache_c`, the ||dW P K_p||^2 term of its objective): with only the
        edits' keys in the memory, the subject keys of facts never edited are protected by the null
        space P alone, and P (from plain text's keys) need not cover subject-position keys.

        weight (> 0, default 1: each seeded key counts as much as an edit's key): the weight of the
        seeded keys' term against the later edits' keys (which always enter with weight 1) and the
        ridge - below 1 the seed constrains the first edits less (session 26, issue 16)."""
        if not keys:
            raise ValueError("AlphaEditState.preserving: no keys given (a dict kernel path -> K_f [in, m])")
        weight = float(weight)
        if not (np.isfinite(weight) and weight > 0):
            raise ValueError(f"AlphaEditState.preserving: weight must be a finite number > 0, got {weight}")
        ms = set()
        prior = {}
        for path, K in keys.items():
            K = np.asarray(K, np.float64)
            if K.ndim != 2 or K.shape[1] < 1 or not np.all(np.isfinite(K)):
                raise ValueError(f"AlphaEditState.preserving: keys of {path!r} must be a finite [in, m >= 1] array, "
                                 f"got shape {K.shape}")
            prior[path], _ = weight * (K @ K.T), ms.add(K.shape[1])
        if len(ms) != 1:
            raise ValueError(f"AlphaEditState.preserving: every layer needs the keys of the same facts; got counts {sorted(ms)}")
        return cls(prior=prior, n_preserved=ms.pop())

    def copy(self) -> "AlphaEditState":
        """An independent copy (the prior arrays are replaced, never changed in place, so a shallow
        copy of the dicts suffices)."""
        return AlphaEditState(prior=dict(self.prior), projection=dict(self.projection), n_edits=self.n_edits,
                              n_preserved=self.n_preserved)


# --------------------------------------------------------------------------- residual stream


def residual_at_subject(model, params: Any, layer: str, requests: Sequence[EditRequest]) -> np.ndarray:
    """The output hidden state of block `layer` at each request's subject's last token of its
    bare prompt: [n, d] float64."""
    tok = model.tokenizer
    ids = [list(tok(r.prompt, add_special_tokens=True)["input_ids"]) for r in requests]
    L = bucket_length(max(map(len, ids)), model.max_length)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    x = np.full((len(ids), L), pad, np.int32)
    m = np.zeros((len(ids), L), np.int32)
    for i, r in enumerate(ids):
        x[i, : len(r)], m[i, : len(r)] = r, 1
    idx = np.asarray([subject_last_index(tok, r.prompt, r.subject) for r in requests], np.int32)
    z = np.zeros_like(x)
    batch = dict(input_ids=x, attention_mask=m, labels=z, label_mask=z)
    return np.asarray(block_output_at(model.apply, model.layers[layer].module_path, params, batch, idx), np.float64)


def keys_of(model, params: Any, weight, requests: Sequence[EditRequest], prefixes: tuple[str, ...]) -> np.ndarray:
    """K [in, n]: each request's key at `weight`, averaged over the prefixes (float64)."""
    return np.stack([np.asarray(compute_key(model, params, weight, r.prompt, r.subject, prefixes)[0], np.float64)
                     for r in requests], 1)


# --------------------------------------------------------------------------- one batch


def _value(model, params: Any, weight, r: EditRequest, vcfg, values: dict | None):
    """compute_value of request r at `weight` on `params`, read from / written to `values` when given
    (see the module docstring, 4.): (v* [out], o [out], losses)."""
    if values is None:
        return compute_value(model, params, weight, r.prompt, r.subject, r.target_new, vcfg, progress=False)
    key = (weight.path, r.prompt, r.subject, r.target_new, vcfg)
    if key not in values:
        values[key] = compute_value(model, params, weight, r.prompt, r.subject, r.target_new, vcfg, progress=False)
    return values[key]


def _edit_batch(kind: str, model, params: Any, names, weights, reqs: Sequence[EditRequest], stats: KeyStats,
                config: EditorConfig, state: AlphaEditState | None, prefixes, progress: bool,
                values: dict | None = None):
    vcfg = dataclasses.replace(config.value, prefixes=prefixes)
    last_w, last_name = weights[-1], names[-1]
    deltas, per_edit = [], []
    for r in tqdm(reqs, desc=f"{kind} targets", disable=not progress):
        v, o, hist = _value(model, params, last_w, r, vcfg, values)
        deltas.append(np.asarray(v, np.float64) - np.asarray(o, np.float64))
        per_edit.append({"losses": list(hist), "delta_norm": float(np.linalg.norm(deltas[-1]))})
    z = residual_at_subject(model, params, last_name, reqs) + np.stack(deltas)  # [n, d]
    cur, per_layer = params, []
    for i, (name, w) in enumerate(zip(names, weights)):
        K = keys_of(model, cur, w, reqs, prefixes)
        R = (z - residual_at_subject(model, cur, last_name, reqs)).T / (len(names) - i)  # [d, n]
        solver = stats.solver(w)
        if kind == "memit":
            dw = memit_delta(K, R, solver, config.memit_lambda)
        elif kind == "emmet":
            dw = emmet_delta(K, R, solver, config.emmet_lambda)
        elif kind == "alphaedit":
            if w.path not in state.projection:
                state.projection[w.path] = solver.null_projection(config.alpha_energy, config.alpha_threshold)
            dw = alphaedit_delta(K, R, state.projection[w.path], state.prior.get(w.path), config.alpha_l2)
        else:
            raise ValueError(f"unknown mass-edit method {kind!r}")
        err = np.linalg.norm(dw @ K - R) / max(np.linalg.norm(R), 1e-30)
        per_layer.append({"layer": name, "n": len(reqs), "dw_norm": float(np.linalg.norm(dw)),
                          "relative_constraint_error": float(err)})
        cur = apply_delta(cur, w, dw)
    final = residual_at_subject(model, cur, last_name, reqs)
    for j, e in enumerate(per_edit):
        e["target_miss"] = float(np.linalg.norm(z[j] - final[j]) / max(e["delta_norm"], 1e-30))
    if kind == "alphaedit":  # remember the edited keys, read on the edited model
        for w in weights:
            K = keys_of(model, cur, w, reqs, prefixes)
            state.prior[w.path] = state.prior.get(w.path, 0.0) + K @ K.T
        state.n_edits += len(reqs)
    return cur, per_edit, per_layer


def _band_edit(kind: str, model, params: Any, requests: Sequence, *, layers, stats: KeyStats, config: EditorConfig,
               state: Any, progress: bool, values: dict | None = None) -> EditOutcome:
    if model.kind != "causal":
        raise ValueError(f"{kind} edits causal LMs; {model.name!r} is {model.kind!r}")
    if config.batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {config.batch_size}")
    names, weights = to_weights(model, layers)
    reqs = as_requests(requests)
    chk = check_requests(reqs)
    if kind == "alphaedit":
        if state is None:
            state = AlphaEditState()
        elif not isinstance(state, AlphaEditState):
            raise TypeError(f"alphaedit state must be an AlphaEditState (from a previous outcome), got {type(state)}")
    else:
        state = None
    prefixes = stats.prefixes() if config.use_prefixes else ("",)
    cur, per_edit, per_batch = params, [], []
    kept = list(chk.kept)
    for b in range(0, len(kept), config.batch_size):
        ids = kept[b : b + config.batch_size]
        cur, pe, pl = _edit_batch(kind, model, cur, names, weights, [reqs[i] for i in ids], stats, config, state,
                                  prefixes, progress, values=values if b == 0 else None)
        for i, e in zip(ids, pe):
            e["request"] = i
        per_edit += pe
        per_batch += [{"batch": b // config.batch_size, **x} for x in pl]
    return EditOutcome(params=cur, method=kind, layers=names, edited=chk.kept, skipped=chk.skipped,
                       per_edit=per_edit, per_batch=per_batch, stats=stats.report(), state=state)


def memit_edit(model, params: Any, requests: Sequence, *, layers: str | Sequence[str], stats: KeyStats,
               config: EditorConfig = EditorConfig(), state: Any = None, progress: bool = True,
               values: dict | None = None) -> EditOutcome:
    """MEMIT: least-squares updates spread over `layers` (see the module docstring)."""
    return _band_edit("memit", model, params, requests, layers=layers, stats=stats, config=config, state=state,
                      progress=progress, values=values)


def emmet_edit(model, params: Any, requests: Sequence, *, layers: str | Sequence[str], stats: KeyStats,
               config: EditorConfig = EditorConfig(), state: Any = None, progress: bool = True,
               values: dict | None = None) -> EditOutcome:
    """EMMET: equality-constrained updates spread over `layers` (see the module docstring)."""
    return _band_edit("emmet", model, params, requests, layers=layers, stats=stats, config=config, state=state,
                      progress=progress, values=values)


def alphaedit_edit(model, params: Any, requests: Sequence, *, layers: str | Sequence[str], stats: KeyStats,
                   config: EditorConfig = EditorConfig(), state: AlphaEditState | None = None,
                   progress: bool = True, values: dict | None = None) -> EditOutcome:
    """AlphaEdit: null-space projected updates over `layers`; `state` from a previous outcome
    continues a sequence of edits (None: a fresh memory)."""
    return _band_edit("alphaedit", model, params, requests, layers=layers, stats=stats, config=config, state=state,
                      progress=progress, values=values)
