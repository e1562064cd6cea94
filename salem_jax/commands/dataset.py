"""`salem dataset`: build a fail / adapt / pass edit set for a model from a data file.

    salem dataset --model smollm2-135m --data countries --relation capital --out runs/es-capitals
    salem dataset --model smollm2-135m --data zsre --limit 200 --out runs/es-zsre
    salem dataset --model smollm2-135m --data counterfact --mode counterfactual --out runs/es-cf
    salem dataset --model M --data my.jsonl --format nli --labels entailment,neutral,contradiction --out D

`--data` is a file path, a known name (zsre, counterfact, fever, rte, wikitext, ... looked up in
the data directory: --data-dir > $SALEM_JAX_DATA > ../shared/data) or "countries" (real facts
from the countryinfo package). `salem fetch-data` downloads the full public ROME files.
"""

from __future__ import annotations

# JAX, the models and the data-set code are imported inside `run` (heavy: seconds), not here:
# `salem --help` builds every command's parser (cli.build_parser) and answers without them.
import argparse
import sys

from salem_jax.data import paths
from salem_jax.data.spec import FORMATS as ALL_FORMATS
from salem_jax.data.spec import DataSpec, read_records
from salem_jax.data.tokenize import DEFAULT_MAX_TOKENS, DEFAULT_TOKEN_BUDGET


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "dataset",
        help="score a data file with a model and write its fail/adapt/pass edit set",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="model name (smollm2-135m, minilm-l6), folder, .gguf or hub id")
    p.add_argument("--data", default=None, help="data file, known name (%s) or 'countries'" % ", ".join(paths.KNOWN_FILES))
    p.add_argument("--format", choices=ALL_FORMATS, default=None, help="record format (inferred for known names)")
    p.add_argument("--mode", choices=("correction", "counterfactual"), default="correction")
    p.add_argument("--out", required=True, help="output folder of the edit set")
    p.add_argument("--limit", type=int, default=None, help="read only the first N records")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val split (and of label flips)")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=16, help="rows per scoring batch (fewer for long rows: --token-budget)")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                   help="longest prompt + target in tokens (also capped by the model's context); longer records are "
                   "errors (or skipped with --skip-invalid)")
    p.add_argument("--token-budget", type=int, default=DEFAULT_TOKEN_BUDGET,
                   help="at most this many padded tokens per scoring batch (bounds memory)")
    p.add_argument("--skip-invalid", action="store_true", help="skip bad records and write skipped.jsonl instead of failing")
    p.add_argument("--data-dir", default=None, help=f"data directory (default ${paths.ENV_DATA} or ../shared/data)")
    p.add_argument("--relation", default="capital", help="countries: capital, region, currency, languages or all")
    p.add_argument("--labels", default=None, help="classification: comma-separated label set (its order = class index)")
    p.add_argument("--exclude-labels", default=None, help="classification: comma-separated labels to leave out")
    p.add_argument("--text-field", default=None, help="classification: field of the text")
    p.add_argument("--pair-field", default=None, help="classification: field of the second text (NLI)")
    p.add_argument("--label-field", default="label")
    p.add_argument("--prompt-words", type=int, default=24, help="text: words of context per record")
    p.add_argument("--target-words", type=int, default=4, help="text: words to predict per record")
    p.add_argument(
        "--prompt-template",
        default=None,
        help='wrap every prompt, rephrase and locality prompt: "{}" marks the text, "\\n" is a newline '
        '(e.g. "Question: {}\\nAnswer:" for zsRE questions)',
    )
    p.add_argument("--flip-probability", type=float, default=0.5, help="classification counterfactual: P(flip)")
    p.add_argument("--dtype", default="float32", help="model dtype (float32, bfloat16, float16)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing edit set at --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    f = subparsers.add_parser(
        "fetch-data",
        help="download the full public ROME/MEMIT data files into a local cache (needs a network)",
    )
    f.add_argument("--files", nargs="+", default=["counterfact-full", "zsre-full"], choices=list(paths.PUBLIC_FILES))
    f.add_argument("--cache", default=None, help=f"cache folder (default ${paths.ENV_CACHE} or ~/.cache/salem_jax)")
    f.add_argument("--timeout", type=float, default=5.0, help="seconds before giving up on a connection (no retries)")
    f.add_argument("--overwrite", action="store_true")


def _load_model(name: str, *, dtype: str = "float32", num_labels: int | None = None):
    # Imported here: loading pulls in jax and transformers, which `salem --help` does not need.
    from salem_jax.models import load_model

    return load_model(name, dtype=dtype, num_labels=num_labels)


def _split_list(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    items = tuple(t.strip() for t in text.split(",") if t.strip())
    if not items:
        raise ValueError(f"empty list {text!r}")
    return items


def data_spec(args) -> DataSpec:
    """The DataSpec the flags describe."""
    return DataSpec(
        data=args.data, format=args.format, relation=args.relation, limit=args.limit, seed=args.seed,
        data_dir=args.data_dir, skip_invalid=args.skip_invalid, labels=_split_list(args.labels),
        exclude_labels=_split_list(args.exclude_labels), text_field=args.text_field, pair_field=args.pair_field,
        label_field=args.label_field, prompt_words=args.prompt_words, target_words=args.target_words,
    )


def _template(args) -> str | None:
    t = getattr(args, "prompt_template", None)
    return None if t is None else t.replace("\\n", "\n")


def run(args) -> int:
    if getattr(args, "command", "dataset") == "fetch-data":
        return _run_fetch(args)
    from salem_jax.edit_set_builder import build_edit_set
    from salem_jax.data.edit_set import check_out_dir, missing_groups, save_edit_set
    from salem_jax.data.records import with_template

    check_out_dir(args.out, overwrite=args.overwrite)  # before the model is loaded and every record scored
    fmt, records = read_records(data_spec(args))
    template = _template(args)
    if template is not None:
        records = with_template(records, template)
    print(f"read {records.summary()}", file=sys.stderr)
    labels = records[0].labels if records else ()
    model = _load_model(args.model, dtype=args.dtype, num_labels=len(labels) if labels else None)
    es = build_edit_set(
        model, records, mode=args.mode, seed=args.seed, val_fraction=args.val_fraction,
        batch_size=args.batch_size, progress=not args.no_progress, skip_invalid=args.skip_invalid,
        flip_probability=args.flip_probability, max_tokens=args.max_tokens, token_budget=args.token_budget,
    )
    es.info["format"] = fmt
    es.info["prompt_template"] = template
    es.info["command"] = " ".join(sys.argv) if sys.argv else ""
    if fmt == "countries":
        from salem_jax.data.countries import country_fact_counts

        es.info["relation"] = args.relation
        es.info["country_facts"] = country_fact_counts(records)
    out = save_edit_set(es, args.out, overwrite=args.overwrite)
    print(es.summary())
    for split, groups in missing_groups(es.info["counts"]).items():
        print(
            f"warning: split {split!r} has no {' and no '.join(repr(g) for g in groups)} rows; `salem train-editor` "
            f"needs fail and pass rows in both splits: use more records (--limit) or a larger --val-fraction",
            file=sys.stderr,
        )
    print(f"wrote {out}" + (f" (skip report: {out}/skipped.jsonl)" if es.skipped else ""))
    return 0


def _run_fetch(args) -> int:
    try:
        got = paths.fetch_public_data(
            args.files, cache=args.cache, timeout=args.timeout, overwrite=args.overwrite, base_url=paths.ROME_DATA_URL
        )
    except paths.DataFetchError as e:
        print(f"salem fetch-data: error: {e}", file=sys.stderr)
        return 1
    for name, p in got.items():
        print(f"{name}: {p}")
    return 0
