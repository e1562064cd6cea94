"""ROME (`rome`): a rank-one edit of one layer's MLP output projection per request (causal LMs).

The layer is config.rome.layer, or ('' ) the one causal tracing of the train fail rows chooses.
With config.rome.covariance='held_out' the update is whitened by the key statistics of the
held-out texts (config.eval.text), as ROME's C^-1 k; 'identity' uses none. Val fail rows whose
subject does not occur in the prompt cannot be edited by ROME: they are left out and counted.
"""

from __future__ import annotations

import time

from salem_jax.baselines.rome import key_covariance, rome_edit, rome_weight
from salem_jax.config import rome_config
from salem_jax.locate.trace_rows import rows_with_subject, subject_in_prompt
from salem_jax.methods.registry import Context, Method, Prepared

COVARIANCES = ("held_out", "identity")


def rome_edit_fn(model, layer: str, cov, cfg, subjects: dict[str, str]):
    """edit(params, rows) -> params of ROME on `layer`'s MLP output projection: each row (prompt ->
    target, the record's subject) is one rank-one edit; several rows are applied one after another."""
    rc = rome_config(cfg)

    def edit(params, rows):
        for r in rows:
            s = subject_in_prompt(r["prompt"], subjects.get(r["record_id"], ""))
            if s is None:
                raise ValueError(f"ROME: row {r['id']!r}: the subject of record {r['record_id']!r} "
                                 f"({subjects.get(r['record_id'], '')!r}) does not occur in the prompt {r['prompt']!r}")
            params = rome_edit(model, params, layer, r["prompt"], s, r["target"], cov=cov, config=rc,
                               progress=False).params
        return params

    return edit


def rome_val_rows(val_rows: list[dict], subjects: dict[str, str], max_edits: int) -> tuple[list[dict], list[str]]:
    """The val rows ROME is evaluated on: the same first `max_edits` fail rows as every other method,
    less those whose subject is unknown or not in the prompt (their ids are the second item); no
    later row takes a skipped one's place, so ROME's edits are a subset of the others'."""
    fails = [r for r in val_rows if r["group"] == "fail"][:max_edits]
    usable, skipped = rows_with_subject(fails, subjects, "fail")
    keep = {id(r) for r, _ in usable}
    return [r for r in val_rows if r["group"] != "fail" or id(r) in keep], skipped


def has_subject(subjects: dict[str, str]):
    """row -> whether its record's subject occurs in its prompt (what ROME-style editors need);
    `Prepared.can_edit` of rome and the locate-then-edit methods."""
    return lambda row: bool(rows_with_subject([row], subjects, row["group"])[0])


def check(ctx: Context) -> None:
    """Before any costly step: the configured layer exists, the covariance is known and has its texts."""
    cfg, model = ctx.cfg, ctx.model
    if cfg.rome.layer and cfg.rome.layer not in model.layers.names():
        raise ValueError(f"config.rome.layer {cfg.rome.layer!r} is not a layer of {model.name!r}; "
                         f"layers are {', '.join(model.layers.names())} ('' = the causal-traced one)")
    if cfg.rome.covariance not in COVARIANCES:
        raise ValueError(f"config.rome.covariance {cfg.rome.covariance!r}: choose from {', '.join(COVARIANCES)}")
    if cfg.rome.covariance == "held_out" and not ctx.texts:
        raise ValueError(
            f"method 'rome': config.rome.covariance='held_out' needs held-out text (config.eval.text, config.eval.n_texts), "
            f"but: {ctx.text_note}. Set --config.rome.covariance=identity to edit without ROME's key statistics"
        )


def prepare(ctx: Context, layers: tuple[str, ...]) -> Prepared:
    """ROME's key covariance (held-out texts) and the val rows it can edit."""
    cfg, model, (layer,) = ctx.cfg, ctx.model, layers
    ctx.say(f"rome: rank-one edits of {layer}'s MLP output projection")
    t = time.perf_counter()
    if cfg.rome.covariance == "held_out":
        cov = key_covariance(model, model.params, layer, list(ctx.texts), window=cfg.eval.text_window,
                             batch_size=cfg.eval.batch_size, progress=cfg.progress)
        cov_note = f"key statistics of the {len(ctx.texts)} held-out texts ({ctx.text_note})"
    else:
        cov, cov_note = None, "identity (config.rome.covariance='identity')"
    eval_rows, skipped = rome_val_rows(ctx.val_rows, ctx.subjects, cfg.eval.max_edits)
    info = dict(
        layers=[layer], weight=rome_weight(model, layer).path, steps=cfg.rome.v_steps, covariance=cov_note,
        layer_from="config.rome.layer" if cfg.rome.layer else "causal tracing", seconds=time.perf_counter() - t,
        skipped_edits=len(skipped),
    )
    if not cfg.rome.layer:
        info["trace"] = ctx.trace_info
    if skipped:
        ctx.say(f"rome: {len(skipped)} val fail rows without their subject in the prompt are skipped")
    return Prepared(edit=rome_edit_fn(model, layer, cov, cfg, ctx.subjects), info=info, eval_rows=eval_rows,
                    skipped_edits=tuple(skipped), can_edit=has_subject(ctx.subjects))


ROME = Method(
    name="rome", summary="ROME's rank-one edit", supports=frozenset({"causal"}),
    unsupported="ROME edits a causal LM's MLP output projection at the last subject token",
    layers=lambda ctx: (ctx.cfg.rome.layer or ctx.traced_layer,),
    prepare=prepare,
    needs_trace=lambda cfg: not cfg.rome.layer,
    check=check,
)
