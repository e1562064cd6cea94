"""transformers' Flax classes behind the LoadedModel interface (GPT-2 here; more to come).

Each architecture has: a function building its layer table from the config, and an `apply`
that maps the library's batch dict to logits aligned with `labels` (see base.py).
"""

from __future__ import annotations

import jax.numpy as jnp

from salem_jax.models.base import Block, LayerTable, LoadedModel, Weight


def gpt2_layers(config) -> LayerTable:
    blocks = []
    for i in range(config.n_layer):
        p = f"transformer/h/{i}"
        blocks.append(
            Block(
                name=f"h.{i}",
                mlp=(Weight(f"{p}/mlp/c_fc/kernel", "out_in"), Weight(f"{p}/mlp/c_proj/kernel", "out_in")),
                attention=(Weight(f"{p}/attn/c_attn/kernel", "out_in"), Weight(f"{p}/attn/c_proj/kernel", "out_in")),
            )
        )
    return LayerTable(tuple(blocks), embedding="transformer/wte")


def _causal_apply(module):
    def apply(params, batch):
        ids = batch["input_ids"]
        mask = batch["attention_mask"]
        pos = jnp.broadcast_to(jnp.arange(ids.shape[1])[None], ids.shape)
        out = module.apply({"params": params}, ids, mask, pos, deterministic=True)
        return out.logits

    return apply


def from_flax_model(name: str, model, tokenizer=None) -> LoadedModel:
    """Wrap an instantiated transformers Flax model (GPT-2 only for now)."""
    cfg = model.config
    if cfg.model_type == "gpt2":
        return LoadedModel(
            name=name,
            arch="gpt2",
            kind="causal",
            apply=_causal_apply(model.module),
            params=model.params,
            config=cfg,
            tokenizer=tokenizer,
            layers=gpt2_layers(cfg),
            max_length=cfg.n_positions,
            module=model.module,
        )
    raise NotImplementedError(f"architecture {cfg.model_type!r} is not wired up yet")


def tiny(arch: str = "gpt2", seed: int = 0, vocab_size: int = 128) -> LoadedModel:
    """A tiny random model for tests (2 blocks, width 32)."""
    if arch == "gpt2":
        from transformers import FlaxGPT2LMHeadModel, GPT2Config

        cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=vocab_size, n_positions=64)
        from salem_jax.testing import tiny_tokenizer

        return from_flax_model("tiny-gpt2", FlaxGPT2LMHeadModel(cfg, seed=seed), tiny_tokenizer())
    raise NotImplementedError(f"no tiny config for {arch!r} yet")
