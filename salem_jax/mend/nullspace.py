"""AlphaEdit's null-space projection applied to a MEND edit (`config.eval.mend_null_energy`).

MEND edits a kernel W [in, out] (flax layout, `y = x @ W`) by dW = -lr_W * sum_t u~_t^T delta~_t:
its rows live in the span of the (transformed) inputs u of the edit prompt, and nothing keeps
them away from the inputs k the model sees on other text, so the edit also moves k W for other
facts (the keep set's drawdown). AlphaEdit (Fang et al. 2025) removes that by construction:
with C = E[k k^T] [in, in] the uncentred covariance of the kernel's inputs over plain text and
P = U0 U0^T [in, in] the projector on C's low-energy eigenvectors U0 (the "null space": the
smallest eigen-directions whose eigenvalues sum to at most `energy` x trace(C),
`keystats.CovSolver.null_projection`), the projected edit dW' = P dW gives k dW' = (P k)^T dW = 0
for every k in the span of the kept (high-energy) eigenvectors, and E|k dW'|^2 <= energy x
|dW|^2 E|k|^2 over text keys. Here the projection is applied to the edit a trained MEND editor
produces (no retraining): what survives is the part of MEND's edit that already lay in the null
space, so it tests whether the editor's edits can be made specific after the fact.

Per edited kernel, with its own input's covariance (a block's gate/up kernels read the same
[in = width] input, its down kernel reads the [in = MLP width] activation): computed once with
`baselines.keystats.cached_key_covariances` (the AlphaEdit / ROME key-statistics cache, keyed by
the model fingerprint and kernel path; the kernels missing from it in one pass over the text).

Kernels stored "out_in" (GPT-2's Conv1D: W [out, in], `y = x @ W.T`) are projected on their input
side too: dW' = dW P.

The same P inside training (`TrainConfig.null_energy`, `config.editor.null_energy`): the editor's
edit is W - lr_W * P G~ in every training step, validation and later edit (`editor.pseudo_grads`'
`projections`: u~ projected before the outer product), so the editor learns to reach its edits
through the null space instead of having them cut after the fact.

Fact keys added to C (`TrainConfig.null_facts`, `config.editor.null_facts`, weight
`null_facts_weight` = w): C = C_text + w C_facts, both per-token means (C_text over the WikiText
tokens, C_facts = the mean of x x^T over every token of each fact's prompt + target as the model
reads it when the fact is scored, padding excluded: `fact_covariances`), so w is the facts'
weight relative to text's per token (w = 1: a fact token counts as much as a text token in the
mean, whatever the two token counts). The pipeline takes the facts strictly outside the keep set
and the val split (`pipeline.null_fact_rows`); P is then the null space of text *and* such facts. `train_editor` saves the P it
trained with next to its checkpoints (`NULL_FILE`, `save_projections`); `load_editor` reads it
back (`load_projections`), so an editor trained with a projection edits with exactly that P.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from salem_jax.baselines.keystats import _atomic_save_npz, cached_key_covariances, covariance_solver, wikitext_texts
from salem_jax.models.base import Weight, get_path, set_path


def check_energy(energy: Any, where: str = "config.eval.mend_null_energy") -> float:
    """`energy` as a float in (0, 1] (the share of trace(C) the null space may hold; 1 = every
    direction, i.e. no projection) or 0 (off). Anything else raises ValueError naming `where`."""
    if isinstance(energy, bool) or not isinstance(energy, (int, float, np.floating, np.integer)):
        raise ValueError(f"{where}={energy!r}: give a number in (0, 1] (the null space's share of trace(C)) or 0 = off")
    e = float(energy)
    if not np.isfinite(e) or e < 0 or e > 1:
        raise ValueError(f"{where}={energy!r}: give a number in (0, 1] (the null space's share of trace(C); "
                         "small = a strong projection) or 0 = off")
    return e


def parse_null_facts(spec: Any, where: str = "config.editor.null_facts") -> tuple[tuple[str, ...], bool]:
    """(country relations, edit_pass) of a fact spec: '' = none; else parts joined by '+', each
    'countries:REL,REL' (facts of those country relations, `data.countries.RELATIONS`) or
    'edit_pass' (the edit set's train pass rows), e.g. 'countries:region,currency,languages+edit_pass'.
    A ValueError naming `where` for anything else."""
    if not isinstance(spec, str):
        raise ValueError(f"{where}={spec!r}: give a string such as 'countries:region,currency,languages' "
                         "(+'edit_pass'), or '' for none")
    if not spec:
        return (), False
    from salem_jax.data.countries import parse_country_relations

    relations: list[str] = []
    edit_pass = False
    for part in spec.split("+"):
        part = part.strip()
        if part == "edit_pass" and not edit_pass:
            edit_pass = True
        elif part.startswith("countries:") and not relations:
            relations = list(parse_country_relations(part, where))
        else:
            raise ValueError(f"{where}={spec!r}: parts joined by '+' are 'countries:REL,REL' and 'edit_pass', each at "
                             f"most once (got {part!r})")
    return tuple(relations), edit_pass


def check_facts_weight(weight: Any, where: str = "config.editor.null_facts_weight") -> float:
    """The facts' weight w in C = C_text + w C_facts: a finite number > 0."""
    if isinstance(weight, bool) or not isinstance(weight, (int, float, np.floating, np.integer)) \
            or not np.isfinite(float(weight)) or float(weight) <= 0:
        raise ValueError(f"{where}={weight!r}: give a finite number > 0 (the fact keys' per-token weight relative to "
                         "WikiText's in the covariance)")
    return float(weight)


def facts_digest(facts: Sequence[Mapping]) -> str:
    """sha256 (16 hex digits) of the facts' (prompt, target) pairs in order: which facts built a P."""
    h = hashlib.sha256()
    for f in facts:
        h.update(f"{f['prompt']}\x00{f['target']}\x01".encode())
    return h.hexdigest()[:16]


def fact_covariances(model, params: Any, weights: Sequence[Weight], facts: Sequence[Mapping], *,
                     batch_size: int = 16) -> tuple[dict[str, np.ndarray], int]:
    """({weight path: C_facts [in, in] float64}, token count): the mean of x x^T of each kernel's
    input x over every token of every fact's prompt + target (`data.tokenize.encode`, the
    tokens the model reads when the fact is scored; padding excluded). facts: dicts with
    "prompt" and "target". The facts are encoded at one padded length and read `batch_size` at a
    time, in order; each batch is cut after its longest row (`mend.train.bucket_length`: a
    length of EDIT_BUCKETS, so few compiled forwards): a position past a row's last token changes
    nothing before it in a causal model and is masked out of the sums, so the cut drops work, not
    terms (the main job's 522 facts: padded to 32 tokens, batches' longest rows 8-21; that forward
    pass was most of the projector's time). The same sums up to float rounding: XLA's attention
    reductions run over the cut length, so a kept position's input may differ in the last bits
    (the main job's P moved by at most 5e-7). Models that are not causal (a position past the cut
    could be attended to) read the whole padded length."""
    from salem_jax.baselines.rome import _moments, rome_weight
    from salem_jax.data.tokenize import encode, pad_rows, slice_rows
    from salem_jax.mend.train import bucket_length, row_ends

    if not facts:
        raise ValueError("fact_covariances: no facts")
    weights = [rome_weight(model, w) for w in weights]
    batch = encode(model, [f["prompt"] for f in facts], [f["target"] for f in facts], where="null-space facts")
    batch = {k: batch[k] for k in ("input_ids", "attention_mask")}
    modules = tuple(dict.fromkeys(w.module_path for w in weights))
    n = batch["input_ids"].shape[0]
    total, count = {m: 0.0 for m in modules}, 0
    full = batch["input_ids"].shape[1]
    for start in range(0, n, batch_size):
        part = pad_rows(slice_rows(batch, start, start + batch_size), batch_size)
        if model.kind == "causal":
            cut = bucket_length(int(row_ends(part["attention_mask"]).max()), full)
            part = {k: v[:, :cut] for k, v in part.items()}
        s, c = _moments(model.apply, modules, params, part)
        total = {m: total[m] + np.asarray(s[m], np.float64) for m in modules}
        count += int(c)
    return {w.path: total[w.module_path] / count for w in weights}, count


def project_delta(base: Any, edited: Any, projection: Any, layout: str = "in_out") -> jnp.ndarray:
    """base + P (edited - base) for a kernel stored [in, out] ("in_out"), base + (edited - base) P
    for one stored [out, in] ("out_in"); P [in, in]. Computed in float32, returned in base's dtype.

    Pure: the edit's delta projected on the input side, so that for any input k with P k = 0 the
    edited kernel gives the base kernel's output (k W' = k W)."""
    b = jnp.asarray(base)
    delta = jnp.asarray(edited, jnp.float32) - b.astype(jnp.float32)
    p = jnp.asarray(projection, jnp.float32)
    if layout == "in_out":
        if p.shape != (b.shape[0], b.shape[0]):
            raise ValueError(f"projection of shape {p.shape} does not match an [in, out] kernel of shape {b.shape}")
        out = p @ delta
    elif layout == "out_in":
        if p.shape != (b.shape[1], b.shape[1]):
            raise ValueError(f"projection of shape {p.shape} does not match an [out, in] kernel of shape {b.shape}")
        out = delta @ p
    else:
        raise ValueError(f"unknown kernel layout {layout!r}; expected 'in_out' or 'out_in'")
    return (b.astype(jnp.float32) + out).astype(b.dtype)


@dataclasses.dataclass
class NullProjection:
    """P per edited kernel, and what it cost the edits (filled as edits are projected).

    projections: {kernel path: P [in, in] float32}; info: per path the input width, the null
    space's dimension, the eigenvalue share it holds, the covariance cache file; `retained`: per
    path the Frobenius norm ratio |P dW| / |dW| of every edit projected so far."""

    energy: float
    weights: tuple[Weight, ...]
    projections: dict
    info: dict
    retained: dict = dataclasses.field(default_factory=dict)
    # the fact keys added to C (`null_projection`'s facts): their spec, weight, digest, count
    facts: str = ""
    facts_weight: float = 0.0
    facts_digest: str = ""
    n_facts: int = 0

    def project(self, before: Any, after: Any) -> Any:
        """`after` (an edit of `before`) with each edited kernel's delta projected (`project_delta`);
        every other leaf is `after`'s own. Records |P dW| / |dW| per kernel."""
        out = after
        for w in self.weights:
            b, a = get_path(before, w.path), get_path(after, w.path)
            new = project_delta(b, a, self.projections[w.path], w.layout)
            d0 = float(jnp.linalg.norm(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32)))
            d1 = float(jnp.linalg.norm(new.astype(jnp.float32) - jnp.asarray(b, jnp.float32)))
            self.retained.setdefault(w.path, []).append(d1 / d0 if d0 > 0 else float("nan"))
            out = set_path(out, w.path, new)
        return out

    def summary(self) -> dict:
        """JSON-ready: energy, per-kernel info and the mean / min / max retained norm ratio."""
        per = {}
        for w in self.weights:
            r = np.asarray(self.retained.get(w.path, []), float)
            per[w.path] = {**self.info[w.path], "edits": int(r.size),
                           **({"retained_mean": float(np.nanmean(r)), "retained_min": float(np.nanmin(r)),
                               "retained_max": float(np.nanmax(r))} if r.size else {})}
        return {"energy": self.energy, "kernels": per}


def null_projection(model, params: Any, weights: Sequence[Weight], energy: float, texts: Sequence[str], *,
                    max_tokens: int = 100_000, window: int = 128, batch_size: int = 8,
                    cache: str | os.PathLike | None = None, progress: bool = True,
                    facts: Sequence[Mapping] | None = None, facts_weight: float = 1.0, facts_spec: str = "",
                    ) -> NullProjection:
    """The AlphaEdit projector of each kernel in `weights` for `energy` in (0, 1]: C of that
    kernel's input over `texts` (at most `max_tokens` tokens, from the key-statistics cache when
    there) and P = U0 U0^T [in, in] with U0 C's smallest eigenvectors holding <= energy x trace(C).

    facts: fact rows ({"prompt", "target"}) whose keys join C: C = C_text + facts_weight x C_facts,
    both per-token means (`fact_covariances`); facts_spec names them (`parse_null_facts`, recorded).
    None (the default): C = C_text."""
    energy = check_energy(energy, "energy")
    if energy == 0:
        raise ValueError("energy 0 means no projection; do not build one")
    if facts is not None:
        facts_weight = check_facts_weight(facts_weight, "facts_weight")
        if not facts:
            raise ValueError(f"null_projection: facts {facts_spec!r} gave no fact rows")
    projections, info = {}, {}
    covs = cached_key_covariances(model, params, weights, texts, max_tokens=max_tokens, window=window,
                                  batch_size=batch_size, cache=cache, progress=progress)
    fcovs, ftokens = fact_covariances(model, params, weights, facts) if facts is not None else ({}, 0)
    solved: list[tuple[np.ndarray, Any]] = []  # (C, its solver) of the kernels done so far
    for w in weights:
        cc = covs[w.path]
        fan_in = w.in_out_shape(tuple(get_path(params, w.path).shape))[0]
        if cc.cov.shape != (fan_in, fan_in):
            raise ValueError(f"{w.path}: the input covariance has shape {cc.cov.shape}, expected ({fan_in}, {fan_in})")
        cov = np.asarray(cc.cov, np.float64)
        extra = {}
        if facts is not None:
            cf = facts_weight * fcovs[w.path]
            extra = {"facts_tokens": ftokens, "facts_trace_share": float(np.trace(cf) / (np.trace(cov) + np.trace(cf)))}
            cov = cov + cf
        # kernels that read the same input (a block's gate and up kernels) have the same C: its
        # eigendecomposition once (equal arrays, so the same solver; on SmolLM2 ~0.4-1 s per eigh)
        solver = next((s for c, s in solved if np.array_equal(c, cov)), None)
        if solver is None:
            solver = covariance_solver(cov)
            solved.append((cov, solver))
        p = solver.null_projection(energy)
        n0 = int(round(np.trace(p)))
        info[w.path] = {"fan_in": fan_in, "null_dim": n0,
                        "null_energy_share": float(solver.evals[:n0].sum() / solver.evals.sum()),
                        "cache_file": str(cc.path), "from_cache": cc.from_cache, **extra}
        projections[w.path] = np.asarray(p, np.float32)
    if facts is None:
        return NullProjection(energy, tuple(weights), projections, info)
    return NullProjection(energy, tuple(weights), projections, info, facts=facts_spec, facts_weight=facts_weight,
                          facts_digest=facts_digest(facts), n_facts=len(facts))


def projected_edit_fn(edit: Callable, proj: NullProjection) -> Callable:
    """edit(params, rows) -> params with the edit's delta on each kernel projected (relative to
    the `params` it was applied to, so a sequence of edits projects each one's own step)."""

    def projected(params, rows):
        return proj.project(params, edit(params, rows))

    return projected


def projected_edit_each_fn(edit_each: Callable, proj: NullProjection) -> Callable:
    """edit_each(params, rows) -> [each row's edit of params, projected]."""

    def projected(params, rows):
        return [proj.project(params, p) for p in edit_each(params, rows)]

    return projected


# ---------------------------------------------------------------------------- inside training

NULL_FILE = "null_projection.npz"  # in a `train_editor` workdir: the P the editor was trained with


def wikitext_null_projection(model, params: Any, weights: Sequence[Weight], energy: float, tokens: int, *,
                             data_dir: str | os.PathLike | None = None, progress: bool = True,
                             facts: Sequence[Mapping] | None = None, facts_weight: float = 1.0,
                             facts_spec: str = "") -> NullProjection:
    """`null_projection` over the first `tokens` tokens of the data directory's WikiText (the
    texts and window the evaluation-time projection, `methods.mend.with_null_projection`, uses:
    the same key-statistics cache entries), with the `facts`' keys added to C when given."""
    return null_projection(model, params, weights, energy, wikitext_texts(data_dir=data_dir), max_tokens=int(tokens),
                           progress=progress, facts=facts, facts_weight=facts_weight, facts_spec=facts_spec)


def projection_arrays(proj: NullProjection, weights: Sequence[Weight], energy: float, where: str = "null_projection",
                      facts: str = "", facts_weight: float = 1.0) -> dict[str, np.ndarray]:
    """{weight path: P float32} of `proj` for exactly `weights`, checked: the energy it was built
    for equals `energy`, its fact keys are `facts` with weight `facts_weight` (facts '' = none),
    every weight has a square P. A ValueError naming `where` otherwise."""
    if not isinstance(proj, NullProjection):
        raise ValueError(f"{where}: expected a mend.nullspace.NullProjection, got {type(proj).__name__}")
    if float(proj.energy) != float(energy):
        raise ValueError(f"{where} was built for energy {proj.energy:g}, but the training config has null_energy "
                         f"{energy:g}")
    if proj.facts != facts or (facts and float(proj.facts_weight) != float(facts_weight)):
        raise ValueError(f"{where} was built with fact keys {proj.facts!r} (weight {proj.facts_weight:g}), but the "
                         f"training config has null_facts {facts!r} (null_facts_weight {facts_weight:g})")
    out = {}
    for w in weights:
        if w.path not in proj.projections:
            raise ValueError(f"{where} has no projector for edited weight {w.path!r} (it has {sorted(proj.projections)})")
        p = np.asarray(proj.projections[w.path], np.float32)
        if p.ndim != 2 or p.shape[0] != p.shape[1]:
            raise ValueError(f"{where}: the projector of {w.path!r} has shape {p.shape}, expected [in, in]")
        out[w.path] = p
    return out


def save_projections(path: str | os.PathLike, arrays: Mapping[str, np.ndarray], energy: float, tokens: int,
                     info: Mapping | None = None, facts: tuple[str, float, str] = ("", 0.0, "")) -> None:
    """Write the projectors an editor trains with (atomically): p0, p1, ... in `arrays`' order,
    with their paths, the energy, the token count, the per-kernel info as JSON and the fact keys
    in C (spec, weight, `facts_digest`; '' = none)."""
    paths = list(arrays)
    _atomic_save_npz(Path(path), paths=np.asarray(paths), energy=np.asarray(float(energy)),
                     tokens=np.asarray(int(tokens)), info=np.asarray(json.dumps(dict(info or {}))),
                     facts=np.asarray(str(facts[0])), facts_weight=np.asarray(float(facts[1])),
                     facts_digest=np.asarray(str(facts[2])),
                     **{f"p{i}": np.asarray(arrays[k], np.float32) for i, k in enumerate(paths)})


def projection_facts(path: str | os.PathLike) -> tuple[str, float, str]:
    """(spec, weight, digest) of the fact keys in the C behind `save_projections`' file (a file
    written before facts existed: none, ('', 0.0, ''))."""
    with np.load(Path(path)) as z:
        if "facts" not in z.files:
            return "", 0.0, ""
        return str(z["facts"]), float(z["facts_weight"]), str(z["facts_digest"])


def load_projections(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], float, int, dict]:
    """(arrays {weight path: P}, energy, tokens, info) from `save_projections`' file."""
    with np.load(Path(path)) as z:
        paths = [str(x) for x in z["paths"]]
        arrays = {k: np.asarray(z[f"p{i}"], np.float32) for i, k in enumerate(paths)}
        return arrays, float(z["energy"]), int(z["tokens"]), json.loads(str(z["info"]))
