"""Our own BERT sequence classifier in flax.linen (any `num_labels`).

Parameter paths mirror Hugging Face names (kernels `[in, out]`; PyTorch Linear weights are
transposed on load):

    bert/embeddings/{word,position,token_type}_embeddings/embedding
    bert/embeddings/LayerNorm/{scale,bias}
    bert/encoder/layer/{i}/attention/self/{query,key,value}/{kernel,bias}
    bert/encoder/layer/{i}/attention/output/dense/{kernel,bias}
    bert/encoder/layer/{i}/attention/output/LayerNorm/{scale,bias}
    bert/encoder/layer/{i}/intermediate/dense/{kernel,bias}    [C, I]
    bert/encoder/layer/{i}/output/dense/{kernel,bias}          [I, C]
    bert/encoder/layer/{i}/output/LayerNorm/{scale,bias}
    bert/pooler/dense/{kernel,bias}
    classifier/{kernel,bias}                                   [C, num_labels]

Logits are `tanh(pooler(h[:, 0])) @ classifier`: the [CLS] position, as transformers does.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from salem_jax.models.blocks import activation, attend, dense, embed, layer_class, layer_norm, padding_bias, split_heads


def check_config(config) -> None:
    if config.hidden_size % config.num_attention_heads:
        raise ValueError(
            f"hidden_size ({config.hidden_size}) must be a multiple of num_attention_heads "
            f"({config.num_attention_heads})"
        )
    kind = getattr(config, "position_embedding_type", "absolute") or "absolute"
    if kind != "absolute":
        raise NotImplementedError(f"BERT position_embedding_type {kind!r} is not supported (absolute only)")
    activation(config.hidden_act, "BERT config hidden_act")


class BertEmbeddings(nn.Module):
    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, token_type_ids, position_ids):
        cfg = self.config
        std, C = cfg.initializer_range, cfg.hidden_size
        h = embed(cfg.vocab_size, C, "word_embeddings", self.dtype, std)(input_ids)
        h = h + embed(cfg.max_position_embeddings, C, "position_embeddings", self.dtype, std)(position_ids)
        h = h + embed(cfg.type_vocab_size, C, "token_type_embeddings", self.dtype, std)(token_type_ids)
        return layer_norm(cfg.layer_norm_eps, "LayerNorm", self.dtype)(h)


class BertSelfAttention(nn.Module):
    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, bias):
        cfg = self.config
        C, H, std = cfg.hidden_size, cfg.num_attention_heads, cfg.initializer_range
        q = split_heads(dense(C, "query", self.dtype, std=std)(x), H)
        k = split_heads(dense(C, "key", self.dtype, std=std)(x), H)
        v = split_heads(dense(C, "value", self.dtype, std=std)(x), H)
        return attend(q, k, v, bias, (C // H) ** -0.5, self.dtype)


class BertOutput(nn.Module):
    """dense, then LayerNorm(residual + dense output) (both "attention/output" and "output")."""

    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, residual):
        cfg = self.config
        h = dense(cfg.hidden_size, "dense", self.dtype, std=cfg.initializer_range)(x)
        return layer_norm(cfg.layer_norm_eps, "LayerNorm", self.dtype)(h + residual)


class BertAttention(nn.Module):
    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h, bias):
        a = BertSelfAttention(self.config, self.dtype, name="self")(h, bias)
        return BertOutput(self.config, self.dtype, name="output")(a, h)


class BertIntermediate(nn.Module):
    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        h = dense(cfg.intermediate_size, "dense", self.dtype, std=cfg.initializer_range)(x)
        return activation(cfg.hidden_act)(h)


class BertLayer(nn.Module):
    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h, bias):
        a = BertAttention(self.config, self.dtype, name="attention")(h, bias)
        m = BertIntermediate(self.config, self.dtype, name="intermediate")(a)
        return BertOutput(self.config, self.dtype, name="output")(m, a)


class BertLayers(nn.Module):
    """The layers as submodules "0", "1", ... of "layer" (a python loop)."""

    config: Any
    dtype: Any = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, h, bias):
        cls = layer_class(BertLayer, self.remat)
        for i in range(self.config.num_hidden_layers):
            h = cls(self.config, self.dtype, name=str(i))(h, bias)
        return h


class BertEncoder(nn.Module):
    config: Any
    dtype: Any = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, h, bias):
        return BertLayers(self.config, self.dtype, self.remat, name="layer")(h, bias)


class BertPooler(nn.Module):
    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h):
        cfg = self.config
        return jnp.tanh(dense(cfg.hidden_size, "dense", self.dtype, std=cfg.initializer_range)(h[:, 0]))


class BertModel(nn.Module):
    config: Any
    dtype: Any = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids, position_ids):
        h = BertEmbeddings(self.config, self.dtype, name="embeddings")(input_ids, token_type_ids, position_ids)
        h = BertEncoder(self.config, self.dtype, self.remat, name="encoder")(h, padding_bias(attention_mask))
        return BertPooler(self.config, self.dtype, name="pooler")(h)


class BertForSequenceClassification(nn.Module):
    """`__call__(input_ids [B,T], attention_mask | None, token_type_ids | None, position_ids | None)
    -> logits [B, num_labels]` (float32)."""

    config: Any
    dtype: Any = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None):
        check_config(self.config)
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        if position_ids is None:
            position_ids = jnp.broadcast_to(jnp.arange(input_ids.shape[1])[None], input_ids.shape)
        pooled = BertModel(self.config, self.dtype, self.remat, name="bert")(
            input_ids, attention_mask, token_type_ids, position_ids
        )
        cfg = self.config
        logits = dense(cfg.num_labels, "classifier", self.dtype, std=cfg.initializer_range)(pooled)
        return logits.astype(jnp.float32)
