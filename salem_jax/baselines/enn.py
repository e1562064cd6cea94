"""ENN: Editable Neural Networks (Sinitsin et al. 2020), as ported by MEND (`algs/enn.py`).

An edit is `n_edit_steps` plain gradient steps on the edit's NLL, applied to the edited weights
only, each weight with its own learned step size:

    W <- W - lr_W * grad_W NLL(model(theta), edit)            (repeated n_edit_steps times)

What makes it "editable" is that the *base model itself* is trained for it (meta-learning): the
outer loss, for one edit and a batch of locality inputs, is

    L = c_edit * NLL(edited(theta), edit)
      + c_loc  * KL(theta's logits (no gradient) || edited(theta)'s logits, locality)
      + c_base * KL(original model || theta, locality)          (keeps theta near the given model)

and its gradient (second order through the inner steps unless `first_order`) moves every base
parameter theta and the step sizes lr_W. After training, the user's model is theta* (not the
given model) and editing it is the inner loop above.

Kept from MEND's port: one learnable scalar step size per edited tensor (init 1e-2), a single
inner SGD step by default, second-order gradients by default, the three loss terms with MEND's
defaults (c_edit 0.1, c_loc 1.0, c_base 1.0; the "distill" base loss), Adam at 1e-5 on every base
parameter, Adam at 1e-3 on the step sizes, global-norm clipping at 100.
Changed: MEND also puts the step sizes into the main Adam (so they get two Adam updates per step);
here they get only their own Adam (lr_lr). No gradient accumulation (one edit per step; raise
`edits_per_step` for a larger batch). The original paper's stopping rule for the inner loop
(repeat until the margin is met, up to a maximum) and its stability/editability weights are not
used, as in MEND's port. The edit's own input stands in for MEND's rephrased "edit_outer" input
(FEVER and RTE records carry no rephrasings here).

Shapes: `params` is the model's pytree; `lrs` is {weight path: scalar}; batches follow
models/base.py (logits [B, S, V]).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax
from tqdm.auto import tqdm

from salem_jax import losses
from salem_jax.baselines.finetune import position_mask
from salem_jax.baselines.meta_data import MetaData, encode_rows
from salem_jax.models.base import Weight, get_path, set_path


@dataclasses.dataclass(frozen=True)
class ENNConfig:
    n_edit_steps: int = 1
    edit_lr_init: float = 1e-2
    first_order: bool = False
    c_edit: float = 0.1
    c_loc: float = 1.0
    c_base: float = 1.0
    lr: float = 1e-5  # Adam on the base parameters
    lr_lr: float = 1e-3  # Adam on the per-weight step sizes
    grad_clip: float = 100.0
    steps: int = 100
    edits_per_step: int = 1
    loc_per_step: int = 8
    seed: int = 0


def _paths(weights: Sequence[Weight | str]) -> tuple[str, ...]:
    paths = tuple(w.path if isinstance(w, Weight) else str(w) for w in weights)
    if not paths or len(set(paths)) != len(paths):
        raise ValueError(f"ENN needs distinct weights to edit, got {paths}")
    return paths


def _nll(apply, params, batch):
    return losses.batch_nll(apply(params, batch), batch["labels"], batch["label_mask"])


def _loc_mask(batch):
    return position_mask(batch)


def enn_edit(apply: Callable, params: Any, lrs: dict, paths: Sequence[str], batch: dict, n_steps: int,
             first_order: bool = False) -> Any:
    """The edit: `n_steps` gradient steps on NLL(batch) over the weights at `paths`, step size
    lrs[path] each. Differentiable in `params` and `lrs` (second order unless `first_order`)."""
    for _ in range(n_steps):
        sub = {p: get_path(params, p) for p in paths}

        def loss(s, params=params):
            full = params
            for p, v in s.items():
                full = set_path(full, p, v)
            return _nll(apply, full, batch)

        g = jax.grad(loss)(sub)
        if first_order:
            g = jax.lax.stop_gradient(g)
        for p in paths:
            params = set_path(params, p, sub[p] - lrs[p] * g[p])
    return params


def enn_loss(trainable: dict, original_loc_logits, apply: Callable, paths: Sequence[str], edit_batch: dict,
             loc_batch: dict, config: ENNConfig) -> tuple[jax.Array, dict]:
    """MEND's outer loss for ENN (module docstring); `trainable` = {"params": theta, "lrs": {...}}."""
    theta, lrs = trainable["params"], trainable["lrs"]
    base_loc = apply(theta, loc_batch)
    edited = enn_edit(apply, theta, lrs, paths, edit_batch, config.n_edit_steps, config.first_order)
    l_edit = _nll(apply, edited, edit_batch)
    mask = _loc_mask(loc_batch)
    l_loc = losses.kl_divergence(jax.lax.stop_gradient(base_loc), apply(edited, loc_batch), mask)
    l_base = losses.kl_divergence(original_loc_logits, base_loc, mask)
    total = config.c_edit * l_edit + config.c_loc * l_loc + config.c_base * l_base
    return total, dict(edit=l_edit, loc=l_loc, base=l_base, total=total)


def make_optimizer(config: ENNConfig, trainable: dict) -> optax.GradientTransformation:
    labels = {"params": jax.tree.map(lambda _: "params", trainable["params"]),
              "lrs": jax.tree.map(lambda _: "lrs", trainable["lrs"])}
    return optax.chain(
        optax.clip_by_global_norm(config.grad_clip),
        optax.multi_transform({"params": optax.adam(config.lr), "lrs": optax.adam(config.lr_lr)}, labels),
    )


@functools.lru_cache(maxsize=8)
def _make_step(apply: Callable, paths: tuple[str, ...], config: ENNConfig):
    def step(trainable, opt_state, original_params, edit_batch, loc_batch):
        original_loc = apply(original_params, loc_batch)
        (_, parts), grads = jax.value_and_grad(enn_loss, has_aux=True)(
            trainable, original_loc, apply, paths, edit_batch, loc_batch, config)
        tx = make_optimizer(config, trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, parts

    return jax.jit(step)


def init_enn(params: Any, weights: Sequence[Weight | str], config: ENNConfig = ENNConfig()) -> dict:
    paths = _paths(weights)
    for p in paths:
        get_path(params, p)  # a clear KeyError for an unknown weight
    return {"params": params, "lrs": {p: jnp.asarray(config.edit_lr_init, jnp.float32) for p in paths}}


def enn_train_step(model, trainable, opt_state, weights, edit_batch, loc_batch, config: ENNConfig,
                   original_params=None):
    """One outer step; returns (trainable, opt_state, loss parts). `original_params` default to
    `model.params` (the c_base term's reference)."""
    step = _make_step(model.apply, _paths(weights), config)
    orig = model.params if original_params is None else original_params
    return step(trainable, opt_state, orig, edit_batch, loc_batch)


@dataclasses.dataclass
class ENNResult:
    params: Any  # theta*: the editable base model (replaces the given model)
    lrs: dict
    paths: tuple[str, ...]
    history: list[dict]
    seconds: float


def train_enn(model, data: MetaData, weights: Sequence[Weight | str], config: ENNConfig = ENNConfig(),
              progress: bool = True) -> ENNResult:
    """Meta-train the base model for editability on `data` (MetaData of the editor-train split)."""
    t0 = time.perf_counter()
    paths = _paths(weights)
    trainable = init_enn(model.params, paths, config)
    tx = make_optimizer(config, trainable)
    opt_state = tx.init(trainable)
    history = []
    bar = tqdm(range(config.steps), desc="ENN", disable=not progress)
    for s in bar:
        eb, lb = data.batch(s)
        trainable, opt_state, parts = enn_train_step(model, trainable, opt_state, paths, eb, lb, config)
        if s % 10 == 0 or s == config.steps - 1:
            rec = {k: float(v) for k, v in parts.items()}
            history.append(dict(step=s, **rec))
            bar.set_postfix(loss=f"{rec['total']:.4f}")
    return ENNResult(trainable["params"], trainable["lrs"], paths, history, time.perf_counter() - t0)


def enn_edit_fn(model, result: ENNResult, n_edit_steps: int = 1) -> Callable[[list[dict]], Any]:
    """Edit function for the pipeline's evaluation: rows -> theta* edited by the inner loop."""
    edit = jax.jit(lambda params, lrs, batch: enn_edit(model.apply, params, lrs, result.paths, batch, n_edit_steps))

    def fn(rows):
        return edit(result.params, result.lrs, encode_rows(model, rows))

    return fn
