"""`salem dataset` / `salem fetch-data` end to end on a tiny model, and data-path resolution."""

from __future__ import annotations

import argparse
import json
import os
import socket
import time

import pytest

from salem_jax.cli import run_command
from salem_jax.commands import dataset as cmd
from salem_jax.data import load_edit_set, paths
from salem_jax.models import hf


def checked(args) -> int:
    """The command as `salem` runs it: expected errors become one line and exit code 2."""
    return run_command(cmd.run, args)


def parse(argv):
    parser = argparse.ArgumentParser(prog="salem")
    sub = parser.add_subparsers(dest="command")
    cmd.add_parser(sub)
    return parser.parse_args(argv)


@pytest.fixture(scope="module")
def tiny_gpt2():
    return hf.tiny("gpt2")


@pytest.fixture
def fake_loader(monkeypatch, tiny_gpt2):
    """The command's model loader, answering with tiny models and recording what it was asked."""
    calls = []

    def load(name, *, dtype="float32", num_labels=None):
        calls.append((name, dtype, num_labels))
        return hf.tiny("bert", num_labels=num_labels) if num_labels else tiny_gpt2

    monkeypatch.setattr(cmd, "_load_model", load)
    return calls


def zsre_rows(n, bad=()):
    rows = []
    words = [("france", "paris"), ("germany", "berlin"), ("italy", "rome"), ("spain", "madrid"), ("japan", "tokyo"),
             ("peru", "lima"), ("chile", "santiago"), ("egypt", "cairo"), ("kenya", "nairobi"), ("india", "delhi")]
    for i in range(n):
        c, cap = words[i % len(words)]
        rows.append({"subject": c, "src": f"what city is the capital of {c}", "pred": cap,
                     "rephrase": f"the capital of {c} is", "alt": "rome", "answers": [cap],
                     "loc": "nq question: what is the capital of japan", "loc_ans": "tokyo", "cond": "-"})
        if i in bad:
            rows[-1]["src"] = ""
    return rows


def test_dataset_command_writes_edit_set(tmp_path, fake_loader, capsys):
    data = tmp_path / "z.json"
    data.write_text(json.dumps(zsre_rows(10)))
    out = tmp_path / "es"
    args = parse(["dataset", "--model", "tiny", "--data", str(data), "--format", "zsre", "--mode", "counterfactual",
                  "--out", str(out), "--batch-size", "4", "--seed", "2", "--no-progress"])
    assert cmd.run(args) == 0
    printed = capsys.readouterr().out
    es = load_edit_set(out)
    assert es.info["format"] == "zsre" and es.info["mode"] == "counterfactual" and es.info["seed"] == 2
    for split in ("train", "val", "total"):
        c = es.info["counts"][split]
        assert f"fail {c['fail']:6d}  adapt {c['adapt']:6d}  pass {c['pass']:6d}" in printed
    assert es.info["counts"]["total"] == {"fail": 10, "adapt": 10, "pass": 10}
    assert fake_loader == [("tiny", "float32", None)]
    assert es.info["prompt_template"] is None
    # The same command again refuses to overwrite; --overwrite replaces.
    assert checked(args) == 2
    assert "already holds an edit set" in capsys.readouterr().err
    args.overwrite = True
    assert cmd.run(args) == 0


def test_bad_record_fails_with_its_name_or_is_skipped(tmp_path, fake_loader, capsys):
    data = tmp_path / "z.json"
    data.write_text(json.dumps(zsre_rows(6, bad=(3,))))
    argv = ["dataset", "--model", "tiny", "--data", str(data), "--format", "zsre", "--out", str(tmp_path / "es"),
            "--no-progress"]
    assert checked(parse(argv)) == 2
    assert f"{data}: record 3: field 'src': empty" in capsys.readouterr().err
    assert not (tmp_path / "es").exists()
    assert cmd.run(parse(argv + ["--skip-invalid", "--prompt-template", "question {}\\nanswer"])) == 0
    out = capsys.readouterr().out
    assert "skipped 1 records" in out
    report = [json.loads(x) for x in open(tmp_path / "es" / "skipped.jsonl")]
    assert report == [{"source": str(data), "record": "3", "field": "src", "reason": "empty"}]
    es = load_edit_set(tmp_path / "es")
    assert es.info["records"]["total"] == 5 and es.info["prompt_template"] == "question {}\nanswer"
    assert {r["prompt"] for r in es.rows("train") if r["field"] == "prompt"} <= {
        f"question {row['src']}\nanswer" for row in zsre_rows(6)}


def test_countries_and_classification(tmp_path, fake_loader, capsys):
    out = tmp_path / "c"
    args = parse(["dataset", "--model", "tiny", "--data", "countries", "--relation", "capital", "--limit", "6",
                  "--out", str(out), "--batch-size", "8", "--no-progress"])
    assert cmd.run(args) == 0
    es = load_edit_set(out)
    assert es.info["format"] == "countries" and es.info["relation"] == "capital"
    assert es.info["records"]["total"] == 6 and es.info["country_facts"]["capital"]["records"] == 6

    nli = tmp_path / "rte.jsonl"
    nli.write_text("".join(json.dumps({"index": i, "sentence1": "paris is in france", "sentence2": "yes it is",
                                       "label": ["entailment", "not_entailment"][i % 2]}) + "\n" for i in range(6)))
    args = parse(["dataset", "--model", "tiny-bert", "--data", str(nli), "--format", "nli", "--out",
                  str(tmp_path / "n"), "--no-progress", "--mode", "counterfactual"])
    assert cmd.run(args) == 0
    assert fake_loader[-1] == ("tiny-bert", "float32", 2)  # the label set sized the head
    es = load_edit_set(tmp_path / "n")
    assert es.info["label_names"] == ["entailment", "not_entailment"] and es.info["flip_probability"] == 0.5
    assert checked(parse(["dataset", "--model", "m", "--data", str(nli), "--format", "classification",
                          "--out", str(tmp_path / "x")])) == 2
    assert "needs --labels" in capsys.readouterr().err


def test_known_names_resolve_in_the_data_dir(tmp_path, fake_loader, capsys, monkeypatch):
    (tmp_path / "data" / "zsre").mkdir(parents=True)
    (tmp_path / "data" / "zsre" / "zsre_mend_eval_2200.json").write_text(json.dumps(zsre_rows(4)))
    args = parse(["dataset", "--model", "tiny", "--data", "zsre", "--data-dir", str(tmp_path / "data"),
                  "--out", str(tmp_path / "es"), "--no-progress", "--limit", "3"])
    assert cmd.run(args) == 0
    assert load_edit_set(tmp_path / "es").info["records"]["total"] == 3
    args = parse(["dataset", "--model", "tiny", "--data", "counterfact", "--data-dir", str(tmp_path / "data"),
                  "--out", str(tmp_path / "es2")])
    assert checked(args) == 2
    assert "counterfact_hf_test_part1.json not found in the data directory" in capsys.readouterr().err
    assert checked(parse(["dataset", "--model", "m", "--data", str(tmp_path / "f.json"), "--out", "o"])) == 2
    assert "--format is needed" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- paths


def test_data_dir_resolution(tmp_path, monkeypatch):
    shared = tmp_path / "shared" / "data"
    shared.mkdir(parents=True)
    env = tmp_path / "env"
    env.mkdir()
    monkeypatch.setattr(paths, "repo_shared_data", lambda: shared)
    monkeypatch.delenv(paths.ENV_DATA, raising=False)
    assert paths.data_dir() == shared
    monkeypatch.setenv(paths.ENV_DATA, str(env))
    assert paths.data_dir() == env
    assert paths.data_dir(tmp_path) == tmp_path  # explicit beats the environment
    with pytest.raises(paths.DataNotFoundError, match="given explicitly"):
        paths.data_dir(tmp_path / "nope")
    monkeypatch.setenv(paths.ENV_DATA, str(tmp_path / "gone"))
    with pytest.raises(paths.DataNotFoundError, match=r"from \$SALEM_JAX_DATA"):
        paths.data_dir()
    monkeypatch.delenv(paths.ENV_DATA)
    monkeypatch.setattr(paths, "repo_shared_data", lambda: tmp_path / "absent")
    with pytest.raises(paths.DataNotFoundError) as e:
        paths.data_dir()
    assert "SALEM_JAX_DATA (not set)" in str(e.value) and str(tmp_path / "absent") in str(e.value)


def test_default_is_shared_data_beside_the_checkout():
    import salem_jax

    repo = os.path.dirname(os.path.dirname(os.path.abspath(salem_jax.__file__)))
    assert str(paths.repo_shared_data()) == os.path.join(os.path.dirname(repo), "shared", "data")


def test_find_data_file(tmp_path):
    (tmp_path / "fever").mkdir()
    (tmp_path / "fever" / "fever_paper_dev.jsonl").write_text("{}\n")
    assert paths.find_data_file("fever", tmp_path) == tmp_path / "fever" / "fever_paper_dev.jsonl"
    with pytest.raises(paths.DataNotFoundError, match="rte_train.jsonl not found"):
        paths.find_data_file("rte", tmp_path)
    with pytest.raises(KeyError, match="unknown data file"):
        paths.find_data_file("imagenet", tmp_path)


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_fetch_fails_fast_without_network(tmp_path):
    url = f"http://127.0.0.1:{_closed_port()}/data/dsets"
    t = time.monotonic()
    with pytest.raises(paths.DataFetchError) as e:
        paths.fetch_public_data(["zsre-full"], cache=tmp_path, base_url=url, timeout=2.0)
    assert time.monotonic() - t < 3.0
    msg = str(e.value)
    assert "could not download zsre-full" in msg and "no network" in msg and "zsre_mend_eval.json" in msg
    assert list((tmp_path / "rome").iterdir()) == []  # no partial file left


def test_fetch_times_out_on_a_silent_server(tmp_path):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)  # accepts connections into the backlog but never answers
    try:
        url = f"http://127.0.0.1:{server.getsockname()[1]}"
        t = time.monotonic()
        with pytest.raises(paths.DataFetchError, match="could not download counterfact-full"):
            paths.fetch_public_data(["counterfact-full"], cache=tmp_path, base_url=url, timeout=0.5)
        assert time.monotonic() - t < 2.5  # one try, no retries
    finally:
        server.close()


def test_fetch_keeps_existing_files_and_command_reports_failure(tmp_path, monkeypatch, capsys):
    (tmp_path / "rome").mkdir()
    (tmp_path / "rome" / "counterfact.json").write_text("[]")
    got = paths.fetch_public_data(["counterfact-full"], cache=tmp_path, base_url="http://127.0.0.1:9")
    assert got == {"counterfact-full": tmp_path / "rome" / "counterfact.json"}
    monkeypatch.setattr(paths, "ROME_DATA_URL", f"http://127.0.0.1:{_closed_port()}")
    args = parse(["fetch-data", "--files", "zsre-full", "--cache", str(tmp_path), "--timeout", "1"])
    assert cmd.run(args) == 1
    assert "salem fetch-data: error: could not download zsre-full" in capsys.readouterr().err
    monkeypatch.setenv(paths.ENV_CACHE, str(tmp_path))
    assert paths.find_data_file("counterfact-full") == tmp_path / "rome" / "counterfact.json"
    with pytest.raises(paths.DataNotFoundError, match="salem fetch-data --files zsre-full"):
        paths.find_data_file("zsre-full")
