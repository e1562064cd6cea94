"""Edit metrics, perplexity and fluency against hand computations (numpy loops)."""

from __future__ import annotations

import functools
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from salem_jax.eval import fluency as flu
from salem_jax.eval import metrics as M
from salem_jax.eval import perplexity as P
from salem_jax.models import hf
from salem_jax.models.base import LayerTable, LoadedModel, get_path, set_path
from salem_jax.testing import tiny_tokenizer


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


# --------------------------------------------------------------------------- one batch


def test_batch_scores_match_numpy_loop():
    rng = np.random.default_rng(0)
    B, S, V = 5, 6, 7
    logits = rng.normal(size=(B, S, V)).astype(np.float32)
    labels = rng.integers(0, V, size=(B, S)).astype(np.int32)
    mask = (rng.random((B, S)) < 0.6).astype(np.int32)
    mask[0] = 0  # an example with nothing to score
    mask[1, :3] = 1
    labels[1] = logits[1].argmax(-1)  # example 1 fully right
    labels[2] = logits[2].argmax(-1)
    labels[2, np.flatnonzero(mask[2])[:1]] = (logits[2].argmax(-1)[np.flatnonzero(mask[2])[:1]] + 1) % V
    base = rng.normal(size=(B, S, V)).astype(np.float32)
    out = jax.device_get(M.compare_batch(jnp.asarray(base), jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask)))
    lp = _log_softmax(logits)
    for b in range(B):
        pos = [s for s in range(S) if mask[b, s]]
        right = [logits[b, s].argmax() == labels[b, s] for s in pos]
        assert out["correct_after"][b] == (len(pos) > 0 and all(right))
        assert out["token_correct_after"][b] == sum(right)
        assert out["n_tokens_after"][b] == len(pos)
        np.testing.assert_allclose(out["nll_sum_after"][b], -sum(lp[b, s, labels[b, s]] for s in pos), rtol=1e-5, atol=1e-5)
        same = sum(base[b, s].argmax() == logits[b, s].argmax() for s in pos)
        assert out["unchanged"][b] == same
    assert out["correct_after"][1] and not out["correct_after"][0] and not out["correct_after"][2]


def test_aggregates_by_hand():
    assert M.accuracy(np.array([True, False, True, True])) == 0.75
    # token accuracy is the mean of per-example shares: (1/2 + 3/3 + 0/1) / 3
    assert M.token_accuracy(np.array([1, 3, 0]), np.array([2, 3, 1])) == pytest.approx(0.5)
    # perplexity is token weighted: exp((2 + 4) / (1 + 3))
    assert M.group_perplexity(np.array([2.0, 4.0]), np.array([1, 3])) == pytest.approx(math.exp(1.5))
    assert M.drawdown(0.9, 0.85) == pytest.approx(0.05)
    dd = M.perplexity_drawdown(20.0, 21.0)
    assert dd["rel"] == pytest.approx(0.05) and dd["abs"] == pytest.approx(1.0)
    assert M.locality(np.array([2, 0, 3]), np.array([2, 2, 4])) == pytest.approx(5 / 8)
    assert math.isnan(M.accuracy(np.array([], bool)))


# --------------------------------------------------------------------------- the tiny GPT-2


@pytest.fixture(scope="module")
def gpt2():
    return hf.tiny("gpt2", seed=0)


def _perturbed(model, scale=0.5):
    """Base params with one MLP kernel moved (a stand-in for an edit)."""
    path = model.layers.weights(["h.1"])[1].path
    w = get_path(model.params, path)
    noise = jax.random.normal(jax.random.PRNGKey(3), w.shape, w.dtype) * scale
    return set_path(model.params, path, w + noise)


_REF_LEN = 16


def _forward_one(model, params, ids):
    """Logits [len(ids), V] of one sequence: a single-row forward, right padded to a fixed
    length so the reference compiles once (causal attention: padding after a position does
    not change it)."""
    L = max(_REF_LEN, len(ids))
    row = np.zeros((1, L), np.int32)
    row[0, : len(ids)] = ids
    att = np.zeros_like(row)
    att[0, : len(ids)] = 1
    return np.asarray(_jitted(model.apply)(params, {"input_ids": row, "attention_mask": att}))[0, : len(ids)]


@functools.lru_cache(maxsize=None)
def _jitted(apply):
    return jax.jit(apply)


def _row_scores_numpy(model, params, prompt, target):
    """Score one (prompt, target) pair with a single-row forward and numpy."""
    tok = model.tokenizer
    p_ids = tok(prompt)["input_ids"]
    t_ids = tok(" " + target, add_special_tokens=False)["input_ids"]
    logits = _forward_one(model, params, p_ids + t_ids)
    lp = _log_softmax(logits)
    preds, nll = [], 0.0
    for j, t in enumerate(t_ids):
        pos = len(p_ids) - 1 + j
        preds.append(int(logits[pos].argmax()))
        nll -= lp[pos, t]
    return preds, t_ids, nll


def _greedy_words(model, params, prompt, n):
    tok = model.tokenizer
    ids = list(tok(prompt)["input_ids"])
    for _ in range(n):
        ids.append(int(_forward_one(model, params, ids)[-1].argmax()))
    return tok.decode(ids[-n:])


def test_evaluate_edit_matches_numpy(gpt2):
    model = gpt2
    new = _perturbed(model)
    prompts = ["the capital of france is", "what river lies in egypt", "the language of japan is", "one two three"]
    # pass rows: the base model's own greedy answers (accuracy 1 before), so drawdown is informative
    pass_rows = [{"prompt": p, "target": _greedy_words(model, model.params, p, 2)} for p in prompts]
    fail_rows = [{"prompt": p, "target": t} for p, t in zip(prompts, ["paris", "nile city", "yen", "four"])]
    fail_rows.append({"prompt": prompts[0], "target": _greedy_words(model, new, prompts[0], 1)})  # right after
    adapt_rows = fail_rows[:2]
    out = M.evaluate_edit(
        model, model.params, new, {"fail": fail_rows, "adapt": adapt_rows, "pass": pass_rows},
        batch_size=3, progress=False,
    )

    def hand(rows):
        res = {}
        for tag, params in (("before", model.params), ("after", new)):
            acc, tacc, nll, n = [], [], 0.0, 0
            for r in rows:
                preds, t_ids, l = _row_scores_numpy(model, params, r["prompt"], r["target"])
                ok = [p == t for p, t in zip(preds, t_ids)]
                acc.append(all(ok))
                tacc.append(np.mean(ok))
                nll += l
                n += len(t_ids)
            res[f"acc_{tag}"], res[f"token_acc_{tag}"], res[f"ppl_{tag}"] = np.mean(acc), np.mean(tacc), math.exp(nll / n)
        same = tot = 0
        for r in rows:
            pb, t_ids, _ = _row_scores_numpy(model, model.params, r["prompt"], r["target"])
            pa, _, _ = _row_scores_numpy(model, new, r["prompt"], r["target"])
            same += sum(a == b for a, b in zip(pa, pb))
            tot += len(t_ids)
        res["locality"] = same / tot
        return res

    for g, rows in (("fail", fail_rows), ("adapt", adapt_rows), ("pass", pass_rows)):
        h = hand(rows)
        assert out[f"{g}/n"] == len(rows)
        for k, v in h.items():
            assert out[f"{g}/{k}"] == pytest.approx(v, rel=1e-4, abs=1e-6), (g, k)
    assert out["pass/acc_before"] == 1.0
    assert out["ea"] == out["fail/acc_after"] >= 1 / 5  # the last fail row is right after the edit
    assert out["adapt_acc"] == out["adapt/acc_after"]
    assert out["dd_acc"] == pytest.approx(out["pass/acc_before"] - out["pass/acc_after"])
    assert out["locality"] == out["pass/locality"] < 1.0  # the perturbation changed something
    assert out["dd_ppl_pass_rel"] == pytest.approx(out["pass/ppl_after"] / out["pass/ppl_before"] - 1)
    # the same params twice: nothing changes
    same = M.evaluate_edit(model, model.params, model.params, {"pass": pass_rows}, progress=False)
    assert same["locality"] == 1.0 and same["dd_acc"] == 0.0 and same["dd_ppl_pass_abs"] == 0.0


def test_evaluate_edit_bad_row_names_group(gpt2):
    with pytest.raises(ValueError, match="group 'fail' row 1"):
        M.evaluate_edit(gpt2, gpt2.params, gpt2.params, {"fail": [{"prompt": "a", "target": "b"}, {"prompt": "x"}]},
                        progress=False)


def _fake_classifier(num_labels=3, seed=0):
    """A bag-of-embeddings classifier: logits = sum of token embeddings, [B, 1, num_labels]."""
    tok = tiny_tokenizer()

    def apply(params, batch):
        e = params["emb"][batch["input_ids"]] * batch["attention_mask"][..., None]
        return e.sum(1)[:, None, :]

    emb = jax.random.normal(jax.random.PRNGKey(seed), (len(tok), num_labels))
    return LoadedModel("fake-cls", "fake", "classifier", apply, {"emb": emb}, types.SimpleNamespace(num_labels=num_labels),
                       tok, LayerTable(()), 32)


def test_evaluate_edit_classifier():
    model = _fake_classifier()
    new = {"emb": model.params["emb"] + 1.5 * jax.random.normal(jax.random.PRNGKey(7), model.params["emb"].shape)}
    texts = ["the capital of france is paris", "berlin lies in germany", "red blue green", "it was in asia",
             "yes no", "she speaks it"]
    rows = []
    for t in texts:
        ids = model.tokenizer(t)["input_ids"]
        pred = int(np.asarray(model.params["emb"])[ids].sum(0).argmax())
        rows.append({"prompt": t, "target": "", "label": pred})  # all right before
    out = M.evaluate_edit(model, model.params, new, {"pass": rows, "fail": rows[:2]}, batch_size=4, progress=False)
    after = []
    for t, r in zip(texts, rows):
        ids = model.tokenizer(t)["input_ids"]
        after.append(int(np.asarray(new["emb"])[ids].sum(0).argmax()) == r["label"])
    assert out["pass/acc_before"] == 1.0
    assert out["pass/acc_after"] == pytest.approx(np.mean(after))
    assert out["dd_acc"] == pytest.approx(1.0 - np.mean(after))
    assert out["locality"] == pytest.approx(np.mean(after))  # one "token" per example: unchanged == still right
    assert not any(k.endswith("ppl_before") for k in out)  # no perplexity for classifiers
    assert 0.0 < out["dd_acc"] < 1.0  # the test distinguishes something


# --------------------------------------------------------------------------- perplexity


def _ppl_numpy(model, params, texts, window, stride):
    """Independent sliding-window perplexity: one unpadded forward per scored token.

    Token t (t >= 1) is scored in window k = the first window whose span reaches past t and
    that starts before t, with context tokens[k * stride : t]."""
    nll, n = 0.0, 0
    for text in texts:
        toks = model.tokenizer(text)["input_ids"]
        L = len(toks)
        for t in range(1, L):
            k = 0
            while not (k * stride < t < min(k * stride + window, L)):
                k += 1
            logits = _forward_one(model, params, toks[k * stride : t])
            nll -= _log_softmax(logits[-1])[toks[t]]
            n += 1
    return math.exp(nll / n), n


@pytest.mark.parametrize("window,stride", [(64, 32), (8, 3), (6, 6)])
def test_perplexity_matches_numpy_loop(gpt2, window, stride):
    texts = [
        "the capital of france is paris and the capital of germany is berlin",
        "red blue",
        "one two three four five one two three four five one two",
        "it",  # a single token + BOS: scores one token
    ]
    got = P.perplexity(gpt2, gpt2.params, texts, window=window, stride=stride, batch_size=4, progress=False)
    if stride == window:
        # disjoint windows: the first token of every window after the first is not scored
        want_n = 0
        for text in texts:
            L = len(gpt2.tokenizer(text)["input_ids"])
            want_n += sum(end - begin - 1 for begin, end, _ in P.window_spans(L, window, stride))
        assert got.n_tokens == want_n
        return
    want, n = _ppl_numpy(gpt2, gpt2.params, texts, window, stride)
    assert got.n_tokens == n
    assert got.ppl == pytest.approx(want, rel=1e-4)


def test_perplexity_change_and_errors(gpt2):
    new = _perturbed(gpt2)
    texts = ["the capital of france is paris", "which city lies on the river"]
    ch = P.perplexity_change(gpt2, gpt2.params, new, texts, window=16, stride=8, progress=False)
    a = P.perplexity(gpt2, gpt2.params, texts, window=16, stride=8, progress=False).ppl
    b = P.perplexity(gpt2, new, texts, window=16, stride=8, progress=False).ppl
    assert ch["before"] == pytest.approx(a, rel=1e-6) and ch["after"] == pytest.approx(b, rel=1e-6)
    assert ch["rel"] == pytest.approx(b / a - 1) and ch["abs"] == pytest.approx(b - a)
    with pytest.raises(ValueError, match="stride"):
        P.perplexity(gpt2, gpt2.params, texts, window=8, stride=9, progress=False)
    with pytest.raises(TypeError, match="list of texts"):
        P.perplexity(gpt2, gpt2.params, "one string", progress=False)
    with pytest.raises(ValueError, match="context"):
        P.perplexity(gpt2, gpt2.params, texts, window=gpt2.max_length + 1, progress=False)


def test_evaluate_edit_with_texts(gpt2):
    new = _perturbed(gpt2)
    texts = ["the capital of france is paris", "which city lies on the river"]
    out = M.evaluate_edit(gpt2, gpt2.params, new, {}, texts=texts, text_window=16, text_stride=8, progress=False)
    ch = P.perplexity_change(gpt2, gpt2.params, new, texts, window=16, stride=8, progress=False)
    assert out["text_ppl_before"] == ch["before"] and out["dd_ppl_text_rel"] == ch["rel"]


# --------------------------------------------------------------------------- fluency


def test_word_tokenize():
    assert flu.word_tokenize("He didn't go, it's 3.14 well-known!") == [
        "He", "did", "n't", "go", ",", "it", "'s", "3.14", "well-known", "!",
    ]


def test_ngram_entropy_hand_counted():
    # tokens: a b a b a  -> bigrams (a,b) x2, (b,a) x2: H2 = 1 bit
    #                    -> trigrams (a,b,a) x2, (b,a,b) x1: H3 = -(2/3 log2 2/3 + 1/3 log2 1/3)
    h3 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    want = (2 / 3 * 1.0 + 4 / 3 * h3) / 2
    assert flu.ngram_entropy("a b a b a") == pytest.approx(want)
    # all-distinct tokens: 4 bigrams, 3 trigrams, uniform
    want2 = (2 / 3 * 2.0 + 4 / 3 * math.log2(3)) / 2
    assert flu.ngram_entropy("w x y z .") == pytest.approx(want2)
    assert flu.ngram_entropy("alone") == 0.0
    assert flu.fluency(["a b a b a", "w x y z ."]) == pytest.approx((want + want2) / 2)
    # a looping text scores lower than a varied one
    assert flu.ngram_entropy("the the the the the the") < flu.ngram_entropy("the cat sat on a mat today")


def test_generation_fluency_scores_prompt_plus_continuation(gpt2):
    def fake_generate(model, params, prompts, max_new_tokens):
        return [" b a" for _ in prompts]

    got = flu.generation_fluency(gpt2, gpt2.params, ["a b a"], generate=fake_generate)
    assert got == pytest.approx(flu.ngram_entropy("a b a b a"))


def test_generation_fluency_default_greedy(gpt2):
    prompts = ["the capital of france is", "one two"]
    got = flu.generation_fluency(gpt2, gpt2.params, prompts, max_new_tokens=6)
    texts = []
    for p in prompts:  # independent greedy loop, then decode prompt + continuation
        ids = list(gpt2.tokenizer(p)["input_ids"])
        n0 = len(ids)
        for _ in range(6):
            nxt = int(_forward_one(gpt2, gpt2.params, ids)[-1].argmax())
            ids.append(nxt)
            if nxt == gpt2.tokenizer.eos_token_id:
                break
        texts.append(gpt2.tokenizer.decode(ids, skip_special_tokens=True))
        assert len(ids) > n0
    assert got == pytest.approx(flu.fluency(texts))
    assert all(len(t.split()) > len(p.split()) for t, p in zip(texts, prompts))


def test_cached_base_scores_give_the_same_metrics(gpt2):
    new = _perturbed(gpt2)
    groups = {
        "fail": [{"prompt": "the capital of france is", "target": "paris"}, {"prompt": "one two", "target": "three"}],
        "pass": [{"prompt": p, "target": t} for p, t in (("red blue", "green"), ("what river lies in", "egypt"),
                                                          ("he speaks", "two three"))],
    }
    texts = ["the capital of france is paris", "which city lies on the river"]
    kw = dict(texts=texts, batch_size=2, text_window=16, text_stride=8, progress=False)
    base = M.base_scores(gpt2, gpt2.params, groups, **kw)
    cached = M.evaluate_edit(gpt2, gpt2.params, new, groups, base=base, **kw)
    direct = M.evaluate_edit(gpt2, gpt2.params, new, groups, **kw)
    assert cached.keys() == direct.keys()
    for k in direct:
        assert cached[k] == pytest.approx(direct[k], rel=1e-6, abs=1e-9), k
    assert direct["locality"] < 1.0
    with pytest.raises(ValueError, match="rows differ"):
        M.evaluate_edit(gpt2, gpt2.params, new, {"pass": groups["pass"][:2]}, base=base, batch_size=2, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        M.evaluate_edit(gpt2, gpt2.params, new, groups, base=base, batch_size=4, progress=False)
    with pytest.raises(ValueError, match="texts"):
        M.evaluate_edit(gpt2, gpt2.params, new, groups, base=base, texts=texts[:1], batch_size=2, text_window=16,
                        text_stride=8, progress=False)


def test_batch_size_changes_no_metric(gpt2):
    """The pipeline scores an edit's own rows in small batches and the pass rows in large ones:
    padding rows to a batch must change no number."""
    new = _perturbed(gpt2)
    groups = {"fail": [{"prompt": "the capital of france is", "target": "paris"}],
              "adapt": [{"prompt": "what river lies in", "target": "egypt"}, {"prompt": "one two", "target": "three"}]}
    outs = [M.evaluate_edit(gpt2, gpt2.params, new, groups, batch_size=b, progress=False) for b in (1, 2, 16)]
    for o in outs[1:]:
        assert o.keys() == outs[0].keys()
        for k in o:
            assert o[k] == pytest.approx(outs[0][k], rel=1e-5, abs=1e-7), k


def test_row_batches_carry_one_set_of_scored_positions_per_group(gpt2):
    """The scorers run the head at the target positions only (`score_pos`, K < S), with one K
    for all batches of a group (one compilation); the numbers are checked against numpy above."""
    from salem_jax.eval.metrics import row_batches

    rows = [{"prompt": "the capital of france is", "target": t} for t in ("paris", "paris is nice", "rome")]
    batches = list(row_batches(gpt2, rows, 2))
    assert len(batches) == 2
    shapes = {b["score_pos"].shape for b, _ in batches}
    assert len(shapes) == 1
    (_, k), s = shapes.pop(), batches[0][0]["input_ids"].shape[1]
    assert k < s
    for b, n in batches:
        for i in range(n):
            np.testing.assert_array_equal(b["score_pos"][i][: int(b["label_mask"][i].sum())], np.flatnonzero(b["label_mask"][i]))
