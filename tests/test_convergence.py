"""benchmarks/convergence.py: the chunked, timed training curve against one uninterrupted run by
hand, and the step-to-threshold / best-loss reading against hand-made curves."""

import math
import tempfile
from pathlib import Path

import jax
import pytest

from benchmarks import convergence as C
from salem_jax import parallel
from salem_jax.mend.train import TrainConfig, prepare_splits, train_editor
from salem_jax.models import hf
from tests.test_mend_train import COUNTRIES, synthetic_rows

KEYS = ("edit_acc", "fail_acc", "adapt_acc", "drawdown", "kl", "loss")


@pytest.mark.slow  # a benchmark's bookkeeping, ~8 s of training runs: the slow suite (make test <= 5 min)
def test_curve_equals_one_uninterrupted_run_by_hand():
    model = hf.tiny("gpt2")
    data = prepare_splits(model, {"train": synthetic_rows(model, COUNTRIES[:6], 0, "tr"),
                                  "val": synthetic_rows(model, COUNTRIES[6:10], 1, "va")})
    mesh = parallel.data_mesh(jax.devices()[:1])
    base = TrainConfig.tiny(batch_size=2, max_steps=60, val_every=20, checkpoint_every=20, log_every=3, seed=3,
                            patience=1)  # patience 1 would stop early: convergence_config turns it off
    cfg = C.convergence_config(base, steps=5, val_every=2)
    assert (cfg.max_steps, cfg.val_every, cfg.checkpoint_every) == (5, 2, 2) and cfg.patience > 5
    layers = ("h.1",)
    with tempfile.TemporaryDirectory() as d:
        # in two calls (to step 2, then on to the end), as the benchmark's round-robin does
        first = C.train_curve(model, data, layers, cfg, Path(d) / "conv", until=2, mesh=mesh, say=lambda s: None)
        assert [c["step"] for c in first] == [2]
        curve = C.train_curve(model, data, layers, cfg, Path(d) / "conv", mesh=mesh, say=lambda s: None)
        # by hand: one uninterrupted train_editor run with the same config and seed
        hand = train_editor(model, data, model.layers.weights(list(layers)), cfg, Path(d) / "hand", mesh=mesh,
                            progress=False)
        hand_val = [r for r in C.MS.read_curve(Path(d) / "hand")]
    assert hand.step == 5
    assert [c["step"] for c in curve] == [c["step"] for c in hand_val] == [2, 4, 5]
    for c, h in zip(curve, hand_val):
        for k in KEYS:
            assert c[k] == pytest.approx(h[k], rel=1e-6, abs=1e-9), (c["step"], k)
    assert curve[0]["edit_acc"] == first[0]["edit_acc"]
    secs = [c["seconds"] for c in curve]
    assert all(s > 0 for s in secs) and secs == sorted(secs)  # cumulative wall time
    assert curve[-1]["edit_acc"] == pytest.approx(hand.last_val["edit_acc"])


def test_first_step_reaching_and_best_loss_from_a_hand_made_curve():
    curve = [
        {"step": 50, "edit_acc": 0.81, "loss": 0.50},
        {"step": 100, "edit_acc": 0.90, "loss": 0.40},  # exactly the threshold counts
        {"step": 150, "edit_acc": 0.89, "loss": 0.30},
        {"step": 200, "edit_acc": 0.95, "loss": 0.30},  # a tie on loss: the earlier step
    ]
    assert C.first_step_reaching(curve, 0.9) == 100
    assert C.first_step_reaching(curve, 0.91) == 200
    assert C.first_step_reaching(curve, 0.96) is None
    assert C.first_step_reaching(list(reversed(curve)), 0.9) == 100  # order does not matter
    assert C.first_step_reaching([{"step": 50, "edit_acc": math.nan}], 0.0) is None
    assert C.best_loss_step(curve) == 150
    assert C.best_loss_step([]) is None
    row = C.summarize(("layers.26",), curve, 0.9)
    assert (row["first_step_reaching"], row["best_loss_step"], row["max_edit_acc"], row["last_edit_acc"]) == (100, 150, 0.95, 0.95)


def test_bad_schedule_is_refused():
    with pytest.raises(ValueError, match="no validation"):
        C.convergence_config(TrainConfig.tiny(), steps=10, val_every=20)
    with pytest.raises(ValueError, match=">= 1"):
        C.convergence_config(TrainConfig.tiny(), steps=0, val_every=1)
