"""The pipeline with the model's parameters sharded over a (data, model) mesh of the 8 simulated
devices gives the numbers of the replicated run (slow: two tiny pipeline runs)."""

import jax
import numpy as np
import pytest

from experiments.capitals_smollm2 import get_config
from salem_jax.pipeline import run_pipeline


@pytest.mark.slow
def test_sharded_pipeline_matches_replicated(tmp_path, capsys):
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (simulated) devices")
    out = {}
    for mesh_model in (0, 2):
        cfg = get_config(tiny=True)
        cfg.progress = False
        cfg.methods = ("salem", "ft")
        cfg.mesh_model = mesh_model
        cfg.editor.batch_size = 8  # the same groups per step on both meshes (1-D: 8 data; 2-D: 4 data x 2 model)
        out[mesh_model] = run_pipeline(cfg, tmp_path / f"m{mesh_model}")
    assert "parameters sharded over a {'data': 4, 'model': 2} mesh" in capsys.readouterr().out
    a, b = out[0], out[2]
    assert a["chosen_layers"] == b["chosen_layers"]
    for g, scores in a["profile"]["scores"].items():
        np.testing.assert_allclose(b["profile"]["scores"][g], scores, rtol=1e-4)
    va, vb = a["training"]["salem"]["last_val"], b["training"]["salem"]["last_val"]
    np.testing.assert_allclose(vb["loss"], va["loss"], rtol=1e-3)
    for method in ("salem", "ft"):
        for key in ("ea", "ea_token", "adapt_acc", "locality"):
            np.testing.assert_allclose(b["methods"][method][key], a["methods"][method][key], atol=1e-6, err_msg=f"{method} {key}")
