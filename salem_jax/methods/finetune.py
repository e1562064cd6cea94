"""Fine-tuning baselines on the most salient layer: `ft` (plain) and `ft_kl` (with a KL term that
keeps the train pass rows' predictions, as MEND's FT+KL baseline)."""

from __future__ import annotations

from salem_jax.baselines.finetune import finetune
from salem_jax.config import ft_config
from salem_jax.data.tokenize import encode
from salem_jax.methods.registry import Context, Method, Prepared
from salem_jax.methods.rows import target, text_pairs


def encode_rows(model, rows: list[dict]) -> dict:
    """A batch of edit-set rows, tokenised for the model (prompt -> target, text pairs for NLI)."""
    return encode(model, [r["prompt"] for r in rows], [target(model, r) for r in rows], text_pairs=text_pairs(model, rows))


def ft_edit_fn(model, layers: tuple[str, ...], cfg, kl: bool, pass_rows: list[dict]):
    """edit(params, rows) -> params: `cfg.ft` (FTConfig) Adam steps on the `cfg.saliency.part` weights of
    `layers`, with the KL term on up to `cfg.eval.batch_size` pass rows when `kl`."""
    weights = model.layers.weights(list(layers), part=cfg.saliency.part)
    fc = ft_config(cfg, kl)
    loc = encode_rows(model, pass_rows[: cfg.eval.batch_size]) if kl and pass_rows else None

    def edit(params, rows):
        return finetune(model, params, weights, encode_rows(model, rows), loc_batch=loc, config=fc, progress=False)

    return edit


def _prepare(ctx: Context, layers: tuple[str, ...], kl: bool) -> Prepared:
    edit = ft_edit_fn(ctx.model, layers, ctx.cfg, kl=kl, pass_rows=ctx.pass_rows)
    return Prepared(edit=edit, info=dict(layers=list(layers), steps=ctx.cfg.ft.steps, seconds=0.0))


ALL_KINDS = frozenset({"causal", "seq2seq", "classifier"})

FT = Method(
    name="ft", summary="fine-tuning of the most salient layer", supports=ALL_KINDS,
    layers=lambda ctx: tuple(ctx.profile.chosen[:1]),
    prepare=lambda ctx, layers: _prepare(ctx, layers, kl=False),
)
FT_KL = Method(
    name="ft_kl", summary="fine-tuning of the most salient layer with a KL term on pass rows", supports=ALL_KINDS,
    layers=lambda ctx: tuple(ctx.profile.chosen[:1]),
    prepare=lambda ctx, layers: _prepare(ctx, layers, kl=True),
)
