"""MEND-style learned editors on chosen layers: `salem`, `salem3`, `mend_fixed` and `causal`.

The four differ only in how they choose the layers (`Method.layers`):
- salem: the saliency profile's chosen layer(s) (config.saliency.top_k; the SaLEM paper);
- salem3: the profile's three most salient layers;
- mend_fixed: the last config.fixed_layers blocks (MEND's own choice);
- causal: the layer ROME's causal tracing of the train fail rows chooses.
Each trains (or resumes) an editor on the `config.saliency.part` weights of its layers in
workdir/editor_NAME and edits with the checkpoint of the lowest validation loss.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from salem_jax import config
from salem_jax.baselines.keystats import wikitext_texts
from salem_jax.mend.apply import TrainedEditor, apply_each, apply_edits, load_editor, scaled_editor
from salem_jax.mend.retry import with_retries
from salem_jax.mend.train import TrainConfig, train_editor
from salem_jax.mend.nullspace import (check_energy, facts_digest, null_projection, projected_edit_each_fn, projected_edit_fn,
                                     wikitext_null_projection)
from salem_jax.methods.registry import Context, Method, Prepared
from salem_jax.methods.rows import target


def train_config(cfg) -> TrainConfig:
    """The editor's TrainConfig from the pipeline config's `editor` section (salem_jax.config)."""
    return config.train_config(cfg.editor.to_dict(), seed=cfg.seed)


def train_mend(model, data, layers: tuple[str, ...], cfg, workdir: Path, mesh=None, facts=None):
    """Train (or resume) a MEND editor on the `cfg.saliency.part` weights of `layers`;
    returns (TrainedEditor, TrainResult).

    The editor returned is the checkpoint with the lowest validation loss (MEND's protocol, and
    `salem edit`'s default), not necessarily the last step: `editor.step` says which.
    mesh: None = all devices on an (n, 1) mesh (`sharding.make_mesh()`); a `sharding.make_mesh` mesh when the model's
    parameters are sharded on it (`cfg.mesh_model`).
    facts: with config.editor.null_facts, the fact rows whose keys join the projection's covariance
    (`pipeline.null_fact_rows`); required then, refused otherwise."""
    weights = model.layers.weights(list(layers), part=cfg.saliency.part)
    tc = train_config(cfg)
    proj = None
    if bool(tc.null_facts) != bool(facts):
        raise ValueError(f"train_mend: config.editor.null_facts={tc.null_facts!r} but {len(facts or [])} fact rows given "
                         "(the pipeline's null_fact_rows gives them exactly when null_facts is set)")
    t_proj = time.perf_counter()
    if tc.null_energy > 0:  # config.editor.null_energy: the editor trains (and edits) through P
        proj = wikitext_null_projection(model, model.params, weights, tc.null_energy, tc.null_tokens,
                                        data_dir=cfg.data_dir or None, progress=cfg.progress,
                                        **(dict(facts=facts, facts_weight=tc.null_facts_weight, facts_spec=tc.null_facts)
                                           if tc.null_facts else {}))
        print(f"null-space projection (energy {tc.null_energy:g}"
              + (f"; fact keys {tc.null_facts!r}, {proj.n_facts} rows, weight {tc.null_facts_weight:g}" if tc.null_facts else "")
              + "): " + "; ".join(
                  f"{p}: null dim {v['null_dim']} of {v['fan_in']}, text key statistics "
                  f"{'loaded from the cache' if v['from_cache'] else 'computed into'} {Path(v['cache_file']).name}"
                  + (f", facts {v['facts_tokens']} tokens ({v['facts_trace_share']:.3f} of C's trace)" if "facts_tokens" in v else "")
                  for p, v in proj.info.items()), file=sys.stderr)
    t_proj = time.perf_counter() - t_proj
    result = train_editor(model, data, weights, tc, workdir, mesh=mesh, progress=cfg.progress, null_projection=proj)
    if proj is not None:  # built here, so train_editor's own null_projection time is only its checks and file
        result.times["null_projection"] = round(t_proj + result.times.get("null_projection", 0.0), 3)
    if result.best_step is not None and result.best_step != result.step:
        return load_editor(workdir, model, step=int(result.best_step)), result
    editor = TrainedEditor(
        spec=result.spec, params=result.params, state=result.norm, model_name=model.name, step=result.step,
        projections=result.projections, null_energy=tc.null_energy if result.projections is not None else 0.0,
    )
    return editor, result


def _requests(model, rows) -> list[dict]:
    """Edit-set rows as `apply` requests (prompt, the row's target, text_pair)."""
    return [dict(prompt=r["prompt"], target=target(model, r), text_pair=r.get("text_pair", "")) for r in rows]


def mend_edit_fn(model, editor: TrainedEditor, like=None):
    """edit(params, rows) -> params: one combined MEND edit of `rows` on `params`.

    like: a tokenised batch (the edit set's val fail rows) whose row shape every edit is padded
    to when it fits (`apply.fit_to`), so that the val edits compile one program, not one per
    length and number of target tokens."""

    def edit(params, rows):
        return apply_edits(model, editor, _requests(model, rows), params=params, progress=False, like=like)

    return edit


def mend_edit_each_fn(model, editor: TrainedEditor, like=None):
    """edit_each(params, rows) -> [params edited by rows[i] alone, for each i]: `mend_edit_fn`'s
    edit of each row on its own, the rows' edits computed together (`apply.apply_each`: one
    vmapped call when every row fits `like`)."""

    def edit_each(params, rows):
        return apply_each(model, editor, _requests(model, rows), params=params, like=like)

    return edit_each


def prepare_mend(ctx: Context, layers: tuple[str, ...], name: str) -> Prepared:
    t = time.perf_counter()
    ctx.say(f"{name}: training a MEND editor on {', '.join(layers)}")
    editor, tr = train_mend(ctx.model, ctx.data, layers, ctx.cfg, ctx.work / f"editor_{name}", mesh=ctx.mesh,
                            facts=ctx.null_fact_rows or None)
    info: dict[str, Any] = dict(
        layers=list(layers), steps=tr.step, evaluated_step=editor.step, best_step=tr.best_step,
        best_val_loss=tr.best_val_loss, stopped_early=tr.stopped_early, last_val=tr.last_val,
        recompiles=tr.recompiles, seconds=time.perf_counter() - t, times=tr.times,
    )
    if ctx.null_fact_rows:  # config.editor.null_facts: which facts joined the projection's covariance
        info["null_facts"] = {"spec": ctx.cfg.editor.null_facts, "weight": float(ctx.cfg.editor.null_facts_weight),
                              "rows": len(ctx.null_fact_rows), "digest": facts_digest(ctx.null_fact_rows)}
    scale = float(ctx.cfg.eval.get("mend_edit_scale", 1.0))
    if scale != 1.0:
        editor = scaled_editor(editor, scale)
        info["edit_scale"] = scale
    like = ctx.data["val"].fail if ctx.data and "val" in ctx.data else None
    edit, edit_each = mend_edit_fn(ctx.model, editor, like=like), mend_edit_each_fn(ctx.model, editor, like=like)
    edit, edit_each = with_null_projection(ctx.model, ctx.cfg, editor.spec.weights, edit, edit_each, info,
                                           say=lambda m: ctx.say(f"{name}: {m}"), trained=editor)
    # config.eval.mend_edit_retries: apply the editor again while an edit's own prompt misses its target
    edit, edit_each = with_retries(ctx.model, edit, edit_each, ctx.cfg.eval.get("mend_edit_retries", 0), info)
    return Prepared(edit=edit, info=info, edit_each=edit_each)


def with_null_projection(model, cfg, weights, edit, edit_each, info: dict, say=print, trained: TrainedEditor | None = None):
    """(edit, edit_each) with every edit's delta on each kernel of `weights` projected on the null
    space of that kernel's input covariance (`mend.nullspace`; config.eval.mend_null_energy > 0,
    covariance over config.eval.mend_null_tokens tokens of WikiText, from the key-statistics
    cache when there); with energy 0 (the default) the very same two functions, untouched.
    info["null_projection"] holds the `NullProjection` (per-kernel null dimension, and the norm
    share of each edit that survives, filled as edits are made); the pipeline replaces it by its
    summary after the evaluation.

    trained: the editor behind `edit`. One trained through a projection (config.editor.null_energy
    > 0: `TrainedEditor.projections`) already edits through the P it was trained with - the edit
    functions apply it inside the editor, exactly as training did - so the functions come back
    untouched and info["null_projection"] records that P (energy, null dimension per kernel,
    "in_training": True); a second, evaluation-time projection on top of it is refused."""
    energy = check_energy(cfg.eval.get("mend_null_energy", 0.0), "config.eval.mend_null_energy")
    if trained is not None and trained.projections is not None:
        if energy != 0:
            raise ValueError(
                f"config.eval.mend_null_energy={energy:g} on an editor trained through a null-space projection "
                f"(config.editor.null_energy={trained.null_energy:g}): it already edits through that projection; "
                "set eval.mend_null_energy=0")
        info["null_projection"] = {
            "energy": trained.null_energy, "in_training": True,
            "kernels": {p: {"fan_in": int(a.shape[0]), "null_dim": int(round(float(np.trace(a))))}
                        for p, a in trained.projections.items()}}
        say(f"edits through the null-space projection the editor was trained with (energy {trained.null_energy:g}; "
            + ", ".join(f"{p}: null dim {v['null_dim']} of {v['fan_in']}" for p, v in info["null_projection"]["kernels"].items())
            + ")")
        return edit, edit_each
    if energy == 0:
        return edit, edit_each
    t = time.perf_counter()
    proj = null_projection(model, model.params, weights, energy, wikitext_texts(data_dir=cfg.data_dir or None),
                           max_tokens=int(cfg.eval.get("mend_null_tokens", 100_000)), progress=cfg.progress)
    info["null_projection"] = proj
    say(f"edits projected on the null space of each kernel's input covariance (energy {energy:g}; "
        + ", ".join(f"{p}: null dim {v['null_dim']} of {v['fan_in']}" for p, v in proj.info.items())
        + f"; {time.perf_counter() - t:.1f}s)")
    return (projected_edit_fn(edit, proj),
            None if edit_each is None else projected_edit_each_fn(edit_each, proj))


def top_salient(ctx: Context, n: int) -> tuple[str, ...]:
    """The n layers of highest score in the saliency profile's selection group."""
    p = ctx.profile
    order = np.argsort(-np.asarray(p.scores[p.select_group]))
    return tuple(p.layers[i] for i in order[:n])


def _prepare_causal(ctx: Context, layers: tuple[str, ...]) -> Prepared:
    prepared = prepare_mend(ctx, layers, "causal")
    prepared.info["trace"] = ctx.trace_info
    return prepared


ALL_KINDS = frozenset({"causal", "seq2seq", "classifier"})

SALEM = Method(
    name="salem", summary="MEND editor on the saliency profile's chosen layer(s)", supports=ALL_KINDS,
    layers=lambda ctx: tuple(ctx.profile.chosen),
    prepare=lambda ctx, layers: prepare_mend(ctx, layers, "salem"),
)
SALEM3 = Method(
    name="salem3", summary="MEND editor on the three most salient layers", supports=ALL_KINDS,
    layers=lambda ctx: top_salient(ctx, 3),
    prepare=lambda ctx, layers: prepare_mend(ctx, layers, "salem3"),
)
MEND_FIXED = Method(
    name="mend_fixed", summary="MEND editor on the last config.fixed_layers blocks", supports=ALL_KINDS,
    layers=lambda ctx: tuple(ctx.model.layers.names()[-ctx.cfg.fixed_layers :]),
    prepare=lambda ctx, layers: prepare_mend(ctx, layers, "mend_fixed"),
)
CAUSAL = Method(
    name="causal", summary="MEND editor on the causal-traced layer", supports=frozenset({"causal", "seq2seq"}),
    unsupported="it chooses its layer by causal tracing, which needs a generated answer (causal LMs, "
    "encoder blocks of seq2seq models)",
    layers=lambda ctx: (ctx.traced_layer,),
    prepare=_prepare_causal,
    needs_trace=lambda cfg: True,
)
