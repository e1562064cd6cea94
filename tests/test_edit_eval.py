"""Many edits at one fixed shape (salem_jax.eval.edits, mend.apply.fit_to): the numbers of the
per-edit path (`evaluate_edit`, `apply_edits` at each request's own shape), and no compilation
after the first edit."""

import contextlib

import jax
import numpy as np
import pytest

from salem_jax.eval.edits import EditEvaluator
from salem_jax.eval.metrics import base_scores, evaluate_edit
from salem_jax.mend.apply import TrainedEditor, apply_each, apply_edits, encode_requests, fit_to
from salem_jax.mend.editor import EditorSpec, init_editor
from salem_jax.models import hf
from salem_jax.models.base import get_path, set_path
from salem_jax.scored_logits import positions_within

# prompts and targets of different lengths and target token counts (1, 2 and 3 tokens), so
# that the per-edit path pads each edit differently
FACTS = [
    ("the capital of france is", "paris", ["capital of france is", "the city of france is"]),
    ("what is the capital city of the country peru in america", "lima lima", ["peru capital is"]),
    ("chile", "santiago is a city", []),
    ("the language of japan is", "yen", ["japan speaks", "the language spoken in japan is", "in japan they speak"]),
]
PASS = [("which river lies in egypt", "cairo"), ("the currency of india is", "rupee")]
KEEP = [("the capital of kenya is", "nairobi"), ("the capital of germany is a city", "berlin"), ("brazil", "brasilia")]
TEXTS = ["the capital of france is paris and the capital of peru is lima " * 3, "red blue green yellow one two"]


def _row(p, t, group, i):
    return dict(id=f"{group}{i}", record_id=f"r{i}", group=group, prompt=p, target=t, label=-1, text_pair="")


def _edits():
    return [
        {"fail": [_row(p, t, "fail", i)], "adapt": [_row(a, t, "adapt", i) for a in reph]}
        for i, (p, t, reph) in enumerate(FACTS)
    ]


def _shared():
    return {"pass": [_row(p, t, "pass", i) for i, (p, t) in enumerate(PASS)],
            "keep": [_row(p, t, "keep", i) for i, (p, t) in enumerate(KEEP)]}


@pytest.fixture(scope="module")
def model():
    return hf.tiny("gpt2", seed=5)


def _perturbed(model, i):
    """Edit i's "edited" parameters: one MLP kernel changed by a different amount per edit."""
    path = model.layers.weights(["h.1"])[0].path
    k = get_path(model.params, path)
    return set_path(model.params, path, k * (1.5 + 0.5 * i) + 0.1 * i)


@contextlib.contextmanager
def _count_compiles():
    """Counts XLA backend compilations inside the block (jax.monitoring events)."""
    seen = []

    def listen(event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            seen.append(event)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield seen
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)


def test_fixed_shape_evaluation_equals_evaluate_edit_per_edit(model):
    edits, shared = _edits(), _shared()
    ev = EditEvaluator(model, model.params, edits, shared, texts=TEXTS, text_window=8, batch_size=4)
    base = base_scores(model, model.params, shared, texts=TEXTS, batch_size=4, text_window=8, progress=False)
    for i, own in enumerate(edits):
        edited = _perturbed(model, i)
        own = {k: v for k, v in own.items() if v}  # the pipeline leaves out an edit's empty adapt group
        want = evaluate_edit(model, model.params, edited, own, batch_size=4, progress=False)
        want.update(evaluate_edit(model, model.params, edited, shared, texts=TEXTS, text_window=8, base=base,
                                  batch_size=4, progress=False))
        got = ev.evaluate(i, edited, with_text=True)
        assert sorted(got) == sorted(want)
        for k, v in want.items():
            # perplexities (and their differences, `dd_ppl_*_abs`) are exp of a sum of float32 NLLs
            # taken in other chunk shapes: rel 1e-4 (seen: 2.3e-5 on dd_ppl_text_abs); the rest tighter
            tol = dict(rel=1e-4, abs=1e-5) if "ppl" in k else dict(rel=1e-5, abs=1e-6)
            assert got[k] == pytest.approx(v, nan_ok=True, **tol), k
        # the edits change something, so the comparison is not between two unchanged models
        assert want["locality"] < 1.0 or want["fail/acc_after"] != want["fail/acc_before"] or i == 0
        no_text = ev.evaluate(i, edited)
        assert "text_ppl_after" not in no_text and no_text["ea"] == got["ea"]
    assert ev.rows_per_edit == 4
    # the edited pass runs the shared rows in two parts of one length each (session 16), the 4th
    # row (the longest) in the second: the parts' outputs are put back in row order
    assert [(list(idx), cut) for idx, cut in ev._shared_parts] == [([0, 1, 2, 4], 8), ([3], 16)]


def test_own_rows_cut_after_the_longest_equal_evaluate_edit(model):
    """Own rows encoded at 32 tokens whose longest has 17 run at 24 (`_cut_to_longest`, session
    16): the numbers of `evaluate_edit` at the rows' own shapes."""
    long = "the capital of france is a city that we all know from old stories and"
    edits = [{"fail": [_row(long, "paris", "fail", 0)], "adapt": [_row("capital of france is", "paris", "adapt", 0)]},
             {"fail": [_row("chile", "santiago is a city", "fail", 1)]}]
    ev = EditEvaluator(model, model.params, edits, _shared(), batch_size=4)
    assert ev._own["attention_mask"].shape[-1] == 24
    for i, own in enumerate(edits):
        edited = _perturbed(model, i + 1)
        want = evaluate_edit(model, model.params, edited, {**own, **_shared()}, batch_size=4, progress=False)
        got = ev.evaluate(i, edited)
        assert sorted(got) == sorted(want)
        for k, v in want.items():
            assert got[k] == pytest.approx(v, nan_ok=True, **(dict(rel=1e-4, abs=1e-5) if "ppl" in k else dict(rel=1e-5, abs=1e-6))), k


def test_short_edit_beside_a_long_target_equals_evaluate_edit(model):
    """One edit's long target gives every own row K score positions, more than a short edit's rows
    have once cut to their length - the shape that made `apply_each`'s edits wrong (session 35:
    positions gathered past the cut, which JAX fills with NaN logits and an active INT_MIN mask).
    The evaluator scores own rows at their flat target positions, so it gave the right numbers
    before `_cut` pointed such positions inside (`positions_within`) too; this pins that down."""
    edits = [{"fail": [_row(" ".join(["where"] * 40), " ".join(["paris lima santiago berlin"] * 5), "fail", 0)]},
             {"fail": [_row("chile", "santiago is a city", "fail", 1)], "adapt": [_row("capital of chile", "santiago", "adapt", 1)]}]
    ev = EditEvaluator(model, model.params, edits, _shared(), batch_size=4)
    assert ev._own["score_pos"].shape[-1] > 16
    for i, own in enumerate(edits):
        edited = _perturbed(model, i + 1)
        want = evaluate_edit(model, model.params, edited, {**own, **_shared()}, batch_size=4, progress=False)
        got = ev.evaluate(i, edited)
        for k, v in want.items():
            assert got[k] == pytest.approx(v, nan_ok=True, **(dict(rel=1e-4, abs=1e-5) if "ppl" in k else dict(rel=1e-5, abs=1e-6))), k


def test_score_positions_past_a_cut_point_at_an_unscored_one():
    mask = np.array([[0, 1, 1, 0], [1, 1, 0, 0]])
    pos = np.array([[1, 2, 0, 6, 9], [0, 1, 2, 3, 4]])
    np.testing.assert_array_equal(positions_within(pos, mask), [[1, 2, 0, 0, 0], [0, 1, 2, 3, 2]])
    np.testing.assert_array_equal(positions_within(pos[:, :3], mask), pos[:, :3])  # nothing past: unchanged
    with pytest.raises(ValueError, match="every position is scored"):
        positions_within(np.array([[0, 5]]), np.array([[1, 1]]))


def test_fixed_shape_evaluation_compiles_once_for_all_edits(model):
    edits, shared = _edits(), _shared()
    ev = EditEvaluator(model, model.params, edits, shared, texts=TEXTS, text_window=8, batch_size=4)
    ev.evaluate(0, _perturbed(model, 0), with_text=True)
    ev.evaluate(0, _perturbed(model, 0))
    with _count_compiles() as compiles:
        for i in range(1, len(edits)):
            ev.evaluate(i, _perturbed(model, i), with_text=i % 2 == 0)
    assert compiles == []
    # the per-edit path compiles anew for these edits (new lengths and K): the counter sees it
    # (two edits of different lengths suffice: each compiles its own bucketed length)
    with _count_compiles() as compiles:
        for i, own in enumerate(edits[:2]):
            evaluate_edit(model, model.params, _perturbed(model, i), {k: v for k, v in own.items() if v},
                          batch_size=3, progress=False)
    assert len(compiles) >= 2


def _editor(model):
    spec = EditorSpec.from_params(model.layers.weights(["h.1"]), model.params)
    params, state = init_editor(spec, jax.random.PRNGKey(0))  # identity nets: one scaled gradient step
    return TrainedEditor(spec=spec, params=params, state=state, model_name=model.name, step=0)


def test_edits_padded_to_one_shape_equal_their_own_shape_and_compile_once(model):
    editor = _editor(model)
    like = fit_to(encode_requests(model, [(p, t) for p, t, _ in FACTS]), None)  # every request fits
    assert like["input_ids"].shape[-1] > encode_requests(model, [FACTS[2][:2]])["input_ids"].shape[-1]
    path = editor.spec.weights[0].path
    base_k = np.asarray(get_path(model.params, path))
    apply_edits(model, editor, [FACTS[0][:2]], like=like, progress=False)  # compile
    with _count_compiles() as compiles:
        got = [apply_edits(model, editor, [(p, t)], like=like, progress=False) for p, t, _ in FACTS[1:]]
    assert compiles == []
    for (p, t, _), new in zip(FACTS[1:], got):
        want = np.asarray(get_path(apply_edits(model, editor, [(p, t)], progress=False), path))
        k = np.asarray(get_path(new, path))
        assert np.abs(want - base_k).max() > 1e-7  # the edit does something
        np.testing.assert_allclose(k, want, rtol=1e-5, atol=1e-7)
    # a request longer than `like` keeps its own shape (and the same edit)
    short = fit_to(encode_requests(model, [FACTS[2][:2]]), None)
    long = (FACTS[1][0], FACTS[1][1])
    k_fit = np.asarray(get_path(apply_edits(model, editor, [long], like=short, progress=False), path))
    k_own = np.asarray(get_path(apply_edits(model, editor, [long], progress=False), path))
    np.testing.assert_array_equal(k_fit, k_own)


def test_edits_applied_together_equal_one_call_each(model):
    """`apply_each` (the pipeline's val edits in one vmapped call) against `apply_edits` of each
    request alone: the same edited kernels per request, every other leaf the base's own object;
    with `like` too short for one request, that request keeps its own shape (a second group) and
    still gets its own edit; a group larger than `per_call` runs in padded calls."""
    editor = _editor(model)
    reqs = [(p, t) for p, t, _ in FACTS]
    paths = [w.path for w in editor.spec.weights]
    like = fit_to(encode_requests(model, reqs), None)
    short = fit_to(encode_requests(model, [FACTS[2][:2]]), None)  # FACTS[1] does not fit it
    # a `like` with a long target (its K score positions outnumber a short request's positions once
    # the stacked rows are cut after their longest: the zsRE val split on SmolLM2, session 35, whose
    # edits came out 4x too large from positions gathered past the cut)
    long_row = (" ".join(["where"] * 40), " ".join(["paris lima santiago berlin"] * 5))
    wide = fit_to(encode_requests(model, reqs + [long_row]), None)
    assert wide["score_pos"].shape[-1] > 2 * max(len(model.tokenizer(p + " " + t)["input_ids"]) for p, t in reqs)
    base_leaves = {id(x) for x in jax.tree.leaves(model.params)}
    for lk, per_call in ((like, 32), (short, 32), (like, 3), (wide, 32)):
        got = apply_each(model, editor, reqs, like=lk, per_call=per_call)
        assert len(got) == len(reqs)
        for r, new in zip(reqs, got):
            want = apply_edits(model, editor, [r], like=lk if lk is not wide else None, progress=False)
            for path in paths:
                k, w = np.asarray(get_path(new, path)), np.asarray(get_path(want, path))
                assert np.abs(w - np.asarray(get_path(model.params, path))).max() > 1e-7  # the edit does something
                np.testing.assert_allclose(k, w, rtol=1e-5, atol=1e-7)
            kept = [x for x in jax.tree.leaves(new) if id(x) in base_leaves]
            assert len(kept) == len(jax.tree.leaves(model.params)) - len(paths)
    # edits differ from each other (not one edit repeated)
    a, b = (np.asarray(get_path(g, paths[0])) for g in got[:2])
    assert np.abs(a - b).max() > 1e-7


def test_shared_rows_without_score_positions_in_parts_equal_evaluate_edit(model):
    """A shared row whose target has as many tokens as the encoding is long gets no `score_pos`
    (`with_score_positions` returns the batch unchanged), so the base argmax is [N, S]; the edited
    pass still runs the shared rows in parts cut to their own lengths (zsRE locality answers on
    SmolLM2, session 18: an IndexError at the first evaluation). The numbers of `evaluate_edit`."""
    long_target = " ".join(["paris lima santiago berlin"] * 3)
    shared = {"pass": [_row("the capital of france is", "paris", "pass", 0),
                       _row("x", long_target, "pass", 1)],
              "keep": [_row("brazil", "brasilia", "keep", 0)]}
    edits = _edits()[:2]
    ev = EditEvaluator(model, model.params, edits, shared, batch_size=4)
    assert "score_pos" not in ev._shared_host
    assert len(ev._shared_parts) == 2 and ev._shared_parts[0][1] < ev._shared_host["attention_mask"].shape[-1]
    for i, own in enumerate(edits):
        edited = _perturbed(model, i + 1)
        own = {k: v for k, v in own.items() if v}
        want = evaluate_edit(model, model.params, edited, {**own, **shared}, batch_size=4, progress=False)
        got = ev.evaluate(i, edited)
        assert sorted(got) == sorted(want)
        for k, v in want.items():
            tol = dict(rel=1e-4, abs=1e-5) if "ppl" in k else dict(rel=1e-5, abs=1e-6)  # as above
            assert got[k] == pytest.approx(v, nan_ok=True, **tol), k
        assert want["locality"] < 1.0, "the perturbed model changes some shared answer"
