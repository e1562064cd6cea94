"""The editor's training step with the LM head on the target tokens only (mend.train
`with_flat_train`) and the base model's side kept (the fail rows' capture factors,
`with_fail_factors`; the pass rows' base logits at their targets, `with_pass_logits`), issue 14:
the same loss and metrics (and, with the head change alone, the same new state) as the step that
captures, runs a base pass and runs the head at [rows, K]; the run-wide target bound equal to a count over the full batches; the kept
factors and logits equal a capture / full forward pass of each row alone. `train_editor` takes
this path by default (flat_head=True): its tests (test_mend_train, test_mend_from_block,
test_checkpoint, test_sharding) run it."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from salem_jax import sharding
from salem_jax.mend.editor import EditorSpec
from salem_jax.mend.train import (
    FACTOR,
    FLAT,
    FLAT_PASS,
    PASS_LOGITS,
    TrainConfig,
    flat_step_counts,
    flat_step_sizes,
    flat_train_sizes,
    from_block_data,
    init_train_state,
    place_base_params,
    place_state,
    prepare_splits,
    train_batch,
    train_step,
    with_fail_factors,
    with_flat_train,
    with_pass_logits,
)
from salem_jax.mend.capture import capture
from salem_jax.models.llama import tiny_llama
from salem_jax.testing import capital_edit_rows

# targets of 1-3 words, so that K (the most target tokens of any row) exceeds most rows' counts
CITIES = ["paris", "rio de janeiro", "new delhi", "buenos aires", "rome", "addis ababa"]
COUNTRIES = "france brazil india argentina italy ethiopia".split()


@pytest.fixture(scope="module")
def setup():
    model = tiny_llama(seed=5, num_hidden_layers=3)
    # pass rows with 1-3-word targets too, so a pass row's kept logits hold several targets
    extra = [dict(id=f"trx:{c}", record_id=f"trx:{c}", group="pass", prompt=f"a city of {c} is", target=city, label=-1,
                  text_pair="") for c, city in zip(COUNTRIES, CITIES)]
    data = prepare_splits(model, {"train": capital_edit_rows(COUNTRIES, CITIES, "tr") + extra,
                                  "val": capital_edit_rows(COUNTRIES[:2], CITIES[:2], "va")})
    cfg = TrainConfig.tiny(batch_size=2, effective_batch=2, adapt_per_edit=1, pass_per_group=2, max_steps=4,
                           val_every=4, checkpoint_every=4, log_every=1).resolved(1)
    mesh = sharding.make_mesh(1, 1, jax.devices()[:1])
    return model, data, cfg, mesh, place_base_params(model, model.params, mesh)


def test_flat_train_sizes_are_the_most_targets_of_any_group(setup):
    model, data, cfg, _, _ = setup
    cfg = dataclasses.replace(cfg, adapt_per_edit=2, pass_per_group=3)
    steps = 7
    want_e = want_p = 0
    for s in range(steps):  # count on the full batches, as the step sees them
        b = train_batch(data["train"], cfg, s)
        want_e = max(want_e, int((b["edit"]["label_mask"] != 0).sum((1, 2)).max()))
        want_p = max(want_p, int((b["pass"]["label_mask"] != 0).sum((1, 2)).max()))
    assert flat_train_sizes(data["train"], cfg, steps) == (want_e, want_p)
    k = data["train"].fail["score_pos"].shape[-1]
    assert want_e < k * 3 * cfg.edits_per_group  # multi-token targets: fewer than rows x K
    # every pair of the flat batch is a target, each target once
    b = train_batch(data["train"], cfg, 2, (want_e, want_p))
    for g in range(cfg.batch_size):
        mask = np.concatenate([b["edit"]["label_mask"][g], b["pass"]["label_mask"][g]]) != 0
        f = b[FLAT]
        pairs = {(int(r), int(p)) for r, p, v in zip(f["rows"][g], f["pos"][g], f["valid"][g]) if v}
        assert pairs == set(zip(*np.nonzero(mask)))
        n_edit = b["edit"]["label_mask"].shape[1]
        fp = b[FLAT_PASS]
        assert {(int(r) + n_edit, int(p)) for r, p, v in zip(fp["rows"][g], fp["pos"][g], fp["valid"][g]) if v} \
            == {pr for pr in pairs if pr[0] >= n_edit}
    with pytest.raises(ValueError, match="scored positions"):
        with_flat_train(train_batch(data["train"], cfg, 0), 1, 1)


def test_flat_step_sizes_hold_every_steps_targets_at_two_levels(setup):
    """`flat_step_counts` = a count over each full batch; `flat_step_sizes` gives every step sizes
    that hold its targets, at most two per side, the larger the run's maximum (`flat_train_sizes`),
    the smaller an EDIT_BUCKETS length; `share=1` gives the run-wide sizes at every step."""
    from salem_jax.mend.train import EDIT_BUCKETS

    model, data, cfg, _, _ = setup
    cfg = dataclasses.replace(cfg, adapt_per_edit=2, pass_per_group=3)
    steps = 40
    counts = flat_step_counts(data["train"], cfg, steps)
    for s in range(steps):
        b = train_batch(data["train"], cfg, s)
        assert counts[s, 0] == int((b["edit"]["label_mask"] != 0).sum((1, 2)).max())
        assert counts[s, 1] == int((b["pass"]["label_mask"] != 0).sum((1, 2)).max())
    top = flat_train_sizes(data["train"], cfg, steps)
    for share in (0.5, 0.9):
        sizes = flat_step_sizes(data["train"], cfg, steps, share)
        assert (sizes >= counts).all()
        for side in (0, 1):
            levels = sorted(set(sizes[:, side].tolist()))
            assert levels[-1] == top[side] and len(levels) <= 2
            assert len(levels) == 1 or levels[0] in EDIT_BUCKETS
            # the small level wherever the step fits it
            assert ((sizes[:, side] == levels[0]) == (counts[:, side] <= levels[0])).all()
    assert (flat_step_sizes(data["train"], cfg, steps, 0.5)[:, 0] < top[0]).any()  # the small level is used
    assert (flat_step_sizes(data["train"], cfg, steps, 1.0) == np.array(top)).all()


def test_steps_at_the_step_sizes_equal_the_run_wide_sizes(setup):
    """Three steps from the same state on the same batches, FLAT at the run's maximum and at each
    step's own count (`flat_step_counts`: the least padding `flat_step_sizes` can give): metrics
    and the new state equal to float summation order (padded pairs carry weight 0)."""
    model, data, cfg, mesh, base = setup
    spec = EditorSpec.from_params(model.layers.weights(["layers.2"]), model.params, cfg.editor)
    plan, d = from_block_data(model, spec, data["train"], base)
    d = with_pass_logits(model.apply, base, d, plan)
    steps = 3
    top = flat_train_sizes(d, cfg, steps)
    sizes = flat_step_counts(d, cfg, steps)
    assert (sizes < np.array(top)).any()
    state = init_train_state(spec, cfg)
    state["params"]["lr"] = jax.tree.map(lambda x: x * 3e3, state["params"]["lr"])  # edits that move the pass rows
    kw = dict(apply_fn=model.apply, spec=spec, cfg=cfg.step_config(), mesh=mesh, from_block=plan)
    a = place_state(jax.tree.map(np.array, state), mesh)
    b = place_state(jax.tree.map(np.array, state), mesh)
    for step in range(steps):
        a, m_a = train_step(a, base, sharding.shard_batch(train_batch(d, cfg, step, top), mesh), **kw)
        b, m_b = train_step(b, base, sharding.shard_batch(train_batch(d, cfg, step, tuple(int(x) for x in sizes[step])), mesh), **kw)
        m_a, m_b = jax.device_get((m_a, m_b))
        assert m_a["kl"] > 1e-4
        for k, v in m_a.items():
            np.testing.assert_allclose(m_b[k], v, rtol=2e-5, atol=1e-6, err_msg=f"step {step} {k}")
        for x, y in zip(jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))):
            np.testing.assert_allclose(y, x, rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("layer", ["layers.2", pytest.param("layers.0", marks=pytest.mark.slow)])
def test_fast_train_step_equals_the_capturing_k_position_step(setup, layer):
    """Two steps from the same state on the same batches: the step that captures and runs the head
    at [rows, K] (reference), the flat head with capture (the same numbers up to float summation
    order), the flat head with the kept factors and pass logits (the factors' rounding differs
    from the in-step capture's by ~2e-7 relative, which the 3e3-times enlarged edits below amplify
    to ~1e-4 in the gradient norm): metrics after each step, and for the flat head alone also the
    editor parameters, optimizer state and norm statistics. From the edited block (layers.2) and
    through every block (layers.0)."""
    model, data, cfg, mesh, base = setup
    spec = EditorSpec.from_params(model.layers.weights([layer]), model.params, cfg.editor)
    plan, d = from_block_data(model, spec, data["train"], base)
    assert (plan is None) == (layer == "layers.0")
    flat = flat_train_sizes(d, cfg, 2)
    kept = with_pass_logits(model.apply, base, with_fail_factors(spec, model.apply, base, d, plan), plan)
    assert kept.factors_of == tuple(w.path for w in spec.weights) and PASS_LOGITS in kept.passes
    state = init_train_state(spec, cfg)
    # edits large enough to move the pass rows (the initial step sizes barely do): the KL compared is not ~0
    state["params"]["lr"] = jax.tree.map(lambda x: x * 3e3, state["params"]["lr"])
    kw = dict(apply_fn=model.apply, spec=spec, cfg=cfg.step_config(), mesh=mesh, from_block=plan)
    # flat: every metric and state leaf equal to float summation order. flat+kept: the kept
    # factors' and logits' rounding differs from the step's own by ~1e-7 relative, and MEND's
    # running normalisation (dividing u and delta by each feature's std, tiny for some features
    # after two steps) and the enlarged edits amplify it: seen up to 1e-4 in the gradient norm (1.3e-3 on
    # an AVX-512 machine, session 15: rtol 3e-3) and
    # 0.3-2.5% of the largest entry of Adam's moments (more in the suite's fast-compile mode), so
    # only the metrics (loss, NLL, KL, accuracies, gradient norm) are compared, at 3e-3; the kept
    # values themselves are checked against each row alone below (a step reading the wrong slot of
    # the kept logits was tried: its gradient norm is off by 83%).
    variants = {"flat": lambda s: train_batch(d, cfg, s, flat), "flat+kept": lambda s: train_batch(kept, cfg, s, flat)}
    states = {n: place_state(jax.tree.map(np.array, state), mesh) for n in ["ref", *variants]}
    for step in range(2):
        states["ref"], m_ref = train_step(states["ref"], base, sharding.shard_batch(train_batch(d, cfg, step), mesh), **kw)
        m_ref = jax.device_get(m_ref)
        assert m_ref["kl"] > 1e-3  # the edits move the pass rows
        ref = jax.device_get(states["ref"])
        for name, make in variants.items():
            b = make(step)
            assert FLAT in b and any(k.startswith(FACTOR) for k in b["fail"]) == (PASS_LOGITS in b["pass"]) == (name == "flat+kept")
            states[name], m = train_step(states[name], base, sharding.shard_batch(b, mesh), **kw)
            m, got = jax.device_get((m, states[name]))
            assert sorted(m) == sorted(m_ref)
            for k, v in m_ref.items():
                np.testing.assert_allclose(m[k], v, rtol=2e-5 if name == "flat" else 3e-3, atol=1e-6, err_msg=f"{name} step {step} {k}")
            if name == "flat":
                for a, g in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
                    np.testing.assert_allclose(g, a, rtol=2e-4, atol=1e-6, err_msg=name)


def test_kept_factors_and_logits_equal_each_row_alone(setup):
    """From the edited block's kept hidden states (layers.2), 4 rows per call with padding:
    each fail row's u and delta equal the full model's capture on that row by itself, and each
    pass row's kept logits its full forward pass's logits at its targets (zeros after them)."""
    model, data, cfg, mesh, base = setup
    spec = EditorSpec.from_params(model.layers.weights(["layers.2"]), model.params, cfg.editor)
    plan, d = from_block_data(model, spec, data["train"], base)
    assert d.block_input_of is not None
    kept = with_fail_factors(spec, model.apply, base, d, plan, chunk=4)  # 6 rows: a padded second call
    kept = with_pass_logits(model.apply, base, kept, plan, chunk=5)  # 18 rows: 4 calls
    passes = data["train"].passes
    # the references jitted (one program each; eager, every op of them its own program)
    logits = np.asarray(jax.jit(model.apply)(model.params, {k: v for k, v in passes.items() if k != "score_pos"}))
    got = kept.passes[PASS_LOGITS]
    assert got.shape[1] > 1  # some pass row has several targets
    for r in range(d.n_pass):
        pos = np.nonzero(passes["label_mask"][r])[0]
        np.testing.assert_allclose(got[r, : len(pos)], logits[r, pos], rtol=1e-5, atol=1e-5)
        assert not got[r, len(pos):].any()
    rows = {k: v for k, v in data["train"].fail.items() if k != "score_pos"}
    one_row = jax.jit(lambda p, b: capture(model.apply, p, b, spec.weights)[1])
    for i in range(d.n_fail):
        want = one_row(model.params, {k: v[i:i + 1] for k, v in rows.items()})
        for j, w in enumerate(spec.weights):
            np.testing.assert_allclose(kept.fail[f"{FACTOR}{j}:u"][i], want[w.path].u[0], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(kept.fail[f"{FACTOR}{j}:delta"][i], want[w.path].delta[0], rtol=1e-4, atol=1e-7)
