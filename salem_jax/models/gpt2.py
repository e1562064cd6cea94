"""Our own GPT-2 (and DistilGPT-2, the same architecture) causal LM in flax.linen.

Parameter paths mirror Hugging Face names:

    transformer/wte/embedding                    [V, C]
    transformer/wpe/embedding                    [P, C]
    transformer/h/{i}/ln_1/{scale,bias}          [C]
    transformer/h/{i}/attn/c_attn/{kernel,bias}  [C, 3C], [3C]   (q, k, v side by side)
    transformer/h/{i}/attn/c_proj/{kernel,bias}  [C, C]
    transformer/h/{i}/ln_2/{scale,bias}
    transformer/h/{i}/mlp/c_fc/{kernel,bias}     [C, I]   (I = n_inner or 4C)
    transformer/h/{i}/mlp/c_proj/{kernel,bias}   [I, C]
    transformer/ln_f/{scale,bias}
    lm_head/kernel                               [C, V]   (only when tie_word_embeddings is False)

Kernel layout: every kernel is `[in, out]` (plain `nn.Dense`). PyTorch's GPT-2 `Conv1D` stores
its weight `[in, out]` too, so PyTorch weights load without a transpose; transformers' old
FlaxGPT2 stored these kernels `[out, in]`, so its `flax_model.msgpack` files are transposed on
load (`salem_jax.models.convert`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from salem_jax.models.blocks import (
    activation,
    attend,
    cache_visible,
    cached_kv,
    cached_lm_logits,
    causal_bias,
    causal_lm_logits,
    mask_bias,
    dense,
    embed,
    layer_class,
    layer_norm,
    split_heads,
)


def check_config(config) -> None:
    if getattr(config, "add_cross_attention", False):
        raise NotImplementedError("GPT-2 with add_cross_attention is not supported by salem_jax's GPT-2")
    if config.n_embd % config.n_head:
        raise ValueError(f"n_embd ({config.n_embd}) must be a multiple of n_head ({config.n_head})")
    activation(config.activation_function, "GPT-2 config activation_function")


class GPT2Attention(nn.Module):
    config: Any
    layer_idx: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array, cache_pos=None) -> jax.Array:
        """With `cache_pos` [B]: cache mode (`salem_jax.models.blocks.cached_kv`), bias [B, 1, T, L]."""
        cfg = self.config
        C, H = cfg.n_embd, cfg.n_head
        std = cfg.initializer_range
        q, k, v = jnp.split(dense(3 * C, "c_attn", self.dtype, std=std)(x), 3, axis=-1)
        scale = (C // H) ** -0.5 if getattr(cfg, "scale_attn_weights", True) else 1.0
        if getattr(cfg, "scale_attn_by_inverse_layer_idx", False):
            scale /= float(self.layer_idx + 1)
        k, v = split_heads(k, H), split_heads(v, H)
        if cache_pos is not None:
            k, v = cached_kv(self, k, v, cache_pos)
        out = attend(split_heads(q, H), k, v, bias, scale, self.dtype)
        return dense(C, "c_proj", self.dtype, std=std)(out)


class GPT2MLP(nn.Module):
    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        inner = cfg.n_inner or 4 * cfg.n_embd
        h = dense(inner, "c_fc", self.dtype, std=cfg.initializer_range)(x)
        h = activation(cfg.activation_function)(h)
        return dense(cfg.n_embd, "c_proj", self.dtype, std=cfg.initializer_range)(h)


class GPT2Block(nn.Module):
    config: Any
    layer_idx: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h: jax.Array, bias: jax.Array, cache_pos=None) -> jax.Array:
        eps = self.config.layer_norm_epsilon
        a = layer_norm(eps, "ln_1", self.dtype)(h)
        h = h + GPT2Attention(self.config, self.layer_idx, self.dtype, name="attn")(a, bias, cache_pos)
        m = layer_norm(eps, "ln_2", self.dtype)(h)
        return h + GPT2MLP(self.config, self.dtype, name="mlp")(m)


class GPT2Blocks(nn.Module):
    """The blocks as submodules "0", "1", ... of "h" (a python loop)."""

    config: Any
    dtype: Any = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, h, bias, cache_pos=None):
        cls = layer_class(GPT2Block, self.remat)
        for i in range(self.config.n_layer):
            h = cls(self.config, i, self.dtype, name=str(i))(h, bias, cache_pos)
        return h


class GPT2Model(nn.Module):
    config: Any
    dtype: Any = jnp.float32
    remat: bool = False

    def setup(self):
        cfg = self.config
        self.wte = embed(cfg.vocab_size, cfg.n_embd, "wte", self.dtype, cfg.initializer_range)
        self.wpe = embed(cfg.n_positions, cfg.n_embd, "wpe", self.dtype, cfg.initializer_range)
        self.h = GPT2Blocks(cfg, self.dtype, self.remat)
        self.ln_f = layer_norm(cfg.layer_norm_epsilon, "ln_f", self.dtype)

    def __call__(self, input_ids, attention_mask, position_ids, cache_pos=None):
        """With `cache_pos` [B] (cache mode) attention_mask is [B, L] over the cache slots."""
        h = self.wte(input_ids) + self.wpe(position_ids)
        if cache_pos is None:
            bias = causal_bias(attention_mask)
        else:
            bias = mask_bias(cache_visible(attention_mask, cache_pos, input_ids.shape[1])[:, None])
        h = self.h(h, bias, cache_pos)
        return self.ln_f(h)


class GPT2LMHeadModel(nn.Module):
    """`__call__(input_ids [B,T], attention_mask [B,T] | None, position_ids [B,T] | None)
    -> logits [B, T, V]` (float32)."""

    config: Any
    dtype: Any = jnp.float32
    remat: bool = False

    def setup(self):
        check_config(self.config)
        self.transformer = GPT2Model(self.config, self.dtype, self.remat)
        if not self.config.tie_word_embeddings:
            cfg = self.config
            self.lm_head = dense(cfg.vocab_size, "lm_head", self.dtype, bias=False, std=cfg.initializer_range)

    def __call__(self, input_ids, attention_mask=None, position_ids=None):
        tied = self.config.tie_word_embeddings
        head = (lambda h: self.transformer.wte.attend(h)) if tied else (lambda h: self.lm_head(h))
        return causal_lm_logits(self.transformer, head, input_ids, attention_mask, position_ids)

    def decode(self, input_ids, key_mask, position_ids, cache_pos, head_pos):
        """KV-cached pass, as `salem_jax.models.llama.LlamaForCausalLM.decode`."""
        tied = self.config.tie_word_embeddings
        head = (lambda h: self.transformer.wte.attend(h)) if tied else (lambda h: self.lm_head(h))
        return cached_lm_logits(self.transformer, head, input_ids, key_mask, position_ids, cache_pos, head_pos)
