"""r-ROME (Gupta et al. 2024, "Rebuilding ROME"): ROME with one key for the whole update.

Original ROME builds its rank-one update from two different keys: u = C^-1 k* with k* averaged
over prefixed prompts, but the right vector divides by k(s)^T u and subtracts W k(s) with k(s)
from the bare prompt (kmeng01/rome#32). The mismatch makes some edits blow up the weight and,
applied in sequence, collapses the model. r-ROME uses the averaged key k* everywhere:

    dW = (v* - (W k* + b)) (C^-1 k*)^T / ((C^-1 k*)^T k*),   so W' k* + b = v* exactly,

and any key x with x^T C^-1 k* = 0 keeps its value. Here:

* k* and v* come from `salem_jax.baselines.rome` (`compute_key`, `compute_value`): the key is
  averaged over the bare prompt and `KeyStats.prefixes()` (r-ROME: 10 prefixes of 5 tokens + 10
  of 10 tokens; here random WikiText windows, not model samples), v* = o + delta with delta
  optimised on every prefixed prompt and o the bare prompt's output, as r-ROME does.
* C comes from `KeyStats.solver` (WikiText, cached on disk; ridge when ill-conditioned, reported).
* The update is EMMET's closed form with one edit (`closed_form.emmet_delta`), in float64.

The project's `rome_edit` already used the averaged key in both places; `rrome_edit` adds the
prefixes by default, the cached WikiText statistics, the conditioning report, the float64
update and the request checks shared with MEMIT / EMMET / AlphaEdit.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np
from tqdm.auto import tqdm

from salem_jax.baselines.closed_form import emmet_delta
from salem_jax.baselines.keystats import KeyStats
from salem_jax.baselines.locate_edit import EditOutcome, EditorConfig, apply_delta, module_output, to_weights
from salem_jax.baselines.requests import EditRequest, as_requests, check_requests
from salem_jax.baselines.rome import compute_key, compute_value, value_path


def rrome_one(model, params: Any, weight, request: EditRequest, solver, config: EditorConfig,
              prefixes: tuple[str, ...]) -> tuple[Any, dict]:
    """One r-ROME edit of `weight` (the layer's output projection): (new params, info with
    k*, v*, old value, v* losses and |dW|)."""
    vcfg = dataclasses.replace(config.value, prefixes=prefixes)
    key, bare = compute_key(model, params, weight, request.prompt, request.subject, prefixes)
    value, _, hist = compute_value(model, params, weight, request.prompt, request.subject, request.target_new,
                                   vcfg, progress=False)
    k = np.asarray(key, np.float64)[:, None]
    old = module_output(params, weight, k)  # W k* + b  [out, 1]
    r = np.asarray(value, np.float64)[:, None] - old
    dw = emmet_delta(k, r, solver, 0.0)
    info = {"key": k[:, 0], "value": np.asarray(value, np.float64), "old_value": old[:, 0], "lookup_index": bare,
            "losses": list(hist), "dw_norm": float(np.linalg.norm(dw)), "v_path": value_path(model, vcfg)}
    return apply_delta(params, weight, dw), info


def rrome_edit(model, params: Any, requests: Sequence, *, layers: str | Sequence[str], stats: KeyStats,
               config: EditorConfig = EditorConfig(), state: Any = None, progress: bool = True) -> EditOutcome:
    """Apply the requests one after another with r-ROME at one layer (see the module docstring).
    Requests whose subject is not in the prompt are skipped and counted; contradicting requests
    are refused before any model work. `state` is unused (r-ROME keeps none)."""
    if model.kind != "causal":
        raise ValueError(f"r-ROME edits causal LMs; {model.name!r} is {model.kind!r}")
    names, weights = to_weights(model, layers)
    if len(names) != 1:
        raise ValueError(f"r-ROME edits one layer; got {list(names)} (use memit/emmet/alphaedit for a band)")
    reqs = as_requests(requests)
    chk = check_requests(reqs)
    w = weights[0]
    solver = stats.solver(w)
    prefixes = stats.prefixes() if config.use_prefixes else ("",)
    cur, per_edit = params, []
    for i in tqdm(chk.kept, desc="r-ROME", disable=not progress):
        cur, info = rrome_one(model, cur, w, reqs[i], solver, config, prefixes)
        info["request"] = i
        per_edit.append(info)
    return EditOutcome(params=cur, method="rrome", layers=names, edited=chk.kept, skipped=chk.skipped,
                       per_edit=per_edit, per_batch=[], stats=stats.report(), state=None)
