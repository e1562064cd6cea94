"""Our own T5 encoder-decoder LM in flax.linen: v1.0 (`wi`, ReLU) and v1.1 / gated (`wi_0`,
`wi_1`), tied or untied LM head.

Parameter paths mirror Hugging Face names (kernels `[in, out]`, no biases; PyTorch Linear
weights are transposed on load):

    shared/embedding                                                      [V, d]
    encoder/block/{i}/layer/0/SelfAttention/{q,k,v,o}/kernel              [d, H*dk] ([H*dk, d] for o)
    encoder/block/0/layer/0/SelfAttention/relative_attention_bias/embedding   [buckets, H]  (block 0 only)
    encoder/block/{i}/layer/0/layer_norm/weight                           [d]
    encoder/block/{i}/layer/1/DenseReluDense/{wi | wi_0, wi_1, wo}/kernel
    encoder/block/{i}/layer/1/layer_norm/weight
    encoder/final_layer_norm/weight
    decoder/block/{i}/layer/0/SelfAttention/...   (relative bias in block 0, causal buckets)
    decoder/block/{i}/layer/1/EncDecAttention/{q,k,v,o}/kernel, layer/1/layer_norm/weight
    decoder/block/{i}/layer/2/DenseReluDense/..., layer/2/layer_norm/weight
    decoder/final_layer_norm/weight
    lm_head/kernel                                                        [d, V]  (only when untied)

"encoder/block/{i}/layer" is the block module (its output is `(hidden, position_bias)`).
T5 specifics: RMS layer norm without mean or bias, unscaled attention scores plus a learned
relative-position bias (computed by block 0, shared by the other blocks of its stack), and a
tied head that rescales the decoder output by d_model**-0.5.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from salem_jax.models.blocks import activation, attend, dense, layer_class, mask_bias, split_heads


def check_config(config) -> None:
    activation(config.dense_act_fn, "T5 config dense_act_fn")


def ties_head(config) -> bool:
    """Whether the LM head is the shared embedding (T5 v1.0: tied, decoder output rescaled by
    d_model**-0.5) or its own `lm_head` (v1.1: `tie_word_embeddings: false` in config.json).

    transformers 5 rewrites `T5Config.tie_word_embeddings` to True always and keeps the flag of
    config.json as `scale_decoder_outputs`; transformers 4 keeps `tie_word_embeddings` as given."""
    flag = getattr(config, "scale_decoder_outputs", None)
    return bool(config.tie_word_embeddings if flag is None else flag)


class T5LayerNorm(nn.Module):
    """x / rms(x) * weight (no mean subtraction, no bias), statistics in float32."""

    eps: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        w = self.param("weight", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return w.astype(self.dtype) * y.astype(self.dtype)


def relative_position_bucket(relative_position, bidirectional: bool, num_buckets: int, max_distance: int):
    """T5's bucket of each relative position (key - query): exact for small distances,
    logarithmic up to `max_distance`; bidirectional buckets split the range by sign."""
    rel = relative_position
    buckets = jnp.zeros_like(rel)
    n = num_buckets
    if bidirectional:
        n //= 2
        buckets = buckets + (rel > 0).astype(rel.dtype) * n
        rel = jnp.abs(rel)
    else:
        rel = -jnp.minimum(rel, 0)
    exact = n // 2
    small = rel < exact
    safe = jnp.maximum(rel, 1).astype(jnp.float32)
    large = exact + (jnp.log(safe / exact) / math.log(max_distance / exact) * (n - exact)).astype(rel.dtype)
    large = jnp.minimum(large, n - 1)
    return buckets + jnp.where(small, rel, large)


class T5Attention(nn.Module):
    """Self or cross attention. With `relative_bias`, owns the relative-position embedding and
    returns the position bias `[1, H, T, S]` it computed (for the stack's later blocks)."""

    config: Any
    causal: bool
    relative_bias: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, kv, mask_bias_, position_bias=None):
        cfg = self.config
        H, dk, d = cfg.num_heads, cfg.d_kv, cfg.d_model
        f = cfg.initializer_factor
        inner = H * dk
        q = split_heads(dense(inner, "q", self.dtype, bias=False, std=f * (d * dk) ** -0.5)(x), H)
        k = split_heads(dense(inner, "k", self.dtype, bias=False, std=f * d**-0.5)(kv), H)
        v = split_heads(dense(inner, "v", self.dtype, bias=False, std=f * d**-0.5)(kv), H)
        if position_bias is None:
            T, S = x.shape[1], kv.shape[1]
            if self.relative_bias:
                table = nn.Embed(
                    cfg.relative_attention_num_buckets,
                    H,
                    param_dtype=jnp.float32,
                    embedding_init=nn.initializers.normal(f * d**-0.5),
                    name="relative_attention_bias",
                )
                rel = jnp.arange(S)[None, :] - jnp.arange(T)[:, None]
                b = relative_position_bucket(
                    rel,
                    bidirectional=not self.causal,
                    num_buckets=cfg.relative_attention_num_buckets,
                    max_distance=getattr(cfg, "relative_attention_max_distance", 128),
                )
                position_bias = table(b).astype(jnp.float32).transpose(2, 0, 1)[None]  # [1, H, T, S]
            else:
                position_bias = jnp.zeros((1, H, T, S), jnp.float32)
        out = attend(q, k, v, position_bias + mask_bias_, 1.0, self.dtype)
        return dense(d, "o", self.dtype, bias=False, std=f * inner**-0.5)(out), position_bias


class T5LayerAttention(nn.Module):
    """layer_norm, attention ("SelfAttention" or "EncDecAttention"), residual add."""

    config: Any
    attn_name: str
    causal: bool
    relative_bias: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h, kv, mask_bias_, position_bias=None):
        cfg = self.config
        x = T5LayerNorm(cfg.layer_norm_epsilon, self.dtype, name="layer_norm")(h)
        if kv is None:
            kv = x
        out, position_bias = T5Attention(cfg, self.causal, self.relative_bias, self.dtype, name=self.attn_name)(
            x, kv, mask_bias_, position_bias
        )
        return h + out, position_bias


class T5DenseReluDense(nn.Module):
    """v1.0: wo(act(wi(x))); gated (v1.1): wo(act(wi_0(x)) * wi_1(x))."""

    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        d, ff, f = cfg.d_model, cfg.d_ff, cfg.initializer_factor
        act = activation(cfg.dense_act_fn)
        if cfg.is_gated_act:
            h = act(dense(ff, "wi_0", self.dtype, bias=False, std=f * d**-0.5)(x))
            h = h * dense(ff, "wi_1", self.dtype, bias=False, std=f * d**-0.5)(x)
        else:
            h = act(dense(ff, "wi", self.dtype, bias=False, std=f * d**-0.5)(x))
        return dense(d, "wo", self.dtype, bias=False, std=f * ff**-0.5)(h)


class T5LayerFF(nn.Module):
    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h):
        x = T5LayerNorm(self.config.layer_norm_epsilon, self.dtype, name="layer_norm")(h)
        return h + T5DenseReluDense(self.config, self.dtype, name="DenseReluDense")(x)


class T5Block(nn.Module):
    """The sub-layers "0", "1" (, "2") of one block; returns (hidden, self-attention position bias)."""

    config: Any
    decoder: bool
    first: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h, self_mask, position_bias, enc=None, cross_mask=None):
        cfg = self.config
        h, position_bias = T5LayerAttention(
            cfg, "SelfAttention", self.decoder, self.first and position_bias is None, self.dtype, name="0"
        )(h, None, self_mask, position_bias)
        if self.decoder:
            h, _ = T5LayerAttention(cfg, "EncDecAttention", False, False, self.dtype, name="1")(h, enc, cross_mask)
        h = T5LayerFF(cfg, self.dtype, name="2" if self.decoder else "1")(h)
        return h, position_bias


class T5LayerCollection(nn.Module):
    """Block i of a stack: "block/{i}", holding the block module "layer" (Hugging Face's nesting)."""

    config: Any
    decoder: bool
    first: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h, self_mask, position_bias, enc=None, cross_mask=None):
        return T5Block(self.config, self.decoder, self.first, self.dtype, name="layer")(
            h, self_mask, position_bias, enc, cross_mask
        )


class T5Blocks(nn.Module):
    config: Any
    decoder: bool
    dtype: Any = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, h, self_mask, enc=None, cross_mask=None):
        cfg = self.config
        n = cfg.num_decoder_layers if self.decoder else cfg.num_layers
        cls = layer_class(T5LayerCollection, self.remat)
        bias = None
        for i in range(n):
            h, bias = cls(cfg, self.decoder, i == 0, self.dtype, name=str(i))(h, self_mask, bias, enc, cross_mask)
        return h


class T5Stack(nn.Module):
    config: Any
    decoder: bool
    dtype: Any = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, x, self_mask, enc=None, cross_mask=None):
        h = T5Blocks(self.config, self.decoder, self.dtype, self.remat, name="block")(x, self_mask, enc, cross_mask)
        return T5LayerNorm(self.config.layer_norm_epsilon, self.dtype, name="final_layer_norm")(h)


class T5ForConditionalGeneration(nn.Module):
    """`__call__(input_ids [B,T], attention_mask [B,T], decoder_input_ids [B,S],
    decoder_attention_mask [B,S] | None) -> logits [B, S, V]` (float32), teacher forced."""

    config: Any
    dtype: Any = jnp.float32
    remat: bool = False

    def setup(self):
        check_config(self.config)
        cfg = self.config
        self.shared = nn.Embed(
            cfg.vocab_size,
            cfg.d_model,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            embedding_init=nn.initializers.normal(cfg.initializer_factor),
        )
        self.encoder = T5Stack(cfg, False, self.dtype, self.remat)
        self.decoder = T5Stack(cfg, True, self.dtype, self.remat)
        if not ties_head(cfg):
            self.lm_head = dense(cfg.vocab_size, "lm_head", self.dtype, bias=False, std=cfg.initializer_factor)

    def __call__(self, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask=None):
        if decoder_attention_mask is None:
            decoder_attention_mask = jnp.ones(decoder_input_ids.shape, jnp.int32)
        enc_mask = mask_bias(attention_mask[:, None, None, :] > 0)
        enc = self.encoder(self.shared(input_ids), enc_mask)
        S = decoder_input_ids.shape[1]
        causal = jnp.tril(jnp.ones((S, S), bool))
        dec_mask = mask_bias(causal[None, None] & (decoder_attention_mask[:, None, None, :] > 0))
        h = self.decoder(self.shared(decoder_input_ids), dec_mask, enc, enc_mask)
        if ties_head(self.config):
            logits = self.shared.attend(h * (self.config.d_model**-0.5))
        else:
            logits = self.lm_head(h)
        return logits.astype(jnp.float32)
