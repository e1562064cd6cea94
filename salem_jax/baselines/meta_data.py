"""Edit / locality batches for the meta-learned baselines (KE, ENN), deterministic by (seed, step).

Both baselines train on the same edit-set rows as MEND (salem_jax.data.edit_set): each step takes
`edits` fail rows (the edits; KE conditions on one at a time) and `loc` pass rows (the locality
inputs of MEND's KL term). All rows of a split are tokenised once to one padded length (so the
jitted steps compile once); `batch(step)` picks rows by a permutation seeded with (seed, epoch),
so a run is reproducible and a resumed run would see the same batches.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import numpy as np

from salem_jax.data.tokenize import encode


def row_target(model, row: Mapping):
    return int(row["label"]) if model.kind == "classifier" else row["target"]


def encode_rows(model, rows: Sequence[Mapping], length: int | None = None, where: str = "edit set") -> dict:
    pairs = [r.get("text_pair", "") or "" for r in rows]
    return encode(model, [r["prompt"] for r in rows], [row_target(model, r) for r in rows],
                  text_pairs=pairs if (model.kind == "classifier" and any(pairs)) else None, length=length, where=where)


@dataclasses.dataclass
class MetaData:
    """Encoded fail rows (`edit`) and pass rows (`loc`) of one split, padded to one length."""

    edit: dict  # numpy arrays [n_fail, ...]
    loc: dict  # numpy arrays [n_pass, ...]
    edit_rows: list
    seed: int
    edits_per_step: int = 1
    loc_per_step: int = 8

    @classmethod
    def from_rows(cls, model, rows: Sequence[Mapping], *, seed: int = 0, edits_per_step: int = 1,
                  loc_per_step: int = 8, where: str = "edit set") -> "MetaData":
        fails = [r for r in rows if r["group"] == "fail"]
        passes = [r for r in rows if r["group"] == "pass"]
        if not fails or not passes:
            raise ValueError(f"{where}: KE / ENN training needs fail rows (edits) and pass rows (locality); "
                             f"got {len(fails)} fail and {len(passes)} pass rows")
        both = encode_rows(model, fails + passes, where=where)
        n = len(fails)
        edit = {k: v[:n] for k, v in both.items()}
        loc = {k: v[n:] for k, v in both.items()}
        return cls(edit, loc, fails, seed, edits_per_step, min(loc_per_step, len(passes)))

    def _indices(self, n: int, count: int, step: int, stream: int) -> np.ndarray:
        per_epoch = max(n // count, 1)
        epoch, k = divmod(step, per_epoch)
        perm = np.random.default_rng([self.seed, stream, epoch]).permutation(n)
        idx = perm[k * count : (k + 1) * count]
        return idx if len(idx) == count else np.resize(perm, count)  # fewer rows than a batch: repeat

    def edit_indices(self, step: int) -> np.ndarray:
        """Positions (in `edit_rows`) of the edits of `step`."""
        return self._indices(len(self.edit_rows), self.edits_per_step, step, 1)

    def batch(self, step: int) -> tuple[dict, dict]:
        """(edit batch [edits_per_step], locality batch [loc_per_step]) of `step`."""
        e = self.edit_indices(step)
        l = self._indices(len(self.loc["labels"]), self.loc_per_step, step, 2)  # noqa: E741
        return {k: v[e] for k, v in self.edit.items()}, {k: v[l] for k, v in self.loc.items()}


def steps_per_epoch(data: MetaData) -> int:
    return max(math.ceil(len(data.edit_rows) / data.edits_per_step), 1)
