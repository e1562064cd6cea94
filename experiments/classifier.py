"""The paper's classifier experiments on a model this project fine-tunes itself (Tables 1 and 3).

`run_classifier_experiment(cfg, workdir)`:

1. records: FEVER (SUPPORTS / REFUTES; NOT ENOUGH INFO left out and counted) or RTE;
2. the classifier: `cfg.finetuned` (a `salem finetune` folder) if given, else `workdir/finetuned`
   if a previous run wrote it, else fine-tune `cfg.model` now (salem_jax.finetune; the records are
   split by text into finetune / heldout / edit, `splits.json` in the folder);
3. the edit records are the folder's `edit` split; any record of its finetune or heldout split is
   refused (`check_disjoint`, naming the records). The edit set is built as the paper does:
   FEVER in counterfactual mode (each label flipped with probability 0.5: flipped = fail row,
   kept = pass row), NLI in correction mode (the classifier's own errors = fail, its correct
   answers = pass), split 90:10 by record into editor train / val edits (`edit_split.json`);
4. saliency profile on the train rows (the salient layer and the top three);
5. methods (`cfg.methods`, from the method registry salem_jax.methods): salem, salem3, mend_fixed
   (MEND editors), ft, ft_kl (fine-tuning), ke and enn (salem_jax.methods.meta), each evaluated one
   edit at a time on up to `eval.max_edits` val edits and up to `train_edits` train edits, DD on
   the first `eval.max_pass` pass rows of each split;
6. `results.json` and `results.md`: the paper's Table 3 columns (EA and DD on train and on val)
   plus the edited layers, editor steps and seconds.

DD is the pass rows' accuracy before minus after one edit. For ENN the "before" is the model the
user gave (ENN replaces it with its meta-trained base theta*, whose own drift is reported as
`base_drift`), so ENN's DD includes what its training changed.
"""

from __future__ import annotations

import functools
import json
import os
import time
from pathlib import Path

import ml_collections

from salem_jax import finetune as F
from salem_jax import methods as method_registry
from salem_jax import pipeline as P
from salem_jax.commands.finetune import read_classification_records
from salem_jax.data.edit_set import save_edit_set
from salem_jax.edit_set_builder import build_edit_set
from salem_jax.methods import Context
from salem_jax.mend.train import prepare_splits
from salem_jax.models import hf, load_model
from salem_jax.pipeline import default_config

METHODS = ("salem", "salem3", "mend_fixed", "ft", "ft_kl", "ke", "enn")  # the paper's Table 3 rows


def classifier_config(name: str, data: str, mode: str, tiny: bool) -> ml_collections.ConfigDict:
    c = default_config()
    c.name = name
    c.model = "minilm-l6"
    c.data = data
    c.format = "fever" if data == "fever" else "nli"
    c.mode = mode
    c.eval.text = ""
    c.methods = METHODS
    c.finetuned = ""  # a `salem finetune` folder; '' = workdir/finetuned (fine-tuned on the first run)
    c.finetune = ml_collections.ConfigDict(dict(epochs=1, batch_size=16, lr=1e-4, max_length=128, heldout=0.1,
                                                edit=0.2, patience=1, max_steps=0))
    # The evaluation budget (each edit re-runs the classifier on every pass row: edits x pass rows
    # forward passes per method): all val edits up to max_edits, at most train_edits of the editor's
    # train edits (Table 3's "train" columns), DD on the first max_pass pass rows of each split.
    # Measured on this 2-core CPU at load ~10: ~0.065 s per pass row per edit, 1.5-3 s per MEND step (1-3 layers)
    # (README, "Classifiers"); these defaults keep an experiment near 20 minutes there.
    c.eval.max_edits = 48
    c.eval.max_pass = 16
    c.train_edits = 16  # 0 = eval.max_edits
    c.edit_max_tokens = 0  # > 0: edit records longer than this many tokens are left out (listed)
    c.editor.steps = 100
    c.ke.steps = 100
    c.enn.steps = 50
    if tiny:
        from experiments.common import tiny_overrides

        tiny_overrides(c, "tiny-bert")
        c.limit = 160
        c.train_edits = 0  # tiny_overrides' eval.max_edits for both splits
        c.finetune.update(dict(epochs=1, batch_size=8, lr=1e-3, edit=0.5))
        c.ke.update(dict(steps=4, lstm_hidden=8, condition_dim=16, hidden=8, loc_per_step=4))
        c.enn.update(dict(steps=4, loc_per_step=4))
    return c


def read(cfg):

    return read_classification_records(cfg.data, cfg.format, data_dir=cfg.data_dir or None, limit=cfg.limit or 0)


def base_model(cfg, n_labels: int):

    if cfg.model.startswith("tiny-"):
        return hf.tiny(cfg.model[len("tiny-"):], seed=cfg.seed, num_labels=n_labels)
    return load_model(cfg.model, num_labels=n_labels)


def finetuned_classifier(cfg, records, work: Path, say):
    """(model folder, splits document): reuse cfg.finetuned / work/finetuned or fine-tune now."""

    folder = Path(cfg.finetuned) if cfg.finetuned else work / "finetuned"
    if (folder / "config.json").is_file():
        say(f"reusing the fine-tuned classifier in {folder}")
        return folder, F.read_splits(folder)
    if cfg.finetuned:
        raise FileNotFoundError(f"--config.finetuned={cfg.finetuned}: no model folder there (config.json missing)")
    labels = F.label_set(records, cfg.data)
    model = base_model(cfg, len(labels))
    f = cfg.finetune
    splits = F.split_records_for_finetune(records, heldout=f.heldout, edit=f.edit, seed=cfg.seed)
    doc = F.splits_document(splits, records, data=cfg.data, seed=cfg.seed, heldout=f.heldout, edit=f.edit,
                            excluded=dict(getattr(records, "excluded", {}) or {}))
    by = {r.id: r for r in records}
    fc = F.FinetuneConfig(epochs=f.epochs, batch_size=f.batch_size, lr=f.lr, max_length=f.max_length,
                          patience=f.patience, seed=cfg.seed, max_steps=f.max_steps)
    say(f"fine-tuning {model.name} on {len(splits['finetune'])} records (held out {len(splits['heldout'])}, "
        f"kept for editing {len(splits['edit'])})")
    res = F.finetune_classifier(model, [by[i] for i in splits["finetune"]], [by[i] for i in splits["heldout"]],
                                folder, fc, progress=cfg.progress, splits_doc=doc,
                                torch_weights=False if cfg.model.startswith("tiny-") else None)
    say(f"held-out accuracy {res.best_acc:.4f} (majority class {res.majority_rate:.4f}) after {res.steps} steps")
    return folder, doc


def token_counts(model, records) -> list[int]:
    """Tokens of each record as the classifier reads it ([CLS] text [SEP] pair [SEP])."""
    tok = model.tokenizer
    return [len(tok(r.prompt, r.text_pair or None, add_special_tokens=True)["input_ids"]) for r in records]


def drop_long(model, records, max_tokens: int) -> tuple[list, list[str]]:
    """(records of at most max_tokens tokens, ids of the others); max_tokens 0 keeps all.

    Why: every edit re-scores the pass rows, padded to their longest row's length bucket, so a few
    long RTE pairs (12% exceed 128 tokens, the fine-tuning length) would double or quadruple the cost
    of every evaluation; the classifier was also trained on pairs truncated at that length."""
    if not max_tokens:
        return list(records), []
    n = token_counts(model, records)
    return [r for r, k in zip(records, n) if k <= max_tokens], [r.id for r, k in zip(records, n) if k > max_tokens]


def train_split_config(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """cfg for evaluating the editor-train edits: eval.max_edits = cfg.train_edits (0: unchanged)."""
    out = cfg.copy_and_resolve_references()
    if cfg.get("train_edits", 0):
        with out.unlocked():
            out.eval.max_edits = int(cfg.train_edits)
    return out


def _fmt(x):
    return "-" if x is None else f"{x:.4f}" if isinstance(x, float) else str(x)


def results_table(out: dict) -> str:
    head = "| method | layers | EA train | EA val | DD train | DD val | editor steps | train s | edit s |"
    lines = [head, "|" + "---|" * 9]
    for name, m in out["methods"].items():
        tr, va = m["train"], m["val"]
        lines.append(f"| {name} | {', '.join(m['layers'])} | {_fmt(tr.get('ea'))} | {_fmt(va.get('ea'))} | "
                     f"{_fmt(tr.get('dd_acc'))} | {_fmt(va.get('dd_acc'))} | {m.get('steps', '-')} | "
                     f"{m['train_seconds']:.0f} | {_fmt(va.get('edit_seconds'))} |")
    ft = out.get("finetune", {})
    note = (f"\nClassifier: {out['model_folder']} (held-out accuracy {_fmt(ft.get('best_acc'))}, majority class "
            f"{_fmt(ft.get('majority_rate'))}). Edits: {out['edit_set']['counts']}. EA = share of edits right after "
            f"the edit; DD = pass-row accuracy before minus after (val: {out['n_edits']['val']} edits, "
            f"{out['n_pass']['val']} pass rows; train: {out['n_edits']['train']} edits, {out['n_pass']['train']} "
            "pass rows).")
    return "\n".join(lines) + "\n" + note


def classifier_edit_set(cfg: ml_collections.ConfigDict, work: Path, say, methods=()) -> dict:
    """Steps 1-3 of the experiment: records, the fine-tuned classifier, the edit set split into
    editor train / val rows (written to work/edit_set and work/edit_split.json).

    Shared with benchmarks/mend_sweep.py so that its layer-set ablation trains on exactly the
    experiment's edits. methods: registry Methods checked against the model before the edit set is
    built. Returns dict(model, folder, splits, es, train_rows, val_rows)."""
    records = read(cfg)
    folder, splits = finetuned_classifier(cfg, records, work, say)
    model = load_model(str(folder))
    for m in methods:
        m.refuse_unsupported(model)
        m.check(Context(model=model, cfg=cfg, work=work, say=say))
    # --- edit set: the edit split's records, scored by the classifier
    by = {r.id: r for r in records}
    missing = [i for i in splits["splits"]["edit"] if i not in by]
    if missing:
        raise ValueError(f"{folder}/splits.json names edit records that {cfg.data} does not have (first: {missing[:5]}); "
                         "was the classifier fine-tuned on another file or --config.limit?")
    edit_records = [by[i] for i in splits["splits"]["edit"]]
    F.check_disjoint(edit_records, splits, where=str(folder))
    edit_records, too_long = drop_long(model, edit_records, cfg.edit_max_tokens)
    if too_long:
        say(f"left out {len(too_long)} edit records longer than {cfg.edit_max_tokens} tokens (edit_split.json)")
    es = build_edit_set(model, edit_records, mode=cfg.mode, seed=cfg.seed, val_fraction=cfg.val_fraction,
                        batch_size=cfg.score_batch, progress=cfg.progress, skip_invalid=cfg.skip_invalid)
    save_edit_set(es, work / "edit_set", overwrite=True)
    train_rows, val_rows = P.split_rows(es)
    F.write_json(work / "edit_split.json", dict(
        model_folder=str(folder), mode=cfg.mode,
        finetune=splits["splits"]["finetune"], heldout=splits["splits"]["heldout"],
        editor_train=sorted({r["record_id"] for r in train_rows}, key=F.id_order),
        editor_val=sorted({r["record_id"] for r in val_rows}, key=F.id_order),
        too_long=dict(max_tokens=cfg.edit_max_tokens, records=too_long)))
    say(es.summary())
    return dict(model=model, folder=folder, splits=splits, es=es, train_rows=train_rows, val_rows=val_rows)


def run_classifier_experiment(cfg: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:


    # --- load: the methods (checked first), the records, the fine-tuned classifier
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()

    def say(msg):
        print(f"[{cfg.name}] {msg}", flush=True)

    methods = [method_registry.get(name) for name in cfg.methods]  # unknown names fail here, before any cost
    prep = classifier_edit_set(cfg, work, say, methods)
    model, folder, es = prep["model"], prep["folder"], prep["es"]
    train_rows, val_rows = prep["train_rows"], prep["val_rows"]

    # --- locate: saliency over the train rows
    profile = P.saliency(model, train_rows, cfg)
    (work / "profile.json").write_text(profile.to_json())
    say(f"saliency chose {', '.join(profile.chosen)}")
    # --- for each method: prepare, evaluate
    ctx = Context(model=model, cfg=cfg, work=work, say=say, train_rows=train_rows, val_rows=val_rows,
                  data=prepare_splits(model, {"train": train_rows, "val": val_rows}), profile=profile)
    train_cfg = train_split_config(cfg)
    results: dict = {}
    n_pass = {s: min(cfg.eval.max_pass, sum(r["group"] == "pass" for r in rows))
              for s, rows in (("train", train_rows), ("val", val_rows))}
    n_edits = {s: min(c.eval.max_edits, sum(r["group"] == "fail" for r in rows))
               for s, rows, c in (("train", train_rows, train_cfg), ("val", val_rows, cfg))}
    for method in methods:
        t = time.perf_counter()
        layers = tuple(method.layers(ctx))
        prepared = method.prepare(ctx, layers)
        train_seconds = time.perf_counter() - t
        edit = functools.partial(prepared.edit, model.params)  # every edit starts from the given model
        per, eval_seconds = {}, {}
        for split, rows, split_cfg in (("val", val_rows, cfg), ("train", train_rows, train_cfg)):
            t = time.perf_counter()
            per[split] = P.evaluate_method(model, edit, rows, [], split_cfg, f"{method.name} ({split})")
            eval_seconds[split] = time.perf_counter() - t
        info = {k: v for k, v in prepared.info.items() if k not in ("layers",)}
        results[method.name] = dict(info, layers=list(layers), steps=prepared.info.get("steps"),
                                    train_seconds=train_seconds, eval_seconds=eval_seconds, **per)
        say(f"{method.name}: EA train {_fmt(per['train'].get('ea'))} val {_fmt(per['val'].get('ea'))}, "
            f"DD train {_fmt(per['train'].get('dd_acc'))} val {_fmt(per['val'].get('dd_acc'))} "
            f"(prepare {train_seconds:.0f}s, evaluate {sum(eval_seconds.values()):.0f}s)")
    # --- report
    ft_info = json.loads((folder / "finetune.json").read_text()) if (folder / "finetune.json").is_file() else {}
    out = dict(config=json.loads(cfg.to_json_best_effort()), model_folder=str(folder), finetune=ft_info,
               edit_set=es.info, n_pass=n_pass, n_edits=n_edits, chosen_layers=list(profile.chosen),
               profile=profile.to_dict(),
               methods=results, seconds=time.perf_counter() - t_all)
    table = results_table(out)
    (work / "results.json").write_text(json.dumps(F.jsonable(out), indent=2))
    (work / "results.md").write_text(table + "\n")
    print(table, flush=True)
    say(f"done in {out['seconds']:.0f}s; results in {work}")
    return out


def main_for(name: str, get_config, argv=None) -> int:
    from experiments.common import parse

    cfg, workdir = parse(get_config, argv, name)
    run_classifier_experiment(cfg, workdir)
    return 0
