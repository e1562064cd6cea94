"""Editing methods as values: what a method supports, how it picks its layers, how it prepares.

The pipeline (`salem_jax.pipeline.run_pipeline`) knows no method by name: for each name in
`config.methods` it looks the `Method` up here, checks it before any costly step
(`Method.check`), and after the shared steps (edit set, saliency profile, causal tracing if any
method needs it) calls `layers = method.layers(ctx)` and `prepared = method.prepare(ctx, layers)`.
`prepared.edit(params, rows) -> params` is what the evaluation applies, one val fail row at a time,
always to the base parameters.

Adding a method is one module that defines a `Method` value plus one entry in
`salem_jax.methods.BUILTIN` (or `register(method)` from your own code); see the README's
"Adding a method".
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

KINDS = ("causal", "seq2seq", "classifier")  # model kinds (`model.kind`)

Params = Any  # a model's parameter pytree
EditFn = Callable[[Params, list[dict]], Params]  # (base params, request rows) -> edited params


@dataclasses.dataclass(frozen=True)
class Context:
    """What the shared pipeline steps give every method.

    Filled in stages: `Method.check` sees model, cfg, texts and text_note only (before the edit set
    is built); `Method.layers` and `Method.prepare` see everything.
    rows are edit-set rows (dicts with prompt, target, group, record_id, ...; see
    salem_jax.data.edit_set); `data` is `mend.train.prepare_splits` of the train/val rows;
    `profile` the saliency `LayerProfile`; `traced_layer`/`trace_info` the causal-traced layer and
    its summary when some configured method `needs_trace` (else None)."""

    model: Any
    cfg: Any  # the pipeline's ml_collections.ConfigDict
    work: Path
    say: Callable[[str], None] = print
    mesh: Any = None
    texts: tuple[str, ...] = ()
    text_note: str = ""
    subjects: dict[str, str] = dataclasses.field(default_factory=dict)  # record id -> subject
    train_rows: list[dict] = dataclasses.field(default_factory=list)
    val_rows: list[dict] = dataclasses.field(default_factory=list)
    keep_rows: list[dict] = dataclasses.field(default_factory=list)  # the held-out keep set (config.eval.keep)
    # fact rows whose keys join the MEND editors' null-space covariance (config.editor.null_facts;
    # `pipeline.null_fact_rows`: disjoint from the keep set and the val split)
    null_fact_rows: list[dict] = dataclasses.field(default_factory=list)
    data: Any = None
    profile: Any = None
    traced_layer: str | None = None
    trace_info: dict | None = None

    @property
    def pass_rows(self) -> list[dict]:
        """The train pass rows (a locality reference for methods with a KL term)."""
        return [r for r in self.train_rows if r["group"] == "pass"]


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A prepared method: `edit(params, rows) -> params` and what to report about it.

    info: goes to results["training"][name] (steps, seconds, best_step, ...).
    eval_rows: the val rows to evaluate on, when the method cannot edit some of them (None = all);
    skipped_edits: ids of the val fail rows left out (reported as skipped_edits / skipped_edit_rows).
    can_edit(row) -> bool: which val fail rows the method can edit at all (None = every one). The
    one-at-a-time evaluation uses eval_rows (cut at config.eval.max_edits); the many-edits study
    (config.eval.sequential) edits up to 100s of rows, so it takes every val fail row can_edit accepts.
    edit_each(params, rows) -> [edit(params, [row]) for each row]: the same edits computed together
    (e.g. MEND's in one vmapped call); None: the evaluation calls `edit` once per row."""

    edit: EditFn
    info: dict
    eval_rows: list[dict] | None = None
    skipped_edits: tuple[str, ...] | None = None
    can_edit: Callable[[dict], bool] | None = None
    edit_each: Callable[[Params, list[dict]], list[Params]] | None = None


def _never(cfg) -> bool:
    return False


def _no_check(ctx: Context) -> None:
    return None


@dataclasses.dataclass(frozen=True)
class Method:
    """An editing method.

    name: its name in config.methods.
    summary: one line for listings and errors.
    supports: the model kinds (`KINDS`) it can edit; others are refused before any costly step
      with `unsupported` as the reason.
    layers(ctx) -> layer names: how it chooses the layers it edits (from ctx.profile, ctx.traced_layer,
      the config, ...).
    prepare(ctx, layers) -> Prepared: trains an editor / fits statistics, and returns the edit.
    needs_trace(cfg) -> bool: whether it uses the causal-traced layer (ctx.traced_layer); the pipeline
      traces once for all methods that do.
    check(ctx): config checks before any costly step (ctx has model, cfg, texts, text_note only);
      raise ValueError naming the config field and the fix."""

    name: str
    summary: str
    supports: frozenset[str]
    layers: Callable[[Context], tuple[str, ...]]
    prepare: Callable[[Context, tuple[str, ...]], Prepared]
    needs_trace: Callable[[Any], bool] = _never
    check: Callable[[Context], None] = _no_check
    unsupported: str = ""

    def __post_init__(self):
        bad = set(self.supports) - set(KINDS)
        if bad or not self.supports:
            raise ValueError(f"method {self.name!r}: supports must be a non-empty subset of {KINDS}, got {sorted(self.supports)}")

    def refuse_unsupported(self, model) -> None:
        """A clear error when `model` is of a kind this method cannot edit."""
        if model.kind not in self.supports:
            why = f" ({self.unsupported})" if self.unsupported else ""
            raise ValueError(
                f"method {self.name!r} ({self.summary}) supports {' / '.join(sorted(self.supports))} models only{why}; "
                f"{model.name!r} is a {model.kind} model: drop {self.name!r} from config.methods"
            )


_REGISTRY: dict[str, Method] = {}


def register(method: Method, replace: bool = False) -> Method:
    """Make `method` available to config.methods; a second method of the same name is an error
    unless replace=True."""
    if not isinstance(method, Method):
        raise TypeError(f"register() takes a Method, got {type(method).__name__}")
    if method.name in _REGISTRY and not replace:
        raise ValueError(f"a method named {method.name!r} is already registered; pick another name or replace=True")
    _REGISTRY[method.name] = method
    return method


def unregister(name: str) -> None:
    """Remove a registered method (tests that register a toy method clean up with this)."""
    _REGISTRY.pop(name, None)


def names() -> tuple[str, ...]:
    """Registered method names, in registration order."""
    return tuple(_REGISTRY)


def get(name: str) -> Method:
    """The method called `name`; a clear error listing the registered ones otherwise."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r} in config.methods; choose from {', '.join(names())}")
    return _REGISTRY[name]
