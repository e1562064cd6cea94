"""Causal tracing of hidden states, as ROME does it (Meng et al. 2022), for any architecture.

For one fact (prompt, answer):

1. clean run: record every traced block's output hidden state h_l[t] and P_clean(answer);
2. corrupted runs: add Gaussian noise to the embeddings of the subject tokens (N noised copies,
   noise N(0, (3 sigma)^2) with sigma the standard deviation of the subject tokens' embeddings,
   as ROME) and measure P_corrupt(answer), averaged over the copies;
3. restored runs: corrupted, but block l's output at token t is replaced by the clean h_l[t];
   P_l,t(answer) is how much of the answer comes back (ROME's indirect effect).

The normalized effect is (P_l,t - P_corrupt) / (P_clean - P_corrupt): 1 = fully restored,
0 = nothing restored. The chosen layer is the one whose restoration at the LAST SUBJECT TOKEN
recovers the most (ROME's finding that the decisive MLP states sit there; `select="max"` takes
the layer of the largest effect anywhere instead).

Nothing here knows an architecture: the embedding module (`LayerTable.embedding`) and each block
module (`Block.module_path`) are intercepted with `flax.linen.intercept_methods`. A block that
returns a tuple (transformers' Flax blocks) has its first element replaced. For encoder-decoders,
only ENCODER blocks are traced (the subject lives in the source text) and the noise goes to the
first call of the embedding module in a forward pass, which is the encoder's (T5 and BART share
one embedding between encoder and decoder and call it for the encoder first).

P(answer) is the joint teacher-forced probability of the counted label tokens, exp(sum log p);
for a one-token answer that is ROME's quantity. `answer="existing"` (default) traces the answer
the model itself gives (its teacher-forced argmax at the target positions, as ROME traces the
model's own prediction); `answer="target"` traces the row's labels as given.

Cost: all (layer, position) restorations of one fact run in batched calls of
`restorations_per_call` x `n_noise` sequences; `TraceResult.forward_passes` counts the model calls
and `restorations` the (layer, position) pairs (ROME runs one batched forward per pair).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Literal, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from salem_jax.losses import token_logprobs
from salem_jax.models.base import Block, LoadedModel
from tqdm.auto import tqdm
from salem_jax.locate.profile import LayerProfile, jsonable, top_k_layers

Answer = Literal["existing", "target"]

@dataclasses.dataclass(frozen=True)
class TraceResult:
    """Causal trace of one fact.

    probs [L, P]: P(answer) with block l's clean output restored at position positions[p]
    (mean over the noised copies); p_clean, p_corrupt: without noise / with noise, nothing
    restored.
    """

    layers: tuple[str, ...]
    positions: tuple[int, ...]
    probs: np.ndarray
    p_clean: float
    p_corrupt: float
    subject_positions: tuple[int, ...]
    noise_std: float
    n_noise: int
    forward_passes: int  # batched model calls, the clean one included
    sequences: int  # sequences forwarded in all those calls
    restorations: int  # (layer, position) pairs traced

    @property
    def effect(self) -> np.ndarray:
        """[L, P] normalized indirect effect (P - P_corrupt) / (P_clean - P_corrupt)."""
        denom = self.p_clean - self.p_corrupt
        if abs(denom) < 1e-12:
            return np.zeros_like(self.probs)
        return (self.probs - self.p_corrupt) / denom

    @property
    def last_subject(self) -> int:
        """Column of `probs` of the last subject token."""
        return self.positions.index(self.subject_positions[-1])

    def layer_scores(self, select: str = "last_subject") -> np.ndarray:
        """[L]: effect at the last subject token ("last_subject") or the max over positions ("max")."""
        if select == "last_subject":
            return self.effect[:, self.last_subject]
        if select == "max":
            return self.effect.max(1)
        raise ValueError(f"unknown select {select!r}; choose 'last_subject' or 'max'")

    def chosen_layer(self, select: str = "last_subject") -> str:
        return self.layers[int(np.argmax(self.layer_scores(select)))]


# ----------------------------------------------------------------------------- helpers


def traced_blocks(model: LoadedModel, layers: Sequence[str] | None = None) -> tuple[Block, ...]:
    """The blocks causal tracing restores: all of them for causal LMs, the encoder's for
    encoder-decoders. Raises for classifiers and for decoder blocks of encoder-decoders."""
    if model.kind == "classifier":
        raise NotImplementedError("causal tracing needs a generated answer; classifiers are not supported")
    if not model.layers.embedding:
        raise ValueError(f"the layer table of {model.name} names no embedding module (LayerTable.embedding)")
    blocks = model.layers.blocks if layers is None else model.layers.select(layers)
    if model.kind == "seq2seq":
        bad = [b.name for b in blocks if not b.name.startswith("encoder")]
        if layers is None:
            blocks = tuple(b for b in blocks if b.name.startswith("encoder"))
        elif bad:
            raise NotImplementedError(
                f"causal tracing of an encoder-decoder restores encoder blocks only; not supported: {bad}"
            )
        if not blocks:
            raise NotImplementedError(f"{model.name}: no encoder blocks (named 'encoder.*') in the layer table")
    if not blocks:
        raise ValueError("no layers to trace")
    return tuple(blocks)


def subject_token_mask(model: LoadedModel, prompts: Sequence[str], subjects: Sequence[str], length: int) -> np.ndarray:
    """[B, length] int32: 1 at the prompt tokens that overlap the subject's characters.

    Positions follow `salem_jax.data.tokenize.encode` (the prompt tokenized with special tokens
    comes first). The subject is looked up in the prompt as written, then case-insensitively.
    """
    if len(prompts) != len(subjects):
        raise ValueError(f"{len(prompts)} prompts but {len(subjects)} subjects")
    tok = model.tokenizer
    out = np.zeros((len(prompts), length), np.int32)
    for i, (p, s) in enumerate(zip(prompts, subjects)):
        if not s:
            raise ValueError(f"record {i}: field 'subject' is empty; causal tracing needs the subject")
        a = p.find(s)
        if a < 0:
            a = p.lower().find(s.lower())
        if a < 0:
            raise ValueError(f"record {i}: field 'subject' ({s!r}) does not occur in the prompt {p!r}")
        b = a + len(s)
        enc = tok(p, add_special_tokens=True, return_offsets_mapping=True)
        hit = [t for t, (u, v) in enumerate(enc["offset_mapping"]) if v > u and u < b and v > a]
        if not hit:
            raise ValueError(f"record {i}: no token of the prompt covers the subject {s!r}")
        if hit[-1] >= length:
            raise ValueError(f"record {i}: the subject ends at token {hit[-1]}, past the batch length {length}")
        out[i, hit] = 1
    return out


def _prompt_positions(model: LoadedModel, row: dict) -> int:
    """Number of input positions that belong to the prompt of a one-row batch."""
    if model.kind == "seq2seq":
        return int(np.asarray(row["attention_mask"]).sum())
    lm = np.asarray(row["label_mask"])[0]
    first = np.flatnonzero(lm)
    if not len(first):
        raise ValueError("row has no target tokens (field 'label_mask' is all zero)")
    return int(first[0]) + 1  # logits at the last prompt token predict the first target token


def _block_hidden(out):
    if isinstance(out, (tuple, list)):
        return out[0]
    if isinstance(out, jax.Array) or hasattr(out, "shape"):
        return out
    raise TypeError(f"cannot find the hidden state in a block output of type {type(out).__name__}")


def _replace_hidden(out, h):
    if isinstance(out, tuple):
        return (h,) + tuple(out[1:])
    if isinstance(out, list):
        return [h] + list(out[1:])
    return h


# ----------------------------------------------------------------------------- the traced forward


def _static(model: LoadedModel, blocks: tuple[Block, ...]) -> tuple:
    """Hashable static arguments of the jitted passes: (apply, embedding path, block paths)."""
    paths = tuple(b.module_path for b in blocks)
    if len(set(paths)) != len(paths):
        raise ValueError("two traced blocks share a module path; the layer table is ambiguous")
    return (model.apply, model.layers.embedding, paths)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _capture(apply, emb, block_paths, params, batch):
    """Clean run of a one-row batch: (block outputs [L, T, d], embeddings [T, d], logits)."""
    index = {p: i for i, p in enumerate(block_paths)}
    states: dict[int, jax.Array] = {}
    embeds: list[jax.Array] = []

    def icpt(next_fun, args, kwargs, ctx):
        out = next_fun(*args, **kwargs)
        if ctx.method_name != "__call__":
            return out
        path = "/".join(ctx.module.path)
        if path == emb and not embeds:
            embeds.append(out)
        elif path in index:
            states[index[path]] = _block_hidden(out)
        return out

    with nn.intercept_methods(icpt):
        logits = apply(params, batch)
    if len(states) != len(block_paths):
        missing = [p for p in block_paths if index[p] not in states]
        raise ValueError(f"block modules never called during the forward pass (wrong Block.module_path?): {missing}")
    if not embeds:
        raise ValueError(f"the embedding module {emb!r} was never called (wrong LayerTable.embedding?)")
    return jnp.stack([states[i][0] for i in range(len(block_paths))]), embeds[0][0], logits


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _restored(apply, emb, block_paths, params, batch, labels, mask, noise, restore, clean):
    """Mean over the noised copies of P(answer), one value per restoration mask: [K].

    batch, labels, mask: one row; noise [N, T, d]; restore [K, L, T] bool; clean [L, T, d]."""
    index = {p: i for i, p in enumerate(block_paths)}
    K, N = restore.shape[0], noise.shape[0]
    rows = K * N
    big = {k: jnp.repeat(v, rows, axis=0) for k, v in batch.items()}
    noise_rows = jnp.tile(noise, (K, 1, 1))
    mask_rows = jnp.repeat(restore, N, axis=0)  # row k*N + n restores with mask k
    calls = [0]

    def icpt(next_fun, args, kwargs, ctx):
        out = next_fun(*args, **kwargs)
        if ctx.method_name != "__call__":
            return out
        path = "/".join(ctx.module.path)
        if path == emb:
            calls[0] += 1
            if calls[0] == 1:  # the (encoder's) input embedding; a decoder's call comes later
                return out + noise_rows.astype(out.dtype)
            return out
        if path in index:
            l = index[path]
            h = _block_hidden(out)
            h = jnp.where(mask_rows[:, l, :, None], clean[l][None].astype(h.dtype), h)
            return _replace_hidden(out, h)
        return out

    with nn.intercept_methods(icpt):
        logits = apply(params, big)
    lp = (token_logprobs(logits, jnp.repeat(labels, rows, 0)) * jnp.repeat(mask, rows, 0)).sum(-1)
    return jnp.exp(lp).reshape(K, N).mean(1)


def restored_probs(
    model: LoadedModel,
    params: Any,
    row: dict,
    noise: np.ndarray,
    restore: np.ndarray,
    *,
    layers: Sequence[str] | None = None,
    answer: Answer = "existing",
) -> np.ndarray:
    """P(answer) of a one-row batch under noise [N, T, d] with restoration masks [K, L, T]
    (True = put block l's clean output back at position t): [K], mean over the N copies.
    The building block of `trace`; exposed for experiments (e.g. several layers at once)."""
    st = _static(model, traced_blocks(model, layers))
    row = {k: jnp.asarray(v) for k, v in row.items()}
    clean, _, logits = _capture(*st, params, row)
    labels = _answer_labels(answer, row, jnp.argmax(logits, -1))
    mask = row["label_mask"]
    return np.asarray(_restored(*st, params, row, labels, mask, jnp.asarray(noise), jnp.asarray(restore), clean))


def _answer_labels(answer: str, row: dict, existing):
    if answer == "existing":
        return existing
    if answer == "target":
        return row["labels"]
    raise ValueError(f"unknown answer {answer!r}; choose 'existing' or 'target'")


def trace(
    model: LoadedModel,
    params: Any,
    batch: dict,
    subject_mask: np.ndarray,
    *,
    layers: Sequence[str] | None = None,
    n_noise: int = 10,
    noise_std: float | None = None,
    noise_scale: float = 3.0,
    seed: int = 0,
    answer: Answer = "existing",
    restorations_per_call: int = 8,
    progress: bool = False,
) -> list[TraceResult]:
    """Trace every row of `batch` (one fact per row); see the module docstring.

    subject_mask [B, T_in]: 1 at the subject tokens to corrupt (`subject_token_mask`).
    noise_std: the sigma of the noise is noise_scale * noise_std; by default noise_std is the
    standard deviation of the clean embeddings of all rows' subject tokens (ROME: 3 sigma).
    Compiles once per sequence length; each fact costs ceil((L*P + 1) / restorations_per_call)
    calls of restorations_per_call * n_noise sequences plus one clean call.
    """

    # --- checks: answer, batch shape, context, subject mask
    if answer not in ("existing", "target"):
        raise ValueError(f"unknown answer {answer!r}; choose 'existing' or 'target'")
    blocks = traced_blocks(model, layers)
    names = tuple(b.name for b in blocks)
    ids = np.asarray(batch.get("input_ids", np.zeros((0, 0))))
    if ids.ndim != 2 or ids.shape[0] == 0:
        raise ValueError("empty batch (no facts to trace)")
    if ids.shape[1] > model.max_length:
        raise ValueError(f"field 'input_ids' is {ids.shape[1]} tokens, longer than the context ({model.max_length})")
    sm = np.asarray(subject_mask)
    if sm.shape != ids.shape:
        raise ValueError(f"subject_mask has shape {sm.shape}, input_ids {ids.shape}")
    if n_noise < 1 or restorations_per_call < 1:
        raise ValueError("n_noise and restorations_per_call must be >= 1")
    # --- clean runs of every row, and the noise level
    st = _static(model, blocks)
    B, T = ids.shape
    L = len(blocks)
    rows = [{k: jnp.asarray(np.asarray(v)[i : i + 1]) for k, v in batch.items()} for i in range(B)]
    for i in range(B):
        if not sm[i].any():
            raise ValueError(f"row {i}: no subject token to corrupt (subject_mask is all zero)")
        if not np.asarray(batch["label_mask"])[i].any():
            raise ValueError(f"row {i}: no target tokens (field 'label_mask' is all zero)")

    clean_runs = [_capture(*st, params, r) for r in rows]
    if noise_std is None:
        subj = np.concatenate([np.asarray(c[1])[sm[i].astype(bool)] for i, c in enumerate(clean_runs)])
        noise_std = float(subj.std())
    # --- per fact: noised runs with every (layer, position) restored, in calls of restorations_per_call
    sigma = noise_scale * noise_std
    rng = np.random.RandomState(seed)
    results = []
    bar = tqdm(total=B, desc="causal trace", disable=not progress, leave=False)
    for i, (r, (clean, emb, logits)) in enumerate(zip(rows, clean_runs)):
        labels = _answer_labels(answer, r, jnp.argmax(logits, -1))
        mask = r["label_mask"]
        d = emb.shape[-1]
        noise = rng.randn(n_noise, T, d).astype(np.float32) * sigma * sm[i][None, :, None]
        P = _prompt_positions(model, {k: np.asarray(v) for k, v in r.items()})
        positions = tuple(range(P))
        if max(np.flatnonzero(sm[i])) >= P:
            raise ValueError(f"row {i}: subject tokens lie outside the prompt")
        pairs = [(l, t) for l in range(L) for t in positions] + [None]  # None: nothing restored
        K = restorations_per_call
        probs = []
        calls = 0
        for s in range(0, len(pairs), K):
            chunk = pairs[s : s + K]
            masks = np.zeros((K, L, T), bool)
            for k, pr in enumerate(chunk):
                if pr is not None:
                    masks[k, pr[0], pr[1]] = True
            out = np.asarray(_restored(*st, params, r, labels, mask, jnp.asarray(noise), jnp.asarray(masks), clean))
            probs.extend(out[: len(chunk)].tolist())
            calls += 1
        lp_clean = float((np.asarray(_logprobs(logits, labels)) * np.asarray(mask)).sum())
        results.append(
            TraceResult(
                layers=names,
                positions=positions,
                probs=np.asarray(probs[:-1]).reshape(L, P),
                p_clean=float(np.exp(lp_clean)),
                p_corrupt=float(probs[-1]),
                subject_positions=tuple(int(t) for t in np.flatnonzero(sm[i])),
                noise_std=float(noise_std),
                n_noise=n_noise,
                forward_passes=calls + 1,
                sequences=calls * K * n_noise + 1,
                restorations=L * P,
            )
        )
        bar.update(1)
    bar.close()
    return results


def _logprobs(logits, labels):
    return token_logprobs(jnp.asarray(logits), jnp.asarray(labels))


def trace_profile(
    model: LoadedModel,
    params: Any,
    batch: dict,
    subject_mask: np.ndarray,
    *,
    select: str = "last_subject",
    top_k: int = 1,
    group: str = "fail",
    **kwargs,
):
    """Trace every row and average: layer score = mean over facts of `TraceResult.layer_scores`.
    Returns (LayerProfile, list of TraceResult)."""

    t0 = time.perf_counter()
    res = trace(model, params, batch, subject_mask, **kwargs)
    scores = np.mean([r.layer_scores(select) for r in res], axis=0)
    names = res[0].layers
    prof = LayerProfile(
        method="causal-trace",
        scorer=f"effect_{select}",
        layers=names,
        scores={group: [float(x) for x in scores]},
        chosen=top_k_layers(scores, names, top_k),
        select_group=group,
        part="hidden",
        top_k=top_k,
        examples={group: len(res)},
        wall_time=time.perf_counter() - t0,
        model=model.name,
        extra=jsonable(
            {
                "forward_passes": sum(r.forward_passes for r in res),
                "sequences": sum(r.sequences for r in res),
                "restorations": sum(r.restorations for r in res),
                "n_noise": res[0].n_noise,
                "noise_std": res[0].noise_std,
                "p_clean": [r.p_clean for r in res],
                "p_corrupt": [r.p_corrupt for r in res],
                "per_fact_chosen": [r.chosen_layer(select) for r in res],
            }
        ),
    )
    return prof, res
