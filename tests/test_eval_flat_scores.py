"""The per-edit evaluation with the vocabulary head on the target tokens only (issue 14).

`EditEvaluator(flat_scores=True)` (the default on decoder-only models) runs the head on exactly
the target tokens (`scored_logits.flat_scored_logits`) instead of at K positions of every row and
every position of every text window; it must give every metric of the [R, K] path
(`flat_scores=False`), which tests/test_edit_eval.py checks against `evaluate_edit`."""

import jax
import numpy as np
import pytest

from salem_jax.eval import edits as edits_mod
from salem_jax.eval.edits import EditEvaluator
from salem_jax.models.base import get_path, set_path
from salem_jax.models.llama import tiny_llama
from salem_jax.scored_logits import flat_positions, flat_scored_logits

# targets of 1, 2 and 4 words (different token counts per row, so K > most rows' counts)
FACTS = [("the capital of france is", "paris", ["capital of france is", "the city of france is"]),
         ("peru", "lima is a city", ["peru capital is"]),
         ("the language of japan is", "yen yen", [])]
SHARED = {"pass": [("which river lies in egypt", "cairo"), ("the currency of india is", "rupee rupee rupee")],
          "keep": [("brazil", "brasilia"), ("the capital of kenya is", "nairobi")]}
TEXTS = ["the capital of france is paris and the capital of peru is lima " * 2, "red blue green yellow one two"]


def _row(p, t, group, i):
    return dict(id=f"{group}{i}", record_id=f"r{i}", group=group, prompt=p, target=t, label=-1, text_pair="")


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=4, num_hidden_layers=3)


def test_flat_scored_logits_equal_the_full_logits_at_the_pairs(model):
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 60, size=(3, 7)).astype(np.int32)
    mask = np.zeros((3, 7), np.int32)
    mask[0, [2, 5]] = mask[2, [0, 1, 6]] = 1  # row 1 has no target
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids, "label_mask": mask}
    flat = flat_positions(mask, 8)
    assert flat["valid"].sum() == 5 and list(flat["rows"][:5]) == [0, 0, 2, 2, 2] and list(flat["pos"][:5]) == [2, 5, 0, 1, 6]
    # both jitted (one program each; eager, every op its own program)
    got = jax.jit(lambda p, b, r, q: flat_scored_logits(model.apply, p, b, r, q))(model.params, batch, flat["rows"], flat["pos"])
    full = jax.jit(model.apply)(model.params, batch)
    assert got.shape == (8, full.shape[-1])
    np.testing.assert_allclose(np.asarray(got), np.asarray(full)[flat["rows"], flat["pos"]], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="more than size"):
        flat_positions(mask, 4)


def test_flat_evaluation_equals_the_k_position_path(model):
    edits = [{"fail": [_row(p, t, "fail", i)], "adapt": [_row(a, t, "adapt", i) for a in reph]}
             for i, (p, t, reph) in enumerate(FACTS)]
    shared = {g: [_row(p, t, g, i) for i, (p, t) in enumerate(rows)] for g, rows in SHARED.items()}
    kw = dict(texts=TEXTS, text_window=8, batch_size=2)
    flat = EditEvaluator(model, model.params, edits, shared, **kw)
    slow = EditEvaluator(model, model.params, edits, shared, flat_scores=False, **kw)
    assert flat.flat_scores and not slow.flat_scores
    own_k = slow._own["score_pos"].shape[-1] * slow.rows_per_edit
    assert flat._own_tokens < own_k  # the head runs on fewer positions than [R, K]
    n = len(model.layers.blocks)
    traces = edits_mod._edited_scores_flat._cache_size()
    # from the last block (cached states) with the text, and from block 0 (every block) without
    for i, (block, with_text) in enumerate([(n - 1, True), (0, False)]):
        p = model.layers.weights([f"layers.{block}"])[0].path
        k = get_path(model.params, p)
        edited = set_path(model.params, p, k + 0.5 * jax.random.normal(jax.random.PRNGKey(i), k.shape))
        got, want = flat.evaluate(i, edited, with_text=with_text), slow.evaluate(i, edited, with_text=with_text)
        assert sorted(got) == sorted(want) and flat.last_start == block
        for key, v in want.items():
            assert got[key] == pytest.approx(v, rel=1e-5, abs=1e-6, nan_ok=True), key
        assert want["locality"] < 1.0  # the edit changes the model, so the comparison can fail
    # one program per (start block, text or not): no retrace per edit
    assert edits_mod._edited_scores_flat._cache_size() - traces <= 2
    # the text's head runs on its target tokens: each chunk's T is the most targets of any chunk
    flats = [part["flat"] for part in flat.text_parts]
    assert sum(f["rows"].size for f in flats) < slow._windows["input_ids"].size
    assert sum(int(f["valid"].sum()) for f in flats) == flat.text_tokens


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_the_last_mlp_runs_at_the_scored_pairs_only(arch):
    """`LastMLPAtScored`: the last block's MLP on the T scored pairs only; the logits there are the
    plain forward pass's (every position, every block), and the MLP really sees [1, T, H]."""
    import flax.linen as nn

    from salem_jax.models.from_block import block_chain, last_mlp_module
    from salem_jax.scored_logits import LastMLPAtScored
    from salem_jax.testing import tiny_edit_model

    m = tiny_edit_model(arch)
    rng = np.random.default_rng(1)
    ids = rng.integers(3, 60, size=(3, 9)).astype(np.int32)
    att = np.ones_like(ids)
    att[1, 6:] = 0
    mask = np.zeros((3, 9), np.int32)
    mask[0, [1, 4, 8]] = mask[1, [2, 5]] = mask[2, [7]] = 1
    batch = {"input_ids": ids, "attention_mask": att, "labels": ids, "label_mask": mask}
    chain, why = block_chain(m, m.params, batch)
    assert chain is not None, why
    mlp, why = last_mlp_module(m, chain)
    assert mlp == m.layers.blocks[-1].module_path + "/mlp", why
    flat = flat_positions(mask, 8)  # 6 pairs and 2 padding entries at (0, 0)
    seen = []

    def spy(next_fun, args, kwargs, context):
        # the MLP's own layers (inside it, so after the hook under test has cut its input)
        if context.method_name == "__call__" and "/".join(context.module.path).startswith(mlp + "/"):
            seen.append(args[0].shape)
        return next_fun(*args, **kwargs)

    def run(p, b, r, q):
        with nn.intercept_methods(spy):
            return flat_scored_logits(LastMLPAtScored(m.apply, mlp), p, b, r, q)

    got = jax.jit(run)(m.params, batch, flat["rows"], flat["pos"])
    assert seen and all(s[:2] == (1, 8) for s in seen), seen  # the MLP's layers ran on the 8 flat entries only
    full = np.asarray(jax.jit(m.apply)(m.params, batch))  # the independent computation: the plain pass
    np.testing.assert_allclose(np.asarray(got), full[flat["rows"], flat["pos"]], rtol=1e-5, atol=1e-5)
    # the unscored positions really are left without the MLP's term: the plain apply of the marked
    # function elsewhere (no flat_scored_logits) is the whole model
    np.testing.assert_array_equal(np.asarray(jax.jit(LastMLPAtScored(m.apply, mlp))(m.params, batch)), full)


def test_the_evaluator_reports_the_last_mlp_path(model):
    edits = [{"fail": [_row(p, t, "fail", i)], "adapt": [_row(a, t, "adapt", i) for a in reph]}
             for i, (p, t, reph) in enumerate(FACTS)]
    ev = EditEvaluator(model, model.params, edits, {}, batch_size=2)
    p = model.layers.weights(["layers.1"])[0].path
    edited = set_path(model.params, p, get_path(model.params, p) * 1.5)
    ev.evaluate(0, edited)
    assert ev.paths["last_mlp"] == "on"
    slow = EditEvaluator(model, model.params, edits, {}, batch_size=2, flat_scores=False)
    slow.evaluate(0, edited)
    assert slow.paths["last_mlp"].startswith("off")
