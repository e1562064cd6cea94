"""KV-cached greedy decoding (`LoadedModel.kv_decode`, `generate._cached_causal_loop`) against
the uncached loop that re-runs the whole buffer every step, and the cached step's logits against
a full forward pass at the same position."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from salem_jax import generate
from salem_jax.models import hf, llama
from salem_jax.models.base import get_path, set_path

# Five rows of different lengths (with BOS: 4, 2, 3, 6, 1 tokens): each row appends at its own
# position, and 5 rows are padded to a bucket of 8 (three padding rows, done from the start).
PROMPTS = ["the capital of", "paris", "lima is", "the capital of peru is", ""]
STEPS = 10  # with the longest prompt (6 tokens) past GPT-Neo's local window of 8


def _models():
    # Larger inits than the default 0.02 so continuations vary from step to step.
    return {
        "llama": lambda: llama.tiny_llama(seed=11, initializer_range=0.5),  # 4 heads, 2 kv heads: GQA
        "llama_untied": lambda: llama.tiny_llama(seed=4, initializer_range=0.5, tie_word_embeddings=False),
        "gpt2": lambda: hf.tiny("gpt2", seed=3, initializer_range=0.5),
        "gpt_neo": lambda: hf.tiny("gpt_neo", seed=3, initializer_range=0.5),
    }


MODELS = _models()


@functools.cache
def _shared(name):
    """One model per name for the tests that do not need a fresh one: its jitted loops (keyed by the
    model's functions and the shapes) compile once and are reused across tests."""
    return MODELS[name]()


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request):
    return _shared(request.param)


def _prompts(model):
    # the word tokenizer turns "" into BOS alone: a one-token prompt
    return [p for p in PROMPTS if model.tokenizer(p)["input_ids"]]


def test_cached_equals_uncached_ragged_rows(model):
    assert model.supports_kv_cache
    prompts = _prompts(model)
    slow = generate.greedy_ids(model, model.params, prompts, STEPS, stop_at_eos=False, kv_cache=False)
    fast = generate.greedy_ids(model, model.params, prompts, STEPS, stop_at_eos=False, kv_cache=True)
    assert fast == slow
    assert generate.greedy_ids(model, model.params, prompts, STEPS, stop_at_eos=False) == slow  # auto = cached
    assert all(len(g) == STEPS for g in fast)
    assert len({tuple(g) for g in fast}) > 2  # the rows really differ
    assert any(len(set(g)) > 2 for g in fast)  # and not one repeated token


def test_early_end_tokens(model):
    prompts = _prompts(model)
    free = generate.greedy_ids(model, model.params, prompts, STEPS, stop_at_eos=False, kv_cache=False)
    stop = free[0][2]  # row 0 emits it at its third step; other rows may stop elsewhere or never
    slow = generate.greedy_ids(model, model.params, prompts, STEPS, eos_token_id=stop, kv_cache=False)
    fast = generate.greedy_ids(model, model.params, prompts, STEPS, eos_token_id=stop, kv_cache=True)
    assert fast == slow
    assert fast == [f[: f.index(stop) + 1] if stop in f else f for f in free]
    assert len(fast[0]) <= 3 and any(len(f) == STEPS for f in fast)
    # two end tokens, one of them never emitted
    two = (stop, 1)
    assert generate.greedy_ids(model, model.params, prompts, STEPS, eos_token_id=two, kv_cache=True) == fast


def test_step_logits_match_full_forward(model):
    """Prefill a ragged buffer, then teacher-force three fixed tokens per row one step at a time:
    each step's logits equal the full forward pass's logits at that row's position."""
    rows = [model.tokenizer(p)["input_ids"] for p in _prompts(model)]
    B, L = len(rows), 16
    ids = np.zeros((B, L), np.int32)
    mask = np.zeros((B, L), np.int32)
    for b, r in enumerate(rows):
        ids[b, : len(r)], mask[b, : len(r)] = r, 1
    lens = np.asarray([len(r) for r in rows], np.int32)
    forced = np.random.default_rng(0).integers(4, 80, size=(3, B)).astype(np.int32)
    decode = jax.jit(model.kv_decode)
    full = jax.jit(model.apply)
    positions = np.broadcast_to(np.arange(L, dtype=np.int32), (B, L))
    logits, cache = decode(model.params, None, ids, mask, positions, np.zeros(B, np.int32), (lens - 1)[:, None])
    want = np.asarray(full(model.params, {"input_ids": ids, "attention_mask": mask}))
    np.testing.assert_allclose(np.asarray(logits)[:, 0], want[np.arange(B), lens - 1], rtol=1e-4, atol=1e-4)
    pos = lens.copy()
    for tok in forced:
        ids[np.arange(B), pos] = tok
        mask[np.arange(B), pos] = 1
        logits, cache = decode(model.params, cache, tok[:, None], mask, pos[:, None], pos, np.zeros((B, 1), np.int32))
        want = np.asarray(full(model.params, {"input_ids": ids, "attention_mask": mask}))
        np.testing.assert_allclose(np.asarray(logits)[:, 0], want[np.arange(B), pos], rtol=1e-4, atol=1e-4)
        pos += 1
    leaf = jax.tree_util.tree_leaves(cache)[0]
    assert leaf.shape[:2] == (B, L)  # cache length = buffer length


def _edited(model, scale=30.0):
    """The base parameters with a large rank-1 change of the last block's last MLP kernel."""
    w = model.layers.blocks[-1].mlp[-1].path
    k = get_path(model.params, w)
    u = jax.random.normal(jax.random.PRNGKey(1), (k.shape[0],))
    v = jax.random.normal(jax.random.PRNGKey(2), (k.shape[1],))
    return set_path(model.params, w, k + scale * jnp.outer(u, v) / np.sqrt(k.size))


def test_edited_params():
    m = _shared("llama")
    prompts = _prompts(m)
    p = _edited(m)
    base = generate.greedy_ids(m, m.params, prompts, STEPS, stop_at_eos=False, kv_cache=True)
    slow = generate.greedy_ids(m, p, prompts, STEPS, stop_at_eos=False, kv_cache=False)
    fast = generate.greedy_ids(m, p, prompts, STEPS, stop_at_eos=False, kv_cache=True)
    assert fast == slow
    assert fast != base  # the edited weights were used


def _scale_mlp(next_fun, args, kwargs, context):
    """Triples every block's MLP output (an edit applied on the fly)."""
    out = next_fun(*args, **kwargs)
    if context.method_name == "__call__" and context.module.path[-1:] == ("mlp",):
        return 3.0 * out
    return out


def test_under_intercept_methods():
    # A fresh model under the interceptor: the jitted loops are keyed by the model's functions, not
    # by the active interceptors, so an interceptor must be active when a model's loop is first traced.
    plain = _shared("llama")
    prompts = _prompts(plain)
    base = generate.greedy_ids(plain, plain.params, prompts, STEPS, stop_at_eos=False)
    m = MODELS["llama"]()
    with nn.intercept_methods(_scale_mlp):
        slow = generate.greedy_ids(m, m.params, prompts, STEPS, stop_at_eos=False, kv_cache=False)
        fast = generate.greedy_ids(m, m.params, prompts, STEPS, stop_at_eos=False, kv_cache=True)
    assert fast == slow
    assert fast != base  # the interceptor acted


def test_remat_model():
    m = llama.tiny_llama(seed=11, initializer_range=0.5, remat=True)
    ref = _shared("llama")
    prompts = _prompts(m)
    want = generate.greedy_ids(ref, ref.params, prompts, STEPS, stop_at_eos=False, kv_cache=False)
    assert generate.greedy_ids(m, m.params, prompts, STEPS, stop_at_eos=False, kv_cache=True) == want


def test_compiles_once_per_bucket():
    m = _shared("llama")
    generate.greedy_ids(m, m.params, ["paris is"], 4, stop_at_eos=False)
    before = generate._cached_causal_loop._cache_size()
    # Same buckets (1 row, length 16): other prompts, answer lengths and end tokens reuse it.
    generate.greedy_ids(m, m.params, ["the capital of peru is"], 7, stop_at_eos=False)
    generate.greedy_ids(m, m.params, ["lima"], 2, eos_token_id=5)
    assert generate._cached_causal_loop._cache_size() == before
    generate.greedy_ids(m, m.params, ["lima", "paris"], 2)  # 2 rows: a new bucket
    assert generate._cached_causal_loop._cache_size() == before + 1


def test_kv_cache_true_needs_support():
    m = hf.tiny("bart", seed=5)
    assert not m.supports_kv_cache
    with pytest.raises(ValueError, match="kv_cache=True"):
        generate.greedy_ids(m, m.params, ["paris"], 2, kv_cache=True)
    # the default falls back to the uncached loop
    assert len(generate.greedy_ids(m, m.params, ["paris"], 2, stop_at_eos=False)[0]) == 2


def test_prefill_of_the_prompts_only_equals_uncached(model):
    """The cached loop prefills only the first P columns of the buffer (`_prefill_length`: the
    longest prompt rounded up, not the buffer's bucket of prompt + new tokens) and pads the cache
    to L: the shortest P (the longest prompt) and the default (8 here, of L = 16) give the uncached
    loop's tokens."""
    rows = [model.tokenizer(p)["input_ids"] for p in _prompts(model)]
    B, L = 8, 16  # greedy_ids' buckets for these prompts and STEPS: the uncached and default-prefill programs are reused
    ids = np.zeros((B, L), np.int32)
    mask = np.zeros((B, L), np.int32)
    lens = np.ones(B, np.int32)
    for b, r in enumerate(rows):
        ids[b, : len(r)], mask[b, : len(r)], lens[b] = r, 1, len(r)
    mask[len(rows):, 0] = 1
    done = np.arange(B) >= len(rows)
    eos = generate._eos_array(())
    steps = np.int32(STEPS)
    want_ids, want_pos = generate._causal_loop(model.apply, model.params, ids, mask, lens, done, steps, eos)
    longest = max(map(len, rows))
    assert generate._prefill_length(longest, L) < L  # the default really shortens the prefill here
    for P in sorted({longest, generate._prefill_length(longest, L)}):
        got_ids, got_pos = generate._cached_causal_loop(model.kv_decode, model.params, ids, mask, lens, done, steps,
                                                        eos, prefill=P)
        np.testing.assert_array_equal(np.asarray(got_pos), np.asarray(want_pos))
        np.testing.assert_array_equal(np.asarray(got_ids), np.asarray(want_ids))
    assert np.all(np.asarray(want_pos)[: len(rows)] == lens[: len(rows)] + STEPS)
