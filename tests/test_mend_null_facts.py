"""Fact keys in the null-space projection's covariance (`TrainConfig.null_facts`, `config.editor.null_facts`):
C = C_text + w C_facts (both per-token means) against numpy on inputs captured by hand on a tiny Llama;
the pipeline's fact rows (`pipeline.null_fact_rows`) never hold a keep-set or val prompt or country; the
facts used are the ones saved with the P (`null_projection.npz`) and a resume with other facts / weight is
refused; bad specs and weights are refused before any costly step."""

from __future__ import annotations

import time

import numpy as np
import pytest

from experiments import capitals_smollm2
from salem_jax import parallel
from salem_jax.data.countries import country_records
from salem_jax.eval.keep import candidate_rows
from salem_jax.mend.checkpoint import CheckpointMismatch
from salem_jax.mend.editor import EditorConfig
from salem_jax.mend.nullspace import (NULL_FILE, facts_digest, load_projections, null_projection, parse_null_facts,
                                     projection_facts)
from salem_jax.mend.train import TrainConfig, prepare_splits, train_editor
from salem_jax.pipeline import null_fact_rows
from salem_jax.testing import capital_edit_rows, module_inputs, random_texts, refused_up_front, tiny_edit_model

FACTS = [dict(prompt="the currency of japan is", target="yen"), dict(prompt="the capital of peru is", target="lima"),
         dict(prompt="kenya lies in", target="africa"), dict(prompt="which language does chile speak", target="spain")]
OTHER_FACTS = [dict(prompt="the currency of india is", target="rupee"), dict(prompt="canada lies in", target="america")]
SPEC = "countries:region"
COUNTRIES = "france germany italy spain japan peru chile egypt kenya india".split()
CITIES = "paris berlin rome madrid tokyo lima santiago cairo nairobi delhi".split()


def _texts():
    return random_texts(seed=0)  # 24 texts of 14 words: one window of 32 tokens each


def _proj(model, weights, energy, facts=None, weight=1.0, tmp=None, spec=SPEC):
    kw = dict(facts=facts, facts_weight=weight, facts_spec=spec) if facts is not None else {}
    return null_projection(model, model.params, weights, energy, _texts(), max_tokens=2000, window=32, cache=tmp,
                           progress=False, **kw)


def _hand_cov(model, module_path, texts):
    """mean over every token of `texts` of x x^T, x the module's input read by hand (float64)."""
    xs = np.concatenate([module_inputs(model, module_path, t) for t in texts])
    return xs.T @ xs / len(xs)


def _hand_projector(c, energy):
    """numpy: the projector on C's smallest eigenvectors whose eigenvalues sum to <= energy x trace."""
    ev, u = np.linalg.eigh(c)
    ev = np.clip(ev, 0, None)
    n0 = int(np.sum(np.cumsum(ev) <= energy * ev.sum()))
    return u[:, :n0] @ u[:, :n0].T, n0


# ---------------------------------------------------------------------------- C = C_text + w C_facts


@pytest.mark.parametrize("weight", [1.0, 4.0])
def test_combined_covariance_and_projector_equal_numpy(weight, tmp_path):
    model = tiny_edit_model("llama")
    weights = model.layers.weights([model.layers.names()[1]])  # gate, up (hidden input) and down (MLP input)
    energy = 0.3
    proj = _proj(model, weights, energy, FACTS, weight, tmp=tmp_path)
    plain = _proj(model, weights, energy, tmp=tmp_path)
    assert proj.facts == SPEC and proj.facts_weight == weight and proj.n_facts == len(FACTS)
    assert proj.facts_digest == facts_digest(FACTS) != facts_digest(OTHER_FACTS)
    for w in weights:
        module = w.path.rsplit("/", 1)[0]
        c_text = _hand_cov(model, module, _texts())
        # a fact is read as prompt + " " + target (the tokens the model reads when the fact is scored)
        c_facts = _hand_cov(model, module, [f"{f['prompt']} {f['target']}" for f in FACTS])
        c = c_text + weight * c_facts
        want, n0 = _hand_projector(c, energy)
        got = np.asarray(proj.projections[w.path], np.float64)
        np.testing.assert_allclose(got, want, atol=2e-4)
        assert proj.info[w.path]["null_dim"] == n0
        n_tok = sum(len(module_inputs(model, module, f"{f['prompt']} {f['target']}")) for f in FACTS)
        assert proj.info[w.path]["facts_tokens"] == n_tok
        np.testing.assert_allclose(proj.info[w.path]["facts_trace_share"], weight * np.trace(c_facts) / np.trace(c),
                                   rtol=1e-4)
        # the facts change P: the text-only projector is another one
        want_plain, _ = _hand_projector(c_text, energy)
        np.testing.assert_allclose(np.asarray(plain.projections[w.path], np.float64), want_plain, atol=2e-4)
        assert np.abs(want - want_plain).max() > 1e-2
        # and the facts' keys lose energy in the new null space: |P x|^2 smaller than under the text-only P
        xf = np.concatenate([module_inputs(model, module, f"{f['prompt']} {f['target']}") for f in FACTS])
        assert np.sum((xf @ got) * xf) < np.sum((xf @ want_plain) * xf)


def test_fact_covariances_cut_each_batch_and_equal_numpy(monkeypatch):
    """`fact_covariances` reads the facts `batch_size` at a time, each batch cut after its longest
    row (session 23): facts of very different lengths, so the batches run at different lengths
    below the common padded one; C_facts and the token count equal the hand reading of every
    fact's tokens, and the forward passes ran at the cut lengths (not the padded one)."""
    from salem_jax.baselines import rome
    from salem_jax.mend.nullspace import fact_covariances

    model = tiny_edit_model("llama")
    weights = model.layers.weights([model.layers.names()[1]])
    long = "which language does the republic of chile speak at home and at school and in every town"
    facts = FACTS[:3] + [dict(prompt=long, target="spanish")] + FACTS[3:] + OTHER_FACTS  # long: 2nd of its batch
    lengths, real = [], rome._moments

    def spy(apply, modules, params, batch):
        lengths.append(batch["input_ids"].shape[1])
        return real(apply, modules, params, batch)

    monkeypatch.setattr(rome, "_moments", spy)
    got, count = fact_covariances(model, model.params, weights, facts, batch_size=2)
    texts = [f"{f['prompt']} {f['target']}" for f in facts]
    assert len(lengths) == 4 and max(lengths) > min(lengths)  # the long fact's batch alone is long
    for w in weights:
        module = w.path.rsplit("/", 1)[0]
        np.testing.assert_allclose(got[w.path], _hand_cov(model, module, texts), rtol=1e-5, atol=1e-7)
        assert count == sum(len(module_inputs(model, module, t)) for t in texts)


def test_bad_fact_specs_and_weights_are_refused():
    for bad in ("countries:", "countries:moons", "capitals", "edit_pass+edit_pass", "countries:region,region", 3):
        with pytest.raises(ValueError, match="null_facts"):
            TrainConfig.tiny(null_energy=0.5, null_facts=bad).resolved(1)
    for bad in (0, -1.0, float("nan"), float("inf"), True, "1"):
        with pytest.raises(ValueError, match="null_facts_weight"):
            TrainConfig.tiny(null_energy=0.5, null_facts=SPEC, null_facts_weight=bad).resolved(1)
    with pytest.raises(ValueError, match="null_energy is 0"):
        TrainConfig.tiny(null_facts=SPEC).resolved(1)
    assert parse_null_facts("countries:region,currency+edit_pass") == (("region", "currency"), True)
    assert parse_null_facts("edit_pass") == ((), True) and parse_null_facts("") == ((), False)


@pytest.mark.parametrize("field, value, match", [
    ("null_facts", "countries:moons", "config.editor.null_facts"),
    ("null_facts_weight", -1.0, "config.editor.null_facts_weight"),
    ("null_energy", 0.0, "null_energy is 0")])
def test_pipeline_refuses_bad_facts_up_front(field, value, match, tmp_path):
    cfg = capitals_smollm2.get_config(tiny=True)
    cfg.editor.null_energy, cfg.editor.null_tokens, cfg.editor.null_facts = 0.5, 2000, SPEC
    cfg.editor[field] = value
    refused_up_front(cfg, tmp_path / "work", match)


# ---------------------------------------------------------------------------- which facts: never keep or val


def _split_rows(caps, names, tag_pass):
    """Edit-set-like rows of the capital records of `names`: a fail row each, and pass rows when tag_pass."""
    rows = []
    for r in caps:
        if r.extra["country"] in names:
            rows.append(dict(id=f"{r.id}:f", record_id=r.id, group="pass" if tag_pass else "fail", prompt=r.prompt,
                             target=r.target_true))
            rows.append(dict(id=f"{r.id}:a", record_id=r.id, group="adapt", prompt="What is the capital of " + r.extra["country"],
                             target=r.target_true))
    return rows


def test_fact_rows_never_take_keep_or_val_prompts_or_countries():
    every = country_records("all", seed=0)
    caps = [r for r in every if r.extra["relation"] == "capital"]
    names = sorted({r.extra["country"] for r in caps})
    train_fail, train_pass, val, keep_only = names[:12], names[12:24], names[24:30], names[30:36]
    train = _split_rows(caps, train_fail, False) + [r for r in _split_rows(caps, train_pass, True) if r["group"] == "pass"]
    val_rows = _split_rows(caps, val, False) + [r for r in _split_rows(caps, names[36:38], True) if r["group"] == "pass"]
    # keep rows: region / currency facts of keep-only countries AND of two train countries (so the country rule matters)
    keep_recs = [r for r in every if r.extra["relation"] in ("region", "currency")
                 and r.extra["country"] in set(keep_only) | {train_fail[0], train_pass[0]}]
    keep = candidate_rows(keep_recs)
    assert keep
    cfg = capitals_smollm2.get_config(tiny=True)
    cfg.editor.null_facts = "countries:region,currency,languages+edit_pass"
    rows, note = null_fact_rows(cfg, train, val_rows, keep)
    # by hand: the allowed countries and the facts that qualify
    country = {r.id: r.extra["country"] for r in every}
    banned_c = {country[r["record_id"]] for r in val_rows + keep}
    allowed = {country[r["record_id"]] for r in train} - banned_c
    banned_p = {r["prompt"] for r in train + val_rows + keep}
    want = [(r.prompt, r.target_true) for r in every if r.extra["relation"] in ("region", "currency", "languages")
            and r.extra["country"] in allowed and r.prompt not in banned_p]
    want += [(r["prompt"], r["target"]) for r in train if r["group"] == "pass" and country[r["record_id"]] in allowed]
    assert [(r["prompt"], r["target"]) for r in rows] == want and len(rows) > 20
    got_p = {r["prompt"] for r in rows}
    assert not got_p & {r["prompt"] for r in keep + val_rows}
    assert not {r["country"] for r in rows} & banned_c
    assert train_fail[0] not in {r["country"] for r in rows} and train_pass[0] not in {r["country"] for r in rows}
    # never the edits themselves (train fail / adapt rows)
    assert not got_p & {r["prompt"] for r in train if r["group"] != "pass"}
    assert "edit-set train pass rows" in note
    # without edit_pass: only the country relations' facts
    cfg.editor.null_facts = "countries:region"
    only = null_fact_rows(cfg, train, val_rows, keep)[0]
    assert {r["prompt"] for r in only} == {p for p, _ in want if any(p == r.prompt and r.extra["relation"] == "region"
                                                                     for r in every)}


# ---------------------------------------------------------------------------- saved with P, checked on resume


def _cfg(**kw) -> TrainConfig:
    base = dict(batch_size=2, max_steps=6, val_every=3, checkpoint_every=3, log_every=3, null_energy=0.3,
                null_facts=SPEC, editor=EditorConfig(rank=16, n_hidden=1, edit_lr_init=1e-2))
    base.update(kw)
    return TrainConfig.tiny(**base)


def test_the_facts_are_saved_with_P_and_a_resume_with_others_is_refused(tmp_path):
    import jax

    model = tiny_edit_model("llama")
    weights = model.layers.weights([model.layers.names()[1]])
    data = prepare_splits(model, {"train": capital_edit_rows(COUNTRIES[:6], CITIES[:6], "tr"),
                                  "val": capital_edit_rows(COUNTRIES[6:], CITIES[6:], "va")})
    mesh = parallel.data_mesh(jax.devices()[:1])
    proj = _proj(model, weights, 0.3, FACTS, 1.0, tmp=tmp_path)
    work = tmp_path / "run"
    kw = dict(mesh=mesh, progress=False)
    train_editor(model, data, weights, _cfg(), work, null_projection=proj, stop_after=3, **kw)
    saved = load_projections(work / NULL_FILE)[0]
    assert projection_facts(work / NULL_FILE) == (SPEC, 1.0, facts_digest(FACTS))
    for w in weights:
        np.testing.assert_array_equal(saved[w.path], proj.projections[w.path])
    longer = dict(max_steps=9)
    # another weight: the checkpoints' trajectory fields refuse it
    with pytest.raises(CheckpointMismatch, match="null_facts_weight"):
        train_editor(model, data, weights, _cfg(null_facts_weight=2.0, **longer), work,
                     null_projection=_proj(model, weights, 0.3, FACTS, 2.0, tmp=tmp_path), **kw)
    # no facts any more
    with pytest.raises(CheckpointMismatch, match="null_facts"):
        train_editor(model, data, weights, _cfg(null_facts="", **longer), work,
                     null_projection=_proj(model, weights, 0.3, tmp=tmp_path), **kw)
    # the same spec and weight over other fact rows: the saved projector (facts digest, P) refuses it
    with pytest.raises(CheckpointMismatch, match="null-space projector"):
        train_editor(model, data, weights, _cfg(**longer), work,
                     null_projection=_proj(model, weights, 0.3, OTHER_FACTS, 1.0, tmp=tmp_path), **kw)
    # a projection whose facts disagree with the config (a fresh workdir: refused before any step), and a
    # config with facts but no projection
    for cfg, given in ((_cfg(), _proj(model, weights, 0.3, tmp=tmp_path)), (_cfg(null_facts=""), proj),
                       (_cfg(null_facts_weight=2.0), proj)):
        with pytest.raises(ValueError, match="was built with fact keys"):
            train_editor(model, data, weights, cfg, tmp_path / "fresh", null_projection=given, **kw)
        assert not (tmp_path / "fresh" / NULL_FILE).exists()
    with pytest.raises(ValueError, match="cannot gather the fact rows"):
        train_editor(model, data, weights, _cfg(**longer), work, **kw)
    res = train_editor(model, data, weights, _cfg(**longer), work, null_projection=proj, **kw)
    assert res.step == 9
    # a text-only run cannot be resumed with facts
    plain = tmp_path / "plain"
    train_editor(model, data, weights, _cfg(null_facts=""), plain, null_projection=_proj(model, weights, 0.3, tmp=tmp_path),
                 stop_after=3, **kw)
    with pytest.raises(CheckpointMismatch, match="null_facts"):
        train_editor(model, data, weights, _cfg(**longer), plain, null_projection=proj, **kw)


@pytest.mark.slow  # a whole tiny pipeline: `make test-slow`
def test_pipeline_builds_P_from_its_fact_rows(tmp_path, monkeypatch):
    """The pipeline's route: null_fact_rows -> the editor's P, saved with those rows' digest; the
    P equals null_projection over the same texts and fact rows."""
    from salem_jax.baselines.keystats import wikitext_texts
    from salem_jax.pipeline import load, read_records, run_pipeline, split_rows
    from salem_jax.data.edit_set import load_edit_set

    cfg = capitals_smollm2.get_config(tiny=True)
    cfg.editor.null_energy, cfg.editor.null_tokens, cfg.editor.null_facts = 0.5, 2000, "countries:region+edit_pass"
    cfg.editor.null_facts_weight = 2.0
    cfg.progress = False
    # the projector is built before train_editor on this route: its time is reported all the same
    # (results.json's training.<method>.times.null_projection read 0.0 before session 23)
    from salem_jax.methods import mend as mend_method

    build = mend_method.wikitext_null_projection

    def slow_build(*a, **kw):
        time.sleep(0.5)
        return build(*a, **kw)

    monkeypatch.setattr(mend_method, "wikitext_null_projection", slow_build)
    res = run_pipeline(cfg, tmp_path / "work")
    assert res["training"]["salem_edit"]["times"]["null_projection"] >= 0.5
    train_rows, val_rows = split_rows(load_edit_set(tmp_path / "work" / "edit_set"))
    rows = null_fact_rows(cfg, train_rows, val_rows, [])[0]  # the tiny config has no keep set
    path = tmp_path / "work" / "editor_salem_edit" / NULL_FILE
    assert projection_facts(path) == ("countries:region+edit_pass", 2.0, facts_digest(rows))
    assert res["methods"]["salem_edit"]["null_facts"] == {"spec": "countries:region+edit_pass", "weight": 2.0,
                                                          "rows": len(rows), "digest": facts_digest(rows)}
    model = load(cfg, read_records(cfg))
    saved = load_projections(path)[0]
    weights = model.layers.weights(res["chosen_layers"], part=cfg.saliency.part)
    assert [w.path for w in weights] == list(saved)
    want = null_projection(model, model.params, weights, 0.5, wikitext_texts(), max_tokens=2000, facts=rows,
                           facts_weight=2.0, facts_spec="countries:region+edit_pass", progress=False)
    for w in weights:
        np.testing.assert_array_equal(saved[w.path], want.projections[w.path])


# ---------------------------------------------------------------------------- CounterFact (not the countries data)


def _cf_rows(rid, prompt, paraphrase, neighbours, split):
    """Edit-set rows of one CounterFact-like record: a fail row, an adapt row, a pass row per neighbour."""
    rows = [dict(id=f"{rid}:f", record_id=rid, group="fail", prompt=prompt, target="new", split=split),
            dict(id=f"{rid}:a", record_id=rid, group="adapt", prompt=paraphrase, target="new", split=split)]
    rows += [dict(id=f"{rid}:p{i}", record_id=rid, group="pass", prompt=p, target="true", split=split)
             for i, p in enumerate(neighbours)]
    return rows


def test_counterfact_fact_rows_equal_a_hand_filter():
    """On CounterFact (no train countries): 'countries:REL' = those facts of every country outside the
    keep set, prompts of no keep / edit-set row; 'edit_pass' = the train pass rows (neighbourhood
    prompts) whose prompt is no val, keep or train edit row's. Checked against a hand filter, with
    collisions planted: a train neighbourhood prompt shared with a val record, one equal to a keep
    fact's prompt, one equal to another train record's edit prompt, and edit prompts that are country
    facts' prompts."""
    from experiments import counterfact_smollm2
    from salem_jax.pipeline import check_null_facts

    every = country_records("all", seed=0)
    names = sorted({r.extra["country"] for r in every})
    rels = ("region", "currency", "languages")
    keep = candidate_rows([r for r in every if r.extra["relation"] in ("capital", "region") and r.extra["country"] in names[:5]])
    assert keep
    free = [r for r in every if r.extra["relation"] in rels and r.extra["country"] not in names[:5]]
    val = _cf_rows("cf:v0", "V0 plays", "V0 is a player of", ["N shared", "N val only"], "val")
    val += _cf_rows("cf:v1", free[0].prompt, "V1 para", ["N val two"], "val")  # a val edit with a country fact's prompt
    train = _cf_rows("cf:t0", "T0 speaks", "T0 speaks the language", ["N a", "N b", "N shared", keep[0]["prompt"]], "train")
    train += _cf_rows("cf:t1", free[1].prompt, "T1 para", ["N c", "T0 speaks", "N a"], "train")  # "N a" twice: kept twice
    cfg = counterfact_smollm2.get_config(tiny=True)
    cfg.editor.null_energy, cfg.editor.null_facts = 0.5, "countries:region,currency,languages+edit_pass"
    check_null_facts(cfg)  # CounterFact is no longer refused
    rows, note = null_fact_rows(cfg, train, val, keep)
    # by hand
    keep_c = {r.extra["country"] for r in every for k in keep if r.id == k["record_id"]}
    assert keep_c == set(names[:5])
    seen_p = {r["prompt"] for r in keep + train + val}
    want = [(r.prompt, r.target_true) for r in every
            if r.extra["relation"] in rels and r.extra["country"] not in keep_c and r.prompt not in seen_p]
    n_country = len(want)
    want += [("N a", "true"), ("N b", "true"), ("N c", "true"), ("N a", "true")]
    assert [(r["prompt"], r["target"]) for r in rows] == want and n_country > 100
    assert free[0].prompt not in {r["prompt"] for r in rows} and free[1].prompt not in {r["prompt"] for r in rows}
    assert not {r["country"] for r in rows} & keep_c
    assert [r["record_id"] for r in rows[n_country:]] == ["cf:t0", "cf:t0", "cf:t1", "cf:t1"]
    assert "4 edit-set train pass rows (of 7; 3 left out" in note and f"{n_country} country region" in note
    # only one part of the spec
    cfg.editor.null_facts = "edit_pass"
    assert [(r["prompt"], r["target"]) for r in null_fact_rows(cfg, train, val, keep)[0]] == want[n_country:]
    cfg.editor.null_facts = "countries:currency"
    got = null_fact_rows(cfg, train, val, keep)[0]
    assert [(r["prompt"], r["target"]) for r in got] == [
        (r.prompt, r.target_true) for r in every if r.extra["relation"] == "currency" and r.extra["country"] not in keep_c
        and r.prompt not in seen_p]
    # nothing left: a clear error naming the field
    cfg.editor.null_facts = "edit_pass"
    with pytest.raises(ValueError, match="config.editor.null_facts='edit_pass': no fact of a country outside the keep set"):
        null_fact_rows(cfg, [r for r in train if r["group"] != "pass"], val, keep)


@pytest.mark.slow  # a whole tiny pipeline: `make test-slow`
def test_cf_own_pass_trains_through_the_fact_projection(tmp_path):
    """benchmarks/cf_own_pass.py on the tiny CounterFact job with null_energy and
    null_facts='countries:region+edit_pass': the editor's saved P was built from exactly the pipeline's
    fact rows (their digest), which hold the edit set's train pass rows, and equals null_projection over
    the same texts and rows."""
    import json

    from benchmarks import cf_own_pass as B
    from experiments import counterfact_smollm2
    from salem_jax.baselines.keystats import wikitext_texts
    from salem_jax.data.edit_set import load_edit_set
    from salem_jax.pipeline import load, read_records, split_rows

    spec = "countries:region+edit_pass"
    argv = ["--layer", "layers.1", "--tiny", "--workdir", str(tmp_path), "--config.progress=false",
            "--config.methods=salem_edit_base", "--config.editor.null_energy=0.5", "--config.editor.null_tokens=2000",
            f"--config.editor.null_facts={spec}", "--config.editor.null_facts_weight=2.0"]
    assert B.main(argv) == 0
    cfg = counterfact_smollm2.get_config(tiny=True)
    cfg.editor.null_facts, cfg.editor.null_facts_weight = spec, 2.0
    train_rows, val_rows = split_rows(load_edit_set(tmp_path / "edit_set"))
    rows = null_fact_rows(cfg, train_rows, val_rows, [])[0]  # the tiny config has no keep set
    n_pass = sum(r["group"] == "pass" for r in train_rows)
    val_p = {r["prompt"] for r in val_rows} | {r["prompt"] for r in train_rows if r["group"] != "pass"}
    assert sum(r["country"] is None for r in rows) == sum(r["group"] == "pass" and r["prompt"] not in val_p
                                                          for r in train_rows) > 0 and n_pass > 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["methods"]["salem_edit_base"]["null_facts"] == {"spec": spec, "weight": 2.0, "rows": len(rows),
                                                               "digest": facts_digest(rows)}
    path = tmp_path / "editor_salem_edit_base" / NULL_FILE
    assert projection_facts(path) == (spec, 2.0, facts_digest(rows))
    model = load(cfg, read_records(cfg))
    saved = load_projections(path)[0]
    weights = model.layers.weights(["layers.1"], part=cfg.saliency.part)
    assert [w.path for w in weights] == list(saved)
    want = null_projection(model, model.params, weights, 0.5, wikitext_texts(), max_tokens=2000, facts=rows,
                           facts_weight=2.0, facts_spec=spec, progress=False)
    for w in weights:
        np.testing.assert_array_equal(saved[w.path], want.projections[w.path])
