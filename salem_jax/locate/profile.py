"""What every layer-choosing method returns: a `LayerProfile` (per-layer scores, the chosen layers).

Saliency (`salem_jax.saliency`), LGA, causal tracing, the fine-tuning sweep and the editability
probe each score every candidate layer; `top_k_layers` (SaLEM eq. 5) picks the best k. The
profile is saved as JSON (`to_json`, `from_dict`); `jsonable` turns numpy / jax values into plain
Python for that. Moved here from `salem_jax/saliency.py`, so the type lives with the methods that
return it (`salem_jax.locate.choose.locate`).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Sequence

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class LayerProfile:
    """Per-layer scores of one layer-selection method, and the layers it chose.

    scores: group name -> one score per layer (in `layers` order); groups are "fail", "adapt",
    "pass", "overall" (whichever the method defines). `chosen` are the top-`top_k` layers of
    `scores[select_group]`. `extra` holds method-specific details (other scorers' scores, forward
    pass counts, sweep metrics) and must be JSON-serialisable.
    """

    method: str  # "saliency" | "lga" | "causal-trace" | "sweep"
    scorer: str
    layers: tuple[str, ...]
    scores: dict[str, list[float]]
    chosen: tuple[str, ...]
    select_group: str
    part: str
    top_k: int
    examples: dict[str, int]
    wall_time: float
    model: str = ""
    extra: dict = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        return jsonable(dataclasses.asdict(self))

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: dict) -> "LayerProfile":
        d = dict(d)
        d["layers"] = tuple(d["layers"])
        d["chosen"] = tuple(d["chosen"])
        return cls(**d)


def jsonable(x):
    """`x` with numpy / jax values as plain Python (non-finite floats as None), for json.dumps."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (np.ndarray, jax.Array)):
        return jsonable(np.asarray(x).tolist())
    if isinstance(x, (np.floating, float)):
        return None if not np.isfinite(x) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def top_k_layers(scores: Sequence[float] | np.ndarray, names: Sequence[str], k: int = 1) -> tuple[str, ...]:
    """Eq. 5: the names of the k highest-scoring layers, best first (ties: the earlier layer)."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1 or len(s) != len(names):
        raise ValueError(f"need one score per layer: {s.shape} scores for {len(names)} layers")
    if not 1 <= k <= len(names):
        raise ValueError(f"top_k must be in [1, {len(names)}], got {k}")
    if np.isnan(s).any():
        raise ValueError(f"scores contain NaN at layers {[names[i] for i in np.flatnonzero(np.isnan(s))]}")
    order = np.argsort(-s, kind="stable")
    return tuple(names[i] for i in order[:k])
