"""The brute-force oracle: edit each layer in turn and measure what it does.

For every layer l and learning rate lr: fine-tune ONLY layer l's weights (the layer table's MLP
kernels by default) with Adam for a fixed number of full-batch steps on the edit requests
("fail" rows: loss = mean target-token NLL), then measure on the edited model

    edit accuracy (EA)       share of edit rows whose whole target is the argmax (teacher forced)
    rephrase accuracy (RA)   the same on the rephrasings ("adapt" rows); None without them
    locality                 share of the "pass" rows' target tokens whose argmax is the same as
                             the base model's
    drawdown                 1 - locality (what the budget below is about)
    pass accuracy drop       pass accuracy before minus after (the paper's DD on kept inputs)

Drawdown-aware ranking: per layer the best learning rate, and across layers the order, both by
the key (drawdown <= budget, mean(EA, RA), locality), compared lexicographically - edit and
rephrase accuracy among the layers within the drawdown budget first, then the others. Ranking
by EA alone is misleading (on SmolLM2 the last layer corrects the most edits while breaking many
inputs the model knew).

The edits are fine-tuned jointly (one batch of all edit rows per step). Each layer's training run
is one jitted function (the Adam steps in a `lax.scan`), compiled once per layer and shape and
reused across learning rates (lr is an argument) and across calls; evaluation compiles once per
batch shape.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from salem_jax.baselines.finetune import ft_init, ft_step
from salem_jax.compile_cache import compilations
from salem_jax.losses import example_correct
from salem_jax.models.base import Block, LoadedModel, Part, get_path, set_path
from tqdm.auto import tqdm
from salem_jax.locate.profile import LayerProfile, jsonable, top_k_layers



@dataclasses.dataclass(frozen=True)
class SweepConfig:
    learning_rates: tuple[float, ...] = (1e-4, 1e-3)
    steps: int = 10
    part: Part = "mlp"
    drawdown_budget: float = 0.1


@dataclasses.dataclass(frozen=True)
class LayerOutcome:
    """One (layer, learning rate) run. Per-row arrays allow bootstrapping over edits."""

    layer: str
    lr: float
    edit_correct: np.ndarray  # [N_fail] bool
    rephrase_correct: np.ndarray | None  # [N_adapt] bool
    pass_unchanged: np.ndarray | None  # [N_pass] tokens whose argmax is unchanged
    pass_tokens: np.ndarray | None  # [N_pass] target tokens per row
    pass_correct_after: np.ndarray | None  # [N_pass] bool
    losses: np.ndarray  # [steps] training loss before each step

    @property
    def edit_acc(self) -> float:
        return float(self.edit_correct.mean())

    @property
    def rephrase_acc(self) -> float | None:
        return None if self.rephrase_correct is None else float(self.rephrase_correct.mean())

    @property
    def locality(self) -> float:
        if self.pass_tokens is None:
            return 1.0
        return float(self.pass_unchanged.sum() / max(self.pass_tokens.sum(), 1))

    @property
    def drawdown(self) -> float:
        return 1.0 - self.locality

    def summary(self, pass_acc_before: float | None = None) -> dict:
        d = {
            "layer": self.layer,
            "lr": self.lr,
            "edit_acc": self.edit_acc,
            "rephrase_acc": self.rephrase_acc,
            "locality": self.locality,
            "drawdown": self.drawdown,
            "final_loss": float(self.losses[-1]),
            "first_loss": float(self.losses[0]),
        }
        if self.pass_correct_after is not None and pass_acc_before is not None:
            d["pass_acc_after"] = float(self.pass_correct_after.mean())
            d["pass_acc_drop"] = pass_acc_before - d["pass_acc_after"]
        return d


def ranking_key(edit_acc: float, rephrase_acc: float | None, locality: float, budget: float) -> tuple:
    """The drawdown-aware key (bigger is better): within budget, mean(EA, RA), locality."""
    acc = edit_acc if rephrase_acc is None else 0.5 * (edit_acc + rephrase_acc)
    return (1.0 - locality <= budget + 1e-12, acc, locality)


@dataclasses.dataclass(frozen=True)
class SweepResult:
    layers: tuple[str, ...]
    config: SweepConfig
    outcomes: tuple[LayerOutcome, ...]  # every (layer, lr)
    pass_acc_before: float | None
    wall_time: float
    train_steps: int  # fine-tuning steps run in total
    compiles: int

    def best(self, layer: str) -> LayerOutcome:
        """The layer's run with the best drawdown-aware key over learning rates."""
        runs = [o for o in self.outcomes if o.layer == layer]
        if not runs:
            raise KeyError(f"layer {layer!r} was not swept; swept: {self.layers}")
        b = self.config.drawdown_budget
        return max(runs, key=lambda o: ranking_key(o.edit_acc, o.rephrase_acc, o.locality, b))

    def keys(self) -> list[tuple]:
        b = self.config.drawdown_budget
        return [ranking_key(o.edit_acc, o.rephrase_acc, o.locality, b) for o in (self.best(n) for n in self.layers)]

    def ranking(self) -> tuple[str, ...]:
        """Layers best first (ties keep table order)."""
        keys = self.keys()
        order = sorted(range(len(self.layers)), key=lambda i: keys[i], reverse=True)
        return tuple(self.layers[i] for i in order)

    def oracle_scores(self) -> np.ndarray:
        """[L] scores whose order is the drawdown-aware ranking (equal keys get equal scores):
        minus the average rank position, so higher is better."""
        return oracle_scores_from_keys(self.keys())

    def table(self) -> list[dict]:
        return [self.best(n).summary(self.pass_acc_before) for n in self.layers]

    def to_profile(self, top_k: int = 1, model: str = ""):

        scores = self.oracle_scores()
        return LayerProfile(
            method="sweep",
            scorer="drawdown_aware",
            layers=self.layers,
            scores={"fail": [float(x) for x in scores]},
            chosen=top_k_layers(scores, self.layers, top_k),
            select_group="fail",
            part=self.config.part,
            top_k=top_k,
            examples={
                "fail": len(self.outcomes[0].edit_correct),
                "adapt": 0 if self.outcomes[0].rephrase_correct is None else len(self.outcomes[0].rephrase_correct),
                "pass": 0 if self.outcomes[0].pass_tokens is None else len(self.outcomes[0].pass_tokens),
            },
            wall_time=self.wall_time,
            model=model,
            extra=jsonable(
                {
                    "ranking": self.ranking(),
                    "best_per_layer": self.table(),
                    "all_runs": [o.summary(self.pass_acc_before) for o in self.outcomes],
                    "config": dataclasses.asdict(self.config),
                    "pass_acc_before": self.pass_acc_before,
                    "train_steps": self.train_steps,
                    "compiles": self.compiles,
                }
            ),
        )


def oracle_scores_from_keys(keys: Sequence[tuple]) -> np.ndarray:
    """Minus the average (tie-aware) rank position of each key, descending order = position 0."""
    order = sorted(range(len(keys)), key=lambda i: keys[i], reverse=True)
    pos = np.empty(len(keys))
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and keys[order[j + 1]] == keys[order[i]]:
            j += 1
        for k in range(i, j + 1):
            pos[order[k]] = 0.5 * (i + j)
        i = j + 1
    return -pos


# ----------------------------------------------------------------------------- one layer


def _trainable_paths(block: Block, part: Part) -> tuple[str, ...]:
    ws = block.weights(part)
    if not ws:
        raise ValueError(f"layer {block.name} lists no {part!r} weights")
    return tuple(w.path for w in ws)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _finetune(apply, paths, steps, params, batch, lr):
    """`steps` full-batch Adam steps (the FT baseline's `ft_step`) on the leaves at `paths` (the
    rest of params frozen): (new leaves {path: array}, training loss before each step [steps])."""
    trainable = {q: get_path(params, q) for q in paths}

    def one(carry, _):
        tr, st = carry
        # lr is an argument, not baked into the optimizer: one compilation serves every lr
        tr, st, loss = ft_step(apply, tr, st, params, batch, lr)
        return (tr, st), loss

    (trainable, _), losses = jax.lax.scan(one, (trainable, ft_init(trainable)), None, length=steps)
    return trainable, losses


@functools.partial(jax.jit, static_argnums=(0,))
def _predict(apply, params, batch):
    """(argmax tokens [B, S], whole target correct [B])."""
    logits = apply(params, batch)
    return jnp.argmax(logits, -1), example_correct(logits, batch["labels"], batch["label_mask"])


def finetune_layer(
    model: LoadedModel, params: Any, layer: str, edits: dict, *, lr: float = 1e-3, steps: int = 10, part: Part = "mlp"
) -> tuple[Any, np.ndarray]:
    """Fine-tune one layer's weights on `edits`; returns (new params, losses). `params` is not
    modified: the result is a new tree sharing every untouched leaf."""
    paths = _trainable_paths(model.layers[layer], part)
    _check_rows(model, edits, "edits")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    trainable, losses = _finetune(model.apply, paths, steps, params, {k: jnp.asarray(v) for k, v in edits.items()}, jnp.float32(lr))
    new = params
    for q, v in trainable.items():
        new = set_path(new, q, v)
    return new, np.asarray(losses)


def _check_rows(model: LoadedModel, batch: dict | None, where: str) -> None:
    if batch is None:
        return
    for k in ("input_ids", "labels", "label_mask"):
        if k not in batch:
            raise ValueError(f"{where}: missing field {k!r}")
    n = np.shape(batch["input_ids"])[0]
    if n == 0:
        raise ValueError(f"{where}: empty batch")
    if np.shape(batch["input_ids"])[1] > model.max_length:
        raise ValueError(f"{where}: {np.shape(batch['input_ids'])[1]} tokens, longer than the context ({model.max_length})")
    empty = np.flatnonzero(np.asarray(batch["label_mask"]).sum(-1) == 0)
    if len(empty):
        raise ValueError(f"{where}: row {int(empty[0])} has no target tokens (field 'label_mask' is all zero)")


# ----------------------------------------------------------------------------- the sweep


def sweep_layers(
    model: LoadedModel,
    params: Any,
    edits: dict,
    *,
    rephrases: dict | None = None,
    keep: dict | None = None,
    layers: Sequence[str] | None = None,
    config: SweepConfig = SweepConfig(),
    progress: bool = False,
) -> SweepResult:
    """Fine-tune each layer alone on `edits` for each learning rate and measure EA, RA,
    locality and drawdown (see the module docstring). `rephrases` are the "adapt" rows and
    `keep` the "pass" rows, each a batch dict."""

    t0 = time.perf_counter()
    _check_rows(model, edits, "edits")
    _check_rows(model, rephrases, "rephrases")
    _check_rows(model, keep, "keep")
    if not config.learning_rates:
        raise ValueError("SweepConfig.learning_rates is empty")
    blocks = model.layers.blocks if layers is None else model.layers.select(layers)
    edits = {k: jnp.asarray(v) for k, v in edits.items()}
    rephrases = None if rephrases is None else {k: jnp.asarray(v) for k, v in rephrases.items()}
    keep = None if keep is None else {k: jnp.asarray(v) for k, v in keep.items()}

    if config.steps < 1:
        raise ValueError(f"SweepConfig.steps must be >= 1, got {config.steps}")

    def predict(p, batch):
        return _predict(model.apply, p, batch)

    traces0 = compilations(_finetune)
    base_keep = predict(params, keep) if keep is not None else None
    pass_acc_before = None if base_keep is None else float(np.asarray(base_keep[1]).mean())
    outcomes = []
    bar = tqdm(total=len(blocks) * len(config.learning_rates), desc="sweep", disable=not progress, leave=False)
    for block in blocks:
        paths = _trainable_paths(block, config.part)
        for lr in config.learning_rates:
            trainable, losses = _finetune(model.apply, paths, config.steps, params, edits, jnp.float32(lr))
            new = params
            for q, v in trainable.items():
                new = set_path(new, q, v)
            _, ec = predict(new, edits)
            rc = None if rephrases is None else np.asarray(predict(new, rephrases)[1])
            pu = pt = pc = None
            if keep is not None:
                am, pc = predict(new, keep)
                m = np.asarray(keep["label_mask"]).astype(bool)
                same = (np.asarray(am) == np.asarray(base_keep[0])) & m
                pu, pt, pc = same.sum(-1), m.sum(-1), np.asarray(pc)
            outcomes.append(LayerOutcome(block.name, float(lr), np.asarray(ec), rc, pu, pt, pc, np.asarray(losses)))
            bar.update(1)
    bar.close()
    return SweepResult(
        layers=tuple(b.name for b in blocks),
        config=config,
        outcomes=tuple(outcomes),
        pass_acc_before=pass_acc_before,
        wall_time=time.perf_counter() - t0,
        train_steps=len(blocks) * len(config.learning_rates) * config.steps,
        compiles=compilations(_finetune) - traces0,
    )
