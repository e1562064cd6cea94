"""Validation with the LM head on the target tokens only (mend.train `flat_targets`, issue 14):
the same per-group loss, NLL, KL and correctness as the [rows, K] path, from the edited block
(late layer; block 0 in the slow suite), with and without the base side kept."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from salem_jax import sharding
from salem_jax.mend.editor import EditorSpec
from salem_jax.mend.train import (
    FLAT,
    TrainConfig,
    eval_step,
    evaluate,
    flat_targets,
    from_block_data,
    init_train_state,
    place_base_params,
    place_state,
    prepare_splits,
    val_batches,
)
from salem_jax.models.llama import tiny_llama
from salem_jax.testing import capital_edit_rows

# targets of 1-3 words, so that K (the most target tokens of any row) exceeds most rows' counts
CITIES = ["paris", "rio de janeiro", "new delhi", "buenos aires"]
COUNTRIES = "france brazil india argentina".split()


@pytest.fixture(scope="module")
def setup():
    model = tiny_llama(seed=3, num_hidden_layers=4)
    data = prepare_splits(model, {"val": capital_edit_rows(COUNTRIES, CITIES, "va")})["val"]
    cfg = dataclasses.replace(TrainConfig.tiny(batch_size=2, effective_batch=2, adapt_per_edit=2, pass_per_group=2).resolved(1),
                              val_groups=4)
    mesh = sharding.make_mesh(1, 1, jax.devices()[:1])
    return model, data, cfg, mesh, place_base_params(model, model.params, mesh)


@pytest.mark.parametrize("layer", ["layers.3", pytest.param("layers.0", marks=pytest.mark.slow)])
def test_flat_validation_equals_the_k_position_path(setup, layer):
    model, data, cfg, mesh, base = setup
    spec = EditorSpec.from_params(model.layers.weights([layer]), model.params, cfg.editor)
    state = init_train_state(spec, cfg)
    # edits large enough to move the pass rows (the initial step sizes barely do), so the KL compared is not ~0
    state["params"]["lr"] = jax.tree.map(lambda x: x * 3e3, state["params"]["lr"])
    state = place_state(state, mesh)
    plan, d = from_block_data(model, spec, data, base)
    assert (plan is None) == (layer == "layers.0")
    batches = val_batches(d, dataclasses.replace(cfg, batch_size=cfg.val_groups))  # evaluate's batches: one compile each
    flat = flat_targets(batches)
    t = flat[0][FLAT]["rows"].shape[-1]
    k_positions = sum(b[part]["score_pos"].shape[1] * b[part]["score_pos"].shape[2] for b in batches[:1] for part in ("edit", "pass"))
    assert t < k_positions  # the head runs on fewer positions per group than [rows, K]
    kw = dict(apply_fn=model.apply, spec=spec, cfg=cfg.step_config(), mesh=mesh, from_block=plan)
    for b, bf in zip(batches, flat):
        want = jax.device_get(eval_step(state["params"], state["norm"], base, sharding.shard_batch(b, mesh), **kw))
        got = jax.device_get(eval_step(state["params"], state["norm"], base, sharding.shard_batch(bf, mesh), **kw))
        assert sorted(got) == sorted(want)
        for k, v in want.items():
            if v.dtype == bool:
                np.testing.assert_array_equal(got[k], v, err_msg=k)
            else:
                np.testing.assert_allclose(got[k], v, rtol=1e-5, atol=1e-6, err_msg=k)
        assert (want["kl"] > 1e-3).any()  # the edits move the pass rows: the KL compared is not 0 = 0
    # evaluate: the summary, and with the base side kept (the second call reuses it)
    slow = evaluate(model, spec, cfg, mesh, state["params"], state["norm"], base, d, plan=plan, flat_head=False)
    cache: dict = {}
    for _ in range(2):
        fast = evaluate(model, spec, cfg, mesh, state["params"], state["norm"], base, d, plan=plan, base_cache=cache)
        for k, v in slow.items():
            np.testing.assert_allclose(fast[k], v, rtol=1e-5, atol=1e-6, err_msg=k)
