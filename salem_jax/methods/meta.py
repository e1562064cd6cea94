"""The meta-learned baselines of the paper's tables as pipeline methods: `ke` (Knowledge Editor,
salem_jax.baselines.ke) and `enn` (Editable Neural Networks, salem_jax.baselines.enn).

Both edit the `config.saliency.part` weights of the last `config.fixed_layers` blocks (the blocks
MEND's fixed choice edits; MEND's ports of KE and ENN edit the same), train on the train split's
fail rows (edits) and pass rows (locality), and are configured by `config.ke` / `config.enn`.
They are classifier-only for now: tested on BERT classifiers (the paper's Tables 1 and 3).

ENN replaces the model: its `edit(params, rows)` runs the learned inner loop from ENN's
meta-trained base theta*, not from `params` (the pipeline passes the given model's parameters,
so ENN's drawdown includes what meta-training changed; `info["base_drift"]` is theta*'s own
accuracy drop on the val pass rows).
"""

from __future__ import annotations

import time

from salem_jax.baselines import enn as E
from salem_jax.baselines import ke as K
from salem_jax.baselines.meta_data import MetaData
from salem_jax.config import enn_config, ke_config
from salem_jax.eval.metrics import evaluate_edit
from salem_jax.methods.registry import Context, Method, Prepared

UNSUPPORTED = "tested on sequence classifiers only so far (the paper's classification tables)"


def last_blocks(ctx: Context) -> tuple[str, ...]:
    return tuple(ctx.model.layers.names()[-ctx.cfg.fixed_layers :])


def prepare_ke(ctx: Context, layers: tuple[str, ...]) -> Prepared:
    t = time.perf_counter()
    kc = ke_config(ctx.cfg)
    data = MetaData.from_rows(ctx.model, ctx.train_rows, seed=ctx.cfg.seed, loc_per_step=kc.loc_per_step)
    ctx.say(f"ke: training the hyper-network for {', '.join(layers)} ({kc.steps} steps)")
    res = K.train_ke(ctx.model, data, ctx.model.layers.weights(list(layers), part=ctx.cfg.saliency.part), kc,
                     progress=ctx.cfg.progress)
    edit_rows = K.ke_edit_fn(ctx.model, res)

    def edit(params, rows):
        if params is not ctx.model.params:
            return K.ke_edit_fn(ctx.model, res, base=params)(rows)
        return edit_rows(rows)

    return Prepared(edit=edit, info=dict(layers=list(layers), steps=kc.steps, history=res.history[-3:],
                                         seconds=time.perf_counter() - t))


def prepare_enn(ctx: Context, layers: tuple[str, ...]) -> Prepared:
    t = time.perf_counter()
    ec = enn_config(ctx.cfg)
    data = MetaData.from_rows(ctx.model, ctx.train_rows, seed=ctx.cfg.seed, edits_per_step=ec.edits_per_step,
                              loc_per_step=ec.loc_per_step)
    ctx.say(f"enn: meta-training the base model, edits on {', '.join(layers)} ({ec.steps} steps)")
    res = E.train_enn(ctx.model, data, ctx.model.layers.weights(list(layers), part=ctx.cfg.saliency.part), ec,
                      progress=ctx.cfg.progress)
    edit_rows = E.enn_edit_fn(ctx.model, res, ec.n_edit_steps)
    drift = base_drift(ctx, res.params)

    def edit(params, rows):  # from theta*, whatever `params` (module docstring)
        return edit_rows(rows)

    return Prepared(edit=edit, info=dict(layers=list(layers), steps=ec.steps, history=res.history[-3:],
                                         edit_lrs={p: float(v) for p, v in res.lrs.items()}, base_drift=drift,
                                         seconds=time.perf_counter() - t))


def base_drift(ctx: Context, theta) -> float | None:
    """Accuracy of the given model minus ENN's theta* on the val pass rows (before any edit)."""
    passes = [r for r in ctx.val_rows if r["group"] == "pass"][: ctx.cfg.eval.max_pass]
    if not passes:
        return None
    m = evaluate_edit(ctx.model, ctx.model.params, theta, {"pass": passes}, batch_size=ctx.cfg.eval.batch_size,
                      progress=False)
    return float(m["dd_acc"])


KE = Method(
    name="ke", summary="Knowledge Editor (De Cao et al. 2021): a hyper-network's one-shot update of the last blocks",
    supports=frozenset({"classifier"}), unsupported=UNSUPPORTED, layers=last_blocks, prepare=prepare_ke,
)
ENN = Method(
    name="enn", summary="Editable Neural Networks (Sinitsin et al. 2020): meta-trained base, gradient-step edits",
    supports=frozenset({"classifier"}), unsupported=UNSUPPORTED, layers=last_blocks, prepare=prepare_enn,
)
