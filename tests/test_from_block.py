"""Running an edited decoder-only model from its first changed block (salem_jax.models.from_block)
gives the full forward pass's numbers, and the evaluator that uses it gives the same metrics as
running every block."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from salem_jax.data.tokenize import encode
from salem_jax.eval.edits import EditEvaluator
from salem_jax.models import hf
from salem_jax.models.base import get_path, set_path
from salem_jax.models.from_block import (
    BLOCK_INPUT,
    FromBlock,
    block_call_order,
    block_output,
    changed_paths,
    first_changed_block,
)
from salem_jax.models.llama import tiny_llama

PROMPTS = ["the capital of france is", "which river lies in egypt", "red blue"]
TARGETS = ["paris", "cairo", "green yellow"]


@pytest.fixture(scope="module", params=["llama", "gpt2", "gpt_neo"])
def model(request):
    if request.param == "llama":
        return tiny_llama(seed=3, num_hidden_layers=3)
    if request.param == "gpt2":
        return hf.tiny("gpt2", seed=3, n_layer=3)
    return hf.tiny("gpt_neo", seed=3, num_layers=3, attention_types=[[["global", "local", "global"], 1]])


def _edit(model, block: int, scale: float = 1.7):
    """The base parameters with one MLP kernel of `block` changed (a new tree; base untouched)."""
    path = model.layers.blocks[block].mlp[0].path
    return set_path(model.params, path, get_path(model.params, path) * scale + 0.05)


def test_from_block_equals_the_full_forward_pass(model):
    batch = encode(model, PROMPTS, TARGETS)
    paths = tuple(b.module_path for b in model.layers.blocks)
    order = block_call_order(model.apply, model.params, batch, paths)
    assert order == {p: i for i, p in enumerate(paths)}
    full = jax.jit(model.apply)  # jitted: one program (eager, every op its own), reused below
    for start in (1, len(paths)):  # from a middle block; every block skipped
        edited = _edit(model, start) if start < len(paths) else model.params  # blocks >= start changed
        h = block_output(model.apply, paths[start - 1], model.params, batch)
        # the hand computation: the hidden state after block start-1 is the base model's
        got = jax.jit(FromBlock(model.apply, paths[:start]))(edited, {**batch, BLOCK_INPUT: h})
        want = full(edited, batch)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-6)
    # skipping a block whose weights DID change gives other logits: the comparison can fail
    edited = _edit(model, 0)
    h = block_output(model.apply, paths[0], model.params, batch)
    skipped = jax.jit(FromBlock(model.apply, paths[:1]))(edited, {**batch, BLOCK_INPUT: h})
    assert np.abs(np.asarray(skipped) - np.asarray(full(edited, batch))).max() > 1e-4


def test_first_changed_block(model):
    n = len(model.layers.blocks)
    assert first_changed_block(model, model.params, model.params) == n
    assert first_changed_block(model, model.params, _edit(model, 1)) == 1
    # a copy with equal values is unchanged; other values in a block are a change
    same = jax.tree.map(lambda x: jnp.array(x), model.params)
    assert changed_paths(model.params, same) == []
    both = _edit(model, n - 1)
    path = model.layers.blocks[1].mlp[0].path
    both = set_path(both, path, get_path(both, path) + 1.0)
    assert first_changed_block(model, model.params, both) == 1
    # a parameter outside every block (the embedding) changes everything after it
    flat = jax.tree_util.tree_flatten_with_path(model.params)[0]
    outside = next(k for k, _ in flat if not any(jax.tree_util.keystr(k, simple=True, separator="/").startswith(b.module_path + "/")
                                                 for b in model.layers.blocks))
    p = jax.tree_util.keystr(outside, simple=True, separator="/")
    assert first_changed_block(model, model.params, set_path(model.params, p, get_path(model.params, p) + 1.0)) == 0


def test_first_changed_block_is_none_for_encoder_decoders():
    t5 = hf.tiny("t5", seed=0)
    assert first_changed_block(t5, t5.params, t5.params) is None


def _row(p, t, group, i):
    return dict(id=f"{group}{i}", record_id=f"r{i}", group=group, prompt=p, target=t, label=-1, text_pair="")


def test_evaluator_from_the_changed_block_equals_running_every_block():
    # Llama here; GPT-2 through tests/test_edit_eval.py (its edits change h.1: h.0 is skipped there)
    model = tiny_llama(seed=3, num_hidden_layers=3)
    edits = [{"fail": [_row(p, t, "fail", i)], "adapt": [_row(p + " then", t, "adapt", i)]}
             for i, (p, t) in enumerate(zip(PROMPTS, TARGETS))]
    shared = {"pass": [_row("the capital of peru is", "lima", "pass", 0)],
              "keep": [_row("brazil", "brasilia", "keep", 0), _row("japan speaks", "yen", "keep", 1)]}
    texts = ["the capital of france is paris and the capital of peru is lima " * 3, "red blue green yellow one two"]
    fast = EditEvaluator(model, model.params, edits, shared, texts=texts, text_window=8, batch_size=2)
    slow = EditEvaluator(model, model.params, edits, shared, texts=texts, text_window=8, batch_size=2,
                         skip_unchanged_blocks=False)
    n = len(model.layers.blocks)
    # edits at the last, first and middle blocks: the cached hidden states are rebuilt per start
    for i, block in enumerate([n - 1, 0, 1]):
        edited = _edit(model, block, scale=2.5)
        for with_text in (False, True) if block == n - 1 else (i == 2,):
            got = fast.evaluate(i, edited, with_text=with_text)
            want = slow.evaluate(i, edited, with_text=with_text)
            assert fast.last_start == block and slow.last_start == 0
            assert sorted(got) == sorted(want)
            # a difference of two perplexities (dd_ppl_*_abs) at the perplexities' own tolerance: the
            # kept hidden states are computed at other lengths (float rounding; ppl ~150 here)
            scale = max(abs(x) for key, x in want.items() if "ppl" in key and not key.startswith("dd_"))
            for k, v in want.items():
                tol = 1e-5 * scale if k.startswith("dd_ppl") and k.endswith("_abs") else 1e-6
                assert got[k] == pytest.approx(v, rel=1e-5, abs=tol, nan_ok=True), k


# the slow suite (issue 14, make test <= 5 min): the batched-against-per-edit evaluation stays in make test
# through the pipeline (test_pipeline.py::test_evaluate_method_batched_equals_per_edit)
@pytest.mark.slow
def test_evaluate_many_equals_one_edit_at_a_time():
    # evaluate_many scores several edits in one vmapped program (edits_per_call=2 with 3 edits of
    # the same block: the second call is padded); an edit of another block falls back to evaluate
    model = tiny_llama(seed=3, num_hidden_layers=3)
    edits = [{"fail": [_row(p, t, "fail", i)], "adapt": [_row(p + " then", t, "adapt", i)] * (i % 2 + 1)}
             for i, (p, t) in enumerate(zip(PROMPTS + PROMPTS[:1], TARGETS + TARGETS[1:2]))]
    shared = {"pass": [_row("the capital of peru is", "lima", "pass", 0)],
              "keep": [_row("brazil", "brasilia", "keep", 0), _row("japan speaks", "yen", "keep", 1)]}
    texts = ["the capital of france is paris and the capital of peru is lima " * 3, "red blue green yellow one two"]
    ev = EditEvaluator(model, model.params, edits, shared, texts=texts, text_window=8, batch_size=2)
    one = EditEvaluator(model, model.params, edits, shared, texts=texts, text_window=8, batch_size=2)
    n = len(model.layers.blocks)
    edited = [_edit(model, n - 1, scale=1.5 + 0.5 * i) for i in range(3)] + [_edit(model, 1, scale=2.5)]
    flags = [True, False, False, True]
    got = ev.evaluate_many(list(enumerate(edited)), with_text=flags, edits_per_call=2)
    for i, (p, t) in enumerate(zip(edited, flags)):
        want = one.evaluate(i, p, with_text=t)
        assert sorted(got[i]) == sorted(want)
        for k, v in want.items():
            # (rel 2e-4: a vmapped matmul sums in another order; on this model one edit's pass-row
            # perplexity moves by 7e-5 relative, every accuracy is exact)
            assert got[i][k] == pytest.approx(v, rel=2e-4 if "ppl" in k else 1e-6, abs=1e-6, nan_ok=True), (i, k)
    # the edits differ in what they do, so a mix-up of edits or rows would show
    assert len({round(g["pass/ppl_after"], 6) for g in got[:3]}) == 3
    assert len({round(g["fail/ppl_after"], 6) for g in got[:3]}) == 3


def test_evaluator_block_cache_in_length_sorted_cut_calls():
    """The evaluator keeps the base model's block outputs computed on its rows sorted by length,
    `batch_size` per call, each call cut after its longest row (session 15): at every attended
    position they equal one call over all rows at the full length; past a call's cut they are 0
    (padding nothing reads), and the rows here are cut (one long prompt sets the full length)."""
    model = tiny_llama(seed=3, num_hidden_layers=3)
    # a long, a medium and a short prompt: with 4 rows per call the first call holds the short and
    # the medium rows (cut after the medium ones), the second the long rows
    long = "long ago and far away in a land that we all know from many old stories the capital of france is"
    medium = "the capital city of the old republic of france is"
    edits = [{"fail": [_row(p, t, "fail", i)], "adapt": [_row(p + " then", t, "adapt", i)]}
             for i, (p, t) in enumerate(zip([long, medium, "red blue"], TARGETS))]
    shared = {"pass": [_row("the capital of peru is", "lima", "pass", 0)],
              "keep": [_row("brazil", "brasilia", "keep", 0), _row("japan speaks", "yen", "keep", 1)]}
    ev = EditEvaluator(model, model.params, edits, shared, batch_size=4)
    ev.evaluate(0, _edit(model, 2, scale=2.5))
    start, cache = ev._cache
    last = ev._chain.last_skipped(start)
    cut_somewhere = False
    for key, enc in (("own", ev._own), ("shared", ev._shared_host)):
        full = np.asarray(block_output(model.apply, last, model.params, enc))
        got, mask = np.asarray(cache[key]), np.asarray(enc["attention_mask"]) != 0
        assert got.shape == full.shape
        np.testing.assert_allclose(got[mask], full[mask], rtol=1e-5, atol=1e-6, err_msg=key)
        cut_somewhere |= bool((got[~mask] == 0).all(-1).any() and (full[~mask] != 0).any())
    assert cut_somewhere


class _CountingApply:
    """`apply` that counts its calls: under jit it runs once per trace (static argument: hashable)."""

    def __init__(self, apply):
        self.apply, self.calls = apply, 0

    def __call__(self, params, batch):
        self.calls += 1
        return self.apply(params, batch)


def test_block_outputs_by_length_traces_once_per_shape_whatever_the_targets():
    """Row sets that differ only in their targets (labels, label_mask, the width of score_pos - the
    evaluator's own and shared rows) share `block_output`'s trace: the main job traced it twice per
    cut before (JAX_LOG_COMPILES, session 17). The outputs are those of the model on the same rows
    (the reference: `block_output` on the full-length rows without the target keys)."""
    from salem_jax.models.from_block import NOT_MODEL_INPUTS, block_outputs_by_length
    from salem_jax.scored_logits import SCORE_POS, with_score_positions

    assert SCORE_POS in NOT_MODEL_INPUTS
    model = tiny_llama(seed=4, num_hidden_layers=3)
    prompts = ["the capital of france is", "red", "the capital city of the old republic of france is", "blue"]
    enc = {k: np.asarray(v) for k, v in encode(model, prompts, ["paris"] * 4).items()}
    wide = with_score_positions(dict(enc), k=enc["attention_mask"].shape[1] - 1)
    narrow = with_score_positions(dict(enc))
    other = {**narrow, "labels": np.zeros_like(enc["labels"]), "label_mask": np.ones_like(enc["label_mask"])}
    assert wide[SCORE_POS].shape != narrow[SCORE_POS].shape
    apply = _CountingApply(model.apply)
    last = model.layers.blocks[1].module_path
    outs = [block_outputs_by_length(apply, last, model.params, e, 2) for e in (enc, wide, narrow, other)]
    chunk_cuts = 2  # 4 rows in chunks of 2: two cut lengths here
    assert apply.calls == chunk_cuts, apply.calls
    inputs = {k: v for k, v in enc.items() if k not in NOT_MODEL_INPUTS}
    full = np.asarray(block_output(model.apply, last, model.params, inputs))
    mask = enc["attention_mask"] != 0
    for o in outs:
        np.testing.assert_array_equal(o, outs[0])
        np.testing.assert_allclose(o[mask], full[mask], rtol=1e-5, atol=1e-6)


def test_block_outputs_by_length_against_one_full_call():
    """`block_outputs_by_length` (the routine `with_block_inputs` and the evaluator share): rows
    sorted by length, `chunk` per call, each call cut after its longest row. At every attended
    position a row's output equals one call over all rows at the full length (the hand reference);
    past its chunk's cut it is 0; with `rows` (bool or indices) only those rows are computed, bit for
    bit as without it, the others 0."""
    from salem_jax.mend.train import bucket_length, row_ends
    from salem_jax.models.from_block import block_outputs_by_length

    model = tiny_llama(seed=3, num_hidden_layers=3)
    long = "long ago and far away in a land that we all know from many old stories the capital of france is"
    prompts = [long, "red", "the capital city of the old republic of france is", "blue", long + " then", "green"]
    enc = {k: np.asarray(v) for k, v in encode(model, prompts, ["paris"] * len(prompts)).items()}
    last = model.layers.blocks[1].module_path
    full = np.asarray(block_output(model.apply, last, model.params, enc))
    got = block_outputs_by_length(model.apply, last, model.params, enc, 2)
    mask = enc["attention_mask"] != 0
    assert got.shape == full.shape and got.dtype == full.dtype
    np.testing.assert_allclose(got[mask], full[mask], rtol=1e-5, atol=1e-6)
    # the cut, by hand: sorted by length, pairs; each pair cut at the bucket of its longest row
    ends = row_ends(enc["attention_mask"])
    order = np.argsort(ends, kind="stable")
    s = mask.shape[1]
    for a in range(0, len(order), 2):
        cut = bucket_length(int(ends[order[a: a + 2]].max()), s)
        assert (got[order[a: a + 2], cut:] == 0).all()
        assert (got[order[a: a + 2], :cut] != 0).any(-1).all()  # every position up to the cut computed
    assert any(bucket_length(int(ends[order[a: a + 2]].max()), s) < s for a in range(0, len(order), 2))
    for rows in (np.asarray([True, False, False, True, True, False]), [0, 3, 4]):
        part = block_outputs_by_length(model.apply, last, model.params, enc, 2, rows=rows, shape=full.shape[1:],
                                       dtype=np.float32)
        np.testing.assert_array_equal(part[[0, 3, 4]], got[[0, 3, 4]])
        assert (part[[1, 2, 5]] == 0).all()
    with pytest.raises(ValueError, match="no row to compute"):
        block_outputs_by_length(model.apply, last, model.params, enc, 2, rows=np.zeros(6, bool))
