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
