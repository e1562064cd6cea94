"""Our own BART encoder-decoder LM in flax.linen.

Parameter paths mirror Hugging Face names (kernels `[in, out]`; PyTorch Linear weights are
transposed on load):

    model/shared/embedding                                     [V, d]
    model/{encoder,decoder}/embed_positions/embedding          [P + 2, d]  (positions offset by 2)
    model/{encoder,decoder}/layernorm_embedding/{scale,bias}
    model/encoder/layers/{i}/self_attn/{q,k,v,out}_proj/{kernel,bias}
    model/encoder/layers/{i}/self_attn_layer_norm/{scale,bias}
    model/encoder/layers/{i}/fc1, fc2 /{kernel,bias}           [d, F], [F, d]
    model/encoder/layers/{i}/final_layer_norm/{scale,bias}
    model/decoder/layers/{i}/... the same, plus encoder_attn/{q,k,v,out}_proj and encoder_attn_layer_norm
    final_logits_bias                                          [1, V]
    lm_head/kernel                                             [d, V]  (only when untied)

Post-layer-norm blocks (norm after each residual add), as BART (not mBART) is built. The
shared embedding is called for the encoder first, then the decoder (causal tracing relies on it).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from salem_jax.models.blocks import (
    activation,
    attend,
    causal_bias,
    default_positions,
    dense,
    embed,
    layer_class,
    layer_norm,
    padding_bias,
    split_heads,
)

POSITION_OFFSET = 2  # BartLearnedPositionalEmbedding looks up position + 2
LN_EPS = 1e-5  # PyTorch's LayerNorm default, which BART uses


def check_config(config) -> None:
    for side in ("encoder", "decoder"):
        heads = getattr(config, f"{side}_attention_heads")
        if config.d_model % heads:
            raise ValueError(f"d_model ({config.d_model}) must be a multiple of {side}_attention_heads ({heads})")
    for flag in ("normalize_before", "add_final_layer_norm"):
        if getattr(config, flag, False):
            raise NotImplementedError(f"BART config {flag}=True (mBART-style) is not supported")
    activation(config.activation_function, "BART config activation_function")


class BartAttention(nn.Module):
    config: Any
    heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, kv, bias):
        d, H, std = self.config.d_model, self.heads, self.config.init_std
        q = split_heads(dense(d, "q_proj", self.dtype, std=std)(x), H)
        k = split_heads(dense(d, "k_proj", self.dtype, std=std)(kv), H)
        v = split_heads(dense(d, "v_proj", self.dtype, std=std)(kv), H)
        out = attend(q, k, v, bias, (d // H) ** -0.5, self.dtype)
        return dense(d, "out_proj", self.dtype, std=std)(out)


class BartEncoderLayer(nn.Module):
    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h, bias):
        cfg = self.config
        h = h + BartAttention(cfg, cfg.encoder_attention_heads, self.dtype, name="self_attn")(h, h, bias)
        h = layer_norm(LN_EPS, "self_attn_layer_norm", self.dtype)(h)
        m = activation(cfg.activation_function)(dense(cfg.encoder_ffn_dim, "fc1", self.dtype, std=cfg.init_std)(h))
        h = h + dense(cfg.d_model, "fc2", self.dtype, std=cfg.init_std)(m)
        return layer_norm(LN_EPS, "final_layer_norm", self.dtype)(h)


class BartDecoderLayer(nn.Module):
    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h, self_bias, enc, cross_bias):
        cfg = self.config
        heads = cfg.decoder_attention_heads
        h = h + BartAttention(cfg, heads, self.dtype, name="self_attn")(h, h, self_bias)
        h = layer_norm(LN_EPS, "self_attn_layer_norm", self.dtype)(h)
        h = h + BartAttention(cfg, heads, self.dtype, name="encoder_attn")(h, enc, cross_bias)
        h = layer_norm(LN_EPS, "encoder_attn_layer_norm", self.dtype)(h)
        m = activation(cfg.activation_function)(dense(cfg.decoder_ffn_dim, "fc1", self.dtype, std=cfg.init_std)(h))
        h = h + dense(cfg.d_model, "fc2", self.dtype, std=cfg.init_std)(m)
        return layer_norm(LN_EPS, "final_layer_norm", self.dtype)(h)


class BartLayers(nn.Module):
    """Encoder or decoder layers as submodules "0", "1", ... of "layers" (a python loop)."""

    config: Any
    decoder: bool
    dtype: Any = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, h, *args):
        cfg = self.config
        n = cfg.decoder_layers if self.decoder else cfg.encoder_layers
        cls = layer_class(BartDecoderLayer if self.decoder else BartEncoderLayer, self.remat)
        for i in range(n):
            h = cls(cfg, self.dtype, name=str(i))(h, *args)
        return h


class BartStack(nn.Module):
    """Positions + layernorm_embedding + layers, over already embedded (and scaled) tokens."""

    config: Any
    decoder: bool
    dtype: Any = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, x, positions, *args):
        cfg = self.config
        pos = embed(cfg.max_position_embeddings + POSITION_OFFSET, cfg.d_model, "embed_positions", self.dtype,
                    cfg.init_std)
        h = x + pos(positions + POSITION_OFFSET)
        h = layer_norm(LN_EPS, "layernorm_embedding", self.dtype)(h)
        return BartLayers(cfg, self.decoder, self.dtype, self.remat, name="layers")(h, *args)


class BartModel(nn.Module):
    config: Any
    dtype: Any = jnp.float32
    remat: bool = False

    def setup(self):
        cfg = self.config
        self.shared = embed(cfg.vocab_size, cfg.d_model, "shared", self.dtype, cfg.init_std)
        self.encoder = BartStack(cfg, False, self.dtype, self.remat)
        self.decoder = BartStack(cfg, True, self.dtype, self.remat)

    def __call__(self, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask, positions, dec_positions):
        scale = math.sqrt(self.config.d_model) if self.config.scale_embedding else 1.0
        enc = self.encoder(self.shared(input_ids) * scale, positions, padding_bias(attention_mask))
        dec = self.shared(decoder_input_ids) * scale
        return self.decoder(dec, dec_positions, causal_bias(decoder_attention_mask), enc, padding_bias(attention_mask))


class BartForConditionalGeneration(nn.Module):
    """`__call__(input_ids [B,T], attention_mask [B,T], decoder_input_ids [B,S],
    decoder_attention_mask [B,S], position_ids | None, decoder_position_ids | None)
    -> logits [B, S, V]` (float32), teacher forced on decoder_input_ids."""

    config: Any
    dtype: Any = jnp.float32
    remat: bool = False

    def setup(self):
        check_config(self.config)
        cfg = self.config
        self.model = BartModel(cfg, self.dtype, self.remat)
        self.final_logits_bias = self.param("final_logits_bias", nn.initializers.zeros, (1, cfg.vocab_size),
                                            jnp.float32)
        if not cfg.tie_word_embeddings:
            self.lm_head = dense(cfg.vocab_size, "lm_head", self.dtype, bias=False, std=cfg.init_std)

    def __call__(self, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask=None,
                 position_ids=None, decoder_position_ids=None):
        if decoder_attention_mask is None:
            decoder_attention_mask = jnp.ones(decoder_input_ids.shape, jnp.int32)
        if position_ids is None:
            position_ids = default_positions(input_ids)
        if decoder_position_ids is None:
            decoder_position_ids = default_positions(decoder_input_ids)
        h = self.model(input_ids, attention_mask, decoder_input_ids, decoder_attention_mask, position_ids,
                       decoder_position_ids)
        logits = self.model.shared.attend(h) if self.config.tie_word_embeddings else self.lm_head(h)
        return logits.astype(jnp.float32) + self.final_logits_bias
