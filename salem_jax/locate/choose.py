"""One way from edit-set rows to a layer profile: `locate(model, rows, method, config)`.

The pipeline, `salem locate` and `salem train-editor --layers auto` choose layers through here:
- "saliency" / "lga": SaLEM's saliency pass (salem_jax.saliency; "lga" = the lga scorer) over
  at most `max_examples` rows of each of `groups` (sampled with `seed`), in micro-batches;
- "causal-trace": ROME's causal tracing of the `select_group` rows whose subject is in the
  prompt (`subjects`: record id -> subject);
- "sweep": fine-tune each layer alone on the fail rows (salem_jax.locate.sweep);
- "editability": one identity-editor (untrained MEND) step per layer and probe edit: share of
  edits fixed minus spill onto pass rows (salem_jax.locate.editability; `probe` configures it).
("mend-sweep", MEND trained on each layer set, needs train and val splits and a workdir:
salem_jax.locate.mend_sweep.mend_sweep.)
Every method returns a `LayerProfile` (per-layer scores per group, the chosen layers).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

from salem_jax.data.edit_set import edit_set_batches, sample_by_group
from salem_jax.data.tokenize import encode
from salem_jax.locate import METHODS
from salem_jax.locate.editability import EditabilityConfig, editability_profile
from salem_jax.locate.sweep import SweepConfig, sweep_layers
from salem_jax.locate.trace_rows import trace_edit_rows
from salem_jax.locate.profile import LayerProfile
from salem_jax.saliency import saliency_profile



@dataclasses.dataclass(frozen=True)
class LocateConfig:
    """How to choose. scorer: a saliency scorer (salem = the paper's); part: mlp | attention | all;
    select_group: the rows whose scores choose the layers; layers: None = every layer.
    Saliency: with max_examples or groups set, at most max_examples rows (0 = all) of each of `groups`
    (None = every group), sampled with `seed` (edit_set.sample_by_group); else every row as given.
    Causal tracing: max_facts, n_noise, restorations_per_call, select. Sweep: learning_rates, steps,
    drawdown_budget. Editability: probe (its part is replaced by `part`, its seed by `seed`)."""

    scorer: str = "salem"
    part: str = "mlp"
    top_k: int = 1
    select_group: str = "fail"
    layers: tuple[str, ...] | None = None
    micro_batch: int = 8
    max_examples: int | None = None
    groups: tuple[str, ...] | None = None
    seed: int = 0
    max_facts: int | None = None
    n_noise: int = 10
    restorations_per_call: int = 8
    select: str = "last_subject"
    learning_rates: tuple[float, ...] = (3e-4, 1e-3)
    steps: int = 10
    drawdown_budget: float = 0.1
    probe: EditabilityConfig = EditabilityConfig()


def saliency_batches(model, rows: list[dict], micro_batch: int) -> list[tuple[dict, list[str]]]:
    """(batch, the group of each row) pairs of `rows`, micro_batch rows each: saliency_profile's input."""
    return [(b, [r["group"] for r in chunk]) for b, chunk in edit_set_batches(model, rows, micro_batch)]


def group_batch(model, rows: list[dict], group: str) -> dict | None:
    """One batch of a group's rows (None if there are none)."""
    sel = [r for r in rows if r["group"] == group]
    if not sel:
        return None
    tp = [r["text_pair"] for r in sel] if model.kind == "classifier" else None
    targets = [r["label"] for r in sel] if model.kind == "classifier" else [r["target"] for r in sel]
    return encode(model, [r["prompt"] for r in sel], targets, text_pairs=tp, where=f"group {group}")


def locate(model, rows: list[dict], method: str, config: LocateConfig = LocateConfig(), *,
           subjects: Mapping[str, str] | None = None, progress: bool = True) -> LayerProfile:
    """The layer profile of `rows` (edit-set rows) by `method` (METHODS), on the model's own parameters."""
    c = config
    layers = list(c.layers) if c.layers else None
    if method in ("saliency", "lga"):
        sampled = c.max_examples is not None or c.groups is not None
        chosen = sample_by_group(rows, c.max_examples or 0, c.seed, c.groups) if sampled else rows
        return saliency_profile(
            model, model.params, saliency_batches(model, chosen, c.micro_batch), scorer="lga" if method == "lga" else c.scorer,
            part=c.part, top_k=c.top_k, select_group=c.select_group, layers=layers, micro_batch=c.micro_batch,
            progress=progress,
        )
    if method == "causal-trace":
        if subjects is None:
            raise ValueError("causal tracing needs each row's subject: pass subjects={record id: subject}")
        return trace_edit_rows(
            model, model.params, rows, subjects, group=c.select_group, top_k=c.top_k, layers=layers,
            max_facts=c.max_facts, select=c.select, n_noise=c.n_noise, restorations_per_call=c.restorations_per_call,
            seed=c.seed, progress=progress,
        )
    if method == "sweep":
        edits = group_batch(model, rows, "fail")
        if edits is None:
            raise ValueError("the sweep needs 'fail' rows (the edits)")
        cfg = SweepConfig(learning_rates=tuple(c.learning_rates), steps=c.steps, part=c.part,
                          drawdown_budget=c.drawdown_budget)
        res = sweep_layers(model, model.params, edits, rephrases=group_batch(model, rows, "adapt"),
                           keep=group_batch(model, rows, "pass"), layers=layers, config=cfg, progress=progress)
        return res.to_profile(top_k=c.top_k, model=model.name)
    if method == "editability":
        pc = dataclasses.replace(c.probe, part=c.part, seed=c.seed)
        return editability_profile(model, rows, layers=layers, config=pc, top_k=c.top_k, progress=progress)
    if method == "mend-sweep":
        raise ValueError("mend-sweep trains an editor per layer set on a train and a val split: call "
                         "salem_jax.locate.mend_sweep.mend_sweep (or `salem locate --method mend-sweep`)")
    raise ValueError(f"unknown locate method {method!r}; choose from {', '.join(METHODS)}")
