"""The `salem_edit` method (MEND on the layer of highest editability) runs in the tiny main job."""

import json

import pytest

from salem_jax import methods


def test_registered():
    m = methods.get("salem_edit")
    assert m.name == "salem_edit" and "editability" in m.summary


@pytest.mark.slow
def test_tiny_main_job_with_salem_edit(tmp_path):
    from experiments import capitals_smollm2

    argv = ["--tiny", "--workdir", str(tmp_path), "--config.progress=false", "--config.methods=salem_edit,salem",
            "--config.editability.warm=4", "--config.editability.probes=2"]
    assert capitals_smollm2.main(argv) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    prof = json.loads((tmp_path / "profile_editability.json").read_text())
    assert prof["method"] == "editability" and prof["examples"]["probes"] == 2
    info = res["training"]["salem_edit"]
    assert info["layers"] == prof["chosen"] and info["layer_score"] == "editability"
    assert res["methods"]["salem_edit"]["edits"] >= 1 and 0.0 <= res["methods"]["salem_edit"]["ea"] <= 1.0
    assert (tmp_path / "editor_salem_edit" / "metrics.jsonl").exists()
