"""Benchmark (issue 13, session 26): MEND's rank-1 factors at the subject's tokens on CounterFact.

    PYTHONPATH=. python benchmarks/subject_factors.py --edit-set /work/wtcf22/runs/cf22-c/edit_set \\
        --out runs/subject_factors.json                                   # SmolLM2, 20 val edits, 5 layers
    PYTHONPATH=. python benchmarks/subject_factors.py --tiny --out runs/subject_factors_tiny.json   # smoke run

An UNTRAINED probe (an "identity editor", like benchmarks/editability.py): no editor is trained.
The question: MEND builds its edit of a weight from the rank-1 gradient factors of the edit
prompt, u_t (the layer's input at token t) and delta_t (d loss / d layer output at t), summed over
ALL active tokens (salem_jax.mend.capture: `Factors`, `active_tokens`, `kernel_grad`). Most of the
gradient sits at the last prompt tokens, whose keys carry the relation, not the subject; ROME's
key is the subject's last token. Does an update built only from the subject's tokens edit as
well and spill less onto the neighbourhood prompts (other subjects, same relation)?

For each of the first `--edits` val fail rows of the edit set (the rows the pipeline evaluates,
`config.eval.max_edits` = 20), each layer of `--layers` (its MLP weights, as `prepare_mend` edits
them: gate, up, down on Llama) and each token set

    all           every active token of the edit prompt (what MEND sums over today)
    subject_last  the subject's last token in the prompt only (ROME's key position)
    subject       every token of the subject in the prompt

and each factor scaling

    raw  the plain gradient factors: G = sum_t m_t u_t^T delta_t = the gradient of the edit loss
         restricted to the tokens of the set (m_t = 1 on the set)
    std  MEND's identity editor: u and delta standardised with running statistics (mean, variance
         per coordinate, `editor.update_norm_state`) filled from `--warm` train fail rows with the
         SAME token set, then G = sum_t m_t u~_t^T delta~_t (`editor.transform_factors`; the
         identity network changes nothing else): the first edit an untrained MEND editor makes

    white  the raw factors with each kernel's input factor whitened by the layer's key statistics:
         u_t -> (C + lambda I)^-1 u_t, C = E[k k^T] the uncentred second moment of that
         kernel's input over `--white-tokens` WikiText tokens (`baselines.keystats`, the cache the
         null-space projection and r-ROME use), lambda = `--white-ridge` x trace(C) / d (d the
         kernel's fan-in; raised further only if C + lambda I is still conditioned worse than 1e6,
         `keystats.covariance_solver`, reported in the JSON). The change of the layer's output at
         another key k' is then proportional to k'^T (C + lambda I)^-1 k_t: ROME's update
         direction, small for keys along the directions plain text uses most.

the step is W' = W - lr G on every MLP kernel of the layer. The lr is found per edit by a line
search: with rho = lr ||G|| / ||W|| (Frobenius norms over the layer's kernels together, so the
grid means the same on every layer and token set), the smallest rho of a geometric grid
(`--rhos`) at which the new target is the argmax of every target token on the edit prompt
(`losses.example_correct`); when no rho of the grid does it, the rho with the lowest mean NLL of
the new target ("best achievable"; counted in the `found` column). At that step the record's
CounterFact metrics (salem_jax.eval.counterfact, ROME's definitions): ES (rewrite prompt: P(new)
> P(true)), PS (paraphrases), NS (neighbourhood prompts: P(true) > P(new)), each per record,
then the mean over edits. The unedited model's figures on the same records head the table.

The edited forward passes never rebuild a weight: a row with step coefficient c sees the module
output x W - c x G (exactly x W' for a bias-free linear layer), so one batch scores every rho of
the grid. Prints a markdown table and writes JSON (per edit rows too) to --out; a second table
compares each token set with `all` at equal edit success (`paired`: the edits both fix, since an
edit the line search cannot fix is scored at its best, often large, step), a third (when a
scaling other than raw ran) compares every (scaling, token set) with `all` raw, today's MEND
gradient; `--summarize JSON` prints the tables of a saved run again.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from salem_jax.compile_cache import add_flag, enable_compile_cache  # noqa: E402

TOKEN_SETS = ("all", "subject_last", "subject")
SCALINGS = ("raw", "std", "white")
WHITE_TOKENS = 20_000  # WikiText tokens of the key statistics (the cf22 runs' null_tokens: cached)
WHITE_RIDGE = 1e-2  # lambda / (trace(C) / d): the relative ridge of the whitening


# --------------------------------------------------------------------------- token masks


def subject_masks(model, prompts: Sequence[str], subjects: Sequence[str], length: int) -> dict[str, np.ndarray]:
    """{"subject": [B, length] 1 at every prompt token overlapping the subject's characters,
    "subject_last": [B, length] 1 at the last of them only} (float32). Positions are those of
    `salem_jax.data.tokenize.encode` (the prompt's tokens come first). The subject is looked up as
    spelled in the prompt (`locate.trace_rows.subject_in_prompt`); a row whose subject does not
    occur in its prompt is an error naming the row."""
    from salem_jax.locate.causal_trace import subject_token_mask
    from salem_jax.locate.trace_rows import subject_in_prompt

    spelled = []
    for i, (p, s) in enumerate(zip(prompts, subjects, strict=True)):
        hit = subject_in_prompt(p, s)
        if hit is None:
            raise ValueError(f"row {i}: field 'subject' ({s!r}) does not occur in the prompt {p!r}")
        spelled.append(hit)
    sub = subject_token_mask(model, list(prompts), spelled, length).astype(np.float32)
    last = np.zeros_like(sub)
    for i in range(len(sub)):
        last[i, np.flatnonzero(sub[i])[-1]] = 1.0
    return {"subject": sub, "subject_last": last}


def masked_factors(f, mask):
    """`Factors` with every token outside `mask` [B, T] (1 keep, 0 drop) zeroed in u and delta,
    so `active_tokens`, the running statistics and `kernel_grad` all skip it; None: unchanged."""
    import jax.numpy as jnp

    from salem_jax.mend.capture import Factors

    if mask is None:
        return f
    m = jnp.asarray(mask, jnp.float32)[..., None]
    return Factors((f.u * m).astype(f.u.dtype), (f.delta * m).astype(f.delta.dtype))


# --------------------------------------------------------------------------- edited scoring


@functools.partial(jax.jit, static_argnums=(0, 1))
def edited_scores(apply, mods: tuple[tuple[str, str], ...], params, grads: tuple, coef, batch):
    """Per row of `batch`: (mean target NLL [B], every target token the argmax [B]) with each
    module `mods[k]` = (module path, kernel layout) edited by the step `W - coef_b * grads[k]`
    (`grads[k]` in the kernel's stored layout), applied as `x W - coef_b x G` to the output."""
    import flax.linen as nn
    import jax.numpy as jnp

    from salem_jax.losses import example_correct, example_nll
    from salem_jax.scored_logits import scored_logits

    index = {m: k for k, (m, _) in enumerate(mods)}

    def edit(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        name = "/".join(context.module.path)
        if context.method_name != "__call__" or name not in index:
            return out
        k = index[name]
        x = (args[0] if args else kwargs["inputs"]).astype(jnp.float32)
        g = grads[k] if mods[k][1] == "in_out" else grads[k].T
        c = coef.reshape((-1,) + (1,) * (x.ndim - 1))
        return (out.astype(jnp.float32) - c * (x @ g)).astype(out.dtype)

    with nn.intercept_methods(edit):
        logits, labels, mask = scored_logits(apply, params, batch)
    return example_nll(logits, labels, mask), example_correct(logits, labels, mask)


def _rows_batch(model, prompts, targets, n_rows: int | None = None) -> dict:
    """encode() the (prompt, target) pairs, padded to `n_rows` rows (all-zero rows), with score
    positions (the head runs at the target positions only)."""
    import jax.numpy as jnp

    from salem_jax.data.tokenize import encode, pad_rows
    from salem_jax.scored_logits import with_score_positions

    enc = encode(model, list(prompts), list(targets), where="subject_factors")
    if n_rows is not None:
        enc = pad_rows(enc, n_rows)
    return {k: jnp.asarray(v) for k, v in with_score_positions(enc).items()}


def from_block(model, layer: str, *batches):
    """(apply, *batches) that run a decoder-only model from block `layer` on: the blocks before it
    cannot see an edit of it, so they are not run and the base model's output of the block before
    (`from_block.block_output`) enters it (models/from_block.py; the same numbers as the whole
    pass). Other models, or the first block: (model.apply, *batches) unchanged."""
    from salem_jax.models.from_block import BLOCK_INPUT, block_chain, block_output

    chain, _ = block_chain(model, model.params, dict(batches[0]))
    start = None if chain is None else chain.start(model.layers[layer].module_path + "/")
    if not start:
        return (model.apply, *batches)
    prev = chain.last_skipped(start)
    return (chain.skipping(model.apply, start),
            *({**b, BLOCK_INPUT: block_output(model.apply, prev, model.params, b)} for b in batches))


# --------------------------------------------------------------------------- the probe


@dataclasses.dataclass
class Probe:
    model: Any
    records: Mapping[str, Any]  # record id -> EditRecord
    edits: list[dict]  # val fail rows
    warm: list[dict]  # train fail rows (statistics)
    layers: list[str]
    token_sets: tuple[str, ...]
    scalings: tuple[str, ...]
    rhos: np.ndarray
    white_tokens: int = WHITE_TOKENS
    white_ridge: float = WHITE_RIDGE
    data_dir: str | None = None  # WikiText's data directory (None: the default)


def _capture_rows(model, weights, rows, subjects, batch_rows: int):
    """{weight path: Factors [N, T, .]} of `rows` (one length: the longest row's bucket) and
    {token set: mask [N, T]} (all: active tokens are applied later by masked statistics)."""
    import jax.numpy as jnp

    from salem_jax.data.tokenize import encode
    from salem_jax.mend.capture import Factors, capture

    enc = encode(model, [r["prompt"] for r in rows], [r["target"] for r in rows], where="subject_factors")
    length = enc["input_ids"].shape[1]
    masks = subject_masks(model, [r["prompt"] for r in rows], subjects, length)
    cap = jax.jit(lambda p, b: capture(model.apply, p, b, weights)[1])
    parts = []
    for s in range(0, len(rows), batch_rows):
        chunk = {k: v[s : s + batch_rows] for k, v in enc.items()}
        n = chunk["input_ids"].shape[0]
        if n < batch_rows:  # one shape: one compilation
            chunk = {k: np.concatenate([v, np.zeros((batch_rows - n,) + v.shape[1:], v.dtype)]) for k, v in chunk.items()}
        f = cap(model.params, {k: jnp.asarray(v) for k, v in chunk.items()})
        parts.append({p: Factors(v.u[:n], v.delta[:n]) for p, v in f.items()})
    fac = {p: Factors(jnp.concatenate([q[p].u for q in parts]), jnp.concatenate([q[p].delta for q in parts]))
           for p in parts[0]}
    return fac, {"all": None, **masks}


def whiten(solver, u) -> np.ndarray:
    """(C + lambda I)^-1 u_t for every token of u [..., d] (`solver`: a `keystats.CovSolver`),
    float32 in u's shape."""
    u = np.asarray(u, np.float64)
    if u.shape[-1] != solver.dim:
        raise ValueError(f"whiten: the factor's last axis is {u.shape[-1]}, the covariance's dimension {solver.dim}")
    flat = u.reshape(-1, u.shape[-1])
    return solver.solve(flat.T).T.reshape(u.shape).astype(np.float32)


def white_solvers(model, weights, tokens: int, ridge: float, data_dir=None, progress: bool = True):
    """({weight path: CovSolver of C + lambda I}, {weight path: report}) with C each kernel's input
    second moment over the first `tokens` WikiText tokens (the key-statistics cache) and lambda =
    `ridge` x trace(C) / d (then `covariance_solver`'s condition guard)."""
    from salem_jax.baselines.keystats import cached_key_covariances, covariance_solver, wikitext_texts

    if not (np.isfinite(ridge) and ridge >= 0):
        raise ValueError(f"--white-ridge must be a finite number >= 0, got {ridge!r}")
    covs = cached_key_covariances(model, model.params, weights, wikitext_texts(data_dir=data_dir),
                                  max_tokens=int(tokens), cache=None, progress=progress)
    solvers, info, done = {}, {}, []
    for w in weights:
        cov = np.asarray(covs[w.path].cov, np.float64)
        s = next((sv for c, sv in done if np.array_equal(c, cov)), None)  # gate and up read the same input
        if s is None:
            s = covariance_solver(cov, ridge=ridge)
            done.append((cov, s))
        solvers[w.path] = s
        info[w.path] = {"cache_file": str(covs[w.path].path), "from_cache": covs[w.path].from_cache,
                        "tokens": int(tokens), "ridge_relative": float(s.ridge / s.evals.mean()), **s.report()}
    return solvers, info


def layer_grads(spec, factors, mask, scaling: str, norm_state=None, editor=None, solvers=None) -> dict[str, np.ndarray]:
    """{weight path: G} of ONE edit (factors [1, T, .]) on the token set `mask` ([1, T] or None).
    raw: sum_t m_t u_t^T delta_t; std: the identity editor's standardised factors (`norm_state`:
    running statistics filled with the same token set; `editor`: identity editor params, made
    here when None)."""
    from salem_jax.mend.capture import kernel_grad
    from salem_jax.mend.editor import init_editor, transform_factors

    f = {w.path: masked_factors(factors[w.path], mask) for w in spec.weights}
    if scaling == "std":
        if editor is None:
            editor, _ = init_editor(spec, jax.random.PRNGKey(0))  # identity networks
        f = transform_factors(spec, editor, norm_state, f)
    elif scaling == "white":
        if solvers is None:
            raise ValueError("the white scaling needs the kernels' covariance solvers (`white_solvers`)")
        f = {w.path: type(f[w.path])(whiten(solvers[w.path], f[w.path].u), f[w.path].delta) for w in spec.weights}
    elif scaling != "raw":
        raise ValueError(f"unknown scaling {scaling!r}; choose one of {SCALINGS}")
    return {w.path: np.asarray(kernel_grad(f[w.path].u, f[w.path].delta, w.layout)) for w in spec.weights}


def run_probe(p: Probe, progress: bool = True) -> dict:
    import jax.numpy as jnp

    from salem_jax.eval.counterfact import PromptProbs, counterfact_metrics, probs_from_nll
    from salem_jax.mend.editor import EditorConfig, EditorSpec, init_editor, update_norm_state
    from salem_jax.models.base import get_path

    model = p.model
    weights = tuple(model.layers.weights(p.layers, part="mlp"))
    subj = lambda rows: [p.records[r["record_id"]].subject for r in rows]  # noqa: E731
    t0 = time.perf_counter()
    efac, emask = _capture_rows(model, weights, p.edits, subj(p.edits), batch_rows=max(1, min(len(p.edits), 10)))
    wfac, wmask = _capture_rows(model, weights, p.warm, subj(p.warm), batch_rows=10) if p.warm else (None, None)
    capture_s = time.perf_counter() - t0

    # the CounterFact rows of every edit: rewrite, paraphrases, neighbourhood x (new, true)
    def cf_rows(rec):
        kinds = [("rewrite", rec.prompt)] + [("paraphrase", q) for q in rec.rephrases] + \
                [("neighborhood", q) for q in rec.loc_prompts]
        prompts = [q for _, q in kinds]
        return kinds, prompts + prompts, [rec.target_new] * len(prompts) + [rec.target_true] * len(prompts)

    def metrics_of(kinds, nll):
        n = len(kinds)
        pr = probs_from_nll(nll)
        p_new, p_true = pr[:n], pr[n:]
        groups = {}
        for k in ("rewrite", "paraphrase", "neighborhood"):
            idx = [i for i, (kk, _) in enumerate(kinds) if kk == k]
            groups[k] = PromptProbs(p_new[idx], p_true[idx]) if idx else None
        m = counterfact_metrics(groups["rewrite"], groups["paraphrase"], groups["neighborhood"])
        return {k: m[k] for k in ("ES", "PS", "NS")}

    mods_of = {L: tuple((w.module_path, w.layout) for w in model.layers.weights([L], part="mlp")) for L in p.layers}
    spec_of = {L: EditorSpec.from_params(model.layers.weights([L], part="mlp"), model.params,
                                         EditorConfig(rank=8, n_hidden=1)) for L in p.layers}
    wnorm = {L: float(np.sqrt(sum(float(jnp.sum(jnp.square(get_path(model.params, w.path).astype(jnp.float32))))
                                  for w in spec_of[L].weights))) for L in p.layers}
    # running statistics per (layer, token set) for the std scaling
    norms = {}
    editors = {L: init_editor(spec_of[L], jax.random.PRNGKey(0))[0] for L in p.layers}  # identity networks
    solvers, white_info = white_solvers(model, weights, p.white_tokens, p.white_ridge, p.data_dir) \
        if "white" in p.scalings else (None, {})
    if "std" in p.scalings:
        if not p.warm:
            raise ValueError("the std scaling needs --warm >= 2 train fail rows of statistics")
        for L in p.layers:
            spec = spec_of[L]
            for ts in p.token_sets:
                _, st = init_editor(spec, jax.random.PRNGKey(0))
                f = {w.path: masked_factors(wfac[w.path], wmask[ts]) for w in spec.weights}
                norms[L, ts] = update_norm_state(spec, st, f)

    n_grid = len(p.rhos)
    per_edit = []
    base_rows = []
    rows_pad = None
    t1 = time.perf_counter()
    for i, row in enumerate(p.edits):
        rec = p.records[row["record_id"]]
        kinds, prompts, targets = cf_rows(rec)
        rows_pad = len(prompts)
        ev = _rows_batch(model, prompts, targets, rows_pad)
        ls = _rows_batch(model, [rec.prompt] * n_grid, [rec.target_new] * n_grid)
        zero = jnp.zeros((rows_pad,), jnp.float32)
        L0 = p.layers[0]
        nll, _ = edited_scores(model.apply, mods_of[L0], model.params,
                               tuple(jnp.zeros(get_path(model.params, w.path).shape, jnp.float32)
                                     for w in spec_of[L0].weights), zero, ev)
        base = metrics_of(kinds, np.asarray(nll)[: len(prompts)])
        base_rows.append(base)
        for L in p.layers:
            spec = spec_of[L]
            apply_L, ev_L, ls_L = from_block(model, L, ev, ls)
            one = {w.path: type(efac[w.path])(efac[w.path].u[i : i + 1], efac[w.path].delta[i : i + 1])
                   for w in spec.weights}
            for ts in p.token_sets:
                m = None if emask[ts] is None else emask[ts][i : i + 1]
                n_tok = None if m is None else int(m.sum())
                for sc in p.scalings:
                    g = layer_grads(spec, one, m, sc, norms.get((L, ts)), editors[L], solvers)
                    gs = tuple(jnp.asarray(g[w.path]) for w in spec.weights)
                    gnorm = float(np.sqrt(sum(float(np.sum(np.square(x))) for x in g.values())))
                    if not np.isfinite(gnorm):
                        raise ValueError(f"edit {row['id']!r}, {L}, {ts}, {sc}: the update's norm is {gnorm}")
                    if gnorm == 0.0:  # e.g. the last block: its MLP at a subject token reaches no target
                        per_edit.append({"edit": i, "id": row["id"], "record_id": row["record_id"], "layer": L,
                                         "tokens": ts, "scaling": sc, "found": False, "no_gradient": True,
                                         "rho": float("nan"), "lr": float("nan"), "grad_norm": 0.0, "n_tokens": n_tok,
                                         "new_nll": float("nan"), "ES": float("nan"), "PS": float("nan"),
                                         "NS": float("nan")})
                        continue
                    coefs = jnp.asarray(p.rhos * wnorm[L] / gnorm, jnp.float32)
                    l_nll, l_ok = jax.device_get(edited_scores(apply_L, mods_of[L], model.params, gs, coefs, ls_L))
                    ok = np.flatnonzero(l_ok)
                    j = int(ok[0]) if len(ok) else int(np.nanargmin(l_nll))
                    coef = jnp.full((rows_pad,), coefs[j], jnp.float32)
                    e_nll, _ = edited_scores(apply_L, mods_of[L], model.params, gs, coef, ev_L)
                    met = metrics_of(kinds, np.asarray(e_nll)[: len(prompts)])
                    per_edit.append({"edit": i, "id": row["id"], "record_id": row["record_id"], "layer": L,
                                     "tokens": ts, "scaling": sc, "found": bool(len(ok)), "no_gradient": False, "rho": float(p.rhos[j]),
                                     "lr": float(coefs[j]), "grad_norm": gnorm, "n_tokens": n_tok,
                                     "new_nll": float(l_nll[j]), **met})
        if progress:
            print(f"[subject_factors] edit {i + 1}/{len(p.edits)} done, {time.perf_counter() - t1:.0f}s", flush=True)
    return {"capture_seconds": capture_s, "probe_seconds": time.perf_counter() - t1,
            "base": base_rows, "per_edit": per_edit, "whitening": white_info}


def summarize(res: dict, layers, token_sets, scalings) -> list[dict]:
    """Per (layer, token set, scaling): the share of edits whose line search reached the argmax
    (`found`), the edits with no gradient at all on the token set (`no_gradient`, left out of the
    rest), the median rho, the mean ES, PS, NS and the median ratio of |G| to the `all` token
    set's |G| (same edit, layer, scaling)."""
    rows = []
    per = res["per_edit"]
    ref = {(r["edit"], r["layer"], r["scaling"]): r["grad_norm"] for r in per if r["tokens"] == "all"}
    for L in layers:
        for sc in scalings:
            for ts in token_sets:
                sel = [r for r in per if r["layer"] == L and r["tokens"] == ts and r["scaling"] == sc]
                if not sel:
                    continue
                ratio = [r["grad_norm"] / ref[r["edit"], L, sc] for r in sel if (r["edit"], L, sc) in ref]
                has = [r for r in sel if not r["no_gradient"]]
                mean = lambda k: float(np.nanmean([r[k] for r in has])) if has else float("nan")  # noqa: E731
                rows.append({"layer": L, "scaling": sc, "tokens": ts, "n": len(sel), "no_gradient": len(sel) - len(has),
                             "found": float(np.mean([r["found"] for r in sel])),
                             "rho_median": float(np.median([r["rho"] for r in has])) if has else float("nan"),
                             "grad_ratio": float(np.median(ratio)) if ratio else float("nan"),
                             **{k: mean(k) for k in ("ES", "PS", "NS")}})
    return rows


def table(res: dict, rows: list[dict]) -> str:
    b = res["base"]
    lines = ["| layer | factors | tokens | edits (no grad.) | found | median rho | median G/G_all | ES | PS | NS |",
             "|---|---|---|---|---|---|---|---|---|---|",
             f"| (unedited) | - | - | {len(b)} | - | - | - | {np.mean([x['ES'] for x in b]):.2f} | "
             f"{np.nanmean([x['PS'] for x in b]):.2f} | {np.nanmean([x['NS'] for x in b]):.2f} |"]
    for r in rows:
        lines.append(f"| {r['layer']} | {r['scaling']} | {r['tokens']} | {r['n']} ({r['no_gradient']}) | {r['found']:.2f} | {r['rho_median']:.2g} | "
                     f"{r['grad_ratio']:.3f} | {r['ES']:.2f} | {r['PS']:.2f} | {r['NS']:.2f} |")
    return "\n".join(lines)


def paired(res: dict, layers, scalings, token_sets=("subject_last", "subject"), ref_scaling: str | None = None) -> list[dict]:
    """The comparison at equal edit success: per (layer, scaling, token set), the edits whose line
    search reached the argmax with BOTH the `all` tokens and that token set (`found`), and on those
    edits the mean NS / PS / ES of each and of the unedited model, the median rho of each.
    ref_scaling: the `all` tokens of THAT scaling are the reference (e.g. "raw", today's MEND
    gradient), instead of the same scaling's."""
    per = {(r["edit"], r["layer"], r["scaling"], r["tokens"]): r for r in res["per_edit"]}
    edits = sorted({r["edit"] for r in res["per_edit"]})
    out = []
    for L in layers:
        for sc in scalings:
            for ts in token_sets:
                rs = sc if ref_scaling is None else ref_scaling
                if (edits[0], L, sc, ts) not in per or (edits[0], L, rs, "all") not in per or (rs, ts) == (sc, "all"):
                    continue
                both = [e for e in edits if per[e, L, rs, "all"]["found"] and per[e, L, sc, ts]["found"]]
                row = {"layer": L, "scaling": sc, "tokens": ts, "ref_scaling": rs, "n": len(both)}
                if both:
                    for k in ("NS", "PS", "ES"):
                        row[f"{k}_base"] = float(np.mean([res["base"][e][k] for e in both]))
                        row[f"{k}_all"] = float(np.mean([per[e, L, rs, "all"][k] for e in both]))
                        row[f"{k}_tokens"] = float(np.mean([per[e, L, sc, ts][k] for e in both]))
                    row["rho_all"] = float(np.median([per[e, L, rs, "all"]["rho"] for e in both]))
                    row["rho_tokens"] = float(np.median([per[e, L, sc, ts]["rho"] for e in both]))
                out.append(row)
    return out


def paired_table(rows: list[dict]) -> str:
    lines = ["| layer | factors | tokens | reference | edits fixed by both | NS unedited | NS ref | NS tokens | PS ref | "
             "PS tokens | median rho ref / tokens |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ref = f"all {r.get('ref_scaling', r['scaling'])}"
        if not r["n"]:
            lines.append(f"| {r['layer']} | {r['scaling']} | {r['tokens']} | {ref} | 0 | - | - | - | - | - | - |")
            continue
        lines.append(f"| {r['layer']} | {r['scaling']} | {r['tokens']} | {ref} | {r['n']} | {r['NS_base']:.2f} | {r['NS_all']:.2f} | "
                     f"{r['NS_tokens']:.2f} | {r['PS_all']:.2f} | {r['PS_tokens']:.2f} | {r['rho_all']:.2g} / {r['rho_tokens']:.2g} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--edit-set", default=None, help="a saved CounterFact edit set (default: build one)")
    ap.add_argument("--edits", type=int, default=20, help="the first N val fail rows (the pipeline's max_edits)")
    ap.add_argument("--warm", type=int, default=30, help="train fail rows whose factors fill the std statistics")
    ap.add_argument("--layers", default="layers.3,layers.7,layers.14,layers.21,layers.27")
    ap.add_argument("--tokens", default=",".join(TOKEN_SETS))
    ap.add_argument("--scalings", default=",".join(SCALINGS))
    ap.add_argument("--white-tokens", type=int, default=WHITE_TOKENS,
                    help="WikiText tokens of the white scaling's key statistics (20000: the cached cf22 entries)")
    ap.add_argument("--white-ridge", type=float, default=WHITE_RIDGE,
                    help="the white scaling's ridge lambda as a multiple of trace(C) / d")
    ap.add_argument("--rhos", default="", help="relative step sizes (default: 13 points, 1e-4 .. 1)")
    ap.add_argument("--tiny", action="store_true", help="the tiny random Llama and a few records: a smoke run")
    ap.add_argument("--out", default=None)
    add_flag(ap)
    ap.add_argument("--summarize", default=None, metavar="JSON",
                    help="print the tables of a saved --out file (no model run)")
    args = ap.parse_args(argv)
    if args.summarize:
        d = json.loads(Path(args.summarize).read_text())
        sets = tuple(dict.fromkeys(r["tokens"] for r in d["per_edit"]))
        scs = tuple(dict.fromkeys(r["scaling"] for r in d["per_edit"]))
        print(table(d, summarize(d, d["layers"], sets, scs)))
        print("\nAt equal edit success (edits whose line search reached the argmax with both token sets):")
        print(paired_table(paired(d, d["layers"], scs, tuple(t for t in sets if t != "all"))))
        if any(s != "raw" for s in scs) and "raw" in scs:
            print("\nAgainst `all` raw (today's MEND gradient) at equal edit success:")
            print(paired_table(paired(d, d["layers"], tuple(s for s in scs if s != "raw"), sets, ref_scaling="raw")))
        return 0
    enable_compile_cache(enabled=not args.no_compile_cache)

    from experiments import counterfact_smollm2
    from experiments.common import benchmark_edit_set
    from salem_jax.pipeline import load, read_records

    token_sets = tuple(s for s in args.tokens.split(",") if s)
    scalings = tuple(s for s in args.scalings.split(",") if s)
    for s in token_sets:
        if s not in TOKEN_SETS:
            raise SystemExit(f"--tokens: unknown token set {s!r}; choose from {TOKEN_SETS}")
    for s in scalings:
        if s not in SCALINGS:
            raise SystemExit(f"--scalings: unknown scaling {s!r}; choose from {SCALINGS}")
    rhos = np.asarray([float(x) for x in args.rhos.split(",")] if args.rhos else np.geomspace(1e-4, 1.0, 13))
    cfg = counterfact_smollm2.get_config(args.tiny)
    cfg.progress = False
    records = read_records(cfg)
    model = load(cfg, records)
    es = benchmark_edit_set(model, records, cfg, args.edit_set)
    layers = [s for s in args.layers.split(",") if s]
    if args.tiny and args.layers == ap.get_default("layers"):
        layers = model.layers.names()
    model.layers.select(layers)  # unknown names: an error listing the valid ones
    by_id = {r.id: r for r in records}
    val = [r for r in es.rows("val", "fail") if r["record_id"] in by_id][: args.edits]
    train = [r for r in es.rows("train", "fail") if r["record_id"] in by_id]
    rng = np.random.default_rng(0)
    warm = [train[k] for k in np.sort(rng.permutation(len(train))[: args.warm])] if "std" in scalings else []
    print(f"{model.name}: {len(val)} val edits, layers {layers}, warm {len(warm)} rows, rho grid {rhos.tolist()}", flush=True)
    probe = Probe(model, by_id, val, warm, layers, token_sets, scalings, rhos, args.white_tokens, args.white_ridge,
                  cfg.data_dir or None)
    res = run_probe(probe)
    rows = summarize(res, layers, token_sets, scalings)
    pairs = paired(res, layers, scalings, tuple(t for t in token_sets if t != "all"))
    print(table(res, rows))
    print("\nAt equal edit success (edits whose line search reached the argmax with both token sets):")
    print(paired_table(pairs))
    if any(s != "raw" for s in scalings) and "raw" in scalings:
        pairs_raw = paired(res, layers, tuple(s for s in scalings if s != "raw"), token_sets, ref_scaling="raw")
        print("\nAgainst `all` raw (today's MEND gradient) at equal edit success:")
        print(paired_table(pairs_raw))
        pairs = pairs + pairs_raw
    for path, inf in res["whitening"].items():
        print(f"whitening {path}: ridge {inf['ridge_relative']:.3g} x trace(C)/d, cond {inf['cond_with_ridge']:.3g}, "
              f"from cache {inf['from_cache']}")
    print(f"capture {res['capture_seconds']:.0f}s, probe {res['probe_seconds']:.0f}s")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"model": model.name, "edit_set": args.edit_set, "layers": layers,
                                              "rhos": rhos.tolist(), "warm": len(warm), "summary": rows,
                                              "white_tokens": args.white_tokens, "white_ridge": args.white_ridge,
                                              "paired": pairs, **res},
                                             indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
