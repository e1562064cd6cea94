"""Readers on fixtures written here (good and broken), and on the real files when present."""

from __future__ import annotations

import json

import pytest

from salem_jax.data import paths
from salem_jax.data.readers import (
    read_classification,
    read_counterfact,
    read_fever,
    read_knowns,
    read_nli,
    read_records,
    read_text,
    read_zsre,
    text_records,
)
from salem_jax.data.records import EditRecord, RecordError, read_skip_report, write_skip_report


def zsre_rec(i=0, **over):
    rec = {
        "subject": f"Subject {i}", "src": f"What is the capital of Subject {i}?", "pred": "Lima",
        "rephrase": f"Which city is the capital of Subject {i}?", "alt": "Rome", "answers": ["Paris", "Lutetia"],
        "loc": "nq question: who wrote hamlet", "loc_ans": "Shakespeare", "cond": "x >> y || z",
    }
    rec.update(over)
    return {k: v for k, v in rec.items() if v is not ...}


def write_json(path, data):
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------- zsRE


def test_zsre_maps_fields(tmp_path):
    f = write_json(tmp_path / "z.json", [zsre_rec(0), zsre_rec(1, alt="")])
    recs = read_zsre(f)
    assert len(recs) == 2 and recs.sources == (str(f),) and recs.skipped == []
    r = recs[0]
    assert r == EditRecord(
        id="z.json:0", prompt="What is the capital of Subject 0?", target_true="Paris", target_new="Rome",
        rephrases=("Which city is the capital of Subject 0?",), loc_prompts=("nq question: who wrote hamlet",),
        loc_targets=("Shakespeare",), subject="Subject 0",
        extra={"answers": ["Paris", "Lutetia"], "pred": "Lima", "format": "zsre", "source": str(f), "record": 0},
    )
    # An empty `alt` (as in 2 records of the real train file) is allowed: correction mode can use it.
    assert recs[1].target_new == ""
    assert len(read_zsre(f, limit=1)) == 1


@pytest.mark.parametrize(
    "bad, field, reason",
    [
        (zsre_rec(rephrase=...), "rephrase", "missing"),
        (zsre_rec(src="   "), "src", "empty"),
        (zsre_rec(loc_ans=None), "loc_ans", "missing"),
        (zsre_rec(answers=[]), "answers", "has 0 entries"),
        (zsre_rec(answers="Paris"), "answers", "expected a list of strings, got str"),
        (zsre_rec(answers=["Paris", ""]), "answers[1]", "empty"),
        (zsre_rec(subject=3), "subject", "expected a string, got int"),
    ],
)
def test_zsre_bad_field_is_named(tmp_path, bad, field, reason):
    f = write_json(tmp_path / "z.json", [zsre_rec(0), zsre_rec(1), bad])
    with pytest.raises(RecordError) as e:
        read_zsre(f)
    msg = str(e.value)
    assert msg.startswith(f"{f}: record 2: field '{field}': ") and reason in msg, msg


def test_malformed_json_names_the_record(tmp_path):
    good = json.dumps(zsre_rec(0))
    f = tmp_path / "z.json"
    f.write_text("[\n" + good + ",\n" + good + ",\n" + '{"subject": "x", "src": }' + "\n]")
    with pytest.raises(RecordError, match=rf"{f}: record 2: field '\(json\)': malformed JSON at line 4"):
        read_zsre(f)
    f.write_text("[" + good + "," + good)  # truncated file
    with pytest.raises(RecordError, match=r"record 1: field '\(json\)': malformed JSON"):
        read_zsre(f)
    f.write_text("[]")
    with pytest.raises(RecordError, match="no records"):
        read_zsre(f)
    f.write_text('["just a string"]')
    with pytest.raises(RecordError, match=r"record 0: field '\(record\)': expected a JSON object, got str"):
        read_zsre(f)
    f.write_text("[" + good + ', "a string"]')
    with pytest.raises(RecordError, match=r"record 1: field '\(record\)': expected a JSON object, got str"):
        read_zsre(f)
    f.write_text('{"data": [' + good + "]}")
    with pytest.raises(RecordError, match=r"record 0: field 'subject': missing"):
        read_zsre(f)
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_zsre(tmp_path / "absent.json")


def test_skip_invalid_reports_every_skipped_record(tmp_path):
    rows = [zsre_rec(0), zsre_rec(1, src=""), zsre_rec(2), zsre_rec(3, answers=[]), zsre_rec(4)]
    f = write_json(tmp_path / "z.json", rows)
    recs = read_zsre(f, skip_invalid=True)
    assert [r.id for r in recs] == ["z.json:0", "z.json:2", "z.json:4"]
    assert [(s.record, s.field) for s in recs.skipped] == [("1", "src"), ("3", "answers")]
    assert "skipped 2" in recs.summary()
    report = write_skip_report(recs.skipped, tmp_path / "rep" / "skipped.jsonl")
    assert read_skip_report(report) == recs.skipped
    lines = [json.loads(x) for x in open(report)]
    assert lines[0] == {"source": str(f), "record": "1", "field": "src", "reason": "empty"}
    # With a limit, records past it are neither read nor reported.
    assert [s.record for s in read_zsre(f, skip_invalid=True, limit=2).skipped] == ["1"]


def test_all_invalid_is_an_error_even_when_skipping(tmp_path):
    f = write_json(tmp_path / "z.json", [zsre_rec(0, src=""), zsre_rec(1, loc="")])
    with pytest.raises(RecordError, match="no valid records"):
        read_zsre(f, skip_invalid=True)


# ------------------------------------------------------------------------------------- CounterFact


def cf_rec(i=0, **rw):
    rewrite = {
        "prompt": "The mother tongue of {} is", "relation_id": "P103",
        "target_new": {"str": "English", "id": "Q1860"}, "target_true": {"str": "French", "id": "Q150"},
        "subject": "Danielle Darrieux",
    }
    rewrite.update(rw)
    return {
        "case_id": i, "pararel_idx": 1, "requested_rewrite": rewrite,
        "paraphrase_prompts": ["Danielle Darrieux, a native", "Danielle Darrieux spoke the language"],
        "neighborhood_prompts": ["The mother tongue of Léon Blum is", "The native language of Montesquieu is"],
        "attribute_prompts": ["J. R. R. Tolkien is a native speaker of"], "generation_prompts": ["Darrieux's tongue is"],
    }


def test_counterfact_maps_fields(tmp_path):
    f = write_json(tmp_path / "cf.json", [cf_rec(7)])
    r = read_counterfact(f)[0]
    assert r.prompt == "The mother tongue of Danielle Darrieux is"
    assert (r.target_true, r.target_new, r.subject) == ("French", "English", "Danielle Darrieux")
    assert r.rephrases == ("Danielle Darrieux, a native", "Danielle Darrieux spoke the language")
    assert r.loc_prompts == ("The mother tongue of Léon Blum is", "The native language of Montesquieu is")
    assert r.loc_targets == ("French", "French")  # neighbours share the true answer
    assert r.extra["case_id"] == 7 and r.extra["relation_id"] == "P103"
    assert r.extra["attribute_prompts"] == ["J. R. R. Tolkien is a native speaker of"]


def test_counterfact_errors(tmp_path):
    bad = cf_rec(1)
    del bad["requested_rewrite"]["target_new"]["str"]
    f = write_json(tmp_path / "cf.json", [cf_rec(0), bad])
    with pytest.raises(RecordError, match=r"record 1: field 'requested_rewrite.target_new.str': missing"):
        read_counterfact(f)
    f = write_json(tmp_path / "cf.json", [cf_rec(0, prompt="The mother tongue is")])
    with pytest.raises(RecordError, match=r"record 0: field 'requested_rewrite.prompt': has no '\{\}' placeholder"):
        read_counterfact(f)
    bad = cf_rec(0)
    bad["neighborhood_prompts"] = []
    with pytest.raises(RecordError, match=r"field 'neighborhood_prompts': has 0 entries"):
        read_counterfact(write_json(tmp_path / "cf.json", [bad]))


def test_knowns(tmp_path):
    f = write_json(tmp_path / "k.json", [{"known_id": 0, "subject": "Vinson Massif", "attribute": "Antarctica",
                                          "template": "{} is located in the continent", "prediction": " of",
                                          "prompt": "Vinson Massif is located in the continent of", "relation_id": "P30"}])
    r = read_knowns(f)[0]
    assert (r.prompt, r.target_true, r.subject, r.extra["relation_id"]) == (
        "Vinson Massif is located in the continent of", "Antarctica", "Vinson Massif", "P30")


# ------------------------------------------------------------------------------------- classification


def test_fever_labels_and_exclusions(tmp_path):
    f = write_jsonl(tmp_path / "fever.jsonl", [
        {"id": 1, "label": "SUPPORTS", "claim": "Paris is in France.", "evidence": [[[1, 2, "Paris", 0]]]},
        {"id": 2, "label": "NOT ENOUGH INFO", "claim": "Tilda Swinton is a vegan.", "evidence": [[[3, None, None, None]]]},
        "",
        {"id": 3, "label": "REFUTES", "claim": "Rome is in Peru.", "evidence": []},
    ])
    recs = read_fever(f)
    assert [(r.id, r.prompt, r.target_true, r.extra["label_index"]) for r in recs] == [
        ("fever.jsonl:0", "Paris is in France.", "SUPPORTS", 0), ("fever.jsonl:2", "Rome is in Peru.", "REFUTES", 1)]
    # Record numbers count records (blank lines are not records); errors also give the line.
    assert recs[1].extra["record"] == 2
    assert recs[0].labels == ("SUPPORTS", "REFUTES") and recs[0].extra["orig_id"] == 1
    assert recs.excluded == {"NOT ENOUGH INFO": 1} and "excluded 1 'NOT ENOUGH INFO'" in recs.summary()


def test_fever_label_outside_set_and_broken_line(tmp_path):
    f = write_jsonl(tmp_path / "fever.jsonl", [
        {"id": 1, "label": "SUPPORTS", "claim": "a"}, "", {"id": 2, "label": "MAYBE", "claim": "b"}])
    with pytest.raises(RecordError) as e:
        read_fever(f)
    assert str(e.value) == (
        f"{f}: record 1 (line 3): field 'label': label 'MAYBE' is not in the label set ['SUPPORTS', 'REFUTES']")
    f = write_jsonl(tmp_path / "fever.jsonl", [
        {"id": 1, "label": "SUPPORTS", "claim": "a"}, '{"id": 2, "label": "REFUTES", "claim": ', {"id": 3, "label": "REFUTES", "claim": "c"}])
    with pytest.raises(RecordError, match=rf"{f}: record 1 \(line 2\): field '\(json\)': malformed JSON"):
        read_fever(f)
    recs = read_fever(f, skip_invalid=True)
    assert [r.id for r in recs] == ["fever.jsonl:0", "fever.jsonl:2"]
    assert [(s.record, s.field) for s in recs.skipped] == [("1 (line 2)", "(json)")]


def test_nli_fields_configurable_and_int_labels(tmp_path):
    f = write_jsonl(tmp_path / "mnli.jsonl", [
        {"premise": "A man sleeps.", "hypothesis": "A man rests.", "gold": "entailment"},
        {"premise": "A dog runs.", "hypothesis": "A cat runs.", "gold": 2},
    ])
    labels = ("entailment", "neutral", "contradiction")
    recs = read_nli(f, labels=labels, premise_field="premise", hypothesis_field="hypothesis", label_field="gold")
    assert [(r.prompt, r.text_pair, r.target_true) for r in recs] == [
        ("A man sleeps.", "A man rests.", "entailment"), ("A dog runs.", "A cat runs.", "contradiction")]
    f2 = write_jsonl(tmp_path / "bad.jsonl", [{"sentence1": "a", "sentence2": "b", "label": 5}])
    with pytest.raises(RecordError, match=r"record 0 \(line 1\): field 'label': label index 5 is outside the label set"):
        read_nli(f2)
    f3 = write_jsonl(tmp_path / "bad2.jsonl", [{"sentence1": "a", "sentence2": "", "label": "entailment"}])
    with pytest.raises(RecordError, match=r"field 'sentence2': empty"):
        read_nli(f3)
    f4 = write_jsonl(tmp_path / "bad3.jsonl", [{"sentence1": "a", "sentence2": "b", "label": True}])
    with pytest.raises(RecordError, match=r"field 'label': expected a label name or index, got bool"):
        read_nli(f4)


def test_classification_declared_label_set_is_checked(tmp_path):
    f = write_jsonl(tmp_path / "c.jsonl", [{"text": "x", "label": "a"}])
    with pytest.raises(ValueError, match="at least two distinct"):
        read_classification(f, labels=("a",))
    with pytest.raises(ValueError, match="overlap"):
        read_classification(f, labels=("a", "b"), exclude_labels=("a",))
    assert read_classification(f, labels=("a", "b"))[0].target_true == "a"


# ------------------------------------------------------------------------------------- plain text


RAW = """ = Robert Boulter = 

 Robert Boulter is an English film , television and theatre actor . 
 He had a guest @-@ starring role . 

 = = Career = = 

 In 2006 , Boulter starred in a play . 
 = Du Fu = 

 Du Fu was a prominent Chinese poet of the Tang dynasty . 
"""


def test_read_text_paragraphs_and_documents(tmp_path):
    f = tmp_path / "wiki.test.raw"
    f.write_text(RAW, encoding="utf-8")
    assert read_text(f) == [
        "Robert Boulter is an English film , television and theatre actor .",
        "He had a guest @-@ starring role .",
        "In 2006 , Boulter starred in a play .",
        "Du Fu was a prominent Chinese poet of the Tang dynasty .",
    ]
    docs = read_text(f, unit="document")
    assert len(docs) == 2 and docs[0].startswith(" = Robert Boulter = ") and docs[1].startswith(" = Du Fu = ")
    assert "\n".join(docs) + "\n" == RAW
    assert "= = Career = =" in read_text(f, drop_headings=False)[3]
    j = write_jsonl(tmp_path / "a.jsonl", [{"title": "R", "text": docs[0]}, {"title": "D", "text": docs[1]}])
    assert read_text(j, unit="document") == docs and read_text(j) == read_text(f)
    bad = write_jsonl(tmp_path / "b.jsonl", [{"title": "R", "text": ""}])
    with pytest.raises(RecordError, match=r"record 0 \(line 1\): field 'text': empty"):
        read_text(bad)
    with pytest.raises(ValueError, match="unit"):
        read_text(f, unit="line")


def test_text_records(tmp_path):
    recs = text_records(["one two three four five six seven", "too short"], source="w.raw", prompt_words=4, target_words=2)
    assert [(r.prompt, r.target_true) for r in recs] == [("one two three four", "five six")]
    assert [(s.record, s.field) for s in recs.skipped] == [("1", "text")]
    f = tmp_path / "wiki.test.raw"
    f.write_text(RAW, encoding="utf-8")
    recs = read_records(f, "text", prompt_words=5, target_words=2)
    assert recs[0].prompt == "Robert Boulter is an English" and recs[0].target_true == "film ,"
    with pytest.raises(ValueError, match="unknown format"):
        read_records(f, "csv")


# ------------------------------------------------------------------------------------- real files


@pytest.fixture(scope="module")
def real_dir():
    try:
        return paths.data_dir()
    except paths.DataNotFoundError as e:
        pytest.skip(f"real data files not available: {e}")


@pytest.mark.parametrize(
    "name, reader, n, first",
    [
        ("zsre", read_zsre, 2200, ("Which river system contains Charity Creek?", "Parramatta River", "Chichester River")),
        ("zsre-train", read_zsre, 1000, ("What is the product made by UniFirst?", "uniform", "unmanned aircraft")),
        ("counterfact", read_counterfact, 1096, ("Ferrari F40, developed by", "Ferrari", "Microsoft")),
        ("counterfact-preknown", read_counterfact, 1093, ("The mother tongue of Danielle Darrieux is", "French", "English")),
        ("knowns", read_knowns, 1209, ("Vinson Massif is located in the continent of", "Antarctica", "")),
        ("rte", read_nli, 2489, ("No Weapons of Mass Destruction Found in Iraq Yet.", "not_entailment", "")),
    ],
)
def test_real_files(real_dir, name, reader, n, first):
    p = real_dir / paths.KNOWN_FILES[name]
    if not p.is_file():
        pytest.skip(f"{p} is not in the data directory")
    recs = reader(p)
    assert len(recs) == n and not recs.skipped
    assert (recs[0].prompt, recs[0].target_true, recs[0].target_new) == first


def test_real_fever_and_wikitext(real_dir):
    fever = real_dir / paths.KNOWN_FILES["fever"]
    wiki = real_dir / paths.KNOWN_FILES["wikitext"]
    if not (fever.is_file() and wiki.is_file()):
        pytest.skip("FEVER or WikiText file is not in the data directory")
    recs = read_fever(fever)
    assert len(recs) == 6666 and recs.excluded == {"NOT ENOUGH INFO": 3333}
    assert sum(r.target_true == "SUPPORTS" for r in recs) == 3333
    docs = read_text(wiki, unit="document")
    assert len(docs) == 62 and docs[0].startswith(" = Robert Boulter = ")
    arts = read_text(real_dir / paths.KNOWN_FILES["wikitext-articles"], unit="document")
    assert [a.strip() for a in arts] == [d.strip() for d in docs]


def test_with_template(tmp_path):
    from salem_jax.data.records import with_template

    f = write_json(tmp_path / "z.json", [zsre_rec(0), zsre_rec(1, src="")])
    recs = read_zsre(f, skip_invalid=True)
    t = with_template(recs, "Question: {}\nAnswer:")
    r = t[0]
    assert r.prompt == "Question: What is the capital of Subject 0?\nAnswer:"
    assert r.rephrases == ("Question: Which city is the capital of Subject 0?\nAnswer:",)
    assert r.loc_prompts == ("Question: nq question: who wrote hamlet\nAnswer:",)
    assert (r.target_true, r.target_new, r.loc_targets) == (recs[0].target_true, recs[0].target_new, recs[0].loc_targets)
    assert t.skipped == recs.skipped and t.sources == recs.sources
    assert with_template(recs, "Q: {}", loc=False)[0].loc_prompts == recs[0].loc_prompts
    with pytest.raises(ValueError, match="exactly one"):
        with_template(recs, "no placeholder")
