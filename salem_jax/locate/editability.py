"""Editability: can one untrained MEND step at this layer fix an edit without touching the rest?

The paper's saliency (salem_jax.saliency) asks where the gradient of the errors is large. On
SmolLM2 that is always the first block, where a MEND editor barely learns to edit (README,
"The paper's claim on SmolLM2"): a large gradient says a layer *can* move the output, not that a
rank-1 step there moves only the edited fact. This score asks the second question directly, with
forward and backward passes only (no editor training):

For each candidate layer l (its `part` weights), each edit learning rate `lr` of a small grid and
each probe edit i (a fail row of the given rows, applied alone to the base weights):

    (u, delta)      = capture(base, fail row i)               rank-1 factors of every weight of l
    u~, delta~      = standardised with running statistics     filled from `warm` other fail rows
                      (MEND's normalisation; none when normalize=False)
    W'              = W - lr * sum_t u~_t^T delta~_t           the identity editor's edit, i.e.
                                                               the first edit a MEND editor makes
    fixed_i(l, lr)  = share of edit i's rows (the fail row and up to `adapt_per_edit`
                      rephrasings) whose whole target is the argmax under W'
    spill_i(l, lr)  = share of the target tokens of `pass_per_edit` pass rows (the model gets
                      them right; cycled over the probes) whose argmax changes under W'

    score(l, lr)    = mean_i fixed_i - spill_weight * mean_i spill_i
    editability(l)  = max over lr of score(l, lr)                 (the best lr is reported)

and the layer(s) with the highest editability are chosen. The warm rows and the probe rows are
disjoint records, sampled with `seed` from the rows given (the train split in the pipeline: the
val split stays held out). `scores["fail"]` is the editability, `scores["fixed"]` and
`scores["spill"]` its two parts at the best lr, `extra["grid"]` every (layer, lr) value.

Cost (how it is made cheap; the score is the same as rebuilding W' and running the model):
- one capture (forward + backward, every candidate layer at once) per `micro_batch` of warm rows
  and one per `micro_batch` of probes (the probes' factors are kept on the device, [P, S, .]);
- one base forward of the rows the probes score, keeping every block's output; these rows and
  the probe passes below are cut to the scored rows' longest length (`_trimmed`, causal models),
  not the bucket every row (warm rows too) was padded to;
- per layer, one forward of all (probe, lr, row) combinations (`probe_batch` rows per call), where
  each row's edit is the low-rank correction  x W' = x W - lr (x u~^T) delta~  added to the
  edited modules' outputs (no weight matrix is rebuilt), the blocks the forward pass calls before
  the edited one return their cached base outputs instead of running (lax.cond: skipped at run
  time), and the vocabulary head runs at the target positions only (salem_jax.scored_logits).
The layer is a traced integer, so one compiled program serves every layer whose weights have the
same shapes, and the forward work per layer falls with its depth (the last layer runs one block).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from salem_jax.data.tokenize import encode
from salem_jax.losses import example_correct
from salem_jax.mend.capture import capture
from salem_jax.models.from_block import block_call_order
from salem_jax.locate.profile import LayerProfile, jsonable, top_k_layers
from salem_jax.mend.editor import EditorConfig, EditorSpec, init_editor, transform_factors, update_norm_state
from salem_jax.scored_logits import scored_logits, with_score_positions

NAME = "editability"  # the scorer's name in `locate`, `salem locate --method` and `--scorer`


@dataclasses.dataclass(frozen=True)
class EditabilityConfig:
    """lrs: the edit learning rates tried (each layer keeps its best); warm: fail records whose
    factors fill the running statistics first; probes: fail records edited one at a time;
    adapt_per_edit / pass_per_edit: rows scored per probe; spill_weight: the price of one changed
    pass token against one fixed edit row; normalize / norm_eps: MEND's standardisation (as the
    editor's EditorConfig); micro_batch: rows per capture call; probe_batch: most edited rows per
    forward pass (memory: probe_batch x target tokens x vocabulary logits)."""

    lrs: tuple[float, ...] = (1e-4, 3e-4, 1e-3)
    warm: int = 30
    probes: int = 16
    adapt_per_edit: int = 2
    pass_per_edit: int = 4
    spill_weight: float = 1.0
    normalize: bool = True
    norm_eps: float = 1e-7
    part: str = "mlp"
    micro_batch: int = 8
    probe_batch: int = 32
    seed: int = 0

    def check(self) -> None:
        if not self.lrs or any(not np.isfinite(x) or x <= 0 for x in self.lrs):
            raise ValueError(f"EditabilityConfig.lrs must be positive numbers, got {self.lrs}")
        if self.probes < 1 or self.warm < 0 or self.adapt_per_edit < 0 or self.pass_per_edit < 1:
            raise ValueError("EditabilityConfig: probes >= 1, warm >= 0, adapt_per_edit >= 0, pass_per_edit >= 1")
        if self.micro_batch < 1 or self.probe_batch < 1:
            raise ValueError("EditabilityConfig: micro_batch and probe_batch must be >= 1")
        if self.normalize and self.warm < 2:
            raise ValueError("EditabilityConfig: normalize=True needs warm >= 2 rows of statistics")


@dataclasses.dataclass(frozen=True)
class ProbeRows:
    """The rows of the probe, chosen from edit-set rows: warm fail rows, and per probe its fail
    row, rephrasings (up to adapt_per_edit; missing ones are absent) and pass rows."""

    warm: list[dict]
    probes: list[dict]
    adapts: list[list[dict]]
    passes: list[list[dict]]


def choose_rows(rows: Sequence[dict], cfg: EditabilityConfig) -> ProbeRows:
    """Warm and probe fail records (disjoint, a permutation by `cfg.seed`), their rephrasings, and
    `pass_per_edit` pass rows per probe (a permutation of the pass rows, cycled)."""
    fails = [r for r in rows if r["group"] == "fail"]
    passes = [r for r in rows if r["group"] == "pass"]
    if not fails:
        raise ValueError("editability: no 'fail' rows to edit")
    if not passes:
        raise ValueError("editability: no 'pass' rows (the spill is measured on them)")
    rng = np.random.default_rng([cfg.seed, 13])
    order = [fails[i] for i in rng.permutation(len(fails))]
    warm = order[: cfg.warm] if cfg.normalize else []
    probes = order[len(warm) : len(warm) + cfg.probes]
    if not probes:
        raise ValueError(
            f"editability: {len(fails)} fail rows, all taken by warm={cfg.warm}; lower warm or give more rows"
        )
    by_record: dict[str, list[dict]] = {}
    for r in rows:
        if r["group"] == "adapt":
            by_record.setdefault(str(r["record_id"]), []).append(r)
    adapts = [by_record.get(str(p["record_id"]), [])[: cfg.adapt_per_edit] for p in probes]
    pperm = [passes[i] for i in rng.permutation(len(passes))]
    k = cfg.pass_per_edit
    pass_rows = [[pperm[(i * k + j) % len(pperm)] for j in range(k)] for i in range(len(probes))]
    return ProbeRows(warm, probes, adapts, pass_rows)


def _encode_all(model, rows: list[dict]) -> dict[str, np.ndarray]:
    tp = [r.get("text_pair", "") or "" for r in rows] if model.kind == "classifier" else None
    targets = [int(r["label"]) for r in rows] if model.kind == "classifier" else [r["target"] for r in rows]
    return encode(model, [r["prompt"] for r in rows], targets, text_pairs=tp, where="editability rows")


def _take(enc: dict, idx: Sequence[int]) -> dict[str, np.ndarray]:
    """Rows `idx` of `enc`; -1 gives an all-zero row (no target tokens: counts nowhere)."""
    idx = np.asarray(idx, np.int64)
    out = {}
    for k, v in enc.items():
        rows = v[np.maximum(idx, 0)]
        out[k] = np.where((idx >= 0).reshape((-1,) + (1,) * (v.ndim - 1)), rows, 0).astype(v.dtype)
    return out


def _trimmed(model, enc: dict[str, np.ndarray], rows: Sequence[int]) -> dict[str, np.ndarray]:
    """A causal model's `enc` ([N, S] leaves, right-padded) cut to the longest of `rows`: the
    columns past it are padding for those rows, which the causal mask keeps from every real
    position, so their scores are the same and the probe forward passes (most of the cost) run
    on that length instead of the bucket's (SmolLM2's capitals: 10 tokens, not 16). Rows not
    in `rows` may be cut short: score only `rows` of the result. Other kinds: `enc` unchanged."""
    if model.kind != "causal" or not len(rows):
        return enc
    n = int(np.asarray(enc["attention_mask"])[np.asarray(rows)].sum(-1).max())
    return {k: v[:, :n] for k, v in enc.items()}


@functools.partial(jax.jit, static_argnums=(0, 1))
def _capture(apply, weights, params, batch):
    return capture(apply, params, batch, weights)[1]


@functools.partial(jax.jit, static_argnums=(0,))
def _transform(spec, editor_params, norm, factors):
    """The identity editor's factors (u~ [P, S, in], delta~ [P, S, out]) of P probe edits."""
    return transform_factors(spec, editor_params, norm, factors)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _base_pass(apply, block_paths, params, batch):
    """The base model on `batch`: (argmax at the scored positions [B, K], {block path: the
    block's output}), the outputs returned from this same trace (no side effect escapes)."""
    outs = {}

    def keep(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        name = "/".join(context.module.path)
        if context.method_name == "__call__" and name in block_paths:
            outs[name] = out
        return out

    with nn.intercept_methods(keep):
        logits, _, _ = scored_logits(apply, params, batch)
    return jnp.argmax(logits, -1), outs


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _probe(apply, slots, order, params, layer, start, cache, rows, factors, probe, coef, batch, base_argmax):
    """Rows of `batch` [B] each under its own edit of the layer numbered `layer` (a traced int32,
    so one compiled program serves every layer whose weights have the same shapes).

    slots: ((module path, layer number, slot), ...) for every candidate weight; factors: {slot:
    (u~ [P, S, in], delta~ [P, S, out])} of THIS layer's weights; probe [B]: which probe edit row
    b gets; coef [B]: its edit lr. Row b sees each weight W of the layer as

        W' = W - coef_b * sum_t u~_t^T delta~_t      i.e.   x W' = x W - coef_b (x u~^T) delta~

    (the same in the "out_in" layout), applied as that low-rank correction to the module's
    output, so no weight matrix is rebuilt. Blocks the forward pass calls before the edited one
    (order: ((block path, position, per-row flag of each output leaf), ...); start: the edited
    block's position) cannot see the edit: they are not run, their base outputs `cache` {block
    path: output pytree, per-row leaves [N, ...] taken at rows `rows` [B]} are used instead (lax.cond: skipped at run time, one program for every layer). Returns (row correct [B], pass tokens whose argmax
    changed [B], target tokens [B]) at the scored positions."""
    where = {m: (li, k) for m, li, k in slots}
    position = {n: (i, flags) for n, i, flags in order}

    def cached(name):
        tree = cache[name]
        leaves = [c[rows] if f else c for c, f in zip(jax.tree.leaves(tree), position[name][1])]
        return jax.tree.unflatten(jax.tree.structure(tree), leaves)

    def edit(next_fun, args, kwargs, context):
        name = "/".join(context.module.path)
        if context.method_name == "__call__" and name in position:
            return jax.lax.cond(position[name][0] < start, lambda: cached(name), lambda: next_fun(*args, **kwargs))
        out = next_fun(*args, **kwargs)
        if context.method_name != "__call__" or name not in where:
            return out
        li, k = where[name]
        x = args[0] if args else kwargs["inputs"]

        def corrected():
            u, d = factors[k]
            xb = x.reshape(x.shape[0], -1, x.shape[-1]).astype(jnp.float32)
            a = jnp.einsum("bsi,bti->bst", xb, u[probe])
            c = jnp.einsum("bst,bto->bso", a, d[probe]) * coef[:, None, None]
            return (out.astype(jnp.float32) - c.reshape(out.shape)).astype(out.dtype)

        return jax.lax.cond(layer == li, corrected, lambda: out)

    with nn.intercept_methods(edit):
        logits, labels, mask = scored_logits(apply, params, batch)
    am = jnp.argmax(logits, -1)
    m = mask > 0
    changed = ((am != base_argmax) & m).sum(-1)
    return example_correct(logits, labels, mask), changed, m.sum(-1)


def _chunks(n: int, size: int) -> list[np.ndarray]:
    """Index arrays of length `size` covering range(n); the last is padded with -1 (one shape)."""
    out = []
    for s in range(0, n, size):
        idx = np.arange(s, min(s + size, n))
        out.append(np.concatenate([idx, -np.ones(size - len(idx), np.int64)]))
    return out


def editability_profile(model, rows: Sequence[dict], *, layers: Sequence[str] | None = None,
                        config: EditabilityConfig = EditabilityConfig(), top_k: int = 1,
                        params: Any = None, progress: bool = False) -> LayerProfile:
    """The editability of every candidate layer (module docstring) as a `LayerProfile`
    (method "editability"): scores["fail"] the editability, scores["fixed"] / ["spill"] its parts."""
    from tqdm.auto import tqdm

    cfg = config
    cfg.check()
    t0 = time.perf_counter()
    params = model.params if params is None else params
    blocks = model.layers.blocks if layers is None else model.layers.select(list(layers))  # KeyError names the valid ones
    names = [b.name for b in blocks]
    if not 1 <= top_k <= len(names):
        raise ValueError(f"top_k must be in [1, {len(names)}], got {top_k}")
    weights = tuple(w for b in blocks for w in b.weights(cfg.part))
    if not weights:
        raise ValueError(f"the candidate layers list no {cfg.part!r} weights")
    # slot k of a layer = its k-th weight; a layer's weights are passed to the probe by slot
    slots = tuple((w.module_path, i, k) for i, b in enumerate(blocks) for k, w in enumerate(b.weights(cfg.part)))
    pr = choose_rows(rows, cfg)

    # -- 1. rows: one tokenisation (one padded length) for every row used
    flat: list[dict] = []
    pos: dict[int, int] = {}

    def index(r):
        if id(r) not in pos:
            pos[id(r)] = len(flat)
            flat.append(r)
        return pos[id(r)]

    warm_idx = [index(r) for r in pr.warm]
    edit_idx = [[index(p)] + [index(a) for a in ad] + [-1] * (cfg.adapt_per_edit - len(ad)) for p, ad in zip(pr.probes, pr.adapts)]
    pass_idx = [[index(q) for q in qs] for qs in pr.passes]
    enc = _encode_all(model, flat)
    # the rows the forward passes of steps 4-6 score, at their own longest length (the warm
    # rows, often longer, are only captured at the full length)
    used = sorted({r for rr in edit_idx + pass_idx for r in rr if r >= 0})
    scored = with_score_positions(_trimmed(model, enc, used))

    # -- 2. an identity editor, its running statistics warmed on the warm rows
    spec = EditorSpec.from_params(weights, params, EditorConfig(rank=8, n_hidden=1, normalize=cfg.normalize,
                                                                norm_eps=cfg.norm_eps))
    editor, norm = init_editor(spec, jax.random.PRNGKey(cfg.seed))  # identity networks
    mb = cfg.micro_batch
    for s in range(0, len(warm_idx), mb):
        chunk = warm_idx[s : s + mb]
        chunk = chunk + [-1] * (mb - len(chunk))  # one shape: one compilation
        norm = update_norm_state(spec, norm, _capture(model.apply, weights, params, _take(enc, chunk)))

    # -- 3. factors: every probe's factors of every candidate weight: one capture per micro-batch of probes
    # (summed_nll keeps each row's factors its own), stacked [P, S, .] and kept on the device
    n_l, n_lr, n_p = len(names), len(cfg.lrs), len(pr.probes)
    parts = []
    for idx in _chunks(n_p, mb):  # the warm rows' batch shape: one compilation
        f = _transform(spec, editor, norm,
                       _capture(model.apply, weights, params, _take(enc, [edit_idx[i][0] if i >= 0 else -1 for i in idx])))
        parts.append({p: (v.u[idx >= 0], v.delta[idx >= 0]) for p, v in f.items()})
    fac = {p: (jnp.concatenate([q[p][0] for q in parts]), jnp.concatenate([q[p][1] for q in parts])) for p in parts[0]}

    # -- 4. base pass: the base model once on every row a probe scores: its argmax, and each block's output
    # (the edited forward passes start at the edited block from these)
    all_blocks = model.layers.blocks
    block_paths = tuple(b.module_path for b in all_blocks)
    at = {r: n for n, r in enumerate(used)}
    order = block_call_order(model.apply, params, {k: v[:1] for k, v in scored.items()}, block_paths)
    base_am, outs_all = [], []
    size = max(mb, 2)  # a leaf with leading dim `size` is per row; others (T5's [1, ...] bias) are shared
    for idx in _chunks(len(used), size):
        am, outs = _base_pass(model.apply, block_paths, params,
                              {k: jnp.asarray(v) for k, v in _take(scored, [used[i] if i >= 0 else -1 for i in idx]).items()})
        base_am.append(am[idx >= 0])
        outs_all.append((idx >= 0, outs))
    base_am = jnp.concatenate(base_am)
    per_row = {n: tuple(leaf.shape[0] == size for leaf in jax.tree.leaves(outs_all[0][1][n])) for n in block_paths}
    cache = {}
    for n in block_paths:
        leaves = [jax.tree.leaves(o[n]) for _, o in outs_all]
        cache[n] = jax.tree.unflatten(jax.tree.structure(outs_all[0][1][n]), [
            jnp.concatenate([lv[k][keep] for (keep, _), lv in zip(outs_all, leaves)]) if flag else leaves[0][k]
            for k, flag in enumerate(per_row[n])])

    # -- 5. plan: the rows one layer is scored on: per probe i and lr j, its edit rows then its pass rows
    plan = [(r, i, j, kind) for i in range(n_p) for j in range(n_lr)
            for kind, rr in (("edit", edit_idx[i]), ("pass", pass_idx[i])) for r in rr]
    row = np.array([r for r, _, _, _ in plan])
    probe = np.array([i for _, i, _, _ in plan], np.int32)
    lr_of = np.array([j for _, _, j, _ in plan])
    is_edit = np.array([k == "edit" for _, _, _, k in plan])
    batches = []
    n_chunks = -(-len(plan) // cfg.probe_batch)
    for idx in _chunks(len(plan), -(-len(plan) // n_chunks)):
        ok_row = idx >= 0
        r = np.where(ok_row, row[np.maximum(idx, 0)], -1)
        b = {k: jnp.asarray(v) for k, v in _take(scored, r).items()}
        pos_ = jnp.asarray(np.array([at.get(int(x), 0) for x in r], np.int32))
        batches.append((idx, b, jnp.asarray(np.where(ok_row, probe[np.maximum(idx, 0)], 0).astype(np.int32)), pos_))
    order_t = tuple((n, order[n], per_row[n]) for n in block_paths)

    # -- 6. probe every candidate layer: edits fixed and pass tokens changed per (layer, lr, probe)
    fixed = np.zeros((n_l, n_lr, n_p))
    spill = np.zeros((n_l, n_lr, n_p))
    lrs = np.asarray(cfg.lrs, np.float32)
    valid_edit = np.array([r >= 0 for r, _, _, _ in plan]) & is_edit
    bar = tqdm(total=n_l, desc="editability", disable=not progress, leave=False)
    for li, b in enumerate(blocks):
        layer_fac = {k: fac[w.path] for k, w in enumerate(b.weights(cfg.part))}
        ok_all = np.zeros(len(plan), bool)
        changed_all = np.zeros(len(plan))
        tokens_all = np.zeros(len(plan))
        start = jnp.int32(order[b.module_path])
        for idx, batch, pb, pos_ in batches:
            coef = jnp.asarray(np.where(idx >= 0, lrs[lr_of[np.maximum(idx, 0)]], 0.0).astype(np.float32))
            ok, changed, tokens = jax.device_get(
                _probe(model.apply, slots, order_t, params, jnp.int32(li), start, cache, pos_, layer_fac, pb, coef,
                       batch, base_am[pos_]))
            keep = idx >= 0
            ok_all[idx[keep]] = np.asarray(ok)[keep]
            changed_all[idx[keep]] = np.asarray(changed)[keep]
            tokens_all[idx[keep]] = np.asarray(tokens)[keep]
        for i in range(n_p):
            for j in range(n_lr):
                sel = (probe == i) & (lr_of == j)
                fixed[li, j, i] = ok_all[sel & valid_edit].mean()
                ps = sel & ~is_edit
                spill[li, j, i] = changed_all[ps].sum() / max(tokens_all[ps].sum(), 1)
        bar.update(1)
    bar.close()
    return profile_from_grid(names, fixed, spill, cfg, top_k=top_k, model=model.name, part=cfg.part,
                             examples={"warm": len(pr.warm), "probes": n_p, "adapt": sum(map(len, pr.adapts)),
                                       "pass": n_p * cfg.pass_per_edit},
                             wall_time=time.perf_counter() - t0)


def profile_from_grid(names: Sequence[str], fixed: np.ndarray, spill: np.ndarray, cfg: EditabilityConfig, *,
                      top_k: int, model: str, part: str, examples: dict, wall_time: float) -> LayerProfile:
    """The LayerProfile of per-(layer, lr, probe) fixed / spill shares [L, n_lr, n_probes]."""
    grid = fixed.mean(-1) - cfg.spill_weight * spill.mean(-1)  # [L, n_lr]
    best = grid.argmax(-1)  # ties: the smaller lr
    rows = range(len(names))
    score = [float(grid[i, best[i]]) for i in rows]
    return LayerProfile(
        method="editability", scorer=NAME, layers=tuple(names),
        scores={"fail": score, "fixed": [float(fixed[i, best[i]].mean()) for i in rows],
                "spill": [float(spill[i, best[i]].mean()) for i in rows]},
        chosen=top_k_layers(score, list(names), top_k), select_group="fail", part=part, top_k=top_k,
        examples=examples, wall_time=wall_time, model=model,
        extra=jsonable({
            "best_lr": [cfg.lrs[b] for b in best], "lrs": list(cfg.lrs),
            "grid": {"score": grid, "fixed": fixed.mean(-1), "spill": spill.mean(-1)},
            "per_probe": {"fixed": fixed, "spill": spill}, "config": dataclasses.asdict(cfg),
        }),
    )
