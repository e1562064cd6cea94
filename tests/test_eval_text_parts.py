"""The evaluator's text perplexity in parts cut to their windows' lengths (issue 14, session 24).

`EditEvaluator` (flat path, the default on decoder-only models) runs the held-out text's windows
in parts of one cut length each (`eval.edits._text_parts`), from the edited block on the base
model's kept hidden states, the head on the counted tokens only. Here its perplexities are
checked against a hand computation that shares none of that: each text tokenised, each sliding
window run alone through the whole model (no parts, no cut lengths, no cached states), the
log-softmax taken in numpy float64 and the counted tokens picked by the module docstring of
`salem_jax.eval.perplexity`'s definition."""

import jax
import numpy as np
import pytest

from salem_jax.eval.edits import EditEvaluator
from salem_jax.models import hf
from salem_jax.models.base import get_path, set_path
from salem_jax.models.llama import tiny_llama

WINDOW, STRIDE = 32, 16
# token counts (with the BOS) 2, 4, 5, 3, 6, 11, 21, 30, 62: windows of 2, 4, 5, 3, 6, 11, 21,
# 30 tokens and a long text's 32, 32, 30: cut lengths 8 (five), 16, 24 and 32 (four) - several
# parts, some with more windows than text_chunk
TEXTS = ["red", "blue green yellow", "one two three four", "five six", "red blue",
         "the capital of france is",
         "the capital of peru is lima and the capital of chile",
         " ".join(["one two three four five"] * 4),
         " ".join(["the capital of france is paris"] * 5)[:-6],
         " ".join(["red blue green yellow one two three four five six"] * 6) + " red"]


def _row(p, t, group, i):
    return dict(id=f"{group}{i}", record_id=f"r{i}", group=group, prompt=p, target=t, label=-1, text_pair="")


EDITS = [{"fail": [_row("the capital of france is", "paris", "fail", 0)],
          "adapt": [_row("capital of france is", "paris", "adapt", 0)]},
         {"fail": [_row("peru", "lima is a city", "fail", 1)]},
         {"fail": [_row("the language of japan is", "yen", "fail", 2)]}]
SHARED = {"keep": [_row("the capital of kenya is", "nairobi", "keep", 0), _row("brazil", "brasilia", "keep", 1)]}


_FORWARD: dict = {}


def _hand_text_nll(model, params, texts, window, stride):
    """(summed NLL, counted tokens) of `texts`: every window run alone through the plain forward
    under `jax.jit`, its tokens at positions 0.. and right-padded to `window` (attention mask 0),
    its logits read at its own tokens only. In a causal model a position sees only the tokens up
    to it, so the padding after a window's last token cannot reach them (the rows the evaluator
    cuts are the ones under test, never this): one program per model for every window and
    parameter set (one per window length cost ~10 programs a model; the eager forward ~35 s)."""
    forward = _FORWARD.setdefault(id(model), (model, jax.jit(model.apply)))[1]  # the model kept: its id stays its own
    total, count = 0.0, 0
    for text in texts:
        ids = list(model.tokenizer(text, add_special_tokens=True)["input_ids"])
        n, begin, scored_to = len(ids), 0, 1  # token 0 has no context: never scored
        while n >= 2:
            end = min(begin + window, n)
            seg = np.zeros((1, window), np.int32)
            seg[0, : end - begin] = ids[begin:end]
            mask = (np.arange(window) < end - begin).astype(np.int32)[None]
            logits = np.asarray(forward(params, {"input_ids": seg, "attention_mask": mask}), np.float64)[0, : end - begin]
            logp = logits - logits.max(-1, keepdims=True)
            logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
            for t in range(max(begin + 1, scored_to), end):  # token t is predicted at window position t - begin - 1
                total -= logp[t - begin - 1, ids[t]]
                count += 1
            scored_to = end
            if end == n:
                break
            begin += stride
    return total, count


def _edited(model, block: int, i: int):
    """The base parameters with block `block`'s first MLP kernel changed (one block changed)."""
    path = model.layers.weights([model.layers.names()[block]])[0].path
    k = get_path(model.params, path)
    return set_path(model.params, path, k + 0.3 * jax.random.normal(jax.random.PRNGKey(i), k.shape))


# make test keeps Llama; GPT-2 goes to the slow suite (issue 14, make test <= 5 min): the parts, cuts and
# chunks are the evaluator's own, the same for every architecture, and GPT-2's forward from a changed
# block is checked against every block in make test by tests/test_edit_eval.py and tests/test_from_block.py
@pytest.mark.parametrize("arch", ["llama", pytest.param("gpt2", marks=pytest.mark.slow)])
def test_text_parts_equal_each_window_run_alone(arch):
    model = tiny_llama(seed=3, num_hidden_layers=3) if arch == "llama" else hf.tiny("gpt2", seed=3)
    ev = EditEvaluator(model, model.params, EDITS, SHARED, texts=TEXTS, text_window=WINDOW, text_stride=STRIDE,
                       text_chunk=2, batch_size=2)
    # the case the parts exist for: windows cut shorter than the window, more than one part, a part
    # of several chunks (text_chunk=2) with a padding window, and every counted token in one part
    cuts = [p["cut"] for p in ev.text_parts]
    assert len(cuts) >= 2 and min(cuts) < WINDOW and cuts == sorted(cuts)
    assert any(p["windows"]["input_ids"].shape[0] >= 2 for p in ev.text_parts)
    idx = np.concatenate([p["idx"] for p in ev.text_parts])
    assert sorted(idx.tolist()) == list(range(len(idx)))
    base_nll, n_tok = _hand_text_nll(model, model.params, TEXTS, WINDOW, STRIDE)
    assert ev.text_tokens == n_tok
    want_before = np.exp(base_nll / n_tok)
    n_blocks = len(model.layers.blocks)
    cases = [(1, 0), (n_blocks - 1, 1), (0, 2)]  # from a middle block, the last block, and every block
    got = []
    for e, (block, i) in enumerate(cases):
        edited = _edited(model, block, i)
        m = ev.evaluate(e, edited, with_text=True)
        assert ev.last_start == block
        after_nll, _ = _hand_text_nll(model, edited, TEXTS, WINDOW, STRIDE)
        want_after = np.exp(after_nll / n_tok)
        assert abs(want_after - want_before) > 1e-4 * want_before  # the edit moves the perplexity
        assert m["text_ppl_before"] == pytest.approx(want_before, rel=1e-5)
        assert m["text_ppl_after"] == pytest.approx(want_after, rel=1e-5)
        assert m["dd_ppl_text_abs"] == pytest.approx(want_after - want_before, abs=2e-5 * want_before)
        got.append((edited, m))
    # the batched path (vmap over edits of one start block) gives the same text numbers
    many = ev.evaluate_many([(0, got[0][0]), (1, _edited(model, 1, 5))], with_text=[True, True])
    assert many[0]["text_ppl_after"] == pytest.approx(got[0][1]["text_ppl_after"], rel=1e-5)
    want5 = np.exp(_hand_text_nll(model, _edited(model, 1, 5), TEXTS, WINDOW, STRIDE)[0] / n_tok)
    assert many[1]["text_ppl_after"] == pytest.approx(want5, rel=1e-5)


def test_text_parts_merge_lengths_while_it_pays():
    """Adjacent cut lengths share a part when that costs fewer positions than one more part
    (a part costs one window's positions)."""
    from salem_jax.eval.edits import _text_parts

    def windows(lengths, window):
        n = len(lengths)
        att = np.zeros((n, window), np.int32)
        for r, ln in enumerate(lengths):
            att[r, :ln] = 1
        lm = np.roll(att, -1, axis=1) * att
        return {"input_ids": att * 5, "attention_mask": att, "labels": att * 5, "label_mask": lm}

    # 4 windows of <= 8 tokens and 3 of 128: apart 32 + 384 + 2 * 128 < together 7 * 128 + 128
    parts = _text_parts(windows([3, 5, 8, 7, 128, 100, 128], 128), 8)
    assert [p["cut"] for p in parts] == [8, 128]
    assert sorted(parts[0]["idx"].tolist()) == [0, 1, 2, 3]
    # one window of 8 tokens beside long ones: its own part would cost more than the cut saves
    parts = _text_parts(windows([8, 128, 128], 128), 8)
    assert [p["cut"] for p in parts] == [128]
    # chunks: 5 windows at text_chunk 2 -> 3 chunks of 2 (one padding window), counted tokens most first
    parts = _text_parts(windows([20, 30, 25, 31, 22], 32), 2)
    (p,) = parts
    assert p["cut"] == 32 and p["windows"]["input_ids"].shape == (3, 2, 32)
    assert p["idx"].tolist() == [3, 1, 2, 4, 0]
    assert p["flat"]["rows"].shape == (3, 30 + 29)  # T = the most counted tokens of any chunk
    assert int(p["flat"]["valid"].sum()) == int(p["windows"]["label_mask"].sum()) == 19 + 29 + 24 + 30 + 21


def test_fast_paths_that_do_not_apply_are_said():
    """No silent fallback: a fast path asked for that does not apply is warned about and recorded
    in `paths` (the slower path then gives the same numbers)."""
    import jax.numpy as jnp

    from salem_jax.scored_logits import flat_scored_logits

    t5 = hf.tiny("t5", seed=0)
    with pytest.warns(UserWarning) as seen:
        ev = EditEvaluator(t5, t5.params, EDITS[:1], batch_size=2)
    said = [str(w.message) for w in seen]
    for name in ("from_block", "flat_head"):
        assert any(f"{name} does not run: a 'seq2seq' model" in m for m in said), (name, said)
    assert ev.paths["from_block"].startswith("a 'seq2seq'") and ev.paths["flat_head"].startswith("a 'seq2seq'")
    model = tiny_llama(seed=3, num_hidden_layers=3)
    ev = EditEvaluator(model, model.params, EDITS, SHARED, batch_size=2)
    assert ev.paths == {"from_block": "on", "flat_head": "on"}
    off = EditEvaluator(model, model.params, EDITS, SHARED, batch_size=2, skip_unchanged_blocks=False)
    assert off.paths["from_block"] == "off (asked)"
    # edits starting at different blocks: scored one call each, and said so
    with pytest.warns(UserWarning, match="batched_edits does not run: 1 of 2 edits one call each"):
        ev.evaluate_many([(0, _edited(model, 1, 0)), (1, _edited(model, 2, 1))])
    ev.evaluate_many([(0, _edited(model, 1, 0)), (1, _edited(model, 1, 1))])
    assert ev.paths["batched_edits"] == "on"
    # a model function without a recognisable head: the full logits gathered, with a warning
    batch = {"label_mask": np.ones((2, 3), np.int32)}
    with pytest.warns(UserWarning, match="no recognisable LM head"):
        out = flat_scored_logits(lambda p, b: jnp.arange(2 * 3 * 4.0).reshape(2, 3, 4), None, batch,
                                 np.array([1, 0]), np.array([2, 1]))
    np.testing.assert_array_equal(np.asarray(out), np.arange(24.0).reshape(2, 3, 4)[[1, 0], [2, 1]])
