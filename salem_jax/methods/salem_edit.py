"""`salem_edit`: SaLEM's editor on the layer an *editability* score chooses, not the saliency one.

The paper's `salem` edits the most salient layer (largest error gradient). On SmolLM2 that is
the first block, where a MEND editor barely learns to edit; `salem_edit` instead edits the
top-`config.saliency.top_k` layers by `salem_jax.locate.editability` (one untrained MEND step per
layer on train fail rows: share of edits fixed minus spill onto pass rows; `config.editability`),
computed on the train split, and trains the same MEND editor there (workdir/editor_salem_edit).
The profile is written to workdir/profile_editability.json and .png.
"""

from __future__ import annotations

import time

from salem_jax.config import editability_config
from salem_jax.locate.choose import LocateConfig, locate
from salem_jax.locate.plot import plot_profile
from salem_jax.methods.mend import ALL_KINDS, prepare_mend
from salem_jax.methods.registry import Context, Method, Prepared

NAME = "salem_edit"


def editability_layers(ctx: Context) -> tuple[str, ...]:
    """The top-k layers by editability of the train rows (written to workdir/profile_editability.*)."""
    cfg = ctx.cfg
    ec = editability_config(cfg)
    lc = LocateConfig(part=ec.part, top_k=cfg.saliency.top_k, seed=ec.seed, probe=ec)
    t = time.perf_counter()
    ctx.say(f"{NAME}: editability of every layer ({ec.probes} probe edits, lrs {', '.join(map(str, ec.lrs))})")
    prof = locate(ctx.model, ctx.train_rows, "editability", lc, progress=cfg.progress)
    ctx.work.mkdir(parents=True, exist_ok=True)
    (ctx.work / "profile_editability.json").write_text(prof.to_json())
    plot_profile(prof, str(ctx.work / "profile_editability.png"))
    ctx.say(f"{NAME}: editability chose {', '.join(prof.chosen)} ({time.perf_counter() - t:.0f} s)")
    return tuple(prof.chosen)


def _prepare(ctx: Context, layers: tuple[str, ...]) -> Prepared:
    prepared = prepare_mend(ctx, layers, NAME)
    prepared.info["layer_score"] = "editability"
    prepared.info["profile"] = "profile_editability.json"
    return prepared


SALEM_EDIT = Method(
    name=NAME, summary="MEND editor on the layer(s) of highest editability (untrained-editor probe)",
    supports=ALL_KINDS, layers=editability_layers, prepare=_prepare,
)
