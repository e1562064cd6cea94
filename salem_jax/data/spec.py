"""Which records to read, as one typed value: `DataSpec`, and `read_records(spec)`.

The pipeline (config fields data, format, relation, limit, seed, data_dir), `salem dataset`,
`salem locate`, the keep set and the benchmarks all read records through here, so a data name
means the same everywhere.

`data` is resolved in this order: "countries" (the built-in country facts; `relation` picks
capital, region, currency, languages or all); an existing file path (needs `format`); a known
subset name (`paths.KNOWN_FILES`: zsre, counterfact, fever, rte, wikitext, ... in the data
directory, format inferred); a fetched public file name (`paths.PUBLIC_FILES`).
"""

from __future__ import annotations

import dataclasses
import os

from salem_jax.data import paths, readers
from salem_jax.data.countries import country_records
from salem_jax.data.records import RecordList

FORMATS = (*readers.FORMATS, "countries")
SKIP_FORMATS = ("zsre", "counterfact", "knowns", "fever", "nli", "classification")  # readers taking skip_invalid


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """What to read. None fields take the reader's own default (readers.read_*).

    labels / exclude_labels: classifier label sets (fever, nli, classification; classification
    needs labels); text_field / pair_field / label_field: their JSON fields (nli: premise /
    hypothesis); prompt_words / target_words: how `text` paragraphs become (prompt, continuation)."""

    data: str
    format: str | None = None
    relation: str | tuple[str, ...] = "capital"
    limit: int | None = None
    seed: int = 0
    data_dir: str | None = None
    skip_invalid: bool = False
    labels: tuple[str, ...] | None = None
    exclude_labels: tuple[str, ...] | None = None
    text_field: str | None = None
    pair_field: str | None = None
    label_field: str | None = None
    prompt_words: int | None = None
    target_words: int | None = None


def resolve(spec: DataSpec) -> tuple[str, str | None]:
    """(format, file path; None for the country facts); a clear error when the format is unknown."""
    data, fmt = spec.data, spec.format
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if data == "countries" or (not data and fmt == "countries"):
        return "countries", None
    if not data:
        raise ValueError("no data given: a file, a known name, or 'countries'")
    if fmt == "countries":
        raise ValueError(f"format 'countries' takes no data file (got {data!r}); use data 'countries'")
    if os.path.exists(data):
        if fmt is None:
            raise ValueError(f"--format is needed for the file {data} (config.format; one of {', '.join(FORMATS)})")
        return fmt, data
    if data in paths.KNOWN_FILES:
        return fmt or paths.KNOWN_FORMATS[data], str(paths.find_data_file(data, spec.data_dir))
    if data in paths.PUBLIC_FILES:
        return fmt or paths.PUBLIC_FORMATS[data], str(paths.find_data_file(data))
    if fmt is None:
        raise ValueError(f"--format is needed for the file {data} (config.format; one of {', '.join(FORMATS)})")
    return fmt, data  # not there: the reader's error names the file


def reader_kwargs(spec: DataSpec, fmt: str) -> dict:
    """The keyword arguments of readers.read_records for `spec`'s set fields."""
    kw: dict = dict(limit=spec.limit)
    if fmt in SKIP_FORMATS:
        kw["skip_invalid"] = spec.skip_invalid
    if fmt in ("fever", "nli", "classification"):
        kw.update({k: getattr(spec, k) for k in ("labels", "exclude_labels") if getattr(spec, k) is not None})
    if fmt in ("nli", "classification") and spec.label_field is not None:
        kw["label_field"] = spec.label_field
    if fmt == "nli":
        kw.update({k: v for k, v in (("premise_field", spec.text_field), ("hypothesis_field", spec.pair_field)) if v})
    elif fmt == "classification":
        if not spec.labels:
            raise ValueError("format classification needs --labels (config: the label set)")
        kw.update({k: getattr(spec, k) for k in ("text_field", "pair_field") if getattr(spec, k) is not None})
    elif fmt == "text":
        kw.update({k: getattr(spec, k) for k in ("prompt_words", "target_words") if getattr(spec, k) is not None})
    return kw


def read_records(spec: DataSpec) -> tuple[str, RecordList]:
    """(format, the records `spec` names)."""
    fmt, path = resolve(spec)
    if fmt == "countries":
        recs = country_records(spec.relation, seed=spec.seed)
        if spec.limit:
            recs = RecordList(recs[: spec.limit], skipped=recs.skipped, sources=recs.sources)
        return fmt, recs
    return fmt, readers.read_records(path, fmt, **reader_kwargs(spec, fmt))
