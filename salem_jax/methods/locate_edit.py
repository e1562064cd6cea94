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

import numpy as np

from salem_jax.baselines.editors import get_editor, layers_for
from salem_jax.baselines.keystats import KeyStats, covariance_solver, wikitext_texts
from salem_jax.baselines.locate_edit import EditorConfig, to_weights
from salem_jax.baselines.mass_edit import AlphaEditState, keys_of
from salem_jax.baselines.requests import EditRequest
from salem_jax.baselines.rome import CLAMP_NORMS, ROMEConfig
from salem_jax.data.countries import country_records, parse_country_relations
from salem_jax.eval.keep import country_facts_outside_keep
from salem_jax.locate.trace_rows import subject_in_prompt
from salem_jax.mend.nullspace import fact_covariances
from salem_jax.mend.retry import check_retries, with_retries
from salem_jax.methods.registry import Context, Method, Prepared
from salem_jax.methods.rome import has_subject, rome_val_rows

LAYER_FROM = ("saliency", "trace")
STATES_KEPT = 4  # edit(): at least the last calls whose outputs continue their state (see `_prepare`)
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
    if int(e.alpha_preserve_facts_max) < 0:
        raise ValueError(f"config.locate_edit.alpha_preserve_facts_max must be >= 0 (0 = every usable fact), "
                         f"got {e.alpha_preserve_facts_max}")
    if e.alpha_preserve_facts:
        fact_relations(e.alpha_preserve_facts)
    w = float(e.alpha_preserve_weight)
    if not (np.isfinite(w) and w > 0):
        raise ValueError(f"config.locate_edit.alpha_preserve_weight must be a finite number > 0, got {e.alpha_preserve_weight}")
    check_retries(e.get("retries", 0), "config.locate_edit.retries")
    wp = project_facts_weight(e)
    if wp > 0 and not e.alpha_preserve_facts:
        raise ValueError(f"config.locate_edit.alpha_project_facts_weight={wp:g} puts the seeded country facts' keys into "
                         "AlphaEdit's projector, but no facts are seeded: set config.locate_edit.alpha_preserve_facts "
                         "(e.g. 'countries:capital,region'), or leave the weight at 0")
    if w != 1.0 and not (e.alpha_preserve or e.alpha_preserve_facts):
        raise ValueError(f"config.locate_edit.alpha_preserve_weight={w:g} weighs AlphaEdit's seeded keys, but none are "
                         "seeded: set alpha_preserve or alpha_preserve_facts, or leave the weight at 1")


def project_facts_weight(e) -> float:
    """config.locate_edit.alpha_project_facts_weight (`e`: the locate_edit section) as a float, checked:
    a finite number >= 0 (0 = off)."""
    raw = e.get("alpha_project_facts_weight", 0.0)
    ok = not isinstance(raw, bool) and isinstance(raw, (int, float, np.integer, np.floating))
    if not ok or not np.isfinite(float(raw)) or float(raw) < 0:
        raise ValueError(f"config.locate_edit.alpha_project_facts_weight={raw!r}: give a finite number >= 0 (the seeded "
                         "facts' per-token weight in the covariance of AlphaEdit's projector; 0 = off)")
    return float(raw)


def facts_projections(model, weights, stats: KeyStats, facts: list[EditRequest], weight: float, energy: float,
                      threshold: float) -> tuple[dict[str, np.ndarray], dict]:
    """AlphaEdit's null-space projector with facts protected HARD (config.locate_edit.alpha_project_facts_weight):
    per kernel of `weights`, P' = U0 U0^T of C' = C_text + weight x C_facts instead of C_text's.

    C_text is the plain-text key covariance `stats` holds (a per-token mean of k k^T); C_facts the per-token
    mean of k k^T over every token of each fact's prompt + true target (`mend.nullspace.fact_covariances`,
    the same as the MEND editor's `editor.null_facts`), so `weight` is a fact token's weight relative to a text
    token's. U0: C''s eigenvectors picked by `CovSolver.null_projection` with the same rule as without facts:
    - threshold > 0 (absolute: eigenvalues below it): C_facts is positive semi-definite, so every eigenvalue
      of C' is >= the same-rank eigenvalue of C_text (Weyl): the null space can only shrink, and directions
      the facts' keys use get eigenvalues of about weight x their per-token energy, so they leave the null
      space once that passes the threshold;
    - else (energy share of the trace): the budget energy x trace(C') grows with the facts' trace, while the
      facts' directions move up the spectrum; the number of directions can go either way.
    Either way the edits' updates dW P' hardly move the facts' keys, whatever the memory's soft term does.

    Returns ({kernel path: P' [in, in] float64}, info: "facts", "tokens", "weight" and per kernel path
    "null_dim_text" (trace of C_text's P), "null_dim" (of P'), "facts_trace_share" (weight x trace(C_facts)
    / trace(C')))."""
    rows = [{"prompt": r.prompt, "target": r.target_new} for r in facts]
    fcovs, tokens = fact_covariances(model, model.params, weights, rows)
    projections, per = {}, {}
    for w in weights:
        c_text = stats.covariance(w)
        cf = weight * fcovs[w.path]
        p = covariance_solver(c_text + cf).null_projection(energy, threshold)
        p_text = stats.solver(w).null_projection(energy, threshold)
        projections[w.path] = p
        per[w.path] = {"null_dim_text": int(round(np.trace(p_text))), "null_dim": int(round(np.trace(p))),
                       "facts_trace_share": float(np.trace(cf) / (np.trace(c_text) + np.trace(cf)))}
    return projections, {"facts": len(rows), "tokens": int(tokens), "weight": float(weight), "kernels": per}


def fact_relations(spec: str) -> list[str]:
    """The relations of config.locate_edit.alpha_preserve_facts ("countries:REL,REL"), checked."""
    return list(parse_country_relations(spec, "config.locate_edit.alpha_preserve_facts"))


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


def preserved_fact_requests(ctx: Context, spec: str, n_max: int) -> tuple[list[EditRequest], dict]:
    """The country facts of `spec` ("countries:REL,REL") AlphaEdit's memory may be seeded with, as
    EditRequests (subject: the country as it reads in the prompt, so its key is at the country
    name's last token; target: the true answer, unused by the key), and the counts of facts left
    out and why. Strictly disjoint from the keep set (`eval.keep.country_facts_outside_keep`: no
    keep prompt, no fact of a keep row's country, whatever the relation), and, as for
    `preserved_requests`, a fact whose country (as it reads in the prompt) occurs as whole words in a
    val prompt (fail, adapt or locality rows) or in a keep prompt is passed over too: the study
    edits or scores that name. All usable facts when n_max is 0, else the first n_max of a seeded
    (config.seed) permutation; a named error when fewer than n_max are usable."""
    field = "config.locate_edit.alpha_preserve_facts"
    relations = fact_relations(spec)
    records = list(country_records("all", seed=ctx.cfg.seed))  # every relation, so any keep row names its country
    of_kind = [r for r in records if r.extra.get("relation") in relations]
    outside = country_facts_outside_keep(records, ctx.keep_rows, relations)
    guarded = [("val", [r["prompt"] for r in ctx.val_rows]), ("keep", [r["prompt"] for r in ctx.keep_rows])]
    passed = {"keep": len(of_kind) - len(outside), "no_subject": 0, "val": 0, "keep_name": 0}
    reqs = []
    for r in outside:
        s = subject_in_prompt(r.prompt, r.subject)
        if s is None:
            passed["no_subject"] += 1
            continue
        hit = next((what for what, prompts in guarded if any(_mentions(p, s) for p in prompts)), None)
        if hit is not None:
            passed["val" if hit == "val" else "keep_name"] += 1
            continue
        reqs.append(EditRequest(r.prompt, s, r.target_true, record_id=r.id))
    detail = (f"of {len(of_kind)} facts of {', '.join(relations)}; left out: {passed['keep']} of a keep row's country "
              f"or with a keep prompt, {passed['no_subject']} without their country in the prompt, {passed['val']} "
              f"whose country is named in a val prompt, {passed['keep_name']} whose country is named in a keep prompt")
    if not reqs or len(reqs) < n_max:
        raise ValueError(f"{field}={spec!r} with alpha_preserve_facts_max={n_max}: only {len(reqs)} usable facts ({detail})")
    passed["usable"] = len(reqs)
    if n_max:
        order = np.random.default_rng(ctx.cfg.seed).permutation(len(reqs))[:n_max]
        reqs = [reqs[i] for i in sorted(order)]
    return reqs, passed


def preserved_state(ctx: Context, name: str, layers: tuple[str, ...], stats: KeyStats, ec: EditorConfig):
    """AlphaEdit's starting memory with the keys of the facts it must not change
    (`AlphaEditState.preserving`): config.locate_edit.alpha_preserve train fail rows
    (`preserved_requests`: never an edited val row, never a subject of the val split or of the keep
    set) and the country facts of config.locate_edit.alpha_preserve_facts (`preserved_fact_requests`:
    none of the keep set's facts or countries), keys per band layer on the base weights (averaged over
    the prefixes when the editor uses them) [in, m], their term weighted by
    config.locate_edit.alpha_preserve_weight; and what was left out ({"rows": counts or None,
    "facts": counts or None, "projector": `facts_projections`' info or None}).

    config.locate_edit.alpha_project_facts_weight > 0: the same country facts also enter the covariance
    whose null space the state's projector P spans (`facts_projections`: P of C_text + w_p C_facts, set
    in the state's `projection`, so every update of the run is projected by it)."""
    e = ctx.cfg.locate_edit
    n, spec, wp = int(e.alpha_preserve), e.alpha_preserve_facts, project_facts_weight(e)
    if name != "alphaedit":
        what = f"alpha_preserve={n}" if n else f"alpha_preserve_facts={spec!r}"
        also = f" (and alpha_project_facts_weight={wp:g} its projector)" if wp > 0 else ""
        raise ValueError(f"config.locate_edit.{what} seeds AlphaEdit's memory{also}; {name} has none "
                         "(set it to 0 / '', or run alphaedit alone)")
    if wp > 0 and not spec:
        raise ValueError(f"config.locate_edit.alpha_project_facts_weight={wp:g} needs config.locate_edit."
                         "alpha_preserve_facts (the facts whose keys enter the projector's covariance)")
    reqs, passed = [], {"rows": None, "facts": None, "projector": None}
    if n:
        rows, passed["rows"] = preserved_requests(ctx, n)
        reqs += rows
    if spec:
        facts, passed["facts"] = preserved_fact_requests(ctx, spec, int(e.alpha_preserve_facts_max))
        reqs += facts
    model = ctx.model
    prefixes = stats.prefixes() if ec.use_prefixes else ("",)
    _, weights = to_weights(model, layers)
    keys = {w.path: keys_of(model, model.params, w, reqs, prefixes) for w in weights}
    state = AlphaEditState.preserving(keys, weight=float(e.alpha_preserve_weight))
    if wp > 0:
        state.projection, passed["projector"] = facts_projections(model, weights, stats, facts, wp, ec.alpha_energy,
                                                                  ec.alpha_threshold)
    return state, passed


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
        seeded = bool(e.alpha_preserve or e.alpha_preserve_facts)
        fresh, passed = preserved_state(ctx, name, layers, stats, ec) if seeded else (None, None)

        # A sequence of edits continues the editor's state (AlphaEdit: the keys of the earlier edits,
        # its `cache_c`) exactly when edit() is called on parameters one of its last n_kept calls
        # returned (the many-edits study's sequential mode; a retry, or the edit before a retry that was
        # not kept: `mend.retry.edit_until_reached` may hand back an earlier call's parameters), with that
        # call's state; any other params (the base weights of the one-at-a-time evaluation, the batch
        # mode) start a fresh state, so nothing leaks between runs. The outputs are held with their
        # states, so an id is never reused while it is a key.
        states: dict[int, tuple[Any, Any]] = {}
        n_kept = max(STATES_KEPT, int(e.get("retries", 0)) + 2)  # a batch's first edit and all its retries

        def edit(params, rows):
            reqs = []
            for r in rows:
                s = subject_in_prompt(r["prompt"], subjects.get(r["record_id"], ""))
                if s is None:
                    raise ValueError(f"{name}: row {r['id']!r}: the subject of record {r['record_id']!r} "
                                     f"({subjects.get(r['record_id'], '')!r}) does not occur in the prompt {r['prompt']!r}")
                reqs.append(EditRequest(r["prompt"], s, r["target"], record_id=r["id"]))
            held = states.get(id(params))
            if held is not None and held[0] is params:  # a copy: the editor changes its state in place
                state = held[1].copy() if held[1] is not None else None
            else:
                state = fresh.copy() if fresh is not None else None
            cache = {"values": base_values(params)} if name != "rrome" and params is model.params else {}
            out = fn(model, params, reqs, layers=layers, stats=stats, config=ec, state=state, progress=False, **cache)
            states[id(out.params)] = (out.params, out.state)
            while len(states) > n_kept:
                del states[next(iter(states))]  # the oldest call's
            return out.params

        eval_rows, skipped = rome_val_rows(ctx.val_rows, ctx.subjects, cfg.eval.max_edits)
        info = dict(layers=list(layers), covariance=stats.report(), steps=e.v_steps, seconds=time.perf_counter() - t,
                    preserved_keys=fresh.n_preserved if fresh is not None else 0,
                    **({"preserve_weight": float(e.alpha_preserve_weight)} if fresh is not None else {}),
                    **({"preserve_passed_over": passed["rows"]} if passed is not None and passed["rows"] is not None else {}),
                    **({"preserve_facts": passed["facts"]} if passed is not None and passed["facts"] is not None else {}),
                    **({"project_facts": passed["projector"]} if passed is not None and passed["projector"] is not None
                       else {}),
                    layer_from="config.locate_edit.layer" if e.layer else e.layer_from, skipped_edits=len(skipped))
        if skipped:
            ctx.say(f"{name}: {len(skipped)} val fail rows without their subject in the prompt are skipped")
        weighted = (f"; the seeded keys' term weighted {float(e.alpha_preserve_weight):g}"
                    if float(e.alpha_preserve_weight) != 1.0 else "")
        if passed is not None and passed["rows"] is not None:
            p = passed["rows"]
            ctx.say(f"{name}: the memory starts with the keys of {e.alpha_preserve} train fail rows (passed over: "
                    f"{p['no_subject']} without their subject in the prompt, {p['val']} with a val "
                    f"subject, {p['keep']} with a keep subject){weighted}")
        if passed is not None and passed["facts"] is not None:
            p = passed["facts"]
            ctx.say(f"{name}: the memory starts with the keys of {fresh.n_preserved - int(e.alpha_preserve)} country "
                    f"facts ({e.alpha_preserve_facts}; {p['usable']} usable; left out: {p['keep']} of a keep row's "
                    f"country or prompt, {p['val']} whose country is named in a val prompt, {p['keep_name']} in a keep "
                    f"prompt, {p['no_subject']} without their country in the prompt); {fresh.n_preserved} keys in all{weighted}")
        if passed is not None and passed["projector"] is not None:
            pj = passed["projector"]
            dims = "; ".join(f"{k}: {v['null_dim_text']} -> {v['null_dim']} (facts' trace share {v['facts_trace_share']:.3f})"
                             for k, v in pj["kernels"].items())
            rule = (f"eigenvalues below alpha_threshold {ec.alpha_threshold:g}" if ec.alpha_threshold > 0
                    else f"alpha_energy {ec.alpha_energy:g} of the trace")
            ctx.say(f"{name}: the projector's covariance holds the {pj['facts']} seeded facts' keys too ({pj['tokens']} "
                    f"tokens, weight {pj['weight']:g}); null-space directions ({rule}), text only -> with the facts: {dims}")
        # config.locate_edit.retries: edit again while an edit's own prompt misses its target
        edit, _ = with_retries(model, edit, None, e.get("retries", 0), info, name="config.locate_edit.retries")
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
