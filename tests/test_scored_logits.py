"""Logits at the scored positions only: the losses and metrics equal the full-vocabulary,
every-position computation, and the LM head really sees K positions instead of S."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from salem_jax.data.tokenize import encode
from salem_jax.losses import batch_nll, example_correct, example_nll, kl_divergence
from salem_jax.scored_logits import SCORE_POS, scored_labels, scored_logits, with_score_positions


NAMES = ("gpt2", "llama-tied", "llama-untied")


@functools.cache
def _model(name):
    """Built on first use, not at import: every pytest-xdist worker imports this file to collect it,
    and only the one that runs it needs the models."""
    from salem_jax.models import hf, llama

    if name == "gpt2":
        return hf.tiny("gpt2", n_layer=1)
    return llama.tiny_llama(tie_word_embeddings=name == "llama-tied")

PROMPTS = ["the capital of france is", "paris is the capital of", "the capital of peru is"]
TARGETS = ["paris", "france is a country", "lima"]


def test_score_positions_put_the_scored_positions_first_in_order():
    mask = np.array([[0, 0, 1, 1, 0, 0], [0, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]], np.int32)
    b = with_score_positions({"label_mask": mask, "labels": np.arange(18).reshape(3, 6)})
    np.testing.assert_array_equal(b[SCORE_POS], [[2, 3], [1, 0], [0, 1]])
    labels, m = scored_labels({k: jnp.asarray(v) for k, v in b.items()})
    np.testing.assert_array_equal(m, [[1, 1], [1, 0], [0, 0]])
    np.testing.assert_array_equal(labels[0], [2, 3])
    with pytest.raises(ValueError, match="scored positions"):
        with_score_positions({"label_mask": mask, "labels": mask}, k=1)
    full = np.ones((2, 3), np.int32)
    assert SCORE_POS not in with_score_positions({"label_mask": full, "labels": full})  # K >= S: nothing to save


def test_default_k_is_rounded_up_to_a_power_of_two():
    # one compiled program per power of two, not per target length: 3 scored positions -> K = 4,
    # the scored positions first, then unscored ones (which count nowhere)
    mask = np.zeros((2, 12), np.int32)
    mask[0, [4, 5, 6]] = 1
    mask[1, 7] = 1
    b = with_score_positions({"label_mask": mask, "labels": mask})
    assert b[SCORE_POS].shape == (2, 4)
    np.testing.assert_array_equal(b[SCORE_POS][0, :3], [4, 5, 6])
    assert b[SCORE_POS][1, 0] == 7 and mask[1, b[SCORE_POS][1, 1:]].sum() == 0
    for need, k in [(1, 1), (2, 2), (5, 8), (8, 8), (9, 16)]:
        m = np.zeros((1, 32), np.int32)
        m[0, :need] = 1
        assert with_score_positions({"label_mask": m, "labels": m})[SCORE_POS].shape == (1, k)


@pytest.mark.parametrize("name", NAMES)
def test_losses_and_metrics_equal_the_full_computation(name):
    model = _model(name)
    batch = encode(model, PROMPTS, TARGETS)
    sb = with_score_positions(batch)
    assert sb[SCORE_POS].shape[1] < batch["input_ids"].shape[1]
    # each path jitted (one program each, reused for the second parameter set; eager, every op of
    # the forward compiled as its own program)
    full_fn = jax.jit(model.apply)
    scored_fn = jax.jit(lambda p, b: scored_logits(model.apply, p, b))
    full = full_fn(model.params, batch)
    # a second parameter set (the "edited" model) for the KL
    other = jax.tree.map(lambda x: x * 1.3, model.params)  # a KL well above float32 rounding (1.01 gave ~3e-6)
    full2 = full_fn(other, batch)
    logits, labels, mask = scored_fn(model.params, sb)
    logits2, _, _ = scored_fn(other, sb)
    assert logits.shape[:2] == sb[SCORE_POS].shape
    L, M = batch["labels"], batch["label_mask"]
    np.testing.assert_allclose(example_nll(logits, labels, mask), example_nll(full, L, M), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(batch_nll(logits, labels, mask), batch_nll(full, L, M), rtol=1e-5)
    np.testing.assert_allclose(kl_divergence(logits, logits2, mask), kl_divergence(full, full2, M), rtol=1e-4, atol=1e-8)
    np.testing.assert_array_equal(example_correct(logits, labels, mask), example_correct(full, L, M))
    # and gradients through it (what the editor's training differentiates)
    # jitted (one compilation each; op by op the backward passes compiled every small op)
    g_full = jax.jit(jax.grad(lambda p: batch_nll(model.apply(p, batch), L, M)))(model.params)
    g_sc = jax.jit(jax.grad(lambda p: batch_nll(*scored_logits(model.apply, p, sb))))(model.params)
    for a, b in zip(jax.tree.leaves(g_full), jax.tree.leaves(g_sc)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


def _flops(fn, *args):
    ca = jax.jit(fn).lower(*args).compile().cost_analysis()
    return (ca[0] if isinstance(ca, list) else ca)["flops"]


@pytest.mark.parametrize("name", NAMES)
def test_the_head_runs_at_the_scored_positions_only(name):
    """The compiled forward does (S - K) positions' worth of head matmuls less."""
    model = _model(name)
    sb = {k: jnp.asarray(v) for k, v in with_score_positions(encode(model, PROMPTS, TARGETS)).items()}
    (B, S), K = sb["input_ids"].shape, sb[SCORE_POS].shape[1]
    V, H = model.config.vocab_size, getattr(model.config, "hidden_size", None) or model.config.n_embd
    saved = _flops(model.apply, model.params, sb) - _flops(lambda p, b: scored_logits(model.apply, p, b)[0], model.params, sb)
    assert saved >= 0.9 * 2 * B * (S - K) * H * V


def test_a_model_without_a_recognised_head_is_gathered_after():
    model = _model("llama-tied")
    sb = with_score_positions(encode(model, PROMPTS, TARGETS))
    full = model.apply(model.params, sb)

    def opaque(params, batch):  # the head hidden from the interceptor: logits come from outside flax
        return jnp.asarray(full) + 0.0

    logits, _, _ = scored_logits(opaque, model.params, sb)
    np.testing.assert_allclose(logits, np.take_along_axis(np.asarray(full), sb[SCORE_POS][..., None], 1))
