"""config.train_pass: extra pass rows for the editors' training split, disjoint from the keep set.

The keep set (salem_jax.eval.keep) is drawn from the region / currency / languages facts of ALL
countries; the extra train pass rows come from the same relations, so the test proves they share
no fact, no prompt and no country with the keep rows, and no country with the val split."""

from __future__ import annotations

import types

import numpy as np
import pytest

from salem_jax.data.countries import country_records
from salem_jax.eval.keep import candidate_rows
from salem_jax.pipeline import default_config, train_pass_candidates, train_pass_set


def _edit_row(rec, group):
    return dict(id=f"{rec.id}:{group}", record_id=rec.id, group=group, prompt=rec.prompt, target=rec.target_true)


@pytest.fixture(scope="module")
def split():
    """A synthetic edit set on the real country data: capitals of countries 0-39 train, 40-47 val;
    keep rows = region/currency facts of train countries 0-5 and val country 40, and of 60-61."""
    caps = list(country_records("capital", seed=0))
    other = list(country_records(["region", "currency", "languages"], seed=0))
    train = [_edit_row(r, "fail" if i % 2 else "pass") for i, r in enumerate(caps[:40])]
    val = [_edit_row(r, "fail") for r in caps[40:48]]
    names = lambda recs: {r.extra["country"] for r in recs}  # noqa: E731
    keep_c = names(caps[:6]) | names(caps[40:41]) | names(caps[60:62])
    keep = candidate_rows([r for r in other if r.extra["country"] in keep_c and r.extra["relation"] != "languages"])
    return caps, other, train, val, keep


def test_candidates_are_train_country_facts_outside_keep_and_val(split):
    caps, other, train, val, keep = split
    got = train_pass_candidates(caps + other, train, val, keep, ["region", "currency", "languages"])
    # hand computation: the train split's countries minus the keep rows' and val rows' countries
    train_c = [r.extra["country"] for r in caps[:40]]
    out_c = {r.extra["country"] for r in caps[:6] + caps[40:48] + caps[60:62]}
    want = []
    for r in other:
        if r.extra["country"] in train_c and r.extra["country"] not in out_c:
            want.append(r.id)
    assert [r.id for r in got] == want and len(want) > 60
    # the disjointness itself, checked directly against the keep rows
    keep_ids, keep_prompts = {k["record_id"] for k in keep}, {k["prompt"] for k in keep}
    keep_countries = {r.extra["country"] for r in other if r.id in keep_ids}
    assert len(keep_countries) == 9 and keep_ids
    for r in got:
        assert r.id not in keep_ids and r.prompt not in keep_prompts
        assert r.extra["country"] not in keep_countries
        assert r.extra["relation"] != "capital"
    # train countries that are also keep countries (0-5) lose ALL their facts, even the languages ones
    # the keep set does not hold
    assert not {r.extra["country"] for r in got} & {r.extra["country"] for r in caps[:6]}
    # a relation filter
    only_region = train_pass_candidates(caps + other, train, val, keep, ["region"])
    assert only_region and {r.extra["relation"] for r in only_region} == {"region"}


def test_train_pass_set_scores_candidates_and_marks_them_pass(split, monkeypatch):
    caps, other, train, val, keep = split
    import salem_jax.eval.metrics as metrics

    # the "model" knows a fact iff its prompt has an even length (a deterministic, checkable rule)
    def fake_score(model, params, rows, **kw):
        return {"correct": np.array([len(r["prompt"]) % 2 == 0 for r in rows])}

    monkeypatch.setattr(metrics, "score_rows", fake_score)
    cfg = default_config()
    cfg.progress = False
    cfg.train_pass = "countries:region,currency"
    cfg.max_train_pass = 1000
    model = types.SimpleNamespace(kind="causal", params=None)
    rows, note = train_pass_set(model, cfg, train, val, keep)
    cands = train_pass_candidates(list(country_records("all", seed=0)), train, val, keep, ["region", "currency"])
    assert sorted(r["record_id"] for r in rows) == sorted(c.id for c in cands if len(c.prompt) % 2 == 0)
    assert all(r["group"] == "pass" and r["id"] == f"train_pass:{r['record_id']}" for r in rows)
    assert not {r["prompt"] for r in rows} & {k["prompt"] for k in keep}
    assert f"{len(rows)} extra train pass rows" in note
    cfg.max_train_pass = 5
    few, _ = train_pass_set(model, cfg, train, val, keep)
    assert [r["id"] for r in few] == [r["id"] for r in rows[:5]]  # the seeded order's first known facts


def test_train_pass_bad_config_names_the_fix(split):
    caps, other, train, val, keep = split
    cfg = default_config()
    model = types.SimpleNamespace(kind="causal", params=None)
    for spec in ("region,currency", "countries:"):
        cfg.train_pass = spec
        with pytest.raises(ValueError, match="countries:REL,REL"):
            train_pass_set(model, cfg, train, val, keep)
    cfg.train_pass, cfg.format = "countries:region", "zsre"
    with pytest.raises(ValueError, match="train_pass=''"):
        train_pass_set(model, cfg, train, val, keep)
    assert default_config().train_pass == ""  # off unless asked for


@pytest.mark.slow
def test_tiny_main_job_trains_on_the_extra_pass_rows(tmp_path, monkeypatch):
    """The pipeline adds the rows to the editors' train split only (val unchanged). A random model
    knows no country fact, so `keep_rows` is replaced by "knows every candidate"."""
    import json

    import salem_jax.pipeline as pipeline
    from experiments import capitals_smollm2

    seen = {}
    real_prepare = pipeline.prepare_splits

    def spy_prepare(model, splits, **kw):
        out = real_prepare(model, splits, **kw)
        seen["splits"], seen["data"] = {k: list(v) for k, v in splits.items()}, out
        return out

    def knows_all(model, records, *, max_rows, **kw):
        return candidate_rows(records)[:max_rows]

    monkeypatch.setattr(pipeline, "prepare_splits", spy_prepare)
    monkeypatch.setattr(pipeline, "keep_rows", knows_all)
    argv = ["--tiny", "--workdir", str(tmp_path), "--config.progress=false", "--config.methods=mend_fixed",
            "--config.train_pass=countries:region", "--config.max_train_pass=7"]
    assert capitals_smollm2.main(argv) == 0
    train, val = seen["splits"]["train"], seen["splits"]["val"]
    extra = [r for r in train if r["id"].startswith("train_pass:")]
    assert len(extra) == 7 and all(r["group"] == "pass" and ":region:" in r["record_id"] for r in extra)
    assert not any(r["id"].startswith("train_pass:") for r in val)
    n_edit_pass = sum(r["group"] == "pass" for r in train) - 7
    assert seen["data"]["train"].n_pass == n_edit_pass + 7
    # their countries are train countries, none a val country
    val_c = {r["record_id"].split(":")[-1] for r in val}
    train_c = {r["record_id"].split(":")[-1] for r in train if not r["id"].startswith("train_pass:")}
    assert {r["record_id"].split(":")[-1] for r in extra} <= train_c - val_c
    assert json.loads((tmp_path / "results.json").read_text())["methods"]["mend_fixed"]["edits"] >= 1
