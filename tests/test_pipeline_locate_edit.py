"""The pipeline's rrome / emmet methods (registry entries of salem_jax.methods.locate_edit) on tiny GPT-2."""

from __future__ import annotations

import numpy as np
import pytest
from test_pipeline_baselines import _changed, _config

from salem_jax import methods
from salem_jax import pipeline as P
from salem_jax.models.base import get_path


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("locate_edit")
    cfg = _config(tmp, ("rrome", "emmet"))
    cfg.locate_edit.update(dict(texts="held_out", n_prefixes=0, band=2, v_steps=4, v_lr=0.1,
                                clamp_norm_factor=100.0, weight_decay=1e-3, emmet_lambda=0.0))
    calls: dict[str, list] = {}
    orig = P.evaluate_method

    def spy(model, edit, val_rows, texts, cfg, name, **kw):
        def recorded(rows):
            out = edit(rows)
            calls.setdefault(name, []).append((rows, out))
            return out

        calls.setdefault("model", model)
        return orig(model, recorded, val_rows, texts, cfg, name, **kw)

    mp = pytest.MonkeyPatch()
    mp.setattr(P, "evaluate_method", spy)
    mp.setenv("SALEM_JAX_CACHE", str(tmp / "cache"))
    try:
        out = P.run_pipeline(cfg, tmp / "work")
    finally:
        mp.undo()
    return dict(out=out, calls=calls, cfg=cfg, tmp=tmp)


def test_registered_and_layers_from_the_saliency_profile(run):
    out, calls = run["out"], run["calls"]
    assert {"rrome", "memit", "emmet", "alphaedit"} <= set(methods.names())
    chosen = out["chosen_layers"][0]
    names = calls["model"].layers.names()
    assert out["training"]["rrome"]["layers"] == [chosen]
    i = names.index(chosen)
    assert out["training"]["emmet"]["layers"] == names[max(0, i - 1) : i + 1]
    assert out["training"]["rrome"]["layer_from"] == "saliency"
    cov = out["training"]["rrome"]["covariance"]["layers"]
    assert all(v["cache_file"].startswith(str(run["tmp"] / "cache")) for v in cov.values())
    assert (run["tmp"] / "cache" / "key_stats").is_dir()


def test_edits_touch_only_the_output_projections_and_skips_are_counted(run):
    out, calls = run["out"], run["calls"]
    base = calls["model"].params
    for name in ("rrome", "emmet"):
        layers = out["training"][name]["layers"]
        want = sorted(f"transformer/h/{l.split('.')[1]}/mlp/c_proj/kernel" for l in layers)
        assert calls[name], name
        for rows, edited in calls[name]:
            assert len(rows) == 1
            got = sorted(_changed(base, edited))
            assert set(got) <= set(want) and got, (name, got)
        assert out["methods"][name]["skipped_edits"] == out["methods"]["rrome"]["skipped_edits"] > 0
    # r-ROME's update is rank one
    for rows, edited in calls["rrome"]:
        (path,) = _changed(base, edited)
        a = np.asarray(get_path(edited, path), np.float64)
        b = np.asarray(get_path(base, path), np.float64)
        s = np.linalg.svd(a - b, compute_uv=False)
        assert s[1] < 1e-4 * s[0]


def test_bad_config_is_refused_early(tmp_path):
    cfg = _config(tmp_path, ("rrome",))
    cfg.locate_edit.layer = "h.9"
    with pytest.raises(ValueError, match="config.locate_edit.layer 'h.9'"):
        P.run_pipeline(cfg, tmp_path / "work")
    cfg.locate_edit.layer, cfg.locate_edit.layer_from = "", "gradients"
    with pytest.raises(ValueError, match="layer_from 'gradients'"):
        P.run_pipeline(cfg, tmp_path / "work2")
    cfg.locate_edit.layer_from, cfg.locate_edit.clamp_norm = "saliency", "residue"
    with pytest.raises(ValueError, match="config.locate_edit.clamp_norm 'residue'"):
        P.run_pipeline(cfg, tmp_path / "work3")
    cfg.locate_edit.clamp_norm, cfg.locate_edit.retries = "output", -1
    with pytest.raises(ValueError, match=r"config.locate_edit.retries=-1: give an integer >= 0"):
        P.run_pipeline(cfg, tmp_path / "work4")


def test_alphaedit_continues_its_state_only_on_its_own_output(tmp_path, monkeypatch):
    """The many-edits study's sequential mode calls edit(previous output, rows): AlphaEdit must
    then continue with the earlier edits' keys (its sequential memory); on any other parameters
    (the base weights, a copy) it starts afresh. Compared with the editor called by hand."""
    # the key statistics go to this test's folder, never the user's cache
    monkeypatch.setenv("SALEM_JAX_CACHE", str(tmp_path / "cache"))
    from salem_jax.baselines.editors import get_editor
    from salem_jax.baselines.keystats import KeyStats
    from salem_jax.baselines.requests import EditRequest
    from salem_jax.methods.locate_edit import editor_config
    from salem_jax.methods.registry import Context
    from salem_jax.models import hf
    from test_pipeline_baselines import TEXTS

    import jax

    model = hf.tiny("gpt2", seed=0)
    cfg = _config(tmp_path, ("alphaedit",))
    cfg.locate_edit.update(dict(texts="held_out", n_prefixes=0, v_steps=4, v_lr=0.1, clamp_norm_factor=100.0,
                                weight_decay=1e-3, alpha_energy=0.5))
    facts = [("the capital of france is", "france", "rome"), ("the capital of peru is", "peru", "tokyo")]
    rows = [dict(id=f"fail{i}", record_id=f"r{i}", prompt=p, target=t, group="fail") for i, (p, _, t) in enumerate(facts)]
    ctx = Context(model=model, cfg=cfg, work=tmp_path, texts=tuple(TEXTS), subjects={"r0": "france", "r1": "peru"},
                  val_rows=rows)
    layers = ("h.1",)
    prepared = methods.get("alphaedit").prepare(ctx, layers)
    p1 = prepared.edit(model.params, rows[:1])
    p2 = prepared.edit(p1, rows[1:])
    p2_fresh = prepared.edit(jax.tree.map(lambda x: x + 0, p1), rows[1:])  # equal values, another object

    stats = KeyStats(model, model.params, list(TEXTS), max_tokens=cfg.locate_edit.cov_tokens, prefix_lengths=())
    fn, ec = get_editor("alphaedit"), editor_config(cfg)
    reqs = [EditRequest(p, s, t, record_id=f"fail{i}") for i, (p, s, t) in enumerate(facts)]
    o1 = fn(model, model.params, reqs[:1], layers=layers, stats=stats, config=ec, progress=False)
    o2 = fn(model, o1.params, reqs[1:], layers=layers, stats=stats, config=ec, state=o1.state, progress=False)
    o2_fresh = fn(model, o1.params, reqs[1:], layers=layers, stats=stats, config=ec, progress=False)
    path = "transformer/h/1/mlp/c_proj/kernel"
    k = lambda p: np.asarray(get_path(p, path), np.float64)  # noqa: E731
    np.testing.assert_allclose(k(p1), k(o1.params), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(k(p2), k(o2.params), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(k(p2_fresh), k(o2_fresh.params), rtol=1e-5, atol=1e-7)
    assert np.abs(k(o2.params) - k(o2_fresh.params)).max() > 1e-6  # the memory changes the second edit


# --------------------------------------------------------------------------- batch edits (issue 17)

BATCH_FACTS = [("the capital of france is", "france", "rome"), ("the capital of peru is", "peru", "tokyo"),
               ("the language of japan is", "japan", "lima"), ("the capital of chile is", "chile", "paris")]


def _batch_setup(tmp_path, monkeypatch, names, **fields):
    """Tiny GPT-2, the pipeline's prepared methods `names` on one layer (h.1), their KeyStats (same
    texts and cache as the methods'), and the BATCH_FACTS as val fail rows and as EditRequests."""
    from salem_jax.baselines.keystats import KeyStats
    from salem_jax.baselines.requests import EditRequest
    from salem_jax.methods.registry import Context
    from salem_jax.models import hf
    from test_pipeline_baselines import TEXTS

    monkeypatch.setenv("SALEM_JAX_CACHE", str(tmp_path / "cache"))
    model = hf.tiny("gpt2", seed=0)
    cfg = _config(tmp_path, tuple(names))
    cfg.locate_edit.update(dict(texts="held_out", n_prefixes=0, v_steps=4, v_lr=0.1, clamp_norm_factor=100.0,
                                weight_decay=1e-3, **fields))
    rows = [dict(id=f"fail{i}", record_id=f"r{i}", prompt=p, target=t, group="fail")
            for i, (p, _, t) in enumerate(BATCH_FACTS)]
    ctx = Context(model=model, cfg=cfg, work=tmp_path, texts=tuple(TEXTS),
                  subjects={f"r{i}": s for i, (_, s, _) in enumerate(BATCH_FACTS)}, val_rows=rows)
    prepared = {n: methods.get(n).prepare(ctx, ("h.1",)) for n in names}
    stats = KeyStats(model, model.params, list(TEXTS), max_tokens=cfg.locate_edit.cov_tokens, prefix_lengths=())
    reqs = [EditRequest(p, s, t, record_id=f"fail{i}") for i, (p, s, t) in enumerate(BATCH_FACTS)]
    return model, cfg, prepared, stats, rows, reqs


def test_batch_edit_is_one_closed_form_update_over_all_rows(tmp_path, monkeypatch):
    """The many-edits study's batch mode calls edit(base params, T rows): EMMET and AlphaEdit must
    solve ONE closed-form update for all T rows (not edit them one after another). Checked against
    numpy solves of the papers' formulas with the rows' keys and v* on the base weights; with T = 1
    EMMET (lambda 0) equals the single-edit path (r-ROME)."""
    from salem_jax.baselines.locate_edit import out_in
    from salem_jax.baselines.mass_edit import keys_of
    from salem_jax.baselines.rome import compute_value, rome_weight
    from salem_jax.methods.locate_edit import editor_config

    model, cfg, prepared, stats, rows, reqs = _batch_setup(
        tmp_path, monkeypatch, ("emmet", "alphaedit", "rrome"), emmet_lambda=0.0, alpha_energy=0.5, alpha_l2=0.1)
    p0, w, T = model.params, rome_weight(model, "h.1"), 3
    dw = lambda p: out_in(p, w) - out_in(p0, w)  # noqa: E731
    K = keys_of(model, p0, w, reqs[:T], ("",))  # [in, T]
    vcfg = editor_config(cfg).value
    vo = [compute_value(model, p0, w, r.prompt, r.subject, r.target_new, vcfg, progress=False) for r in reqs[:T]]
    R = np.stack([np.asarray(v, np.float64) - np.asarray(o, np.float64) for v, o, _ in vo], 1)  # [out, T]
    solver = stats.solver(w)
    C = solver.matrix()
    CiK = np.linalg.solve(C, K)
    want = {"emmet": R @ np.linalg.solve(K.T @ CiK, CiK.T)}
    P = solver.null_projection(cfg.locate_edit.alpha_energy)
    want["alphaedit"] = R @ K.T @ P @ np.linalg.inv((K @ K.T) @ P + cfg.locate_edit.alpha_l2 * np.eye(len(P)))
    for name, d in want.items():
        got = dw(prepared[name].edit(p0, rows[:T]))
        np.testing.assert_allclose(got, d, rtol=1e-3, atol=1e-3 * np.abs(d).max(), err_msg=name)
        # the same rows edited one after another give another update (so the check above can fail)
        p = p0
        for r in rows[:T]:
            p = prepared[name].edit(p, [r])
        assert np.abs(dw(p) - d).max() > 1e-2 * np.abs(d).max(), name
    np.testing.assert_allclose(dw(prepared["emmet"].edit(p0, rows[:1])), dw(prepared["rrome"].edit(p0, rows[:1])),
                               rtol=1e-3, atol=1e-4 * np.abs(want["emmet"]).max())


def test_batch_reuses_each_rows_value_and_gives_the_same_numbers(tmp_path, monkeypatch):
    """v* at the base weights is computed once per row across batches of T = 1, 3, 4 and across the
    band methods of a run; the edited weights equal a fresh computation exactly. Edits of other
    weights (a sequential edit, equal values in another object) compute their own v*."""
    import jax

    from salem_jax.baselines import mass_edit
    from salem_jax.baselines.editors import get_editor
    from salem_jax.methods.locate_edit import base_values, editor_config

    model, cfg, prepared, stats, rows, reqs = _batch_setup(tmp_path, monkeypatch, ("alphaedit", "emmet"),
                                                           alpha_energy=0.5, alpha_l2=0.1)
    calls = []
    real = mass_edit.compute_value

    def counted(model_, params, weight, prompt, *a, **kw):
        calls.append((prompt, params is model.params))
        return real(model_, params, weight, prompt, *a, **kw)

    monkeypatch.setattr(mass_edit, "compute_value", counted)
    p0 = model.params
    got = {n: [prepared[n].edit(p0, rows[:T]) for T in (1, 3, 4)] for n in ("alphaedit", "emmet")}
    assert sorted(p for p, _ in calls) == sorted(r["prompt"] for r in rows) and all(b for _, b in calls)
    assert len(base_values(p0)) == 4
    ec = editor_config(cfg)
    for name in ("alphaedit", "emmet"):
        for T, p in zip((1, 3, 4), got[name]):
            fresh = get_editor(name)(model, p0, reqs[:T], layers=("h.1",), stats=stats, config=ec, progress=False)
            for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(fresh.params)):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    n = len(calls)  # the fresh calls above computed their own
    assert n == 4 + 2 * (1 + 3 + 4)
    prepared["alphaedit"].edit(got["alphaedit"][0], rows[1:2])  # sequential: on edited weights
    prepared["alphaedit"].edit(jax.tree.map(lambda x: x + 0, p0), rows[:1])  # equal values, another object
    assert len(calls) == n + 2 and not any(b for _, b in calls[n:])
    assert len(base_values(p0)) == 4


def test_values_are_reused_for_the_first_batch_only(tmp_path):
    """With batch_size 2, four requests are two updates, the second on the weights the first edited
    (AlphaEdit's sequential batches): only the first batch's v* (on the given params) may be reused."""
    import jax

    from salem_jax.baselines import rome as R
    from salem_jax.baselines.keystats import KeyStats
    from salem_jax.baselines.locate_edit import EditorConfig
    from salem_jax.baselines.mass_edit import alphaedit_edit
    from salem_jax.baselines.requests import EditRequest
    from salem_jax.models import hf
    from test_pipeline_baselines import TEXTS

    model = hf.tiny("gpt2", seed=0)
    stats = KeyStats(model, model.params, list(TEXTS), max_tokens=2000, cache=tmp_path, prefix_lengths=(),
                     progress=False)
    cfg = EditorConfig(value=R.ROMEConfig(v_steps=4, v_lr=0.1, clamp_norm_factor=100.0, weight_decay=1e-3),
                       use_prefixes=False, batch_size=2, alpha_energy=0.5, alpha_l2=0.1)
    reqs = [EditRequest(p, s, t, record_id=f"f{i}") for i, (p, s, t) in enumerate(BATCH_FACTS)]
    values: dict = {}
    kw = dict(layers=("h.0", "h.1"), stats=stats, config=cfg, progress=False)
    a = alphaedit_edit(model, model.params, reqs, values=values, **kw)
    assert len(values) == 2 and {k[1] for k in values} == {r.prompt for r in reqs[:2]}
    assert len({b["batch"] for b in a.per_batch}) == 2 and a.state.n_edits == 4
    b = alphaedit_edit(model, model.params, reqs, values=values, **kw)
    c = alphaedit_edit(model, model.params, reqs, **kw)
    for x, y, z in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), jax.tree.leaves(c.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(z))
        np.testing.assert_array_equal(np.asarray(y), np.asarray(z))


def test_alphaedit_sequential_batches_carry_projection_and_keys(tmp_path, monkeypatch):
    """The many-edits study's sequential:2 mode with the pipeline's alphaedit: two closed-form
    updates of two rows each, the second on the weights the first produced, with the first batch's
    keys (read on the edited weights) in its memory. Checked against numpy solves of AlphaEdit's
    formula, batch by batch with v* on the current weights; equal to one alphaedit call with
    batch_size 2 (the session-11 route); the memory changes the second update."""
    from salem_jax.baselines.locate_edit import EditorConfig, apply_delta, out_in
    from salem_jax.baselines.mass_edit import alphaedit_edit, keys_of
    from salem_jax.baselines.rome import compute_value, rome_weight
    from salem_jax.eval import sequential as S
    from salem_jax.methods.locate_edit import editor_config

    import dataclasses

    model, cfg, prepared, stats, rows, reqs = _batch_setup(tmp_path, monkeypatch, ("alphaedit",), alpha_energy=0.5,
                                                           alpha_l2=0.1)
    seen = []

    def edit(p, rs):
        seen.append(prepared["alphaedit"].edit(p, rs))
        return seen[-1]

    res = S.many_edits(model, edit, rows, {}, {}, steps=(2, 4), mode="sequential:2", batch_size=4)
    assert [r["T"] for r in res] == [2, 4] and len(seen) == 2

    p0, w = model.params, rome_weight(model, "h.1")
    vcfg = editor_config(cfg).value
    P = stats.solver(w).null_projection(cfg.locate_edit.alpha_energy)
    l2 = cfg.locate_edit.alpha_l2

    def update(p, rs, prior):
        K = keys_of(model, p, w, rs, ("",))
        vo = [compute_value(model, p, w, r.prompt, r.subject, r.target_new, vcfg, progress=False) for r in rs]
        R = np.stack([np.asarray(v, np.float64) - np.asarray(o, np.float64) for v, o, _ in vo], 1)
        KK = K @ K.T + prior
        return R @ K.T @ P @ np.linalg.inv(KK @ P + l2 * np.eye(len(P)))

    d1 = update(p0, reqs[:2], 0.0)
    p1 = apply_delta(p0, w, d1)
    K1 = keys_of(model, p1, w, reqs[:2], ("",))  # the memory: batch 1's keys on the edited weights
    d2 = update(p1, reqs[2:], K1 @ K1.T)
    d2_fresh = update(p1, reqs[2:], 0.0)
    tol = lambda d: dict(rtol=1e-3, atol=1e-3 * np.abs(d).max())  # noqa: E731
    np.testing.assert_allclose(out_in(seen[0], w) - out_in(p0, w), d1, **tol(d1))
    np.testing.assert_allclose(out_in(seen[1], w) - out_in(seen[0], w), d2, **tol(d2))
    assert np.abs(d2 - d2_fresh).max() > 1e-2 * np.abs(d2).max()  # the memory matters here

    ec = dataclasses.replace(editor_config(cfg), batch_size=2)
    one_call = alphaedit_edit(model, p0, reqs, layers=("h.1",), stats=stats, config=ec, progress=False)
    np.testing.assert_allclose(out_in(one_call.params, w), out_in(seen[1], w), rtol=1e-5, atol=1e-7)
    assert isinstance(ec, EditorConfig) and one_call.state.n_edits == 4


def _np_alphaedit_update(model, w, vcfg, P, l2):
    """AlphaEdit's closed form written out in numpy: update(params, requests, prior) = R K^T P
    ((K K^T + prior) P + l2 I)^-1 with the requests' keys K and residuals R on `params`."""
    from salem_jax.baselines.rome import compute_key, compute_value

    def update(p, rs, prior):
        K = np.stack([np.asarray(compute_key(model, p, w, r.prompt, r.subject)[0], np.float64) for r in rs], 1)
        vo = [compute_value(model, p, w, r.prompt, r.subject, r.target_new, vcfg, progress=False) for r in rs]
        R = np.stack([np.asarray(v, np.float64) - np.asarray(o, np.float64) for v, o, _ in vo], 1)
        return R @ K.T @ P @ np.linalg.inv((K @ K.T + prior) @ P + l2 * np.eye(len(P)))

    return update


def _check_seeded_sequence(model, w, update, Kf, reqs, p0, p1, p2, single):
    """The kernels of a memory seeded with keys Kf [d, n]: p1 after reqs[:2] on p0, p2 after reqs[2:]
    on p1 (the first batch's keys added to the memory), `single` after reqs[0] alone on p0 - each
    update against `update` by hand. Returns the first batch's update."""
    from salem_jax.baselines.locate_edit import apply_delta, out_in
    from salem_jax.baselines.mass_edit import keys_of

    d1 = update(p0, reqs[:2], Kf @ Kf.T)
    K1 = keys_of(model, apply_delta(p0, w, d1), w, reqs[:2], ("",))
    d2 = update(apply_delta(p0, w, d1), reqs[2:], Kf @ Kf.T + K1 @ K1.T)
    ds = update(p0, reqs[:1], Kf @ Kf.T)
    tol = lambda d: dict(rtol=1e-3, atol=1e-3 * np.abs(d).max())  # noqa: E731
    np.testing.assert_allclose(out_in(p1, w) - out_in(p0, w), d1, **tol(d1))
    np.testing.assert_allclose(out_in(p2, w) - out_in(p1, w), d2, **tol(d2))
    np.testing.assert_allclose(out_in(single, w) - out_in(p0, w), ds, **tol(ds))
    return d1


def test_alphaedit_memory_starts_with_the_preserved_train_keys(tmp_path, monkeypatch):
    """config.locate_edit.alpha_preserve = 2: AlphaEdit's memory starts with the keys of the first two
    train fail rows whose subject occurs in the prompt and in no val or keep prompt (whole words, any
    case; on the base weights), in every fresh state
    (the one-at-a-time evaluation's too) and under the edits' keys in a sequence. Checked against
    numpy solves of dW = R K^T P ((K K^T + K_f K_f^T + K_1 K_1^T) P + l2 I)^-1 with keys computed
    one prompt at a time."""
    from salem_jax.baselines.rome import compute_key, rome_weight
    from salem_jax.methods.locate_edit import editor_config

    model, cfg, _, stats, rows, reqs = _batch_setup(tmp_path, monkeypatch, (), alpha_energy=0.5, alpha_l2=0.1,
                                                    alpha_preserve=2)
    from salem_jax.methods.registry import Context
    from test_pipeline_baselines import TEXTS

    train = [("the river of spain is", "portugal", "x"),  # subject not in the prompt: passed over
             ("the river of peru is", "peru", "x"),  # subject in a val prompt: passed over
             ("the anthem of Spain is", "Spain", "x"),  # subject in a keep prompt (other case): passed over
             ("the capital of italy is", "italy", "x"), ("the pass row of egypt", "egypt", "x"),
             ("the currency of ital is", "ital", "x"),  # 'ital' is not a whole word of any val / keep prompt
             ("the capital of kenya is", "kenya", "x")]
    train_rows = [dict(id=f"t{i}", record_id=f"tr{i}", prompt=p, target=t, group="pass" if i == 4 else "fail")
                  for i, (p, _, t) in enumerate(train)]
    keep_rows = [dict(id="k0", record_id="k0", prompt="the currency of spain is", target="euro", group="keep"),
                 dict(id="k1", record_id="k1", prompt="the capital of italys is", target="x", group="keep")]
    subjects = {f"r{i}": s for i, (_, s, _) in enumerate(BATCH_FACTS)}
    subjects.update({f"tr{i}": s for i, (_, s, _) in enumerate(train)})
    ctx = Context(model=model, cfg=cfg, work=tmp_path, texts=tuple(TEXTS), subjects=subjects, val_rows=rows,
                  train_rows=train_rows, keep_rows=keep_rows)
    prepared = methods.get("alphaedit").prepare(ctx, ("h.1",))
    assert prepared.info["preserved_keys"] == 2
    assert prepared.info["preserve_passed_over"] == {"no_subject": 1, "val": 1, "keep": 1}
    p0 = model.params
    p1 = prepared.edit(p0, rows[:2])
    p2 = prepared.edit(p1, rows[2:])
    single = prepared.edit(p0, rows[:1])  # a fresh state again: the seed only, no keys of the sequence

    w = rome_weight(model, "h.1")
    vcfg = editor_config(cfg).value
    P = stats.solver(w).null_projection(cfg.locate_edit.alpha_energy)
    l2 = cfg.locate_edit.alpha_l2
    Kf = np.stack([np.asarray(compute_key(model, p0, w, p, s)[0], np.float64) for p, s, _ in (train[3], train[5])], 1)

    update = _np_alphaedit_update(model, w, vcfg, P, l2)
    d1 = _check_seeded_sequence(model, w, update, Kf, reqs, p0, p1, p2, single)
    d1_empty = update(p0, reqs[:2], 0.0)
    assert np.abs(d1 - d1_empty).max() > 1e-2 * np.abs(d1).max()  # the preserved keys change the update

    # alpha_preserve_weight = 0.25: the seeded term is 0.25 K_f K_f^T (= (0.5 K_f)(0.5 K_f)^T), the edits'
    # own keys in the sequence keep weight 1
    cfg.locate_edit.alpha_preserve_weight = 0.25
    weighted = methods.get("alphaedit").prepare(ctx, ("h.1",))
    assert weighted.info["preserve_weight"] == 0.25 and prepared.info["preserve_weight"] == 1.0
    q1 = weighted.edit(p0, rows[:2])
    q2 = weighted.edit(q1, rows[2:])
    q_single = weighted.edit(p0, rows[:1])
    d1_w = _check_seeded_sequence(model, w, update, 0.5 * Kf, reqs, p0, q1, q2, q_single)
    assert np.abs(d1_w - d1).max() > 1e-2 * np.abs(d1).max()  # the weight changes the update
    for bad in (0.0, -1.0, float("nan")):
        cfg.locate_edit.alpha_preserve_weight = bad
        with pytest.raises(ValueError, match="alpha_preserve_weight must be a finite number > 0"):
            methods.get("alphaedit").check(ctx)  # the pipeline's check before any costly step
    cfg.locate_edit.alpha_preserve_weight = 0.5
    cfg.locate_edit.alpha_preserve = 0
    with pytest.raises(ValueError, match="alpha_preserve_weight=0.5 weighs AlphaEdit's seeded keys, but none are seeded"):
        methods.get("alphaedit").check(ctx)
    cfg.locate_edit.alpha_preserve = 2
    methods.get("alphaedit").check(ctx)  # seeded: the weight is accepted
    cfg.locate_edit.alpha_preserve_weight = 1.0

    cfg.locate_edit.alpha_preserve = 5  # 3 of the 6 train fail rows are usable
    with pytest.raises(ValueError, match=r"alpha_preserve=5: the train split has only 3 usable fail rows \(of 6; "
                                         r"passed over: 1 without .* 1 whose subject is in a val prompt, 1 whose "
                                         r"subject is in a keep prompt\)"):
        methods.get("alphaedit").prepare(ctx, ("h.1",))
    cfg.locate_edit.alpha_preserve = 2
    with pytest.raises(ValueError, match="alpha_preserve=2 seeds AlphaEdit's memory; emmet"):
        methods.get("emmet").prepare(ctx, ("h.1",))


def test_alphaedit_memory_seeded_with_country_facts_outside_the_keep_set(tmp_path, monkeypatch):
    """config.locate_edit.alpha_preserve_facts = "countries:region": AlphaEdit's memory starts with the
    keys (at the country name's last token, on the base weights) of country region facts that share
    neither a prompt nor a country with the keep set (a keep row of ANY relation bans its country),
    and whose country is named in no val or keep prompt; with alpha_preserve_facts_max = 3 a seeded
    sample of them, added after the alpha_preserve train rows' keys. The usable facts are listed by
    hand from the country data; the updates of a sequence and of a fresh single edit equal numpy
    solves of dW = R K^T P ((K K^T + K_f K_f^T [+ K_1 K_1^T]) P + l2 I)^-1 with keys computed one
    prompt at a time; bad specs and too few usable facts are named errors with the counts."""
    from salem_jax.baselines.rome import compute_key, rome_weight
    from salem_jax.data.countries import country_records
    from salem_jax.methods.locate_edit import editor_config, preserved_fact_requests
    from salem_jax.methods.registry import Context
    from test_pipeline_baselines import TEXTS

    model, cfg, _, stats, rows, reqs = _batch_setup(tmp_path, monkeypatch, (), alpha_energy=0.5, alpha_l2=0.1,
                                                    alpha_preserve=1, alpha_preserve_facts="countries:region",
                                                    alpha_preserve_facts_max=3)
    records = {r.id: r for r in country_records("all", seed=0)}
    krow = lambda rid: dict(id=f"keep:{rid}", record_id=rid, group="keep", prompt=records[rid].prompt,  # noqa: E731
                            target=records[rid].target_true)
    # keep rows: Germany's and Kenya's region facts, Brazil's CURRENCY fact (bans Brazil's region fact
    # too), and a non-country prompt that names Spain (its facts are passed over by name)
    keep = [krow("countryinfo:region:Germany"), krow("countryinfo:region:Kenya"), krow("countryinfo:currency:Brazil"),
            dict(id="k9", record_id="other:9", group="keep", prompt="the anthem of Spain is", target="x")]
    train_rows = [dict(id="t0", record_id="tr0", prompt="the capital of italy is", target="x", group="fail")]
    subjects = {f"r{i}": s for i, (_, s, _) in enumerate(BATCH_FACTS)}
    subjects["tr0"] = "italy"
    ctx = Context(model=model, cfg=cfg, work=tmp_path, texts=tuple(TEXTS), subjects=subjects, val_rows=rows,
                  train_rows=train_rows, keep_rows=keep)

    # by hand: every region fact except those of the keep countries and of the countries named in a
    # val prompt (france, peru, japan, chile: BATCH_FACTS) or a keep prompt (Spain)
    region = [r for r in records.values() if r.extra["relation"] == "region"]
    banned_keep, named_val, named_keep = {"Germany", "Kenya", "Brazil"}, {"France", "Peru", "Japan", "Chile"}, {"Spain"}
    assert {r.extra["country"] for r in region} >= banned_keep | named_val | named_keep
    usable = [r for r in region if r.extra["country"] not in banned_keep | named_val | named_keep]
    every, counts = preserved_fact_requests(ctx, "countries:region", 0)
    assert [(q.prompt, q.subject, q.target_new, q.record_id) for q in every] == \
        [(r.prompt, r.prompt[:len(r.subject)] if r.prompt.lower().startswith(r.subject.lower()) else r.subject,
          r.target_true, r.id) for r in usable]
    assert counts == {"keep": 3, "no_subject": 0, "val": 4, "keep_name": 1, "usable": len(region) - 8}
    uk = next(q for q in every if q.record_id == "countryinfo:region:United Kingdom")
    assert (uk.prompt, uk.subject) == ("The United Kingdom is located in", "The United Kingdom")  # key at "Kingdom"
    keep_prompts = {k["prompt"] for k in keep}
    assert not any(q.prompt in keep_prompts or records[q.record_id].extra["country"] in banned_keep for q in every)

    prepared = methods.get("alphaedit").prepare(ctx, ("h.1",))
    assert prepared.info["preserved_keys"] == 4 and prepared.info["preserve_facts"] == counts
    pick = sorted(np.random.default_rng(cfg.seed).permutation(len(usable))[:3])  # the seeded sample
    seeded = [("the capital of italy is", "italy")] + [(usable[i].prompt, every[i].subject) for i in pick]
    p0 = model.params
    p1 = prepared.edit(p0, rows[:2])
    p2 = prepared.edit(p1, rows[2:])
    single = prepared.edit(p0, rows[:1])

    w = rome_weight(model, "h.1")
    vcfg = editor_config(cfg).value
    P_ = stats.solver(w).null_projection(cfg.locate_edit.alpha_energy)
    l2 = cfg.locate_edit.alpha_l2
    Kf = np.stack([np.asarray(compute_key(model, p0, w, p, s)[0], np.float64) for p, s in seeded], 1)

    update = _np_alphaedit_update(model, w, vcfg, P_, l2)
    d1 = _check_seeded_sequence(model, w, update, Kf, reqs, p0, p1, p2, single)
    d1_rows_only = update(p0, reqs[:2], Kf[:, :1] @ Kf[:, :1].T)
    assert np.abs(d1 - d1_rows_only).max() > 1e-2 * np.abs(d1).max()  # the country keys change the update

    for spec, msg in (("region", r"alpha_preserve_facts='region': give 'countries:REL,REL'"),
                      ("countries:", r"alpha_preserve_facts='countries:': give"),
                      ("countries:region,capitol", r"alpha_preserve_facts='countries:region,capitol': unknown relation\(s\) capitol")):
        cfg.locate_edit.alpha_preserve_facts = spec
        with pytest.raises(ValueError, match=msg):
            methods.get("alphaedit").check(ctx)
        with pytest.raises(ValueError, match=msg):
            methods.get("alphaedit").prepare(ctx, ("h.1",))
    cfg.locate_edit.alpha_preserve_facts, cfg.locate_edit.alpha_preserve_facts_max = "countries:region", len(usable) + 1
    with pytest.raises(ValueError, match=rf"alpha_preserve_facts='countries:region' with alpha_preserve_facts_max="
                                         rf"{len(usable) + 1}: only {len(usable)} usable facts \(of {len(region)} facts "
                                         r"of region; left out: 3 of a keep row's country or with a keep prompt, 0 without "
                                         r"their country in the prompt, 4 whose country is named in a val prompt, 1 whose "
                                         r"country is named in a keep prompt\)"):
        methods.get("alphaedit").prepare(ctx, ("h.1",))
    cfg.locate_edit.alpha_preserve_facts_max = -1
    with pytest.raises(ValueError, match="alpha_preserve_facts_max must be >= 0"):
        methods.get("alphaedit").check(ctx)
    cfg.locate_edit.alpha_preserve, cfg.locate_edit.alpha_preserve_facts_max = 0, 3
    with pytest.raises(ValueError, match="alpha_preserve_facts='countries:region' seeds AlphaEdit's memory; emmet"):
        methods.get("emmet").prepare(ctx, ("h.1",))


def test_alphaedit_projector_holds_the_seeded_facts_keys(tmp_path, monkeypatch):
    """config.locate_edit.alpha_project_facts_weight = w_p: AlphaEdit's null space is taken of
    C' = C_text + w_p C_facts (per-token means of k k^T: the plain texts' tokens, and every token of each
    seeded fact's prompt + true target), the facts exactly `preserved_fact_requests`' selection. Against
    numpy: C_text and C_facts from the layer's inputs read by hand (`testing.module_inputs`), P' from
    numpy's eigendecomposition of C' (energy rule and absolute threshold), the null dims in the info,
    and the first update dW = R K^T P' ((K K^T + w K_f K_f^T) P' + l2 I)^-1; bad values are named errors."""
    from salem_jax.baselines.rome import compute_key, rome_weight
    from salem_jax.methods.locate_edit import editor_config, facts_projections, preserved_fact_requests
    from salem_jax.methods.registry import Context
    from salem_jax.testing import module_inputs
    from test_pipeline_baselines import TEXTS

    energy, wp, wf, l2 = 0.5, 4.0, 0.5, 0.1
    model, cfg, _, stats, rows, reqs = _batch_setup(tmp_path, monkeypatch, (), alpha_energy=energy, alpha_l2=l2,
                                                    alpha_preserve_facts="countries:region", alpha_preserve_facts_max=3,
                                                    alpha_preserve_weight=wf, alpha_project_facts_weight=wp)
    ctx = Context(model=model, cfg=cfg, work=tmp_path, texts=tuple(TEXTS), val_rows=rows, train_rows=[], keep_rows=[],
                  subjects={f"r{i}": s for i, (_, s, _) in enumerate(BATCH_FACTS)})
    facts, _ = preserved_fact_requests(ctx, "countries:region", 3)
    w = rome_weight(model, "h.1")
    module = w.path.rsplit("/", 1)[0]

    def hand_cov(texts):
        xs = np.concatenate([module_inputs(model, module, t) for t in texts])
        return xs.T @ xs / len(xs)

    c_text = hand_cov(TEXTS)
    c_facts = hand_cov([f"{q.prompt} {q.target_new}" for q in facts])

    def hand_p(c, thr=0.0):
        ev, u = np.linalg.eigh(c)
        ev = np.clip(ev, 0, None)
        n0 = int(np.sum(ev < thr)) if thr > 0 else int(np.sum(np.cumsum(ev) <= energy * ev.sum()))
        return u[:, :n0] @ u[:, :n0].T, n0

    P_text, n_text = hand_p(c_text)
    P_f, n_f = hand_p(c_text + wp * c_facts)
    assert np.abs(P_f - P_text).max() > 0.02  # the facts move the null space
    prepared = methods.get("alphaedit").prepare(ctx, ("h.1",))
    info = prepared.info["project_facts"]
    assert (info["facts"], info["weight"]) == (3, wp)
    assert info["kernels"][w.path]["null_dim_text"] == n_text and info["kernels"][w.path]["null_dim"] == n_f
    share = wp * np.trace(c_facts) / (np.trace(c_text) + wp * np.trace(c_facts))
    np.testing.assert_allclose(info["kernels"][w.path]["facts_trace_share"], share, rtol=1e-4)
    # the absolute threshold (in C''s widest relative eigengap above its near-zero cluster, so the cut is
    # well defined): the facts can only take directions out of the null space
    ev = np.linalg.eigvalsh(c_text + wp * c_facts)
    i = max((j for j in range(len(ev) - 1) if ev[j] > 1e-4 * ev[-1]), key=lambda j: ev[j + 1] / ev[j])
    thr = float(np.sqrt(ev[i] * ev[i + 1]))
    got, tinfo = facts_projections(model, (w,), stats, facts, wp, energy, thr)
    want, n_thr = hand_p(c_text + wp * c_facts, thr)
    np.testing.assert_allclose(got[w.path], want, atol=2e-4)
    assert tinfo["kernels"][w.path]["null_dim"] == n_thr <= tinfo["kernels"][w.path]["null_dim_text"] == hand_p(c_text, thr)[1]

    p0 = model.params
    d1 = _np_alphaedit_update(model, w, editor_config(cfg).value, P_f, l2)
    Kf = np.stack([np.asarray(compute_key(model, p0, w, q.prompt, q.subject)[0], np.float64) for q in facts], 1)
    want_d = d1(p0, reqs[:2], wf * Kf @ Kf.T)
    from salem_jax.baselines.locate_edit import out_in
    got_d = out_in(prepared.edit(p0, rows[:2]), w) - out_in(p0, w)
    np.testing.assert_allclose(got_d, want_d, rtol=1e-3, atol=1e-3 * np.abs(want_d).max())

    for bad in (-1.0, float("nan")):
        cfg.locate_edit.alpha_project_facts_weight = bad
        with pytest.raises(ValueError, match="alpha_project_facts_weight=.*: give a finite number >= 0"):
            methods.get("alphaedit").check(ctx)
    cfg.locate_edit.alpha_project_facts_weight = 1.0
    with pytest.raises(ValueError, match=r"alpha_project_facts_weight=1 its projector\); emmet has none"):
        methods.get("emmet").prepare(ctx, ("h.1",))
    cfg.locate_edit.alpha_preserve_facts, cfg.locate_edit.alpha_preserve_weight = "", 1.0
    with pytest.raises(ValueError, match="alpha_project_facts_weight=1 puts the seeded country facts' keys into "
                                         "AlphaEdit's projector, but no facts are seeded"):
        methods.get("alphaedit").check(ctx)


# --------------------------------------------------------------------------- edit until reached (issue 16)

def test_alphaedit_continues_the_state_of_any_recent_output(tmp_path, monkeypatch):
    """edit(p, rows) continues the state of the call that returned p, also when p is not the latest
    output (`mend.retry.edit_until_reached` hands back an earlier edit when a retry does not reach more
    rows, and the next batch is edited on it): equal to the editor called by hand with that call's state."""
    model, cfg, prepared, stats, rows, reqs = _batch_setup(tmp_path, monkeypatch, ("alphaedit",), alpha_energy=0.5)
    from salem_jax.baselines.editors import get_editor
    from salem_jax.methods.locate_edit import editor_config

    edit = prepared["alphaedit"].edit
    p1 = edit(model.params, rows[:1])
    edit(p1, rows[1:2])  # a later output: p1 is no longer the latest
    p3 = edit(p1, rows[2:3])
    fn, ec = get_editor("alphaedit"), editor_config(cfg)
    o1 = fn(model, model.params, reqs[:1], layers=("h.1",), stats=stats, config=ec, progress=False)
    o3 = fn(model, o1.params, reqs[2:3], layers=("h.1",), stats=stats, config=ec, state=o1.state, progress=False)
    o3_fresh = fn(model, o1.params, reqs[2:3], layers=("h.1",), stats=stats, config=ec, progress=False)
    path = "transformer/h/1/mlp/c_proj/kernel"
    k = lambda p: np.asarray(get_path(p, path), np.float64)  # noqa: E731
    np.testing.assert_allclose(k(p3), k(o3.params), rtol=1e-5, atol=1e-7)
    assert np.abs(k(o3.params) - k(o3_fresh.params)).max() > 1e-6  # the state matters here


# the numpy case in the slow suite (issue 14, make test <= 5 min): its give-up rule is make test's in
# test_mend_retry.py, the state of an earlier output in test_alphaedit_continues_the_state_of_any_recent_output
@pytest.mark.parametrize("check", [pytest.param("numpy", marks=pytest.mark.slow), "second_try"])
def test_alphaedit_retries_equal_a_hand_loop_with_the_state_carried(tmp_path, monkeypatch, check):
    """config.locate_edit.retries R: after a batch, the rows whose own prompt misses its target are edited
    again on the edited weights with the editor's state carried on, at most R more times; the earliest
    edit reaching the most rows comes back, and the next batch continues the state of the edit kept.
    Against the editor called by hand. check "numpy": the real check (`mend.retry.reached`) against
    numpy on the full logits - here every retry is tried and none reaches (the kept edit is the first
    one, whose state the next batch must continue, not the last retry's); "second_try": the check
    replaced by one that misses every row until its batch's second check, so the first retry is kept
    and the next batch continues the retry's state."""
    from test_mend_retry import _hand_reached

    from salem_jax.baselines.editors import get_editor
    from salem_jax.methods.locate_edit import editor_config
    from salem_jax.mend import retry

    R = 2
    model, cfg, prepared, stats, rows, reqs = _batch_setup(tmp_path, monkeypatch, ("alphaedit",), alpha_energy=0.5,
                                                           retries=R)
    fn, ec = get_editor("alphaedit"), editor_config(cfg)
    if check == "second_try":
        seen: dict[tuple, int] = {}

        def forced(model, params, rs):  # edit_until_reached checks every row of its batch each time
            key = tuple(r["id"] for r in rs)
            seen[key] = seen.get(key, 0) + 1
            return np.full(len(rs), seen[key] >= 2)

        monkeypatch.setattr(retry, "reached", forced)
        is_reached = None
    else:
        is_reached = lambda params, i: _hand_reached(model, params, rows[i])  # noqa: E731

    def hand(params, state, idx):
        out = fn(model, params, [reqs[i] for i in idx], layers=("h.1",), stats=stats, config=ec, state=state, progress=False)
        best, tried = None, 1
        while True:
            ok = [is_reached(out.params, i) if is_reached else tried >= 2 for i in idx]
            if best is None or sum(ok) > best[2]:
                best = (out, tried, sum(ok))
            if all(ok) or tried > R:
                return best[0], best[1], tried
            out = fn(model, out.params, [reqs[i] for i, o in zip(idx, ok) if not o], layers=("h.1",), stats=stats,
                     config=ec, state=out.state.copy(), progress=False)  # the editor changes a state in place
            tried += 1

    h1, n1, t1 = hand(model.params, None, [0, 1])
    h2, n2, t2 = hand(h1.params, h1.state.copy(), [2, 3])
    edit = prepared["alphaedit"].edit
    p1 = edit(model.params, rows[:2])
    p2 = edit(p1, rows[2:])
    path = "transformer/h/1/mlp/c_proj/kernel"
    k = lambda p: np.asarray(get_path(p, path), np.float64)  # noqa: E731
    np.testing.assert_allclose(k(p1), k(h1.params), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(k(p2), k(h2.params), rtol=1e-5, atol=1e-7)
    log = prepared["alphaedit"].info["edit_retries"]
    assert log["max"] == R and log["option"] == "config.locate_edit.retries"
    assert log["applications"] == [n1, n2] and log["tried"] == [t1, t2]
    # the case each check is for: retries tried and none kept / the first retry kept
    assert (n1, t1, n2, t2) == ((1, 3, 1, 3) if check == "numpy" else (2, 2, 2, 2))
