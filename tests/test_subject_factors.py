"""benchmarks/subject_factors.py: the subject-token masks, the masked rank-1 updates (raw and
standardised) and the edited scoring, each against a hand computation on the tiny Llama."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import subject_factors as SF
from salem_jax.data.tokenize import encode
from salem_jax.losses import example_nll
from salem_jax.mend.capture import Factors, capture, summed_nll
from salem_jax.mend.editor import EditorConfig, EditorSpec, init_editor, update_norm_state
from salem_jax.models.base import get_path, set_path

# A benchmark's diagnostic (session 26, a negative result), not library code: in the slow suite, so
# `make test` does not pay for it.
pytestmark = pytest.mark.slow

PROMPTS = ["the capital of france is", "which city in South India lies on the river"]
SUBJECTS = ["france", "south india"]  # the second spelled in another case than in its prompt
TARGETS = ["paris", "delhi"]
# by hand: "<s> the capital of france is" -> france is token 4;
# "<s> which city in south india lies on the river" -> south 4, india 5
SUBJECT_POS = [[4], [4, 5]]


@pytest.fixture(scope="module")
def tiny():
    from salem_jax.models import llama

    m = llama.tiny_llama(seed=3)
    enc = encode(m, PROMPTS, TARGETS)
    return m, enc


def test_subject_masks_by_hand(tiny):
    m, enc = tiny
    T = enc["input_ids"].shape[1]
    masks = SF.subject_masks(m, PROMPTS, SUBJECTS, T)
    assert masks["subject"].shape == masks["subject_last"].shape == (2, T)
    for i, pos in enumerate(SUBJECT_POS):
        assert np.flatnonzero(masks["subject"][i]).tolist() == pos
        assert np.flatnonzero(masks["subject_last"][i]).tolist() == [pos[-1]]
    with pytest.raises(ValueError, match="row 0: field 'subject'.*does not occur"):
        SF.subject_masks(m, PROMPTS[:1], ["peru"], T)


def _factors(m, enc, layer):
    weights = tuple(m.layers.weights([layer], part="mlp"))
    _, fac = capture(m.apply, m.params, {k: jnp.asarray(v) for k, v in enc.items()}, weights)
    return weights, fac


def _hand_sum(u, d, pos, layout):
    """sum over the token positions `pos` of the outer products, numpy, in the kernel's layout."""
    g = sum(np.outer(u[t], d[t]) for t in pos)
    return g if layout == "in_out" else g.T


@pytest.mark.parametrize("layer", ["layers.0", "layers.1"])
def test_raw_masked_update_by_hand(tiny, layer):
    m, enc = tiny
    weights, fac = _factors(m, enc, layer)
    spec = EditorSpec.from_params(weights, m.params, EditorConfig(rank=4))
    T = enc["input_ids"].shape[1]
    masks = SF.subject_masks(m, PROMPTS, SUBJECTS, T)
    row = 1
    one = {w.path: Factors(fac[w.path].u[row : row + 1], fac[w.path].delta[row : row + 1]) for w in weights}
    # all tokens: the plain gradient of the row's loss w.r.t. each kernel (jax.grad, independent)
    b1 = {k: jnp.asarray(v[row : row + 1]) for k, v in enc.items()}
    ref = jax.grad(lambda p: summed_nll(m.apply(p, b1), b1))(m.params)
    g_all = SF.layer_grads(spec, one, None, "raw")
    for w in weights:
        np.testing.assert_allclose(g_all[w.path], np.asarray(get_path(ref, w.path)), rtol=1e-4, atol=1e-6)
    for ts, pos in (("subject", SUBJECT_POS[row]), ("subject_last", SUBJECT_POS[row][-1:])):
        g = SF.layer_grads(spec, one, masks[ts][row : row + 1], "raw")
        for w in weights:
            u = np.asarray(fac[w.path].u[row], np.float64)
            d = np.asarray(fac[w.path].delta[row], np.float64)
            hand = _hand_sum(u, d, pos, w.layout)
            np.testing.assert_allclose(g[w.path], hand, rtol=1e-4, atol=1e-7)
            if layer == "layers.0":  # the first block's MLP at the subject reaches the target: not zero
                assert np.abs(hand).max() > 1e-6


def test_std_masked_update_by_hand(tiny):
    """The identity editor's update on the subject tokens: u and delta standardised with
    statistics of the WARM rows' subject tokens only (numpy: mean, ddof-1 std + eps)."""
    m, enc = tiny
    layer = "layers.0"
    weights, fac = _factors(m, enc, layer)
    spec = EditorSpec.from_params(weights, m.params, EditorConfig(rank=4, norm_eps=1e-7))
    T = enc["input_ids"].shape[1]
    masks = SF.subject_masks(m, PROMPTS, SUBJECTS, T)
    editor, st = init_editor(spec, jax.random.PRNGKey(0))
    # warm statistics: both rows' subject tokens (3 tokens)
    st = update_norm_state(spec, st, {w.path: SF.masked_factors(fac[w.path], masks["subject"]) for w in weights})
    row = 0
    one = {w.path: Factors(fac[w.path].u[row : row + 1], fac[w.path].delta[row : row + 1]) for w in weights}
    g = SF.layer_grads(spec, one, masks["subject"][row : row + 1], "std", st, editor)
    warm_pos = [(i, t) for i, pos in enumerate(SUBJECT_POS) for t in pos]
    for w in weights:
        u = np.asarray(fac[w.path].u, np.float64)
        d = np.asarray(fac[w.path].delta, np.float64)
        us = np.stack([u[i, t] for i, t in warm_pos])
        ds = np.stack([d[i, t] for i, t in warm_pos])
        zu = (u[row] - us.mean(0)) / (us.std(0, ddof=1) + 1e-7)
        zd = (d[row] - ds.mean(0)) / (ds.std(0, ddof=1) + 1e-7)
        np.testing.assert_allclose(g[w.path], _hand_sum(zu, zd, SUBJECT_POS[row], w.layout), rtol=2e-3, atol=1e-4)


@pytest.mark.parametrize("layer", ["layers.0", "layers.1"])
def test_edited_scores_equal_rebuilt_weights(tiny, layer):
    """Rows each with their own step c_b: the low-rank correction (and, for layers.1, the pass
    started at that block) against model.apply with the kernels rebuilt as W - c_b G (numpy)."""
    m, enc = tiny
    weights = tuple(m.layers.weights([layer], part="mlp"))
    rng = np.random.default_rng(0)
    grads = tuple(rng.normal(size=get_path(m.params, w.path).shape).astype(np.float32) for w in weights)
    mods = tuple((w.module_path, w.layout) for w in weights)
    batch = SF._rows_batch(m, PROMPTS + PROMPTS, TARGETS + TARGETS)
    coefs = np.array([0.0, 0.05, 0.2, 1.0], np.float32)
    apply_l, b_l = SF.from_block(m, layer, batch)
    if layer == "layers.1":
        assert apply_l is not m.apply
    nll, _ = SF.edited_scores(apply_l, mods, m.params, tuple(map(jnp.asarray, grads)), jnp.asarray(coefs), b_l)
    full = encode(m, PROMPTS + PROMPTS, TARGETS + TARGETS)
    for b, c in enumerate(coefs):
        p = m.params
        for w, g in zip(weights, grads):
            p = set_path(p, w.path, jnp.asarray(np.asarray(get_path(m.params, w.path)) - c * g))
        rb = {k: jnp.asarray(v[b : b + 1]) for k, v in full.items()}
        want = float(example_nll(m.apply(p, rb), rb["labels"], rb["label_mask"])[0])
        np.testing.assert_allclose(float(nll[b]), want, rtol=1e-4, atol=1e-5)
    assert len({round(float(x), 4) for x in nll[::2]}) > 1  # the steps do change the scores


def test_paired_keeps_only_edits_both_token_sets_fix():
    """`paired` against a hand count on a planted table: 3 edits, one layer, one scaling."""
    def r(e, ts, found, ns, ps, rho):
        return {"edit": e, "layer": "layers.9", "scaling": "std", "tokens": ts, "found": found, "NS": ns, "PS": ps,
                "ES": 1.0, "rho": rho}
    res = {"base": [{"NS": 0.9, "PS": 0.1, "ES": 0.0}, {"NS": 0.5, "PS": 0.2, "ES": 0.0},
                    {"NS": 0.6, "PS": 0.2, "ES": 0.0}, {"NS": 0.7, "PS": 0.3, "ES": 1.0}],
           "per_edit": [r(0, "all", True, 0.2, 0.5, 0.01), r(0, "subject_last", True, 0.6, 1.0, 0.1),
                        r(1, "all", True, 0.4, 0.5, 0.02), r(1, "subject_last", False, 0.0, 0.0, 1.0),
                        r(2, "all", False, 0.9, 0.9, 1.0), r(2, "subject_last", True, 0.1, 0.1, 0.05),
                        r(3, "all", True, 0.0, 1.0, 0.03), r(3, "subject_last", True, 1.0, 0.0, 0.3)]}
    (row,) = SF.paired(res, ["layers.9"], ["std"], ("subject_last",))
    assert row["n"] == 2  # edit 1 is not fixed by subject_last, edit 2 not by all
    assert np.isclose(row["NS_all"], (0.2 + 0.0) / 2) and np.isclose(row["NS_tokens"], (0.6 + 1.0) / 2)
    assert np.isclose(row["NS_base"], (0.9 + 0.7) / 2) and np.isclose(row["PS_tokens"], 0.5)
    assert np.isclose(row["rho_all"], 0.02) and np.isclose(row["rho_tokens"], 0.2)


def _spd(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.05 * np.eye(d)


@pytest.mark.parametrize("ridge", [0.0, 0.3])
def test_white_update_by_hand(tiny, ridge):
    """The whitened update: sum_t m_t [(C + lambda I)^-1 u_t] delta_t^T with lambda = ridge x
    trace(C) / d, against np.linalg.solve on planted covariances (gate and up share one C, as
    they read the same input), on every token and on the subject's tokens."""
    from salem_jax.baselines.keystats import covariance_solver

    m, enc = tiny
    layer = "layers.0"
    weights, fac = _factors(m, enc, layer)
    spec = EditorSpec.from_params(weights, m.params, EditorConfig(rank=4))
    T = enc["input_ids"].shape[1]
    masks = SF.subject_masks(m, PROMPTS, SUBJECTS, T)
    rng = np.random.default_rng(1)
    covs, solvers = {}, {}
    for w in weights:
        d = fac[w.path].u.shape[-1]
        covs[w.path] = next((c for c in covs.values() if c.shape == (d, d)), None)
        if covs[w.path] is None:
            covs[w.path] = _spd(rng, d)
        solvers[w.path] = covariance_solver(covs[w.path], ridge=ridge)
        assert solvers[w.path].ridge_reason.count("condition") == 0  # only the relative ridge asked for
    row = 1
    one = {w.path: Factors(fac[w.path].u[row : row + 1], fac[w.path].delta[row : row + 1]) for w in weights}
    for ts, pos in ((None, range(T)), ("subject", SUBJECT_POS[row]), ("subject_last", SUBJECT_POS[row][-1:])):
        mask = None if ts is None else masks[ts][row : row + 1]
        g = SF.layer_grads(spec, one, mask, "white", solvers=solvers)
        raw = SF.layer_grads(spec, one, mask, "raw")
        for w in weights:
            c = covs[w.path]
            d = c.shape[0]
            a = c + ridge * np.trace(c) / d * np.eye(d)
            u = np.asarray(fac[w.path].u[row], np.float64)
            dl = np.asarray(fac[w.path].delta[row], np.float64)
            uw = np.linalg.solve(a, u.T).T  # every token's u through (C + lambda I)^-1
            hand = _hand_sum(uw, dl, pos, w.layout)
            assert np.abs(hand).max() > 1e-6
            np.testing.assert_allclose(g[w.path], hand, rtol=2e-4, atol=1e-6 * np.abs(hand).max())
            assert not np.allclose(g[w.path], raw[w.path], rtol=0.05)  # the whitening changed it
    with pytest.raises(ValueError, match="covariance solvers"):
        SF.layer_grads(spec, one, None, "white")


def test_white_solvers_ridge_relative_to_mean_eigenvalue(tiny):
    """`white_solvers` on the tiny Llama (WikiText key statistics, 2000 tokens): gate and up share
    one solver, lambda = ridge x trace(C) / d of each kernel's C (numpy trace of the cached C)."""
    from salem_jax.baselines.keystats import cached_key_covariances, wikitext_texts

    m, _ = tiny
    weights = tuple(m.layers.weights(["layers.0"], part="mlp"))
    solvers, info = SF.white_solvers(m, weights, 2000, 0.05, progress=False)
    covs = cached_key_covariances(m, m.params, weights, wikitext_texts(), max_tokens=2000, progress=False)
    by_name = {w.path.split("/")[-2]: w.path for w in weights}
    gate, up = (next(v for k, v in by_name.items() if s in k) for s in ("gate", "up"))
    assert solvers[gate] is solvers[up]
    for w in weights:
        c = np.asarray(covs[w.path].cov, np.float64)
        lam = 0.05 * np.trace(c) / c.shape[0]
        assert "condition" not in solvers[w.path].ridge_reason  # the relative ridge alone suffices here
        assert np.isclose(solvers[w.path].ridge, lam, rtol=1e-6)
        assert np.isclose(info[w.path]["ridge_relative"], 0.05, rtol=1e-6)
        np.testing.assert_allclose(solvers[w.path].matrix(), c + solvers[w.path].ridge * np.eye(c.shape[0]),
                                   rtol=1e-6, atol=1e-6 * np.abs(c).max())
    with pytest.raises(ValueError, match="--white-ridge"):
        SF.white_solvers(m, weights, 2000, -1.0, progress=False)
