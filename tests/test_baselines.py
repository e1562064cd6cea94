"""FT and FT+KL: they change only the weights they claim to and learn tiny synthetic facts."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from salem_jax import losses
from salem_jax.baselines import finetune as FT
from salem_jax.data.tokenize import encode
from salem_jax.eval import metrics as M
from salem_jax.models import hf
from salem_jax.models.base import param_paths, get_path

FACTS = [("the capital of france is", "tokyo"), ("the capital of peru is", "cairo"), ("the language of chile is", "yen")]
LOC = ["the capital of spain is madrid", "which river lies in egypt", "red blue green yellow", "one two three four"]


@pytest.fixture(scope="module")
def setup():
    model = hf.tiny("gpt2", seed=1)
    edit = encode(model, [p for p, _ in FACTS], [t for _, t in FACTS], length=16)
    # locality inputs: the whole text counts for the KL; labels unused there
    loc = encode(model, [t.rsplit(" ", 1)[0] for t in LOC], [t.rsplit(" ", 1)[1] for t in LOC], length=16)
    weights = model.layers.weights(["h.1"])  # c_fc and c_proj of block 1
    return model, edit, loc, weights


def _leaves(params):
    return dict(zip(param_paths(params), jax.tree.leaves(params)))


def _check_only(base, new, changed_paths):
    b, n = _leaves(base), _leaves(new)
    assert b.keys() == n.keys()
    for p in b:
        if p in changed_paths:
            assert not np.array_equal(np.asarray(b[p]), np.asarray(n[p])), f"{p} did not change"
        else:
            assert np.array_equal(np.asarray(b[p]), np.asarray(n[p])), f"{p} changed"


def _ea(model, params, facts):
    rows = [{"prompt": p, "target": t} for p, t in facts]
    return M.accuracy(M.score_rows(model, params, rows, progress=False)["correct"])


def _kl(model, params, loc):
    return float(losses.kl_divergence(model.apply(model.params, loc), model.apply(params, loc), FT.position_mask(loc)))


def test_ft_learns_facts_and_changes_only_chosen_weights(setup):
    model, edit, _, weights = setup
    before = jax.tree.map(np.array, model.params)
    assert _ea(model, model.params, FACTS) == 0.0
    hist: list = []
    new = FT.finetune(model, model.params, weights, edit, config=FT.FTConfig(steps=40, lr=1e-2), progress=False,
                      history=hist)
    assert _ea(model, new, FACTS) == 1.0
    assert hist[-1] < hist[0] and len(hist) == 40
    _check_only(model.params, new, {w.path for w in weights})
    # the base parameters are untouched
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), model.params, before)


def test_ft_kl_keeps_locality_closer(setup):
    model, edit, loc, weights = setup
    cfg = FT.FTConfig(steps=40, lr=1e-2)
    ft = FT.finetune(model, model.params, weights, edit, config=cfg, progress=False)
    ftkl = FT.finetune_kl(model, model.params, weights, edit, loc, config=FT.FTConfig(steps=60, lr=1e-2, kl_weight=3.0),
                          progress=False)
    assert _ea(model, ftkl, FACTS) == 1.0
    _check_only(model.params, ftkl, {w.path for w in weights})
    assert _kl(model, ftkl, loc) < 0.5 * _kl(model, ft, loc)


def test_ft_single_weight_and_max_change(setup):
    model, edit, _, weights = setup
    w = weights[1]  # c_proj only
    new = FT.finetune(model, model.params, [w.path], edit, config=FT.FTConfig(steps=5, lr=1e-2, max_change=3e-3),
                      progress=False)
    _check_only(model.params, new, {w.path})
    diff = np.abs(np.asarray(get_path(new, w.path)) - np.asarray(get_path(model.params, w.path)))
    assert diff.max() <= 3e-3 + 1e-7 and diff.max() > 1e-3


def test_ft_errors(setup):
    model, edit, _, weights = setup
    with pytest.raises(ValueError, match="at least one weight"):
        FT.finetune(model, model.params, [], edit, progress=False)
    with pytest.raises(KeyError, match="no parameter"):
        FT.finetune(model, model.params, ["transformer/h/9/mlp/c_fc/kernel"], edit, progress=False)
    with pytest.raises(ValueError, match="loc_batch"):
        FT.finetune(model, model.params, weights, edit, config=FT.FTConfig(kl_weight=1.0), progress=False)
    with pytest.raises(ValueError, match="kl_weight > 0"):
        FT.finetune_kl(model, model.params, weights, edit, edit, config=FT.FTConfig(), progress=False)
