"""`block_chain`: the one check that says whether a model may skip the blocks below an edit,
shared by the MEND step, ROME's v* and the edit evaluator (salem_jax.models.from_block)."""

import warnings

import numpy as np
import pytest

from salem_jax.data.tokenize import encode
from salem_jax.eval.edits import EditEvaluator
from salem_jax.models import hf
from salem_jax.models.base import get_path, set_path
from salem_jax.models.from_block import BLOCK_INPUT, block_chain, block_output
from salem_jax.models.llama import tiny_llama


def _row(p, t, group, i):
    return dict(id=f"{group}{i}", record_id=f"r{i}", group=group, prompt=p, target=t, label=-1, text_pair="")


def test_chain_positions_and_the_models_that_have_none():
    model = tiny_llama(seed=3, num_hidden_layers=3)
    batch = encode(model, ["the capital of france is", "red"], ["paris", "blue"])
    chain, why = block_chain(model, model.params, batch)
    paths = tuple(b.module_path for b in model.layers.blocks)
    assert why == "" and chain.order == paths
    # the owner's position of a weight, of the module itself, and of nothing
    w = model.layers.blocks[2].mlp[0]
    assert chain.start(w.path) == 2 and chain.start(w.module_path) == 2
    assert chain.start("model/embed_tokens/embedding") is None
    assert chain.last_skipped(2) == paths[1]
    assert chain.skipping(model.apply, 2).skipped == paths[:2]
    with pytest.raises(ValueError, match="position 0"):
        chain.skipping(model.apply, 0)
    # the call order is kept: a second call with another batch returns the same object
    assert block_chain(model, model.params, {k: v[:1] for k, v in batch.items()})[0] is chain
    # a skipped block's output equals the full pass's (the chain is the real call order)
    h = block_output(model.apply, chain.last_skipped(2), model.params, batch)
    got = chain.skipping(model.apply, 2)(model.params, {**batch, BLOCK_INPUT: h})
    np.testing.assert_allclose(np.asarray(got), np.asarray(model.apply(model.params, batch)), rtol=2e-5, atol=2e-6)

    remat = tiny_llama(seed=3, num_hidden_layers=3, remat=True)
    chain, why = block_chain(remat, remat.params, batch)
    assert chain is None and "remat" in why
    t5 = hf.tiny("t5", seed=0)
    assert block_chain(t5, t5.params, {})[0] is None and "seq2seq" in block_chain(t5, t5.params, {})[1]


def test_evaluator_on_remat_blocks_runs_every_block_and_says_so():
    """Skipping into an nn.remat block raises UnexpectedTracerError; the evaluator used to try it.
    Now it runs every block (the same metrics as skip_unchanged_blocks=False) and warns once."""
    model = tiny_llama(seed=3, num_hidden_layers=3, remat=True)
    edits = [{"fail": [_row("the capital of france is", "paris", "fail", 0)],
              "adapt": [_row("france's capital is", "paris", "adapt", 0)]}]
    shared = {"pass": [_row("the capital of peru is", "lima", "pass", 0)]}
    path = model.layers.blocks[2].mlp[0].path
    edited = set_path(model.params, path, get_path(model.params, path) * 2.5 + 0.05)
    fast = EditEvaluator(model, model.params, edits, shared, batch_size=2)
    with pytest.warns(UserWarning, match="remat"):
        got = fast.evaluate(0, edited)
    assert fast.last_start == 0 and not fast.skip_unchanged_blocks
    want = EditEvaluator(model, model.params, edits, shared, batch_size=2, skip_unchanged_blocks=False).evaluate(0, edited)
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-6, abs=1e-7, nan_ok=True), k
    with warnings.catch_warnings():  # said once per evaluator, not per edit
        warnings.simplefilter("error")
        fast.evaluate(0, edited)
