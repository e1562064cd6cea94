"""Using a trained editor: load it, apply edit requests, save the edited model.

    model = load_model("smollm2-135m")
    editor = load_editor("runs/editor", model)              # checkpoint + base model, nothing else
    params = apply_edits(model, editor, [("The capital of Peru is", "Lima")])
    save_edited(model, params, "runs/smollm2-edited")         # a folder transformers / load_model open

Three ways to apply many requests:
  "batch"       all requests at once: their factors are captured in one pass and summed into
                one edit (MEND's batched editing);
  "sequential"  one after another, each captured on the parameters the previous edits produced;
  a single request is either.
The base parameters are never modified: every call returns a new tree that shares the
untouched leaves with its input.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from salem_jax.data.tokenize import encode
from salem_jax.errors import UserError
from salem_jax.mend.checkpoint import CheckpointError, CheckpointMismatch, restore_editor, steps_in
from salem_jax.mend.editor import EditorSpec, edited_params, pseudo_grads, weight_key
from salem_jax.mend.train import EDIT_BUCKETS, bucket_length, capture_factors, row_ends
from salem_jax.models.base import get_path, set_path
from salem_jax.scored_logits import SCORE_POS, positions_within, with_score_positions


@dataclasses.dataclass(frozen=True)
class TrainedEditor:
    """An editor ready to edit: its spec, parameters and frozen running statistics."""

    spec: EditorSpec
    params: dict
    state: dict
    model_name: str
    step: int
    meta: dict = dataclasses.field(default_factory=dict)
    # {weight path: P [in, in]}: the null-space projectors the editor was trained through
    # (TrainConfig.null_energy > 0; `load_editor` reads them from the workdir): every edit is then
    # W - lr_W * P G~, as in training. None: an editor trained without projection.
    projections: dict | None = None
    null_energy: float = 0.0  # the TrainConfig.null_energy those projectors were built for (0: none)


def scaled_editor(editor: TrainedEditor, scale: float) -> TrainedEditor:
    """The editor whose every edit is `scale` times the trained one's: each edited kernel becomes
    W - scale * lr_W * pseudo_grad (the learned per-weight edit rates lr_W times `scale`; the nets
    and statistics unchanged), i.e. base + scale * (edit - base). An evaluation-time knob between
    reaching the edit (scale 1 is what the editor was trained for) and sparing what should not
    change (a smaller step moves the other facts less). scale must be finite and > 0."""
    scale = float(scale)
    if not np.isfinite(scale) or scale <= 0:
        raise ValueError(f"edit scale must be a finite number > 0, got {scale}")
    if scale == 1.0:
        return editor
    params = {**editor.params, "lr": jax.tree.map(lambda x: x * scale, editor.params["lr"])}
    return dataclasses.replace(editor, params=params, meta={**editor.meta, "edit_scale": scale})


def _checkpoint_dir(path: Path) -> Path:
    return path / "checkpoints" if (path / "checkpoints").is_dir() else path


def load_editor(path: str | Path, model=None, step: int | str = "best", *, check_name: bool = True) -> TrainedEditor:
    """Load an editor from a training workdir (or its `checkpoints/` folder).

    step: "best" (lowest validation loss), "latest", or a step number. With `model`, check that
    the editor was trained for it (its name unless `check_name=False`, e.g. for a saved edited
    copy of the model; the edited weights and their shapes always); a mismatch raises
    `CheckpointMismatch`."""
    directory = _checkpoint_dir(Path(path))
    spec, params, state, meta = restore_editor(directory, step)
    if model is not None:
        if check_name and meta["model"] != model.name:
            raise CheckpointMismatch(f"editor in {directory} was trained for model {meta['model']!r}, not {model.name!r}")
        check_model(spec, model.params, where=str(directory))
    projections = _trained_projections(directory, spec, meta)
    return TrainedEditor(spec=spec, params=params, state=state, model_name=meta["model"], step=int(meta["step"]), meta=meta,
                         projections=projections,
                         null_energy=0.0 if projections is None else float(meta["config"]["null_energy"]))


def _trained_projections(directory: Path, spec: EditorSpec, meta: dict) -> dict | None:
    """The projectors an editor trained with TrainConfig.null_energy > 0 went through (the
    workdir's `nullspace.NULL_FILE`, next to `checkpoints/`), checked against its spec; None for
    an editor trained without. A CheckpointError when the file is missing or does not match."""
    from salem_jax.mend.nullspace import NULL_FILE, load_projections

    energy = float(meta.get("config", {}).get("null_energy", 0.0))
    if energy == 0:
        return None
    path = directory.parent / NULL_FILE
    if not path.is_file():
        raise CheckpointError(f"the editor in {directory} was trained through a null-space projection (null_energy "
                              f"{energy:g}) but {path} is missing: it cannot edit as it was trained")
    arrays, saved_energy, _, _ = load_projections(path)
    if saved_energy != energy or list(arrays) != [w.path for w in spec.weights]:
        raise CheckpointError(f"{path} (energy {saved_energy:g}, weights {list(arrays)}) is not the projection the "
                              f"editor in {directory} was trained with (energy {energy:g}, weights "
                              f"{[w.path for w in spec.weights]})")
    for w, shape in zip(spec.weights, spec.shapes):
        fan_in = w.in_out_shape(tuple(shape))[0]
        if arrays[w.path].shape != (fan_in, fan_in):
            raise CheckpointError(f"{path}: the projector of {w.path!r} has shape {arrays[w.path].shape}, expected "
                                  f"({fan_in}, {fan_in})")
    return arrays


def check_model(spec: EditorSpec, params: Any, where: str = "editor") -> None:
    """Raise CheckpointMismatch if `params` lack one of the spec's weights or its shape differs."""
    for w, shape in zip(spec.weights, spec.shapes):
        try:
            have = tuple(get_path(params, w.path).shape)
        except KeyError:
            raise CheckpointMismatch(f"{where} edits {w.path!r}, which this model does not have") from None
        if have != tuple(shape):
            raise CheckpointMismatch(f"{where} edits {w.path!r} of shape {tuple(shape)}, but this model's is {have}")


@functools.partial(jax.jit, static_argnames=("apply_fn", "spec"))
def edit_updates(editor_params, editor_state, params, batch, projections=None, *, apply_fn, spec: EditorSpec):
    """{weight path: lr_W * pseudo_grad [stored kernel shape], float32}: what one editor pass over
    `batch` subtracts from each edited kernel (`edited_params`' W - lr_W * P G~). The pseudo-gradient
    is a sum over the batch's tokens, and the editor maps each token's factors alone (its running
    statistics are frozen), so the update of a batch is the sum of its parts' updates: `apply_edits`'
    batch mode sums chunks of rows with it, and its memory is that of one chunk."""
    factors = capture_factors(apply_fn, params, batch, spec.weights)
    grads = pseudo_grads(spec, editor_params, editor_state, factors, projections)
    return {w.path: editor_params["lr"][weight_key(w.path)] * grads[w.path] for w in spec.weights}


@functools.partial(jax.jit, static_argnames=("apply_fn", "spec"))
def edited_kernels(editor_params, editor_state, params, batch, projections=None, *, apply_fn, spec: EditorSpec):
    """{weight path: its edited kernel} after one editor pass over `batch` (the rest of params
    unchanged). With `score_pos` in the batch (`with_score_positions`) the gradient pass applies
    the LM head at the target positions only (the same factors, less work). projections: the
    editor's null-space projectors (`TrainedEditor.projections`; the edit W - lr_W * P G~)."""
    factors = capture_factors(apply_fn, params, batch, spec.weights)
    new = edited_params(spec, editor_params, editor_state, params, factors, projections)
    return {w.path: get_path(new, w.path) for w in spec.weights}


def fit_to(batch: Mapping[str, np.ndarray], like: Mapping[str, Any] | None, pad_id: int = 0) -> dict:
    """`batch` with `score_pos`, padded to the shape of `like`'s rows when it fits.

    like: a tokenised batch (e.g. `prepare_splits(...)["val"].fail`, whose rows all share one
    length and one K): every [B, S] array of `batch` is padded along S to the length of the same
    key in `like` (ids with `pad_id`, masks and labels with 0: padded tokens are inactive, so
    the edit is the same), and its score positions take `like`'s K. Then every request of a
    split runs one compiled program instead of one per length bucket and K. When a request is
    longer, or has more scored positions, than `like` allows, its own shape is used."""
    batch = dict(batch)
    if like is None or set(batch) - {SCORE_POS} != set(like) - {SCORE_POS}:
        return with_score_positions(batch)
    need = {k: np.asarray(v).shape[-1] for k, v in batch.items()}
    have = {k: np.asarray(v).shape[-1] for k, v in like.items() if k != SCORE_POS}
    if any(need[k] > have[k] or np.ndim(batch[k]) != np.ndim(like[k]) for k in have):
        return with_score_positions(batch)
    ids = ("input_ids", "decoder_input_ids")
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        width = [(0, 0)] * (v.ndim - 1) + [(0, have[k] - need[k])]
        out[k] = np.pad(v, width, constant_values=pad_id if k in ids else 0)
    scored = int((np.asarray(out["label_mask"]) != 0).sum(-1).max(initial=0))
    seq = out["label_mask"].shape[-1]
    k = like[SCORE_POS].shape[-1] if SCORE_POS in like else seq  # no score_pos in `like`: none here either
    if scored > k:
        return with_score_positions(batch)
    return with_score_positions(out, k=k)


def _edit_in_chunks(editor_params, editor_state, params, batches, *, apply_fn, spec: EditorSpec, like=None, pad_id=0,
                    projections=None):
    """`_edit` of the rows of all `batches` together (one combined edit, every factor captured on
    `params`), one batch per call: W - sum_c lr_W * P G~_c, the updates summed in float32."""
    total = None
    for b in batches:
        up = edit_updates(editor_params, editor_state, params, fit_to(b, like, pad_id), projections, apply_fn=apply_fn,
                          spec=spec)
        total = up if total is None else {k: total[k] + v for k, v in up.items()}
    for w in spec.weights:
        kernel = get_path(params, w.path)
        params = set_path(params, w.path, (kernel.astype(jnp.float32) - total[w.path]).astype(kernel.dtype))
    return params


def _edit(editor_params, editor_state, params, batch, *, apply_fn, spec: EditorSpec, like=None, pad_id=0, projections=None):
    # Only the edited kernels leave the jitted function; every other leaf of the result is the
    # input's own array (no copy of the whole model per edit).
    batch = fit_to(batch, like, pad_id)
    kernels = edited_kernels(editor_params, editor_state, params, batch, projections, apply_fn=apply_fn, spec=spec)
    for path, k in kernels.items():
        params = set_path(params, path, k)
    return params


@functools.partial(jax.jit, static_argnames=("apply_fn", "spec"))
def edited_kernels_each(editor_params, editor_state, params, batches, projections=None, *, apply_fn, spec: EditorSpec):
    """`edited_kernels` of E separate edits in one program: batches' leaves [E, B, ...] (edit e's
    rows at [e]) -> {weight path: [E, *kernel shape]}, kernel [e] edit e's alone (its own capture
    and editor pass on the base `params`; vmap, so the same arithmetic per edit up to float
    summation order). One call instead of E: the pipeline's 19 val edits share one dispatch and
    their passes run as one batch."""
    return jax.vmap(lambda b: edited_kernels(editor_params, editor_state, params, b, projections, apply_fn=apply_fn,
                                             spec=spec))(batches)


def _cut_stacked(batch: dict) -> dict:
    """A stacked batch ([E, B, S] leaves; score_pos [E, B, K]) cut after its longest row, at an
    EDIT_BUCKETS length: causal models only - a position past a row's last token changes nothing
    before it, and it has no target (label_mask 0), so the captured factors there are inactive."""
    s = batch["attention_mask"].shape[-1]
    cut = bucket_length(int(row_ends(batch["attention_mask"]).max()), s)
    out = {k: (v[..., :cut] if k != SCORE_POS and np.shape(v)[-1] == s else v) for k, v in batch.items()}
    if SCORE_POS in out:  # positions `like` chose past the cut point at an inactive one (`positions_within`)
        out[SCORE_POS] = positions_within(out[SCORE_POS], out["label_mask"])
    return out


def _edit_each(editor_params, editor_state, params, batches: Sequence[dict], *, apply_fn, spec: EditorSpec, like=None,
               pad_id=0, per_call: int = 32, causal: bool = False, projections=None) -> list:
    """[edited params of batches[e] alone, for each e] (each as `_edit` returns it, sharing every
    leaf but the edited kernels with `params`): the batches fitted to `like` (`fit_to`), grouped
    by shape (one group when all fit `like`), each group in calls of at most `per_call` edits of
    `edited_kernels_each` (a group's last call padded by repeating its last edit, dropped: one
    program per group size). causal: each call's rows cut after the longest (`_cut_stacked`; the
    main job's val fail rows are padded to 32 tokens for at most 17)."""
    fitted = [fit_to(b, like, pad_id) for b in batches]
    groups: dict = {}
    for e, b in enumerate(fitted):
        key = tuple(sorted((k, np.shape(v), np.asarray(v).dtype.str) for k, v in b.items()))
        groups.setdefault(key, []).append(e)
    out: list = [None] * len(fitted)
    for members in groups.values():
        n = min(per_call, len(members))
        for c in range(0, len(members), n):
            part = members[c: c + n]
            ids = part + [part[-1]] * (n - len(part))
            stacked = {k: np.stack([np.asarray(fitted[e][k]) for e in ids]) for k in fitted[part[0]]}
            if causal:
                stacked = _cut_stacked(stacked)
            kernels = edited_kernels_each(editor_params, editor_state, params, stacked, projections, apply_fn=apply_fn,
                                          spec=spec)
            for i, e in enumerate(part):
                p = params
                for path, k in kernels.items():
                    p = set_path(p, path, k[i])
                out[e] = p
    return out


Request = Mapping[str, Any] | Sequence[str]


def _as_request(r: Request, i: int) -> tuple[str, Any, str]:
    if isinstance(r, Mapping):
        for key in ("prompt", "target"):
            if key not in r:
                raise KeyError(f"edit request {i}: field {key!r} is missing")
        return str(r["prompt"]), r["target"], str(r.get("text_pair", "") or "")
    if isinstance(r, (list, tuple)) and len(r) == 2:
        return str(r[0]), r[1], ""
    raise TypeError(f"edit request {i}: expected a dict with prompt and target or a (prompt, target) pair, got {r!r}")


def encode_requests(model, requests: Sequence[Request], where: str = "requests", max_tokens: int | None = None) -> dict:
    """The batch dict of edit requests (classifier targets may be label names or indices),
    padded to a length of `mend.train.EDIT_BUCKETS`.

    Each request must fit the model's context and `max_tokens`; errors name it by its file line
    when `requests` came from `read_requests`."""
    reqs = [_as_request(r, i) for i, r in enumerate(requests)]
    lines = getattr(requests, "lines", None)
    row_names = [f"line {n}" for n in lines] if lines is not None and len(lines) == len(reqs) else None
    if not reqs:
        raise ValueError(f"{where}: no edit requests")
    targets = [t for _, t, _ in reqs]
    if model.kind == "classifier":
        names = getattr(model.config, "id2label", None) or {}
        index = {str(v): int(k) for k, v in names.items()}
        out = []
        for i, t in enumerate(targets):
            if isinstance(t, str) and not t.lstrip("-").isdigit():
                if t not in index:
                    raise ValueError(f"{where} request {i}: field 'target' = {t!r} is not a label ({sorted(index)})")
                out.append(index[t])
            else:
                out.append(int(t))
        targets = out
    pairs = [p for _, _, p in reqs]
    return encode(model, [p for p, _, _ in reqs], targets, text_pairs=pairs if any(pairs) else None, where=where,
                  max_tokens=max_tokens, names=row_names, buckets=EDIT_BUCKETS)


def apply_edits(
    model,
    editor: TrainedEditor,
    requests: Sequence[Request],
    *,
    params: Any = None,
    mode: str = "batch",
    progress: bool = True,
    like: Mapping[str, Any] | None = None,
    rows_per_call: int = 32,
) -> Any:
    """Edited parameters for `requests` (dicts with prompt, target [, text_pair] or pairs).

    params: the parameters to edit (default the model's own); never modified.
    mode: "batch" (one combined edit) or "sequential" (each edit on top of the previous ones).
    like: a tokenised batch whose row shape every edit is padded to when it fits (`fit_to`), so
      that many calls compile once; the edit is the same.
    rows_per_call: batch mode captures at most this many requests' gradients per call and sums
      the calls' updates (`edit_updates`): the same edit (to float rounding), with the memory of
      one call - one gradient pass over 100 zsRE requests padded to the edit set's row length
      raised a SmolLM2 run's peak from 7 to 14.6 GB (session 35). Up to rows_per_call requests:
      one call, as before.
    """
    if isinstance(rows_per_call, bool) or not isinstance(rows_per_call, (int, np.integer)) or rows_per_call < 1:
        raise ValueError(f"rows_per_call={rows_per_call!r}: give an integer >= 1 (requests per gradient pass)")
    params = model.params if params is None else params
    check_model(editor.spec, params, where="editor")
    pad_id = model.tokenizer.pad_token_id if model.tokenizer is not None and model.tokenizer.pad_token_id is not None else 0
    kw = dict(apply_fn=model.apply, spec=editor.spec, like=like, pad_id=pad_id, projections=editor.projections)
    if mode == "batch":
        batch = encode_requests(model, requests)
        n = len(next(iter(batch.values())))
        if n <= rows_per_call:
            return _edit(editor.params, editor.state, params, batch, **kw)
        chunks = [{k: np.asarray(v)[i : i + rows_per_call] for k, v in batch.items()} for i in range(0, n, rows_per_call)]
        return _edit_in_chunks(editor.params, editor.state, params, chunks, **kw)
    if mode == "sequential":
        for i, r in enumerate(tqdm(requests, desc="edits", disable=not progress)):
            params = _edit(editor.params, editor.state, params, encode_requests(model, [r], where=f"request {i}"), **kw)
        return params
    raise ValueError(f"unknown mode {mode!r}; choose 'batch' or 'sequential'")


def apply_each(model, editor: TrainedEditor, requests: Sequence[Request], *, params: Any = None,
               like: Mapping[str, Any] | None = None, per_call: int = 32) -> list:
    """[the edited parameters of requests[i] alone, for each i]: what `apply_edits(model, editor,
    [r], params=params, like=like)` returns for each request r, from a few calls of
    `edited_kernels_each` (one when every request fits `like`) instead of one call per request.
    Every tree shares all but the edited kernels with `params` (never modified)."""
    params = model.params if params is None else params
    check_model(editor.spec, params, where="editor")
    pad_id = model.tokenizer.pad_token_id if model.tokenizer is not None and model.tokenizer.pad_token_id is not None else 0
    batches = [encode_requests(model, [r], where=f"request {i}") for i, r in enumerate(requests)]
    return _edit_each(editor.params, editor.state, params, batches, apply_fn=model.apply, spec=editor.spec, like=like,
                      pad_id=pad_id, per_call=per_call, causal=model.kind == "causal", projections=editor.projections)


class RequestList(list):
    """The requests of a file (a `list[dict]`) with `lines[i]`, the file line of request i, so
    that later errors (e.g. a request too long for the model) name the line."""

    def __init__(self, requests=(), lines=()):
        super().__init__(requests)
        self.lines: list[int] = list(lines)


def _request_error(path: Path, n: int, msg: str) -> UserError:
    return UserError(f"{path} line {n}: {msg}")


def read_requests(path: str | Path) -> RequestList:
    """Edit requests from a JSON-lines file: one {"prompt": ..., "target": ...} object per line,
    optionally with "rephrases": [other prompts that should now give the target] (checked, not edited).

    Any defect (not UTF-8, not JSON, not an object, a field missing, empty or of the wrong type)
    raises `UserError` naming the file and line; nothing else escapes."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no requests file {path}")
    out = RequestList()
    for n, raw in enumerate(path.read_bytes().splitlines(), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _request_error(path, n, f"not UTF-8 text (byte {e.start})") from None
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise _request_error(path, n, f"not valid JSON ({e.msg})") from None
        except RecursionError:
            raise _request_error(path, n, "JSON nested too deeply") from None
        if not isinstance(r, dict):
            raise _request_error(path, n, f"expected an object with 'prompt' and 'target', got a JSON {type(r).__name__}")
        for key in ("prompt", "target"):
            if key not in r:
                raise _request_error(path, n, f"field {key!r} is missing")
            v = r[key]
            if key == "target" and isinstance(v, int) and not isinstance(v, bool):
                continue  # a classifier's label index
            if not isinstance(v, str) or not v.strip():
                raise _request_error(path, n, f"field {key!r} must be a non-empty string, got {json.dumps(v)[:60]}")
        reph = r.get("rephrases", [])
        if not isinstance(reph, list) or not all(isinstance(x, str) and x.strip() for x in reph):
            raise _request_error(path, n, "field 'rephrases' must be a list of non-empty strings")
        pair = r.get("text_pair", "")
        if pair is not None and not isinstance(pair, str):
            raise _request_error(path, n, "field 'text_pair' must be a string")
        out.append(r)
        out.lines.append(n)
    if not out:
        raise UserError(f"{path}: no edit requests")
    return out


def check_editor_dir(path: str | Path) -> list[int]:
    """The checkpoint steps of an editor workdir (or its `checkpoints/` folder); a CheckpointError
    if there are none. Cheap: commands call it before loading the model."""
    directory = _checkpoint_dir(Path(path))
    if not Path(path).exists():
        raise CheckpointError(f"--editor {path}: no such folder (the --workdir of `salem train-editor`)")
    steps = steps_in(directory)
    if not steps:
        raise CheckpointError(f"--editor {path} holds no editor checkpoint (expected the --workdir of `salem train-editor`)")
    return steps


def check_finite(params: Any, where: str = "the edited model") -> None:
    """Raise UserError naming the first weight with a NaN or infinite entry."""
    leaves = jax.tree_util.tree_leaves_with_path(params)
    finite = jax.device_get([jnp.isfinite(x).all() for _, x in leaves])
    for (path, _), ok in zip(leaves, finite):
        if not ok:
            name = jax.tree_util.keystr(path, simple=True, separator="/")
            raise UserError(f"{where} has non-finite values (NaN or inf) in {name}; it is not written. "
                            "The editor diverged or the requests are extreme: try another --step (e.g. an earlier one)")


def save_edited(model, params: Any, out_dir: str | Path) -> str:
    """Write the edited model as a folder (`salem_jax.models.save_model`: save_pretrained format
    that transformers and `load_model` open). Returns its path. Parameters with a NaN or an
    infinite entry are refused (UserError): a diverged edit is never written."""
    from salem_jax.models import save_model

    check_finite(params)
    return save_model(model, params, out_dir)
