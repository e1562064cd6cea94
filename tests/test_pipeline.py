"""The pipeline's evaluation protocol and the experiment command line, on a tiny GPT-2."""

import jax
import numpy as np
import pytest

from experiments.common import apply_overrides
from salem_jax.models import hf
from salem_jax.pipeline import default_config, evaluate_method, results_table


def _rows():
    # words from salem_jax.testing.DEFAULT_WORDS so the tiny tokenizer knows them
    facts = [("the capital of france is", "paris"), ("the capital of peru is", "lima"), ("the capital of chile is", "santiago")]
    rows = []
    for i, (p, t) in enumerate(facts):
        rows.append(dict(id=f"f{i}", record_id=f"r{i}", group="fail", prompt=p, target=t, label=-1, text_pair=""))
        rows.append(dict(id=f"a{i}", record_id=f"r{i}", group="adapt", prompt=p.replace("the capital", "capital"),
                         target=t, label=-1, text_pair=""))
    for j, (p, t) in enumerate([("which river lies in egypt", "cairo"), ("the language of japan is", "yen")]):
        rows.append(dict(id=f"p{j}", record_id=f"q{j}", group="pass", prompt=p, target=t, label=-1, text_pair=""))
    return rows


_APPLY: dict = {}


def jit_apply(model):
    """`jax.jit(model.apply)`, one per model (kept alive with it): the hand computations below run the
    plain forward, compiled once per sequence length instead of op by op (one compilation per small op)."""
    return _APPLY.setdefault(id(model), (model, jax.jit(model.apply)))[1]


def _hand_correct(model, params, prompt, target):
    """Every target token is the argmax, one unpadded sequence at a time (numpy)."""
    tok = model.tokenizer
    p = tok(prompt)["input_ids"]
    t = tok(" " + target, add_special_tokens=False)["input_ids"]
    ids = np.asarray([p + t], np.int32)
    batch = dict(input_ids=ids, attention_mask=np.ones_like(ids))
    logits = np.asarray(jit_apply(model)(params, batch))[0]
    preds = logits[len(p) - 1 : len(p) + len(t) - 1].argmax(-1)
    return bool(np.all(preds == np.asarray(t)))


def test_evaluate_method_matches_hand_computation():
    model = hf.tiny("gpt2", seed=3)
    rows = _rows()
    cfg = default_config()
    cfg.progress = False
    cfg.eval.batch_size = 4
    # an "edit" that perturbs one MLP kernel, the same for every request
    import jax

    w = model.layers.weights(["h.1"])[0].path.split("/")
    edited = jax.tree.map(lambda x: x, model.params)
    node = edited
    for k in w[:-1]:
        node = node[k]
    node[w[-1]] = node[w[-1]] * 3.0 + 0.5

    out = evaluate_method(model, lambda reqs: edited, rows, [], cfg, "perturb")
    fails = [r for r in rows if r["group"] == "fail"]
    adapts = [r for r in rows if r["group"] == "adapt"]
    passes = [r for r in rows if r["group"] == "pass"]
    ea = np.mean([_hand_correct(model, edited, r["prompt"], r["target"]) for r in fails])
    # adapt accuracy is averaged per edit: each edit has exactly one rephrasing here
    adapt = np.mean([_hand_correct(model, edited, r["prompt"], r["target"]) for r in adapts])
    before = np.mean([_hand_correct(model, model.params, r["prompt"], r["target"]) for r in passes])
    after = np.mean([_hand_correct(model, edited, r["prompt"], r["target"]) for r in passes])
    assert out["edits"] == 3
    assert out["ea"] == pytest.approx(ea)
    assert out["adapt_acc"] == pytest.approx(adapt)
    assert out["dd_acc"] == pytest.approx(before - after)

    # the identity edit: nothing changes, locality is exactly 1 and drawdown 0
    same = evaluate_method(model, lambda reqs: model.params, rows, [], cfg, "none")
    assert same["locality"] == pytest.approx(1.0)
    assert same["dd_acc"] == pytest.approx(0.0)
    assert same["ea"] == pytest.approx(np.mean([_hand_correct(model, model.params, r["prompt"], r["target"]) for r in fails]))


def test_evaluate_method_batched_equals_per_edit():
    """config.eval.batch_edits: every edit scored in vmapped calls and generated in one batched
    call gives what scoring and generating each edit in its own call gives, for edits that differ
    per row (each fail row scales one MLP kernel by its own factor)."""
    import jax

    model = hf.tiny("gpt2", seed=3)
    rows = _rows()
    path = model.layers.weights(["h.1"])[0].path.split("/")
    scale = {r["prompt"]: 1.5 + i for i, r in enumerate(r for r in rows if r["group"] == "fail")}

    def edit(reqs):
        edited = jax.tree.map(lambda x: x, model.params)
        node = edited
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = node[path[-1]] * scale[reqs[0]["prompt"]] + 0.5
        return edited

    outs = {}
    for batched in (True, False):
        cfg = default_config()
        cfg.progress = False
        cfg.eval.batch_size = 4
        cfg.eval.batch_edits = batched
        outs[batched] = evaluate_method(model, edit, rows, [], cfg, "perturb")
    assert outs[True]["edits"] == outs[False]["edits"] == 3
    num = {k for k, v in outs[False].items() if isinstance(v, float) and "seconds" not in k}
    assert num == {k for k, v in outs[True].items() if isinstance(v, float) and "seconds" not in k} and "ea" in num
    assert any(k.startswith("gen/") for k in num)
    for k in num:
        assert outs[True][k] == pytest.approx(outs[False][k], rel=2e-4, abs=1e-6), k


def test_results_table_lists_every_method():
    out = dict(
        model="m", chosen_layers=["h.1"], profile={"scorer": "salem"},
        methods={"salem": {"edits": 2, "ea": 1.0, "fail/acc_before": 0.0, "layers": ["h.1"], "edit_seconds": 0.5},
                 "ft": {"edits": 2, "ea": 0.5, "layers": ["h.1"], "edit_seconds": 0.1}},
        training={"salem": {"steps": 7}},
    )
    table = results_table(out)
    assert "| salem | h.1 | 1.000 |" in table
    assert "| ft | h.1 | 0.500 |" in table
    assert "| base (no edit) | - | 0.000 |" in table
    assert "| 7 |" in table


def test_config_overrides_are_typed_and_checked():
    cfg = default_config()
    apply_overrides(cfg, ["--config.editor.steps=7", "--config.methods=salem,ft", "--config.progress=false",
                          "--config.eval.text_window=64", "--config.data=/x.json"])
    assert cfg.editor.steps == 7 and cfg.methods == ("salem", "ft") and cfg.progress is False
    assert cfg.eval.text_window == 64 and cfg.data == "/x.json"
    with pytest.raises(KeyError, match="unknown key"):
        apply_overrides(cfg, ["--config.editor.stepz=1"])
    with pytest.raises(ValueError):
        apply_overrides(cfg, ["--config.editor.steps=many"])
    with pytest.raises(ValueError, match="overrides look like"):
        apply_overrides(cfg, ["--steps=3"])


def test_train_mend_returns_the_best_validation_checkpoint(monkeypatch):
    """The pipeline evaluates the editor of the lowest validation loss (MEND's protocol), not the last step."""
    import dataclasses

    import jax
    from test_mend_train import tiny_setup, trained_run

    import salem_jax.methods.mend as M
    from salem_jax.mend.checkpoint import restore_editor

    model, data, _, _, _ = tiny_setup()
    result, workdir, _, _ = trained_run()
    assert result.step == 100
    # pretend step 50 validated best: train_mend must hand back that checkpoint's editor
    monkeypatch.setattr(M, "train_editor", lambda *a, **k: dataclasses.replace(result, best_step=50))
    editor, tr = M.train_mend(model, data, ("h.0",), default_config(), workdir)
    assert editor.step == 50 and tr.step == 100
    _, params50, state50, _ = restore_editor(workdir / "checkpoints", 50)
    for a, b in zip(jax.tree.leaves((editor.params, editor.state)), jax.tree.leaves((params50, state50))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # and the last step when it is the best
    monkeypatch.setattr(M, "train_editor", lambda *a, **k: dataclasses.replace(result, best_step=100))
    editor, _ = M.train_mend(model, data, ("h.0",), default_config(), workdir)
    assert editor.step == 100
    for a, b in zip(jax.tree.leaves(editor.params), jax.tree.leaves(result.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_evaluate_method_with_edit_each_equals_one_edit_call_per_row(monkeypatch):
    """`evaluate_method(..., edit_each=)` (a method's edits of every val row in one call, MEND's
    `mend_edit_each_fn`) gives the metrics of calling `edit` once per row (`mend_edit_fn`), with an
    identity-initialised MEND editor of h.1 on a tiny GPT-2, the rows padded to the fail rows' shape
    as the pipeline pads them (`like`)."""
    from salem_jax.mend.apply import TrainedEditor, encode_requests, fit_to, scaled_editor
    from salem_jax.mend.editor import EditorSpec, init_editor
    from salem_jax.methods.mend import mend_edit_each_fn, mend_edit_fn
    from salem_jax.methods.rows import target

    model = hf.tiny("gpt2", seed=3)
    rows = _rows()
    spec = EditorSpec.from_params(model.layers.weights(["h.1"]), model.params)
    params, state = init_editor(spec, jax.random.PRNGKey(0))
    editor = scaled_editor(TrainedEditor(spec=spec, params=params, state=state, model_name=model.name, step=0), 100.0)
    fails = [r for r in rows if r["group"] == "fail"]
    like = fit_to(encode_requests(model, [(r["prompt"], target(model, r)) for r in fails]), None)
    edit, each = mend_edit_fn(model, editor, like=like), mend_edit_each_fn(model, editor, like=like)
    cfg = default_config()
    cfg.progress = False
    cfg.eval.batch_size = 4
    alone = evaluate_method(model, lambda reqs: edit(model.params, reqs), rows, [], cfg, "mend")
    together = evaluate_method(model, lambda reqs: edit(model.params, reqs), rows, [], cfg, "mend",
                               edit_each=lambda rs: each(model.params, rs))
    num = {k for k, v in alone.items() if isinstance(v, float) and "seconds" not in k}
    assert num == {k for k, v in together.items() if isinstance(v, float) and "seconds" not in k} and "ea" in num
    # the edits move the numbers (a scaled identity editor: one large gradient step per row)
    assert abs(alone["fail/ppl_after"] / alone["fail/ppl_before"] - 1) > 0.05
    for k in num:
        assert together[k] == pytest.approx(alone[k], rel=1e-5, abs=1e-6), k
    # in chunks of 2 records (the last one short): the same metrics
    import salem_jax.pipeline as pipeline_module

    assert len(fails) % 2 == 1
    monkeypatch.setattr(pipeline_module, "EDIT_EACH_CHUNK", 2)
    calls = []
    chunked = evaluate_method(model, lambda reqs: edit(model.params, reqs), rows, [], cfg, "mend",
                              edit_each=lambda rs: calls.append(len(rs)) or each(model.params, rs))
    assert calls == [2] * (len(fails) // 2) + [1]
    for k in num:
        assert chunked[k] == pytest.approx(alone[k], rel=1e-5, abs=1e-6), k
