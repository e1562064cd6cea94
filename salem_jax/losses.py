"""Losses and per-token scores on the library's one logits shape ([B, S, V], see models/base.py).

All functions are pure and jit-friendly; masks decide which positions count.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_logprobs(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """log p(labels[b, s]) under logits[b, s]: [B, S] (float32 whatever the logits' dtype)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]


def example_nll(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean NLL over each example's counted positions: [B]. An example with no counted
    position gets 0 (and contributes nothing to a gradient)."""
    mask = mask.astype(jnp.float32)
    nll = -token_logprobs(logits, labels) * mask
    return nll.sum(-1) / jnp.maximum(mask.sum(-1), 1.0)


def batch_nll(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean over examples of `example_nll` (examples with an all-zero mask do not count)."""
    per = example_nll(logits, labels, mask)
    has = (mask.sum(-1) > 0).astype(jnp.float32)
    return (per * has).sum() / jnp.maximum(has.sum(), 1.0)


def token_correct(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """argmax == label per position: [B, S] bool."""
    return jnp.argmax(logits, axis=-1) == labels


def example_correct(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
    """Whether every counted position of an example is the argmax (teacher forced): [B] bool.
    This is the paper's edit-accuracy criterion (eq. 7) for sequences; for a classifier
    (S = 1) it is plain argmax accuracy."""
    ok = token_correct(logits, labels) | (mask == 0)
    return jnp.all(ok, axis=-1) & (mask.sum(-1) > 0)


def example_token_accuracy(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
    """Share of counted positions whose argmax is the label: [B]."""
    mask = mask.astype(jnp.float32)
    ok = token_correct(logits, labels).astype(jnp.float32) * mask
    return ok.sum(-1) / jnp.maximum(mask.sum(-1), 1.0)


def kl_divergence(base_logits: jax.Array, new_logits: jax.Array, mask: jax.Array) -> jax.Array:
    """KL(p_base || p_new) per counted position, averaged over counted positions: scalar.

    This is MEND's locality loss (base distribution first)."""
    mask = mask.astype(jnp.float32)
    p_log = jax.nn.log_softmax(base_logits.astype(jnp.float32), -1)
    q_log = jax.nn.log_softmax(new_logits.astype(jnp.float32), -1)
    kl = (jnp.exp(p_log) * (p_log - q_log)).sum(-1)
    return (kl * mask).sum() / jnp.maximum(mask.sum(), 1.0)
