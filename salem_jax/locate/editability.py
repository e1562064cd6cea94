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

Cost: one capture (forward + backward, all candidate layers at once) per warm and probe row, and
per (layer, lr, probe) one forward pass of 1 + adapt_per_edit + pass_per_edit rows. The probe
step is jitted once: the layer is a one-hot mask argument, not a static one, so scoring 30
layers compiles as much as scoring one.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from salem_jax.data.tokenize import encode
from salem_jax.losses import example_correct
from salem_jax.mend.capture import capture
from salem_jax.mend.editor import EditorConfig, EditorSpec, init_editor, pseudo_grads, update_norm_state
from salem_jax.models.base import get_path, set_path
from salem_jax.locate.profile import LayerProfile, jsonable, top_k_layers

NAME = "editability"  # the scorer's name in `locate`, `salem locate --method` and `--scorer`


@dataclasses.dataclass(frozen=True)
class EditabilityConfig:
    """lrs: the edit learning rates tried (each layer keeps its best); warm: fail records whose
    factors fill the running statistics first; probes: fail records edited one at a time;
    adapt_per_edit / pass_per_edit: rows scored per probe; spill_weight: the price of one changed
    pass token against one fixed edit row; normalize / norm_eps: MEND's standardisation (as the
    editor's EditorConfig); micro_batch: warm rows per capture call."""

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
    seed: int = 0

    def check(self) -> None:
        if not self.lrs or any(not np.isfinite(x) or x <= 0 for x in self.lrs):
            raise ValueError(f"EditabilityConfig.lrs must be positive numbers, got {self.lrs}")
        if self.probes < 1 or self.warm < 0 or self.adapt_per_edit < 0 or self.pass_per_edit < 1:
            raise ValueError("EditabilityConfig: probes >= 1, warm >= 0, adapt_per_edit >= 0, pass_per_edit >= 1")
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


@functools.partial(jax.jit, static_argnums=(0, 1))
def _capture(apply, weights, params, batch):
    return capture(apply, params, batch, weights)[1]


@functools.partial(jax.jit, static_argnums=(0,))
def _pseudo(spec, editor_params, norm, factors):
    return pseudo_grads(spec, editor_params, norm, factors)


@functools.partial(jax.jit, static_argnums=(0,))
def _predict(apply, params, batch):
    logits = apply(params, batch)
    return jnp.argmax(logits, -1), example_correct(logits, batch["labels"], batch["label_mask"])


@functools.partial(jax.jit, static_argnums=(0, 1))
def _probe(apply, owners, params, grads, mask, lr, edit_batch, pass_batch, base_pass_argmax):
    """One edit on the layers selected by `mask` [L] (owners: (weight path, layer index) pairs):
    (edit rows correct [E], pass tokens whose argmax changed [P], pass target tokens [P])."""
    new = params
    for path, li in owners:
        w = get_path(params, path)
        new = set_path(new, path, (w.astype(jnp.float32) - lr * mask[li] * grads[path]).astype(w.dtype))
    _, edit_ok = _predict(apply, new, edit_batch)
    am, _ = _predict(apply, new, pass_batch)
    m = pass_batch["label_mask"] > 0
    changed = ((am != base_pass_argmax) & m).sum(-1)
    return edit_ok, changed, m.sum(-1)


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
    owners = tuple((w.path, i) for i, b in enumerate(blocks) for w in b.weights(cfg.part))
    if not weights:
        raise ValueError(f"the candidate layers list no {cfg.part!r} weights")
    pr = choose_rows(rows, cfg)

    # one tokenisation (one padded length) for every row used
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

    spec = EditorSpec.from_params(weights, params, EditorConfig(rank=8, n_hidden=1, normalize=cfg.normalize,
                                                                norm_eps=cfg.norm_eps))
    editor, norm = init_editor(spec, jax.random.PRNGKey(cfg.seed))  # identity networks
    for s in range(0, len(warm_idx), cfg.micro_batch):
        chunk = warm_idx[s : s + cfg.micro_batch]
        chunk = chunk + [-1] * (cfg.micro_batch - len(chunk))  # one shape: one compilation
        norm = update_norm_state(spec, norm, _capture(model.apply, weights, params, _take(enc, chunk)))

    n_l, n_lr, n_p = len(names), len(cfg.lrs), len(pr.probes)
    fixed = np.zeros((n_l, n_lr, n_p))
    spill = np.zeros((n_l, n_lr, n_p))
    eye = np.eye(n_l, dtype=np.float32)
    bar = tqdm(total=n_p * n_l * n_lr, desc="editability", disable=not progress, leave=False)
    for i in range(n_p):
        eb, pb = _take(enc, edit_idx[i]), _take(enc, pass_idx[i])
        grads = _pseudo(spec, editor, norm, _capture(model.apply, weights, params, _take(enc, edit_idx[i][:1])))
        base_am, _ = _predict(model.apply, params, pb)
        valid = np.asarray(eb["label_mask"]).sum(-1) > 0
        for li in range(n_l):
            for j, lr in enumerate(cfg.lrs):
                ok, changed, tokens = jax.device_get(
                    _probe(model.apply, owners, params, grads, eye[li], jnp.float32(lr), eb, pb, base_am))
                fixed[li, j, i] = np.asarray(ok)[valid].mean()
                spill[li, j, i] = np.asarray(changed).sum() / max(int(np.asarray(tokens).sum()), 1)
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
