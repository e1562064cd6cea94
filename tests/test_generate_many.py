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


@pytest.mark.parametrize("block", [1, 0])
def test_before_after_with_a_shared_prefill_equals_the_2e_models(model, block, monkeypatch):
    """`greedy_ids_before_after` (the pipeline's generations before and after each edit since
    session 16): the edited models' prefill starts at the first block the edits changed, on the
    base prefill's hidden state and KV cache below it. The same tokens as `greedy_ids_many` of the
    2E models [base x E, edited x E] (the pipeline's call before) and as `greedy_ids` of each model
    alone; block 0 (nothing to skip) takes that call itself."""
    n_blocks = len(model.layers.blocks)
    # edits from block 1 on (two of them also change the last block; the base itself is one edit)
    edited = [_edited(model, 0, block=block), _edited(model, 1, block=n_blocks - 1), model.params,
              set_path(_edited(model, 2, block=block), model.layers.blocks[-1].mlp[0].path,
                       get_path(_edited(model, 3, block=-1), model.layers.blocks[-1].mlp[0].path))]
    prompts = [PROMPTS[:3], PROMPTS[3:4], PROMPTS, PROMPTS[1:3]]
    steps = [5, 2, 7, 3]
    paths, leaves = stack_edits(model.params, edited)
    calls = []
    loop = generate._before_after_loop
    monkeypatch.setattr(generate, "_before_after_loop", lambda *a, **k: calls.append(a[2]) or loop(*a, **k))
    before, after = generate.greedy_ids_before_after(model, model.params, paths, leaves, prompts, steps,
                                                     stop_at_eos=False, batch_size=4, edits_per_call=3)
    # the shared prefill ran (2 calls of 3 edits: one edit has 2 slots), skipping the blocks before `block`
    assert calls == ([tuple(b.module_path for b in model.layers.blocks[:block])] * 2 if block else [])
    base = tuple(np.broadcast_to(np.asarray(get_path(model.params, p))[None], (4,) + v.shape[1:]) for p, v in zip(paths, leaves))
    both = generate.greedy_ids_many(model, model.params, paths, tuple(np.concatenate([b, np.asarray(v)]) for b, v in zip(base, leaves)),
                                    prompts * 2, steps * 2, stop_at_eos=False, batch_size=4, models_per_call=6)
    assert before == both[:4] and after == both[4:]
    for p, ps, n, b, a in zip(edited, prompts, steps, before, after):
        assert b == generate.greedy_ids(model, model.params, ps, n, stop_at_eos=False, batch_size=4)
        assert a == generate.greedy_ids(model, p, ps, n, stop_at_eos=False, batch_size=4)
    assert after[0] != before[0] and after[3] != before[3]  # the edits change the generations
    off = generate.greedy_ids_before_after(model, model.params, paths, leaves, prompts, steps, stop_at_eos=False,
                                           batch_size=4, edits_per_call=3, shared_prefill=False)
    assert off == (before, after)


def test_before_after_edits_as_text(model):
    """`generations_before_after_edits` = `generations_after_edits` of [base x E, edited x E], halved."""
    from salem_jax.eval.generated import generations_before_after_edits

    rows = lambda p, t, g: dict(prompt=p, target=t, group=g)  # noqa: E731
    edits = [(rows("the capital of", "paris is", "fail"), [rows("lima is", "red", "adapt")]),
             (rows("red blue", "green", "fail"), []),
             (rows("one two three", "four five six", "fail"), [rows("the capital of peru is", "lima", "adapt")])]
    edited = [_edited(model, i, block=1) for i in range(len(edits))]
    want = generations_after_edits(model, model.params, [model.params] * 3 + edited, edits + edits)
    assert generations_before_after_edits(model, model.params, edited, edits, edits_per_call=2) == (want[:3], want[3:])
    # identity edits (no leaf changed): the edited side equals the base side
    want = generations_after_edits(model, model.params, [model.params] * 2, edits[:2])
    assert generations_before_after_edits(model, model.params, [model.params] * 2, edits[:2]) == (want, want)
