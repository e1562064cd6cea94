"""The held-out keep set (salem_jax.eval.keep) and its drawdown in the pipeline, on a tiny GPT-2."""

import itertools

import numpy as np
import pytest
from test_pipeline import jit_apply

from salem_jax.data.records import EditRecord
from salem_jax.eval.keep import candidate_rows, keep_rows
from salem_jax.models import hf
from salem_jax.pipeline import evaluate_method
from salem_jax.testing import DEFAULT_WORDS


def _next_word(model, params, prompt):
    """The base model's argmax next token after `prompt`, one unpadded sequence (numpy)."""
    ids = np.asarray([model.tokenizer(prompt)["input_ids"]], np.int32)
    logits = np.asarray(jit_apply(model)(params, dict(input_ids=ids, attention_mask=np.ones_like(ids))))[0, -1]
    return int(logits.argmax())


@pytest.fixture(scope="module")
def model():
    return hf.tiny("gpt2", seed=5)


@pytest.fixture(scope="module")
def records(model):
    """24 one-word-answer records; the even ones have the model's own argmax as the target
    (so it gets them right), the odd ones a different word (so it gets them wrong)."""
    tok = model.tokenizer
    words = [w for w in DEFAULT_WORDS if w.isalpha()]
    out, truth = [], {}
    for a, b in itertools.product(words[:12], words[12:20]):
        prompt = f"the {a} of {b} is"
        nxt = _next_word(model, model.params, prompt)
        if nxt < 4:  # a special token: not a word target
            continue
        word = tok.convert_ids_to_tokens(nxt)
        i = len(out)
        target = word if i % 2 == 0 else next(w for w in words if w != word)
        out.append(EditRecord(id=f"k{i}", prompt=prompt, target_true=target))
        truth[f"keep:k{i}"] = i % 2 == 0
        if len(out) == 24:
            break
    assert len(out) == 24
    return out, truth


def test_keep_rows_are_exactly_the_ones_the_model_gets_right(model, records):
    recs, truth = records
    rows = keep_rows(model, recs, max_rows=100, seed=0, batch_size=4)
    assert sorted(r["id"] for r in rows) == sorted(k for k, ok in truth.items() if ok)
    assert all(r["group"] == "keep" for r in rows)
    # a cap takes the first correct rows of the seeded order: deterministic, and a prefix of the full order
    few = keep_rows(model, recs, max_rows=3, seed=0, batch_size=4)
    assert [r["id"] for r in few] == [r["id"] for r in rows[:3]]
    assert [r["id"] for r in keep_rows(model, recs, max_rows=3, seed=0, batch_size=4)] == [r["id"] for r in few]


def test_keep_rows_exclude_and_errors(model, records):
    recs, truth = records
    gone = recs[0].prompt  # record 0 is one the model gets right
    rows = keep_rows(model, recs, max_rows=100, batch_size=4, exclude_prompts=[gone])
    assert gone not in {r["prompt"] for r in rows} and len(rows) == sum(truth.values()) - 1
    wrong_only = [r for i, r in enumerate(recs) if i % 2 == 1]
    with pytest.raises(ValueError, match="none of the 12 keep rows"):
        keep_rows(model, wrong_only, max_rows=5, batch_size=4)
    with pytest.raises(ValueError, match="record 1 .*'k1'.*target_true"):
        candidate_rows([recs[0], EditRecord(id="k1", prompt="the", target_true=" ")])
    with pytest.raises(ValueError, match="max_rows"):
        keep_rows(model, recs, max_rows=0)


def test_pipeline_reports_keep_drawdown(model, records):
    import jax

    from salem_jax.pipeline import default_config

    recs, _ = records
    keep = keep_rows(model, recs, max_rows=100, batch_size=4)
    rows = [dict(id="f0", record_id="r0", group="fail", prompt="the capital of peru is", target="lima", label=-1, text_pair=""),
            dict(id="p0", record_id="q0", group="pass", prompt="the language of japan is", target="yen", label=-1, text_pair="")]
    cfg = default_config()
    cfg.progress = False
    cfg.eval.batch_size = 4
    cfg.eval.generate = False  # the keep set's scores only (generations: tests/test_generated.py)
    edited = jax.tree.map(lambda x: x * 1.7 + 0.3 if x.ndim == 2 else x, model.params)
    out = evaluate_method(model, lambda reqs: edited, rows, [], cfg, "perturb", keep=keep)
    after = np.mean([_next_word(model, edited, r["prompt"]) == model.tokenizer.convert_tokens_to_ids(r["target"]) for r in keep])
    assert out["keep/acc_before"] == pytest.approx(1.0)
    assert out["dd_keep_acc"] == pytest.approx(1.0 - after)
    assert 0.0 < out["dd_keep_acc"]  # the perturbation breaks some kept facts
    same = evaluate_method(model, lambda reqs: model.params, rows, [], cfg, "none", keep=keep)
    assert same["dd_keep_acc"] == 0.0 and same["keep/locality"] == pytest.approx(1.0)


def test_results_table_shows_keep_column_only_when_measured():
    from salem_jax.pipeline import results_table

    def out(**extra):
        m = {"edits": 1, "ea": 1.0, "layers": ["h.1"], "edit_seconds": 0.1, **extra}
        return dict(model="m", chosen_layers=["h.1"], profile={"scorer": "salem"}, methods={"salem": m}, training={})

    assert "DD (keep acc)" not in results_table(out())
    table = results_table(out(dd_keep_acc=0.25))
    assert "DD (keep acc)" in table and "0.250" in table


SCALES = (0.003, 0.008, 0.015)


def test_keep_split_by_relation_and_per_edit_outcomes(model, records):
    """config.eval.keep_split: each relation's keep rows reported on their own, and out["per_edit"] each
    edit's own outcome; both against a hand loop of argmax next words on the edited weights."""
    import jax

    from salem_jax.eval.keep import keep_relation, split_by_relation
    from salem_jax.pipeline import default_config

    recs, _ = records
    rels = ("region", "currency", "languages")
    keep = [dict(r, record_id=f"countryinfo:{rels[i % 3]}:C{i}")  # interleaved: the split has to regroup them
            for i, r in enumerate(keep_rows(model, recs, max_rows=100, batch_size=4))]
    tid = model.tokenizer.convert_tokens_to_ids
    fails = [dict(id=f"f{i}", record_id=f"r{i}", group="fail", prompt=recs[2 * i + 1].prompt, target=recs[2 * i + 1].target_true,
                  label=-1, text_pair="") for i in range(3)]
    def noisy(seed, scale):  # random perturbations that break some keep rows, not all
        leaves, tree = jax.tree.flatten(model.params)
        keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
        return jax.tree.unflatten(tree, [x + scale * jax.random.normal(k, x.shape, x.dtype) if x.ndim == 2 else x
                                         for x, k in zip(leaves, keys)])

    edited = {f["prompt"]: noisy(i, sc) for i, (f, sc) in enumerate(zip(fails, SCALES))}
    cfg = default_config()
    cfg.progress, cfg.eval.batch_size, cfg.eval.generate = False, 4, False
    cfg.eval.keep_split = True
    # pass rows first in the shared rows: each relation's span has to be offset past them
    passes = [dict(id=f"p{i}", record_id=f"q{i}", group="pass", prompt=recs[2 * i].prompt, target=recs[2 * i].target_true,
                   label=-1, text_pair="") for i in range(3)]
    out = evaluate_method(model, lambda reqs: edited[reqs[0]["prompt"]], fails + passes, [], cfg, "perturb", keep=keep)
    hand, lost = [], []
    for f in fails:
        p = edited[f["prompt"]]
        ok = {r["id"]: _next_word(model, p, r["prompt"]) == tid(r["target"]) for r in keep}
        by = {rel: 1.0 - np.mean([ok[r["id"]] for r in keep if r["record_id"].split(":")[1] == rel]) for rel in rels}
        hand.append(dict(ea=float(_next_word(model, p, f["prompt"]) == tid(f["target"])),
                         dd_keep_acc=1.0 - np.mean(list(ok.values())), **{f"dd_keep_acc_{k}": v for k, v in by.items()}))
        lost.append(sorted(i for i, right in ok.items() if not right))  # keep rows are all right on the base model
    assert len(out["per_edit"]) == 3
    for got, want, f, broke in zip(out["per_edit"], hand, fails, lost):
        assert got["record_id"] == f["record_id"] and got["prompt"] == f["prompt"]
        for k, v in want.items():
            assert got[k] == pytest.approx(v), k
        assert sorted(got["keep_lost"]) == broke  # which keep rows, by id, not only how many
    assert any(lost) and len({tuple(b) for b in lost}) > 1
    for rel in rels:
        assert out[f"dd_keep_acc_{rel}"] == pytest.approx(np.mean([h[f"dd_keep_acc_{rel}"] for h in hand]))
        assert out[f"keep_{rel}/n"] == sum(keep_relation(r) == rel for r in keep)
    assert out["dd_keep_acc"] == pytest.approx(np.mean([h["dd_keep_acc"] for h in hand]))
    assert len({round(h["dd_keep_acc_region"], 6) for h in hand} | {round(h["dd_keep_acc_currency"], 6) for h in hand}) > 1
    # off by default: no split keys, the per-edit list still there
    cfg.eval.keep_split = False
    plain = evaluate_method(model, lambda reqs: edited[reqs[0]["prompt"]], fails + passes, [], cfg, "perturb", keep=keep)
    assert not any(k.startswith("keep_") or k.startswith("dd_keep_acc_") for k in plain)
    assert plain["dd_keep_acc"] == pytest.approx(out["dd_keep_acc"])
    assert [sorted(e["keep_lost"]) for e in plain["per_edit"]] == lost  # the same rows without the relation split
    # the split itself; a keep row that is not a country fact is an error naming the option
    grouped, spans = split_by_relation(keep)
    assert [keep_relation(r) for r in grouped] == sorted([keep_relation(r) for r in keep], key=list(spans).index)
    assert all(keep_relation(r) == rel for rel, (a, b) in spans.items() for r in grouped[a:b])
    with pytest.raises(ValueError, match="keep_split"):
        split_by_relation(keep + [dict(id="keep:x", record_id="k7", prompt="a", target="b")])
    from salem_jax.eval.edits import EditEvaluator

    with pytest.raises(ValueError, match=r"lost_rows names \['keep'\].*shared: \['pass'\]"):
        EditEvaluator(model, model.params, [], {"pass": passes}, lost_rows=("keep",))
