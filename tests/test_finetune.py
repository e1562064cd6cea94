"""Fine-tuning a classifier (salem_jax.finetune, `salem finetune`)."""

import dataclasses
import functools
import json

import jax
import numpy as np
import pytest

from salem_jax import finetune as F
from salem_jax.data.records import EditRecord
from salem_jax.models import hf, load_model

LABELS = ("yes", "no")
POS = "red blue green yellow one two three".split()
NEG = "france paris germany berlin italy rome spain".split()


def toy_records(n=48, seed=0, name="toy"):
    """Separable: label 0 texts are mostly colour/number words, label 1 mostly places."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        lab = i % 2
        words = POS if lab == 0 else NEG
        text = " ".join(rng.choice(words, 4)) + " the " + " ".join(rng.choice(POS + NEG, 1))
        out.append(EditRecord(id=f"{name}:{i}", prompt=text, target_true=LABELS[lab],
                              extra={"labels": LABELS, "label_index": lab}))
    return out


CFG = F.FinetuneConfig(epochs=10, batch_size=8, lr=2e-3, warmup_fraction=0.1, patience=10, checkpoint_every=50)
# the short runs of the resume and refusal tests: one model object and one configuration, so
# their runs share one compiled step (finetune.make_step is cached by model and optimizer)
SHORT = F.FinetuneConfig(epochs=2, batch_size=4, lr=1e-3, patience=5, checkpoint_every=2)  # 5 steps per epoch


@functools.cache
def _bert():
    return hf.tiny("bert", num_labels=2)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    recs = toy_records(64)
    sp = F.split_records_for_finetune(recs, heldout=0.25, edit=0.1, seed=0)
    by = {r.id: r for r in recs}
    out = tmp_path_factory.mktemp("ft") / "model"
    model = _bert()
    res = F.finetune_classifier(model, [by[i] for i in sp["finetune"]], [by[i] for i in sp["heldout"]], out, CFG,
                                progress=False, torch_weights=False, splits_doc=F.splits_document(sp, recs))
    return model, res, recs, sp, out


def test_toy_set_reaches_full_accuracy_and_reloads_identically(trained):
    model, res, recs, sp, out = trained
    assert res.best_acc == 1.0
    assert res.majority_rate < 1.0
    by = {r.id: r for r in recs}
    held = [by[i] for i in sp["heldout"]]
    reloaded = load_model(str(out))
    data, _ = F.encode_records(reloaded, held, 128)
    # independent check of the accuracy: argmax of the reloaded model's logits, row by row
    batch, _ = F._rows(data, np.arange(len(held)), len(held))
    logits = np.asarray(reloaded.apply(reloaded.params, batch))[:, 0]
    assert np.mean(logits.argmax(-1) == data["labels"]) == 1.0
    np.testing.assert_array_equal(logits, np.asarray(model.apply(res.params, batch))[:, 0])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["id2label"] == {"0": "yes", "1": "no"}
    info = json.loads((out / "finetune.json").read_text())
    assert info["best_acc"] == 1.0 and [h["heldout_acc"] for h in info["history"]] == [h["heldout_acc"] for h in res.history]
    assert json.loads((out / "splits.json").read_text())["splits"] == sp
    # the base model is untouched
    assert not np.allclose(np.asarray(model.params["classifier"]["kernel"]), np.asarray(res.params["classifier"]["kernel"]))


# the slow suite (make test <= 5 min); the editor's resume is in make test (test_checkpoint.py)
@pytest.mark.slow
def test_kill_mid_epoch_resumes_to_the_same_parameters(tmp_path):
    recs = toy_records(24, seed=1)
    train, held = recs[:18], recs[18:]
    model, cfg = _bert(), SHORT

    ref = F.finetune_classifier(model, train, held, tmp_path / "ref", cfg, progress=False, torch_weights=False)
    assert ref.steps == 10

    class Killed(Exception):
        pass

    def kill(step):
        if step == 7:  # mid-epoch 1; the last checkpoint is step 6
            raise Killed

    with pytest.raises(Killed):
        F.finetune_classifier(model, train, held, tmp_path / "run", cfg, progress=False, torch_weights=False, on_step=kill)
    resumed = F.finetune_classifier(model, train, held, tmp_path / "run", cfg, progress=False, torch_weights=False)
    assert resumed.resumed_from == 6 and resumed.steps == 10
    # the final parameters (last checkpoint) equal the uninterrupted run's, leaf by leaf
    last_ref = F._manager(tmp_path / "ref.ckpt").latest_step()
    last_run = F._manager(tmp_path / "run.ckpt").latest_step()
    assert last_ref == last_run == 10
    a = F._manager(tmp_path / "ref.ckpt").restore(10)["params"]
    b = F._manager(tmp_path / "run.ckpt").restore(10)["params"]
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert [h["heldout_acc"] for h in ref.history] == [h["heldout_acc"] for h in resumed.history]


def test_checkpoint_of_another_configuration_is_refused(trained):
    # the shared run's checkpoints (CFG) met by a run with another lr: refused, naming the field
    model, _, recs, sp, out = trained
    by = {r.id: r for r in recs}
    with pytest.raises(F.CheckpointMismatch, match="lr"):
        F.finetune_classifier(model, [by[i] for i in sp["finetune"]], [by[i] for i in sp["heldout"]], out,
                              dataclasses.replace(CFG, lr=CFG.lr / 2), progress=False, torch_weights=False)


def test_batches_depend_on_seed_and_step_only():
    a = [F.batch_indices(10, 4, 3, s) for s in range(6)]
    b = [F.batch_indices(10, 4, 3, s) for s in range(6)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    # every record once per epoch (3 steps per epoch)
    assert sorted(np.concatenate(a[:3]).tolist()) == list(range(10))
    assert sorted(np.concatenate(a[3:]).tolist()) == list(range(10))
    assert not np.array_equal(np.concatenate(a[:3]), np.concatenate(a[3:]))


def test_splits_never_share_records_or_texts():
    recs = toy_records(60, seed=3)
    # duplicate texts under other ids must land in the same split
    recs += [EditRecord(id=f"dup:{i}", prompt=recs[i].prompt.upper(), target_true=recs[i].target_true,
                        extra=recs[i].extra) for i in range(10)]
    sp = F.split_records_for_finetune(recs, heldout=0.2, edit=0.3, seed=5)
    sets = {k: set(v) for k, v in sp.items()}
    assert sum(map(len, sets.values())) == len(recs)
    assert not (sets["finetune"] & sets["heldout"] or sets["finetune"] & sets["edit"] or sets["heldout"] & sets["edit"])
    where = {i: k for k, v in sp.items() for i in v}
    for i in range(10):
        assert where[f"dup:{i}"] == where[f"toy:{i}"]
    doc = F.splits_document(sp, recs)
    by = {r.id: r for r in recs}
    F.check_disjoint([by[i] for i in sp["edit"]], doc)  # the edit split is fine
    bad = [by[sp["finetune"][0]], by[sp["edit"][0]]]
    with pytest.raises(F.OverlapError, match=bad[0].id.replace(":", ".")):
        F.check_disjoint(bad, doc)
    # the same text under a new id is caught too
    clone = EditRecord(id="new:0", prompt=by[sp["heldout"][0]].prompt, target_true="yes", extra=recs[0].extra)
    with pytest.raises(F.OverlapError, match="heldout"):
        F.check_disjoint([clone], doc)


def test_a_model_without_a_classification_head_is_refused():
    with pytest.raises(F.FinetuneError, match="classification head"):
        F.check_classifier(hf.tiny("gpt2"), LABELS)
    with pytest.raises(F.FinetuneError, match="num_labels=2"):
        F.check_classifier(hf.tiny("bert", num_labels=3), LABELS)


def test_cli_names_the_record_with_a_label_outside_the_set(tmp_path, capsys):
    # in-process (`salem` as a subprocess: tests/test_cli.py): the same main(), exit code and stderr line
    from salem_jax import cli

    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "red blue", "label": "yes"}\n{"text": "paris rome", "label": "maybe"}\n')
    code = cli.main(["finetune", "--model", "tiny-bert", "--data", str(path), "--format", "classification",
                     "--labels", "yes,no", "--out", str(tmp_path / "m")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("salem finetune: error:") and len(err.strip().splitlines()) == 1
    assert "bad.jsonl" in err and "record 1" in err and "'label'" in err and "maybe" in err


@pytest.mark.slow
def test_saved_folder_opens_in_transformers_pytorch_with_the_same_logits(trained, tmp_path):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForSequenceClassification

    model, res, recs, sp, _ = trained
    out = F.save_classifier(F._with_label_names(model, LABELS), res.params, tmp_path / "pt", torch_weights=True)
    pt = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert pt.config.id2label == {0: "yes", 1: "no"}
    data, _ = F.encode_records(model, recs[:6], 128)
    batch, _ = F._rows(data, np.arange(6), 6)
    want = np.asarray(model.apply(res.params, batch))[:, 0]
    with torch.no_grad():
        got = pt(input_ids=torch.tensor(batch["input_ids"], dtype=torch.long),
                 attention_mask=torch.tensor(batch["attention_mask"], dtype=torch.long),
                 token_type_ids=torch.tensor(batch["token_type_ids"], dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)
