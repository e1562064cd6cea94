"""Locate-then-edit methods `rrome`, `memit`, `emmet` and `alphaedit` (causal LMs), in closed form.

Layer: config.locate_edit.layer, or ('') the saliency profile's top layer
(config.locate_edit.layer_from = "saliency", any scorer config.saliency.scorer gives) or the
causal-traced one ("trace"). r-ROME edits that layer; MEMIT / EMMET / AlphaEdit edit the
config.locate_edit.band blocks ending at it (`salem_jax.baselines.editors.layers_for`). Key
statistics: config.locate_edit.cov_tokens tokens of WikiText from the data directory
(config.locate_edit.texts = "wikitext"; "held_out" = the evaluation's held-out texts), cached on
disk per model and layer (`salem_jax.baselines.keystats`). The evaluation applies one val fail row
at a time to the base parameters, so batch_size only matters for a caller's own multi-row edits.
Val fail rows whose subject does not occur in the prompt are left out and counted, as for `rome`.

The band editors compute each request's v* at most once per run on the base weights
(`base_values`): the one-at-a-time evaluation, the many-edits study's batch and independent modes
(every T edits the base weights again) and the other band methods of the run (same layer, same v*
settings) reuse it; edits of any other weights compute theirs afresh.
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Any

from salem_jax.baselines.editors import get_editor, layers_for
from salem_jax.baselines.keystats import KeyStats, wikitext_texts
from salem_jax.baselines.locate_edit import EditorConfig, to_weights
from salem_jax.baselines.mass_edit import AlphaEditState, keys_of
from salem_jax.baselines.requests import EditRequest
from salem_jax.baselines.rome import CLAMP_NORMS, ROMEConfig
from salem_jax.locate.trace_rows import subject_in_prompt
from salem_jax.methods.registry import Context, Method, Prepared
from salem_jax.methods.rome import has_subject, rome_val_rows

LAYER_FROM = ("saliency", "trace")
TEXTS = ("wikitext", "held_out")  # key statistics: WikiText of the data directory, or config.eval.text's texts


def editor_config(cfg) -> EditorConfig:
    """EditorConfig from the pipeline config's `locate_edit` section."""
    e = cfg.locate_edit
    value = ROMEConfig(v_steps=e.v_steps, v_lr=e.v_lr, kl_factor=e.kl_factor, weight_decay=e.weight_decay,
                       clamp_norm_factor=e.clamp_norm_factor, clamp_norm=e.clamp_norm)
    return EditorConfig(value=value, use_prefixes=e.n_prefixes > 0, batch_size=e.batch_size,
                        memit_lambda=e.memit_lambda, emmet_lambda=e.emmet_lambda, alpha_energy=e.alpha_energy,
                        alpha_threshold=e.alpha_threshold,
                        alpha_l2=e.alpha_l2)


# v* of requests on the base weights of a run, shared by the band methods (salem_jax.baselines.mass_edit,
# `values`): entries are valid only for the very params object they were computed on, so the slot is
# emptied when another base params object comes in (another model, another run in the same process).
_BASE_VALUES: dict[str, Any] = {"params": None, "values": {}}


def base_values(params) -> dict:
    """The v* cache of `params` (base weights): a dict for mass_edit's `values`, empty for new params."""
    if _BASE_VALUES["params"] is not params:
        _BASE_VALUES.update(params=params, values={})
    return _BASE_VALUES["values"]


def _layer(ctx: Context) -> str:
    e = ctx.cfg.locate_edit
    if e.layer:
        return e.layer
    return ctx.traced_layer if e.layer_from == "trace" else ctx.profile.chosen[0]


def check(ctx: Context) -> None:
    e, model = ctx.cfg.locate_edit, ctx.model
    if e.layer and e.layer not in model.layers.names():
        raise ValueError(f"config.locate_edit.layer {e.layer!r} is not a layer of {model.name!r}; layers are "
                         f"{', '.join(model.layers.names())} ('' = chosen by config.locate_edit.layer_from)")
    if e.layer_from not in LAYER_FROM:
        raise ValueError(f"config.locate_edit.layer_from {e.layer_from!r}: choose from {', '.join(LAYER_FROM)}")
    if e.texts not in TEXTS:
        raise ValueError(f"config.locate_edit.texts {e.texts!r}: choose from {', '.join(TEXTS)}")
    if e.clamp_norm not in CLAMP_NORMS:
        raise ValueError(f"config.locate_edit.clamp_norm {e.clamp_norm!r}: choose from {', '.join(CLAMP_NORMS)}")
    if e.texts == "held_out" and not ctx.texts:
        raise ValueError(f"config.locate_edit.texts='held_out' needs held-out text (config.eval.text), but: {ctx.text_note}")
    for field in ("band", "batch_size", "cov_tokens"):
        if int(e[field]) < 1:
            raise ValueError(f"config.locate_edit.{field} must be >= 1, got {e[field]}")
    if int(e.alpha_preserve) < 0:
        raise ValueError(f"config.locate_edit.alpha_preserve must be >= 0, got {e.alpha_preserve}")


def _mentions(text: str, subject: str) -> bool:
    """Whether `subject` occurs in `text` as whole words (case-insensitive)."""
    return re.search(rf"(?<!\w){re.escape(subject.lower())}(?!\w)", text.lower()) is not None


def preserved_requests(ctx: Context, n: int) -> tuple[list[EditRequest], dict]:
    """The first n train fail rows (in split order) that AlphaEdit's memory may be seeded with, as
    EditRequests, and how many rows were passed over and why. A row is passed over when its subject
    does not occur in its prompt (no key), or when its subject occurs (as whole words,
    case-insensitive) in the prompt of a val row (fail, adapt or locality pass row) or of a keep row:
    such a key belongs to a fact the study edits or scores (the same subject's key, or one very close to it), and preserving it would
    fight that edit or protect a keep fact by name, so the keep-set drawdown would no longer measure
    facts the editor never saw."""
    guarded = [("val", [r["prompt"] for r in ctx.val_rows]), ("keep", [r["prompt"] for r in ctx.keep_rows])]
    rows = [r for r in ctx.train_rows if r["group"] == "fail"]
    reqs, passed = [], {"no_subject": 0, "val": 0, "keep": 0}
    for r in rows:
        if len(reqs) == n:
            break
        s = subject_in_prompt(r["prompt"], ctx.subjects.get(r["record_id"], ""))
        if s is None:
            passed["no_subject"] += 1
            continue
        hit = next((what for what, prompts in guarded if any(_mentions(p, s) for p in prompts)), None)
        if hit is not None:
            passed[hit] += 1
            continue
        reqs.append(EditRequest(r["prompt"], s, r["target"], record_id=r["id"]))
    if len(reqs) < n:
        raise ValueError(f"config.locate_edit.alpha_preserve={n}: the train split has only {len(reqs)} usable fail rows "
                         f"(of {len(rows)}; passed over: {passed['no_subject']} without their subject in the prompt, "
                         f"{passed['val']} whose subject is in a val prompt, {passed['keep']} whose subject is in a keep prompt)")
    return reqs, passed


def preserved_state(ctx: Context, name: str, layers: tuple[str, ...], stats: KeyStats, ec: EditorConfig):
    """AlphaEdit's starting memory with the keys of config.locate_edit.alpha_preserve facts it must not
    change (`AlphaEditState.preserving`) from `preserved_requests` (never an edited val row, never a
    subject of the val split or of the keep set), keys per band layer on the base weights (averaged
    over the prefixes when the editor uses them) [in, m]; and the counts of rows passed over."""
    n = int(ctx.cfg.locate_edit.alpha_preserve)
    if name != "alphaedit":
        raise ValueError(f"config.locate_edit.alpha_preserve={n} seeds AlphaEdit's memory; {name} has none "
                         "(set it to 0, or run alphaedit alone)")
    reqs, passed = preserved_requests(ctx, n)
    model = ctx.model
    prefixes = stats.prefixes() if ec.use_prefixes else ("",)
    _, weights = to_weights(model, layers)
    keys = {w.path: keys_of(model, model.params, w, reqs, prefixes) for w in weights}
    return AlphaEditState.preserving(keys), passed


def _prepare(name: str):
    def prepare(ctx: Context, layers: tuple[str, ...]) -> Prepared:
        cfg, model, e = ctx.cfg, ctx.model, ctx.cfg.locate_edit
        t = time.perf_counter()
        n = e.n_prefixes
        if e.texts == "held_out":
            texts = list(ctx.texts)
        else:
            texts = wikitext_texts(data_dir=cfg.data_dir or None)
        stats = KeyStats(model, model.params, texts, max_tokens=e.cov_tokens,
                         prefix_lengths=(5,) * (n // 2) + (10,) * (n - n // 2), progress=cfg.progress)
        for w in layers:
            stats.solver(w)  # fit (or read) the statistics now, so their cost is the method's preparation
        ec, fn, subjects = editor_config(cfg), get_editor(name), ctx.subjects
        fresh, passed = preserved_state(ctx, name, layers, stats, ec) if e.alpha_preserve else (None, None)

        # A sequence of edits continues the editor's state (AlphaEdit: the keys of the earlier edits,
        # its `cache_c`) exactly when edit() is called on the parameters its previous call returned
        # (the many-edits study's sequential mode); any other params (the base weights of the
        # one-at-a-time evaluation, the batch mode) start a fresh state, so nothing leaks between runs.
        last: dict[str, Any] = {"params": None, "state": None}

        def edit(params, rows):
            reqs = []
            for r in rows:
                s = subject_in_prompt(r["prompt"], subjects.get(r["record_id"], ""))
                if s is None:
                    raise ValueError(f"{name}: row {r['id']!r}: the subject of record {r['record_id']!r} "
                                     f"({subjects.get(r['record_id'], '')!r}) does not occur in the prompt {r['prompt']!r}")
                reqs.append(EditRequest(r["prompt"], s, r["target"], record_id=r["id"]))
            state = last["state"] if params is last["params"] else (fresh.copy() if fresh is not None else None)
            cache = {"values": base_values(params)} if name != "rrome" and params is model.params else {}
            out = fn(model, params, reqs, layers=layers, stats=stats, config=ec, state=state, progress=False, **cache)
            last.update(params=out.params, state=out.state)
            return out.params

        eval_rows, skipped = rome_val_rows(ctx.val_rows, ctx.subjects, cfg.eval.max_edits)
        info = dict(layers=list(layers), covariance=stats.report(), steps=e.v_steps, seconds=time.perf_counter() - t,
                    preserved_keys=fresh.n_preserved if fresh is not None else 0,
                    **({"preserve_passed_over": passed} if passed is not None else {}),
                    layer_from="config.locate_edit.layer" if e.layer else e.layer_from, skipped_edits=len(skipped))
        if skipped:
            ctx.say(f"{name}: {len(skipped)} val fail rows without their subject in the prompt are skipped")
        if passed is not None:
            ctx.say(f"{name}: the memory starts with the keys of {fresh.n_preserved} train fail rows (passed over: "
                    f"{passed['no_subject']} without their subject in the prompt, {passed['val']} with a val "
                    f"subject, {passed['keep']} with a keep subject)")
        return Prepared(edit=edit, info=info, eval_rows=eval_rows, skipped_edits=tuple(skipped),
                        can_edit=has_subject(subjects))

    return prepare


def _method(name: str, summary: str) -> Method:
    return Method(
        name=name, summary=summary, supports=frozenset({"causal"}),
        unsupported="locate-then-edit writes a causal LM's MLP output projection at the last subject token",
        layers=lambda ctx: layers_for(ctx.model, name, _layer(ctx), ctx.cfg.locate_edit.band),
        prepare=_prepare(name),
        needs_trace=lambda cfg: not cfg.locate_edit.layer and cfg.locate_edit.layer_from == "trace",
        check=check,
    )


RROME = _method("rrome", "r-ROME's rank-one edit (one key throughout)")
MEMIT = _method("memit", "MEMIT's least-squares edit over a band of layers")
EMMET = _method("emmet", "EMMET's equality-constrained edit over a band of layers")
ALPHAEDIT = _method("alphaedit", "AlphaEdit's null-space projected edit over a band of layers")
