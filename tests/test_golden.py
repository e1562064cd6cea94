"""The golden-layer helpers: per-edit oracle, best fixed layer, bootstrap gap, Tukey choice and the
third-party LGA inner product, against hand loops on a tiny model."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from salem_jax.baselines import keystats as KS
from salem_jax.baselines import rome as R
from salem_jax.baselines.locate_edit import EditorConfig
from salem_jax.baselines.requests import EditRequest
from salem_jax.baselines.rrome import rrome_edit, rrome_one
from salem_jax.data.tokenize import encode
from salem_jax.eval import metrics as M
from salem_jax.locate import golden as G
from salem_jax.losses import example_nll
from salem_jax.models import hf
from salem_jax.models.base import get_path
from salem_jax.testing import DEFAULT_WORDS


def test_oracle_fixed_layer_and_gap_on_a_table():
    t = np.zeros((3, 4, 2))
    t[0, 2] = [1, 0.5]
    t[0, 3] = [1, 0.9]  # same rewrite, better second metric: layer 3
    t[1, 1] = [1, 0.1]
    t[2, 1] = [0.5, 0.0]
    t[2, 0] = [0.5, 0.0]  # a tie goes to the earlier layer
    best, m = G.per_edit_oracle(t)
    assert best.tolist() == [3, 1, 0] and m[:, 0].tolist() == [1, 1, 0.5]
    assert G.best_fixed_layer(t) == 1  # mean rewrite 0.5 at layer 1, 0.33 at layers 2/3
    g = G.bootstrap_gap(np.array([1.0, 1.0, 1.0, 0.0]), np.zeros(4), n_boot=500)
    assert g["mean"] == 0.75 and 0.0 <= g["lo"] <= 0.75 <= g["hi"] <= 1.0
    j, dropped = G.tukey_choice([1.0, 1.1, 1.2, 0.9, 50.0, 1.05])
    assert dropped == [4] and j == 2


def _texts(n=16, words=12, seed=0):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(DEFAULT_WORDS, size=words)) for _ in range(n)]


def test_per_edit_oracle_equals_a_hand_loop(tmp_path):
    model = hf.tiny("gpt2", seed=2)
    stats = KS.KeyStats(model, model.params, _texts(), max_tokens=1000, window=32, cache=tmp_path,
                        prefix_lengths=(), progress=False)
    cfg = EditorConfig(value=R.ROMEConfig(v_steps=4, v_lr=0.1, clamp_norm_factor=100.0, weight_decay=1e-3))
    reqs = [EditRequest("what is the capital of france", "france", "tokyo"),
            EditRequest("what is the currency of japan", "japan", "rupee")]
    layers = model.layers.names()

    def nll(params, r):
        return float(M.score_rows(model, params, [{"prompt": r.prompt, "target": r.target_new}],
                                  progress=False)["nll_sum"][0])

    # the table as the benchmark builds it (rrome_one), minus NLL so that larger is better
    table = np.asarray([[[-nll(rrome_one(model, model.params, R.rome_weight(model, l), r, stats.solver(l), cfg,
                                         stats.prefixes())[0], r)] for l in layers] for r in reqs])
    best, _ = G.per_edit_oracle(table)
    # the hand loop: the public editor at each layer, keep the lowest NLL
    for i, r in enumerate(reqs):
        scores = [nll(rrome_edit(model, model.params, [r], layers=l, stats=stats, config=cfg,
                                 progress=False).params, r) for l in layers]
        assert best[i] == int(np.argmin(scores))
        np.testing.assert_allclose(-table[i, :, 0], scores, rtol=1e-5)


def test_lga_inner_product_matches_full_gradients():
    model = hf.tiny("gpt2", seed=3)
    prompts, old, new = ["what is the capital of france", "which river lies in egypt"], ["paris", "nile"], ["rome", "cairo"]
    got = G.lga_inner_product_scores(model, model.params, prompts, old, new)

    # jitted (one compilation for the four same-shape batches, not one per small op)
    grad = jax.jit(jax.grad(lambda q, b: example_nll(model.apply(q, b), b["labels"], b["label_mask"]).sum()))

    def grads(p, t):
        return grad(model.params, encode(model, [p], [t]))

    want = np.zeros(len(model.layers.names()))
    for p, o, n in zip(prompts, old, new):
        go, gn = grads(p, o), grads(p, n)
        for li, name in enumerate(model.layers.names()):
            for w in model.layers[name].mlp:
                want[li] += float(np.vdot(np.asarray(get_path(go, w.path), np.float64),
                                          np.asarray(get_path(gn, w.path), np.float64)))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-9)


def test_edit_scorer_equals_the_separate_metric_calls():
    """EditScorer (one forward per edited params, base argmax stored) gives the numbers of
    score_rows / compare_rows / evaluate_counterfact called group by group."""
    from types import SimpleNamespace

    from salem_jax.eval.counterfact import evaluate_counterfact

    model = hf.tiny("gpt2", seed=4)
    rec = SimpleNamespace(id="r0", prompt="what is the capital of france", target_true="paris",
                          rephrases=["the capital of france is", "france has its capital in"],
                          loc_prompts=["what is the capital of japan", "which river lies in egypt", "the currency of peru"],
                          loc_targets=["tokyo", "", "sol"])
    new = "rome"
    w = R.rome_weight(model, model.layers.names()[1])
    k = get_path(model.params, w.path)
    rng = np.random.default_rng(0)
    edited = [model.params] + [hf_set(model.params, w.path, k + s * rng.standard_normal(k.shape).astype(k.dtype))
                               for s in (0.05, 0.5, 5.0)]
    for cf in (True, False):
        sc = G.EditScorer(model, model.params, rec, new, counterfact=cf, batch_size=4)  # 4 rows: several batches
        for p in edited:
            got = sc(p)
            rw = M.score_rows(model, p, [{"prompt": rec.prompt, "target": new}], progress=False)
            rp = M.score_rows(model, p, [{"prompt": q, "target": new} for q in rec.rephrases], progress=False)
            loc = [{"prompt": q, "target": t or rec.target_true} for q, t in zip(rec.loc_prompts, rec.loc_targets)]
            lc = M.compare_rows(model, model.params, p, loc, progress=False)
            want = {"rewrite": rw["token_correct"].sum() / rw["n_tokens"].sum(),
                    "rephrase": rp["token_correct"].sum() / rp["n_tokens"].sum(),
                    "locality": lc["unchanged"].sum() / lc["n_tokens_after"].sum()}
            if cf:
                m = evaluate_counterfact(model, p, [SimpleNamespace(**{**vars(rec), "target_new": new})], progress=False)
                want.update(ES=m["ES"], PS=m["PS"], NS=m["NS"])
            assert set(got) == set(want)
            for key in want:
                np.testing.assert_allclose(got[key], want[key], rtol=1e-6, err_msg=key)
        if cf:  # the perturbations move something, so the comparison is not vacuous
            assert sc(edited[-1])["locality"] < 1.0


def hf_set(params, path, value):
    from salem_jax.models.base import set_path

    return set_path(params, path, value)


def test_claim_power_equals_the_binomial_computation():
    """Gaps of 0 or 1 (one edit in 50 below its best layer): a run of N edits holds K ~ Binomial(N, 0.02)
    ones, and its bootstrap interval's upper end is the 97.5% point of Binomial(N, K/N)/N - so the share
    of runs that establish "gap < bound" is a sum over K, computed here with scipy, not by simulation."""
    from scipy.stats import binom

    g = np.zeros(50)
    g[0] = 1.0
    ns = [50, 200, 800]
    sim = G.claim_power(g, ns, bound=0.047, sims=400, n_boot=400, seed=0)
    for n in ns:
        k = np.arange(n + 1)
        upper = binom.ppf(0.975, n, k / n) / n
        exact = float(binom.pmf(k, n, 0.02)[upper < 0.047].sum())
        assert abs(sim[n] - exact) < 0.08, (n, sim[n], exact)
    assert sim[50] < sim[200] < sim[800]
    assert G.claim_power(g, ns, bound=0.047, sims=400, n_boot=400, seed=0) == sim  # deterministic by seed
    # no gap: every run establishes it; a gap above the bound on every edit: none does
    assert G.claim_power(np.zeros(7), [5, 50], sims=20, n_boot=50) == {5: 1.0, 50: 1.0}
    assert G.claim_power(np.full(7, 0.2), [5, 50], sims=20, n_boot=50) == {5: 0.0, 50: 0.0}
    for bad, ns_bad in ((np.zeros(0), [5]), (np.zeros((2, 2)), [5]), (np.zeros(3), [0])):
        with pytest.raises(ValueError):
            G.claim_power(bad, ns_bad)
