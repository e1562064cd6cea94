"""Our own GPT-Neo causal LM in flax.linen.

Parameter paths mirror Hugging Face names (kernels `[in, out]`, PyTorch Linear weights are
transposed on load):

    transformer/wte/embedding, transformer/wpe/embedding
    transformer/h/{i}/ln_1/{scale,bias}
    transformer/h/{i}/attn/attention/{q,k,v}_proj/kernel     [C, C]   (no bias)
    transformer/h/{i}/attn/attention/out_proj/{kernel,bias}  [C, C]
    transformer/h/{i}/ln_2/{scale,bias}
    transformer/h/{i}/mlp/c_fc/{kernel,bias}                 [C, I]
    transformer/h/{i}/mlp/c_proj/{kernel,bias}               [I, C]
    transformer/ln_f/{scale,bias}
    lm_head/kernel                                           [C, V]  (only when untied)

GPT-Neo differs from GPT-2 in two ways that matter for equivalence: attention scores are
not scaled by 1/sqrt(head_dim), and layers listed "local" in `config.attention_layers` let
query t see only keys s with t - s < window_size.
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
    if config.hidden_size % config.num_heads:
        raise ValueError(f"hidden_size ({config.hidden_size}) must be a multiple of num_heads ({config.num_heads})")
    if len(config.attention_layers) != config.num_layers:
        raise ValueError(
            f"GPT-Neo config: attention_layers lists {len(config.attention_layers)} layers, num_layers is "
            f"{config.num_layers}"
        )
    bad = sorted(set(config.attention_layers) - {"global", "local"})
    if bad:
        raise NotImplementedError(f"GPT-Neo attention types {bad} are not supported (global, local)")
    activation(config.activation_function, "GPT-Neo config activation_function")


class GPTNeoSelfAttention(nn.Module):
    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array, cache_pos=None) -> jax.Array:
        """With `cache_pos` [B]: cache mode (`salem_jax.models.blocks.cached_kv`), bias [B, 1, T, L]."""
        cfg = self.config
        C, H, std = cfg.hidden_size, cfg.num_heads, cfg.initializer_range
        q = dense(C, "q_proj", self.dtype, bias=False, std=std)(x)
        k = dense(C, "k_proj", self.dtype, bias=False, std=std)(x)
        v = dense(C, "v_proj", self.dtype, bias=False, std=std)(x)
        k, v = split_heads(k, H), split_heads(v, H)
        if cache_pos is not None:
            k, v = cached_kv(self, k, v, cache_pos)
        out = attend(split_heads(q, H), k, v, bias, 1.0, self.dtype)
        return dense(C, "out_proj", self.dtype, std=std)(out)


class GPTNeoAttention(nn.Module):
    """The "attn" wrapper around "attention" (as in Hugging Face's naming)."""

    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, bias, cache_pos=None):
        return GPTNeoSelfAttention(self.config, self.dtype, name="attention")(x, bias, cache_pos)


class GPTNeoMLP(nn.Module):
    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        inner = cfg.intermediate_size or 4 * cfg.hidden_size
        h = activation(cfg.activation_function)(dense(inner, "c_fc", self.dtype, std=cfg.initializer_range)(x))
        return dense(cfg.hidden_size, "c_proj", self.dtype, std=cfg.initializer_range)(h)


class GPTNeoBlock(nn.Module):
    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h, bias, cache_pos=None):
        eps = self.config.layer_norm_epsilon
        a = layer_norm(eps, "ln_1", self.dtype)(h)
        h = h + GPTNeoAttention(self.config, self.dtype, name="attn")(a, bias, cache_pos)
        m = layer_norm(eps, "ln_2", self.dtype)(h)
        return h + GPTNeoMLP(self.config, self.dtype, name="mlp")(m)


class GPTNeoBlocks(nn.Module):
    config: Any
    dtype: Any = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, h, global_bias, local_bias, cache_pos=None):
        cls = layer_class(GPTNeoBlock, self.remat)
        for i, kind in enumerate(self.config.attention_layers):
            h = cls(self.config, self.dtype, name=str(i))(h, local_bias if kind == "local" else global_bias, cache_pos)
        return h


class GPTNeoModel(nn.Module):
    config: Any
    dtype: Any = jnp.float32
    remat: bool = False

    def setup(self):
        cfg = self.config
        self.wte = embed(cfg.vocab_size, cfg.hidden_size, "wte", self.dtype, cfg.initializer_range)
        self.wpe = embed(cfg.max_position_embeddings, cfg.hidden_size, "wpe", self.dtype, cfg.initializer_range)
        self.h = GPTNeoBlocks(cfg, self.dtype, self.remat)
        self.ln_f = layer_norm(cfg.layer_norm_epsilon, "ln_f", self.dtype)

    def __call__(self, input_ids, attention_mask, position_ids, cache_pos=None):
        """With `cache_pos` [B] (cache mode) attention_mask is [B, L] over the cache slots."""
        h = self.wte(input_ids) + self.wpe(position_ids)
        if cache_pos is None:
            h = self.h(h, causal_bias(attention_mask), causal_bias(attention_mask, self.config.window_size))
        else:
            T, w = input_ids.shape[1], self.config.window_size
            glob = mask_bias(cache_visible(attention_mask, cache_pos, T)[:, None])
            loc = mask_bias(cache_visible(attention_mask, cache_pos, T, w)[:, None])
            h = self.h(h, glob, loc, cache_pos)
        return self.ln_f(h)


class GPTNeoForCausalLM(nn.Module):
    """`__call__(input_ids [B,T], attention_mask | None, position_ids | None) -> logits [B, T, V]`."""

    config: Any
    dtype: Any = jnp.float32
    remat: bool = False

    def setup(self):
        check_config(self.config)
        self.transformer = GPTNeoModel(self.config, self.dtype, self.remat)
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
