"""The brute-force sweep oracle and the rank statistics that compare scorers with it."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from salem_jax.data.tokenize import encode
from salem_jax.locate import rank as R
from salem_jax.locate import sweep as SW
from salem_jax.losses import batch_nll
from salem_jax.models import hf
from salem_jax.models.base import get_path, param_paths, set_path

EDITS = (["the capital of france is", "the capital of peru is"], ["lima", "paris"])
REPHRASES = (["what city is the capital of france", "which city is the capital of peru"], ["lima", "paris"])
KEEP = (["the capital of japan is", "the capital of chile is", "the capital of kenya is"], ["tokyo", "santiago", "nairobi"])
LR, STEPS = 3e-2, 4


@pytest.fixture(scope="module")
def tiny():
    m = hf.tiny("gpt2")
    return m, encode(m, *EDITS), encode(m, *REPHRASES), encode(m, *KEEP)


@pytest.fixture(scope="module")
def swept(tiny):
    m, e, r, k = tiny
    cfg = SW.SweepConfig(learning_rates=(1e-3, LR), steps=STEPS, drawdown_budget=0.5)
    return SW.sweep_layers(m, m.params, e, rephrases=r, keep=k, config=cfg)


@functools.partial(jax.jit, static_argnums=(0,))
def _logits(apply, params, batch):
    return apply(params, batch)


def hand_correct(model, params, batch):
    """Whole target right under teacher forcing, in numpy."""
    am = np.asarray(_logits(model.apply, params, {k: jnp.asarray(v) for k, v in batch.items()})).argmax(-1)
    m = batch["label_mask"].astype(bool)
    return np.asarray([np.all(am[i][m[i]] == batch["labels"][i][m[i]]) for i in range(len(am))]), am


def test_finetune_changes_only_that_layer_and_equals_optax_adam(tiny):
    m, e, _, _ = tiny
    before = jax.tree.map(np.array, m.params)
    new, losses = SW.finetune_layer(m, m.params, "h.1", e, lr=LR, steps=STEPS)
    changed = [p for p in param_paths(m.params) if not np.array_equal(get_path(new, p), get_path(m.params, p))]
    assert sorted(changed) == ["transformer/h/1/mlp/c_fc/kernel", "transformer/h/1/mlp/c_proj/kernel"]
    for p in param_paths(before):  # the base weights are never modified in place
        np.testing.assert_array_equal(get_path(m.params, p), get_path(before, p))
    assert losses[-1] < losses[0]

    # independent: optax.adam on the two kernels, one step at a time
    paths = ["transformer/h/1/mlp/c_fc/kernel", "transformer/h/1/mlp/c_proj/kernel"]
    batch = {k: jnp.asarray(v) for k, v in e.items()}

    @jax.jit
    def grad(tr):
        def loss(tr):
            p = m.params
            for q in paths:
                p = set_path(p, q, tr[q])
            return batch_nll(m.apply(p, batch), batch["labels"], batch["label_mask"])

        return jax.value_and_grad(loss)(tr)

    opt = optax.adam(LR)
    tr = {q: get_path(m.params, q) for q in paths}
    st = opt.init(tr)
    hand_losses = []
    for _ in range(STEPS):
        loss, g = grad(tr)
        hand_losses.append(float(loss))
        upd, st = opt.update(g, st, tr)
        tr = optax.apply_updates(tr, upd)
    for q in paths:
        np.testing.assert_allclose(get_path(new, q), tr[q], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(losses, hand_losses, rtol=1e-4)


def test_sweep_metrics_against_hand_check(tiny, swept):
    m, e, r, k = tiny
    assert swept.layers == ("h.0", "h.1")
    assert len(swept.outcomes) == 4 and swept.train_steps == 4 * STEPS
    assert swept.compiles <= 2  # at most one per layer (h.1 may be cached by an earlier test)
    again = SW.sweep_layers(m, m.params, e, keep=k, layers=["h.0"], config=SW.SweepConfig((LR,), STEPS))
    assert again.compiles == 0  # the compilation is shared across learning rates and calls
    same_run = next(o for o in swept.outcomes if o.layer == "h.0" and o.lr == LR)
    np.testing.assert_allclose(again.outcomes[0].losses, same_run.losses, rtol=1e-6)
    base_ok, base_am = hand_correct(m, m.params, k)
    assert swept.pass_acc_before == pytest.approx(base_ok.mean())
    for o in swept.outcomes:
        new, _ = SW.finetune_layer(m, m.params, o.layer, e, lr=o.lr, steps=STEPS)
        ea, _ = hand_correct(m, new, e)
        ra, _ = hand_correct(m, new, r)
        ok, am = hand_correct(m, new, k)
        mask = k["label_mask"].astype(bool)
        same = (am == base_am) & mask
        np.testing.assert_array_equal(o.edit_correct, ea)
        np.testing.assert_array_equal(o.rephrase_correct, ra)
        assert o.edit_acc == pytest.approx(ea.mean())
        assert o.locality == pytest.approx(same.sum() / mask.sum())
        assert o.drawdown == pytest.approx(1 - same.sum() / mask.sum())
        s = o.summary(swept.pass_acc_before)
        assert s["pass_acc_drop"] == pytest.approx(base_ok.mean() - ok.mean())
    prof = swept.to_profile()
    assert prof.method == "sweep" and prof.chosen == (swept.ranking()[0],)
    assert prof.examples == {"fail": 2, "adapt": 2, "pass": 3}


def _outcome(layer, lr, ea, ra, unchanged, tokens=10):
    n = 10
    return SW.LayerOutcome(
        layer, lr,
        edit_correct=np.arange(n) < ea * n,
        rephrase_correct=np.arange(n) < ra * n,
        pass_unchanged=np.asarray([unchanged]), pass_tokens=np.asarray([tokens]),
        pass_correct_after=np.asarray([True]), losses=np.zeros(3),
    )


def test_drawdown_aware_ranking():
    outs = (
        _outcome("l0", 1e-3, 0.5, 0.5, 10),  # within budget, acc 0.5
        _outcome("l1", 1e-3, 1.0, 1.0, 5),  # best EA but drawdown 0.5: over budget
        _outcome("l1", 1e-4, 0.2, 0.2, 10),  # l1's lr within budget: acc 0.2
        _outcome("l2", 1e-3, 0.9, 0.7, 9),  # within budget, acc 0.8
        _outcome("l3", 1e-3, 0.5, 0.5, 10),  # ties with l0
    )
    res = SW.SweepResult(("l0", "l1", "l2", "l3"), SW.SweepConfig(drawdown_budget=0.1), outs, 1.0, 0.0, 0, 0)
    assert res.best("l1").lr == 1e-4  # the over-budget run loses to the within-budget one
    assert res.ranking() == ("l2", "l0", "l3", "l1")
    np.testing.assert_allclose(res.oracle_scores(), [-1.5, -3.0, 0.0, -1.5])  # ties share a rank
    loose = SW.SweepResult(res.layers, SW.SweepConfig(drawdown_budget=0.6), outs, 1.0, 0.0, 0, 0)
    assert loose.ranking()[0] == "l1"  # with a loose budget EA+RA decides


def test_spearman_and_positions():
    assert R.spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)  # 1 - 6*2/(4*15)
    assert R.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    np.testing.assert_allclose(R.rankdata([3.0, 1.0, 3.0, 2.0]), [3.5, 1.0, 3.5, 2.0])
    # with ties: the Pearson correlation of average ranks, written out
    a, b = np.array([1.0, 2.0, 2.0, 4.0, 5.0]), np.array([2.0, 1.0, 4.0, 3.0, 3.0])
    ra, rb = np.array([1, 2.5, 2.5, 4, 5]), np.array([2, 1, 5, 3.5, 3.5])
    assert R.spearman(a, b) == pytest.approx(np.corrcoef(ra, rb)[0, 1])
    assert np.isnan(R.spearman([1, 1, 1], [1, 2, 3]))
    assert R.position_in(("h.2", "h.0", "h.1"), "h.1") == 3
    with pytest.raises(KeyError):
        R.position_in(("h.0",), "h.5")


def test_compare_to_sweep_bootstrap(swept):
    oracle = R.sweep_resampler(swept)
    perfect = R.compare_to_sweep(
        "oracle", swept.oracle_scores(), swept.layers, swept, resample=lambda fi, pi: oracle(fi, None, pi), n_boot=50
    )
    if np.isfinite(perfect.spearman):
        assert perfect.spearman == pytest.approx(1.0)
    assert perfect.top_choice_position == 1 and perfect.sweep_best == swept.ranking()[0]
    rev = R.compare_to_sweep("reversed", -swept.oracle_scores(), list(swept.layers), swept, n_boot=20)
    assert rev.top_choice_position == len(swept.layers) or np.isnan(rev.spearman)
    with pytest.raises(ValueError, match="no score for swept layers"):
        R.compare_to_sweep("x", [0.0], ["h.0"], swept)


def test_bad_input(tiny):
    m, e, _, k = tiny
    with pytest.raises(ValueError, match="empty batch"):
        SW.sweep_layers(m, m.params, {kk: v[:0] for kk, v in e.items()})
    with pytest.raises(KeyError, match="unknown layer 'h.4'"):
        SW.sweep_layers(m, m.params, e, layers=["h.4"])
    with pytest.raises(KeyError, match="unknown layer"):
        SW.finetune_layer(m, m.params, "mlp.1", e)
    long = {kk: np.zeros((1, m.max_length + 2), np.int32) for kk in e}
    with pytest.raises(ValueError, match="longer than the context"):
        SW.sweep_layers(m, m.params, long)
    bad = {kk: v.copy() for kk, v in k.items()}
    bad["label_mask"][2] = 0
    with pytest.raises(ValueError, match="keep: row 2 has no target tokens"):
        SW.sweep_layers(m, m.params, e, keep=bad)
