"""Greedy generation of many edited models in one batched call (`generate.greedy_ids_many`,
`eval.generated.generations_after_edits`) against generating with each edited model on its own."""

import jax
import numpy as np
import pytest

from salem_jax import generate
from salem_jax.eval.generated import edit_generation_metrics, generate_answers, generations_after_edits, stack_edits
from salem_jax.models import hf, llama
from salem_jax.models.base import get_path, set_path

PROMPTS = ["the capital of", "paris", "lima is", "the capital of peru is", "red blue", "one two three"]


def _edited(model, i: int, block: int = -1, scale: float = 3.0):
    """Base parameters with `block`'s first MLP kernel moved (deterministic by i; a new tree)."""
    path = model.layers.blocks[block].mlp[0].path
    k = get_path(model.params, path)
    noise = jax.random.normal(jax.random.PRNGKey(i), k.shape) * scale * float(np.std(np.asarray(k)))
    return set_path(model.params, path, k + noise)


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request):
    if request.param == "llama":
        return llama.tiny_llama(seed=11, initializer_range=0.5)
    return hf.tiny("gpt2", seed=3, initializer_range=0.5)


@pytest.mark.parametrize("kv_cache", [True, False])
def test_many_equals_one_model_at_a_time(model, kv_cache):
    # 4 edited models (one is the base itself), each with its own prompts (1 to 6: one model needs 2
    # slots at batch_size 4) and its own number of new tokens; 3 models per call (the last call
    # is padded by repeating a slot)
    edited = [_edited(model, 0), model.params, _edited(model, 1, block=0), _edited(model, 2)]
    prompts = [PROMPTS[:3], PROMPTS[3:4], PROMPTS, PROMPTS[1:3]]
    steps = [5, 2, 7, 3]
    paths, leaves = stack_edits(model.params, edited)
    assert len(paths) == 2 and all(v.shape[0] == 4 for v in leaves)  # block 0's and the last block's kernel
    got = generate.greedy_ids_many(model, model.params, paths, leaves, prompts, steps, stop_at_eos=False,
                                   batch_size=4, models_per_call=3, kv_cache=kv_cache)
    want = [generate.greedy_ids(model, p, ps, n, stop_at_eos=False, batch_size=4, kv_cache=kv_cache)
            for p, ps, n in zip(edited, prompts, steps)]
    assert got == want
    assert [len(g) for g in got[2]] == [7] * len(PROMPTS)
    # the edits change the generations, so a mix-up of models would show
    assert got[0] != generate.greedy_ids(model, model.params, prompts[0], 5, stop_at_eos=False, kv_cache=kv_cache)


def test_generations_after_edits_equal_generate_answers(model):
    rows = lambda p, t, g: dict(prompt=p, target=t, group=g)  # noqa: E731
    edits = [(rows("the capital of", "paris is", "fail"), [rows("lima is", "red", "adapt"), rows("paris", "one two", "adapt")]),
             (rows("red blue", "green", "fail"), []),
             (rows("one two three", "four five six", "fail"), [rows("the capital of peru is", "lima", "adapt")])]
    edited = [_edited(model, i) for i in range(len(edits))]
    got = generations_after_edits(model, model.params, edited, edits, extra_tokens=2, models_per_call=2)
    for (f, a), p, g in zip(edits, edited, got):
        rs = [f, *a]
        assert g == generate_answers(model, p, [r["prompt"] for r in rs], [r["target"] for r in rs], extra_tokens=2)
        # and the metrics from the precomputed generations are the ones computed inside
        assert edit_generation_metrics(model, model.params, None, f, a, edited_generations=g) == \
            edit_generation_metrics(model, model.params, p, f, a)


def test_refuses_mismatched_inputs(model):
    paths, leaves = stack_edits(model.params, [_edited(model, 0)])
    with pytest.raises(ValueError, match="one per model"):
        generate.greedy_ids_many(model, model.params, paths, leaves, [PROMPTS[:2], PROMPTS[:1]], [3, 3])
    with pytest.raises(ValueError, match="edited parameter trees"):
        generations_after_edits(model, model.params, [model.params], [])
