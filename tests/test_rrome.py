"""r-ROME, its key statistics cache and the closed-form solvers, on tiny GPT-2 and Llama models."""

from __future__ import annotations

import numpy as np
import pytest

from salem_jax.baselines import closed_form as CF
from salem_jax.baselines import keystats as KS
from salem_jax.baselines import rome as R
from salem_jax.baselines.locate_edit import EditorConfig, out_in
from salem_jax.baselines.requests import EditRequest, check_requests
from salem_jax.baselines.rrome import rrome_edit
from salem_jax.models.base import get_path, param_paths
from salem_jax.testing import random_texts, tiny_edit_model

import jax

TINY_VALUE = R.ROMEConfig(v_steps=30, v_lr=0.1, clamp_norm_factor=100.0, weight_decay=1e-3)
CFG = EditorConfig(value=TINY_VALUE)
_model = tiny_edit_model  # one tiny model per architecture, shared by the edit tests
_texts = random_texts


def _stats(model, tmp_path, **kw):
    return KS.KeyStats(model, model.params, _texts(), max_tokens=2000, window=32, cache=tmp_path,
                       prefix_lengths=(3, 5), progress=False, **kw)


# --------------------------------------------------------------------------- closed forms against numpy


def _random_problem(d=12, out=7, n=3, seed=0):
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(d, 4 * d))
    C = A @ A.T / (4 * d)
    return C, rng.normal(size=(d, n)), rng.normal(size=(out, n))


def test_emmet_one_edit_is_the_rank_one_update():
    C, K, Rm = _random_problem(n=1)
    s = KS.covariance_solver(C)
    dw = CF.emmet_delta(K, Rm, s)
    W = np.random.default_rng(3).normal(size=Rm.shape[0] * C.shape[0]).reshape(Rm.shape[0], C.shape[0])
    u = np.linalg.solve(C, K[:, 0])
    k, v_old = K[:, 0], W @ K[:, 0]
    want = np.asarray(R.rank_one_update(W.astype(np.float32), "out_in", k, v_old + Rm[:, 0], v_old, u)) - W
    np.testing.assert_allclose(dw, want, atol=1e-4)


def test_emmet_meets_its_constraints_at_least_cost():
    C, K, Rm = _random_problem(n=4)
    dw = CF.emmet_delta(K, Rm, KS.covariance_solver(C))
    np.testing.assert_allclose(dw @ K, Rm, atol=1e-9)
    Ci = np.linalg.inv(C)
    want = Rm @ np.linalg.inv(K.T @ Ci @ K) @ K.T @ Ci  # the textbook formula
    np.testing.assert_allclose(dw, want, atol=1e-9)
    # any other solution (dW + N with N K = 0) costs more in tr(dW C dW^T)
    rng = np.random.default_rng(5)
    N = rng.normal(size=dw.shape)
    N -= N @ K @ np.linalg.pinv(K)
    cost = lambda X: np.trace(X @ C @ X.T)  # noqa: E731
    assert cost(dw + 1e-2 * N) > cost(dw)


def test_memit_is_the_least_squares_optimum():
    C, K, Rm = _random_problem(n=5)
    lam = 3.0
    dw = CF.memit_delta(K, Rm, KS.covariance_solver(C), lam)
    # min lam |dW C^1/2|^2 + |dW K - R|^2 as one stacked least-squares problem
    ev, U = np.linalg.eigh(C)
    half = U @ np.diag(np.sqrt(ev)) @ U.T
    A = np.vstack([K.T, np.sqrt(lam) * half])
    B = np.vstack([Rm.T, np.zeros((C.shape[0], Rm.shape[0]))])
    want = np.linalg.lstsq(A, B, rcond=None)[0].T
    np.testing.assert_allclose(dw, want, atol=1e-8)


def test_alphaedit_update_spares_the_preserved_keys():
    C, K, Rm = _random_problem(n=3)
    # preserved keys live in the top eigen-directions of C; make the spectrum steep
    ev, U = np.linalg.eigh(C)
    ev = np.geomspace(1e-6, 1.0, ev.size)
    C = U @ np.diag(ev) @ U.T
    s = KS.covariance_solver(C, max_cond=1e12)
    P = s.null_projection(0.01)
    prior = K[:, :1] @ K[:, :1].T
    dw = CF.alphaedit_delta(K, Rm, P, prior, 0.5)
    K0 = U[:, -4:] * np.sqrt(ev[-4:])  # keys plain text produces (outside the null space)
    assert np.abs(dw @ K0).max() < 1e-8 * np.abs(dw).max()
    # against the formula as written in the paper: dW = R K^T P ((K K^T + prior) P + l2 I)^-1
    want = Rm @ K.T @ P @ np.linalg.inv((K @ K.T + prior) @ P + 0.5 * np.eye(C.shape[0]))
    np.testing.assert_allclose(dw, want, atol=1e-9)


def test_null_projection_by_absolute_threshold():
    """AlphaEdit's own rule (alpha_threshold): P projects on the eigenvectors of C whose eigenvalue
    is below the threshold, against numpy's eigh; 0 falls back to the energy share."""
    C, _, _ = _random_problem()
    ev, U = np.linalg.eigh(C)
    th = float(np.sort(ev)[5] + np.sort(ev)[6]) / 2  # six eigenvalues below it
    s = KS.covariance_solver(C, max_cond=1e12)
    U0 = U[:, ev < th]
    assert U0.shape[1] == 6
    np.testing.assert_allclose(s.null_projection(0.5, threshold=th), U0 @ U0.T, atol=1e-10)
    np.testing.assert_allclose(s.null_projection(0.01, threshold=0.0), s.null_projection(0.01), atol=0)


def test_solver_adds_a_reported_ridge_when_ill_conditioned():
    C, _, _ = _random_problem()
    C[:, 0] = C[0, :] = 0.0  # singular
    s = KS.covariance_solver(C, max_cond=1e4)
    rep = s.report()
    assert rep["cond"] == float("inf") and rep["ridge"] > 0
    assert rep["cond_with_ridge"] == pytest.approx(1e4, rel=1e-6)
    assert "condition number" in rep["ridge_reason"]
    k = np.arange(C.shape[0], dtype=float)
    np.testing.assert_allclose((C + rep["ridge"] * np.eye(C.shape[0])) @ s.solve(k), k, atol=1e-6)
    well = KS.covariance_solver(np.eye(4) * 2.0)
    assert well.ridge == 0.0 and well.ridge_reason == ""
    with pytest.raises(ValueError, match="NaN"):
        KS.covariance_solver(np.full((3, 3), np.nan))


# --------------------------------------------------------------------------- key statistics cache


def test_key_statistics_cached_by_model_layer_and_tokens(tmp_path):
    model = _model("gpt2")
    texts = _texts()
    a = KS.cached_key_covariance(model, model.params, "h.1", texts, max_tokens=300, window=32, cache=tmp_path,
                                 progress=False)
    assert not a.from_cache and a.path.exists() and a.path.parent == tmp_path / "key_stats"
    b = KS.cached_key_covariance(model, model.params, "h.1", texts, max_tokens=300, window=32, cache=tmp_path,
                                 progress=False)
    assert b.from_cache and b.path == a.path
    np.testing.assert_array_equal(a.cov, b.cov)
    want = np.asarray(R.key_covariance(model, model.params, "h.1", texts, window=32, max_tokens=300, progress=False))
    np.testing.assert_allclose(a.cov, want, rtol=1e-6)
    # another layer, token count or parameter set gets its own entry
    other = jax.tree.map(lambda x: x * 1.01, model.params)
    paths = {KS.cached_key_covariance(model, p, l, texts, max_tokens=t, window=32, cache=tmp_path,
                                      progress=False).path for p, l, t in
             [(model.params, "h.0", 300), (model.params, "h.1", 200), (other, "h.1", 300)]}
    assert len(paths | {a.path}) == 4
    assert not list((tmp_path / "key_stats").glob("*.tmp"))


def test_random_prefixes_are_deterministic():
    model = _model("gpt2")
    a = KS.random_prefixes(model, _texts(), (3, 5, 5), seed=1)
    assert a == KS.random_prefixes(model, _texts(), (3, 5, 5), seed=1)
    assert len(a) == 3 and all(p.endswith(".") for p in a)
    assert [len(p.rstrip(".").split()) for p in a] == [3, 5, 5]


# --------------------------------------------------------------------------- r-ROME on tiny models

PROMPT, SUBJECT = "what is the capital of france", "france"


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def rr(request, tmp_path_factory):
    model = _model(request.param)
    stats = _stats(model, tmp_path_factory.mktemp("cache"))
    layer = model.layers.names()[0]
    out = rrome_edit(model, model.params, [EditRequest(PROMPT, SUBJECT, "tokyo")], layers=layer, stats=stats,
                     config=CFG, progress=False)
    return model, stats, layer, out


def test_rrome_maps_the_key_to_the_value_exactly(rr):
    model, stats, layer, out = rr
    w = R.rome_weight(model, layer)
    info = out.per_edit[0]
    k, v = info["key"], info["value"]
    try:
        b = np.asarray(get_path(out.params, w.module_path + "/bias"), np.float64)
    except KeyError:
        b = 0.0
    np.testing.assert_allclose(out_in(out.params, w) @ k + b, v, rtol=1e-4, atol=1e-4 * np.abs(v).max())
    assert np.linalg.norm(v - info["old_value"]) > 1e-3
    # the key really is the average over the bare prompt and the two prefixes
    assert len(stats.prefixes()) == 3
    want = np.mean([np.asarray(R.compute_key(model, model.params, w, PROMPT, SUBJECT, (p,))[0]) for p in
                    stats.prefixes()], 0)
    np.testing.assert_allclose(k, want, rtol=1e-5, atol=1e-6)


def test_rrome_leaves_keys_orthogonal_to_c_inverse_key(rr):
    model, stats, layer, out = rr
    w = R.rome_weight(model, layer)
    dw = out_in(out.params, w) - out_in(model.params, w)
    c = stats.solver(w).matrix()
    u = np.linalg.solve(c, out.per_edit[0]["key"])
    x = np.random.default_rng(1).normal(size=u.size)
    x -= u * (u @ x) / (u @ u)
    assert np.abs(dw @ x).max() < 1e-5 * np.abs(dw).max() * np.linalg.norm(x)
    assert np.linalg.svd(dw, compute_uv=False)[1] < 1e-5 * np.abs(dw).max()
    before = dict(zip(param_paths(model.params), jax.tree.leaves(model.params)))
    after = dict(zip(param_paths(out.params), jax.tree.leaves(out.params)))
    assert [p for p in before if not np.array_equal(before[p], after[p])] == [w.path]
    assert out.stats["layers"][w.path]["cache_file"].endswith(".npz")


def test_rrome_skips_absent_subjects_and_refuses_contradictions(tmp_path):
    model = _model("gpt2")
    stats = _stats(model, tmp_path)
    reqs = [EditRequest("the capital of peru is", "chile", "lima", record_id="a"),
            EditRequest(PROMPT, SUBJECT, "tokyo", record_id="b")]
    out = rrome_edit(model, model.params, reqs, layers="h.1", stats=stats,
                     config=EditorConfig(value=R.ROMEConfig(v_steps=2)), progress=False)
    assert out.edited == (1,) and len(out.skipped) == 1 and "'chile' does not occur" in out.skipped[0][1]
    assert out.summary()["skipped"] == 1
    bad = [EditRequest("the capital of france is", "france", "rome", relation="P36", record_id="x"),
           EditRequest("what is the capital of france", "france", "lima", relation="P36", record_id="y")]
    with pytest.raises(ValueError, match=r"contradicting edits.*'x'.*'y'"):
        rrome_edit(model, model.params, bad, layers="h.1", stats=stats, progress=False)
    with pytest.raises(ValueError, match="one layer"):
        rrome_edit(model, model.params, reqs, layers=["h.0", "h.1"], stats=stats, progress=False)
    # without a relation the prompt template decides; same target twice is a duplicate, skipped
    chk = check_requests([EditRequest("the capital of france is", "france", "rome"),
                          EditRequest("the capital of france is", "france", "rome")])
    assert chk.kept == (0,) and "duplicate" in chk.skipped[0][1]
