"""Portability: the zsRE reader keeps EasyEdit's questions; the metric is EA on them (hand computations)."""

import json

import jax
import numpy as np
import pytest

from salem_jax.data.readers import read_zsre
from salem_jax.data.records import EditRecord, RecordError
from salem_jax.eval.portability import portability_from_logits, portability_rows
from salem_jax.models import hf
from salem_jax.pipeline import default_config, evaluate_method, results_table


def _zsre(i, portability=None):
    r = dict(subject=f"s{i}", src=f"question {i}?", rephrase=f"rephrased {i}?", alt=f"new{i}", answers=[f"old{i}"],
             loc="nq question: x", loc_ans="y", pred="p", cond="c")
    if portability is not None:
        r["portability"] = portability
    return r


def test_reader_keeps_portability_questions(tmp_path):
    p = tmp_path / "port.json"
    rows = [_zsre(0, {"Recalled Relation": "(a, b, c)", "New Question": "what follows?", "New Answer": "this"}),
            _zsre(1, [{"New Question": "q1", "New Answer": ["a1", "b1"]}, {"New Question": "q2", "New Answer": "a2"}])]
    p.write_text(json.dumps(rows))
    recs = read_zsre(p)
    assert recs[0].extra["portability_prompts"] == ["what follows?"]
    assert recs[0].extra["portability_targets"] == ["this"]
    assert recs[1].extra["portability_prompts"] == ["q1", "q2"]
    assert recs[1].extra["portability_targets"] == ["a1", "a2"]
    # a plain zsRE record has none
    p2 = tmp_path / "plain.json"
    p2.write_text(json.dumps([_zsre(0)]))
    assert "portability_prompts" not in read_zsre(p2)[0].extra


@pytest.mark.parametrize("port", [{"New Question": "q"}, {"New Question": "q", "New Answer": None},
                                  {"New Question": "q", "New Answer": ""}])
def test_portability_without_answer_names_file_record_and_field(tmp_path, port):
    p = tmp_path / "bad.json"
    p.write_text(json.dumps([_zsre(0, {"New Question": "q0", "New Answer": "a0"}), _zsre(1, port)]))
    with pytest.raises(RecordError) as e:
        read_zsre(p)
    msg = str(e.value)
    assert str(p) in msg and "record 1" in msg and "portability.New Answer" in msg


def test_portability_from_fixed_logits_equals_hand_count():
    rng = np.random.default_rng(0)
    q, s, v = 6, 5, 7
    logits = rng.normal(size=(q, s, v)).astype(np.float32)
    labels = rng.integers(0, v, size=(q, s)).astype(np.int32)
    mask = np.zeros((q, s), np.int32)
    mask[:, 2:] = 1
    mask[0, 4] = 0
    # make some questions right: set their labels to the argmax on the masked positions
    for k in (1, 3, 4):
        labels[k] = np.where(mask[k] > 0, logits[k].argmax(-1), labels[k])
    labels[4, 3] = (logits[4, 3].argmax() + 1) % v  # one wrong token: the whole answer is wrong
    hand = np.mean([all(logits[k, t].argmax() == labels[k, t] for t in range(s) if mask[k, t]) for k in range(q)])
    assert hand == pytest.approx(2 / 6)
    assert portability_from_logits(jax.numpy.asarray(logits), labels, mask) == pytest.approx(hand)


def test_pipeline_portability_is_mean_over_edits_of_questions_answered():
    from test_pipeline import _hand_correct

    model = hf.tiny("gpt2", seed=3)
    recs = [
        EditRecord(id="r0", prompt="the capital of france is", target_true="paris", target_new="rome",
                   extra={"portability_prompts": ["the capital of italy is", "the city of spain is"],
                          "portability_targets": ["rome", "paris"]}),
        EditRecord(id="r1", prompt="the capital of peru is", target_true="lima", target_new="cairo",
                   extra={"portability_prompts": ["the language of japan is"], "portability_targets": ["yen"]}),
    ]
    port = portability_rows(recs)
    assert [r["prompt"] for r in port["r0"]] == ["the capital of italy is", "the city of spain is"]
    rows = [dict(id=f"f{i}", record_id=r.id, group="fail", prompt=r.prompt, target=r.target_new, label=-1, text_pair="")
            for i, r in enumerate(recs)]
    rows.append(dict(id="p0", record_id="q0", group="pass", prompt="which river lies in egypt", target="cairo",
                     label=-1, text_pair=""))
    cfg = default_config()
    cfg.progress = False
    cfg.eval.batch_size = 4
    cfg.eval.generate = False
    edited = jax.tree.map(lambda x: x * 1.3 + 0.2 if x.ndim == 2 else x, model.params)
    out = evaluate_method(model, lambda reqs: edited, rows, [], cfg, "perturb", portability=port)

    def hand(params):
        return np.mean([np.mean([_hand_correct(model, params, p, t) for p, t in
                                 zip(r.extra["portability_prompts"], r.extra["portability_targets"])]) for r in recs])

    assert out["portability"] == pytest.approx(hand(edited))
    assert out["portability_before"] == pytest.approx(hand(model.params))
    table = results_table(dict(model="m", chosen_layers=["h.1"], profile={"scorer": "salem"},
                               methods={"perturb": {**out, "layers": ["h.1"]}}, training={}))
    assert "| portability |" in table


def test_portability_over_edits_is_the_mean_of_each_edits_share():
    """Fixed flags: edit 0 has 2 questions (1 right), edit 1 none, edit 2 one (right), edit 3 three (0 right):
    per-edit shares 0.5, 1, 0 averaged over the 3 edits with questions = 0.5 (question weighted would be 2/6)."""
    from salem_jax.eval.portability import portability_over_edits

    flags = np.array([True, False, True, False, False, False])
    assert portability_over_edits(flags, [2, 0, 1, 3]) == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    assert np.isnan(portability_over_edits(np.zeros(0, bool), [0, 0]))
    with pytest.raises(ValueError, match="6 portability answers scored for 5 questions"):
        portability_over_edits(flags, [2, 0, 3])
