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


def test_alphaedit_continues_its_state_only_on_its_own_output(tmp_path):
    """The many-edits study's sequential mode calls edit(previous output, rows): AlphaEdit must
    then continue with the earlier edits' keys (its sequential memory); on any other parameters
    (the base weights, a copy) it starts afresh. Compared with the editor called by hand."""
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
