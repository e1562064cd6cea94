"""What r-ROME, MEMIT, EMMET and AlphaEdit share: their configuration, their result, and reading /
writing an MLP output projection.

All four functions (`salem_jax.baselines.rrome.rrome_edit`, `salem_jax.baselines.mass_edit.
memit_edit` / `emmet_edit` / `alphaedit_edit`) have one signature:

    fn(model, params, requests, *, layers, stats, config=EditorConfig(), state=None, progress=True)
        -> EditOutcome

`requests`: EditRequests, dicts or data-reader EditRecords (`salem_jax.baselines.requests`);
`layers`: block names ("layers.8"; r-ROME takes exactly one, the others a band, edited in order);
`stats`: a `salem_jax.baselines.keystats.KeyStats` of the unedited model; `state`: AlphaEdit's
memory of earlier edits' keys (the others ignore it and return None).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np

from salem_jax.baselines.rome import ROMEConfig, rome_weight
from salem_jax.models.base import Weight, get_path, set_path


@dataclasses.dataclass(frozen=True)
class EditorConfig:
    """Hyper-parameters of the four editors. `value` holds v*'s optimisation (ROME's GPT-2 XL
    settings; its `prefixes` are replaced by the KeyStats prefixes when `use_prefixes`)."""

    value: ROMEConfig = ROMEConfig()
    use_prefixes: bool = True  # average keys (and v*'s loss) over ("",) + KeyStats.prefixes()
    batch_size: int = 100  # MEMIT / EMMET / AlphaEdit: edits per closed-form update
    memit_lambda: float = 15000.0  # MEMIT's mom2_update_weight (GPT-J: 15000, GPT-2 XL: 20000)
    emmet_lambda: float = 0.1  # EMMET's relaxation of dW K = R (0: exact equality)
    alpha_energy: float = 0.01  # AlphaEdit: null space = smallest eigen-directions holding this share of trace(C)
    alpha_threshold: float = 0.0  # > 0: null space = eigen-directions of C below it (AlphaEdit's 2e-2), not alpha_energy
    alpha_l2: float = 10.0  # AlphaEdit's L2


@dataclasses.dataclass
class EditOutcome:
    params: Any  # edited parameters (the input params are untouched)
    method: str
    layers: tuple[str, ...]
    edited: tuple[int, ...]  # indices of the requests that were edited
    skipped: tuple[tuple[int, str], ...]  # (index, reason)
    per_edit: list[dict]  # per edited request: losses, norms, residual errors
    per_batch: list[dict]  # per closed-form update (per layer): |dW|, constraint error
    stats: dict  # KeyStats.report(): covariance cache files, conditioning, ridge
    state: Any = None  # AlphaEdit: pass to the next call for sequential editing

    def summary(self) -> dict:
        return {"method": self.method, "layers": list(self.layers), "edited": len(self.edited),
                "skipped": len(self.skipped), "skipped_reasons": [r for _, r in self.skipped],
                "covariance": self.stats}


def to_weights(model, layers: str | Sequence[str]) -> tuple[tuple[str, ...], tuple[Weight, ...]]:
    """Block names and their MLP output projections; an unknown name lists the valid ones."""
    names = (layers,) if isinstance(layers, str) else tuple(layers)
    if not names:
        raise ValueError("no layers given to edit")
    if len(set(names)) != len(names):
        raise ValueError(f"layers listed twice: {names}")
    return names, tuple(rome_weight(model, n) for n in names)


def out_in(params: Any, weight: Weight) -> np.ndarray:
    """W [out, in] float64 whatever the kernel's layout."""
    k = np.asarray(get_path(params, weight.path), np.float64)
    return k if weight.layout == "out_in" else k.T


def module_output(params: Any, weight: Weight, keys: np.ndarray) -> np.ndarray:
    """W k + b for keys [in, n] (b = 0 when the module has no bias): [out, n] float64."""
    out = out_in(params, weight) @ np.asarray(keys, np.float64)
    try:
        out = out + np.asarray(get_path(params, weight.module_path + "/bias"), np.float64)[:, None]
    except KeyError:
        pass  # no bias (Llama)
    return out


def apply_delta(params: Any, weight: Weight, dw: np.ndarray) -> Any:
    """params with W + dW (dW [out, in]) written in the kernel's layout and dtype; a new pytree."""
    kernel = get_path(params, weight.path)
    add = dw if weight.layout == "out_in" else dw.T
    if add.shape != kernel.shape:
        raise ValueError(f"{weight.path}: update of shape {add.shape} for a kernel of shape {kernel.shape}")
    new = (np.asarray(kernel, np.float64) + add).astype(np.float32)
    return set_path(params, weight.path, jnp.asarray(new, dtype=kernel.dtype))
