"""`mend.nullspace` and `config.eval.mend_null_energy`: AlphaEdit's null-space projection of a MEND
edit, checked against numpy on tiny GPT-2 (Conv1D "out_in" kernels) and Llama ("in_out": gate/up
read the block's hidden state, down the MLP activation) models: the covariance of each kernel's
inputs captured by hand, its projector from numpy's eigh, the projected edit by hand."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from experiments import capitals_smollm2
from salem_jax.mend.apply import apply_each, apply_edits
from salem_jax.mend.nullspace import check_energy, null_projection, project_delta
from salem_jax.methods.mend import with_null_projection
from salem_jax.models.base import get_path
from salem_jax.testing import module_inputs, noisy_editor, random_texts, refused_up_front, tiny_edit_model

REQS = [dict(prompt="the capital of france is", target="paris"),
        dict(prompt="the currency of japan is", target="rupee")]


def _hand_projector(cov: np.ndarray, energy: float) -> tuple[np.ndarray, np.ndarray]:
    """(P = U0 U0^T, U1): U0 the eigenvectors of smallest eigenvalue whose sum is <= energy x the
    trace, U1 the rest (the kept, high-energy directions). Plain numpy."""
    evals, evecs = np.linalg.eigh(cov)
    evals = np.clip(evals, 0, None)
    n0, total = 0, 0.0
    while n0 < len(evals) and total + evals[n0] <= energy * evals.sum():
        total += evals[n0]
        n0 += 1
    return evecs[:, :n0] @ evecs[:, :n0].T, evecs[:, n0:]


def _as_in_out(kernel, w) -> np.ndarray:
    k = np.asarray(kernel, np.float64)
    return k if w.layout == "in_out" else k.T


@pytest.mark.parametrize("arch", [pytest.param("gpt2", marks=pytest.mark.slow), "llama"])
def test_projected_edit_is_P_times_the_delta_and_spares_the_kept_keys(arch, tmp_path):
    model = tiny_edit_model(arch)
    layer = model.layers.names()[1]
    editor = noisy_editor(model, [layer])
    texts = random_texts()
    energy = 0.1
    proj = null_projection(model, model.params, editor.spec.weights, energy, texts, max_tokens=2000, window=32,
                           cache=tmp_path, progress=False)
    edited = apply_edits(model, editor, REQS[:1], progress=False)
    got = proj.project(model.params, edited)
    rng = np.random.default_rng(0)
    for w in editor.spec.weights:
        x = np.concatenate([module_inputs(model, w.module_path, t) for t in texts])  # every text is one window: C = mean x x^T
        cov = x.T @ x / len(x)
        P, U1 = _hand_projector(cov, energy)
        assert 0 < np.trace(P) < len(P) - 1  # a proper subspace: the checks below can fail
        np.testing.assert_allclose(proj.projections[w.path], P, atol=2e-5)
        base, edit = (_as_in_out(get_path(t, w.path), w) for t in (model.params, edited))
        dw = edit - base
        assert np.abs(dw).max() > 1e-4
        dw_p = _as_in_out(get_path(got, w.path), w) - base
        np.testing.assert_allclose(dw_p, P @ dw, atol=2e-6 * np.abs(dw).max())
        # k (W'_proj - W) ~ 0 for keys in the kept eigenvectors' span, though the unprojected edit moves them
        k = rng.normal(size=(8, U1.shape[1])) @ U1.T  # [8, in]
        assert np.linalg.norm(k @ dw) > 1e-3 * np.linalg.norm(k) * np.linalg.norm(dw)
        np.testing.assert_array_less(np.linalg.norm(k @ dw_p, axis=1), 1e-4 * np.linalg.norm(k, axis=1) * np.linalg.norm(dw))
        # and the text keys move by at most `energy` of |dW|_2^2 E|k|^2 (AlphaEdit's bound)
        moved = np.sum((x @ dw_p) ** 2) / (np.linalg.norm(dw_p, 2) ** 2 * np.sum(x * x))
        assert moved <= energy * (1 + 1e-4)
        assert proj.info[w.path]["null_dim"] == int(round(np.trace(P)))
    # every other leaf is the edited tree's own
    flat_got = jax.tree_util.tree_flatten_with_path(got)[0]
    flat_edit = dict(jax.tree_util.tree_flatten_with_path(edited)[0])
    paths = {w.path for w in editor.spec.weights}
    for kp, v in flat_got:
        if jax.tree_util.keystr(kp, simple=True, separator="/") not in paths:
            assert v is flat_edit[kp]
    s = proj.summary()
    assert set(s["kernels"]) == paths and all(0 < v["retained_mean"] < 1 for v in s["kernels"].values())


def test_project_delta_layouts_against_numpy():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(6, 6))
    P = np.linalg.qr(a)[0][:, :2]
    P = P @ P.T  # a rank-2 projector on R^6
    base, edited = rng.normal(size=(6, 4)), rng.normal(size=(6, 4))
    np.testing.assert_allclose(np.asarray(project_delta(base, edited, P, "in_out")), base + P @ (edited - base),
                               atol=1e-5)
    np.testing.assert_allclose(np.asarray(project_delta(base.T, edited.T, P, "out_in")), (base + P @ (edited - base)).T,
                               atol=1e-5)
    with pytest.raises(ValueError, match="does not match"):
        project_delta(base.T, edited.T, P, "in_out")
    with pytest.raises(ValueError, match="layout"):
        project_delta(base, edited, P, "sideways")


def test_energy_zero_leaves_the_edit_untouched_and_one_is_the_identity(tmp_path, monkeypatch):
    monkeypatch.setenv("SALEM_JAX_CACHE", str(tmp_path))  # the key statistics' cache
    model = tiny_edit_model("llama")
    layer = model.layers.names()[1]
    editor = noisy_editor(model, [layer])
    cfg = capitals_smollm2.get_config(tiny=True)

    def edit(params, rows):
        return apply_edits(model, editor, rows, params=params, progress=False)

    def edit_each(params, rows):
        return apply_each(model, editor, rows, params=params)

    info: dict = {}
    assert with_null_projection(model, cfg, editor.spec.weights, edit, edit_each, info) == (edit, edit_each)
    assert info == {}  # energy 0 (the default): the very same functions, nothing computed
    # energy 1: the null space is every direction, P = I, so the edit comes back (float rounding)
    cfg.eval.mend_null_energy, cfg.eval.mend_null_tokens = 1.0, 2000
    cfg.progress = False
    e1, each1 = with_null_projection(model, cfg, editor.spec.weights, edit, edit_each, info, say=lambda m: None)
    full, one = edit(model.params, REQS), each1(model.params, REQS)
    got = e1(model.params, REQS)
    for w in editor.spec.weights:
        np.testing.assert_allclose(np.asarray(get_path(got, w.path)), np.asarray(get_path(full, w.path)), atol=1e-6)
        for i, r in enumerate(REQS):
            alone = edit(model.params, [r])
            np.testing.assert_allclose(np.asarray(get_path(one[i], w.path)), np.asarray(get_path(alone, w.path)),
                                       atol=1e-6)
        assert info["null_projection"].info[w.path]["null_dim"] == info["null_projection"].info[w.path]["fan_in"]


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), float("inf"), "0.1", True, None])
def test_bad_energies_are_refused(bad, tmp_path):
    with pytest.raises(ValueError, match="mend_null_energy"):
        check_energy(bad, "config.eval.mend_null_energy")
    cfg = capitals_smollm2.get_config(tiny=True)
    cfg.eval.mend_null_energy = bad if isinstance(bad, float) else 2.0  # the config field is a float
    refused_up_front(cfg, tmp_path / "work", "mend_null_energy")
    for ok in (0, 0.0, 0.01, 1.0):
        assert check_energy(ok) == float(ok)


@pytest.mark.parametrize("arch", [pytest.param("gpt2", marks=pytest.mark.slow), "llama"])
def test_one_pass_covariances_equal_the_hand_ones_and_share_the_cache(arch, tmp_path):
    from salem_jax.baselines.keystats import cached_key_covariance, cached_key_covariances

    model = tiny_edit_model(arch)
    weights = model.layers.weights([model.layers.names()[1]])
    texts = random_texts()
    got = cached_key_covariances(model, model.params, weights, texts, max_tokens=2000, window=32, cache=tmp_path,
                                 progress=False)
    for w in weights:
        x = np.concatenate([module_inputs(model, w.module_path, t) for t in texts])  # every text is one window
        np.testing.assert_allclose(got[w.path].cov, x.T @ x / len(x), rtol=2e-4, atol=1e-6 * np.abs(x).max() ** 2)
        assert not got[w.path].from_cache
        one = cached_key_covariance(model, model.params, w, texts, max_tokens=2000, window=32, cache=tmp_path,
                                    progress=False)
        assert one.from_cache and one.path == got[w.path].path  # the single-weight function reads the same entry
    again = cached_key_covariances(model, model.params, weights, texts, max_tokens=2000, window=32, cache=tmp_path,
                                   progress=False)
    assert all(v.from_cache for v in again.values())
