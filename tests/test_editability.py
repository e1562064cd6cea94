"""The editability score (salem_jax.locate.editability) against a hand computation on a tiny model."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from salem_jax.data.tokenize import encode
from salem_jax.locate import editability as ED
from salem_jax.locate.choose import LocateConfig, locate
from salem_jax.losses import example_nll
from salem_jax.models import hf, llama
from salem_jax.models.base import get_path, set_path

CAPS = [("france", "paris"), ("peru", "lima"), ("japan", "tokyo"), ("chile", "santiago"), ("kenya", "nairobi"),
        ("spain", "madrid"), ("italy", "rome"), ("egypt", "cairo")]


def rows():
    out = []
    for i, (c, t) in enumerate(CAPS[:5]):
        out.append(dict(id=f"f{i}", record_id=f"r{i}", group="fail", prompt=f"the capital of {c} is", target=t))
        out.append(dict(id=f"a{i}", record_id=f"r{i}", group="adapt", prompt=f"which city is the capital of {c}", target=t))
    for i, (c, t) in enumerate(CAPS[5:]):
        out.append(dict(id=f"p{i}", record_id=f"q{i}", group="pass", prompt=f"the capital of {c} is", target=t))
    return out


@pytest.fixture(scope="module")
def model():
    return hf.tiny("gpt2")


def hand_profile(model, rs, cfg, names):
    """fixed / spill per (layer, lr, probe) from jax.grad of each probe's NLL on the layer's kernels
    (normalize=False: the identity editor's pseudo-gradient is the plain gradient), numpy argmax."""
    pr = ED.choose_rows(rs, cfg)
    fixed = np.zeros((len(names), len(cfg.lrs), len(pr.probes)))
    spill = np.zeros_like(fixed)
    enc = lambda rr: encode(model, [r["prompt"] for r in rr], [r["target"] for r in rr])  # noqa: E731
    # model.apply and the gradient jitted (one compilation per batch shape / layer, instead of one
    # per small op): the same functions, so still independent of editability's probe
    apply = jax.jit(model.apply)
    logits = lambda p, b: np.asarray(apply(p, {k: jnp.asarray(v) for k, v in b.items()}))  # noqa: E731

    @functools.partial(jax.jit, static_argnums=0)
    def grad(paths, ws, b):
        def loss(ws):
            q = model.params
            for path, w in zip(paths, ws):
                q = set_path(q, path, w)
            return example_nll(model.apply(q, b), b["labels"], b["label_mask"]).sum()

        return jax.grad(loss)(ws)

    for i, (p, ad, qs) in enumerate(zip(pr.probes, pr.adapts, pr.passes)):
        eb, pb, fb = enc([p] + ad), enc(qs), enc([p])
        base_pass = logits(model.params, pb).argmax(-1)
        for li, name in enumerate(names):
            paths = tuple(w.path for w in model.layers.weights([name], "mlp"))
            ws = [get_path(model.params, path) for path in paths]
            g = grad(paths, ws, {k: jnp.asarray(v) for k, v in fb.items()})
            for j, lr in enumerate(cfg.lrs):
                q = model.params
                for path, w, gw in zip(paths, ws, g):
                    q = set_path(q, path, w - lr * gw)
                am = logits(q, eb).argmax(-1)
                m = eb["label_mask"].astype(bool)
                fixed[li, j, i] = np.mean([np.all(am[r][m[r]] == eb["labels"][r][m[r]]) for r in range(len(am))])
                pm = pb["label_mask"].astype(bool)
                spill[li, j, i] = ((logits(q, pb).argmax(-1) != base_pass) & pm).sum() / pm.sum()
    return fixed, spill


def test_score_equals_hand_computation(model):
    cfg = ED.EditabilityConfig(lrs=(1.0, 30.0), probes=3, adapt_per_edit=1, pass_per_edit=2, normalize=False,
                               spill_weight=0.5)
    names = model.layers.names()
    prof = ED.editability_profile(model, rows(), config=cfg)
    fixed, spill = hand_profile(model, rows(), cfg, names)
    np.testing.assert_allclose(prof.extra["per_probe"]["fixed"], fixed)
    np.testing.assert_allclose(prof.extra["per_probe"]["spill"], spill)
    grid = fixed.mean(-1) - 0.5 * spill.mean(-1)
    np.testing.assert_allclose(prof.scores["fail"], grid.max(-1), atol=1e-12)
    assert prof.chosen == (names[int(np.argmax(grid.max(-1)))],)
    assert prof.extra["best_lr"] == [cfg.lrs[int(b)] for b in grid.argmax(-1)]
    # the grid is not trivial: some lr edits something and some lr changes pass tokens
    assert fixed.max() > 0 and spill.max() > 0


@pytest.mark.slow  # the hand computation runs op by op: minutes on 2 shared cores
@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_skipped_blocks_and_low_rank_edit_equal_hand_computation(arch):
    """The probe runs only the blocks from the edited one on (earlier blocks' base outputs are
    reused) and edits through a low-rank correction of the module output; on a decoder-only
    Llama and an encoder-decoder T5 (whose decoder blocks run after every encoder block) the
    shares equal rebuilding the weights and running the whole model (hand computation)."""
    m = llama.tiny_llama(seed=1) if arch == "llama" else hf.tiny(arch, seed=1)
    names = m.layers.names()[-2:] if arch == "t5" else m.layers.names()
    cfg = ED.EditabilityConfig(lrs=(30.0,), probes=2, adapt_per_edit=1, pass_per_edit=2, normalize=False)
    prof = ED.editability_profile(m, rows(), layers=names, config=cfg)
    fixed, spill = hand_profile(m, rows(), cfg, names)
    np.testing.assert_allclose(prof.extra["per_probe"]["fixed"], fixed)
    np.testing.assert_allclose(prof.extra["per_probe"]["spill"], spill)
    assert spill.max() > 0 or fixed.max() > 0


def test_warm_statistics_standardise_the_step(model):
    """normalize=True: the step is along the standardised factors; with different warm rows the
    statistics, and hence (generically) the scores, differ, and every score is a valid share."""
    a = ED.editability_profile(model, rows(), config=ED.EditabilityConfig(lrs=(1.0,), warm=2, probes=2, seed=0))
    b = ED.editability_profile(model, rows(), config=ED.EditabilityConfig(lrs=(1.0,), warm=3, probes=2, seed=0))
    for p in (a, b):
        assert all(0.0 <= x <= 1.0 for x in p.scores["fixed"]) and all(0.0 <= x <= 1.0 for x in p.scores["spill"])
    assert a.examples["warm"] == 2 and b.examples["warm"] == 3


def test_locate_dispatches_and_bad_input(model):
    cfg = LocateConfig(probe=ED.EditabilityConfig(lrs=(1.0,), probes=2, normalize=False))
    prof = locate(model, rows(), "editability", cfg, progress=False)
    assert prof.method == "editability" and len(prof.layers) == len(model.layers.names())
    with pytest.raises(KeyError):
        locate(model, rows(), "editability", LocateConfig(layers=("h.99",), probe=cfg.probe), progress=False)
    with pytest.raises(ValueError, match="unknown locate method"):
        locate(model, rows(), "editabilty", cfg, progress=False)
    with pytest.raises(ValueError, match="warm"):
        ED.editability_profile(model, rows(), config=ED.EditabilityConfig(warm=5, probes=2))
    with pytest.raises(ValueError, match="pass"):
        ED.editability_profile(model, [r for r in rows() if r["group"] != "pass"],
                               config=ED.EditabilityConfig(normalize=False))


def test_scored_rows_cut_to_their_longest_length_give_the_full_length_scores(model, monkeypatch):
    """The base and probe passes run on the scored rows cut to their longest length (`_trimmed`),
    shorter than the bucket the rows (and the probes' factors) are padded to; every share equals
    the same profile computed at the full padded length (the old path: `_trimmed` a no-op)."""
    long_warm = dict(id="fw", record_id="rw", group="fail", target="madrid",
                     prompt="the capital of the country that lies in the south of europe and speaks spanish is")
    rs = rows() + [long_warm]
    cfg = ED.EditabilityConfig(lrs=(1.0, 30.0), warm=3, probes=3, adapt_per_edit=1, pass_per_edit=2, seed=1)
    lengths = []
    real_probe = ED._probe

    def spy(*args):
        lengths.append(args[11]["input_ids"].shape[1])  # the probe's batch
        return real_probe(*args)

    monkeypatch.setattr(ED, "_probe", spy)
    new = ED.editability_profile(model, rs, config=cfg)
    cut = set(lengths)
    monkeypatch.setattr(ED, "_trimmed", lambda model, enc, rows: enc)
    lengths.clear()
    old = ED.editability_profile(model, rs, config=cfg)
    full = set(lengths)
    assert len(cut) == 1 and len(full) == 1 and max(cut) < min(full), (cut, full)
    for k in ("fixed", "spill"):
        np.testing.assert_array_equal(np.asarray(new.extra["per_probe"][k]), np.asarray(old.extra["per_probe"][k]))
    assert new.scores == old.scores and new.chosen == old.chosen
    grid = np.asarray(new.extra["per_probe"]["fixed"])
    assert grid.max() > 0 and np.asarray(new.extra["per_probe"]["spill"]).max() > 0
