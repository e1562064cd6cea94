"""MEMIT, EMMET and AlphaEdit end to end on tiny GPT-2 / Llama models (the closed forms alone are
checked against numpy in test_rrome.py)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from salem_jax.baselines import keystats as KS
from salem_jax.baselines import rome as R
from salem_jax.baselines.locate_edit import EditorConfig, module_output, out_in
from salem_jax.baselines.mass_edit import (
    AlphaEditState,
    alphaedit_edit,
    emmet_edit,
    keys_of,
    memit_edit,
    residual_at_subject,
)
from salem_jax.baselines.requests import EditRequest
from salem_jax.baselines.rrome import rrome_edit
from salem_jax.testing import module_inputs, random_texts, tiny_edit_model

VALUE = R.ROMEConfig(v_steps=15, v_lr=0.1, clamp_norm_factor=100.0, weight_decay=1e-3)
EXACT = EditorConfig(value=VALUE, use_prefixes=False, emmet_lambda=0.0)
REQS = [EditRequest("what is the capital of france", "france", "tokyo", record_id="fr"),
        EditRequest("what is the currency of japan", "japan", "rupee", record_id="jp"),
        EditRequest("which language does peru", "peru", "yen", record_id="pe")]
_model = tiny_edit_model  # one tiny model per architecture, shared by the edit tests
_texts = random_texts


def _stats(model, cache):
    return KS.KeyStats(model, model.params, _texts(), max_tokens=2000, window=32, cache=cache,
                       prefix_lengths=(3,), progress=False)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def arch(request):
    return request.param


def test_emmet_with_one_edit_equals_rrome(arch, tmp_path):
    model = _model(arch)
    stats = _stats(model, tmp_path)
    layer = model.layers.names()[1]
    a = emmet_edit(model, model.params, REQS[:1], layers=[layer], stats=stats, config=EXACT, progress=False)
    b = rrome_edit(model, model.params, REQS[:1], layers=layer, stats=stats, config=EXACT, progress=False)
    w = R.rome_weight(model, layer)
    da = out_in(a.params, w) - out_in(model.params, w)
    db = out_in(b.params, w) - out_in(model.params, w)
    np.testing.assert_allclose(da, db, rtol=1e-4, atol=1e-5 * np.abs(db).max())


def test_emmet_band_meets_its_constraints(arch, tmp_path):
    model = _model(arch)
    stats = _stats(model, tmp_path)
    band = model.layers.names()[:2]
    out = emmet_edit(model, model.params, REQS, layers=band, stats=stats, config=EXACT, progress=False)
    assert out.edited == (0, 1, 2) and len(out.per_batch) == 2
    # replay the last layer with numpy: its keys on the model after the first layer's update,
    # its update dW must satisfy dW K = R exactly, R = target residual minus the current one
    w0, w1 = (R.rome_weight(model, n) for n in band)
    mid = dict(model.params)
    from salem_jax.baselines.locate_edit import apply_delta

    mid = apply_delta(model.params, w0, out_in(out.params, w0) - out_in(model.params, w0))
    K = keys_of(model, mid, w1, REQS, ("",))
    dw1 = out_in(out.params, w1) - out_in(model.params, w1)
    # after the whole band, the last block's residual reaches the targets z (1/2 from each layer)
    final = residual_at_subject(model, out.params, band[-1], REQS)
    before = residual_at_subject(model, mid, band[-1], REQS)
    np.testing.assert_allclose(dw1 @ K, (final - before).T, rtol=1e-3, atol=1e-3 * np.abs(final - before).max())
    for e in out.per_edit:
        assert e["target_miss"] < 1e-3
    for b in out.per_batch:
        assert b["relative_constraint_error"] < 1e-5


def test_memit_is_least_squares_over_the_batch(arch, tmp_path):
    model = _model(arch)
    stats = _stats(model, tmp_path)
    layer = model.layers.names()[1]
    w = R.rome_weight(model, layer)
    cfg = EditorConfig(value=VALUE, use_prefixes=False, memit_lambda=0.5)
    out = memit_edit(model, model.params, REQS, layers=[layer], stats=stats, config=cfg, progress=False)
    K = keys_of(model, model.params, w, REQS, ("",))
    dw = out_in(out.params, w) - out_in(model.params, w)
    # the residual it solved for: z - h = the v* deltas; recover R from the edited residual
    Rm = (residual_at_subject(model, out.params, layer, REQS) - residual_at_subject(model, model.params, layer,
                                                                                     REQS)).T
    # the gradient of lam tr(dW C dW^T) + |dW K - R_target|^2 vanishes; with R_target unknown,
    # check the normal equations' form instead: dW (lam C + K K^T) = R_target K^T has rank <= n
    C = stats.solver(w).matrix()
    M = dw @ (0.5 * C + K @ K.T)
    s = np.linalg.svd(M, compute_uv=False)
    assert s[len(REQS)] < 1e-6 * s[0]  # rank n: dW = X K^T (lam C + K K^T)^-1 for some X
    # least squares leaves a residual, unlike EMMET's exact solve
    assert out.per_batch[0]["relative_constraint_error"] > 1e-6
    assert np.linalg.norm(Rm) > 0


def test_alphaedit_spares_preserved_keys_and_remembers(arch, tmp_path):
    model = _model(arch)
    stats = _stats(model, tmp_path)
    layer = model.layers.names()[1]
    w = R.rome_weight(model, layer)
    cfg = EditorConfig(value=VALUE, use_prefixes=False, alpha_energy=0.02, alpha_l2=1e-4)
    out = alphaedit_edit(model, model.params, REQS[:2], layers=[layer], stats=stats, config=cfg, progress=False)
    assert isinstance(out.state, AlphaEditState) and out.state.n_edits == 2
    dw = out_in(out.params, w) - out_in(model.params, w)
    P = out.state.projection[w.path]
    np.testing.assert_allclose(dw @ P, dw, atol=1e-6 * np.abs(dw).max())  # rows in range(P)
    # preserved keys k0 ~ the text the statistics come from: E|dW k0|^2 = tr(dW C dW^T), which the
    # projection bounds by |dW|_2^2 x (the null-space share of trace(C)) <= |dW|_2^2 x 0.02 trace(C)
    C = np.asarray(KS.cached_key_covariance(model, model.params, w, stats.texts, max_tokens=2000, window=32,
                                            cache=tmp_path, progress=False).cov, np.float64)
    spent = np.trace(dw @ C @ dw.T) / (np.linalg.norm(dw, 2) ** 2 * np.trace(C))
    assert spent <= 0.02 * (1 + 1e-6)
    # the same through the model: the projection's inputs at every token of the statistics texts
    # (each text is one window, so C is exactly their mean x x^T) hardly move
    x = np.concatenate([module_inputs(model, w.module_path, t) for t in stats.texts])  # [T, in]
    moved = np.sum((x @ dw.T) ** 2) / (np.linalg.norm(dw, 2) ** 2 * np.sum(x * x))
    assert moved <= 0.02 * (1 + 1e-4)
    np.testing.assert_allclose(moved, spent, rtol=1e-3)
    K = keys_of(model, out.params, w, REQS[:2], ("",))
    np.testing.assert_allclose(out.state.prior[w.path], K @ K.T, rtol=1e-6)
    # a second batch continues the sequence and adds to the memory; a fresh call starts empty
    out2 = alphaedit_edit(model, out.params, REQS[2:], layers=[layer], stats=stats, config=cfg, state=out.state,
                          progress=False)
    assert out2.state is out.state and out2.state.n_edits == 3
    fresh = alphaedit_edit(model, model.params, REQS[2:], layers=[layer], stats=stats, config=cfg, progress=False)
    assert fresh.state.n_edits == 1


def test_alphaedit_with_v_from_the_edited_block_equals_every_block(arch, tmp_path):
    """Two sequential AlphaEdit edits over a band ending at the last block, with v*'s steps started
    at that block (ROMEConfig.from_block, the default) and with every block run at every step:
    the same weights after each edit, and the same remembered keys."""
    model = _model(arch)
    stats = _stats(model, tmp_path)
    band = list(model.layers.names()[-2:])
    fast = EditorConfig(value=dataclasses.replace(VALUE, stop_loss=0.0), use_prefixes=True, alpha_energy=0.02,
                        alpha_l2=1e-4)
    slow = dataclasses.replace(fast, value=dataclasses.replace(fast.value, from_block=False))
    outs = {}
    for name, cfg in (("fast", fast), ("slow", slow)):
        a = alphaedit_edit(model, model.params, REQS[:1], layers=band, stats=stats, config=cfg, progress=False)
        b = alphaedit_edit(model, a.params, REQS[1:2], layers=band, stats=stats, config=cfg, state=a.state,
                           progress=False)
        outs[name] = (a, b)
    for i in (0, 1):
        f, s = outs["fast"][i], outs["slow"][i]
        for layer in band:
            w = R.rome_weight(model, layer)
            dw_f = out_in(f.params, w) - out_in(model.params, w)
            dw_s = out_in(s.params, w) - out_in(model.params, w)
            assert np.linalg.norm(dw_s) > 0
            np.testing.assert_allclose(dw_f, dw_s, rtol=1e-3, atol=1e-3 * np.abs(dw_s).max())
            np.testing.assert_allclose(f.state.prior[w.path], s.state.prior[w.path], rtol=1e-3,
                                       atol=1e-6 * np.abs(s.state.prior[w.path]).max())



def test_batches_skips_and_contradictions(tmp_path):
    model = _model("gpt2")
    stats = _stats(model, tmp_path)
    reqs = REQS + [EditRequest("the capital of chile is", "peru", "lima", record_id="bad")]
    cfg = EditorConfig(value=R.ROMEConfig(v_steps=2), batch_size=2, use_prefixes=False)
    out = memit_edit(model, model.params, reqs, layers=["h.0", "h.1"], stats=stats, config=cfg, progress=False)
    assert out.edited == (0, 1, 2) and out.skipped[0][0] == 3 and "'peru' does not occur" in out.skipped[0][1]
    assert sorted({b["batch"] for b in out.per_batch}) == [0, 1] and len(out.per_batch) == 4
    bad = [EditRequest("the capital of france is", "france", "rome", relation="P36", record_id="one"),
           EditRequest("what is the capital of france", "france", "lima", relation="P36", record_id="two")]
    for fn in (memit_edit, emmet_edit, alphaedit_edit):
        with pytest.raises(ValueError, match=r"contradicting edits.*'one'.*'two'"):
            fn(model, model.params, bad, layers=["h.1"], stats=stats, progress=False)
    with pytest.raises(KeyError, match="valid layers"):
        emmet_edit(model, model.params, REQS, layers=["h.9"], stats=stats, progress=False)
