"""`mend.retry` and `config.eval.mend_edit_retries`: an edit applied again while its own prompt misses
its target, checked against hand loops that score the target with numpy on the model's own logits
and against `apply_edits(..., mode="sequential")` with the request repeated (an independent path for
k applications)."""

import jax
import numpy as np
import pytest

from experiments import capitals_smollm2
from salem_jax.data.tokenize import encode
from salem_jax.mend.apply import apply_edits
from salem_jax.mend.retry import CHECK_ROWS, check_retries, edit_until_reached, reached, with_retries
from salem_jax.models import hf
from salem_jax.pipeline import retry_summary
from salem_jax.testing import noisy_editor, refused_up_front

R = 2  # extra applications allowed in these tests


@pytest.fixture(scope="module")
def setup():
    model = hf.tiny("gpt2", seed=0, n_layer=2)
    # the identity editor (its edit is a plain gradient step) at an edit rate where these requests
    # need 1 to 4 applications (measured on this tiny model: paris 4, rome 3, lima 2; the model's own
    # answer 1)
    editor = noisy_editor(model, ["h.1"], noise=0.0, lr_scale=300.0)
    own = _greedy_target(model, "the capital of spain is")
    rows = [dict(prompt="the capital of france is", target=t) for t in ("paris", "rome", "lima")]
    rows.append(dict(prompt="the capital of spain is", target=own))
    return model, editor, rows


def _greedy_target(model, prompt):
    enc = model.tokenizer(prompt, return_tensors="np")
    logits = np.asarray(model.apply(model.params, {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}))
    return model.tokenizer.decode([int(logits[0, -1].argmax())])


def _hand_reached(model, params, row) -> bool:
    """numpy: every target token is the argmax of the model's full logits at the position before it."""
    enc = encode(model, [row["prompt"]], [row["target"]])
    logits = np.asarray(model.apply(params, {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}))
    m = enc["label_mask"][0] != 0
    return bool((logits[0].argmax(-1)[m] == enc["labels"][0][m]).all())


def _edit_fn(model, editor):
    return lambda params, rows: apply_edits(model, editor, [dict(prompt=r["prompt"], target=r["target"]) for r in rows],
                                            params=params, progress=False)


def _hand_loop(model, editor, row, retries):
    """(params, applications kept, tried): edit once, then again while the numpy check fails, at most
    `retries` more; an edit that never reaches its target comes back as its first application."""
    req = [dict(prompt=row["prompt"], target=row["target"])]
    first = p = apply_edits(model, editor, req, progress=False)
    k = 1
    while k <= retries and not _hand_reached(model, p, row):
        p, k = apply_edits(model, editor, req, params=p, progress=False), k + 1
    if retries and not _hand_reached(model, p, row):
        return first, 1, k
    return p, k, k


def _assert_same(a, b, rtol=1e-5, atol=1e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def test_reached_equals_numpy_on_the_full_logits(setup):
    model, editor, rows = setup
    # more rows than one call checks (CHECK_ROWS), of both outcomes, before and after an edit
    many = (rows * 3)[: CHECK_ROWS + 3]
    edited = apply_edits(model, editor, [dict(prompt="the capital of france is", target="lima")] * 2, mode="sequential",
                         progress=False)
    for params in (model.params, edited):
        got = reached(model, params, many)
        want = np.array([_hand_reached(model, params, r) for r in many])
        np.testing.assert_array_equal(got, want)
        assert want.any() and not want.all()
    assert reached(model, model.params, []).shape == (0,)


def test_edit_until_reached_equals_the_hand_loop_and_the_sequential_edit(setup):
    model, editor, rows = setup
    edit = _edit_fn(model, editor)
    counts = []
    for row in rows:
        got, n, tried = edit_until_reached(model, edit, model.params, [row], R)
        want, k, k_tried = _hand_loop(model, editor, row, R)
        assert (n, tried) == (k, k_tried), row
        _assert_same(got, want)
        # n applications = the request applied n times in sequence (apply_edits' own loop)
        _assert_same(got, apply_edits(model, editor, [dict(prompt=row["prompt"], target=row["target"])] * n,
                                      mode="sequential", progress=False))
        counts.append((n, tried, _hand_reached(model, got, row)))
    # the cases the loop exists for: reached at once, reached by a retry, and still missed at the cap -
    # which comes back as its first application
    assert (1, 1, True) in counts and (1, R + 1, False) in counts, counts
    assert any(1 < n == t <= R + 1 and ok for n, t, ok in counts), counts
    # retries 0: the first edit, unchecked
    got, n, tried = edit_until_reached(model, edit, model.params, rows[:1], 0)
    assert n == tried == 1
    _assert_same(got, apply_edits(model, editor, [dict(prompt=rows[0]["prompt"], target=rows[0]["target"])], progress=False))


def test_with_retries_edits_each_row_alone_and_logs_every_edit_in_order(setup):
    model, editor, rows = setup
    edit = _edit_fn(model, editor)
    calls = []

    def edit_each(params, rs):
        calls.append(len(rs))
        return [edit(params, [r]) for r in rs]

    info = {}
    edit_r, each_r = with_retries(model, edit, edit_each, R, info)
    got = each_r(model.params, rows)
    assert calls == [len(rows)]  # the first edits computed together, by the method's own edit_each
    hand = [_hand_loop(model, editor, r, R) for r in rows]
    for g, (w, _, _) in zip(got, hand):
        _assert_same(g, w)
    assert info["edit_retries"] == {"max": R, "option": "config.eval.mend_edit_retries", "applications": [k for _, k, _ in hand], "tried": [t for _, _, t in hand]}
    # a combined edit of several rows: retried with the rows it misses, all of them checked each time; the
    # earliest edit reaching the most rows comes back
    combined = edit_r(model.params, rows[:3])
    p = edit(model.params, rows[:3])
    tried, best = [p], [sum(_hand_reached(model, p, r) for r in rows[:3])]
    for _ in range(R):
        miss = [r for r in rows[:3] if not _hand_reached(model, p, r)]
        if not miss:
            break
        p = edit(p, miss)
        tried.append(p)
        best.append(sum(_hand_reached(model, p, r) for r in rows[:3]))
    assert len(tried) > 1  # the combined case retried
    _assert_same(combined, tried[int(np.argmax(best))])
    assert info["edit_retries"]["applications"][-1] == int(np.argmax(best)) + 1
    assert info["edit_retries"]["tried"][-1] == len(tried)
    assert len(info["edit_retries"]["applications"]) == len(rows) + 1
    # 0: the very same functions, nothing logged
    info0 = {}
    assert with_retries(model, edit, edit_each, 0, info0) == (edit, edit_each) and info0 == {}


def test_retry_summary_fills_per_edit_in_order():
    res = {"per_edit": [{"record_id": "a"}, {"record_id": "b"}, {"record_id": "c"}, {"record_id": "d"}]}
    # later entries: other uses of the edit functions after the evaluation
    out = retry_summary({"max": 2, "applications": [1, 3, 2, 1, 1, 1], "tried": [1, 3, 2, 3, 1, 1]}, res)
    assert [(m["applications"], m["applications_tried"]) for m in res["per_edit"]] == [(1, 1), (3, 3), (2, 2), (1, 3)]
    assert out == {"max": 2, "option": "config.eval.mend_edit_retries", "retried": 3, "kept": 2, "gave_up": 1,
                   "reached_first": pytest.approx(0.25), "applications_mean": pytest.approx(7 / 4)}
    from salem_jax.pipeline import results_table

    table = results_table({"model": "m", "chosen_layers": ["h.1"], "profile": {"scorer": "salem"}, "training": {},
                           "methods": {"salem_edit": {"layers": ["h.1"], "edits": 4, "edit_seconds": 0.1, "ea": 1.0,
                                                      "edit_retries": out}}})
    assert ("salem_edit: 3 of 4 edits applied again while their own prompt missed the target "
            "(config.eval.mend_edit_retries=2), 2 of them reached it (the others evaluated at their first "
            "application); reached by the first application: 0.250") in table
    with pytest.raises(ValueError, match="2 edits logged for 3"):
        retry_summary({"max": 2, "applications": [1, 1], "tried": [1, 1]}, {"per_edit": [{}, {}, {}]})


@pytest.mark.parametrize("bad", [-1, True, 1.5, "1", None])
def test_bad_retries_are_refused(bad):
    with pytest.raises(ValueError, match="mend_edit_retries"):
        check_retries(bad)


def test_pipeline_refuses_bad_retries_before_reading_anything(tmp_path):
    cfg = capitals_smollm2.get_config(tiny=True)
    cfg.eval.mend_edit_retries = -1
    refused_up_front(cfg, tmp_path / "work", "mend_edit_retries")
