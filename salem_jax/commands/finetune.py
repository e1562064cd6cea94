"""`salem finetune`: fine-tune a sequence classifier (BERT family) on a classification file.

    salem finetune --model minilm-l6 --data fever --out runs/minilm-fever
    salem finetune --model minilm-l6 --data rte --out runs/minilm-rte --epochs 4
    salem finetune --model FOLDER --data my.jsonl --format classification --labels pos,neg \\
        --text-field text --label-field label --out runs/my-classifier

The records are split by text into `finetune` (trained on), `heldout` (accuracy after each
epoch, early stopping) and `edit` (left untouched for the editing experiments); `OUT/splits.json`
says which record went where. OUT holds the best epoch's model (config.json with the label names,
Flax weights, PyTorch model.safetensors when torch is installed, tokenizer) that
`salem_jax.models.load_model(OUT)` and transformers' `AutoModelForSequenceClassification` open,
plus `finetune.json` (held-out accuracy per epoch beside the majority-class rate). Checkpoints go
to OUT.ckpt; rerunning the same command after a kill resumes from the last one.
"""

from __future__ import annotations

# JAX, the models and the data-set code are imported inside `run` (heavy: seconds), not here:
# `salem --help` builds every command's parser (cli.build_parser) and answers without them.
import argparse
import logging
import sys


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "finetune",
        help="fine-tune a classifier (BERT family) on classification records",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="minilm-l6", help="a BERT-family classifier: name, folder or hub id")
    p.add_argument("--num-labels", type=int, default=None,
                   help="classes of a new head (default: the size of the label set)")
    p.add_argument("--data", required=True, help="a data file, or a known name (fever, rte)")
    p.add_argument("--data-dir", default=None, help="where known names are looked up (default SALEM_JAX_DATA or ../shared/data)")
    p.add_argument("--format", default=None, choices=("fever", "nli", "classification"),
                   help="reader (default: the known name's, else classification)")
    p.add_argument("--labels", default=None, help="comma-separated label set (format classification; order = class index)")
    p.add_argument("--exclude-labels", default="", help="comma-separated labels to leave out (counted)")
    p.add_argument("--text-field", default="text")
    p.add_argument("--pair-field", default=None)
    p.add_argument("--label-field", default="label")
    p.add_argument("--limit", type=int, default=0, help="read only the first N records (0 = all)")
    p.add_argument("--out", required=True, help="folder for the fine-tuned model")
    p.add_argument("--checkpoints", default=None, help="checkpoint folder (default OUT.ckpt)")
    p.add_argument("--heldout", type=float, default=0.1, help="fraction of texts for held-out accuracy")
    p.add_argument("--edit", type=float, default=0.2, help="fraction of texts kept out for editing experiments")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup", type=float, default=0.1, help="warm-up fraction of all steps")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--patience", type=int, default=1, help="epochs without a better held-out accuracy before stopping")
    p.add_argument("--max-steps", type=int, default=0, help="stop after N steps in all (0 = epochs only)")
    p.add_argument("--checkpoint-every", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-torch-weights", action="store_true", help="write Flax weights only")
    p.add_argument("--no-progress", action="store_true")


def read_classification_records(data: str, fmt: str | None = None, *, data_dir=None, labels: str | None = None,
                                exclude_labels: str = "", text_field: str = "text", pair_field: str | None = None,
                                label_field: str = "label", limit: int = 0):
    """Records of a classification file or known data name (readers' errors name file, record, field)."""
    import os

    from salem_jax.data import paths, readers

    path = data
    if not os.path.exists(path):
        if data not in paths.KNOWN_FILES:
            raise FileNotFoundError(f"--data {data!r}: no such file, and not a known data name "
                                    f"({', '.join(k for k, f in paths.KNOWN_FORMATS.items() if f in ('fever', 'nli'))})")
        fmt = fmt or paths.KNOWN_FORMATS[data]
        path = str(paths.find_data_file(data, data_dir))
    fmt = fmt or "classification"
    kw = dict(limit=limit or None)
    excl = tuple(x for x in exclude_labels.split(",") if x)
    if fmt == "fever":
        if labels:
            kw["labels"] = tuple(labels.split(","))
        return readers.read_fever(path, **kw)
    if fmt == "nli":
        if labels:
            kw["labels"] = tuple(labels.split(","))
        return readers.read_nli(path, exclude_labels=excl, **kw)
    if fmt == "classification":
        if not labels:
            raise ValueError("--format classification needs --labels (the declared label set, comma-separated)")
        return readers.read_classification(path, labels=tuple(labels.split(",")), text_field=text_field,
                                           pair_field=pair_field, label_field=label_field, exclude_labels=excl, **kw)
    raise ValueError(f"--format {fmt!r}: a classification format is needed (fever, nli, classification)")


def run(args) -> int:
    from salem_jax import finetune as F
    from salem_jax.data.records import RecordError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        records = read_classification_records(
            args.data, args.format, data_dir=args.data_dir, labels=args.labels, exclude_labels=args.exclude_labels,
            text_field=args.text_field, pair_field=args.pair_field, label_field=args.label_field, limit=args.limit)
        labels = F.label_set(records, args.data)
        from salem_jax.models import load_model

        model = load_model(args.model, num_labels=args.num_labels or len(labels))
        F.check_classifier(model, labels)
        splits = F.split_records_for_finetune(records, heldout=args.heldout, edit=args.edit, seed=args.seed)
        by_id = {r.id: r for r in records}
        doc = F.splits_document(splits, records, data=str(getattr(records, "sources", [args.data])[0]),
                                seed=args.seed, heldout=args.heldout, edit=args.edit,
                                excluded=dict(getattr(records, "excluded", {}) or {}))
        config = F.FinetuneConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                                  weight_decay=args.weight_decay, warmup_fraction=args.warmup,
                                  max_length=args.max_length, patience=args.patience,
                                  checkpoint_every=args.checkpoint_every, seed=args.seed, max_steps=args.max_steps)
        print(f"{len(records)} records ({', '.join(f'{k} {v}' for k, v in doc['counts'].items())}); "
              f"excluded by label: {doc['excluded'] or 'none'}", flush=True)
        res = F.finetune_classifier(
            model, [by_id[i] for i in splits["finetune"]], [by_id[i] for i in splits["heldout"]], args.out, config,
            checkpoint_dir=args.checkpoints, progress=not args.no_progress, splits_doc=doc,
            torch_weights=False if args.no_torch_weights else None,
            extra_info=dict(data=doc["data"], base_model=args.model))
    except (RecordError, F.FinetuneError, F.OverlapError, FileNotFoundError, ValueError) as e:
        print(f"salem finetune: error: {e}", file=sys.stderr)
        return 2
    print(f"best held-out accuracy {res.best_acc:.4f} at epoch {res.best_epoch} (majority class {res.majority_rate:.4f}); "
          f"{res.steps} steps{' (stopped early)' if res.stopped_early else ''}; model in {res.out}")
    return 0
