"""Jitted greedy decoding against a hand-written loop of full forward passes."""

import dataclasses

import jax
import numpy as np
import pytest

from salem_jax import generate
from salem_jax.models import hf, llama

# Different lengths (with BOS: 4, 2, 3 tokens) so every row appends at its own position; few
# distinct lengths overall, because the unpadded reference compiles once per length.
PROMPTS = ["the capital of", "paris", "lima is"]


def _reference_causal(model, params, prompt, steps):
    """argmax over one unpadded forward pass per new token."""
    apply = jax.jit(model.apply)
    ids = list(model.tokenizer(prompt)["input_ids"])
    new = []
    for _ in range(steps):
        x = np.asarray([ids + new], np.int32)
        logits = apply(params, {"input_ids": x, "attention_mask": np.ones_like(x)})
        t = int(np.argmax(np.asarray(logits)[0, -1]))
        new.append(t)
    return new


def _reference_padded_causal(model, params, prompts, steps, length=16):
    """A python loop over one jitted forward pass of a fixed [rows, length] buffer. Causality
    makes tokens to the right of a row's end irrelevant, so the attention mask is all ones
    (unlike `greedy`, which masks them); one compile instead of one per length, for
    transformers' slow-to-compile Flax modules."""
    apply = jax.jit(model.apply)
    rows = [list(model.tokenizer(p)["input_ids"]) for p in prompts]
    buf = np.zeros((len(rows), length), np.int32)
    for b, r in enumerate(rows):
        buf[b, : len(r)] = r
    news = [[] for _ in rows]
    for _ in range(steps):
        logits = np.asarray(apply(params, {"input_ids": buf, "attention_mask": np.ones_like(buf)}))
        for b, r in enumerate(rows):
            pos = len(r) + len(news[b])
            t = int(np.argmax(logits[b, pos - 1]))
            buf[b, pos] = t
            news[b].append(t)
    return news


def _reference_seq2seq(model, params, prompts, steps, length=16):
    """The same for an encoder-decoder: the decoder buffer holds the start token and the
    tokens so far (all visible; the decoder is causal)."""
    apply = jax.jit(model.apply)
    rows = [list(model.tokenizer(p)["input_ids"]) for p in prompts]
    src = np.zeros((len(rows), 16), np.int32)
    for b, r in enumerate(rows):
        src[b, : len(r)] = r
    dec = np.zeros((len(rows), length), np.int32)
    dec[:, 0] = model.config.decoder_start_token_id
    for i in range(steps):
        batch = dict(
            input_ids=src, attention_mask=(src > 0).astype(np.int32), decoder_input_ids=dec,
            decoder_attention_mask=np.ones_like(dec),
        )
        dec[:, i + 1] = np.argmax(np.asarray(apply(params, batch))[:, i], axis=-1)
    return dec[:, 1 : steps + 1].tolist()


STEPS = 4


def _truncate_at(ids, stop):
    """Greedy decoding is deterministic, so stopping at a token equals the free-running
    continuation cut after that token's first occurrence."""
    return ids[: ids.index(stop) + 1] if stop in ids else ids


@pytest.fixture(scope="module")
def tiny():
    # A larger init than the default 0.02 so continuations vary from step to step.
    return llama.tiny_llama(seed=11, initializer_range=0.5)


@pytest.fixture(scope="module")
def free(tiny):
    """The reference: unpadded, unjitted forward passes, one per new token."""
    return [_reference_causal(tiny, tiny.params, p, STEPS) for p in PROMPTS]


@pytest.mark.parametrize("kv_cache", [True, False])
def test_llama_matches_reference_loop(tiny, free, kv_cache):
    got = generate.greedy_ids(tiny, tiny.params, PROMPTS, STEPS, stop_at_eos=False, kv_cache=kv_cache)
    assert got == free
    assert all(len(g) == STEPS for g in got)
    assert len({tuple(g) for g in got}) > 1  # the rows really differ


def test_stop_token_ends_each_row_independently(tiny, free):
    stop = free[0][2]  # a token row 0 emits at its third step
    got = generate.greedy_ids(tiny, tiny.params, PROMPTS, STEPS, eos_token_id=stop)
    assert got == [_truncate_at(f, stop) for f in free]
    assert got[0][-1] == stop and len(got[0]) <= 3


def test_text_follows_the_prompt(tiny, free):
    texts = generate.greedy(tiny, tiny.params, PROMPTS, STEPS, stop_at_eos=False)
    vocab = {i: w for w, i in tiny.tokenizer.get_vocab().items()}
    for text, new in zip(texts, free):
        # ids 0..3 are the word tokenizer's specials; ids past its 87 words decode to nothing
        words = [vocab[i] for i in new if 3 < i < len(vocab)]
        assert text == "".join(" " + w for w in words)


def test_compiles_once_per_bucket(tiny):
    # the uncached loop (tests/test_kv_cache.py checks the cached one)
    generate.greedy_ids(tiny, tiny.params, ["paris is"], STEPS, stop_at_eos=False, kv_cache=False)
    before = generate._causal_loop._cache_size()
    # Same buckets (1 row, length 16): other prompts, answer lengths and end tokens reuse it.
    generate.greedy_ids(tiny, tiny.params, ["the capital of peru is"], STEPS + 3, stop_at_eos=False, kv_cache=False)
    generate.greedy_ids(tiny, tiny.params, ["lima"], 2, eos_token_id=5, kv_cache=False)
    assert generate._causal_loop._cache_size() == before
    generate.greedy_ids(tiny, tiny.params, ["lima", "paris"], 2, kv_cache=False)  # 2 rows: a new bucket
    assert generate._causal_loop._cache_size() == before + 1


def test_gpt2_matches_reference_loop():
    m = hf.tiny("gpt2", seed=3)
    got = generate.greedy_ids(m, m.params, PROMPTS[:2], 4, stop_at_eos=False)
    assert got == _reference_padded_causal(m, m.params, PROMPTS[:2], 4)


def test_seq2seq_matches_reference_loop():
    m = hf.tiny("bart", seed=5)
    want = _reference_seq2seq(m, m.params, PROMPTS[:2], 4)
    assert generate.greedy_ids(m, m.params, PROMPTS[:2], 4, stop_at_eos=False) == want
    stop = want[0][1]
    got_stop = generate.greedy_ids(m, m.params, PROMPTS[:2], 4, eos_token_id=stop)
    assert got_stop == [_truncate_at(w, stop) for w in want]


def test_bad_requests_raise(tiny):
    with pytest.raises(ValueError, match="context"):
        generate.greedy_ids(tiny, tiny.params, ["paris " * 120], 16)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate.greedy_ids(tiny, tiny.params, ["paris"], 0)
    with pytest.raises(ValueError, match="classifier"):
        generate.greedy_ids(dataclasses.replace(tiny, kind="classifier"), tiny.params, ["paris"], 2)
