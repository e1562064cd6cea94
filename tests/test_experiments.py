"""Every experiment's tiny form runs end to end and writes results.json, results.md and plots."""

import importlib
import json

import pytest

from salem_jax.data import paths

EXPERIMENTS = [
    "capitals_smollm2", "zsre_smollm2", "counterfact_smollm2", "zsre_t5xl", "zsre_bart",
    "wikitext_gptneo", "wikitext_distilgpt2", "counterfact_gpt2xl", "fever_bert", "nli_bert",
]
NEEDS_DATA = {"zsre_smollm2", "counterfact_smollm2", "zsre_t5xl", "zsre_bart", "wikitext_gptneo",
              "wikitext_distilgpt2", "counterfact_gpt2xl", "fever_bert", "nli_bert"}


def _have_data() -> bool:
    try:
        paths.data_dir()
        return True
    except Exception:
        return False


@pytest.mark.slow
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_tiny_experiment_writes_its_outputs(name, tmp_path):
    if name in NEEDS_DATA and not _have_data():
        pytest.skip("no data directory (../shared/data or SALEM_JAX_DATA): the real data files are absent")
    mod = importlib.import_module(f"experiments.{name}")
    assert mod.main(["--tiny", "--workdir", str(tmp_path), "--config.progress=false"]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "results.md").read_text().startswith("model ")
    assert (tmp_path / "profile.png").stat().st_size > 0
    assert (tmp_path / "training.png").stat().st_size > 0
    for method, m in res["methods"].items():
        assert m["edits"] >= 1, method
        assert 0.0 <= m["ea"] <= 1.0
    assert res["chosen_layers"] and set(res["chosen_layers"]) <= set(res["profile"]["layers"])
    if name == "capitals_smollm2":  # the main job's config.eval.mend_edit_retries=2: each edit's applications logged
        m = res["methods"]["salem_edit"]
        apps = [e["applications"] for e in m["per_edit"]]
        assert m["edit_retries"]["max"] == 2 and len(apps) == m["edits"] and all(1 <= n <= 3 for n in apps)
        tried = [e["applications_tried"] for e in m["per_edit"]]
        assert m["edit_retries"]["retried"] == sum(t > 1 for t in tried) and all(n <= t for n, t in zip(apps, tried))
        # an edit reached by its first application was not applied again, so it counts in EA
        assert all(e["ea"] == 1.0 for e in m["per_edit"] if e["applications_tried"] == 1)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fever_minilm", "nli_minilm"])
def test_tiny_classifier_experiment_fine_tunes_edits_and_reports_train_and_val(name, tmp_path):
    if not _have_data():
        pytest.skip("no data directory (../shared/data or SALEM_JAX_DATA): the real data files are absent")
    mod = importlib.import_module(f"experiments.{name}")
    assert mod.main(["--tiny", "--workdir", str(tmp_path), "--config.progress=false"]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "results.md").read_text().startswith("| method | layers | EA train | EA val | DD train | DD val")
    assert set(res["methods"]) == {"salem", "salem3", "mend_fixed", "ft", "ft_kl", "ke", "enn"}
    for method, m in res["methods"].items():
        for split in ("train", "val"):
            assert m[split]["edits"] >= 1, (method, split)
            assert 0.0 <= m[split]["ea"] <= 1.0
    split = json.loads((tmp_path / "edit_split.json").read_text())
    sets = [set(split[k]) for k in ("finetune", "heldout", "editor_train", "editor_val")]
    for i in range(4):
        for j in range(i + 1, 4):
            assert not sets[i] & sets[j]
    assert (tmp_path / "finetuned" / "splits.json").is_file()
