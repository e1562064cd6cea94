"""Property-based tests (hypothesis) of every reader and of `read_requests`: random and mutated
records - missing fields, wrong types, huge strings, invalid UTF-8, deep nesting, cut files -
give a valid record or a clear error naming the file, never another exception.

Kept fast: few examples per reader (each read goes through `datasets`), derandomized so CI sees
the same cases, no example database written into the checkout."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from salem_jax.data import readers
from salem_jax.data.records import EditRecord, RecordError
from salem_jax.errors import UserError
from salem_jax.mend.apply import read_requests

FAST = settings(max_examples=6, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))

# A valid record of each format; mutations start from it.
VALID = {
    "zsre": {"subject": "Peru", "src": "What is the capital of Peru?", "answers": ["Lima"], "alt": "Quito",
             "rephrase": "Peru's capital is?", "loc": "nq question: who wrote it", "loc_ans": "Smith"},
    "counterfact": {"case_id": 1, "requested_rewrite": {"prompt": "The capital of {} is", "subject": "Peru",
                                                        "relation_id": "P36", "target_true": {"str": "Lima"},
                                                        "target_new": {"str": "Quito"}},
                    "paraphrase_prompts": ["Peru has its capital in"], "neighborhood_prompts": ["Chile's capital is"],
                    "attribute_prompts": ["x"], "generation_prompts": ["y"]},
    "knowns": {"prompt": "The capital of Peru is", "attribute": "Lima", "subject": "Peru", "relation_id": "P36"},
    "fever": {"id": 3, "claim": "Lima is in Peru.", "label": "SUPPORTS"},
    "nli": {"index": 0, "sentence1": "Lima is a city.", "sentence2": "Lima exists.", "label": "entailment"},
    "classification": {"text": "good film", "label": "pos"},
}
READ = {
    "zsre": readers.read_zsre, "counterfact": readers.read_counterfact, "knowns": readers.read_knowns,
    "fever": readers.read_fever, "nli": readers.read_nli,
    "classification": lambda p, **k: readers.read_classification(p, labels=("neg", "pos"), **k),
}

HUGE = "word " * 100_000  # a 500 kB string
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats(allow_nan=False)
    | st.text(max_size=20) | st.just(""),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)


def deep(depth: int, leaf="x"):
    out = leaf
    for _ in range(depth):
        out = {"a": [out]}
    return out


def _paths(rec, prefix=()):
    """Every (nested) field path of a record."""
    for k, v in rec.items():
        yield prefix + (k,)
        if isinstance(v, dict):
            yield from _paths(v, prefix + (k,))


@st.composite
def mutated(draw, fmt: str):
    """A valid record with one field deleted or replaced by something else."""
    rec = json.loads(json.dumps(VALID[fmt]))
    path = draw(st.sampled_from(list(_paths(rec))))
    node = rec
    for k in path[:-1]:
        node = node[k]
    how = draw(st.sampled_from(["delete", "value", "huge", "deep"]))
    if how == "delete":
        del node[path[-1]]
    else:
        node[path[-1]] = {"value": draw(json_values), "huge": HUGE, "deep": deep(draw(st.integers(50, 400)))}[how]
    return rec


@st.composite
def files(draw, fmt: str) -> bytes:
    """The bytes of a data file: a list (or JSON lines) of valid, mutated and random records,
    sometimes cut short, with a bad byte, or nested beyond any parser."""
    rows = draw(st.lists(st.one_of(st.just(VALID[fmt]), mutated(fmt), json_values), min_size=1, max_size=4))
    jsonl = draw(st.booleans())
    text = "".join(json.dumps(r) + "\n" for r in rows) if jsonl else json.dumps(rows)
    data = text.encode("utf-8")
    damage = draw(st.sampled_from(["none", "none", "cut", "byte", "nest"]))
    if damage == "cut":
        data = data[: draw(st.integers(0, max(0, len(data) - 1)))]
    elif damage == "byte":
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.sampled_from([b"\xff", b"\xc3", b"\x80\x80", b"\x00"])) + data[at:]
    elif damage == "nest":
        n = draw(st.integers(1000, 200_000))
        data = b"[" * n + b"]" * n
    return jsonl, data


def _check(fmt: str, jsonl: bool, data: bytes, skip_invalid: bool):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / ("data.jsonl" if jsonl else "data.json")
        path.write_bytes(data)
        try:
            out = READ[fmt](path, skip_invalid=skip_invalid)
        except RecordError as e:
            assert str(path) in str(e)
            return
        assert len(out) >= 1
        for r in out:
            assert isinstance(r, EditRecord) and r.prompt.strip() and r.target_true.strip()


@pytest.mark.parametrize("fmt", sorted(READ))
def test_readers_give_records_or_a_record_error(fmt):
    @FAST
    @given(files(fmt), st.booleans())
    def run(file, skip_invalid):
        _check(fmt, *file, skip_invalid)

    run()


@FAST
@given(st.binary(max_size=300) | st.text(max_size=300).map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_read_text_gives_paragraphs_or_a_record_error(data):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "wiki.raw"
        path.write_bytes(data)
        try:
            paras = readers.read_text(path)
            recs = readers.text_records(paras, source=str(path), prompt_words=4, target_words=2)
        except RecordError as e:
            assert str(path) in str(e)
            return
        assert all(isinstance(p, str) and p for p in paras)
        assert all(r.prompt and r.target_true for r in recs)


@st.composite
def request_lines(draw) -> bytes:
    good = {"prompt": "The capital of Peru is", "target": "Lima", "rephrases": ["Peru's capital:"]}
    lines = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["good", "mutated", "random", "bytes", "deep", "huge"]))
        if kind == "good":
            lines.append(json.dumps(good).encode())
        elif kind == "mutated":
            r = dict(good)
            key = draw(st.sampled_from(sorted(good) + ["text_pair"]))
            if draw(st.booleans()):
                r.pop(key, None)
            else:
                r[key] = draw(json_values)
            lines.append(json.dumps(r).encode())
        elif kind == "random":
            lines.append(json.dumps(draw(json_values)).encode())
        elif kind == "bytes":
            lines.append(draw(st.binary(max_size=40)).replace(b"\n", b" "))
        elif kind == "deep":
            lines.append(json.dumps(deep(draw(st.integers(10, 400)))).encode() if draw(st.booleans())
                         else b"[" * 100_000 + b"]" * 100_000)
        else:
            lines.append(json.dumps({"prompt": HUGE, "target": "x"}).encode())
    return b"\n".join(lines)


@settings(max_examples=100, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(request_lines())
def test_read_requests_gives_requests_or_a_user_error(data):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "requests.jsonl"
        path.write_bytes(data)
        try:
            reqs = read_requests(path)
        except UserError as e:
            assert str(path) in str(e) and "\n" not in str(e)
            return
        assert len(reqs) == len(reqs.lines) >= 1
        for r in reqs:
            assert isinstance(r["prompt"], str) and r["prompt"].strip()
            assert (isinstance(r["target"], str) and r["target"].strip()) or type(r["target"]) is int
            assert all(isinstance(x, str) and x.strip() for x in r.get("rephrases", []))
