"""Many edits, each evaluated on its own, at shapes fixed once for all of them.

The pipeline edits each val fail row on its own (base weights each time) and scores the edited
model on the edit's own rows (its fail row and rephrasings), on rows shared by every edit (pass,
keep) and, for the first few edits, on held-out text. `evaluate_edit` tokenises the groups of
each call anew, so each edit's rows get their own padded length and number of scored positions
K, and every new (length, K) compiles new programs: on SmolLM2 the first edits took 20-26 s each,
almost all of it compiling. `EditEvaluator` fixes every shape up front:

  own rows     every edit's groups, encoded together: one length L_own and one K_own; each
               edit's rows (group by group) padded to R = the most own rows of any edit: [R, L_own]
  shared rows  every shared group, encoded together: [P, L_shared] with one K_shared
  text         every window of the held-out text, in parts of one cut length each (`_text_parts`:
               a window runs at the length of its tokens, not the window's), each part
               [C, c, cut] (chunks of c windows); the [R, K] path: [W / c, c, window]

and scores an edit in one jitted call (`_edited_scores`: both row sets and, if asked, the text),
so the evaluation compiles two programs (with and without text) for the whole split. The base
model's side of every row and of the text is computed once, in chunks of the same shapes.

Unchanged blocks are not run again (decoder-only models; `skip_unchanged_blocks`): an edit of
layer l leaves the hidden state entering block l unchanged on every row, so the evaluator keeps
the base model's output of block l-1 for every own row, shared row and text window (computed
once per l, `salem_jax.models.from_block`) and runs the edited model from block l. On SmolLM2
with an edit of layers.26, 4 of 30 blocks per edited pass (`benchmarks/eval_edit.py`). Which
blocks changed is read off the edited parameters (`first_changed_block`: leaves that are not
the base's own objects are compared by value), so any edit function qualifies.

The numbers are `evaluate_edit`'s (tests/test_edit_eval.py): rows are independent, padded
positions and rows count nowhere, and the aggregates are the same functions
(`metrics.group_metrics`, `metrics.headline_metrics`).
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from salem_jax.data.tokenize import pad_rows, slice_rows
from salem_jax.eval.metrics import (
    Rows,
    _score_with_argmax,
    after_vs_argmax,
    encode_rows,
    group_metrics,
    group_outputs,
    headline_metrics,
    lost_indices,
    perplexity_drawdown,
)
from salem_jax.eval.perplexity import row_nll, text_windows
from salem_jax.models.from_block import (BLOCK_INPUT, BlockChain, block_chain, block_output, block_outputs_by_length,
                                        first_changed_block, last_mlp_module)
from salem_jax.scored_logits import SCORE_POS, LastMLPAtScored, flat_positions, flat_scored_logits, positions_within


@functools.partial(jax.jit, static_argnums=0)
def _edited_scores(apply: Callable, params: Any, own: dict, own_argmax, shared: dict | None, shared_argmax,
                   windows: dict | None) -> dict:
    """The edited model on one edit's own rows [R, L_own], the shared rows [P, L_shared] (or
    None) and the text windows [C, c, window] (or None), in one program.

    Returns {"own": after_vs_argmax(...) [R] each, "shared": ... [P] each, "text": [C, c] NLL}."""
    out = {"own": after_vs_argmax(apply, params, own, own_argmax)}
    if shared is not None:
        out["shared"] = after_vs_argmax(apply, params, shared, shared_argmax)
    if windows is not None:
        out["text"] = jax.lax.map(lambda b: row_nll(apply, params, b), windows)
    return out


def _token_nll(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """-log p(labels) under logits ([T, V] -> [T]), `-losses.token_logprobs`'s value computed by
    the same steps at the label only (logit - max - log sum exp(logits - max)), without the log-softmax's [T, V]
    output - on SmolLM2's 49,152-word head XLA writes and reads that whole array, which took as
    long as the head's matmul itself (session 24: 674 text tokens, 0.62 s against 0.49 s at load 4)."""
    logits = logits.astype(jnp.float32)
    # jax.nn.log_softmax's own steps (shift by the max, log of the summed exps), at the label only
    top = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    log_sum = jnp.log(jnp.sum(jnp.exp(logits - top), axis=-1))
    picked = jnp.take_along_axis(logits, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return -((picked - top[..., 0]) - log_sum)


def _flat_after_vs_argmax(apply: Callable, params: Any, batch: dict, flat: dict) -> dict[str, jax.Array]:
    """`after_vs_argmax` with the head run on exactly the batch's target tokens: flat =
    `flat_positions` of its label_mask plus "base_argmax" [T] (the base model's argmax at each).
    Per-row sums by `segment_sum` over the T tokens: [B] each, the same numbers (up to float
    summation order)."""
    rows, valid = flat["rows"], flat["valid"]
    n = batch["label_mask"].shape[0]
    logits = flat_scored_logits(apply, params, batch, rows, flat["pos"])
    labels = batch["labels"][rows, flat["pos"]]
    am = jnp.argmax(logits, -1)

    def per_row(x):
        return jax.ops.segment_sum(x * valid, rows, num_segments=n)

    n_tok, ok = per_row(jnp.ones_like(valid)), per_row((am == labels).astype(jnp.float32))
    return {"correct_after": (ok == n_tok) & (n_tok > 0), "token_correct_after": ok,
            "nll_sum_after": per_row(_token_nll(logits, labels)), "n_tokens_after": n_tok,
            "unchanged": per_row((am == flat["base_argmax"]).astype(jnp.float32))}


def _flat_row_nll(apply: Callable, params: Any, batch: dict, flat: dict) -> jax.Array:
    """`row_nll` ([B] summed NLL of each window's counted tokens) with the head on those tokens only."""
    logits = flat_scored_logits(apply, params, batch, flat["rows"], flat["pos"])
    nll = _token_nll(logits, batch["labels"][flat["rows"], flat["pos"]]) * flat["valid"]
    return jax.ops.segment_sum(nll, flat["rows"], num_segments=batch["label_mask"].shape[0])


@functools.partial(jax.jit, static_argnums=0)
def _edited_scores_flat(apply: Callable, params: Any, own: dict, own_flat: dict, shared: dict | None,
                        shared_flat: dict | None, windows: dict | None, windows_flat: dict | None) -> dict:
    """`_edited_scores` with the head on the target tokens only (`_flat_after_vs_argmax`):
    own_flat / shared_flat [T] leaves, windows_flat [C, T_c] (one entry per chunk). shared /
    shared_flat may be tuples of parts (rows of one length each, `_length_parts`): out["shared"]
    holds the parts' rows one after the other."""
    out = {"own": _flat_after_vs_argmax(apply, params, own, own_flat)}
    if isinstance(shared, tuple):
        parts = [_flat_after_vs_argmax(apply, params, b, f) for b, f in zip(shared, shared_flat)]
        out["shared"] = {k: jnp.concatenate([p[k] for p in parts]) for k in parts[0]}
    elif shared is not None:
        out["shared"] = _flat_after_vs_argmax(apply, params, shared, shared_flat)
    if windows is not None:
        out["text"] = _parts_nll(apply, params, windows, windows_flat)
    return out


def _parts_nll(apply: Callable, params: Any, windows: tuple, windows_flat: tuple) -> tuple:
    """Summed NLL of each window of each text part (`_text_parts`): windows[p] [C_p, c_p, cut_p]
    leaves, windows_flat[p] [C_p, T_p]; a tuple of [C_p, c_p] (one `lax.map` over the chunks per part)."""
    return tuple(jax.lax.map(lambda bf: _flat_row_nll(apply, params, *bf), (w, f)) for w, f in zip(windows, windows_flat))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _edited_scores_flat_many(apply: Callable, paths: tuple[str, ...], params: Any, leaves: tuple, own: dict,
                             own_flat: dict, shared: dict | None, shared_flat: dict | None, windows: dict | None,
                             windows_flat: dict | None) -> dict:
    """`_edited_scores_flat` for E edits in one program: edit e's model is `params` with the leaves
    at `paths` replaced by leaves[k][e] ([E, ...] each), scored on its own rows own[e] ([E, R,
    L_own] leaves, own_flat [E, T_own]) and on the shared rows and text windows every edit shares.
    vmap over the edits: per edit the same arithmetic (outputs [E, ...]); the weights and rows the
    edits share are read once per call."""
    from salem_jax.generate import _with_leaves

    def one(lv, own, own_flat):
        return _edited_scores_flat(apply, _with_leaves(params, paths, lv), own, own_flat, shared, shared_flat,
                                   windows, windows_flat)

    return jax.vmap(one)(leaves, own, own_flat)


def _with_base_argmax(flat: dict[str, np.ndarray], enc: dict[str, np.ndarray], argmax: np.ndarray) -> dict[str, np.ndarray]:
    """`flat` (`flat_positions` of enc's label_mask) plus "base_argmax" [T]: `argmax` ([B, K] at
    enc's `score_pos` - a row's scored positions first, in order, the order of `flat_positions` -
    or [B, S'] with S' >= enc's length S when enc has none, e.g. the argmax of the uncut rows for a
    `_cut` part: its first S positions are enc's) at each entry."""
    mask = np.asarray(enc["label_mask"]) != 0
    if "score_pos" in enc:
        parts = [argmax[r, :c] for r, c in enumerate(mask.sum(-1))]
    else:  # enc may be cut (`_cut`, first positions kept) while argmax has the uncut length
        parts = [argmax[r, : mask.shape[-1]][m] for r, m in enumerate(mask)]
    am = np.concatenate(parts + [np.zeros(0, argmax.dtype)])
    out = np.zeros(flat["rows"].shape, argmax.dtype)
    out[: len(am)] = am
    return {**flat, "base_argmax": out}


@functools.partial(jax.jit, static_argnums=0)
def _text_nll(apply: Callable, params: Any, windows: dict) -> Any:
    return jax.lax.map(lambda b: row_nll(apply, params, b), windows)


@functools.partial(jax.jit, static_argnums=0)
def _text_nll_flat(apply: Callable, params: Any, windows: tuple, windows_flat: tuple) -> Any:
    """`_text_nll` with the head on the counted tokens only, on the text parts (`_parts_nll`)."""
    return _parts_nll(apply, params, windows, windows_flat)


def _text_parts(w: dict[str, np.ndarray], text_chunk: int) -> list[dict]:
    """The text windows w ({key: [W, window]}) in parts of one cut length each, as the flat path
    runs them: per part {"idx": the part's windows (indices into w, in chunk order), "cut": its
    length, "windows": {key: [C, c, cut]}, "flat": {key: [C, T]}} (C chunks of at most text_chunk
    windows, as even as they go, padded with windows that count nowhere; T = the most counted
    tokens of any chunk).

    Why: a window holds a text's tokens from its start (`token_windows`) and is padded to the
    window length; on the main job's WikiText (8 paragraphs, window 128) 13 windows hold 1,182
    tokens in 1,664 positions, and the short paragraphs' windows are mostly padding. A position
    past a window's last token changes nothing before it (causal models; nothing attends to it or
    scores it), so each part runs at the EDIT_BUCKETS length of its longest window
    (`mend.train.bucket_length`); adjacent lengths are merged into one part while that costs fewer
    positions than one more part (a part costs `window` positions: one more pass to trace and
    run). Inside a part the windows are sorted by counted tokens (most first), so that chunks
    hold similar counts and the head, run on T tokens per chunk, pads little. The same NLL per
    window (float summation order aside: XLA's attention reductions run over the cut)."""
    from salem_jax.mend.train import bucket_length, row_ends

    n, s = w["attention_mask"].shape
    cut_of = np.asarray([bucket_length(int(e), s) for e in row_ends(w["attention_mask"])])
    cuts = sorted(set(cut_of.tolist()))
    count = [int((cut_of == c).sum()) for c in cuts]
    # best[j] = (cost, parts) of the cuts[:j] grouped into contiguous parts; a part runs at its largest cut
    best = [(0, [])] + [None] * len(cuts)
    for j in range(1, len(cuts) + 1):
        for i in range(j):
            cost = best[i][0] + sum(count[i:j]) * cuts[j - 1] + s
            if best[j] is None or cost < best[j][0]:
                best[j] = (cost, best[i][1] + [cuts[j - 1]])
    counted = (np.asarray(w["label_mask"]) != 0).sum(-1)
    parts, lo = [], 0
    for cut in best[-1][1]:
        idx = np.flatnonzero((cut_of > lo) & (cut_of <= cut))
        lo = cut
        idx = idx[np.argsort(-counted[idx], kind="stable")]
        c = -(-len(idx) // text_chunk)
        per = -(-len(idx) // c)
        part = pad_rows(_cut(_take(w, idx), cut), c * per)
        windows = {k: v.reshape(c, per, *v.shape[1:]) for k, v in part.items()}
        masks = windows["label_mask"]
        t = max(1, int((masks != 0).sum((1, 2)).max()))
        flats = [flat_positions(m, t) for m in masks]
        parts.append({"idx": idx, "cut": int(cut), "windows": windows,
                      "flat": {k: np.stack([f[k] for f in flats]) for k in flats[0]}})
    return parts


def _nll_total(nll) -> float:
    """The sum of every entry of a text NLL result (an array, or a tuple of one per text part), in float64."""
    return float(sum(np.asarray(x, np.float64).sum() for x in jax.tree.leaves(nll)))


def _take(batch: dict[str, np.ndarray], idx: Sequence[int]) -> dict[str, np.ndarray]:
    ix = np.asarray(idx, np.int64)
    return {k: v[ix] for k, v in batch.items()}


def _cut(enc: dict, cut: int) -> dict:
    """enc's [N, S, ...] arrays cut to their first `cut` positions (score positions kept, those past
    the cut pointed at an inactive position: `positions_within`)."""
    s = enc["attention_mask"].shape[-1]
    out = {k: (v[:, :cut] if np.ndim(v) >= 2 and v.shape[1] == s and k != SCORE_POS else v) for k, v in enc.items()}
    if SCORE_POS in out and "label_mask" in out:
        out[SCORE_POS] = positions_within(out[SCORE_POS], out["label_mask"])
    return out


def _cut_to_longest(enc: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """enc cut after its longest row (an EDIT_BUCKETS length): a position past a row's last token
    changes nothing before it (causal models; positions past the cut are padding that nothing
    attends to or scores), so every edited pass over these rows runs fewer positions - the main
    job's own rows are encoded at 32 tokens for rows of at most 17."""
    from salem_jax.mend.train import bucket_length, row_ends

    s = enc["attention_mask"].shape[-1]
    return _cut(enc, bucket_length(int(row_ends(enc["attention_mask"]).max()), s))


def _length_parts(enc: dict[str, np.ndarray]) -> list[tuple[np.ndarray, int]]:
    """[(row indices, cut)]: enc's rows grouped by the EDIT_BUCKETS length of their last token,
    shortest first (the main job's 54 pass + keep rows, encoded at 16 tokens: 43 rows of at most 8
    tokens and 11 longer ones). Each part runs at its own cut: the same numbers per row."""
    from salem_jax.mend.train import bucket_length, row_ends

    s = enc["attention_mask"].shape[-1]
    cuts = np.asarray([bucket_length(int(e), s) for e in row_ends(enc["attention_mask"])])
    return [(np.flatnonzero(cuts == c), int(c)) for c in sorted(set(cuts.tolist()))]


def _base_side(apply: Callable, params, enc: dict[str, np.ndarray], batch_size: int) -> tuple[dict, np.ndarray]:
    """Base-model `batch_scores` ([N] each) and argmaxes ([N, K]) of every row of `enc`, in
    chunks of `batch_size` rows (one shape). `apply`: the model's, or a `FromBlock` of it with
    the base model's block outputs in enc[BLOCK_INPUT] (the same numbers, fewer blocks run)."""
    n = next(iter(enc.values())).shape[0]
    parts, ams = [], []
    for start in range(0, n, batch_size):
        part = slice_rows(enc, start, start + batch_size)
        m = next(iter(part.values())).shape[0]
        sc, am = jax.device_get(_score_with_argmax(apply, params, pad_rows(part, batch_size)))
        parts.append({k: np.asarray(v)[:m] for k, v in sc.items()})
        ams.append(np.asarray(am)[:m])
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}, np.concatenate(ams)


class EditEvaluator:
    """Evaluate edit i's edited parameters (`evaluate(i, params)`) like `evaluate_edit` of its
    own groups plus the shared groups and the text, at shapes fixed for every edit.

    edits: per edit, its own groups ({"fail": [row], "adapt": [rows]}; a group may be absent).
    shared: groups every edit is scored on (e.g. {"pass": rows, "keep": rows}); the base side
      is computed once.
    texts: held-out text for the perplexity drawdown (causal LMs), window / stride as in
      `salem_jax.eval.perplexity`; its windows run in chunks of at most `text_chunk` (flat path:
      in parts cut to their windows' length, `_text_parts`).
    batch_size: rows per call of the base model's one-time pass.
    skip_unchanged_blocks: run each edited model from the first block its edit changed, on the
      base model's cached hidden states (decoder-only models; the same numbers, less work).
    paths: after construction (and `evaluate_many`), each fast path - "from_block", "flat_head",
      "text_parts", "batched_edits", "last_mlp" (the first evaluation on: the last block's MLP on
      the scored positions only, `scored_logits.LastMLPAtScored`) - "on" or why it does not run
      (warned when it was asked for).
    shared_subgroups: {name: (group, a, b)}: rows [a, b) of shared group `group`, reported also as a
      group `name` of their own (e.g. a keep set's rows of one relation; scored once, with the group).
    lost_rows: shared groups whose rows each edit broke are also listed: `g/lost` = the indices
      (into that group's rows as given) of the rows right before the edit and wrong after it, a
      tuple of ints beside the float metrics - which facts an edit broke, where `dd_acc` / the keep
      DD only count them. Off (no `/lost` key) for every group not named.
    flat_scores: run the vocabulary head on the target tokens only, T of them per edit (own
      rows), for the shared rows and per text chunk (decoder-only models; `flat_scored_logits`:
      the same numbers, float summation order aside), instead of at K positions of every row
      ([R, K], K = the most targets of any row) and at every position of every text window
      (two thirds padding at window 128 on the main job's WikiText). False: the [R, K] path.
    """

    def __init__(self, model, base_params: Any, edits: Sequence[Mapping[str, Rows]],
                 shared: Mapping[str, Rows] | None = None, *, texts: Sequence[str] | None = None,
                 text_window: int | None = None, text_stride: int | None = None, text_chunk: int = 8,
                 batch_size: int = 8, skip_unchanged_blocks: bool = True, flat_scores: bool = True,
                 shared_subgroups: Mapping[str, tuple[str, int, int]] | None = None,
                 lost_rows: Sequence[str] = ()):
        unknown = sorted(set(lost_rows) - set(shared or {}))
        if unknown:
            raise ValueError(f"EditEvaluator: lost_rows names {unknown}, which are not shared groups "
                             f"(shared: {sorted(shared or {})})")
        self.lost_rows = frozenset(lost_rows)
        self.model = model
        self.base_params = base_params
        self.batch_size = batch_size
        # which fast path runs (`paths`: "on", or why not): a path asked for that does not apply to
        # this model is said so (a warning), not left silently
        self.paths: dict[str, str] = {}
        self.skip_unchanged_blocks = skip_unchanged_blocks and model.kind == "causal"
        self.flat_scores = flat_scores and model.kind == "causal"
        not_causal = f"a {model.kind!r} model (decoder-only models only)"
        for name, asked, on in (("from_block", skip_unchanged_blocks, self.skip_unchanged_blocks),
                                ("flat_head", flat_scores, self.flat_scores)):
            self._path(name, "on" if on else (not_causal if asked else "off (asked)"), warn=asked and not on)
        self._chain: BlockChain | None = None
        self._last_mlp: tuple[str | None, str] | None = None  # (the last block's MLP path or None, why): `_scored_tail`
        self._cache: tuple[int, dict] | None = None  # (start block, cached base block outputs)
        self.last_start: int | None = None  # the block the last evaluate() started at (0 = all ran)
        self.with_ppl = model.kind != "classifier"
        # -- own rows: one encoding, then per edit the row indices of each group
        own_rows, self._own_spans = [], []
        for e in edits:
            spans = {}
            for name, rows in e.items():
                rows = list(rows)
                if rows:
                    spans[name] = (len(own_rows), len(own_rows) + len(rows))
                    own_rows.extend(rows)
            self._own_spans.append(spans)
        self.rows_per_edit = max([1] + [sum(b - a for a, b in s.values()) for s in self._own_spans])
        self._own = _cut_to_longest(encode_rows(model, own_rows, where="edit rows")) if own_rows else None
        # The base side (scores and argmaxes of every row, the text's NLL) is computed at the first
        # evaluation (`_ensure_base`): from the edited block on the kept block outputs when the
        # edits skip blocks (one pass over blocks 0..l-1 serves both), else with every block.
        self._base_ready = self._text_ready = False
        if self._own is not None:
            counts = (self._own["label_mask"] != 0).sum(-1)
            self._own_tokens = max(1, max(int(sum(counts[a:b].sum() for a, b in sp.values())) for sp in self._own_spans))
        # -- shared rows: one encoding, base side once, kept on the device
        self._shared_spans, shared_rows = {}, []
        for name, rows in (shared or {}).items():
            rows = list(rows)
            self._shared_spans[name] = (len(shared_rows), len(shared_rows) + len(rows))
            shared_rows.extend(rows)
        # sub-groups: rows [a, b) of a shared group scored once, reported also as a group of their own
        for sub, (group, a, b) in (shared_subgroups or {}).items():
            if sub in self._shared_spans or group not in self._shared_spans:
                raise ValueError(f"shared_subgroups: {sub!r} must be a new name and {group!r} a shared group "
                                 f"(shared groups: {sorted(self._shared_spans)})")
            g0, g1 = self._shared_spans[group]
            if not 0 <= a < b <= g1 - g0:
                raise ValueError(f"shared_subgroups: {sub!r} rows [{a}, {b}) are not inside {group!r}'s {g1 - g0} rows")
            self._shared_spans[sub] = (g0 + a, g0 + b)
        self._shared = self._shared_host = self._shared_argmax = self._shared_flat = None
        self._shared_parts = None
        if shared_rows:
            self._shared_host = encode_rows(model, shared_rows, where="shared rows")
            self._shared = jax.device_put(self._shared_host)
            if self.flat_scores:  # the edited side runs them in parts of one length each (`_length_parts`)
                self._shared_parts = _length_parts(self._shared_host)
                order = np.concatenate([idx for idx, _ in self._shared_parts])
                self._shared_inv = np.argsort(order)
        # -- text windows: the flat path's parts of one cut length each (`_text_parts`), else
        # every window at full length; both in chunks of text_chunk (padded windows count nowhere)
        self._windows = self._text = None
        self.text_parts: list[dict] = []
        if texts:
            if int(text_chunk) < 1:
                raise ValueError(f"text_chunk must be >= 1, got {text_chunk}")
            w = text_windows(model, texts, text_window, text_stride)
            self.text_tokens = int(w["label_mask"].sum())
            if self.text_tokens == 0:
                raise ValueError("no text has 2 or more tokens: nothing to score")
            self.paths["text_parts"] = "on" if self.flat_scores else "off: every window at full length (flat_head off)"
            if self.flat_scores:
                self.text_parts = _text_parts(w, int(text_chunk))
                self._text = (tuple(jax.device_put(p["windows"]) for p in self.text_parts),
                              tuple(jax.device_put(p["flat"]) for p in self.text_parts))
            else:
                n = next(iter(w.values())).shape[0]
                # c chunks of at most text_chunk windows, as even as they go (13 windows: 7 + 6 and one
                # padding window, not 8 + 5 and three); padding windows count nowhere but cost a pass
                c = -(-n // text_chunk)
                per = -(-n // c)
                w = pad_rows(w, c * per)
                self._windows = jax.device_put({k: v.reshape(c, per, *v.shape[1:]) for k, v in w.items()})
        if not self.skip_unchanged_blocks:  # no block outputs to start from: the base side now, every block run
            self._ensure_base(model.apply, None, bool(texts))

    def _ensure_base(self, apply: Callable, cache: dict | None, with_text: bool) -> None:
        """The base model's side of every own and shared row ([N] scores, [N, K] argmaxes, the shared
        rows' flat targets with their base argmaxes) and, with_text, of the text (`text_nll_before`),
        each computed once. apply / cache: `_start_at`'s - the blocks before the edited one are not
        run again (their base outputs are in `cache`); (model.apply, None) runs every block."""
        def rows(enc, key):
            return enc if cache is None else {**enc, BLOCK_INPUT: np.asarray(cache[key])}

        if not self._base_ready:
            if self._own is not None:
                self._own_before, self._own_argmax = _base_side(apply, self.base_params, rows(self._own, "own"),
                                                                self.batch_size)
            if self._shared is not None:
                enc = self._shared_host
                self._shared_before, am = _base_side(apply, self.base_params, rows(enc, "shared"), self.batch_size)
                self._shared_argmax = jax.device_put(am)
                if self._shared_parts is None:
                    self._shared_flat = jax.device_put(_with_base_argmax(flat_positions(enc["label_mask"]), enc, am))
                else:
                    parts = [_cut(_take(enc, idx), cut) for idx, cut in self._shared_parts]
                    self._shared_flat = jax.device_put(tuple(
                        _with_base_argmax(flat_positions(part["label_mask"]), part, am[idx])
                        for part, (idx, _) in zip(parts, self._shared_parts)))
            self._base_ready = True
        if with_text and not self._text_ready and self.has_text:
            if self.flat_scores:
                nll = _text_nll_flat(apply, self.base_params, *self._text_batches(cache))
            else:
                w = self._windows if cache is None else {**self._windows, BLOCK_INPUT: cache["text"]}
                nll = _text_nll(apply, self.base_params, w)
            self.text_nll_before = _nll_total(jax.device_get(nll))
            self._text_ready = True

    def _path(self, name: str, state: str, warn: bool = False) -> None:
        """Record fast path `name`'s state in `paths`; warn (once per state) when it is off unasked."""
        if warn and self.paths.get(name) != state:
            warnings.warn(f"EditEvaluator: {name} does not run: {state}; the slower path gives the same numbers")
        self.paths[name] = state

    @property
    def has_text(self) -> bool:
        return self._windows is not None or self._text is not None

    def _text_batches(self, cache: dict | None) -> tuple[tuple, tuple]:
        """The flat path's text parts as its passes take them: (windows, flats), a tuple entry per
        part, each part's windows with their kept block outputs (cache["text"]) when the pass
        starts at a block."""
        windows, flats = self._text
        if cache is not None:
            windows = tuple({**w, BLOCK_INPUT: h} for w, h in zip(windows, cache["text"]))
        return windows, flats

    @property
    def n_edits(self) -> int:
        return len(self._own_spans)

    def _own_batch(self, i: int, cache: dict | None = None) -> tuple[dict, np.ndarray, dict]:
        spans = self._own_spans[i]
        idx = [j for a, b in spans.values() for j in range(a, b)]
        r = self.rows_per_edit
        src = self._own if cache is None else {**self._own, BLOCK_INPUT: cache["own"]}
        own = pad_rows(_take(src, idx), r)
        am = np.zeros((r,) + self._own_argmax.shape[1:], self._own_argmax.dtype)
        am[: len(idx)] = self._own_argmax[idx]
        if self.flat_scores:  # the base argmaxes at the target tokens instead: [T_own]
            am = _with_base_argmax(flat_positions(own["label_mask"], self._own_tokens), own, am)
        return own, am, spans

    def evaluate(self, i: int, params: Any, *, with_text: bool = False) -> dict[str, float]:
        """Every metric of edit i's edited `params`, the keys `evaluate_edit` gives for its own
        groups, the shared groups and (with_text) the text: `g/acc_after`, ..., `ea`,
        `adapt_acc`, `dd_acc`, `locality`, `text_ppl_*`, `dd_ppl_text_*`."""
        if with_text and not self.has_text:
            raise ValueError("with_text=True but the evaluator was built without texts")
        if self._own is None:
            raise ValueError("the evaluator was built without rows for any edit")
        apply, cache = self._start_at(params, with_text)
        self._ensure_base(apply, cache, with_text)
        own, am, spans = self._own_batch(i, cache)
        if self.flat_scores:
            windows, wflat = self._text_batches(cache) if with_text else (None, None)
            out = jax.device_get(_edited_scores_flat(apply, params, own, am, self._shared_batches(cache),
                                                     self._shared_flat, windows, wflat))
        else:
            shared, windows = self._shared, self._windows if with_text else None
            if cache is not None:
                shared = None if shared is None else {**shared, BLOCK_INPUT: cache["shared"]}
                windows = None if windows is None else {**windows, BLOCK_INPUT: cache["text"]}
            out = jax.device_get(_edited_scores(apply, params, own, am, shared, self._shared_argmax, windows))
        return self._metrics(spans, out, with_text)

    def _metrics(self, spans: dict, out: dict, with_text: bool) -> dict[str, float]:
        """The metrics of one edit (own-row spans `spans`) from its scores `out` (host arrays)."""
        per, res = {}, {}
        if out.get("shared") is not None and self._shared_parts is not None:  # parts' rows back in row order
            out = {**out, "shared": {k: np.asarray(v)[self._shared_inv] for k, v in out["shared"].items()}}
        groups = [(name, out["own"], self._own_before, a, b, a - next(iter(spans.values()))[0])
                  for name, (a, b) in spans.items()]
        groups += [(name, out.get("shared"), self._shared_before, a, b, a) for name, (a, b) in self._shared_spans.items()]
        for name, after, before, a, b, at in groups:
            if b == a:
                scores = {}
            else:
                scores = {k: np.asarray(v)[at: at + b - a] for k, v in after.items()}
                scores.update({f"{k}_before": v[a:b] for k, v in before.items()})
            per[name] = group_metrics(scores, with_ppl=self.with_ppl)
            res.update(group_outputs(name, per[name], self.with_ppl))
            if name in self.lost_rows:  # which rows the edit broke (right before, wrong after)
                res[f"{name}/lost"] = tuple(lost_indices(scores))
        res.update(headline_metrics(per, self.with_ppl))
        if with_text:
            before = math.exp(self.text_nll_before / self.text_tokens)
            after = math.exp(_nll_total(out["text"]) / self.text_tokens)
            res["text_ppl_before"], res["text_ppl_after"] = before, after
            dd = perplexity_drawdown(before, after)
            res["dd_ppl_text_rel"], res["dd_ppl_text_abs"] = dd["rel"], dd["abs"]
        return res

    def evaluate_many(self, items: Sequence[tuple[int, Any]], *, with_text: Sequence[bool] | bool = False,
                      edits_per_call: int = 8) -> list[dict[str, float]]:
        """`[evaluate(i, params, with_text=t) for (i, params), t in zip(items, with_text)]` in few
        calls: the edits are scored `edits_per_call` at a time in one program
        (`_edited_scores_flat_many`, vmap over the edits: each edit's model is the base with the
        leaves the edits changed replaced - `eval.generated.stack_edits` - from their common first
        changed block), those with text apart from those without. The same numbers as one call per
        edit up to float summation order
        (tests/test_from_block.py::test_evaluate_many_equals_one_edit_at_a_time). Falls back to `evaluate` per
        edit where batching does not apply: the [R, K] path (flat_scores=False), every block run
        (skip_unchanged_blocks=False) or edits starting at different blocks."""
        from salem_jax.eval.generated import stack_edits

        items = list(items)
        flags = [bool(with_text)] * len(items) if isinstance(with_text, bool) else [bool(t) for t in with_text]
        if len(flags) != len(items):
            raise ValueError(f"evaluate_many: {len(flags)} with_text flags for {len(items)} edits")
        if any(flags) and not self.has_text:
            raise ValueError("with_text=True but the evaluator was built without texts")
        if self._own is None:
            raise ValueError("the evaluator was built without rows for any edit")
        if edits_per_call < 1:
            raise ValueError(f"edits_per_call must be >= 1, got {edits_per_call}")
        out: list[dict | None] = [None] * len(items)
        starts = [None] * len(items)
        if self.flat_scores and self.skip_unchanged_blocks and items:
            self._start_at(items[0][1], False)  # builds the block chain (or turns skipping off)
        if self.flat_scores and self.skip_unchanged_blocks and self._chain is not None:
            starts = [first_changed_block(self.model, self.base_params, p, self._chain) for _, p in items]
        batchable = [k for k, st in enumerate(starts) if st and st == starts[0]] if starts[0] else []
        if len(batchable) < len(items):  # said, not silent: which edits run one call each, and why
            if not (self.flat_scores and self.skip_unchanged_blocks and self._chain is not None):
                why = "flat_head or from_block off"
            elif not starts[0]:
                why = "the first edit changes block 0 or parameters outside the blocks (every block runs)"
            else:
                why = f"the edits start at {len(set(starts))} different blocks (batched: those starting where the first does)"
            self._path("batched_edits", f"{len(items) - len(batchable)} of {len(items)} edits one call each: {why}",
                       warn=self.flat_scores and self.skip_unchanged_blocks)
        else:
            self.paths["batched_edits"] = "on"
        for k in set(range(len(items))) - set(batchable):
            out[k] = self.evaluate(items[k][0], items[k][1], with_text=flags[k])
        for text in (False, True):
            ks = [k for k in batchable if flags[k] == text]
            if not ks:
                continue
            start = starts[ks[0]]
            apply, cache = self._start_at(items[ks[0]][1], text)
            self._ensure_base(apply, cache, text)
            paths, leaves = stack_edits(self.base_params, [items[k][1] for k in ks])
            shared = self._shared_batches(cache)
            windows, wflat = self._text_batches(cache) if text else (None, None)
            # as few calls as edits_per_call allows, as even as they go (14 edits: 7 + 7, not 8 + 8
            # with two repeated); the last call repeats its last edit to keep the shape
            n = -(-len(ks) // -(-len(ks) // edits_per_call))
            for c in range(0, len(ks), n):
                part = list(range(c, min(c + n, len(ks))))
                part += [part[-1]] * (n - len(part))  # one shape per call: repeat the last edit (dropped)
                batches = [self._own_batch(items[ks[j]][0], cache) for j in part]
                own = jax.tree.map(lambda *x: np.stack(x), *[b[0] for b in batches])
                am = jax.tree.map(lambda *x: np.stack(x), *[b[1] for b in batches])
                lv = tuple(v[np.asarray(part)] for v in leaves)
                res = jax.device_get(_edited_scores_flat_many(apply, paths, self.base_params, lv, own, am, shared,
                                                              self._shared_flat if shared is not None else None,
                                                              windows, wflat))
                for e, j in enumerate(part[: min(n, len(ks) - c)]):
                    one = jax.tree.map(lambda x: x[e], res)
                    out[ks[j]] = self._metrics(batches[e][2], one, text)
            self.last_start = start
        return out

    def _shared_batches(self, cache: dict | None):
        """The shared rows as the flat edited pass takes them: a tuple of parts (`_length_parts`),
        each with its rows' kept block outputs (cache["shared"], when the pass starts at a block)
        cut like its tokens; None without shared rows."""
        if self._shared is None:
            return None
        if self._shared_parts is None:
            return self._shared if cache is None else {**self._shared, BLOCK_INPUT: cache["shared"]}
        src = None if cache is None else cache["shared"]
        if getattr(self, "_parts_of", False) is not src or not hasattr(self, "_parts"):
            h = None if src is None else np.asarray(src)
            self._parts = tuple(jax.device_put({**_cut(_take(self._shared_host, idx), cut),
                                                **({} if h is None else {BLOCK_INPUT: h[idx][:, :cut]})})
                                for idx, cut in self._shared_parts)
            self._parts_of = src
        return self._parts

    # -- running edited models from the first changed block (see the module docstring)

    def _start_at(self, params: Any, with_text: bool) -> tuple[Callable, dict | None]:
        """(the apply function for `params`, the cached base block outputs it starts from or None)."""
        self.last_start = 0
        if not self.skip_unchanged_blocks:
            self.paths.setdefault("last_mlp", "off: needs the block chain of from_block")
            return self.model.apply, None
        if self._chain is None:
            chain, why = block_chain(self.model, self.base_params, _take(self._own, [0]))
            if chain is None:  # every block runs, as without the option (e.g. nn.remat or nn.scan blocks)
                self._path("from_block", f"every block runs for every edit: {why}", warn=True)
                self._path("last_mlp", f"the last block runs at every position: {why}")
                self.skip_unchanged_blocks = False
                return self.model.apply, None
            self._chain = chain
        start = first_changed_block(self.model, self.base_params, params, self._chain)
        if not start:
            return self._scored_tail(self.model.apply), None
        self.last_start = start
        cache = self._block_cache(start, self._chain.last_skipped(start), with_text)
        return self._scored_tail(self._chain.skipping(self.model.apply, start)), cache

    def _scored_tail(self, apply: Callable) -> Callable:
        """`apply` marked so that the flat path's passes run the last block's MLP on the scored
        positions only (`scored_logits.LastMLPAtScored`; the same numbers up to float rounding):
        path "last_mlp" - "on", or why not (warned: an MLP the layer table does not tell apart)."""
        if not self.flat_scores:
            self.paths["last_mlp"] = "off: the [R, K] path (flat_head off) scores at K positions of every row"
            return apply
        if self._last_mlp is None:
            mlp, why = last_mlp_module(self.model, self._chain)
            self._last_mlp = (mlp, why)
            self._path("last_mlp", "on" if mlp else f"the last block runs at every position: {why}", warn=not mlp)
        mlp = self._last_mlp[0]
        return apply if mlp is None else LastMLPAtScored(apply, mlp)

    def _block_cache(self, start: int, last: str, with_text: bool) -> dict:
        """The base model's output of block `last` (the one before `start`) on every own row,
        shared row and (when needed) text window; kept for the latest start only."""
        if self._cache is not None and self._cache[0] == start and (not with_text or "text" in self._cache[1]):
            return self._cache[1]
        cache = self._cache[1] if self._cache is not None and self._cache[0] == start else {}
        fn, base, bs = self.model.apply, self.base_params, self.batch_size

        def rows(enc):
            # length-sorted calls of `bs` rows, each cut after its longest row (an EDIT_BUCKETS
            # length: few programs; the own rows are padded to the longest of any edit, 32 tokens
            # on the main job for rows of ~10); past its call's cut a row's output is 0
            return block_outputs_by_length(fn, last, base, enc, bs)

        if "own" not in cache:
            cache["own"] = rows(self._own)
            if self._shared is not None:
                cache["shared"] = jax.device_put(rows(self._shared_host))
        if with_text and "text" not in cache:
            def text(w):
                return jax.lax.map(lambda b: block_output(fn, last, base, b), w)

            # the flat path's parts, each at its cut (`_text_parts`); else every window at full length
            cache["text"] = tuple(map(text, self._text[0])) if self.flat_scores else text(self._windows)
        self._cache = (start, cache)
        return cache
