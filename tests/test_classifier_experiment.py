"""experiments.classifier's evaluation budget: the editor-train split's own edit cap, the table's notes.

Fast (no model): the end-to-end tiny runs are in tests/test_experiments.py (slow suite)."""

from experiments.classifier import results_table, train_split_config
from experiments.fever_minilm import get_config as fever_config
from experiments.nli_minilm import get_config as nli_config


def test_train_edits_caps_only_the_train_split_config():
    cfg = fever_config(False)
    cfg.eval.max_edits, cfg.train_edits = 40, 7
    tcfg = train_split_config(cfg)
    assert tcfg.eval.max_edits == 7
    assert cfg.eval.max_edits == 40  # the val split's config is not changed
    assert tcfg.eval.max_pass == cfg.eval.max_pass and tcfg.editor.steps == cfg.editor.steps


def test_train_edits_zero_keeps_max_edits():
    cfg = nli_config(True)
    assert cfg.train_edits == 0
    assert train_split_config(cfg).eval.max_edits == cfg.eval.max_edits


def test_real_configs_state_their_budget():
    # the budgets the README's measured tables ran with
    f, n = fever_config(False), nli_config(False)
    assert (f.eval.max_edits, f.train_edits, f.eval.max_pass, f.edit_max_tokens) == (48, 16, 16, 0)
    assert (f.editor.steps, f.ke.steps, f.enn.steps) == (100, 100, 50)
    assert (n.eval.max_edits, n.train_edits, n.eval.max_pass, n.edit_max_tokens) == (32, 8, 16, 64)
    assert (n.editor.steps, n.ke.steps, n.enn.steps, n.finetune.epochs, n.finetune.max_length) == (50, 50, 25, 1, 128)


def test_results_table_rows_and_note():
    split = dict(ea=0.75, dd_acc=0.0625, edit_seconds=0.5)
    out = dict(
        methods={"salem": dict(layers=["layer.0"], train=dict(split, ea=1.0), val=split, steps=100,
                               train_seconds=12.4)},
        finetune=dict(best_acc=0.765, majority_rate=0.474), model_folder="m",
        edit_set=dict(counts={"train": {"fail": 3}}), n_pass={"val": 16, "train": 16}, n_edits={"val": 48, "train": 16},
    )
    lines = results_table(out).splitlines()
    assert lines[2] == "| salem | layer.0 | 1.0000 | 0.7500 | 0.0625 | 0.0625 | 100 | 12 | 0.5000 |"
    assert "val: 48 edits, 16 pass rows; train: 16 edits, 16 pass rows" in lines[-1]


def test_drop_long_counts_pair_tokens_with_specials():
    from experiments.classifier import drop_long
    from salem_jax.data.records import EditRecord
    from types import SimpleNamespace

    from salem_jax.models.hf import _tiny_bert_tokenizer

    tok = _tiny_bert_tokenizer()  # tiny BERT's own tokenizer; drop_long reads only model.tokenizer
    model = SimpleNamespace(tokenizer=tok)
    recs = [EditRecord(id=f"r{i}", prompt=" ".join(["a"] * i), target_true="x", text_pair=pair)
            for i, pair in ((2, ""), (4, "b c"), (9, ""), (3, "b b b b b b"))]

    def hand(r):  # [CLS] text [SEP] (pair [SEP])
        n = len(tok.encode(r.prompt, add_special_tokens=False)) + 2
        return n + (len(tok.encode(r.text_pair, add_special_tokens=False)) + 1 if r.text_pair else 0)

    limit = 8
    kept, dropped = drop_long(model, recs, limit)
    assert [r.id for r in kept] == [r.id for r in recs if hand(r) <= limit]
    assert dropped == [r.id for r in recs if hand(r) > limit] and dropped  # the limit bites
    assert drop_long(model, recs, 0) == (recs, [])
