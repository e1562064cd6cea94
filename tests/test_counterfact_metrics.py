"""CounterFact metrics (ES, EM, PS, PM, NS, NM, Score) against hand computations."""

from __future__ import annotations

import math
import types

import jax.numpy as jnp
import numpy as np
import pytest

from salem_jax.eval import counterfact as CF
from salem_jax.models.base import LayerTable, LoadedModel
from salem_jax.testing import tiny_tokenizer


def test_core_by_hand():
    # record 0 has one rewrite prompt, two paraphrases, two neighbours; record 1 one of each
    rewrite = CF.PromptProbs(np.array([0.3, 0.6]), np.array([0.2, 0.7]), np.array([0, 1]))
    para = CF.PromptProbs(np.array([0.5, 0.1, 0.4]), np.array([0.4, 0.2, 0.1]), np.array([0, 0, 1]))
    neigh = CF.PromptProbs(np.array([0.3, 0.05, 0.2]), np.array([0.2, 0.5, 0.6]), np.array([0, 0, 1]))
    m = CF.counterfact_metrics(rewrite, para, neigh)
    es = (1 + 0) / 2
    em = ((0.3 - 0.2) + (0.6 - 0.7)) / 2
    ps = ((1 + 0) / 2 + 1) / 2  # per record first: record 0 -> 1/2, record 1 -> 1
    pm = (((0.5 - 0.4) + (0.1 - 0.2)) / 2 + (0.4 - 0.1)) / 2
    ns = ((0 + 1) / 2 + 1) / 2
    nm = (((0.2 - 0.3) + (0.5 - 0.05)) / 2 + (0.6 - 0.2)) / 2
    assert m["ES"] == pytest.approx(es) and m["EM"] == pytest.approx(em)
    assert m["PS"] == pytest.approx(ps) and m["PM"] == pytest.approx(pm)
    assert m["NS"] == pytest.approx(ns) and m["NM"] == pytest.approx(nm)
    assert m["Score"] == pytest.approx(3 / (1 / es + 1 / ps + 1 / ns))


def test_ties_fail_and_score_edge_cases():
    tie = CF.PromptProbs(np.array([0.5]), np.array([0.5]))
    m = CF.counterfact_metrics(tie, tie, tie)
    assert m["ES"] == 0.0 and m["PS"] == 0.0 and m["NS"] == 0.0 and m["Score"] == 0.0
    only = CF.counterfact_metrics(CF.PromptProbs(np.array([0.9]), np.array([0.1])))
    assert only["ES"] == 1.0 and math.isnan(only["PS"]) and math.isnan(only["Score"])
    assert CF.harmonic_mean([1.0, 0.5]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="one length"):
        CF.PromptProbs(np.array([0.1, 0.2]), np.array([0.1]))
    np.testing.assert_allclose(CF.probs_from_nll(np.array([0.0, math.log(2)])), [1.0, 0.5])


# --------------------------------------------------------------------------- through a model


def _bigram_model(probs: dict[str, dict[str, float]], seed=0):
    """A causal 'model' whose next-token distribution depends only on the current token:
    logits[b, t] = log(table[input_ids[b, t]]). Rows named in `probs` get those exact
    probabilities for the named tokens (the rest of the row shares what is left)."""
    tok = tiny_tokenizer()
    V = len(tok)
    rng = np.random.default_rng(seed)
    table = rng.dirichlet(np.ones(V), size=V)
    vocab = tok.get_vocab()
    for prev, row in probs.items():
        i = vocab[prev]
        fixed = {vocab[w]: p for w, p in row.items()}
        rest = [j for j in range(V) if j not in fixed]
        table[i, rest] *= (1 - sum(fixed.values())) / table[i, rest].sum()
        for j, p in fixed.items():
            table[i, j] = p
    assert np.allclose(table.sum(1), 1)

    def apply(params, batch):
        return params["logits"][batch["input_ids"]]

    params = {"logits": jnp.asarray(np.log(table), jnp.float32)}
    return LoadedModel("bigram", "fake", "causal", apply, params, types.SimpleNamespace(), tok, LayerTable(()), 64)


def test_evaluate_counterfact_with_known_probabilities():
    model = _bigram_model(
        {
            "is": {"rome": 0.3, "paris": 0.2},
            "france": {"rome": 0.1, "paris": 0.4},
            "river": {"rome": 0.05, "paris": 0.5},
            "speaks": {"two": 0.3, "one": 0.6},
            "two": {"three": 0.9},
            "city": {"two": 0.2, "one": 0.1},
        }
    )
    records = [
        {"id": "r0", "prompt": "the capital of france is", "target_new": "rome", "target_true": "paris",
         "rephrases": ["what is the capital of france"], "loc_prompts": ["the capital of germany is", "which river"]},
        types.SimpleNamespace(id="r1", prompt="he speaks", target_new="two three", target_true="one",
                              rephrases=("she speaks", "which city"), loc_prompts=("they speak it speaks",)),
    ]
    got = CF.evaluate_counterfact(model, model.params, records, batch_size=3, progress=False)
    # hand: P(new), P(true) per prompt; "two three" is two tokens -> exp(-mean NLL) = sqrt(0.3 * 0.9)
    p2 = math.sqrt(0.3 * 0.9)
    rw = [(0.3, 0.2), (p2, 0.6)]
    pa = {0: [(0.1, 0.4)], 1: [(p2, 0.6), (math.sqrt(0.2 * 0.9), 0.1)]}
    ne = {0: [(0.3, 0.2), (0.05, 0.5)], 1: [(p2, 0.6)]}
    es = np.mean([n > t for n, t in rw])
    em = np.mean([n - t for n, t in rw])
    ps = np.mean([np.mean([n > t for n, t in v]) for v in pa.values()])
    pm = np.mean([np.mean([n - t for n, t in v]) for v in pa.values()])
    ns = np.mean([np.mean([t > n for n, t in v]) for v in ne.values()])
    nm = np.mean([np.mean([t - n for n, t in v]) for v in ne.values()])
    want = {"ES": es, "EM": em, "PS": ps, "PM": pm, "NS": ns, "NM": nm}
    for k, v in want.items():
        assert got[k] == pytest.approx(v, abs=1e-5), k
    assert got["Score"] == pytest.approx(3 / (1 / es + 1 / ps + 1 / ns), abs=1e-5)
    assert got["n_records"] == 2 and got["n_paraphrase_prompts"] == 3 and got["n_neighborhood_prompts"] == 3
    assert 0 < es < 1 and 0 < ps < 1 and 0 < ns < 1  # every comparison direction is exercised


def test_counterfact_bad_record():
    model = _bigram_model({})
    with pytest.raises(ValueError, match="record 'x'.*target_new"):
        CF.evaluate_counterfact(model, model.params, [{"id": "x", "prompt": "a", "target_true": "paris",
                                                       "rephrases": [], "loc_prompts": []}], progress=False)
