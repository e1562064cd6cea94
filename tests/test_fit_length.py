"""A batch cut after its longest row (mend.train `fit_length`, issue 14): the padded length a
group batch is cut to equals a count over its rows; cutting keeps every row's tokens and the
non-positional leaves; the training step and the validation on cut batches give the numbers of
the full-length ones (float rounding aside), from the edited block with the kept block inputs,
factors and pass logits and through every block; `train_editor` compiles one step per length
and ends where the uncut run ends."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from salem_jax import sharding
from salem_jax.mend.editor import EditorSpec
from salem_jax.mend.train import (
    BLOCK_INPUT,
    EDIT_BUCKETS,
    FACTOR,
    PASS_LOGITS,
    TrainConfig,
    batch_length,
    evaluate,
    fit_length,
    flat_train_sizes,
    from_block_data,
    init_train_state,
    place_base_params,
    place_state,
    prepare_splits,
    train_batch,
    train_editor,
    train_step,
    val_batches,
    with_fail_factors,
    with_pass_logits,
)
from salem_jax.models.llama import tiny_llama
from salem_jax.scored_logits import SCORE_POS
from salem_jax.testing import capital_edit_rows

CITIES = ["paris", "rio de janeiro", "new delhi", "buenos aires", "rome", "addis ababa"]
COUNTRIES = "france brazil india argentina italy ethiopia".split()
# one long fail row: the split's padded length is 24, most steps' rows fit in 16
LONG = "long ago and far away, in a land that we all know from many old stories, the capital of france is"


@pytest.fixture(scope="module")
def setup():
    model = tiny_llama(seed=5, num_hidden_layers=3)
    rows = capital_edit_rows(COUNTRIES, CITIES, "tr")
    rows[0]["prompt"] = LONG
    val = capital_edit_rows(COUNTRIES[:2], CITIES[:2], "va")
    data = prepare_splits(model, {"train": rows, "val": val})
    cfg = TrainConfig.tiny(batch_size=2, effective_batch=2, adapt_per_edit=1, pass_per_group=2, max_steps=6,
                           val_every=3, checkpoint_every=3, log_every=1, val_groups=2).resolved(1)
    mesh = sharding.make_mesh(1, 1, jax.devices()[:1])
    return model, data, cfg, mesh, place_base_params(model, model.params, mesh)


def _hand_length(batch) -> int:
    """The longest row's last attended position + 1 (a loop over rows), at least K, as the
    smallest EDIT_BUCKETS length, at most S."""
    need, s = 1, 0
    for name in ("fail", "edit", "pass"):
        m = np.asarray(batch[name]["attention_mask"])
        s = max(s, m.shape[-1])
        for row in m.reshape(-1, m.shape[-1]):
            on = np.nonzero(row)[0]
            if len(on):
                need = max(need, int(on[-1]) + 1)
        need = max(need, batch[name][SCORE_POS].shape[-1])
    return min(s, min(b for b in EDIT_BUCKETS if b >= need))


def test_batch_length_and_cut(setup):
    model, data, cfg, _, _ = setup
    d = data["train"]
    s = d.fail["input_ids"].shape[-1]
    lengths = []
    for step in range(8):
        b = train_batch(d, cfg, step)
        n = batch_length(b)
        assert n == _hand_length(b)
        lengths.append(n)
        cut = fit_length(b)
        for name in ("fail", "edit", "pass"):
            for k, v in b[name].items():
                if k == SCORE_POS:
                    np.testing.assert_array_equal(cut[name][k], v)
                else:
                    np.testing.assert_array_equal(cut[name][k], v[:, :, :n])
            for k in ("attention_mask", "label_mask"):  # only padding was cut
                assert not np.asarray(b[name][k])[:, :, n:].any()
        np.testing.assert_array_equal(cut["weight"], b["weight"])
    assert min(lengths) < s == max(lengths)  # some steps are cut, the long row's are not
    with pytest.raises(ValueError, match="cut rows"):
        fit_length(train_batch(d, cfg, lengths.index(s)), min(lengths))


# layers.0 (every block runs, the path test_mend_fast_step also keeps for the slow suite) compiles
# whole-model steps twice: the slow suite
@pytest.mark.parametrize("layer", ["layers.2", pytest.param("layers.0", marks=pytest.mark.slow)])
def test_steps_on_cut_batches_equal_the_full_length_steps(setup, layer):
    """Three steps from the same state on the same batches, full length and cut: metrics and the
    new state (editor params, Adam's moments, norm statistics) equal. layers.2: from the edited
    block, the block inputs, factors and pass logits kept per row (all cut with the rows);
    layers.0: every block runs."""
    model, data, cfg, mesh, base = setup
    spec = EditorSpec.from_params(model.layers.weights([layer]), model.params, cfg.editor)
    plan, d = from_block_data(model, spec, data["train"], base)
    if plan is not None:
        d = with_pass_logits(model.apply, base, with_fail_factors(spec, model.apply, base, d, plan), plan)
        assert BLOCK_INPUT in d.fail and any(k.startswith(FACTOR) for k in d.fail) and PASS_LOGITS in d.passes
    flat = flat_train_sizes(d, cfg, 3)
    state = init_train_state(spec, cfg)
    state["params"]["lr"] = jax.tree.map(lambda x: x * 3e3, state["params"]["lr"])  # edits that move the pass rows
    kw = dict(apply_fn=model.apply, spec=spec, cfg=cfg.step_config(), mesh=mesh, from_block=plan)
    full = place_state(jax.tree.map(np.array, state), mesh)
    cut = place_state(jax.tree.map(np.array, state), mesh)
    n_cut = 0
    for step in range(3):
        b = train_batch(d, cfg, step, flat)
        c = fit_length(b)
        n_cut += c["edit"]["input_ids"].shape[-1] < b["edit"]["input_ids"].shape[-1]
        full, m_full = train_step(full, base, sharding.shard_batch(b, mesh), **kw)
        cut, m_cut = train_step(cut, base, sharding.shard_batch(c, mesh), **kw)
        m_full, m_cut = jax.device_get((m_full, m_cut))
        assert m_full["kl"] > 1e-4
        for k, v in m_full.items():
            np.testing.assert_allclose(m_cut[k], v, rtol=1e-4, atol=1e-6, err_msg=f"step {step} {k}")
        # the state to 1e-2 of each leaf's largest entry: Adam's first updates are lr * m / sqrt(v),
        # about +-lr for ANY non-zero gradient, so float rounding of near-zero gradient entries
        # (other summation lengths in attention and the editor's sums) moves them by up to 1e-3
        # of the leaf's scale here (measured: up to 2.5e-3 of a leaf after 3 steps through every block).
        # A scalar leaf (a learned edit lr's moments: one sum of many cancelling terms) gets 5e-2 of
        # itself (seen: 1.95e-2 at layers.0 on an AVX-512 machine, session 15)
        for (path, a), g in zip(jax.tree_util.tree_leaves_with_path(jax.device_get(full)), jax.tree.leaves(jax.device_get(cut))):
            a, g = np.asarray(a, np.float64), np.asarray(g, np.float64)
            share = 5e-2 if a.size == 1 else 1e-2
            np.testing.assert_allclose(g, a, rtol=0, atol=share * max(np.abs(a).max(), 1e-12), err_msg=jax.tree_util.keystr(path))
    assert n_cut >= 1


# the slow suite (issue 14, make test <= 5 min): the whole loop twice; the cut steps' equality stays in make
# test (test_steps_on_cut_batches_equal_the_full_length_steps[layers.2])
@pytest.mark.slow
def test_train_editor_cut_equals_uncut(setup, tmp_path):
    """train_editor with and without fit_lengths: the same validation curve and final editor;
    the cut run compiles one step per length it met and counts no recompilation."""
    model, data, cfg, mesh, _ = setup
    weights = model.layers.weights(["layers.2"])
    runs = {}
    for fit in (False, True):
        runs[fit] = train_editor(model, data, weights, cfg, tmp_path / str(fit), mesh=mesh, progress=False, fit_lengths=fit)
    assert runs[True].recompiles == 0 and runs[False].recompiles == 0
    for k, v in runs[False].last_val.items():
        np.testing.assert_allclose(runs[True].last_val[k], v, rtol=1e-4, atol=1e-6, err_msg=k)
    for a, g in zip(jax.tree.leaves(runs[False].params), jax.tree.leaves(runs[True].params)):  # as in the test above
        np.testing.assert_allclose(g, a, rtol=0, atol=1e-2 * max(float(np.abs(a).max()), 1e-12))
    # the validation alone, cut and not, on the trained editor
    res = runs[True]
    base = place_base_params(model, model.params, mesh)
    spec = res.spec
    assert batch_length(val_batches(data["val"], res.config)[0]) < data["val"].fail["input_ids"].shape[-1]  # cut
    ev = {fit: evaluate(model, spec, res.config, mesh, res.params, res.norm, base, data["val"], fit_lengths=fit) for fit in (False, True)}
    for k, v in ev[False].items():
        np.testing.assert_allclose(ev[True][k], v, rtol=1e-5, atol=1e-6, err_msg=k)


def test_block_inputs_in_length_sorted_cut_chunks_equal_the_full_forward(setup):
    """`with_block_inputs` runs its rows sorted by length, each chunk cut after its longest row:
    at every attended position the kept hidden state equals the block's output of one call over
    all rows at the full length; past its chunk's cut it is 0."""
    from salem_jax.mend.train import from_block_plan, with_block_inputs
    from salem_jax.models.from_block import block_output

    model, data, cfg, _, base = setup
    spec = EditorSpec.from_params(model.layers.weights(["layers.2"]), model.params, cfg.editor)
    plan = from_block_plan(model, spec, data["train"])[0]
    d = with_block_inputs(plan, base, data["train"], chunk=4)
    for name in ("fail", "adapt", "passes"):
        enc = getattr(data["train"], name)
        full = np.asarray(block_output(plan.apply.apply, plan.last, base, {k: v for k, v in enc.items() if k != SCORE_POS}))
        got = getattr(d, name)[BLOCK_INPUT]
        mask = enc["attention_mask"] != 0
        assert got.shape == full.shape
        np.testing.assert_allclose(got[mask], full[mask], rtol=1e-5, atol=1e-5, err_msg=name)
        # some padded positions lie past their chunk's cut (0); the others hold the block's output
        assert (got[~mask] == 0).all(-1).any()
    assert data["train"].fail["input_ids"].shape[-1] == 24


def test_block_inputs_of_the_used_rows_only_equal_every_row(setup):
    """`with_block_inputs(..., used=...)` (the editor's setup since session 15): the marked rows'
    hidden states are those of the call over every row, bit for bit (each at its own chunk's cut,
    in calls of the same shape), the others 0; `train_rows_used` / `val_rows_used` mark exactly
    the rows `train_batch` / `val_batches` gather (an id column gathered like the tokens)."""
    import dataclasses

    from salem_jax.mend.train import from_block_plan, train_rows_used, val_rows_used, with_block_inputs

    model, data, cfg, _, base = setup
    spec = EditorSpec.from_params(model.layers.weights(["layers.2"]), model.params, cfg.editor)
    train = data["train"]
    plan = from_block_plan(model, spec, train)[0]
    for split, used_fn, batches in (
            ("train", lambda d: train_rows_used(d, cfg, 3), lambda d: [train_batch(d, cfg, s) for s in range(3)]),
            ("val", lambda d: val_rows_used(d, cfg), lambda d: val_batches(d, cfg))):
        d = data[split]
        used = used_fn(d)
        # the rows the batches gather, read off an id column (row index + 1; 0 = no row)
        tagged = dataclasses.replace(d, **{n: {**getattr(d, n), "rid": np.arange(1, len(used[n]) + 1)}
                                           for n in ("fail", "adapt", "passes")})
        seen = {n: set() for n in used}
        for b in batches(tagged):
            seen["fail"] |= set(b["fail"]["rid"].ravel().tolist())
            seen["adapt"] |= set(b["edit"]["rid"][:, cfg.edits_per_group:].ravel().tolist())
            seen["passes"] |= set(b["pass"]["rid"].ravel().tolist())
        for n, mark in used.items():
            assert set((np.flatnonzero(mark) + 1).tolist()) == seen[n] - {0}, (split, n)
        if split == "train":
            assert not all(m.all() for m in used.values())  # some rows are never drawn in 3 steps
        full = with_block_inputs(plan, base, d, chunk=4)
        part = with_block_inputs(plan, base, d, chunk=4, used=used)
        for n, mark in used.items():
            got, want = getattr(part, n)[BLOCK_INPUT], getattr(full, n)[BLOCK_INPUT]
            np.testing.assert_array_equal(got[mark], want[mark], err_msg=f"{split} {n}")
            assert (got[~mark] == 0).all(), (split, n)
