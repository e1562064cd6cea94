"""Failure modes of the `salem` commands on tiny models: each bad input or fault gives one line
`salem <command>: error: ...` and exit code 2 (before any costly step where it can), and the
library keeps its data safe (issue 18; README "Failure modes")."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from test_mend_train import tiny_setup, trained_run

from salem_jax import cli
from salem_jax.errors import UserError
from salem_jax.models import save_model
from salem_jax.models.base import get_path, set_path


def error_line(capsys, command: str) -> str:
    """The one error line a failed command printed (and no traceback)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [x for x in err.splitlines() if x.startswith(f"salem {command}: error: ")]
    assert len(lines) == 1, err
    return lines[0][len(f"salem {command}: error: "):]


# ------------------------------------------------------------------------------- salem edit


@pytest.fixture(scope="module")
def edit_setup(tmp_path_factory):
    """(folder, base model folder, editor workdir, a good request) for `salem edit`."""
    model = tiny_setup()[0]
    _, work, _, _ = trained_run()
    d = tmp_path_factory.mktemp("edit")
    base = save_model(model, model.params, d / "tiny-gpt2")  # a folder's model is named after it
    other = save_model(model, model.params, d / "another-model")
    return d, base, other, work, {"prompt": "the capital of peru is", "target": "lima"}


def _edit(d, base, work, requests: str, *extra):
    (d / "r.jsonl").write_text(requests)
    return cli.main(["edit", "--model", str(base), "--editor", str(work), "--requests", str(d / "r.jsonl"),
                     "--out", str(d / "edited"), "--no-progress", *extra])


@pytest.mark.parametrize(
    "requests, message",
    [
        ('{"prompt": "a", "target": "b"}\nnot json\n', "line 2: not valid JSON"),
        ('{"prompt": "a"}\n', "line 1: field 'target' is missing"),
        ('{"prompt": "a", "target": "  "}\n', "line 1: field 'target' must be a non-empty string"),
        ('{"prompt": "a", "target": null}\n', "line 1: field 'target' must be a non-empty string"),
        ("[1, 2]\n", "line 1: expected an object"),
        ("\n\n", "no edit requests"),
    ],
)
def test_edit_bad_requests_are_one_line_before_the_model_loads(edit_setup, capsys, monkeypatch, requests, message):
    from salem_jax import models

    d, base, _, work, _ = edit_setup
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model must not be loaded"))
    assert _edit(d, base, work, requests) == 2
    assert message in error_line(capsys, "edit")


def test_edit_refuses_bad_editor_and_out_before_loading(edit_setup, capsys, monkeypatch, tmp_path):
    from salem_jax import models

    d, base, _, work, req = edit_setup
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model must not be loaded"))
    good = json.dumps(req) + "\n"
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("mine")
    assert _edit(d, base, work, good, "--out", str(tmp_path / "notes")) == 2
    assert "does not look like a saved model; not replacing it" in error_line(capsys, "edit")
    assert (tmp_path / "notes" / "a.txt").read_text() == "mine"
    assert _edit(d, base, tmp_path / "notes", good) == 2
    assert "holds no editor checkpoint" in error_line(capsys, "edit")
    assert _edit(d, base, tmp_path / "nowhere", good) == 2
    assert "no such folder" in error_line(capsys, "edit")
    assert _edit(d, base, work, good, "--step", "x7") == 2
    assert "expected best, latest or a step number" in error_line(capsys, "edit")


def test_edit_refuses_an_editor_of_another_model(edit_setup, capsys):
    d, _, other, work, req = edit_setup
    assert _edit(d, other, work, json.dumps(req) + "\n") == 2
    assert "was trained for model 'tiny-gpt2', not 'another-model'" in error_line(capsys, "edit")
    assert not (d / "edited").exists()


def test_edit_long_request_is_named_with_its_length(edit_setup, capsys):
    d, base, _, work, req = edit_setup
    long = {"prompt": " ".join(["red"] * 70), "target": "lima"}  # the tiny GPT-2 has 64 positions
    assert _edit(d, base, work, json.dumps(req) + "\n\n" + json.dumps(long) + "\n") == 2
    msg = error_line(capsys, "edit")
    assert msg.startswith(f"{d / 'r.jsonl'} line 3: prompt + target is 72 tokens, more than the model's context (64 tokens)")
    assert _edit(d, base, work, json.dumps(req) + "\n", "--max-tokens", "4") == 2
    msg = error_line(capsys, "edit")
    assert "line 1: prompt + target is 7 tokens, more than the limit of 4 tokens" in msg
    assert not (d / "edited").exists()


def test_edited_model_with_non_finite_weights_is_never_written(edit_setup, tmp_path):
    from salem_jax.mend.apply import save_edited

    model = tiny_setup()[0]
    path = "transformer/h/0/mlp/c_fc/kernel"
    bad = set_path(model.params, path, get_path(model.params, path).at[0, 0].set(np.nan))
    with pytest.raises(UserError, match="non-finite values .* in transformer/h/0/mlp/c_fc/kernel"):
        save_edited(model, bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    inf = set_path(model.params, path, get_path(model.params, path).at[1, 2].set(np.inf))
    with pytest.raises(UserError, match="c_fc/kernel"):
        save_edited(model, inf, tmp_path / "out")
    assert save_edited(model, model.params, tmp_path / "out")  # finite: written
