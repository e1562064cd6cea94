"""Training MEND's editor on an edit set (SaLEM section 3.3, eq. 6).

One training step takes `batch_size` *edit groups*. A group is what the editor learns from at
once: `edits_per_group` fail rows (edited together: their factors are summed into one edit),
`adapt_per_edit` rephrasings of each (rows of the same `record_id`), and `pass_per_group` pass
rows (plus `extra_pass_per_group` rows of a second pass pool, when the split has one: a per-group
mix of two kinds of locality rows, `EditData.n_extra_pass`); `own_pass_per_group` of the
`pass_per_group` rows can come from the group's own records (pass rows with the fail row's
`record_id`: on CounterFact the edit's own neighbourhood prompts). For every group, inside the loss and
without touching the base parameters:

    (u, delta) = capture(base, fail rows)                   # rank-1 factors of the edited weights
    W~ = edited_params(editor, base, u, delta)             # W - lr_W * pseudo_grad
    loss = c_fail * NLL(W~ on fail + adapt targets) + c_loc * KL(base || W~ on pass targets)

The step loss is the mean over groups. The step is written once, for the global batch, and
jitted over a `(data, model)` device mesh (`salem_jax.sharding`) with explicit placements: the
groups split over "data", the base weights and the editor's optimizer state split over all
devices. The same code runs on one CPU (a 1x1 mesh), eight simulated CPU devices, a GPU or a
TPU pod, and splitting the groups over devices does not change the result. It is jitted once
(static shapes: every split is tokenised to one padded length), and the train state is donated.

Optimisation: Adam on the editor network, a separate Adam (learning rate `lr_lr`) on the
per-weight edit learning rates (`optax.partition`), global-norm clipping, and
`optax.MultiSteps` accumulating `accum_steps` steps into one update (the paper's batch of 10).
A *step* below is one call of the jitted function; the editor changes every `accum_steps` steps.

Data order is a pure function of (seed, step), so a resumed run sees exactly the batches an
uninterrupted run would; checkpoints (checkpoint.py) hold everything else.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from salem_jax import parallel, sharding
from salem_jax.data.tokenize import encode, pad_rows, slice_rows
from salem_jax.errors import UserError
from salem_jax.losses import batch_nll, example_correct, example_nll, kl_divergence, token_logprobs
from salem_jax.mend.capture import Factors, capture
from salem_jax.mend.checkpoint import CheckpointError, CheckpointMismatch, EditorCheckpointer
from salem_jax.mend.editor import EditorConfig, EditorSpec, edited_params, init_editor, param_labels, update_norm_state
from salem_jax.mend.nullspace import (NULL_FILE, check_energy, check_facts_weight, load_projections, parse_null_facts,
                                     projection_arrays, projection_facts, save_projections, wikitext_null_projection)
from salem_jax.models.base import get_path
from salem_jax.models.from_block import BLOCK_INPUT, FromBlock, block_chain, block_output, block_outputs_by_length
from salem_jax.scored_logits import SCORE_POS, flat_positions, flat_scored_logits, scored_labels, scored_logits, with_score_positions

# ---------------------------------------------------------------------------- configuration


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run (stored in every checkpoint).

    Defaults follow MEND/SaLEM: c_fail 0.1, Adam lr 1e-6 for the editor and 1e-4 for the edit
    learning rates, clip 100, effective batch 10 by accumulation, at most 150k steps, early
    stop after 30k steps without a better validation loss."""

    editor: EditorConfig = EditorConfig()
    # what one edit group holds
    edits_per_group: int = 1
    adapt_per_edit: int = 2
    pass_per_group: int = 1
    # rows per group from the split's second pass pool (the last `EditData.n_extra_pass` pass rows,
    # e.g. other relations' facts: config.train_pass) on top of `pass_per_group` rows of the first;
    # 0: one pool, every pass row alike (the pass_per_group rows are drawn from all of them)
    extra_pass_per_group: int = 0
    # of the pass_per_group rows, this many from the group's own records (first-pool pass rows with
    # the record_id of one of the group's fail rows: on CounterFact the edit's own neighbourhood
    # prompts with their true answers), the rest from the pool as with 0; a group whose records have
    # fewer own rows takes all of them and the rest from the pool. 0: every row from the pool
    # (validation batches are the same either way)
    own_pass_per_group: int = 0
    # how many groups per step / per optimiser update
    batch_size: int | None = None  # groups per step (global); None: one per data-parallel device
    effective_batch: int = 10  # groups per optimiser update; accum_steps = ceil(effective / batch)
    accum_steps: int | None = None  # set to override the value derived from effective_batch
    # loss
    c_fail: float = 0.1
    c_loc: float = 1.0
    # optimisation
    lr: float = 1e-6
    lr_lr: float = 1e-4
    grad_clip: float = 100.0
    max_steps: int = 150_000
    # validation, early stopping, checkpoints, logs
    val_every: int = 5_000
    val_groups: int = 500  # at most this many validation groups (the first ones, fixed)
    patience: int = 30_000  # stop when the val loss has not improved for this many steps
    checkpoint_every: int = 5_000
    keep_checkpoints: int = 3
    log_every: int = 100
    seed: int = 0
    # AlphaEdit's null-space projection inside training (`mend.nullspace`): > 0 = every edit the
    # editor makes, in training, validation and later use, is W - lr_W * P G~ with P [in, in] the
    # projector on the eigenvectors of the edited kernel's input covariance over WikiText
    # (null_tokens tokens, the key-statistics cache) whose eigenvalues sum to at most this share of
    # its trace, so the editor learns to reach its edits through that null space; 0 = off (the
    # step's arithmetic unchanged)
    null_energy: float = 0.0
    null_tokens: int = 100_000
    # fact keys added to that covariance (`nullspace.parse_null_facts`: '' = none, e.g.
    # "countries:region,currency,languages"): C = C_text + null_facts_weight x C_facts, both
    # per-token means; the fact rows come from the pipeline (`pipeline.null_fact_rows`, disjoint
    # from the keep set and the val split), given to `train_editor` inside its null_projection
    null_facts: str = ""
    null_facts_weight: float = 1.0

    @classmethod
    def tiny(cls, **overrides) -> "TrainConfig":
        """A configuration that trains a tiny model in seconds (tests, smoke runs)."""
        base = dict(
            editor=EditorConfig(rank=32, n_hidden=1, edit_lr_init=1e-3),
            adapt_per_edit=1,
            effective_batch=1,
            lr=1e-3,
            lr_lr=1e-3,
            max_steps=60,
            val_every=20,
            val_groups=16,
            patience=1_000,
            checkpoint_every=20,
            keep_checkpoints=2,
            log_every=5,
        )
        base.update(overrides)
        return cls(**base)

    def resolved(self, n_devices: int) -> "TrainConfig":
        """This config with `batch_size` and `accum_steps` made concrete for `n_devices`."""
        bs = self.batch_size if self.batch_size is not None else n_devices
        if bs < 1 or bs % n_devices:
            raise ValueError(
                f"TrainConfig.batch_size={bs} groups per step cannot be split over {n_devices} devices; "
                f"use a multiple of {n_devices}"
            )
        accum = self.accum_steps if self.accum_steps is not None else max(1, math.ceil(self.effective_batch / bs))
        for name in ("edits_per_group", "pass_per_group", "max_steps", "val_every", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1")
        if self.adapt_per_edit < 0:
            raise ValueError("TrainConfig.adapt_per_edit must be >= 0")
        if self.extra_pass_per_group < 0:
            raise ValueError("TrainConfig.extra_pass_per_group must be >= 0")
        check_energy(self.null_energy, "TrainConfig.null_energy")
        if isinstance(self.null_tokens, bool) or not isinstance(self.null_tokens, (int, np.integer)) or self.null_tokens < 1:
            raise ValueError(f"TrainConfig.null_tokens={self.null_tokens!r}: give a whole number of WikiText tokens >= 1 "
                             "(the key statistics of the null-space projection)")
        parse_null_facts(self.null_facts, "TrainConfig.null_facts")
        if self.null_facts:
            check_facts_weight(self.null_facts_weight, "TrainConfig.null_facts_weight")
            if self.null_energy == 0:
                raise ValueError(f"TrainConfig.null_facts={self.null_facts!r} adds fact keys to the null-space projection's "
                                 "covariance, but null_energy is 0 (no projection): set null_energy > 0 or null_facts=''")
        if not 0 <= self.own_pass_per_group <= self.pass_per_group:
            raise ValueError(
                f"TrainConfig.own_pass_per_group={self.own_pass_per_group} must be >= 0 and at most "
                f"pass_per_group={self.pass_per_group} (the own-record rows are part of the pass_per_group rows)"
            )
        return dataclasses.replace(self, batch_size=bs, accum_steps=accum)

    def step_config(self) -> "TrainConfig":
        """This config with the fields only the Python loop reads (max_steps, intervals,
        patience, seed, ...) set to fixed values: the jitted steps take it as a static argument,
        so changing those fields does not recompile them."""
        return dataclasses.replace(
            self, max_steps=1, val_every=1, val_groups=1, patience=1, checkpoint_every=1, keep_checkpoints=1,
            log_every=1, seed=0,
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "TrainConfig":
        d = dict(d)
        d["editor"] = EditorConfig(**d["editor"])
        return cls(**d)


# ---------------------------------------------------------------------------- data

# Padded lengths of edit rows: multiples of 8 up to 32, then steps of 1.5x (8, 16, 24, 32, 48,
# 64, 96, ...), finer than the powers of two of `tokenize.DEFAULT_BUCKETS`. An edit set or a set
# of requests has one length, and every padded token costs a whole row of every layer (a
# 7-token fact is padded to 8, not 16): fewer wasted tokens for at most one more compilation
# per power of two.
EDIT_BUCKETS = (8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192)


@dataclasses.dataclass(frozen=True)
class EditData:
    """One split of an edit set, tokenised to static shapes.

    fail / adapt / passes: batch dicts (see models/base.py) with N_fail / N_adapt / N_pass rows.
    adapt_of[i]: indices into `adapt` of the rephrasings of fail row i (same record_id).
    fail_ids: the fail rows' ids (for reports).
    n_extra_pass: the LAST n_extra_pass rows of `passes` are a second pool (rows marked
    `pass_pool: "extra"` in `prepare_splits`), drawn `extra_pass_per_group` per group apart from
    the first pool's `pass_per_group` when that is > 0; with extra_pass_per_group 0 all pass rows
    form one pool.
    pass_of[i]: indices into `passes` of the first-pool pass rows of fail row i's record (same
    record_id), in split order (`own_pass_per_group`)."""

    fail: dict[str, np.ndarray]
    adapt: dict[str, np.ndarray]
    passes: dict[str, np.ndarray]
    adapt_of: tuple[np.ndarray, ...]
    fail_ids: tuple[str, ...]
    # module path of the block whose base-model output fail / adapt / passes hold under
    # BLOCK_INPUT ([N, S, H] each; `with_block_inputs`), None when they hold none
    block_input_of: str | None = None
    n_extra_pass: int = 0
    # paths of the weights whose capture factors `fail` holds per row (`with_fail_factors`:
    # FACTOR keys [N, S, fan_in] / [N, S, fan_out]), None when it holds none
    factors_of: tuple[str, ...] | None = None
    pass_of: tuple[np.ndarray, ...] = ()

    @property
    def n_fail(self) -> int:
        return len(self.fail_ids)

    @property
    def n_pass(self) -> int:
        return int(next(iter(self.passes.values())).shape[0]) if self.passes else 0


def _row_get(row: Mapping, key: str, where: str):
    if key not in row:
        raise KeyError(f"{where}: field {key!r} is missing (edit-set rows need id, record_id, group, prompt, target)")
    return row[key]


def prepare_splits(model, splits: Mapping[str, Sequence[Mapping]], where: str = "edit set",
                   max_tokens: int | None = None) -> dict[str, EditData]:
    """Tokenise every split with one common padded length (so train and val share shapes).

    splits: {"train": rows, "val": rows}; rows are dicts with the edit-set fields
    (id, record_id, group in {fail, adapt, pass}, prompt, target, label, text_pair; a pass row
    with `pass_pool: "extra"` goes to the second pass pool: it is placed after the other pass rows
    and counted in `EditData.n_extra_pass`). Every row's prompt + target is checked against the
    model's context and `max_tokens` first (an error names the split and row): every row is padded
    to the longest, so one long row would make every training batch that long."""
    all_rows, spans, names = [], {}, []
    for name, rows in splits.items():
        rows = list(rows)
        spans[name] = (len(all_rows), len(all_rows) + len(rows))
        for i, r in enumerate(rows):
            w = f"{where} split {name!r} row {i}"
            g = _row_get(r, "group", w)
            if g not in ("fail", "adapt", "pass"):
                raise ValueError(f"{w}: field 'group' = {g!r}, expected 'fail', 'adapt' or 'pass'")
            for k in ("id", "record_id", "prompt", "target"):
                _row_get(r, k, w)
            names.append(f"split {name!r} row {i} (id {r['id']})")
        all_rows.extend(rows)
    if not all_rows:
        raise ValueError(f"{where}: no rows")
    classifier = model.kind == "classifier"
    targets = [int(r.get("label", -1)) if classifier else r["target"] for r in all_rows]
    pairs = [r.get("text_pair", "") or "" for r in all_rows]
    enc = encode(
        model,
        [r["prompt"] for r in all_rows],
        targets,
        text_pairs=pairs if any(pairs) else None,
        where=where,
        max_tokens=max_tokens,
        names=names,
        buckets=EDIT_BUCKETS,
    )
    # the positions each row is scored at, one K for every split (train and val share shapes):
    # the steps apply the LM head there only (salem_jax.scored_logits)
    enc = with_score_positions(enc)
    out = {}
    for name, (a, b) in spans.items():
        rows = all_rows[a:b]
        idx = {g: [a + i for i, r in enumerate(rows) if r["group"] == g] for g in ("fail", "adapt", "pass")}
        # the second pass pool last (its rows keep their order)
        extra = [i for i in idx["pass"] if all_rows[i].get("pass_pool") == "extra"]
        idx["pass"] = [i for i in idx["pass"] if all_rows[i].get("pass_pool") != "extra"] + extra
        if not idx["fail"]:
            raise ValueError(f"{where} split {name!r}: no 'fail' rows, nothing to edit")
        if not idx["pass"]:
            raise ValueError(f"{where} split {name!r}: no 'pass' rows, the locality (KL) loss needs some")
        adapt_pos: dict[str, list[int]] = {}
        for j, gi in enumerate(idx["adapt"]):
            adapt_pos.setdefault(str(all_rows[gi]["record_id"]), []).append(j)
        pass_pos: dict[str, list[int]] = {}
        for j, gi in enumerate(idx["pass"][: len(idx["pass"]) - len(extra)]):
            pass_pos.setdefault(str(all_rows[gi]["record_id"]), []).append(j)
        take = lambda ids: {k: v[np.asarray(ids, dtype=np.int64)] for k, v in enc.items()}  # noqa: E731
        out[name] = EditData(
            fail=take(idx["fail"]),
            adapt=take(idx["adapt"]),
            passes=take(idx["pass"]),
            adapt_of=tuple(np.asarray(adapt_pos.get(str(all_rows[i]["record_id"]), []), np.int64) for i in idx["fail"]),
            fail_ids=tuple(str(all_rows[i]["id"]) for i in idx["fail"]),
            n_extra_pass=len(extra),
            pass_of=tuple(np.asarray(pass_pos.get(str(all_rows[i]["record_id"]), []), np.int64) for i in idx["fail"]),
        )
    return out


def _stream(n: int, seed: int, stream: int, start: int, count: int) -> np.ndarray:
    """Items start..start+count-1 of an endless sequence of shuffled epochs over range(n).

    Epoch e is `default_rng([seed, stream, e]).permutation(n)`: a pure function of the
    position, so any step's data can be rebuilt without replaying earlier ones."""
    pos = np.arange(start, start + count)
    out = np.empty(count, np.int64)
    for e in np.unique(pos // n):
        perm = np.random.default_rng([seed, stream, int(e)]).permutation(n)
        sel = pos // n == e
        out[sel] = perm[pos[sel] % n]
    return out


def _gather(arrays: dict[str, np.ndarray], idx: np.ndarray) -> dict[str, np.ndarray]:
    """Rows `idx` (any shape; -1 gives an all-zero row, which counts nowhere)."""
    flat = idx.reshape(-1)
    out = {}
    for k, v in arrays.items():
        rows = v[np.maximum(flat, 0)] if len(v) else np.zeros((len(flat),) + v.shape[1:], v.dtype)
        rows = np.where((flat >= 0).reshape((-1,) + (1,) * (v.ndim - 1)), rows, 0).astype(v.dtype)
        out[k] = rows.reshape(idx.shape + v.shape[1:])
    return out


def _adapt_choice(data: EditData, edits: np.ndarray, a: int, rng_key: Sequence[int] | None) -> np.ndarray:
    """[..., a] adapt-row indices for each edit (-1 where the record has fewer rephrasings)."""
    out = np.full(edits.shape + (a,), -1, np.int64)
    for pos in np.ndindex(edits.shape):
        e = int(edits[pos])
        if e < 0 or a == 0:
            continue
        cands = data.adapt_of[e]
        if rng_key is not None and len(cands) > a:
            cands = np.random.default_rng(list(rng_key) + list(pos)).permutation(cands)
        take = cands[:a]
        out[pos][: len(take)] = take
    return out


def _group_batch(data: EditData, edits: np.ndarray, adapts: np.ndarray, passes: np.ndarray, weight: np.ndarray) -> dict:
    """Numpy batch of G groups: fail [G, k, L..], edit (fail + adapt rows) [G, k(1+A), L..],
    pass [G, P, L..], weight [G]."""
    g, k = edits.shape
    fail = _gather(data.fail, edits)
    adapt = _gather(data.adapt, adapts.reshape(g, -1))
    edit = {key: np.concatenate([fail[key], adapt[key]], axis=1) for key in fail if not key.startswith(FACTOR)}
    return {"fail": fail, "edit": edit, "pass": _gather(data.passes, passes), "weight": weight.astype(np.float32)}


def train_batch(data: EditData, cfg: TrainConfig, step: int, flat: tuple[int, int] | None = None) -> dict:
    """The global batch of training step `step` (a pure function of cfg.seed and step).

    Pass rows [G, pass_per_group + extra_pass_per_group]: the first pass_per_group of each group
    from the first pool (all pass rows when extra_pass_per_group is 0; else the first
    n_pass - n_extra_pass rows, the same stream a split without the second pool gives), the
    rest from the second pool (its own shuffled-epoch stream). With own_pass_per_group O > 0 the
    first O of a group's first-pool rows are its own records' pass rows (`_own_pass_choice`).

    flat: (T_edit, T_pass) from `flat_train_sizes`: the batch also holds each group's target
    (row, position) pairs (FLAT, FLAT_PASS: `with_flat_train`), and the step runs the LM head on
    those only."""
    batch = _group_batch(data, *_train_indices(data, cfg, step))
    return batch if flat is None else with_flat_train(batch, *flat)


def _train_indices(data: EditData, cfg: TrainConfig, step: int) -> tuple[np.ndarray, ...]:
    """(edits [G, k], adapts [G, k, A], passes [G, P + Q], weight [G]) of step `step`: row
    indices into the split's fail / adapt / pass rows (-1: no row)."""
    g, k, p, q = cfg.batch_size, cfg.edits_per_group, cfg.pass_per_group, cfg.extra_pass_per_group
    edits = _stream(data.n_fail, cfg.seed, 0, step * g * k, g * k).reshape(g, k)
    n_main = data.n_pass - data.n_extra_pass if q else data.n_pass
    if q and (data.n_extra_pass == 0 or n_main == 0):
        raise ValueError(
            f"extra_pass_per_group={q} needs pass rows of both pools in the train split (it has "
            f"{n_main} of the first, {data.n_extra_pass} of the second, rows marked pass_pool='extra'); "
            "in the pipeline set config.train_pass, or set extra_pass_per_group=0"
        )
    passes = _stream(n_main, cfg.seed, 1, step * g * p, g * p).reshape(g, p)
    if cfg.own_pass_per_group:
        passes = _own_pass_choice(data, edits, passes, cfg.own_pass_per_group, (cfg.seed, 4, step))
    if q:
        extra = n_main + _stream(data.n_extra_pass, cfg.seed, 3, step * g * q, g * q).reshape(g, q)
        passes = np.concatenate([passes, extra], axis=1)
    adapts = _adapt_choice(data, edits, cfg.adapt_per_edit, (cfg.seed, 2, step))
    return edits, adapts, passes, np.ones(g)


def _own_pass_choice(data: EditData, edits: np.ndarray, pool: np.ndarray, o: int, rng_key: Sequence[int]) -> np.ndarray:
    """pool [G, P] first-pool pass rows with the first m <= o of each group replaced by its own
    records' pass rows (`EditData.pass_of` of the group's fail rows, joined in the group's order):
    all of them when there are at most o, else o of them drawn by `default_rng(rng_key + [group])`.
    The pool rows a group keeps are its first P - m, so a group with no own rows keeps today's P."""
    if len(data.pass_of) != data.n_fail:
        raise ValueError(
            f"own_pass_per_group={o}: this split's EditData has no pass_of (own-record pass rows of its "
            f"{data.n_fail} fail rows); build it with prepare_splits, or set own_pass_per_group=0"
        )
    if not any(len(x) for x in data.pass_of):
        raise ValueError(
            f"own_pass_per_group={o}: none of the split's {data.n_fail} fail rows has a pass row of its own "
            "record (pass rows with the fail row's record_id, e.g. CounterFact's neighbourhood prompts); "
            "this edit set's pass rows all belong to other records: set own_pass_per_group=0"
        )
    out = pool.copy()
    for j in range(edits.shape[0]):
        own = [data.pass_of[int(e)] for e in edits[j] if e >= 0]
        cands = np.concatenate(own) if own else np.zeros(0, np.int64)
        if len(cands) > o:
            cands = np.random.default_rng(list(rng_key) + [j]).permutation(cands)[:o]
        m = len(cands)
        out[j] = np.concatenate([cands, pool[j, : pool.shape[1] - m]])
    return out


def own_pass_counts(data: EditData) -> np.ndarray:
    """[n_fail] how many first-pool pass rows each fail row's record has (`own_pass_per_group`)."""
    return np.asarray([len(x) for x in data.pass_of], np.int64)


# ---------------------------------------------------------------------------- a batch's padded length
#
# An edit set has one padded length S (the EDIT_BUCKETS length of its longest row), but a step
# holds a handful of rows, most of them far shorter: on SmolLM2's capitals S = 32 for rows of 9-11
# tokens on average, and 270 of the main job's 300 steps have no row longer than 16 tokens. Rows
# are right-padded and the models causal (or masked): positions past a row's last token change
# nothing at the positions before it, so a batch cut after its longest row gives the same numbers,
# float rounding aside - and on 16 positions instead of 32 every block above the edit does half
# the work. `fit_length` cuts a group batch to the smallest EDIT_BUCKETS length that holds every
# row's tokens (and its score positions: at least K), so a run compiles one program per length it
# meets (2 for the main job), not one per step. Left-padded rows end at S: nothing is cut.

ROW_SETS = ("fail", "edit", "pass")  # the row dicts of a group batch: leaves [G, rows, S, ...]


def row_ends(mask: np.ndarray) -> np.ndarray:
    """[...] each row's last attended position + 1 (1 for a row with none) of a mask [..., S]."""
    mask = np.asarray(mask) != 0
    return np.where(mask.any(-1), mask.shape[-1] - np.argmax(mask[..., ::-1], axis=-1), 1)


def bucket_length(need: int, s: int) -> int:
    """The smallest EDIT_BUCKETS length >= need, at most s (a padded length to cut rows of `s` to)."""
    return min(s, next((b for b in EDIT_BUCKETS if b >= need), s))


def batch_length(batch: dict) -> int:
    """The padded length a group batch (`train_batch`, `val_batches`) can be cut to: the smallest
    EDIT_BUCKETS length >= every row's last attended position + 1 and >= its score positions' K,
    at most the batch's own length S."""
    s, need = 0, 1
    for name in ROW_SETS:
        rows = batch.get(name)
        if not rows:
            continue
        mask = np.asarray(rows["attention_mask"])
        s = max(s, mask.shape[-1])
        need = max(need, int(row_ends(mask).max(initial=1)))
        if SCORE_POS in rows:
            need = max(need, int(rows[SCORE_POS].shape[-1]))
    return bucket_length(need, s)


def fit_length(batch: dict, length: int | None = None) -> dict:
    """`batch` with every row dict's positional leaves ([G, rows, S, ...]: tokens, masks, labels,
    kept block inputs and factors) cut to `length` positions (default `batch_length(batch)`); the
    same dict when nothing is cut. `length` must hold every row (an error otherwise: cutting a
    token would change the numbers)."""
    need = batch_length(batch)
    length = need if length is None else int(length)
    if length < need:
        raise ValueError(f"fit_length: {length} positions cut rows that need {need}")
    out = dict(batch)
    for name in ROW_SETS:
        rows = batch.get(name)
        if not rows:
            continue
        s = rows["attention_mask"].shape[-1]
        if length >= s:
            continue
        out[name] = {k: v if k in (SCORE_POS, PASS_LOGITS) or np.ndim(v) < 3 or v.shape[2] != s else v[:, :, :length]
                     for k, v in rows.items()}
    return out


def val_batches(data: EditData, cfg: TrainConfig) -> list[dict]:
    """Fixed validation batches: the first `val_groups` groups of fail rows in order, each with
    its first rephrasings and pass rows in order (cycled); the last batch is padded with
    weight-0 groups."""
    return [_group_batch(data, *idx) for idx in _val_indices(data, cfg)]


def _val_indices(data: EditData, cfg: TrainConfig) -> list[tuple[np.ndarray, ...]]:
    """Per validation batch (edits [G, k], adapts [G, k, A], passes [G, P], weight [G]): the row
    indices `val_batches` gathers (-1: no row)."""
    k, p, g = cfg.edits_per_group, cfg.pass_per_group, cfg.batch_size
    n_groups = min(cfg.val_groups, math.ceil(data.n_fail / k))
    n_batches = math.ceil(n_groups / g)
    out = []
    for b in range(n_batches):
        gi = np.arange(b * g, (b + 1) * g)
        valid = gi < n_groups
        edits = gi[:, None] * k + np.arange(k)[None]
        edits = np.where(valid[:, None] & (edits < data.n_fail), edits, -1)
        passes = (gi[:, None] * p + np.arange(p)[None]) % data.n_pass
        passes = np.where(valid[:, None], passes, -1)
        adapts = _adapt_choice(data, edits, cfg.adapt_per_edit, None)
        out.append((edits, adapts, passes, valid.astype(np.float32)))
    return out


def _rows_marked(data: EditData, indices: Sequence[tuple[np.ndarray, ...]]) -> dict[str, np.ndarray]:
    """{"fail", "adapt", "passes": bool [N]}: the rows any of `indices` ((edits, adapts, passes, ...)
    index arrays, -1 for none) names."""
    out = {}
    for name, j in (("fail", 0), ("adapt", 1), ("passes", 2)):
        enc = getattr(data, name)
        mark = np.zeros(int(next(iter(enc.values())).shape[0]) if enc else 0, bool)
        for idx in indices:
            i = np.asarray(idx[j]).reshape(-1)
            mark[i[i >= 0]] = True
        out[name] = mark
    return out


def train_rows_used(data: EditData, cfg: TrainConfig, steps: int) -> dict[str, np.ndarray]:
    """The rows of the train split that steps 0..steps-1 gather (`_train_indices`, rebuilt from
    (seed, step) as index arrays only): {"fail", "adapt", "passes": bool [N]}. With 300 steps of one
    group of 1 fail + 2 of its rephrasings, many of the main job's ~790 rephrasings are never drawn."""
    return _rows_marked(data, [_train_indices(data, cfg, step) for step in range(steps)])


def val_rows_used(data: EditData, cfg: TrainConfig) -> dict[str, np.ndarray]:
    """The rows of the val split the validation batches gather (`val_batches`): as `train_rows_used`."""
    return _rows_marked(data, _val_indices(data, cfg))


# ---------------------------------------------------------------------------- from the edited block
#
# An edit of block l changes nothing the blocks below l compute: on every row, the hidden state
# entering block l is the base model's, in the capture pass, the base pass rows' KL targets and
# the edited model's pass alike. On a decoder-only model the step therefore runs the blocks below
# l once per row on the base model (or not at all: `with_block_inputs` keeps that hidden state
# for every row of an edit set, computed once before training) and starts every pass at block l
# (`salem_jax.models.from_block`). On SmolLM2 (30 blocks) an editor of layers.27-29 runs 3
# blocks per pass instead of 30. The gradients are the same: nothing the editor's parameters
# reach lies below block l (tests/test_mend_from_block.py compares the two paths).

# Hidden states kept for a whole split at most (bytes, float32): beyond it the step computes them
# itself, once per step (an edit set of 100k 32-token rows on SmolLM2 would need 7 GB).
BLOCK_CACHE_BYTES = 1 << 30


@dataclasses.dataclass(frozen=True)
class FromBlockPlan:
    """How the steps skip the blocks below the first edited one (hashable: a static argument).

    apply: the model's apply with the skipped blocks returning `batch[BLOCK_INPUT]`.
    last:  module path of the last skipped block: BLOCK_INPUT is the base model's output of it.
    start: position of the first block that runs (>= 1), of n_blocks."""

    apply: FromBlock
    last: str
    start: int
    n_blocks: int


def from_block_plan(model, spec: EditorSpec, data: EditData) -> tuple[FromBlockPlan | None, str]:
    """(the plan for editing `spec`'s weights of `model`, "") or (None, why the step must run
    every block): only decoder-only models (kind "causal") without nn.remat whose blocks are
    called once each, in a chain, and only when every edited weight lies in a block after the
    first. `data`: any split of the edit set (one row traces the call order, compute-free)."""
    chain, why = block_chain(model, model.params, data.fail)
    if chain is None:
        return None, why
    starts = [chain.start(w.module_path) for w in spec.weights]
    if any(s is None for s in starts):
        return None, "an edited weight outside every block"
    start = min(starts)
    if start == 0:
        return None, "the first block is edited (nothing below it to skip)"
    return FromBlockPlan(chain.skipping(model.apply, start), chain.last_skipped(start), start, len(chain.order)), ""


def _with_block_inputs(plan: FromBlockPlan | None, apply_fn, base_params, batch: dict) -> tuple[dict, Any]:
    """(batch, apply function) for the step: unchanged without a plan; with one, every row set
    of the batch gets BLOCK_INPUT [G, rows, S, H] - the base model's output of block `plan.last` -
    and the apply function is `plan.apply`. A batch that holds BLOCK_INPUT already (from
    `with_block_inputs`) is used as it is; otherwise one base pass over the edit and pass rows
    of each group (the fail rows are the first edit rows) computes it, up to that block only
    (XLA drops the later ones)."""
    if plan is None:
        return batch, apply_fn
    if BLOCK_INPUT in batch["edit"]:
        if not all(BLOCK_INPUT in batch[part] for part in ("fail", "pass")):
            raise ValueError("a batch with BLOCK_INPUT in its edit rows needs it in its fail and pass rows too")
        return batch, plan.apply
    n_edit, k = batch["edit"]["input_ids"].shape[1], batch["fail"]["input_ids"].shape[1]

    def one(e, q):
        joint = {key: jnp.concatenate([e[key], q[key]], axis=0) for key in e}
        return block_output(plan.apply.apply, plan.last, base_params, joint)

    h = jax.lax.stop_gradient(jax.vmap(one)(batch["edit"], batch["pass"]))
    out = dict(batch)
    out["fail"] = {**batch["fail"], BLOCK_INPUT: h[:, :k]}
    out["edit"] = {**batch["edit"], BLOCK_INPUT: h[:, :n_edit]}
    out["pass"] = {**batch["pass"], BLOCK_INPUT: h[:, n_edit:]}
    return out, plan.apply


def _block_shape(plan: FromBlockPlan, base_params, data: EditData) -> tuple[int, ...]:
    """(S, H): the shape of one row's BLOCK_INPUT (from an abstract pass, compute-free)."""
    sample = {k: v[:1] for k, v in data.fail.items() if k != BLOCK_INPUT}
    return tuple(jax.eval_shape(lambda b: block_output(plan.apply.apply, plan.last, base_params, b), sample).shape[1:])


def block_cache_bytes(plan: FromBlockPlan, base_params, data: EditData) -> int:
    """Bytes (float32) the hidden states of every row of `data` take: rows x S x H x 4."""
    rows = sum(int(next(iter(d.values())).shape[0]) for d in (data.fail, data.adapt, data.passes) if d)
    return rows * int(np.prod(_block_shape(plan, base_params, data))) * 4


def without_block_inputs(data: EditData) -> EditData:
    """`data` without its kept hidden states."""
    if data.block_input_of is None:
        return data
    strip = lambda d: {k: v for k, v in d.items() if k != BLOCK_INPUT}  # noqa: E731
    return dataclasses.replace(data, fail=strip(data.fail), adapt=strip(data.adapt), passes=strip(data.passes),
                               block_input_of=None)


def with_block_inputs(plan: FromBlockPlan, base_params, data: EditData, chunk: int = 32,
                      used: Mapping[str, np.ndarray] | None = None) -> EditData:
    """`data` with BLOCK_INPUT [N, S, H] (float32 numpy) in fail, adapt and passes: the base
    model's output of block `plan.last` on every row, computed once, `chunk` rows per call, the
    rows sorted by length and each call cut after its longest row (one compilation per length;
    padded positions past a call's cut are 0). The steps then run no block below `plan.start` at
    all (`_with_block_inputs`).
    base_params: as placed for the steps (any placement).
    used: {"fail" | "adapt" | "passes": bool [N]} - compute only the rows marked (those the run's
    steps or validations gather: `train_rows_used`, `val_rows_used`); the others stay 0 and must
    not be read. Each marked row is computed at the length it gets without `used` (its chunk's
    cut among all rows), in calls of `chunk` rows of that length: the same programs, the same
    numbers (tests/test_fit_length.py)."""
    if data.block_input_of == plan.last:
        return data
    data = without_block_inputs(data)
    fn = plan.apply.apply
    shape = _block_shape(plan, base_params, data)

    def rows(enc, name):
        n = int(next(iter(enc.values())).shape[0]) if enc else 0
        if n == 0:
            return {**enc, BLOCK_INPUT: np.zeros((0,) + shape, np.float32)} if enc else enc
        # rows in chunks of similar length, each chunk cut after its longest row (an EDIT_BUCKETS
        # length, as `fit_length` cuts the steps' batches: one program per length); past the chunk's
        # cut they are left 0 (nothing reads them: they carry no target and their gradient factors
        # are inactive); with `used`, the marked rows only, each at its cut among all rows
        out = block_outputs_by_length(fn, plan.last, base_params, enc, chunk, shape=tuple(shape), dtype=np.float32,
                                      rows=None if used is None or name not in used else np.asarray(used[name], bool))
        return {**enc, BLOCK_INPUT: out}

    return dataclasses.replace(data, fail=rows(data.fail, "fail"), adapt=rows(data.adapt, "adapt"),
                               passes=rows(data.passes, "passes"), block_input_of=plan.last)


def split_rows(data: EditData) -> int:
    """Rows of the split: N_fail + N_adapt + N_pass (what `with_block_inputs` runs blocks over)."""
    return sum(int(next(iter(d.values())).shape[0]) for d in (data.fail, data.adapt, data.passes) if d)


def train_block_rows(cfg: TrainConfig, steps: int) -> int:
    """Rows whose block inputs `steps` training steps compute when none are kept: each step runs
    the base blocks over every edit row (fail + adapt slots, padding included) and pass row of
    its `batch_size` groups (`_with_block_inputs`). cfg: resolved (`TrainConfig.resolved`)."""
    k = cfg.edits_per_group
    return steps * cfg.batch_size * (k * (1 + cfg.adapt_per_edit) + cfg.pass_per_group + cfg.extra_pass_per_group)


def val_block_rows(data: EditData, cfg: TrainConfig, steps: int) -> int:
    """Rows whose block inputs the validations of a `steps`-step run compute when none are kept:
    one validation every `val_every` steps and one at the end, each over the edit and pass rows
    of its groups (`val_batches`: min(val_groups, ceil(N_fail / k)) groups)."""
    k = cfg.edits_per_group
    groups = min(cfg.val_groups, math.ceil(data.n_fail / k))
    return math.ceil(steps / cfg.val_every) * groups * (k * (1 + cfg.adapt_per_edit) + cfg.pass_per_group)


def from_block_data(model, spec: EditorSpec, data: EditData, base_params, skip: bool = True,
                    cache_bytes: int = BLOCK_CACHE_BYTES, uses: int | None = None,
                    used: Mapping[str, np.ndarray] | None = None) -> tuple[FromBlockPlan | None, EditData]:
    """(plan, data) for the steps: `from_block_plan` when `skip` (else None) and, with a plan,
    `data` holding the hidden states when they fit in `cache_bytes` and pay (else the step
    computes them); hidden states of another block are dropped.

    uses: how many rows' block inputs the caller's steps would compute without kept ones
    (`train_block_rows`, `val_block_rows`; repeats counted); None: keep whenever they fit. Keeping
    costs one base pass up to the block per row of the split (and a program of its own to
    compile), so they are kept only when uses >= `split_rows(data)`: CounterFact's train split
    (3,510 rows) against 300 steps of 7 rows (2,100) is computed in the steps. The decision
    depends on the sizes and `uses` only - not on whether `data` holds them already - so a
    resumed run decides as the first did.

    used: compute the kept hidden states of these rows only (`with_block_inputs`; the rows the
    caller's steps gather, `train_rows_used` / `val_rows_used`); None: every row."""
    plan = from_block_plan(model, spec, data)[0] if skip else None
    if plan is None:
        return None, without_block_inputs(data)
    if uses is not None and uses < split_rows(data):
        return plan, without_block_inputs(data)
    if data.block_input_of != plan.last and block_cache_bytes(plan, base_params, data) > cache_bytes:
        return plan, without_block_inputs(data)
    return plan, with_block_inputs(plan, base_params, data, used=used)


# ---------------------------------------------------------------------------- the fail rows' factors, once
#
# The capture pass (the base model's forward and backward on a group's fail rows, giving u and
# delta at every edited weight) depends on the base model and the row only, not on the editor:
# each row's factors are its own (`capture.summed_nll` sums over rows). `with_fail_factors`
# computes them once for every fail row of the train split and keeps them in its `fail` rows
# (FACTOR keys, gathered into each batch like the tokens), and the step then runs no capture pass.
# On SmolLM2 at layers.26 the capture was ~11% of the step's arithmetic (1.7 of 15.6 GFLOP), at
# layers.0 14% (4.7 of 33.4). Memory: rows x S x (fan_in + fan_out) x 4 bytes per weight (the
# capitals train split at layers.26: 176 x 16 x 6,336 x 4 = 71 MB).

FACTOR = "factor:"  # key prefix: f"factor:{i}:u" / f"factor:{i}:delta" for spec.weights[i]
FACTOR_CACHE_BYTES = 1 << 30


def _factor_keys(spec: EditorSpec) -> list[tuple[str, str, str]]:
    return [(w.path, f"{FACTOR}{i}:u", f"{FACTOR}{i}:delta") for i, w in enumerate(spec.weights)]


def fail_factor_bytes(spec: EditorSpec, base_params, data: EditData) -> int:
    """Bytes (float32) of every fail row's factors: rows x S x sum(fan_in + fan_out) x 4."""
    seq = int(data.fail["input_ids"].shape[-1])
    per_token = sum(sum(w.in_out_shape(tuple(get_path(base_params, w.path).shape))) for w in spec.weights)
    return data.n_fail * seq * per_token * 4


@functools.partial(jax.jit, static_argnames=("apply_fn", "spec"))
def _row_factors(base_params, rows, *, apply_fn, spec):
    return capture_factors(apply_fn, base_params, rows, spec.weights)


def without_fail_factors(data: EditData) -> EditData:
    """`data` without kept capture factors."""
    if data.factors_of is None:
        return data
    return dataclasses.replace(data, fail={k: v for k, v in data.fail.items() if not k.startswith(FACTOR)}, factors_of=None)


def with_fail_factors(spec: EditorSpec, apply_fn, base_params, data: EditData, plan: FromBlockPlan | None = None,
                      chunk: int = 32) -> EditData:
    """`data` with the base model's capture factors of `spec`'s weights for every fail row in
    `data.fail` (FACTOR keys: u [N, S, fan_in], delta [N, S, fan_out], float32 numpy), computed
    now, `chunk` rows per call (one compilation); the step then uses them instead of a capture
    pass (the same numbers). plan: the steps' `FromBlockPlan`, used when `data` holds its hidden
    states (fewer blocks; the same factors). base_params: as placed for the steps."""
    data = without_fail_factors(data)
    if data.n_fail == 0:
        return data
    fn = plan.apply if plan is not None and data.block_input_of == plan.last else apply_fn
    rows = {k: v for k, v in data.fail.items() if k != BLOCK_INPUT or fn is not apply_fn}
    parts = []
    for a in range(0, data.n_fail, chunk):
        got = _row_factors(base_params, pad_rows(slice_rows(rows, a, a + chunk), chunk), apply_fn=fn, spec=spec)
        parts.append(parallel.fetch(got))
    n = data.n_fail
    fail = dict(data.fail)
    for path, ku, kd in _factor_keys(spec):
        fail[ku] = np.concatenate([np.asarray(p[path].u, np.float32) for p in parts])[:n]
        fail[kd] = np.concatenate([np.asarray(p[path].delta, np.float32) for p in parts])[:n]
    return dataclasses.replace(data, fail=fail, factors_of=tuple(w.path for w in spec.weights))


# The base model's logits at the pass rows' target tokens (the KL's targets) are the same at every
# step, too: with the flat head the step can read them from PASS_LOGITS [N_pass, Kp, V] (Kp = the
# most target tokens of any pass row), kept in the split's pass rows, instead of a base pass over
# its pass rows (4 rows per group in the main job). Memory: N_pass x Kp x V x 4 bytes (capitals:
# 45 rows; zsRE's 360 rows x 8 x 49,152 x 4 = 566 MB), up to PASS_LOGITS_CACHE_BYTES.

PASS_LOGITS = "pass_base_logits"
PASS_LOGITS_CACHE_BYTES = 1 << 30


def _pass_targets(data: EditData) -> int:
    return max(1, int(_row_targets(data.passes).max(initial=0)))


def pass_logits_bytes(model, data: EditData) -> int:
    """Bytes (float32) of PASS_LOGITS for `data`: N_pass x Kp x vocabulary x 4."""
    if data.n_pass == 0:
        return 0
    one = {k: v[:1] for k, v in data.passes.items() if k not in (BLOCK_INPUT, PASS_LOGITS)}
    vocab = jax.eval_shape(lambda b: scored_logits(model.apply, model.params, b)[0], one).shape[-1]
    return data.n_pass * _pass_targets(data) * int(vocab) * 4


@functools.partial(jax.jit, static_argnames=("apply_fn", "kp"))
def _row_pass_logits(base_params, rows, *, apply_fn, kp):
    return scored_logits(apply_fn, base_params, rows)[0][:, :kp]


def with_pass_logits(apply_fn, base_params, data: EditData, plan: FromBlockPlan | None = None, chunk: int = 32) -> EditData:
    """`data` with PASS_LOGITS [N_pass, Kp, V] (float32 numpy) in its pass rows: entry [r, j] the
    base model's logits at row r's j-th target token (`score_pos` lists a row's targets first, in
    order), zeros past its last. Computed now, `chunk` rows per call; plan as `with_fail_factors`.
    Only the flat-head step reads them (`train_batch(..., flat=...)`)."""
    passes = {k: v for k, v in data.passes.items() if k != PASS_LOGITS}
    if data.n_pass == 0:
        return dataclasses.replace(data, passes=passes)
    fn = plan.apply if plan is not None and data.block_input_of == plan.last else apply_fn
    rows = {k: v for k, v in passes.items() if k != BLOCK_INPUT or fn is not apply_fn}
    kp = _pass_targets(data)
    if SCORE_POS not in rows or rows[SCORE_POS].shape[-1] < kp:
        raise ValueError("with_pass_logits: the pass rows need score positions (prepare_splits adds them)")
    parts = [np.asarray(parallel.fetch(_row_pass_logits(base_params, pad_rows(slice_rows(rows, a, a + chunk), chunk),
                                                        apply_fn=fn, kp=kp)), np.float32)
             for a in range(0, data.n_pass, chunk)]
    got = np.concatenate(parts)[: data.n_pass]
    got *= (np.arange(kp)[None, :] < _row_targets(data.passes)[:, None])[..., None]
    return dataclasses.replace(data, passes={**passes, PASS_LOGITS: got})


def _kept_factors(spec: EditorSpec, fail: dict) -> dict | None:
    """The batch's kept factors as `group_factors` returns them ({path: Factors [G, k, S, ...]}),
    or None when the fail rows hold none."""
    keys = _factor_keys(spec)
    if not all(ku in fail for _, ku, _ in keys):
        if any(k.startswith(FACTOR) for k in fail):
            raise ValueError(f"the batch's fail rows hold factors of other weights than {[w.path for w in spec.weights]}")
        return None
    return {path: Factors(fail[ku], fail[kd]) for path, ku, kd in keys}


# ---------------------------------------------------------------------------- the step


# optax.adam's defaults (`_inner_optimizer` passes them on); `_fused_inner_update` repeats its arithmetic
ADAM_B1, ADAM_B2, ADAM_EPS, ADAM_EPS_ROOT = 0.9, 0.999, 1e-8, 0.0


def _inner_optimizer(cfg: TrainConfig, editor_params: dict) -> optax.GradientTransformation:
    """Clip, then Adam(lr) on the editor network and Adam(lr_lr) on the edit learning rates."""
    adam = dict(b1=ADAM_B1, b2=ADAM_B2, eps=ADAM_EPS, eps_root=ADAM_EPS_ROOT)
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.partition({"net": optax.adam(cfg.lr, **adam), "lr": optax.adam(cfg.lr_lr, **adam)}, param_labels(editor_params)),
    )


def make_optimizer(cfg: TrainConfig, editor_params: dict) -> optax.GradientTransformation:
    """Clip, then Adam(lr) on the editor network and Adam(lr_lr) on the edit learning rates,
    accumulated over `cfg.accum_steps` steps (`optax.MultiSteps`, gradient mean). Its state is
    the train state's `opt_state`; the step updates it with `optimizer_update`, which gives
    what `update` + `optax.apply_updates` give, faster."""
    return optax.MultiSteps(_inner_optimizer(cfg, editor_params), every_k_schedule=cfg.accum_steps)


def _fused_inner_update(cfg: TrainConfig, params: dict, grads: dict, inner_state,
                        clip_factor: bool = False) -> tuple[dict, Any, jax.Array]:
    """`(new params, new inner state, sum of squares of the new params)`: `_inner_optimizer(cfg,
    params).update(grads, inner_state, params)` + `optax.apply_updates`, written out leaf by leaf
    with optax's arithmetic (scale_by_adam's moments and bias correction, scale_by_learning_rate,
    apply_updates: the same operations in the same order), and the new params' squared norm from
    the leaves it writes (the step's finiteness check).

    clip_factor: the clipped gradient as `g * factor` with one scalar (`1` below the clip, `clip /
    norm` above it) instead of optax's `select(norm < clip, g, (g / norm) * clip)`. XLA on CPU
    writes optax's divided gradient out once per leaf (it does not repeat a division in both
    moments' loops): a pass more over the 32M editor parameters; with the factor the update took
    0.113 s instead of 0.240 s (1.56 instead of 2.08 GB of XLA's bytes accessed) in session 16,
    the step 1.09x faster. Bit-equal below the clip, an ulp of an entry above it - and the main job
    clips in its first steps, so over 300 steps its validation loss moved by 0.5% and the keep
    set's drawdown from 0.050 to 0.054: off by default (README "Session 16: the editor's step and
    setup"). Without it the update is bit-equal to optax's (and as fast: the same XLA program
    shape)."""
    clip_state, part = inner_state
    g_norm = optax.tree.norm(grads)
    max_norm = cfg.grad_clip
    trigger = jnp.squeeze(g_norm < max_norm)
    factor = jnp.where(trigger, 1.0, max_norm / g_norm)
    p_leaves, treedef = jax.tree.flatten(params)
    g_leaves = treedef.flatten_up_to(grads)
    labels = treedef.flatten_up_to(param_labels(params))
    out = list(p_leaves)
    squares = []
    states = {}
    for label, lr in (("net", cfg.lr), ("lr", cfg.lr_lr)):
        masked = part.inner_states[label]
        adam, rest = masked.inner_state
        count_inc = optax.safe_increment(adam.count)
        bc1, bc2 = 1 - ADAM_B1 ** count_inc, 1 - ADAM_B2 ** count_inc
        step_size = -1 * lr
        mu, nu = treedef.flatten_up_to(adam.mu), treedef.flatten_up_to(adam.nu)
        for i, lab in enumerate(labels):
            if lab != label:
                continue
            p, g, m, v = p_leaves[i], g_leaves[i], mu[i], nu[i]
            if clip_factor:
                t = g * factor.astype(g.dtype)
            else:  # optax.clip_by_global_norm's arithmetic
                t = jax.lax.select(trigger, g, (g / g_norm.astype(g.dtype)) * max_norm)
            m2 = (1 - ADAM_B1) * (t ** 1) + ADAM_B1 * m
            v2 = (1 - ADAM_B2) * (t ** 2) + ADAM_B2 * v
            u = (m2 / bc1.astype(m2.dtype)) / (jnp.sqrt(v2 / bc2.astype(v2.dtype) + ADAM_EPS_ROOT) + ADAM_EPS)
            out[i] = jnp.asarray(p + step_size * u).astype(p.dtype)
            mu[i], nu[i] = m2.astype(m.dtype), v2.astype(v.dtype)
            squares.append(jnp.sum(jnp.square(out[i])))
        states[label] = masked._replace(inner_state=(adam._replace(count=count_inc, mu=treedef.unflatten(mu),
                                                                   nu=treedef.unflatten(nu)), rest))
    return treedef.unflatten(out), (clip_state, part._replace(inner_states=states)), sum(squares)


def optimizer_update(cfg: TrainConfig, params: dict, grads: dict, opt_state: optax.MultiStepsState,
                     with_norm: bool = False, fused: bool = False, clip_factor: bool = False):
    """`(new params, new opt_state)`: the same as `make_optimizer(cfg, params).update(grads,
    opt_state, params)` followed by `optax.apply_updates`, in fewer passes over the editor.

    Why: `optax.MultiSteps` runs the inner clip + Adam at *every* step and discards the result
    with `jnp.where` on the steps that only accumulate, then adds zero updates to the params -
    about 3x the memory traffic of one Adam update over SmolLM2's 32M editor parameters, ~20%
    of the editor step. Here the inner update runs inside a `lax.cond` only when one is due,
    and with `accum_steps == 1` there is no accumulator arithmetic at all. The state keeps
    `MultiStepsState`'s structure and values (checkpoints are unchanged; accumulator kept at
    zero between updates, as MultiSteps does for finite gradients).

    fused: the inner update by `_fused_inner_update` (optax's arithmetic leaf by leaf; with
    `clip_factor` the clip as one scalar factor, bit-equal below the clip, within float rounding
    above it) instead of optax's transformations (the step's path). with_norm: also return the new params' global norm
    (`optax.tree.norm`'s value up to float summation order; with `fused`, from the leaves the
    update writes; on a step that only accumulates, the unchanged params' norm is not needed by
    the step's finiteness check - the previous step checked them - and 0 is returned)."""
    inner = _inner_optimizer(cfg, params)
    k = int(cfg.accum_steps)

    def update(acc):
        if fused:
            new_params, inner_state, sq = _fused_inner_update(cfg, params, acc, opt_state.inner_opt_state, clip_factor)
            return new_params, inner_state, jnp.sqrt(sq)
        upd, inner_state = inner.update(acc, opt_state.inner_opt_state, params)
        new_params = optax.apply_updates(params, upd)
        return new_params, inner_state, optax.tree.norm(new_params) if with_norm else jnp.zeros((), jnp.float32)

    if k == 1:  # MultiSteps: acc = 0 + (g - 0) / 1 = g, always emitted, accumulator back to 0
        new_params, inner_state, norm = update(grads)
        new_state = opt_state._replace(gradient_step=optax.safe_increment(opt_state.gradient_step), inner_opt_state=inner_state)
        return (new_params, new_state, norm) if with_norm else (new_params, new_state)
    n = opt_state.mini_step
    acc = jax.tree.map(lambda g, a: a + (g - a) / (n + 1), grads, opt_state.acc_grads)  # MultiSteps' running mean
    emit = n == k - 1

    def do(acc):
        new_params, inner_state, norm = update(acc)
        return new_params, inner_state, jax.tree.map(jnp.zeros_like, acc), norm

    def skip(acc):
        return params, opt_state.inner_opt_state, acc, jnp.zeros((), jnp.float32)

    new_params, inner_state, acc, norm = jax.lax.cond(emit, do, skip, acc)
    new_state = opt_state._replace(
        mini_step=optax.safe_increment(n) % k,
        gradient_step=jnp.where(emit, optax.safe_increment(opt_state.gradient_step), opt_state.gradient_step),
        inner_opt_state=inner_state,
        acc_grads=acc,
    )
    return (new_params, new_state, norm) if with_norm else (new_params, new_state)


def init_train_state(spec: EditorSpec, cfg: TrainConfig) -> dict:
    """{"params", "opt_state", "norm", "step", "rng"}: the complete state of a run.

    The step itself is deterministic (no dropout) and the data order comes from (seed, step),
    so `rng` is only carried and checkpointed, for extensions that need randomness per step
    (`jax.random.fold_in(state["rng"], state["step"])`)."""
    rng = jax.random.PRNGKey(cfg.seed)
    init_key, rng = jax.random.split(rng)
    params, norm = init_editor(spec, init_key)
    opt_state = make_optimizer(cfg, params).init(params)
    return {"params": params, "opt_state": opt_state, "norm": norm, "step": jnp.zeros((), jnp.int32), "rng": rng}


def _group_outputs(apply_fn, spec, cfg, editor_params, norm, base_params, factors, edit_b, pass_b, base_pass_logits,
                   projections=None):
    """Loss and per-row results of one group (vmapped over groups). Logits are taken at the
    scored positions only when the batch has `score_pos` (base_pass_logits likewise).
    projections: the edited kernels' null-space projectors (`editor.pseudo_grads`) or None."""
    new = edited_params(spec, editor_params, norm, base_params, factors, projections)
    # one forward pass over the edit and the pass rows: the edited model's weights are read once
    # (a step is memory-bound at these few tokens), not once per set of rows
    (logits, pass_logits), (labels, pass_labels), (mask, pass_mask) = _apply_rows(apply_fn, new, edit_b, pass_b)
    nll = batch_nll(logits, labels, mask)
    kl = kl_divergence(base_pass_logits, pass_logits, pass_mask)
    loss = cfg.c_fail * nll + cfg.c_loc * kl
    out = {
        "loss": loss,
        "nll": nll,
        "kl": kl,
        "edit_correct": example_correct(logits, labels, mask),
        "pass_correct": example_correct(pass_logits, pass_labels, pass_mask),
        "base_pass_correct": example_correct(base_pass_logits, pass_labels, pass_mask),
        **_pass_unchanged(jnp.argmax(pass_logits, -1) == jnp.argmax(base_pass_logits, -1), pass_mask),
    }
    return loss, out


def _pass_unchanged(same, mask):
    """Locality's parts per pass row [P] (salem_jax.eval.metrics.locality): target tokens whose argmax
    is the same before and after the edit, and target tokens. same, mask: [P, S]."""
    m = mask.astype(jnp.float32)
    return {"pass_unchanged": (same.astype(jnp.float32) * m).sum(-1), "pass_tokens": m.sum(-1)}


def _apply_rows(apply_fn, params, *batches):
    """`scored_logits` of several row sets with the same parameters in one forward pass:
    ((logits of each set), (labels of each), (masks of each)). Rows are independent, so this is
    the same as one call per set."""
    sizes = [int(b["input_ids"].shape[0]) for b in batches]
    keys = set(batches[0])
    if any(set(b) != keys for b in batches):
        raise ValueError(f"row sets with different fields: {[sorted(b) for b in batches]}")
    joint = {k: jnp.concatenate([b[k] for b in batches], axis=0) for k in keys}
    outs = scored_logits(apply_fn, params, joint)
    cuts = np.cumsum(sizes)[:-1]
    return tuple(tuple(jnp.split(x, cuts, axis=0)) for x in outs)


def capture_factors(apply_fn, params, batch, weights):
    """`capture(...)[1]` with the head applied at the scored positions only (the same factors:
    positions with label_mask 0 get no gradient either way)."""
    if "score_pos" not in batch:
        return capture(apply_fn, params, batch, weights)[1]

    def loss(logits, b):
        labels, mask = scored_labels(b)
        return example_nll(logits, labels, mask).sum()

    return capture(lambda p, b: scored_logits(apply_fn, p, b)[0], params, batch, weights, loss)[1]


def _base_logits(apply_fn, base_params, batches):
    """Base-model logits at the scored positions of every group's rows [G, rows, K, V]."""
    return jax.vmap(lambda b: scored_logits(apply_fn, base_params, b)[0])(batches)


def group_factors(apply_fn, spec, base_params, fail):
    """The rank-1 gradient factors of every editor weight for each group of fail rows (leaves
    [G, rows, ...], as the training batch holds them): `capture_factors` vmapped over groups."""
    return jax.vmap(lambda b: capture_factors(apply_fn, base_params, b, spec.weights))(fail)


def _step(state, base_params, batch, projections=None, *, apply_fn, spec, cfg, plan=None, clip_factor=False):
    """The whole training step on the global batch (leaves [G, ...]); `train_step` jits it over
    a mesh and XLA's partitioner splits the work (groups over "data", weights as placed).

    projections: {weight path: P [in, in]} null-space projectors every edit goes through
    (TrainConfig.null_energy; `editor.pseudo_grads`), or None: no projection.

    plan: a `FromBlockPlan` (decoder-only models): every pass below starts at the first edited
    block, on the base model's hidden state there (`_with_block_inputs`); None: all blocks."""
    batch, apply_fn = _with_block_inputs(plan, apply_fn, base_params, batch)
    factors = _kept_factors(spec, batch["fail"])  # `with_fail_factors`
    if factors is None:
        factors = group_factors(apply_fn, spec, base_params, batch["fail"])
    norm = update_norm_state(spec, state["norm"], factors)
    if PASS_LOGITS in batch["pass"] and FLAT not in batch:
        raise ValueError("pass rows with kept base logits (with_pass_logits) need the flat-head batch: train_batch(..., flat=...)")
    if FLAT in batch:  # the head on the target tokens only (`with_flat_train`)
        base_pass = _flat_base_pass(apply_fn, base_params, batch)
        group = jax.vmap(
            lambda p, f, e, q, bl, fl: _flat_group_outputs(apply_fn, spec, cfg, p, norm, base_params, f, e, q, bl, fl,
                                                           projections),
            in_axes=(None, 0, 0, 0, 0, 0),
        )
        extra = (batch[FLAT],)
    else:
        base_pass = _base_logits(apply_fn, base_params, batch["pass"])
        group = jax.vmap(
            lambda p, f, e, q, bl: _group_outputs(apply_fn, spec, cfg, p, norm, base_params, f, e, q, bl, projections),
            in_axes=(None, 0, 0, 0, 0),
        )
        extra = ()

    def loss_fn(p):
        losses, out = group(p, factors, batch["edit"], batch["pass"], base_pass, *extra)
        w = batch["weight"]
        return (losses * w).sum() / jnp.maximum(w.sum(), 1.0), out

    (_, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    # the fused update (one pass fewer over the editor's 32M parameters) also gives the new params'
    # norm for the finiteness check below, from the leaves it writes
    params, opt_state, params_norm = optimizer_update(cfg, state["params"], grads, state["opt_state"], with_norm=True, fused=True,
                                                     clip_factor=clip_factor)
    new_state = {"params": params, "opt_state": opt_state, "norm": norm, "step": state["step"] + 1, "rng": state["rng"]}
    n_rows = jnp.maximum((batch["edit"]["label_mask"].sum(-1) > 0).sum(-1), 1)
    per_group = {
        "loss": out["loss"],
        "nll": out["nll"],
        "kl": out["kl"],
        "edit_acc": out["edit_correct"].astype(jnp.float32).sum(-1) / n_rows,
        "drawdown": (out["base_pass_correct"].astype(jnp.float32) - out["pass_correct"]).mean(-1),
    }
    metrics = {k: v.mean() for k, v in per_group.items()}  # means over all groups
    metrics["grad_norm"] = optax.tree.norm(grads)
    # one flag for the loop to check when it reads the metrics anyway (no extra host round trip);
    # a non-finite edited weight shows up as a non-finite loss
    metrics["finite"] = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"]) & jnp.isfinite(params_norm)
    return new_state, metrics


# ---------------------------------------------------------------------------- validation, head on the targets
#
# A validation group's edit rows (fail + rephrasings) and pass rows are scored at K positions each
# (`with_score_positions`: K = the most target tokens of any row of the edit set, 8 on SmolLM2's
# capitals), though most rows have 1-3 target tokens: the LM head (57 MFLOP per position on
# SmolLM2) ran at 4 x 8 positions per group where ~8 are targets - a third of the edited side of a
# validation at layers.26. `evaluate(flat_head=True)` (decoder-only models) hands each group the
# (row, position) pairs of its targets (`FLAT`: rows / pos / valid [G, T], rows numbered over the
# group's edit rows then its pass rows, T = the most targets of any group) and the validation runs
# the head on those only (`scored_logits.flat_scored_logits`); the same numbers as the [rows, K]
# path, float summation order aside (tests/test_mend_flat_eval.py).

FLAT = "flat"


def flat_targets(batches: Sequence[dict]) -> list[dict]:
    """`batches` (numpy `val_batches`) with FLAT added: each group's target (row, position) pairs
    over its edit rows then its pass rows, [G, T] each, T the same for every batch (one compile)."""
    masks = [np.concatenate([b["edit"]["label_mask"], b["pass"]["label_mask"]], axis=1) != 0 for b in batches]
    t = max(1, max(int(m.sum((1, 2)).max()) for m in masks))
    out = []
    for b, m in zip(batches, masks):
        flats = [flat_positions(g, t) for g in m]
        out.append({**b, FLAT: {k: np.stack([f[k] for f in flats]) for k in flats[0]}})
    return out


# The training step takes the same path (`train_batch(..., flat=...)`, `train_editor(flat_head=
# True)`): its edited forward pass scores every target token of a group's edit and pass rows, its
# base pass only the pass rows' (FLAT_PASS, the KL's targets). A training batch is drawn at random,
# so its T is bounded for the whole run at once, on the host (`flat_train_sizes`: the most target
# tokens of any group of any step, a pure function of the split, the config and the step count).
# On SmolLM2's capitals (1 fail + 2 rephrasings + 4 pass rows per group) XLA's cost model puts the
# step at layers.26 at 37.9 GFLOP against 47.1 (`benchmarks/train_step_head.py`).

FLAT_PASS = "flat_pass"


def _row_targets(enc: dict) -> np.ndarray:
    """[N] the number of target tokens of each row (0 for a split without rows)."""
    return (np.asarray(enc["label_mask"]) != 0).sum(-1) if enc else np.zeros(0, np.int64)


def flat_step_counts(data: EditData, cfg: TrainConfig, steps: int) -> np.ndarray:
    """[steps, 2]: per training step 0..steps-1, the most target tokens of any of its groups' edit
    rows (fail + rephrasings) and of any of its groups' pass rows, each at least 1 (`train_batch`'s
    groups, rebuilt from (seed, step) as index arrays only: no rows are gathered)."""
    nf, na, npass = _row_targets(data.fail), _row_targets(data.adapt), _row_targets(data.passes)
    take = lambda counts, idx: np.where(idx >= 0, counts[np.maximum(idx, 0)] if len(counts) else 0, 0)  # noqa: E731
    out = np.ones((steps, 2), np.int64)
    for step in range(steps):
        edits, adapts, passes, _ = _train_indices(data, cfg, step)
        g = edits.shape[0]
        out[step, 0] = max(1, int((take(nf, edits).sum(-1) + take(na, adapts).reshape(g, -1).sum(-1)).max()))
        out[step, 1] = max(1, int(take(npass, passes).sum(-1).max()))
    return out


def flat_train_sizes(data: EditData, cfg: TrainConfig, steps: int) -> tuple[int, int]:
    """(T_edit, T_pass): the most target tokens of any group's edit rows (fail + rephrasings) and
    of any group's pass rows over training steps 0..steps-1 (`flat_step_counts`' maxima), each at
    least 1. The step's FLAT shapes when they are static for the run: a resumed run computes the
    same sizes."""
    counts = flat_step_counts(data, cfg, steps)
    return (int(counts[:, 0].max(initial=1)), int(counts[:, 1].max(initial=1)))


# The run-wide bound pads every step's FLAT to the most targets of any step: on the capitals train
# split (answers of 1-13 tokens) that is 39 edit-row and 16 pass-row targets, where most groups
# have far fewer, and the LM head (57 MFLOP per position on SmolLM2, forward and backward) and the
# KL's log-softmax over 49,152 words ran at every padded pair. `flat_step_sizes` gives each step
# its own sizes, rounded up to one of two levels per side - the run's maximum, or the smallest
# EDIT_BUCKETS length that holds `share` of the steps - so the run compiles at most 4 programs
# per padded length instead of 1 (padded pairs carry weight 0: the same numbers, float summation
# order aside).

def flat_step_sizes(data: EditData, cfg: TrainConfig, steps: int, share: float = 0.9) -> np.ndarray:
    """[steps, 2] per step (T_edit, T_pass) for `train_batch(..., flat=...)`: each side the small
    level (the smallest EDIT_BUCKETS length >= the `share` quantile of the steps' counts, at most
    the maximum) when the step's count fits it, else the run's maximum (`flat_train_sizes`).
    A pure function of the split, cfg and `steps`: a resumed run computes the same sizes."""
    counts = flat_step_counts(data, cfg, steps)
    out = counts.copy()
    for side in (0, 1):
        c = counts[:, side]
        top = int(c.max(initial=1))
        q = int(np.ceil(np.quantile(c, share))) if len(c) else top
        small = min(top, next((b for b in EDIT_BUCKETS if b >= q), top))
        out[:, side] = np.where(c <= small, small, top)
    return out


def with_flat_train(batch: dict, t_edit: int, t_pass: int) -> dict:
    """A numpy training batch with FLAT [G, t_edit + t_pass] - each group's edit-row target pairs
    (padded to t_edit) then its pass-row pairs (rows numbered after the edit rows, padded to
    t_pass with weight-0 entries on the first pass row) - and FLAT_PASS [G, t_pass]: the same
    pass pairs numbered within the pass rows, with "slot": which target of its row each pair is
    (0, 1, ...: the index into PASS_LOGITS). An error if a group has more targets than that."""
    n_edit = batch["edit"]["label_mask"].shape[1]
    flats, passes = [], []
    for em, pm in zip(np.asarray(batch["edit"]["label_mask"]), np.asarray(batch["pass"]["label_mask"])):
        fe, fp = flat_positions(em, t_edit), flat_positions(pm, t_pass)
        n = int(fp["valid"].sum())
        first = np.searchsorted(fp["rows"][:n], fp["rows"][:n], side="left")  # pairs are in row-major order
        fp["slot"] = np.zeros(t_pass, np.int32)
        fp["slot"][:n] = np.arange(n) - first
        passes.append(fp)
        flats.append({"rows": np.concatenate([fe["rows"], fp["rows"] + n_edit]).astype(np.int32),
                      "pos": np.concatenate([fe["pos"], fp["pos"]]), "valid": np.concatenate([fe["valid"], fp["valid"]])})
    stack = lambda fs: {k: np.stack([f[k] for f in fs]) for k in fs[0]}  # noqa: E731
    return {**batch, FLAT: stack(flats), FLAT_PASS: stack(passes)}


def _flat_base_pass(apply_fn, base_params, batch) -> jax.Array:
    """The base model's logits [G, t_edit + t_pass, V] at a training batch's FLAT pairs: zeros at
    the edit pairs (the loss reads base logits at pass rows only), the pass rows' logits at
    FLAT_PASS after them - read from the kept PASS_LOGITS (`with_pass_logits`) or from one base
    pass over the pass rows, the head at their targets."""
    if PASS_LOGITS in batch["pass"]:
        base = jax.vmap(lambda q, f: q[PASS_LOGITS][f["rows"], f["slot"]])(batch["pass"], batch[FLAT_PASS])
    else:
        base = jax.vmap(lambda q, f: flat_scored_logits(apply_fn, base_params, q, f["rows"], f["pos"]))(
            batch["pass"], batch[FLAT_PASS])
    g, t, t_pass = batch[FLAT]["rows"].shape + (base.shape[1],)
    return jnp.concatenate([jnp.zeros((g, t - t_pass) + base.shape[2:], base.dtype), base], axis=1)


def _joint_rows(edit_b: dict, pass_b: dict) -> dict:
    """A group's edit rows then its pass rows as one row set (the numbering of FLAT's rows)."""
    return {k: jnp.concatenate([edit_b[k], pass_b[k]], axis=0) for k in edit_b}


def _flat_row_scores(logits, labels, flat, n_rows: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-row (summed NLL, correct target tokens, target tokens) [n_rows] from logits [T, V] at
    FLAT's pairs."""
    rows, valid = flat["rows"], flat["valid"]

    def per_row(x):
        return jax.ops.segment_sum(x * valid, rows, num_segments=n_rows)

    ok = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    return per_row(-token_logprobs(logits, labels)), per_row(ok), per_row(jnp.ones_like(valid))


def _flat_base(apply_fn, base_params, edit_b, pass_b, flat):
    """The base model's logits at one group's FLAT pairs [T, V] and its edit rows' correctness [rows]."""
    joint = _joint_rows(edit_b, pass_b)
    logits = flat_scored_logits(apply_fn, base_params, joint, flat["rows"], flat["pos"])
    labels = joint["labels"][flat["rows"], flat["pos"]]
    n_edit = edit_b["label_mask"].shape[0]
    _, ok, n = _flat_row_scores(logits, labels, flat, joint["label_mask"].shape[0])
    return logits, ((ok == n) & (n > 0))[:n_edit]


def _flat_group_outputs(apply_fn, spec, cfg, editor_params, norm, base_params, factors, edit_b, pass_b, base_logits, flat,
                        projections=None):
    """`_group_outputs` (validation's per-group loss and results) with the head at FLAT's pairs:
    base_logits [T, V] from `_flat_base`. The same numbers: nll = mean over edit rows with targets
    of their mean target NLL, kl = MEND's KL averaged over the pass rows' target tokens."""
    new = edited_params(spec, editor_params, norm, base_params, factors, projections)
    joint = _joint_rows(edit_b, pass_b)
    rows, valid = flat["rows"], flat["valid"]
    n_edit, n_rows = edit_b["label_mask"].shape[0], joint["label_mask"].shape[0]
    logits = flat_scored_logits(apply_fn, new, joint, rows, flat["pos"])
    labels = joint["labels"][rows, flat["pos"]]
    nll_sum, ok, n = _flat_row_scores(logits, labels, flat, n_rows)
    has = (n[:n_edit] > 0).astype(jnp.float32)
    nll = (nll_sum[:n_edit] / jnp.maximum(n[:n_edit], 1.0) * has).sum() / jnp.maximum(has.sum(), 1.0)
    p_log = jax.nn.log_softmax(base_logits.astype(jnp.float32), -1)
    q_log = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
    on_pass = valid * (rows >= n_edit)
    kl = ((jnp.exp(p_log) * (p_log - q_log)).sum(-1) * on_pass).sum() / jnp.maximum(on_pass.sum(), 1.0)
    _, base_ok, _ = _flat_row_scores(base_logits, labels, flat, n_rows)
    correct, base_correct = (ok == n) & (n > 0), (base_ok == n) & (n > 0)
    same = (jnp.argmax(logits, -1) == jnp.argmax(base_logits, -1)).astype(jnp.float32)
    unchanged = jax.ops.segment_sum(same * valid, rows, num_segments=n_rows)
    loss = cfg.c_fail * nll + cfg.c_loc * kl
    return loss, {"loss": loss, "nll": nll, "kl": kl, "edit_correct": correct[:n_edit], "pass_correct": correct[n_edit:],
                  "base_pass_correct": base_correct[n_edit:], "pass_unchanged": unchanged[n_edit:],
                  "pass_tokens": n[n_edit:]}


def _eval_base(base_params, batch, *, apply_fn, spec, plan=None):
    """The base model's side of an evaluation - the same for every editor, so a caller that
    validates repeatedly on the same rows computes it once (`evaluate`'s `base_cache`):
    {"factors": the fail rows' capture factors [G, ...], "base_pass": base logits of the pass
    rows at their scored positions [G, P, K, V] (with FLAT in the batch: of every target token of
    the edit and pass rows, [G, T, V]), "edit_before": the base model's correctness on the edit
    rows [G, rows]}."""
    batch, apply_fn = _with_block_inputs(plan, apply_fn, base_params, batch)
    factors = group_factors(apply_fn, spec, base_params, batch["fail"])
    if FLAT in batch:
        base_logits, before = jax.vmap(lambda e, q, f: _flat_base(apply_fn, base_params, e, q, f))(
            batch["edit"], batch["pass"], batch[FLAT])
        return {"factors": factors, "base_pass": base_logits, "edit_before": before}
    (base_edit, base_pass), _, _ = jax.vmap(lambda e, q: _apply_rows(apply_fn, base_params, e, q))(batch["edit"], batch["pass"])
    edit_labels, edit_mask = jax.vmap(scored_labels)(batch["edit"])
    return {"factors": factors, "base_pass": base_pass, "edit_before": example_correct(base_edit, edit_labels, edit_mask)}


def _eval_edited(editor_params, norm, base_params, batch, base_side, projections=None, *, apply_fn, spec, cfg, plan=None):
    """Edit every group with the editor (through `projections` when given) and score it, given
    `_eval_base`'s outputs."""
    batch, apply_fn = _with_block_inputs(plan, apply_fn, base_params, batch)
    if FLAT in batch:
        _, out = jax.vmap(
            lambda f, e, q, bl, fl: _flat_group_outputs(apply_fn, spec, cfg, editor_params, norm, base_params, f, e, q, bl, fl,
                                                        projections)
        )(base_side["factors"], batch["edit"], batch["pass"], base_side["base_pass"], batch[FLAT])
    else:
        _, out = jax.vmap(
            lambda f, e, q, bl: _group_outputs(apply_fn, spec, cfg, editor_params, norm, base_params, f, e, q, bl,
                                               projections)
        )(base_side["factors"], batch["edit"], batch["pass"], base_side["base_pass"])
    em = batch["edit"]["label_mask"]
    return {
        "loss": out["loss"],
        "nll": out["nll"],
        "kl": out["kl"],
        "edit_correct": out["edit_correct"],
        "edit_before": base_side["edit_before"],
        "edit_valid": em.sum(-1) > 0,
        "pass_correct": out["pass_correct"],
        "base_pass_correct": out["base_pass_correct"],
        "pass_valid": batch["pass"]["label_mask"].sum(-1) > 0,
        # locality's parts per pass row [G, P]: target tokens with the base model's argmax, target tokens
        "pass_unchanged": out["pass_unchanged"],
        "pass_tokens": out["pass_tokens"],
    }


def _eval(editor_params, norm, base_params, batch, projections=None, *, apply_fn, spec, cfg, plan=None):
    base_side = _eval_base(base_params, batch, apply_fn=apply_fn, spec=spec, plan=plan)
    return _eval_edited(editor_params, norm, base_params, batch, base_side, projections, apply_fn=apply_fn, spec=spec,
                        cfg=cfg, plan=plan)


def _state_specs(state, mesh):
    """Where the train state lives on a `(data, model)` mesh: the optimizer state (Adam's two
    moments and `MultiSteps`' gradient accumulator, 3x the editor's size) split over all
    devices like FSDP weights (`sharding.fsdp_spec`: ZeRO stage 1), and the editor's params
    split the same way (they are gathered with `parallel.fetch`, which every host of a pod can
    call); norm statistics, step and rng replicated. A function of shapes only: the
    step's output gets the placement of its donated input, and compiles once."""

    def split(x):
        # spelled as jit spells its outputs (no trailing Nones, replicated = P()), else the
        # donated state's placement would differ from the step's output and compile again
        spec = list(sharding.fsdp_spec(np.shape(x), mesh))
        while spec and spec[-1] is None:
            spec.pop()
        return P(*spec)

    specs = jax.tree.map(lambda _: P(), state)
    if isinstance(state, dict) and "opt_state" in state:
        specs["opt_state"] = jax.tree.map(split, state["opt_state"])
        specs["params"] = jax.tree.map(split, state["params"])
    return specs


def _constrain(tree, mesh, specs):
    return jax.tree.map(lambda x, s: jax.lax.with_sharding_constraint(x, NamedSharding(mesh, s)), tree, specs)


def _split_editor(editor_params, mesh):
    """The editor's params split over all devices for the evaluation step (`sharding.fsdp_spec`;
    a replicated input costs no communication: each device keeps its slice; the train step's
    params are already placed so by `place_state`). XLA then computes the editor network
    tensor-parallel - with replicated params every device would build the full gradient of
    every editor weight for its own groups, and hold all of them at once."""
    return _constrain(editor_params, mesh, jax.tree.map(lambda x: sharding.fsdp_spec(np.shape(x), mesh), editor_params))


def _batch_specs(batch):
    return jax.tree.map(lambda x: P(sharding.DATA), batch)


@functools.partial(jax.jit, static_argnames=("apply_fn", "spec", "cfg", "mesh", "from_block", "clip_factor"), donate_argnums=(0,))
def train_step(state, base_params, batch, projections=None, *, apply_fn, spec: EditorSpec, cfg: TrainConfig, mesh,
               from_block: "FromBlockPlan | None" = None, clip_factor: bool = False):
    """The editor's training step: `(state, base_params, batch) -> (state, metrics)`.

    One jitted function for every device layout: a 1-CPU run, data parallel (an `(n, 1)` mesh,
    `sharding.make_mesh()`), FSDP and tensor-parallel base weights (`make_mesh(data, model)`).
    Written for the global batch; the placements are explicit - the batch's groups over "data",
    the state's output as `place_state` places its input (so the donated state keeps one
    placement and the step compiles once), metrics replicated - and XLA's partitioner gathers
    each weight where it is used.

    state: `place_state(init_train_state(...), mesh)`, donated. base_params:
    `place_base_params(model, params, mesh)`, never modified. batch: `train_batch(...)` placed
    with `sharding.shard_batch` (or `parallel.host_local_batch` on a pod).
    metrics: replicated scalars: loss, nll, kl, edit_acc, drawdown (means over the step's
    groups) and grad_norm. jit caches on (apply_fn, spec, cfg, mesh, from_block) and the input
    placements.

    from_block: `from_block_plan(model, spec, data)` on decoder-only models (the same numbers,
    fewer blocks run: see `FromBlockPlan`); None runs every block (`train_editor` and `evaluate`
    choose for themselves).

    clip_factor: the gradient clip as one scalar factor (`_fused_inner_update`; faster, the same
    numbers up to float rounding when the gradient is clipped); off: optax's arithmetic, bit-equal.

    projections: None (no projection: the step as it always was), or {weight path: P [in, in]}
    (`train_editor` places them replicated): every edit of the step is W - lr_W * P G~
    (TrainConfig.null_energy). An input array, not a constant: one compiled step for any P of
    those shapes."""
    batch = _constrain(batch, mesh, _batch_specs(batch))
    new_state, metrics = _step(state, base_params, batch, projections, apply_fn=apply_fn, spec=spec, cfg=cfg,
                               plan=from_block, clip_factor=clip_factor)
    return _constrain(new_state, mesh, _state_specs(new_state, mesh)), _constrain(metrics, mesh, jax.tree.map(lambda _: P(), metrics))


@functools.partial(jax.jit, static_argnames=("apply_fn", "spec", "cfg", "mesh", "from_block"))
def eval_step(editor_params, norm, base_params, batch, projections=None, *, apply_fn, spec: EditorSpec, cfg: TrainConfig,
              mesh, from_block: "FromBlockPlan | None" = None):
    """Edit every group of `batch` with the editor (statistics frozen; through `projections` as
    `train_step`) and score it: per-group loss, nll, kl [G]; fail/adapt/pass correctness before
    and after the edit [G, rows] and their validity masks - all replicated. Placements as for
    `train_step`."""
    batch = _constrain(batch, mesh, _batch_specs(batch))
    out = _eval(_split_editor(editor_params, mesh), norm, base_params, batch, projections, apply_fn=apply_fn, spec=spec,
                cfg=cfg, plan=from_block)
    return _constrain(out, mesh, jax.tree.map(lambda _: P(), out))


@functools.partial(jax.jit, static_argnames=("apply_fn", "spec", "mesh", "from_block"))
def eval_base_step(base_params, batch, *, apply_fn, spec: EditorSpec, mesh, from_block: "FromBlockPlan | None" = None):
    """`_eval_base` jitted: the base model's side of `eval_step` (factors, pass-row logits, edit
    rows' correctness before the edit), split over "data" by group."""
    batch = _constrain(batch, mesh, _batch_specs(batch))
    out = _eval_base(base_params, batch, apply_fn=apply_fn, spec=spec, plan=from_block)
    return _constrain(out, mesh, _batch_specs(out))


@functools.partial(jax.jit, static_argnames=("apply_fn", "spec", "cfg", "mesh", "from_block"))
def eval_edited_step(editor_params, norm, base_params, batch, base_side, projections=None, *, apply_fn, spec: EditorSpec,
                     cfg: TrainConfig, mesh, from_block: "FromBlockPlan | None" = None):
    """`eval_step` given `eval_base_step`'s outputs for the batch: the same outputs, without
    the base model's passes."""
    batch = _constrain(batch, mesh, _batch_specs(batch))
    base_side = _constrain(base_side, mesh, _batch_specs(base_side))
    out = _eval_edited(_split_editor(editor_params, mesh), norm, base_params, batch, base_side, projections,
                       apply_fn=apply_fn, spec=spec, cfg=cfg, plan=from_block)
    return _constrain(out, mesh, jax.tree.map(lambda _: P(), out))


def place_base_params(model, base_params, mesh):
    """Base parameters placed for the steps on `mesh` (`sharding.shard_params`): FSDP over all
    devices, MLPs tensor parallel when the "model" axis > 1; one device holds them whole."""
    return sharding.shard_params(base_params, mesh, model=model)


def place_state(tree, mesh):
    """Train state (or editor params) placed as the steps on `mesh` expect it: a train state's
    editor params and optimizer state split over all devices and the rest replicated
    (`_state_specs`)."""
    return sharding.shard_params(tree, mesh, _state_specs(tree, mesh))


def summarize_eval(results: Sequence[Mapping[str, np.ndarray]], weights: Sequence[np.ndarray], k: int) -> dict:
    """Aggregate eval-step outputs into the report's numbers.

    edit_acc / fail_acc / adapt_acc: share of fail+adapt / fail / adapt rows whose whole target is
    the argmax after the edit (the paper's EA); *_before: the same before; drawdown: pass accuracy
    before minus after; loss, nll, kl: means over groups."""
    cat = lambda key: np.concatenate([np.asarray(r[key]) for r in results])  # noqa: E731
    w = np.concatenate([np.asarray(x) for x in weights]) > 0
    ev, ec, eb = cat("edit_valid")[w], cat("edit_correct")[w], cat("edit_before")[w]
    pv, pc, pb = cat("pass_valid")[w], cat("pass_correct")[w], cat("base_pass_correct")[w]
    share = lambda c, v: float(c[v].mean()) if v.any() else float("nan")  # noqa: E731
    fail_v, adapt_v = ev.copy(), ev.copy()
    fail_v[:, k:] = False
    adapt_v[:, :k] = False
    return {
        "loss": float(cat("loss")[w].mean()),
        "nll": float(cat("nll")[w].mean()),
        "kl": float(cat("kl")[w].mean()),
        "edit_acc": share(ec, ev),
        "fail_acc": share(ec, fail_v),
        "adapt_acc": share(ec, adapt_v),
        "edit_acc_before": share(eb, ev),
        "pass_acc": share(pc, pv),
        "pass_acc_before": share(pb, pv),
        "drawdown": share(pb, pv) - share(pc, pv),
        "groups": int(w.sum()),
    }


# Validation groups per jitted call (rounded up to the "data" axis). Each group holds its own
# edited copy of the edited kernels and full-vocabulary logits of its rows, so memory grows with
# it; 8 keeps SmolLM2's validation well under a few GiB (not measured on SmolLM2: a benchmark
# process holding the PyTorch reference too was OOM-killed on a shared machine at 16).
EVAL_GROUPS_PER_CALL = 8


def eval_groups_per_call(cfg: TrainConfig, data: EditData, n_data: int, limit: int = EVAL_GROUPS_PER_CALL) -> int:
    """How many validation groups one `eval_step` call takes: all of them up to `limit`, as a
    multiple of the number of data-parallel devices, spread evenly over the fewest calls (19
    groups at a limit of 8: 3 calls of 7, not of 8 with 5 padding groups). Groups are scored
    independently, so the split changes no number; few large calls keep the CPU's matmuls wide
    and the host idle."""
    n_groups = max(1, min(cfg.val_groups, math.ceil(data.n_fail / cfg.edits_per_group)))
    per_call = n_data * math.ceil(min(n_groups, limit) / n_data)
    n_calls = math.ceil(n_groups / per_call)
    return n_data * math.ceil(math.ceil(n_groups / n_calls) / n_data)


def evaluate(model, spec, cfg, mesh, editor_params, norm, base_params, data: EditData, *,
             skip_unchanged_blocks: bool = True, plan: FromBlockPlan | None = None, base_cache: dict | None = None,
             flat_head: bool = True, fit_lengths: bool = True, projections: Mapping[str, Any] | None = None) -> dict:
    """Edit every validation group with the editor and summarise (see `summarize_eval`).

    All arguments placed as for `train_step` (`place_state`, `place_base_params`). The groups
    go through `eval_step` `eval_groups_per_call` at a time (one compilation), and the results
    come back to the host once, at the end. skip_unchanged_blocks: on decoder-only models, run
    the blocks below the first edited one once per row, on the base model (`from_block_plan`;
    the same numbers); plan: that plan when the caller has it (then `data` should hold the
    hidden states, `with_block_inputs`, or the step computes them). base_cache: a dict the caller
    keeps between calls with the same model, base params, spec, cfg, mesh, plan and data (only the
    editor changing, as in `train_editor`'s validations): the base model's side of each batch
    (`eval_base_step`: capture factors, pass-row logits, edit rows before the edit) is computed
    on the first call and reused (the same numbers; at `layers.0` of SmolLM2 more than half of
    an evaluation's arithmetic). flat_head: on decoder-only models, run the LM head on the rows'
    target tokens only (`flat_targets`; the same numbers); False: at K positions of every row.
    fit_lengths: on decoder-only models, cut every batch to the longest row of all of them
    (`fit_length`: one length, one compilation; the same numbers). projections: the null-space
    projectors the editor was trained with (`train_step`), None for an editor trained without."""
    if plan is None:
        plan, data = from_block_data(model, spec, data, base_params, skip_unchanged_blocks)
    elif data.block_input_of not in (None, plan.last):
        data = without_block_inputs(data)
    per_call = eval_groups_per_call(cfg, data, sharding.axis_size(mesh, sharding.DATA))
    batches = val_batches(data, dataclasses.replace(cfg, batch_size=per_call))
    if flat_head and model.kind == "causal":
        batches = flat_targets(batches)
    if fit_lengths and model.kind == "causal":
        length = max(batch_length(b) for b in batches)
        batches = [fit_length(b, length) for b in batches]
    kw = dict(apply_fn=model.apply, spec=spec, cfg=cfg.step_config(), mesh=mesh, from_block=plan)
    if base_cache is None:
        results = [eval_step(editor_params, norm, base_params, sharding.shard_batch(b, mesh), projections, **kw)
                   for b in batches]
    else:
        results = []
        for i, b in enumerate(batches):
            sb = sharding.shard_batch(b, mesh)
            if i not in base_cache:
                base_cache[i] = eval_base_step(base_params, sb, apply_fn=model.apply, spec=spec, mesh=mesh, from_block=plan)
            results.append(eval_edited_step(editor_params, norm, base_params, sb, base_cache[i], projections, **kw))
    return summarize_eval(parallel.fetch(results), [b["weight"] for b in batches], cfg.edits_per_group)


# ---------------------------------------------------------------------------- the loop


class TrainingDiverged(UserError):
    """The loss, a gradient or the editor's weights became NaN or infinite: the run stopped
    without saving that state (the latest checkpoint is the last good one)."""


def _check_finite(flags: list, ckpt) -> None:
    """Raise TrainingDiverged at the first step whose `finite` flag is False.

    flags: [(step, metrics of that step)] not yet checked; read from the device together (the
    caller reads the metrics at the same points anyway)."""
    if not flags:
        return
    ok = jax.device_get([m["finite"] for _, m in flags])
    for (step, m), good in zip(flags, ok):
        if not bool(np.all(good)):
            loss, gn = (float(np.mean(x)) for x in jax.device_get((m["loss"], m["grad_norm"])))
            what = "loss" if not math.isfinite(loss) else "gradient" if not math.isfinite(gn) else "editor weights after the update"
            latest = ckpt.latest_step()
            kept = (f"the latest checkpoint is step {latest} in {ckpt.directory}" if latest is not None
                    else "no checkpoint was written")
            raise TrainingDiverged(
                f"step {step}: the editor's training diverged (non-finite {what}; loss {loss:.4g}, gradient norm {gn:.4g}); "
                f"stopped without saving it, {kept}; lower the learning rates (lr, lr_lr, edit_lr_init)"
            )


@dataclasses.dataclass
class TrainResult:
    params: dict  # editor params at the end
    norm: dict  # editor state (running statistics) at the end
    spec: EditorSpec
    config: TrainConfig
    step: int
    best_step: int | None
    best_val_loss: float
    stopped_early: bool
    last_val: dict | None
    recompiles: int  # compilations of the step beyond one per batch shape met (`fit_length`, `flat_step_sizes`); 0 when shapes are static
    # wall seconds of this call: "setup" (placing, block inputs, the kept base side), "first_step"
    # (the first step of this call: trace + compile, or a compile-cache load), "steps" (every other
    # step, with logging and checkpoints), "validation" (one entry per validation); for reports only
    times: dict = dataclasses.field(default_factory=dict)
    # {weight path: P} the editor was trained (and must edit) with (TrainConfig.null_energy > 0), else None
    projections: dict | None = None


def _log(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep only the records of steps <= step (a resumed run rewrites what came after)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(path)


def train_editor(
    model,
    data: Mapping[str, EditData],
    weights_or_spec,
    cfg: TrainConfig,
    workdir: str | Path,
    *,
    mesh=None,
    base_params: Any = None,
    progress: bool = True,
    resume: bool = True,
    stop_after: int | None = None,
    skip_unchanged_blocks: bool = True,
    flat_head: bool = True,
    keep_base_side: bool = True,
    fit_lengths: bool = True,
    flat_levels: bool = True,
    clip_factor: bool = True,
    null_projection=None,
) -> TrainResult:
    """Train an editor for the given weights; checkpoints and metrics.jsonl go to `workdir`.

    data: {"train": EditData, "val": EditData} from `prepare_splits`.
    weights_or_spec: the `Weight`s to edit (an `EditorSpec` is built with cfg.editor) or a spec.
    mesh: device mesh with a "data" axis (default `sharding.make_mesh()`: all devices on "data",
      an `(n, 1)` mesh). The base parameters are split over all devices (FSDP; MLPs tensor
      parallel when the "model" axis > 1); a 1-D `parallel.data_mesh` acts as an `(n, 1)` one.
    resume: continue from the latest checkpoint in workdir if there is one (it must match the
      model, the weights and the config, else `CheckpointMismatch`).
    stop_after: stop (without a final checkpoint) once this step is reached - for tests of
      interruption; a normal run leaves it None.
    skip_unchanged_blocks: on decoder-only models, compute the base model's hidden state entering
      the first edited block once per row of a split (`with_block_inputs`, up to
      `BLOCK_CACHE_BYTES`, and only when the run's steps - validations for the val split - would
      compute them for at least as many rows: `train_block_rows`, `val_block_rows`; else in
      every step) and run the steps and the validation from that
      block (`from_block_plan`; the same numbers, fewer blocks). Off: every block runs.
    flat_head: on decoder-only models the steps and the validations run the LM head on the rows'
      target tokens only (`with_flat_train`, `flat_targets`; the same numbers, float summation
      order aside). Off: at K positions of every row.
    keep_base_side: compute the base model's side of the train split once, before training,
      instead of in every step (the same numbers, up to float rounding): the capture factors of
      every fail row (`with_fail_factors`, up to `FACTOR_CACHE_BYTES`, when the run's steps
      capture at least twice as many fail rows as the split has) and, with the flat head,
      the logits at every pass row's targets (`with_pass_logits`, up to
      `PASS_LOGITS_CACHE_BYTES`, on the same condition for pass rows). Off: every step captures
      and runs a base pass.
    fit_lengths: on decoder-only models, cut each step's batch (and the validation's) after its
      longest row (`fit_length`, EDIT_BUCKETS lengths: one compiled step per length met; the
      same numbers, up to float rounding). Off: every step runs the edit set's padded length.
    flat_levels: with flat_head, each step's target pairs padded to one of two sizes per side
      (`flat_step_sizes`: at most 4 programs per padded length) instead of the run's most
      (the same numbers, float summation order aside). Off: one size for the whole run.
    clip_factor: the gradient clip as one scalar factor in the step's Adam update (`train_step`,
      `_fused_inner_update`; on by default since session 18): the update reads the 32M editor
      parameters' moments once instead of twice (1.09x faster steps on the main job, the update
      alone 2.1x; docs/speed.md, "Session 16: the editor's step and setup"). Bit-equal to optax
      below the clip, within float rounding (an ulp of a clipped entry) above it - which a run
      that clips in its first steps amplifies over hundreds of steps into other, equally good
      numbers (the main job's keep DD 0.050 -> 0.054 when session 16 measured it). Off: the
      update is optax's clip-then-Adam, operation by operation.
    null_projection: with cfg.null_energy > 0, the `nullspace.NullProjection` (built for that
      energy, over the spec's weights) every edit of training and validation goes through (W -
      lr_W * P G~); None then builds it from cfg.null_tokens tokens of WikiText
      (`nullspace.wikitext_null_projection`, the key-statistics cache). The P used is saved in
      workdir/`nullspace.NULL_FILE` (`load_editor` edits with it); a resumed run must have the
      same energy and token count (its checkpoints' config) and the same P (bit for bit), else
      `CheckpointMismatch`. With cfg.null_energy 0 (the default) it must be None: the steps are
      the ones without a projection, unchanged.
    """
    # --- setup: mesh, resolved config, editor spec, workdir, checkpointer
    base_params = model.params if base_params is None else base_params
    mesh = mesh if mesh is not None else sharding.make_mesh()
    cfg = cfg.resolved(sharding.axis_size(mesh, sharding.DATA))
    spec = (
        weights_or_spec
        if isinstance(weights_or_spec, EditorSpec)
        else EditorSpec.from_params(weights_or_spec, base_params, cfg.editor)
    )
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    metrics_path = workdir / "metrics.jsonl"
    ckpt = EditorCheckpointer(workdir / "checkpoints", model_name=model.name, spec=spec, config=cfg, keep=cfg.keep_checkpoints)

    # --- resume from the newest checkpoint that restores, or start at step 0
    state = init_train_state(spec, cfg)
    run = {"best_val_loss": float("inf"), "best_step": None, "last_val": None, "stopped_early": False}
    start = 0
    # the newest checkpoint that restores (damaged newer ones are moved aside, one line each)
    had_checkpoints = ckpt.latest_step() is not None
    restored = ckpt.restore_newest(state) if resume and had_checkpoints else None
    if restored is not None:
        state, meta = restored
        start = int(state["step"])
        print(f"resuming from step {start} of {cfg.max_steps} ({ckpt.directory})", file=sys.stderr)
        run.update(meta["run"])
        run["best_val_loss"] = float("inf") if run["best_val_loss"] is None else float(run["best_val_loss"])
        _truncate_metrics(metrics_path, start)
    else:
        if ckpt.latest_step() is not None:
            raise CheckpointError(
                f"{workdir} already holds checkpoints (latest step {ckpt.latest_step()}); resume from them or use a new workdir"
            )
        if resume and had_checkpoints:
            print(f"no checkpoint in {ckpt.directory} restores (all moved aside): starting from step 0", file=sys.stderr)
        if metrics_path.exists():
            metrics_path.unlink()

    # --- the null-space projection every edit goes through (TrainConfig.null_energy)
    t_setup = time.perf_counter()
    times: dict = {"validation": []}
    arrays = _null_projection_for(model, base_params, spec, cfg, workdir, null_projection, resumed=restored is not None,
                                  progress=progress)
    if arrays is not None:
        times["null_projection"] = round(time.perf_counter() - t_setup, 3)
    projections = None if arrays is None else jax.device_put(arrays, NamedSharding(mesh, P()))

    # --- place on the mesh; validation
    state = place_state(state, mesh)
    base = place_base_params(model, base_params, mesh)
    # block inputs per split only when they pay: the run's steps (validations) would compute at
    # least as many rows' as the split has (`from_block_data`; cfg.max_steps, so a resumed run
    # decides the same); only for the rows the steps and validations gather (`train_rows_used`)
    used = train_rows_used(data["train"], cfg, cfg.max_steps)
    plan, train_data = from_block_data(model, spec, data["train"], base, skip_unchanged_blocks,
                                       uses=train_block_rows(cfg, cfg.max_steps), used=used)
    val_data = from_block_data(model, spec, data["val"], base, skip_unchanged_blocks,
                               uses=val_block_rows(data["val"], cfg, cfg.max_steps),
                               used=val_rows_used(data["val"], cfg))[1]
    if plan is not None:
        kept = "kept for every row" if train_data.block_input_of else "computed once per step"
        if train_data.block_input_of:
            kept = f"kept for the {sum(int(v.sum()) for v in used.values())} of {split_rows(train_data)} train rows the steps gather"
        print(f"train-editor: blocks 0..{plan.start - 1} of {plan.n_blocks} run on the base model only "
              f"(their output {kept}); the steps start at block {plan.start}", file=sys.stderr)
    # the factors pay when the run captures each fail row at least twice on average (computing them
    # for every row is one capture per row, and a program of its own to compile)
    captures = cfg.max_steps * cfg.batch_size * cfg.edits_per_group
    if keep_base_side and captures >= 2 * train_data.n_fail and fail_factor_bytes(spec, base, train_data) <= FACTOR_CACHE_BYTES:
        train_data = with_fail_factors(spec, model.apply, base, train_data, plan)
        print(f"train-editor: the capture factors of the {train_data.n_fail} train fail rows are computed once "
              f"({fail_factor_bytes(spec, base, train_data) / 2**20:.0f} MiB), not in every step", file=sys.stderr)
    flat = flat_train_sizes(train_data, cfg, cfg.max_steps) if flat_head and model.kind == "causal" else None
    # each step's FLAT at one of two sizes per side (`flat_step_sizes`) instead of the run's maximum
    step_flat = flat_step_sizes(train_data, cfg, cfg.max_steps) if flat is not None and flat_levels else None
    if flat is not None:
        levels = "" if step_flat is None else (
            f"; each step at {sorted(set(step_flat[:, 0].tolist()))} / {sorted(set(step_flat[:, 1].tolist()))}")
        print(f"train-editor: the LM head runs on the target tokens only (<= {flat[0]} of the edit rows and "
              f"{flat[1]} of the pass rows per group{levels})", file=sys.stderr)
        base_rows = cfg.max_steps * cfg.batch_size * (cfg.pass_per_group + cfg.extra_pass_per_group)
        pl_bytes = pass_logits_bytes(model, train_data) if keep_base_side and base_rows >= 2 * train_data.n_pass else None
        if pl_bytes is not None and pl_bytes <= PASS_LOGITS_CACHE_BYTES:  # (pass_logits_bytes traces the model: once)
            train_data = with_pass_logits(model.apply, base, train_data, plan)
            print(f"train-editor: the base logits at the {train_data.n_pass} train pass rows' targets are computed once "
                  f"({pl_bytes / 2**20:.0f} MiB), not in every step", file=sys.stderr)
    kw = dict(apply_fn=model.apply, spec=spec, cfg=cfg.step_config(), mesh=mesh, from_block=plan, clip_factor=clip_factor)
    step_fn = train_step

    val_base: dict = {}  # the base model's side of every validation batch, computed once

    def validate(step):
        t_val = time.perf_counter()
        v = evaluate(model, spec, cfg, mesh, state["params"], state["norm"], base, val_data, plan=plan, base_cache=val_base,
                     flat_head=flat_head, fit_lengths=fit_lengths, projections=projections)
        _log(metrics_path, {"step": step, "split": "val", **v})
        improved = v["loss"] < run["best_val_loss"]
        if improved:
            run["best_val_loss"], run["best_step"] = v["loss"], step
        run["last_val"] = v
        times["validation"].append(round(time.perf_counter() - t_val, 3))
        return v

    # --- the loop: one jitted step, then logging, validation, early stop, checkpoints
    step = start
    stopped_early = bool(run["stopped_early"])  # a resumed run that had stopped stays stopped
    pending: list = []
    unchecked: list = []  # (step, metrics) whose `finite` flag is not yet read
    compiled = None
    lengths: set[tuple] = set()  # the batch shapes the steps met (`fit_length`, `flat_step_sizes`): one program each
    fit = fit_lengths and model.kind == "causal"
    running: dict[str, float] = {}
    bar = tqdm(total=cfg.max_steps, initial=start, desc="train-editor", disable=not progress, dynamic_ncols=True)
    t0 = time.time()
    times["setup"] = round(time.perf_counter() - t_setup, 3)
    t_loop = time.perf_counter()
    try:
        while step < cfg.max_steps and not stopped_early:
            batch = train_batch(train_data, cfg, step, flat if step_flat is None else tuple(int(x) for x in step_flat[step]))
            if fit:
                batch = fit_length(batch)
            lengths.add((int(batch["edit"]["attention_mask"].shape[-1]),) + (() if FLAT not in batch else tuple(batch[FLAT]["rows"].shape)))
            batch = sharding.shard_batch(batch, mesh)
            state, m = step_fn(state, base, batch, projections, **kw)
            step += 1
            if compiled is None:
                compiled = step_fn._cache_size()
                jax.block_until_ready(m)
                times["first_step"] = round(time.perf_counter() - t_loop, 3)
            pending.append(m)
            unchecked.append((step, m))
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                _check_finite(unchecked, ckpt)
                unchecked = []
                got = jax.device_get(pending)
                pending = []
                rec = {k: float(np.mean([np.mean(g[k]) for g in got])) for k in got[0] if k != "finite"}
                for k, v in rec.items():
                    running[k] = v if k not in running else 0.9 * running[k] + 0.1 * v
                _log(metrics_path, {"step": step, "split": "train", **rec})
                bar.set_postfix(loss=f"{running['loss']:.4f}", nll=f"{running['nll']:.3f}", kl=f"{running['kl']:.2e}",
                                acc=f"{running['edit_acc']:.2f}")
            val = None
            if step % cfg.val_every == 0 or step % cfg.checkpoint_every == 0 or stopped_early:
                _check_finite(unchecked, ckpt)  # nothing non-finite is validated or saved
                unchecked = []
            if step % cfg.val_every == 0 or step == cfg.max_steps:
                val = validate(step)
                bar.write(
                    f"step {step}: val loss {val['loss']:.4f} edit acc {val['edit_acc']:.3f} "
                    f"drawdown {val['drawdown']:.4f} ({time.time() - t0:.0f}s)"
                )
                if run["best_step"] is not None and step - run["best_step"] >= cfg.patience:
                    stopped_early = run["stopped_early"] = True
            if step % cfg.checkpoint_every == 0 or val is not None or stopped_early or step == cfg.max_steps:
                ckpt.save(step, state, run, val_loss=None if val is None else val["loss"])
            if stopped_early or (stop_after is not None and step >= stop_after):
                break
    finally:
        bar.close()
        ckpt.wait()
    times["steps"] = round(time.perf_counter() - t_loop - times.get("first_step", 0.0) - sum(times["validation"]), 3)
    # --- result
    return TrainResult(
        params=parallel.fetch(state["params"]),  # split over the mesh's devices (and hosts) when sharded
        norm=parallel.fetch(state["norm"]),
        spec=spec,
        config=cfg,
        step=step,
        best_step=run["best_step"],
        best_val_loss=run["best_val_loss"],
        stopped_early=stopped_early,
        last_val=run["last_val"],
        recompiles=0 if compiled is None else max(0, step_fn._cache_size() - compiled - (len(lengths) - 1)),
        times=times,
        projections=arrays,
    )


def _null_projection_for(model, base_params, spec: EditorSpec, cfg: TrainConfig, workdir: Path, given, *, resumed: bool,
                         progress: bool) -> dict | None:
    """`train_editor`'s projectors {weight path: P float32} (None with cfg.null_energy 0), saved
    in workdir/NULL_FILE on a fresh run and checked against that file on a resumed one."""
    path = workdir / NULL_FILE
    if cfg.null_energy == 0:
        if given is not None:
            raise ValueError("train_editor: a null_projection was given but TrainConfig.null_energy is 0 (off); "
                             "set null_energy to the projection's energy, or pass none")
        if not resumed and path.exists():
            path.unlink()  # a fresh run without projection: no stale projector for load_editor to find
        return None
    if given is None:
        if cfg.null_facts:
            raise ValueError(f"TrainConfig.null_facts={cfg.null_facts!r}: train_editor cannot gather the fact rows itself; "
                             "pass a null_projection built with them (nullspace.wikitext_null_projection(..., facts=...); "
                             "the pipeline does: config.editor.null_facts)")
        given = wikitext_null_projection(model, base_params, spec.weights, cfg.null_energy, cfg.null_tokens,
                                         progress=progress)
    arrays = projection_arrays(given, spec.weights, cfg.null_energy, where="train_editor's null_projection",
                               facts=cfg.null_facts, facts_weight=cfg.null_facts_weight)
    facts = ((given.facts, float(given.facts_weight), given.facts_digest) if cfg.null_facts else ("", 0.0, ""))
    for w, shape in zip(spec.weights, spec.shapes):
        fan_in = w.in_out_shape(shape)[0]
        if arrays[w.path].shape != (fan_in, fan_in):
            raise ValueError(f"train_editor's null_projection: the projector of {w.path!r} has shape "
                             f"{arrays[w.path].shape}, but the kernel's input width is {fan_in}")
    if resumed:
        if not path.exists():
            raise CheckpointMismatch(f"{workdir} resumes a run trained with null_energy {cfg.null_energy:g}, but its "
                                     f"projector file {NULL_FILE} is missing; start a new workdir")
        saved, energy, tokens, _ = load_projections(path)
        saved_facts = projection_facts(path)
        same = (list(saved) == list(arrays) and energy == cfg.null_energy and saved_facts == facts
                and all(np.array_equal(saved[k], arrays[k]) for k in arrays))
        if not same:
            raise CheckpointMismatch(
                f"{workdir} was trained through another null-space projector (saved: energy {energy:g}, {tokens} "
                f"tokens, weights {list(saved)}, fact keys {saved_facts}); this run's differs (energy "
                f"{cfg.null_energy:g}, {cfg.null_tokens} tokens, fact keys {facts}): other key statistics would change "
                "the trajectory. Use the same ones, or a new workdir")
    else:
        info = getattr(given, "info", {})
        save_projections(path, arrays, cfg.null_energy, cfg.null_tokens,
                         {k: {kk: vv for kk, vv in v.items()
                              if kk in ("fan_in", "null_dim", "null_energy_share", "facts_tokens", "facts_trace_share")}
                          for k, v in info.items()}, facts=facts)
    return arrays
