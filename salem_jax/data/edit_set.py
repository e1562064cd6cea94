"""The paper's edit set as data: its rows, its two splits, saving, loading and batching.

An edit set (SaLEM appendix A) holds three groups of rows:

* fail:  inputs the base model gets wrong, with the answer to learn;
* adapt: rephrasings of the fail inputs with the same answer (generalisation);
* pass:  inputs whose behaviour must not change (locality / drawdown).

Building one scores every record with the model, so it lives above the data layer, in
`salem_jax.edit_set_builder` (`build_edit_set`: the correction / counterfactual modes, the
batched jitted scorer, the base model's greedy answers). This module is what needs no model
run: the row columns and the `EditSet` type, the record split (`split_records`, by record,
deterministic for a seed), saving (atomic) and loading, sampling by group and the padded
batches of rows (`edit_set_batches`: every batch exactly `batch_size` rows, lengths from the
tokenizer's buckets, so a jitted consumer compiles once per bucket).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from salem_jax.data.readers import quiet_datasets
from salem_jax.data.records import Skipped, read_skip_report, write_skip_report
from salem_jax.data.tokenize import DEFAULT_BUCKETS, encode, pad_rows

# `datasets` is imported inside the functions that need it (heavy: seconds): salem_jax.data is
# imported by `salem --help` (commands import data.spec), which never touches an edit set.

MODES = ("correction", "counterfactual")
GROUPS = ("fail", "adapt", "pass")
SPLITS = ("train", "val")
CORRECT_CRITERION = (
    "generation: every target token is the argmax under teacher forcing (losses.example_correct); "
    "classification: the argmax label"
)
COLUMNS = (
    "id", "record_id", "group", "field", "prompt", "target", "target_true", "label", "text_pair",
    "base_correct", "base_token_acc",
)


def edit_set_features():
    import datasets

    v = datasets.Value
    return datasets.Features(
        {
            "id": v("string"),
            "record_id": v("string"),
            "group": v("string"),
            "field": v("string"),
            "prompt": v("string"),
            "target": v("string"),
            "target_true": v("string"),
            "label": v("int64"),
            "text_pair": v("string"),
            "base_correct": v("bool"),
            "base_token_acc": v("float32"),
        }
    )


@dataclasses.dataclass
class EditSet:
    """Rows in a `datasets.DatasetDict` ("train", "val") plus `info` (saved as info.json).

    Row columns (see interfaces.md): id, record_id, group ("fail"|"adapt"|"pass"), field (which
    record field the prompt came from: "prompt", "rephrases[0]", "loc_prompts[3]"), prompt,
    target (the answer to learn / keep; classification: the label name), target_true (the
    record's true answer, which a counterfactual edit moves away from), label (class index, -1
    for generation), text_pair, base_correct, base_token_acc.
    """

    data: Any  # datasets.DatasetDict
    info: dict
    skipped: list[Skipped] = dataclasses.field(default_factory=list)

    def __getitem__(self, split: str):
        if split not in self.data:
            raise KeyError(f"no split {split!r}; splits are {list(self.data)}")
        return self.data[split]

    def rows(self, split: str, group: str | None = None) -> list[dict]:
        """The rows of a split (optionally of one group) as dicts."""
        if group is not None and group not in GROUPS:
            raise ValueError(f"unknown group {group!r}; groups are {GROUPS}")
        rows = self[split].to_list()
        return rows if group is None else [r for r in rows if r["group"] == group]

    @property
    def counts(self) -> dict[str, dict[str, int]]:
        return self.info["counts"]

    def summary(self) -> str:
        lines = [f"edit set: mode={self.info['mode']} model={self.info['model']} seed={self.info['seed']}"]
        for split in (*SPLITS, "total"):
            c = self.info["counts"][split]
            n = self.info["records"][split]
            lines.append(f"  {split:5s}: {n:6d} records  fail {c['fail']:6d}  adapt {c['adapt']:6d}  pass {c['pass']:6d}")
        if self.skipped:
            lines.append(f"  skipped {len(self.skipped)} records (skipped.jsonl)")
        for why, n in (self.info.get("excluded") or {}).items():
            lines.append(f"  excluded {n} records: {why}")
        return "\n".join(lines)



# ---------------------------------------------------------------------------------------------
# Encoding


def encode_rows(model, rows: Sequence, length: int | None = None, target_length: int | None = None, buckets=DEFAULT_BUCKETS):
    """Encode rows (objects or dicts with prompt/target/label/text_pair) into one batch."""
    get = (lambda r, k: r[k]) if rows and isinstance(rows[0], dict) else getattr
    prompts = [get(r, "prompt") for r in rows]
    if model.kind == "classifier":
        targets = [int(get(r, "label")) for r in rows]
        pairs = [get(r, "text_pair") or None for r in rows]
        text_pairs = pairs if any(p is not None for p in pairs) else None
    else:
        targets = [get(r, "target") for r in rows]
        text_pairs = None
    return encode(model, prompts, targets, text_pairs=text_pairs, length=length, target_length=target_length, buckets=buckets)



def split_records(n: int, seed: int, val_fraction: float) -> np.ndarray:
    """Boolean mask [n]: True for records in "val". A seeded permutation; round(n * val_fraction)
    records (at least one when n >= 2 and val_fraction > 0) go to val."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = int(np.floor(n * val_fraction + 0.5))
    if val_fraction > 0 and n >= 2:
        n_val = max(n_val, 1)
    mask = np.zeros(n, dtype=bool)
    mask[np.random.default_rng(seed).permutation(n)[:n_val]] = True
    return mask



# ---------------------------------------------------------------------------------------------
# Saving and loading


def check_out_dir(out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Raise FileExistsError unless `save_edit_set(..., out_dir, overwrite=overwrite)` would write
    there: call it before any costly step (loading the model, scoring)."""
    out = Path(out_dir)
    if out.exists():
        if not out.is_dir() or not (out / "info.json").is_file():
            raise FileExistsError(f"{out} exists and is not an edit set; choose another --out")
        if not overwrite:
            raise FileExistsError(f"{out} already holds an edit set; pass overwrite=True (--overwrite) to replace it")
    return out


def missing_groups(counts: dict, needed: Sequence[str] = ("fail", "pass")) -> dict[str, list[str]]:
    """{split: the `needed` groups it has no rows of} from an edit set's `info["counts"]`
    (editor training needs fail and pass rows in train and val); empty when nothing is missing."""
    out = {}
    for split in SPLITS:
        gone = [g for g in needed if not (counts.get(split) or {}).get(g)]
        if gone:
            out[split] = gone
    return out


def save_edit_set(es: EditSet, out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write `out_dir/` = the DatasetDict (`datasets.load_from_disk(out_dir)` opens it), info.json
    and skipped.jsonl. Atomic: everything is written to a temporary folder beside `out_dir` and
    renamed into place. An existing edit set there is replaced only with `overwrite=True`; a
    folder that is not an edit set is never replaced."""
    out = check_out_dir(out_dir, overwrite=overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        with quiet_datasets():
            es.data.save_to_disk(str(tmp))
        write_skip_report(es.skipped, tmp / "skipped.jsonl")
        with open(tmp / "info.json", "w", encoding="utf-8") as f:
            json.dump(es.info, f, indent=2, ensure_ascii=False)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_edit_set(path: str | os.PathLike) -> EditSet:
    """Open a folder written by `save_edit_set`; a clear error if it is missing or damaged."""
    import datasets

    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"no edit set at {p} (build one with `salem dataset ... --out {p}`)")
    info_path = p / "info.json"
    if not info_path.is_file():
        raise FileNotFoundError(f"{p} is not an edit set: it has no info.json")
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{info_path} is corrupt ({e}); rebuild the edit set") from None
    try:
        data = datasets.load_from_disk(str(p))
    except Exception as e:  # noqa: BLE001 - re-raised with the folder named
        raise ValueError(f"{p}: the edit set's data cannot be loaded ({type(e).__name__}: {e}); rebuild it") from None
    if not isinstance(data, datasets.DatasetDict) or set(SPLITS) - set(data):
        raise ValueError(f"{p}: expected splits {SPLITS}, found {list(data) if hasattr(data, 'keys') else type(data).__name__}")
    for s in SPLITS:
        missing = set(COLUMNS) - set(data[s].column_names)
        if missing:
            raise ValueError(f"{p}: split {s!r} lacks columns {sorted(missing)}")
    skipped_path = p / "skipped.jsonl"
    skipped = read_skip_report(skipped_path) if skipped_path.is_file() else []
    return EditSet(data=data, info=info, skipped=skipped)


def sample_by_group(rows, max_per_group: int, seed: int = 0, groups: Sequence[str] | None = None) -> list[dict]:
    """At most `max_per_group` rows of each group (all of a smaller group), drawn without
    replacement with `seed` and kept in their original order within each group; groups in sorted
    order, only `groups` when given. `max_per_group` <= 0 keeps every row of the kept groups."""
    by_group: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_group[r["group"]].append(r)
    rng = np.random.default_rng(seed)
    out: list[dict] = []
    for g, rs in sorted(by_group.items()):
        if groups is not None and g not in groups:
            continue
        take = len(rs) if max_per_group <= 0 else min(len(rs), max_per_group)
        out += [rs[i] for i in np.sort(rng.choice(len(rs), size=take, replace=False))]
    return out


def edit_set_batches(
    model,
    rows,
    batch_size: int,
    length: int | None = None,
    *,
    target_length: int | None = None,
    buckets: Sequence[int] = DEFAULT_BUCKETS,
) -> Iterator[tuple[dict[str, np.ndarray], list[dict]]]:
    """Iterate over `rows` (dicts with prompt, target, label, text_pair: a list, or a split of an
    EditSet) in order, `batch_size` at a time: (batch dict padded to exactly `batch_size` rows,
    the rows in it). Lengths are `length` (and `target_length` for seq2seq) when given, else
    the bucket of each batch's longest row, so shapes come from a small fixed set. Padding rows
    have all-zero masks."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rows = list(rows) if not isinstance(rows, list) else rows
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        batch = encode_rows(model, chunk, length=length, target_length=target_length, buckets=buckets)
        yield pad_rows(batch, batch_size), chunk
