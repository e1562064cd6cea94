"""Logits only at the scored positions: the LM head applied to K gathered hidden states, not S.

An edit, a rephrasing or a locality row is scored at its target tokens only (label_mask = 1):
for SmolLM2 (vocabulary 49,152, hidden 576) the head costs 57 MFLOP per position, ~20% of a
16-token row's forward pass, and the log-softmax over [B, S, V] dominates the memory traffic.
With the K scored positions of each row known in advance (`with_score_positions`, on the host,
so K is a static shape), `scored_logits` gathers the final hidden states at those positions
*before* the head, and every loss and metric of `salem_jax.losses` then runs on [B, K, V] with
the gathered labels and mask - the same numbers as the full [B, S, V] computation (positions
with mask 0 count nowhere).

How, without touching model code: `flax.linen.intercept_methods` sees the head call - a tied
embedding's `attend` (Llama, GPT-2, GPT-Neo, BART) or a module named `lm_head` - and feeds it
the gathered [B, K, H] instead of [B, S, H]. A model whose head is neither (a classifier, T5's
scaled head) gets its full logits gathered afterwards: the same numbers, no saving.

Batch key (see models/base.py for the others):
  score_pos [B, K] int32: the positions with label_mask = 1 first, in order, then positions with
                          label_mask = 0 (K >= every row's number of scored positions).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

SCORE_POS = "score_pos"


def with_score_positions(batch: dict, k: int | None = None) -> dict:
    """`batch` (numpy, leaves [..., S]) with `score_pos` [..., K] added (a new dict).

    k: positions per row (default: the most scored positions of any row, rounded up to a power
    of two, so that edits whose targets have 1..8 tokens share four compiled programs instead of
    compiling one per token count); an error if some row has more. When K would not be smaller than S the batch comes back unchanged
    (nothing to save). Host-side: K is a shape, so it must be known before jit."""
    mask = np.asarray(batch["label_mask"])
    counts = (mask != 0).sum(-1)
    need = max(1, int(counts.max(initial=0)))
    k = 1 << (need - 1).bit_length() if k is None else int(k)
    if k < need:
        raise ValueError(f"with_score_positions: k={k} but a row has {need} scored positions")
    if k >= mask.shape[-1]:
        return dict(batch)
    pos = np.argsort(mask == 0, axis=-1, kind="stable")[..., :k].astype(np.int32)
    return {**batch, SCORE_POS: pos}


def positions_within(pos: np.ndarray, label_mask: np.ndarray) -> np.ndarray:
    """`pos` [..., K] with every position past `label_mask`'s length S (rows cut shorter after their
    score positions were chosen) replaced by the row's first unscored position (label_mask 0).

    Why: a gather at a position past S is not clamped but filled (JAX: NaN logits, INT_MIN as the
    label mask - an *active* position), so a cut batch that keeps its score positions would score,
    and take gradients at, garbage. A padded slot needs only some unscored position (its label
    mask 0 makes it inactive), and every causal row has one below its end (its last token, which
    predicts nothing). Raises if a row with a position past S has no unscored position."""
    pos = np.asarray(pos)
    mask = np.asarray(label_mask) != 0
    s = mask.shape[-1]
    past = pos >= s
    if not past.any():
        return pos
    free = ~mask
    if not free.any(-1)[past.any(-1)].all():
        raise ValueError(f"score positions past the cut length {s} in a row whose every position is scored: nothing inactive to point them at")
    first_free = np.argmax(free, axis=-1)[..., None].astype(pos.dtype)
    return np.where(past, first_free, pos)


def _gather(x: jax.Array, pos: jax.Array) -> jax.Array:
    """x [B, S, ...] at pos [B, K] -> [B, K, ...]."""
    idx = pos.reshape(pos.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx, axis=1)


def scored_labels(batch: dict) -> tuple[jax.Array, jax.Array]:
    """(labels, label_mask) at `batch["score_pos"]` ([B, K]); unchanged without that key."""
    if SCORE_POS not in batch:
        return batch["labels"], batch["label_mask"]
    pos = batch[SCORE_POS]
    return _gather(batch["labels"], pos), _gather(batch["label_mask"], pos)


def _is_head(context) -> bool:
    path = context.module.path
    return context.method_name == "attend" or (context.method_name == "__call__" and bool(path) and path[-1] == "lm_head")


def scored_logits(apply_fn: Callable[[Any, dict], jax.Array], params: Any, batch: dict):
    """`(logits [B, K, V], labels [B, K], label_mask [B, K])` at `batch["score_pos"]`; without
    that key, `(apply_fn(params, batch), labels, label_mask)` unchanged ([B, S, ...]).

    The losses of `salem_jax.losses` on the result equal those on the full logits."""
    if SCORE_POS not in batch:
        return apply_fn(params, batch), batch["labels"], batch["label_mask"]
    pos = batch[SCORE_POS]
    seq = batch["label_mask"].shape[-1]
    seen = []

    def head_at_positions(next_fun, args, kwargs, context):
        if not _is_head(context) or not args or getattr(args[0], "ndim", 0) != 3 or args[0].shape[:2] != (pos.shape[0], seq):
            return next_fun(*args, **kwargs)
        if seen:
            raise ValueError(f"scored_logits: the head ({'/'.join(context.module.path)}) was called twice in one forward pass")
        seen.append(True)
        return next_fun(_gather(args[0], pos), *args[1:], **kwargs)

    with nn.intercept_methods(head_at_positions):
        logits = apply_fn(params, batch)
    if not seen:  # no recognisable head: gather the full logits (same numbers, no saving)
        logits = _gather(logits, pos)
    return (logits, *scored_labels(batch))


@dataclasses.dataclass(frozen=True)
class LastMLPAtScored:
    """`apply(params, batch)` (the very same call) marked for `flat_scored_logits`: there the MLP
    at module path `mlp` - the last block's, `from_block.last_mlp_module` - runs on the scored
    (row, position) pairs only. Why it may: an MLP is position-wise, the last block's output at
    a position feeds nothing but that position's final norm and head, and the head runs on the
    scored pairs only; at every other position the block's output is left without the MLP's
    term (never read). The attention still runs at every position (later positions' keys and
    values are needed). On the main job's text windows 674 of 1,184 positions are scored.
    Hashable: a static argument of jitted functions. Elsewhere (a plain call) it is `apply`."""

    apply: Callable
    mlp: str

    def __call__(self, params: Any, batch: dict) -> jax.Array:
        return self.apply(params, batch)


def flat_scored_logits(apply_fn: Callable[[Any, dict], jax.Array], params: Any, batch: dict, rows: jax.Array,
                       pos: jax.Array) -> jax.Array:
    """Logits [T, V] at T (row, position) pairs of `batch` ([B, S] leaves): rows, pos [T] int32.

    Unlike `scored_logits` ([B, K] positions, K = the most scored positions of any row, so rows
    with fewer targets pay for K anyway) the head runs on exactly the T positions asked for: on
    SmolLM2's evaluation rows (1-8 target tokens at K = 8, text windows two thirds padding) the
    head - 57 MFLOP per position - is most of a from-block pass, and T is the sum of the real
    target counts. The head gets the gathered hidden states as [1, T, H] (same hook as
    `scored_logits`); a model without a recognisable head gets its full logits gathered (the
    same numbers, no saving).

    apply_fn a `LastMLPAtScored`: its last block's MLP runs on the same T pairs only (the same
    logits up to float rounding of the smaller matmuls)."""
    n_rows, seq = batch["label_mask"].shape[:2]
    seen = []
    mlp = apply_fn.mlp if isinstance(apply_fn, LastMLPAtScored) else None
    mlp_calls = []

    def head_at_pairs(next_fun, args, kwargs, context):
        if mlp is not None and context.method_name == "__call__" and "/".join(context.module.path) == mlp:
            x = args[0] if args else None
            if mlp_calls or getattr(x, "ndim", 0) != 3 or x.shape[:2] != (n_rows, seq):
                raise ValueError(f"flat_scored_logits: the last MLP {mlp!r} was called twice or not on the batch's "
                                 f"[{n_rows}, {seq}, H] hidden states (got {getattr(x, 'shape', None)})")
            mlp_calls.append(True)
            y = next_fun(x[rows, pos][None], *args[1:], **kwargs)[0]
            if y.shape[-1] != x.shape[-1]:
                raise ValueError(f"flat_scored_logits: the last MLP {mlp!r} maps width {x.shape[-1]} to {y.shape[-1]}")
            # the scored pairs get the MLP's output; every other position none (nothing reads them)
            return jnp.zeros(x.shape, y.dtype).at[rows, pos].set(y)
        if not _is_head(context) or not args or getattr(args[0], "ndim", 0) != 3 or args[0].shape[:2] != (n_rows, seq):
            return next_fun(*args, **kwargs)
        if seen:
            raise ValueError(f"flat_scored_logits: the head ({'/'.join(context.module.path)}) was called twice in one forward pass")
        seen.append(True)
        return next_fun(args[0][rows, pos][None], *args[1:], **kwargs)

    with nn.intercept_methods(head_at_pairs):
        logits = apply_fn(params, batch)
    if not seen:  # said at trace time (once per compiled shape), not silent
        warnings.warn("flat_scored_logits: no recognisable LM head (a tied embedding's `attend` or a module named "
                      "`lm_head`): the full logits are computed and gathered (the same numbers, no saving)")
        return logits[rows, pos]
    return logits[0]


def flat_positions(label_mask: np.ndarray, size: int | None = None) -> dict[str, np.ndarray]:
    """Host side of `flat_scored_logits`: every (row, position) with label_mask != 0 of a
    [B, S] mask, in row-major order, padded to `size` (default: their number) with weight-0
    entries at (0, 0). Returns {"rows", "pos": [T] int32, "valid": [T] float32}; an error if
    the mask has more than `size` scored positions."""
    r, p = np.nonzero(np.asarray(label_mask) != 0)
    size = len(r) if size is None else int(size)
    if len(r) > size:
        raise ValueError(f"flat_positions: {len(r)} scored positions, more than size={size}")
    out = {"rows": np.zeros(size, np.int32), "pos": np.zeros(size, np.int32), "valid": np.zeros(size, np.float32)}
    out["rows"][: len(r)], out["pos"][: len(r)], out["valid"][: len(r)] = r, p, 1.0
    return out
