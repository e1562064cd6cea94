"""Causal tracing (ROME) on tiny decoder-only and encoder-decoder models."""

import chex
import jax
import numpy as np
import pytest

from salem_jax.data.tokenize import encode
from salem_jax.locate import causal_trace as C
from salem_jax.models import hf

PROMPTS = ["the capital of france is", "what city is the capital of chile"]
SUBJECTS = ["france", "chile"]
TARGETS = ["paris", "santiago"]
N, K = 3, 4  # noised copies, restorations per call (shared so the passes compile once)


@pytest.fixture(scope="module")
def gpt2():
    m = hf.tiny("gpt2")
    b = encode(m, PROMPTS, TARGETS)
    sm = C.subject_token_mask(m, PROMPTS, SUBJECTS, b["input_ids"].shape[1])
    return m, b, sm


@pytest.fixture(scope="module")
def gpt2_traces(gpt2):
    m, b, sm = gpt2
    return C.trace(m, m.params, b, sm, n_noise=N, restorations_per_call=K, noise_std=1.0, seed=1)


def test_subject_token_mask(gpt2):
    m, b, sm = gpt2
    # "<s> the capital of france is": france is token 4; "<s> what city is the capital of chile": 7
    assert np.flatnonzero(sm[0]).tolist() == [4]
    assert np.flatnonzero(sm[1]).tolist() == [7]
    with pytest.raises(ValueError, match="does not occur in the prompt"):
        C.subject_token_mask(m, PROMPTS[:1], ["peru"], 16)
    with pytest.raises(ValueError, match="'subject' is empty"):
        C.subject_token_mask(m, PROMPTS[:1], [""], 16)


def test_restore_all_gives_clean_and_none_gives_corrupt(gpt2, gpt2_traces):
    m, b, sm = gpt2
    tr = gpt2_traces[0]
    T = b["input_ids"].shape[1]
    rng = np.random.RandomState(0)
    noise = (rng.randn(N, T, 32) * 3.0 * sm[0][None, :, None]).astype(np.float32)
    masks = np.zeros((K, 2, T), bool)
    masks[1] = True  # every layer at every position
    masks[2, 0] = True  # only the first block, every position
    masks[3, 1] = True  # only the last block, every position
    row = {k: v[:1] for k, v in b.items()}
    probs = C.restored_probs(m, m.params, row, noise, masks)
    np.testing.assert_allclose(probs[1:], tr.p_clean, rtol=2e-5)  # effect 1
    assert abs(probs[0] - tr.p_clean) > 1e-4 * tr.p_clean  # the noise does change the answer
    zero = C.restored_probs(m, m.params, row, np.zeros_like(noise), masks[:1])
    np.testing.assert_allclose(zero, tr.p_clean, rtol=2e-5)  # no noise, nothing restored: clean


def test_trace_matrix_effects_and_cost(gpt2, gpt2_traces):
    m, b, sm = gpt2
    for i, tr in enumerate(gpt2_traces):
        P = int(np.flatnonzero(b["label_mask"][i])[0]) + 1  # prompt positions
        assert tr.probs.shape == (2, P) and tr.positions == tuple(range(P))
        first_subject = tr.subject_positions[0]
        # causal attention: states before the subject are untouched by its noise, so restoring
        # them restores nothing (effect 0), exactly
        np.testing.assert_allclose(tr.probs[:, :first_subject], tr.p_corrupt, rtol=1e-6)
        np.testing.assert_allclose(tr.effect[:, :first_subject], 0.0, atol=1e-4)
        assert tr.restorations == 2 * P
        assert tr.forward_passes == -(-(2 * P + 1) // K) + 1
        assert tr.sequences == (tr.forward_passes - 1) * K * N + 1
        assert tr.chosen_layer() in ("h.0", "h.1")


def test_trace_profile_and_compile_once(gpt2, gpt2_traces, monkeypatch):
    m, b, sm = gpt2
    # fresh jitted passes that fail on a second trace: two profiles of the same shapes trace once
    for name in ("_capture", "_restored"):
        fn = getattr(C, name)
        monkeypatch.setattr(C, name, jax.jit(chex.assert_max_traces(fn.__wrapped__, n=1), static_argnums=(0, 1, 2)))
    C.trace_profile(m, m.params, b, sm, n_noise=N, restorations_per_call=K, noise_std=1.0, seed=1)
    prof, res = C.trace_profile(m, m.params, b, sm, n_noise=N, restorations_per_call=K, noise_std=1.0, seed=1)
    want = np.mean([r.effect[:, r.last_subject] for r in res], axis=0)
    np.testing.assert_allclose(prof.scores["fail"], want)
    assert prof.chosen == (("h.0", "h.1")[int(np.argmax(want))],)
    assert prof.extra["forward_passes"] == sum(r.forward_passes for r in res)
    np.testing.assert_allclose(res[0].probs, gpt2_traces[0].probs)  # deterministic for a seed


def test_encoder_decoder_traces_encoder_blocks():
    m = hf.tiny("t5")
    b = encode(m, PROMPTS[:1], TARGETS[:1])
    sm = C.subject_token_mask(m, PROMPTS[:1], SUBJECTS[:1], b["input_ids"].shape[1])
    (tr,) = C.trace(m, m.params, b, sm, n_noise=N, restorations_per_call=K, noise_std=1.0)
    assert tr.layers == ("encoder.0", "encoder.1")
    assert tr.probs.shape == (2, int(b["attention_mask"][0].sum()))
    T = b["input_ids"].shape[1]
    noise = (np.random.RandomState(0).randn(N, T, 32) * 3.0 * sm[0][None, :, None]).astype(np.float32)
    masks = np.zeros((2, 2, T), bool)
    masks[1, 1] = True  # the last encoder block at every position: the decoder sees a clean encoder
    probs = C.restored_probs(m, m.params, {k: v[:1] for k, v in b.items()}, noise, masks)
    np.testing.assert_allclose(probs[1], tr.p_clean, rtol=2e-5)
    with pytest.raises(NotImplementedError, match="encoder blocks only"):
        C.trace(m, m.params, b, sm, layers=["decoder.0"])


def test_bad_input(gpt2):
    m, b, sm = gpt2
    with pytest.raises(ValueError, match="empty batch"):
        C.trace(m, m.params, {k: v[:0] for k, v in b.items()}, sm[:0])
    with pytest.raises(KeyError, match="unknown layer 'h.9'"):
        C.trace(m, m.params, b, sm, layers=["h.9"])
    with pytest.raises(ValueError, match="no subject token"):
        C.trace(m, m.params, b, np.zeros_like(sm))
    long = {k: np.zeros((1, m.max_length + 1), np.int32) for k in b}
    with pytest.raises(ValueError, match="longer than the context"):
        C.trace(m, m.params, long, np.ones((1, m.max_length + 1), np.int32))
    with pytest.raises(NotImplementedError, match="classifiers"):
        C.traced_blocks(hf.tiny("bert"))
