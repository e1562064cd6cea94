"""The locate-then-edit editors by name, for the CLI and the pipeline: rrome, memit, emmet, alphaedit.

Every entry has the uniform signature of `salem_jax.baselines.locate_edit` (model, params,
requests, *, layers, stats, config, state, progress) -> EditOutcome. `layers_for` turns a
method and one chosen layer (from a scorer or given) into the layers it edits: r-ROME the layer
itself, the band editors `band` consecutive blocks ending at it (MEMIT/EMMET/AlphaEdit edit a band
whose last layer is where the value is written; GPT-J uses 3-8, i.e. 6 blocks).
"""

from __future__ import annotations

from typing import Callable, Sequence

from salem_jax.baselines.mass_edit import alphaedit_edit, emmet_edit, memit_edit
from salem_jax.baselines.rrome import rrome_edit

EDITORS: dict[str, Callable] = {"rrome": rrome_edit, "memit": memit_edit, "emmet": emmet_edit,
                                "alphaedit": alphaedit_edit}


def get_editor(method: str) -> Callable:
    if method not in EDITORS:
        raise ValueError(f"unknown locate-then-edit method {method!r}; choose one of {sorted(EDITORS)}")
    return EDITORS[method]


def layers_for(model, method: str, layers: str | Sequence[str], band: int = 3) -> tuple[str, ...]:
    """The layers `method` edits: given a list, that list; given one layer name, r-ROME edits it
    and the band editors edit the `band` blocks ending at it (fewer at the bottom of the model)."""
    get_editor(method)
    if not isinstance(layers, str):
        return tuple(layers)
    names = model.layers.names()
    if layers not in names:
        raise KeyError(f"unknown layer {layers!r}; valid layers are: {', '.join(names)}")
    if method == "rrome":
        return (layers,)
    if band < 1:
        raise ValueError(f"band must be >= 1, got {band}")
    i = names.index(layers)
    return tuple(names[max(0, i - band + 1) : i + 1])
