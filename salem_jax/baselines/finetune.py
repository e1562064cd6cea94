"""Fine-tuning baselines: FT (fine-tune chosen weights on the edits) and FT+KL.

FT (as in MEND's and ROME's baselines): minimise the mean target NLL of the edit batch
(`losses.batch_nll`, teacher forced) with Adam for a fixed number of steps, updating only the
chosen weight matrices (`Weight` paths from the layer table, e.g.
`model.layers.weights(["h.5"])`). Only those leaves are differentiated: every other leaf of
the returned parameters is the very same array as in the input.

FT+KL adds `kl_weight * KL(p_base || p_new)` on locality inputs (MEND's locality loss,
`losses.kl_divergence`, base distribution first), averaged over every real position of those
inputs: all tokens of a causal LM, all decoder tokens of an encoder-decoder, the one class
distribution of a classifier. The base distributions are computed once before training.

`max_change` (optional) clamps every updated entry to within +-max_change of its base value
after each step (ROME's "FT-L" norm constraint, an L-infinity ball).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax
from tqdm.auto import tqdm

from salem_jax import losses
from salem_jax.models.base import Weight, get_path, set_path


@dataclasses.dataclass(frozen=True)
class FTConfig:
    steps: int = 25  # Adam steps (ROME's FT: 25)
    lr: float = 1e-3  # Adam learning rate
    kl_weight: float = 0.0  # > 0: FT+KL
    max_change: float | None = None  # L-inf clamp around the base weights (FT-L); None = off


def _paths(weights: Sequence[Weight | str]) -> tuple[str, ...]:
    paths = tuple(w.path if isinstance(w, Weight) else str(w) for w in weights)
    if not paths:
        raise ValueError("fine-tuning needs at least one weight to train")
    dup = {p for p in paths if paths.count(p) > 1}
    if dup:
        raise ValueError(f"weights listed twice: {sorted(dup)}")
    return paths


def _merge(params: Any, sub: dict[str, jax.Array]) -> Any:
    for path, value in sub.items():
        params = set_path(params, path, value)
    return params


def position_mask(batch: dict) -> jax.Array:
    """The real positions of a batch's logits: decoder tokens (encoder-decoder), the class
    position (classifier, logits S = 1) or the input tokens (causal LM)."""
    if "decoder_attention_mask" in batch:
        return batch["decoder_attention_mask"]
    if batch["labels"].shape[1] != batch["input_ids"].shape[1]:
        return batch["label_mask"]
    return batch["attention_mask"]


# The optimizer of every fine-tuning step: Adam's moment estimates (optax defaults), with the
# learning rate applied by `ft_step` as an argument, so one compilation serves every rate
# (the layer sweep runs several). Identical to `optax.adam(lr)`: w + (-lr * u) == w - lr * u.
_ADAM = optax.scale_by_adam()


def ft_init(sub: dict[str, jax.Array]) -> Any:
    """The optimizer state of `ft_step` for the trained leaves `sub` {path: array}."""
    return _ADAM.init(sub)


def ft_step(
    apply: Callable,
    sub: dict[str, jax.Array],
    opt_state: Any,
    params: Any,
    edit_batch: dict,
    lr: jax.Array | float,
    *,
    kl_weight: float = 0.0,
    loc_batch: dict | None = None,
    base_loc_logits: jax.Array | None = None,
    max_change: float | None = None,
    base_sub: dict[str, jax.Array] | None = None,
) -> tuple[dict[str, jax.Array], Any, jax.Array]:
    """One Adam step of FT (FT+KL when `kl_weight`) on the leaves `sub` {path: array} of
    `params` (the rest frozen): (new sub, new optimizer state, the loss before the step).

    Pure and not jitted: `finetune` jits it per model, `locate.sweep` scans it over steps. `lr`
    may be a traced scalar. `max_change` clamps each leaf to within +-max_change of `base_sub`."""

    def loss_fn(s):
        p = _merge(params, s)
        loss = losses.batch_nll(apply(p, edit_batch), edit_batch["labels"], edit_batch["label_mask"])
        if kl_weight:
            kl = losses.kl_divergence(base_loc_logits, apply(p, loc_batch), position_mask(loc_batch))
            loss = loss + kl_weight * kl
        return loss

    loss, grads = jax.value_and_grad(loss_fn)(sub)
    updates, opt_state = _ADAM.update(grads, opt_state, sub)
    sub = jax.tree.map(lambda w, u: w - (lr * u).astype(w.dtype), sub, updates)
    if max_change is not None:
        sub = jax.tree.map(lambda w, b: b + jnp.clip(w - b, -max_change, max_change), sub, base_sub)
    return sub, opt_state, loss


@functools.lru_cache(maxsize=32)
def _make_step(apply: Callable, kl_weight: float, max_change: float | None):
    @jax.jit
    def step(sub, opt_state, base_sub, params, edit_batch, loc_batch, base_loc_logits, lr):
        return ft_step(
            apply, sub, opt_state, params, edit_batch, lr, kl_weight=kl_weight, loc_batch=loc_batch,
            base_loc_logits=base_loc_logits, max_change=max_change, base_sub=base_sub,
        )

    return step


def finetune(
    model,
    params: Any,
    weights: Sequence[Weight | str],
    edit_batch: dict,
    *,
    loc_batch: dict | None = None,
    config: FTConfig = FTConfig(),
    progress: bool = True,
    history: list | None = None,
) -> Any:
    """FT (or FT+KL when `config.kl_weight > 0`) of `weights` on `edit_batch`.

    `edit_batch` / `loc_batch` follow the batch convention (models/base.py), e.g. from
    `salem_jax.data.tokenize.encode`. Returns new parameters; `params` is not modified and
    every leaf outside `weights` is returned as the same array. If `history` is a list, the
    loss before each step is appended to it.
    """
    paths = _paths(weights)
    if config.steps < 0:
        raise ValueError(f"steps must be >= 0, got {config.steps}")
    if config.kl_weight and loc_batch is None:
        raise ValueError("FT+KL (kl_weight > 0) needs locality inputs: pass loc_batch")
    base_sub = {p: get_path(params, p) for p in paths}
    step = _make_step(model.apply, float(config.kl_weight), config.max_change)
    lr = jnp.float32(config.lr)
    if config.kl_weight:
        base_loc_logits = jax.jit(model.apply)(params, loc_batch)
    else:
        loc_batch, base_loc_logits = None, None
    sub = dict(base_sub)
    opt_state = ft_init(sub)
    bar = tqdm(range(config.steps), desc="FT+KL" if config.kl_weight else "FT", disable=not progress)
    for _ in bar:
        sub, opt_state, loss = step(sub, opt_state, base_sub, params, edit_batch, loc_batch, base_loc_logits, lr)
        if history is not None or progress:
            loss = float(loss)
            if history is not None:
                history.append(loss)
            bar.set_postfix(loss=f"{loss:.4f}")
    return _merge(params, sub)


def finetune_kl(
    model,
    params: Any,
    weights: Sequence[Weight | str],
    edit_batch: dict,
    loc_batch: dict,
    *,
    config: FTConfig = FTConfig(kl_weight=1.0),
    progress: bool = True,
    history: list | None = None,
) -> Any:
    """FT+KL: `finetune` with the KL(base || new) locality term on `loc_batch`
    (`config.kl_weight` must be > 0; MEND's default locality weight is 1.0)."""
    if not config.kl_weight > 0:
        raise ValueError(f"FT+KL needs kl_weight > 0, got {config.kl_weight}")
    return finetune(
        model, params, weights, edit_batch, loc_batch=loc_batch, config=config, progress=progress, history=history
    )
