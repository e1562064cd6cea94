"""Pieces shared by our Flax GPT-2, GPT-Neo, BERT, BART and T5 (`salem_jax.models.gpt2` ...).

Conventions every family follows (the same as `llama.py`):
- each projection is its own `nn.Dense` with kernel `[in, out]` and float32 parameters;
  `dtype` is the computation dtype (softmax and norm statistics run in float32);
- layers are submodules "0", "1", ... built by a plain python loop (no `nn.scan`), so each
  layer has its own parameter path and `flax.linen.intercept_methods` sees every call;
- a padded key is hidden by adding `MASK_VALUE` to its score (a row with no visible key then
  softmaxes to uniform weights instead of NaN; its output is never compared or trained on).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

MASK_VALUE = -1e30

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: nn.gelu(x, approximate=True),
    "relu": nn.relu,
    "silu": nn.silu,
    "swish": nn.silu,
    "tanh": jnp.tanh,
}


def activation(name: str, where: str = "config") -> Callable[[jax.Array], jax.Array]:
    """The activation function transformers calls `name`; a clear error for the others."""
    if name not in ACTIVATIONS:
        raise NotImplementedError(f"{where}: activation {name!r} is not supported ({', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[name]


def dense(features: int, name: str, dtype: Any, *, bias: bool = True, std: float = 0.02) -> nn.Dense:
    """`nn.Dense` with kernel `[in, out]`, float32 parameters, normal(std) initial kernel."""
    return nn.Dense(
        features,
        use_bias=bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.initializers.normal(std),
        name=name,
    )


def embed(num: int, features: int, name: str, dtype: Any, std: float = 0.02) -> nn.Embed:
    return nn.Embed(
        num, features, dtype=dtype, param_dtype=jnp.float32, embedding_init=nn.initializers.normal(std), name=name
    )


def layer_norm(eps: float, name: str, dtype: Any) -> nn.LayerNorm:
    """PyTorch's LayerNorm (`scale` and `bias` parameters; statistics in float32)."""
    return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=jnp.float32, name=name)


def mask_bias(visible: jax.Array) -> jax.Array:
    """Additive float32 score bias from a boolean `visible` mask: 0 where visible, MASK_VALUE elsewhere."""
    return jnp.where(visible, 0.0, MASK_VALUE).astype(jnp.float32)


def padding_bias(attention_mask: jax.Array) -> jax.Array:
    """`[B, 1, 1, S]` bias hiding padded keys (attention_mask 0)."""
    return mask_bias(attention_mask[:, None, None, :] > 0)


def causal_bias(attention_mask: jax.Array, window: int | None = None) -> jax.Array:
    """`[B, 1, T, T]` bias: query t sees keys s <= t that are not padding (and, with `window`,
    only keys with t - s < window: GPT-Neo's local attention)."""
    T = attention_mask.shape[1]
    t = jnp.arange(T)[:, None]
    s = jnp.arange(T)[None, :]
    vis = s <= t
    if window is not None:
        vis = vis & (t - s < window)
    return mask_bias(vis[None, None] & (attention_mask[:, None, None, :] > 0))


def attend(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array, scale: float, dtype: Any) -> jax.Array:
    """Multi-head attention core.

    q `[B, T, H, D]`, k and v `[B, S, H, D]`, bias broadcastable to `[B, H, T, S]` (float32,
    added to the scaled scores) -> `[B, T, H * D]`."""
    B, T, H, D = q.shape
    scores = jnp.einsum("bthd,bshd->bhts", q, k).astype(jnp.float32) * scale + bias
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    return jnp.einsum("bhts,bshd->bthd", probs, v).reshape(B, T, H * D)


def split_heads(x: jax.Array, heads: int) -> jax.Array:
    """`[B, T, H * D]` -> `[B, T, H, D]`."""
    B, T, F = x.shape
    return x.reshape(B, T, heads, F // heads)


def default_positions(input_ids: jax.Array) -> jax.Array:
    """0 .. T-1 for every row `[B, T]` (batches are right padded)."""
    return jnp.broadcast_to(jnp.arange(input_ids.shape[1])[None], input_ids.shape)


def causal_lm_logits(trunk: Callable, head: Callable, input_ids: jax.Array, attention_mask=None, position_ids=None) -> jax.Array:
    """The causal-LM head GPT-2, GPT-Neo and Llama share: `trunk(ids, mask, positions)` (mask and
    positions defaulting to all-visible and 0 .. T-1), then `head` (the tied embedding's `attend`
    or the `lm_head`): logits [B, T, V] in float32."""
    if attention_mask is None:
        attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    if position_ids is None:
        position_ids = default_positions(input_ids)
    return head(trunk(input_ids, attention_mask, position_ids)).astype(jnp.float32)


def layer_class(cls, remat: bool):
    """`cls`, or `nn.remat(cls)` (recompute its activations in the backward pass) when `remat`."""
    return nn.remat(cls) if remat else cls


# ----------------------------------------------------------------------------- KV cache
#
# Greedy decoding (`salem_jax.generate`) can run our decoder-only models with a cache of keys
# and values instead of re-running the whole buffer every step. The cache lives in the flax
# variable collection "cache" (one "key" and one "value" array `[B, L, heads, head_dim]` per
# attention module, under that module's path), so no module's `__call__` changes its return
# type: a model in cache mode is called with `cache_pos` (where each row's new tokens go) and
# `mutable=["cache"]`, and every interceptor still sees the same submodule calls on `[B, T, ...]`
# inputs (T = 1 in a decoding step).


def cache_visible(key_mask: jax.Array, cache_pos: jax.Array, T: int, window: int | None = None) -> jax.Array:
    """`[B, T, L]` bool: which cache slots each of the T new tokens may attend to.

    key_mask [B, L]: 1 for filled cache slots (after this call's writes); cache_pos [B]: the slot
    of row b's first new token, so new token t sits at slot q = cache_pos[b] + t and sees slots
    s <= q that are filled (and, with `window`, only q - s < window: GPT-Neo's local attention).
    With cache_pos = 0 and T = L this is exactly `causal_bias`'s visibility."""
    L = key_mask.shape[1]
    q = cache_pos[:, None] + jnp.arange(T)[None]  # [B, T]
    s = jnp.arange(L)[None, None]
    vis = s <= q[:, :, None]
    if window is not None:
        vis = vis & (q[:, :, None] - s < window)
    return vis & (key_mask[:, None, :] > 0)


def _write_rows(cache: jax.Array, new: jax.Array, cache_pos: jax.Array) -> jax.Array:
    """cache [B, L, ...] with new [B, T, ...] written at slots cache_pos[b] .. cache_pos[b] + T - 1."""
    def one(c, x, p):
        return jax.lax.dynamic_update_slice(c, x.astype(c.dtype), (p,) + (0,) * (c.ndim - 1))

    return jax.vmap(one)(cache, new, cache_pos)


def cached_kv(module: nn.Module, k: jax.Array, v: jax.Array, cache_pos: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Append keys and values `[B, T, heads, D]` to `module`'s cache at each row's `cache_pos[b]`
    and return the whole cache `(keys, values)` `[B, L, heads, D]`.

    The cache is created (zeros, L = T) on the first call - the prefill over the whole buffer -
    so the cache length is the buffer length; later calls (T = 1) write one slot per row."""
    ck = module.variable("cache", "key", jnp.zeros, k.shape, k.dtype)
    cv = module.variable("cache", "value", jnp.zeros, v.shape, v.dtype)
    ck.value = _write_rows(ck.value, k, cache_pos)
    cv.value = _write_rows(cv.value, v, cache_pos)
    return ck.value, cv.value


def cached_lm_logits(
    trunk: Callable, head: Callable, input_ids, key_mask, position_ids, cache_pos, head_pos
) -> jax.Array:
    """The cache-mode twin of `causal_lm_logits`: `trunk(ids [B, T], key_mask [B, L], positions
    [B, T], cache_pos [B])` writes the T new tokens' keys/values into the cache and returns their
    hidden states; the head runs only at `head_pos` [B, K] (indices into T): logits [B, K, V]
    float32."""
    h = trunk(input_ids, key_mask, position_ids, cache_pos)
    h = jnp.take_along_axis(h, head_pos[..., None], axis=1)
    return head(h).astype(jnp.float32)


def make_kv_decode(module: nn.Module) -> Callable:
    """`decode(params, cache, input_ids, key_mask, position_ids, cache_pos, head_pos) -> (logits
    [B, K, V], cache)` for a module with a `decode` method (Llama, GPT-2, GPT-Neo). `cache` None
    is the prefill: it creates the cache with length T = the buffer length. Pure, so it can be
    jitted and traced inside `jax.lax.while_loop`."""
    method = type(module).decode

    def decode(params, cache, input_ids, key_mask, position_ids, cache_pos, head_pos):
        variables = {"params": params} if cache is None else {"params": params, "cache": cache}
        logits, state = module.apply(variables, input_ids, key_mask, position_ids, cache_pos, head_pos,
                                     method=method, mutable=["cache"])
        return logits, state["cache"]

    return decode
