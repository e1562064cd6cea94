"""Run a decoder-only model from the first block an edit changed, on cached base hidden states.

An edit of layer l changes nothing the blocks before l compute: on every row, the hidden state
entering block l is the base model's. An evaluation that scores many edited models on the same
rows (the pipeline scores every edit on the same 50-odd pass and keep rows) can compute that
hidden state once with the base model and start each edited forward pass at block l. On
SmolLM2 with an edit of layers.26 that is 4 of 30 blocks per edited pass.

Pieces (all pure; nothing here changes model code - `flax.linen.intercept_methods` sees the
blocks' calls):

  block_call_order(apply, params, batch, paths) -> {block path: position in the call order}
  first_changed_block(model, base, edited)      -> position of the first block whose
                                                   parameters differ (0 if anything outside the
                                                   blocks differs), or None when the model is
                                                   not a plain chain of blocks
  block_output(apply, path, params, batch)      -> that block's output [B, S, H] (jitted;
                                                   XLA drops every later block)
  block_outputs_by_length(apply, path, params,  -> that block's output on many rows, in
      enc, chunk, rows=)                           length-sorted calls cut short
  FromBlock(apply, skipped)                     -> `apply` whose blocks in `skipped` do not run:
                                                   each returns batch[BLOCK_INPUT], the cached
                                                   output of the last skipped block
  block_chain(model, params, batch)             -> (BlockChain, "") when `model` may skip blocks,
                                                   else (None, why): the one check the MEND step,
                                                   ROME's v* and the edit evaluator share

Only decoder-only (`kind == "causal"`) models qualify: each block's output there feeds only the
next block, so every skipped block may return the same cached tensor (an encoder-decoder's
encoder output feeds cross-attention too, and a classifier's pooler reads its own positions).
The numbers equal the full forward pass (tests/test_from_block.py: Llama, GPT-2, GPT-Neo).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from salem_jax.models.base import path_str

BLOCK_INPUT = "block_input"  # batch key: the cached output of the last skipped block [B, S, H]
# batch keys no model's `apply` reads (targets and where they are scored): `block_outputs_by_length`
# leaves them out of `block_output`'s calls, so that row sets differing only in them (the
# evaluator's own rows and shared rows, whose score positions have different widths) share one
# trace - jit drops unused arguments, so they compiled to the same program but traced twice
NOT_MODEL_INPUTS = ("labels", "label_mask", "score_pos")


def _name(context) -> str:
    return "/".join(context.module.path)


def block_call_order(apply: Callable, params: Any, batch: dict, block_paths: tuple[str, ...]) -> dict[str, int]:
    """{block module path: its position in the order the forward pass calls the blocks}, from an
    abstract (compute-free) pass; an error unless each block is called exactly once."""
    seen: list[str] = []

    def spy(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and _name(context) in block_paths:
            seen.append(_name(context))
        return next_fun(*args, **kwargs)

    def run(params, batch):
        with nn.intercept_methods(spy):
            apply(params, batch)

    jax.eval_shape(run, params, batch)
    if sorted(seen) != sorted(block_paths):
        raise ValueError(f"expected one call of each block {list(block_paths)}, saw {seen}")
    return {name: i for i, name in enumerate(seen)}


def changed_paths(base: Any, edited: Any) -> list[str]:
    """Parameter paths whose leaves differ between two trees of the same structure. A leaf that
    is the same object is unchanged (editors replace only the leaves they edit); any other leaf
    is compared by value."""
    a = jax.tree_util.tree_flatten_with_path(base)[0]
    b = jax.tree_util.tree_flatten_with_path(edited)[0]
    if [k for k, _ in a] != [k for k, _ in b]:
        raise ValueError("edited parameters have another structure than the base parameters")
    out = []
    for (k, x), (_, y) in zip(a, b):
        if x is y:
            continue
        if getattr(x, "shape", None) != getattr(y, "shape", None) or not bool(jnp.array_equal(x, y)):
            out.append(path_str(k))
    return out


def first_changed_block(model, base: Any, edited: Any, chain: "BlockChain | None" = None) -> int | None:
    """Call position of the first block whose parameters differ between `base` and `edited`
    (0 when a parameter outside every block differs; the number of blocks when none differs),
    or None when `model` is not a decoder-only chain of blocks (nothing may be skipped).

    chain: `block_chain`'s result (default: the layer table's order)."""
    if model.kind != "causal":
        return None
    chain = chain or BlockChain(tuple(b.module_path for b in model.layers.blocks))
    start = len(chain.order)
    for path in changed_paths(base, edited):
        pos = chain.start(path)
        if pos is None:
            return 0
        start = min(start, pos)
    return start


@contextlib.contextmanager
def keeping_block_output(path: str):
    """Within it, every call of the block at module `path` appends its output to the yielded list
    (the model runs as usual): how `block_output` and generation's shared prefill read a block's
    output from inside one forward pass."""
    out: list = []

    def keep(next_fun, args, kwargs, context):
        o = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and _name(context) == path:
            out.append(o)
        return o

    with nn.intercept_methods(keep):
        yield out


@functools.partial(jax.jit, static_argnums=(0, 1))
def block_output(apply: Callable, path: str, params: Any, batch: dict) -> jax.Array:
    """The output of the block at module `path` on `batch` ([B, S, H]); an error if it is not one array."""
    with keeping_block_output(path) as out:
        apply(params, batch)
    if len(out) != 1 or not isinstance(out[0], jax.Array):
        raise ValueError(f"block {path!r}: expected one call returning one array, got {len(out)} calls")
    return out[0]


def block_outputs_by_length(apply: Callable, path: str, params: Any, enc: dict, chunk: int, *, rows=None,
                            shape: tuple[int, ...] | None = None, dtype=None):
    """The output of the block at module `path` on every row of `enc` ({key: [N, S, ...]} numpy), as
    one numpy array [N, S, *shape], computed in length-sorted calls cut short - the one routine the
    MEND editor's kept block inputs (`mend.train.with_block_inputs`) and the edit evaluator's kept
    base hidden states (`eval.edits.EditEvaluator`) share.

    The rows are sorted by length (`mend.train.row_ends`, stable) and taken `chunk` at a time in
    that order; each row's cut is the EDIT_BUCKETS length (`mend.train.bucket_length`) of its
    chunk's longest row. Each call runs `chunk` rows (padded with `pad_rows`) of one cut: few
    programs, and a position past a row's last token changes nothing before it (causal models).
    Past its cut a row's output is 0 (padding: never attended to by the row's tokens nor scored).
    Keys in NOT_MODEL_INPUTS (labels, label_mask, score_pos) are not passed to the model: one
    trace per (chunk, cut) whatever the rows' targets.

    rows: compute only these rows (bool [N] or indices; None: every row); each at the cut it gets
    among all rows, re-chunked `chunk` at a time per cut, so a row's numbers do not depend on which
    others are computed. Rows not computed stay 0 and must not be read.
    shape / dtype: of one row's output, [S, ...] (default: the block output's own; `shape` is
    needed when no row is computed)."""
    import numpy as np

    from salem_jax.data.tokenize import pad_rows
    from salem_jax.mend.train import bucket_length, row_ends

    n = int(next(iter(enc.values())).shape[0])
    s = enc["attention_mask"].shape[-1]
    ends = row_ends(np.asarray(enc["attention_mask"]))
    order = np.argsort(ends, kind="stable")
    cuts = np.zeros(n, np.int64)
    for a in range(0, n, chunk):
        cuts[order[a: a + chunk]] = bucket_length(int(ends[order[a: a + chunk]].max()), s)
    if rows is None:
        todo = order
    else:
        rows = np.asarray(rows)
        mark = rows if rows.dtype == bool else np.isin(np.arange(n), rows)
        if mark.shape != (n,):
            raise ValueError(f"block_outputs_by_length: rows marks {mark.shape[0]} rows of {n}")
        todo = order[mark[order]]
    out = None if shape is None else np.zeros((n,) + tuple(shape), dtype or np.float32)
    # the cuts rise along `order` and every chunk but the last is full, so without `rows` the calls
    # below are the chunks above
    for cut in sorted(set(cuts[todo].tolist())):
        same = todo[cuts[todo] == cut]
        for a in range(0, len(same), chunk):
            idx = same[a: a + chunk]
            part = {k: (v[idx][:, :cut] if np.ndim(v) >= 2 and v.shape[1] == s else v[idx])
                    for k, v in enc.items() if k not in NOT_MODEL_INPUTS}
            h = np.asarray(block_output(apply, path, params, pad_rows(part, chunk)))[: len(idx)]
            if out is None:
                out = np.zeros((n, s) + h.shape[2:], dtype or h.dtype)
            out[idx, :cut] = h
    if out is None:
        raise ValueError("block_outputs_by_length: no row to compute and no shape given")
    return out


@dataclasses.dataclass(frozen=True)
class FromBlock:
    """`apply(params, batch)` with the blocks in `skipped` (module paths, every block before the
    first one to run) not run: each returns `batch[BLOCK_INPUT]`, the base model's output of the
    last skipped block. Hashable, so it can be a static argument of a jitted function."""

    apply: Callable
    skipped: tuple[str, ...]

    def __call__(self, params: Any, batch: dict) -> jax.Array:
        h = batch[BLOCK_INPUT]
        skipped = frozenset(self.skipped)

        def skip(next_fun, args, kwargs, context):
            if context.method_name == "__call__" and _name(context) in skipped:
                return h
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(skip):
            return self.apply(params, batch)


@dataclasses.dataclass(frozen=True)
class BlockChain:
    """A decoder-only model's blocks in the order its forward pass calls them.

    order: block module paths by call position (the chain: each block's output is the next one's
    input). `start(path)` is the position of the block owning a parameter or module path (None
    outside every block); `skipping(apply, start)` runs `apply` from that position on."""

    order: tuple[str, ...]

    def start(self, path: str) -> int | None:
        return next((i for i, p in enumerate(self.order) if path.startswith(p + "/")), None)

    def last_skipped(self, start: int) -> str:
        """Module path of the block whose output enters block `start` (start >= 1)."""
        if not 1 <= start <= len(self.order):
            raise ValueError(f"no block runs before position {start} of {len(self.order)}")
        return self.order[start - 1]

    def skipping(self, apply: Callable, start: int) -> FromBlock:
        """`apply` with the blocks before position `start` not run (see FromBlock)."""
        self.last_skipped(start)
        return FromBlock(apply, self.order[:start])


_CHAINS: dict = {}  # (apply, block paths) -> BlockChain or the reason there is none; one abstract pass per model


def block_chain(model, params: Any, batch: dict) -> tuple[BlockChain | None, str]:
    """(the model's BlockChain, "") or (None, why no block may be skipped): only decoder-only models
    (kind "causal") without nn.remat whose blocks are each called once, in a chain. The call order
    comes from one abstract pass over `batch` (one row is enough; compute-free) and is kept per
    (model.apply, block paths), so later calls cost nothing."""
    if model.kind != "causal":
        return None, f"a {model.kind!r} model (only decoder-only models pass one hidden state from block to block)"
    if getattr(model.module, "remat", False):
        return None, "nn.remat blocks (the skipped blocks' cached output cannot enter a rematerialised block)"
    paths = tuple(b.module_path for b in model.layers.blocks)
    key = (model.apply, paths)
    if key not in _CHAINS:
        sample = {k: v[:1] for k, v in batch.items() if k != BLOCK_INPUT}
        try:
            order = block_call_order(model.apply, params, sample, paths)
            _CHAINS[key] = BlockChain(tuple(sorted(paths, key=order.__getitem__)))
        except ValueError as e:  # e.g. blocks under nn.scan
            _CHAINS[key] = f"the blocks' call order is not a chain ({e})"
    found = _CHAINS[key]
    return (found, "") if isinstance(found, BlockChain) else (None, found)


def last_mlp_module(model, chain: BlockChain) -> tuple[str | None, str]:
    """(module path of the MLP of the chain's last block, "") or (None, why there is none): the
    longest common module prefix of that block's MLP weights (Llama's `.../mlp` over gate, up and
    down; GPT-2's over c_fc and c_proj), which must lie strictly inside the block. What
    `scored_logits.LastMLPAtScored` runs on the scored positions only."""
    last = chain.order[-1]
    block = next((b for b in model.layers.blocks if b.module_path == last), None)
    if block is None:
        return None, f"the last block called ({last!r}) is not in the layer table"
    mods = [w.module_path.split("/") for w in block.mlp]
    if len(mods) < 2:
        return None, f"block {block.name} lists {len(mods)} MLP weight(s): no MLP module to tell apart from them"
    common = []
    for level in zip(*mods):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    if len(common) <= len(last.split("/")) or common[: len(last.split("/"))] != last.split("/"):
        return None, f"block {block.name}'s MLP weights share no module inside the block ({'/'.join(common)!r})"
    return "/".join(common), ""
