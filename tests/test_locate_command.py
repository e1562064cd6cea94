"""`salem locate` end to end on a tiny model saved to disk and small data files."""

import argparse
import json

import numpy as np
import pytest

from salem_jax.cli import run_command
from salem_jax.commands import locate as L
from salem_jax.models import hf, load_model, save_model

WORDS = [("france", "paris", "lima"), ("peru", "lima", "rome"), ("japan", "tokyo", "cairo"), ("chile", "santiago", "delhi"),
         ("kenya", "nairobi", "tokyo"), ("india", "delhi", "paris")]


def zsre_records():
    return [
        {
            "subject": c,
            "src": f"what city is the capital of {c}",
            "rephrase": f"which city is the capital of {c}",
            "alt": alt,
            "answers": [cap],
            "loc": "what is the currency of japan",
            "loc_ans": "yen",
        }
        for c, cap, alt in WORDS
    ]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("locate")
    m = hf.tiny("gpt2")
    model_dir = save_model(m, m.params, d / "model")
    data = d / "zsre.json"
    data.write_text(json.dumps(zsre_records()))
    return d, str(model_dir), str(data)


def checked(args) -> int:
    """The command as `salem` runs it: expected errors become one line and exit code 2."""
    return run_command(L.run, args)


def parse(argv):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    L.add_parser(sub)
    return parser.parse_args(["locate", *argv])


def test_saliency_from_a_data_file(setup):
    d, model_dir, data = setup
    out = d / "sal"
    args = parse(["--model", model_dir, "--data", data, "--format", "zsre", "--mode", "counterfactual",
                  "--split", "all", "--method", "saliency", "--scorer", "salem", "--top-k", "2",
                  "--micro-batch", "4", "--out", str(out), "--no-progress"])
    assert L.run(args) == 0
    prof = json.loads((out / "profile.json").read_text())
    assert (out / "profile.png").stat().st_size > 1000
    assert prof["method"] == "saliency" and prof["layers"] == ["h.0", "h.1"]
    assert prof["examples"] == {"fail": 6, "adapt": 6, "pass": 6}
    s = prof["scores"]["fail"]
    assert prof["chosen"] == [["h.0", "h.1"][i] for i in np.argsort(-np.asarray(s), kind="stable")]
    assert prof["wall_time"] > 0 and prof["data"]["mode"] == "counterfactual"


def test_edit_set_folder_sweep_and_trace(setup):
    from salem_jax.edit_set_builder import build_edit_set
    from salem_jax.data.edit_set import save_edit_set
    from salem_jax.data.readers import read_zsre

    d, model_dir, data = setup
    model = load_model(model_dir)
    es = build_edit_set(model, read_zsre(data), mode="counterfactual", progress=False, val_fraction=0.2)
    es.info["format"] = "zsre"
    es_dir = save_edit_set(es, d / "es")
    for method, extra in (
        ("sweep", ["--split", "all", "--lrs", "1e-2", "--steps", "2", "--budget", "1.0", "--layers", "h.0,h.1"]),
        ("causal-trace", ["--split", "all", "--n-noise", "2", "--restorations-per-call", "4", "--limit", "2"]),
    ):
        out = d / method
        assert L.run(parse(["--model", model_dir, "--data", str(es_dir), "--method", method, "--out", str(out),
                            "--no-progress", *extra])) == 0, method
        prof = json.loads((out / "profile.json").read_text())
        assert prof["method"] == method and len(prof["scores"][prof["select_group"]]) == 2
        assert (out / "profile.png").exists()
    trace = json.loads((d / "causal-trace" / "profile.json").read_text())
    assert trace["examples"] == {"fail": 2}  # --limit 2 records; subjects re-read from the source file
    assert trace["extra"]["forward_passes"] > 0
    sweep = json.loads((d / "sweep" / "profile.json").read_text())
    assert len(sweep["extra"]["best_per_layer"]) == 2


def test_bad_input_is_a_clear_error(setup, capsys):
    d, model_dir, data = setup
    assert checked(parse(["--model", model_dir, "--data", str(d / "missing.json"), "--format", "zsre", "--out", str(d / "x")])) == 2
    assert "missing.json" in capsys.readouterr().err
    assert checked(parse(["--model", model_dir, "--data", data, "--format", "zsre", "--layers", "h.0,h.9",
                        "--split", "all", "--out", str(d / "y"), "--no-progress"])) == 2
    assert "unknown layer 'h.9'" in capsys.readouterr().err
    # --top-k above the number of layers: refused after loading the model, before any scoring
    assert checked(parse(["--model", model_dir, "--data", data, "--format", "zsre", "--top-k", "5",
                          "--out", str(d / "z"), "--no-progress"])) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "salem locate: error: --top-k 5: model 'model' has 2 layers to choose from; use 1..2"
    assert not (d / "z").exists()
    (d / "afile").write_text("x")
    assert checked(parse(["--model", model_dir, "--data", data, "--format", "zsre", "--out", str(d / "afile")])) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
