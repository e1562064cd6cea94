"""The MEND layer-set oracle (salem_jax.locate.mend_sweep) against training each set by hand."""

import dataclasses
import tempfile
from pathlib import Path

import jax
import numpy as np
import pytest

from salem_jax import parallel
from salem_jax.locate import mend_sweep as MS
from salem_jax.mend.capture import capture
from salem_jax.mend.editor import edited_params
from salem_jax.mend.train import TrainConfig, prepare_splits, train_editor, val_batches
from salem_jax.models import hf
from tests.test_mend_train import COUNTRIES, synthetic_rows

SETS = [("h.0",), ("h.1",), ("h.0", "h.1")]


@pytest.fixture(scope="module")
def setup():
    model = hf.tiny("gpt2")
    data = prepare_splits(model, {"train": synthetic_rows(model, COUNTRIES[:6], 0, "tr"),
                                  "val": synthetic_rows(model, COUNTRIES[6:10], 1, "va")})
    cfg = TrainConfig.tiny(batch_size=2, max_steps=4, val_every=2, checkpoint_every=2, log_every=2, seed=3)
    mesh = parallel.data_mesh(jax.devices()[:1])
    return model, data, cfg, mesh


def hand_locality(model, hand, data):
    """Per val group (unchanged pass target tokens, pass target tokens), by hand: the hand-trained
    editor's edit from each group's fail rows alone (capture on the base model, then
    edited_params), the whole model run on the group's pass rows before and after, argmaxes
    compared in numpy at the label_mask positions."""
    edit = jax.jit(lambda b: edited_params(hand.spec, hand.params, hand.norm, model.params,
                                           capture(model.apply, model.params, b, hand.spec.weights)[1]))
    keys = ("input_ids", "attention_mask", "labels", "label_mask")
    out = []
    for b in val_batches(data["val"], hand.config.resolved(1)):
        for g in np.flatnonzero(np.asarray(b["weight"]) > 0):
            fail = {k: np.asarray(b["fail"][k][g]) for k in keys if k in b["fail"]}
            rows = {k: np.asarray(b["pass"][k][g]) for k in keys if k in b["pass"]}
            before = np.argmax(np.asarray(model.apply(model.params, rows)), -1)
            after = np.argmax(np.asarray(model.apply(edit(fail), rows)), -1)
            m = np.asarray(rows["label_mask"]) == 1
            out.append(((before == after)[m].sum(), m.sum()))
    return np.asarray(out, float)


@pytest.mark.slow  # trains six tiny editors: minutes under load
def test_sweep_equals_training_each_set_by_hand(setup):
    model, data, cfg, mesh = setup
    with tempfile.TemporaryDirectory() as d:
        sc = MS.MendSweepConfig(seconds_per_step=0.01, budget_seconds=60, n_boot=50, drawdown_budget=0.5)
        res = MS.mend_sweep(model, data, SETS, cfg, Path(d) / "sweep", config=sc, mesh=mesh, say=lambda s: None)
        for s, row in zip(SETS, res.rows):
            hand = train_editor(model, data, model.layers.weights(list(s)), cfg, Path(d) / ("hand-" + "-".join(s)),
                                mesh=mesh, progress=False)
            assert row["steps"] == hand.step == 4
            # the sweep's editor is the hand-trained one: its per-group evaluation averages to the
            # hand run's last validation
            assert row["edit_acc"] == pytest.approx(hand.last_val["edit_acc"], abs=1e-9)
            assert row["adapt_acc"] == pytest.approx(hand.last_val["adapt_acc"], abs=1e-9)
            assert row["drawdown"] == pytest.approx(hand.last_val["drawdown"], abs=1e-9)
            # the KL is a float32 mean over rows that the sweep's per-group evaluation and the
            # hand run's validation (base side kept across validations) compute in other batch
            # shapes: rounding, seen 1.2e-5 relative on a KL of 6e-4
            assert row["kl"] == pytest.approx(hand.last_val["kl"], rel=1e-4, abs=1e-9)
            assert [c["step"] for c in row["curve"]] == [2, 4]
            assert row["curve"][-1]["edit_acc"] == pytest.approx(hand.last_val["edit_acc"])
            lo, hi = row["edit_acc_ci"]
            assert lo <= row["edit_acc"] + 1e-9 and row["edit_acc"] <= hi + 1e-9
            # locality: the same edits' pass-row argmaxes, compared by hand over whole-model runs
            loc = hand_locality(model, hand, data)
            np.testing.assert_array_equal(np.c_[row["per_group"]["pass_unchanged"], row["per_group"]["pass_tokens"]], loc)
            assert row["locality"] == pytest.approx(loc[:, 0].sum() / loc[:, 1].sum(), abs=1e-12)
            assert row["locality_ci"][0] <= row["locality"] + 1e-9 <= row["locality_ci"][1] + 2e-9
        # the ranking, by hand: within the budget first, then accuracy, then less drawdown
        keys = [(r["drawdown"] <= 0.5, r["edit_acc"], -r["drawdown"]) for r in res.rows]
        assert list(res.ranking) == sorted(range(3), key=lambda i: keys[i], reverse=True)
        assert res.position(res.best()) == 1
        two = res.ranking.index(2) + 1  # ("h.0", "h.1")'s rank; a set is found in any order
        assert res.position(("h.1", "h.0")) == res.position(("h.0", "h.1")) == two
        assert res.position(("h.1", "h.2")) is None
        assert sorted(r["rank"] for r in res.rows) == [1, 2, 3]
        # a locality floor above every set's locality puts all out of budget: the order is by accuracy alone
        floor = MS.mend_sweep(model, data, SETS, cfg, Path(d) / "sweep", mesh=mesh, say=lambda s: None,
                              config=dataclasses.replace(sc, locality_floor=1.01))  # resumes: no training
        keys = [(False, r["edit_acc"], -r["drawdown"]) for r in res.rows]
        assert list(floor.ranking) == sorted(range(3), key=lambda i: keys[i], reverse=True)
        # stop_after_seconds: the first set always runs, later ones only if the mean time per set fits
        cut = MS.mend_sweep(model, data, SETS, cfg, Path(d) / "sweep", mesh=mesh, say=lambda s: None,
                            config=dataclasses.replace(sc, stop_after_seconds=1e-9))
        assert cut.layer_sets == (SETS[0],) and cut.skipped == tuple(SETS[1:])
        assert cut.rows[0]["edit_acc"] == res.rows[0]["edit_acc"] and cut.to_dict()["skipped"] == [list(s) for s in SETS[1:]]


def test_bad_input_is_refused_before_training(setup):
    model, data, cfg, mesh = setup
    with tempfile.TemporaryDirectory() as d:
        wd = Path(d) / "sweep"
        with pytest.raises(KeyError):
            MS.mend_sweep(model, data, [("h.7",)], cfg, wd, mesh=mesh)
        with pytest.raises(ValueError, match="repeats"):
            MS.mend_sweep(model, data, [("h.0", "h.0")], cfg, wd, mesh=mesh)
        with pytest.raises(ValueError, match="twice"):
            MS.mend_sweep(model, data, [("h.0", "h.1"), ("h.1", "h.0")], cfg, wd, mesh=mesh)
        big = TrainConfig.tiny(max_steps=1000)
        with pytest.raises(ValueError, match=r"min estimated"):
            MS.mend_sweep(model, data, SETS, big, wd, config=MS.MendSweepConfig(seconds_per_step=1.0, budget_seconds=60),
                          mesh=mesh)
        assert not wd.exists()  # nothing trained in vain


def test_default_layer_sets():
    names = [f"layers.{i}" for i in range(30)]
    sets = MS.default_layer_sets(names, stride=3)
    singles = [s[0] for s in sets if len(s) == 1]
    assert singles == [f"layers.{i}" for i in (0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 29)]
    assert [s for s in sets if len(s) == 3] == [tuple(names[0:3]), tuple(names[13:16]), tuple(names[27:30])]
    assert np.all([len(s) in (1, 3) for s in sets])


def test_contiguous_sets():
    names = [f"layer.{i}" for i in range(6)]
    assert MS.contiguous_sets(names, 3) == [tuple(f"layer.{j}" for j in range(i, i + 3)) for i in range(4)]
    assert MS.contiguous_sets(names, 6) == [tuple(names)]
    with pytest.raises(ValueError):
        MS.contiguous_sets(names, 7)


def test_random_layer_sets_seeded_distinct_and_excluding():
    names = [f"layer.{i}" for i in range(6)]
    contiguous = MS.contiguous_sets(names, 3)
    a = MS.random_layer_sets(names, 3, 2, seed=0, exclude=contiguous)
    assert a == MS.random_layer_sets(names, 3, 2, seed=0, exclude=contiguous)  # deterministic
    # the same draw by hand: default_rng([seed, k]).choice, sorted, the first two not excluded
    rng, want, seen = np.random.default_rng([0, 3]), [], {frozenset(c) for c in contiguous}
    while len(want) < 2:
        s = tuple(names[i] for i in sorted(rng.choice(6, 3, replace=False).tolist()))
        if frozenset(s) not in seen:
            seen.add(frozenset(s))
            want.append(s)
    assert a == want
    assert len({frozenset(s) for s in a}) == 2 and not {frozenset(s) for s in a} & {frozenset(c) for c in contiguous}
    assert all(list(s) == sorted(s, key=names.index) for s in a)  # layer order
    # all 20 triples minus the 4 contiguous: 16 exist, a 17th is refused
    assert len(MS.random_layer_sets(names, 3, 16, seed=1, exclude=contiguous)) == 16
    with pytest.raises(ValueError, match="only 16"):
        MS.random_layer_sets(names, 3, 17, seed=1, exclude=contiguous)
