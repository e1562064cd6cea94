"""ROME: rank-one model editing of one MLP output projection (Meng et al., NeurIPS 2022).

ROME treats a block's MLP output projection W (GPT-2 `mlp/c_proj`, Llama `mlp/down_proj`)
as a linear key-value memory: the key k is the projection's input (the MLP's hidden
activation) at the last token of the subject, the value W k + b its output. To make the model
say `target_new` after `prompt`:

1. **Key k\\*** (`compute_key`): the projection input at the subject's last token, averaged
   over the prompt preceded by each of `ROMEConfig.prefixes`. ROME uses about 50 short texts
   the model itself generated from "The" as prefixes; the default here is the prompt alone
   (`prefixes=("",)`), which needs no sampling. Pass your own prefixes to follow ROME.
2. **Value v\\*** (`compute_value`): v\\* = o + delta, where o is the projection's output at
   that position on the (first prefixed) prompt and delta, added to the output at the
   subject's last token of every rewriting input, minimises
   ``mean target NLL of target_new``
   ``+ kl_factor * KL(p_new || p_init)`` of the next-token distribution at the subject's last
   token of `kl_prompt` ("{} is a", keeps the subject's essence), ``+ weight_decay * |delta|
   / |o|^2``, with Adam (`v_lr`, at most `v_steps` steps, stopping below loss 0.05) and
   |delta| projected to at most `clamp_norm_factor * |o|` after every step. These follow
   ROME's code (its KL term is torch `kl_div(init, new)` = KL(new || init)); the NLL is taken at
   the model's output (ROME's `v_loss_layer` = last layer). `clamp_norm="residual"` makes the
   weight decay and the clamp relative to |h0| instead, h0 = the output of the block that owns
   the projection (the residual stream) at that position: MEMIT's and AlphaEdit's z\\*
   (`compute_z`: decay 0.5 |delta| / |h0|^2, clamp 0.75 |h0|). Adding delta to the MLP output
   at a token is adding it to the block's output there, so only the reference norm changes.
   The steps run only each row's live window - from the subject's last token, where delta
   enters, to the last scored position - over a KV cache of the base model's keys and values
   (`ROMEConfig.window`, `WINDOW_BUCKETS`): nothing before that token depends on delta.
3. **Key statistics C** (`key_covariance`): the uncentered second moment E[k k^T] of the
   projection's input over the tokens of plain text (ROME: 100k Wikipedia samples; here any
   texts, e.g. a few hundred WikiText paragraphs). Inverted with a small ridge
   ``ridge * trace(C) / d`` for stability. `cov=None` uses C = I (ROME without its
   covariance adjustment).
4. **Update** (`rank_one_update`): with u = C^-1 k\\*,
   ``W' = W + (v* - (W k* + b)) u^T / (u^T k*)``, so that W' k\\* + b = v\\* exactly, while keys
   orthogonal to u in the C-metric keep their values. Written in the kernel's own layout:
   "out_in" (GPT-2 Conv1D, kernel = W) or "in_out" (flax Dense, kernel = W^T).

Reading and replacing the projection's input and output uses `flax.linen.intercept_methods`
on the module at `Weight.module_path`; no model code changes. Only the one kernel changes.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from salem_jax.data.tokenize import bucket_length, encode, pad_rows, slice_rows
from salem_jax.data.tokenize import token_windows, tokenize_texts
from salem_jax.models.base import Weight, get_path, set_path
from salem_jax.models.from_block import BLOCK_INPUT, block_chain, block_output
from salem_jax.scored_logits import SCORE_POS, scored_logits, with_score_positions


@dataclasses.dataclass(frozen=True)
class ROMEConfig:
    """ROME's hyper-parameters (defaults: ROME's GPT-2 XL settings, prefixes aside)."""

    v_steps: int = 20
    v_lr: float = 0.5
    kl_factor: float = 0.0625
    weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    # the norm the weight decay and the clamp are relative to: "output" = |o|, the edited module's output
    # (ROME); "residual" = |h0|, the owning block's output (MEMIT / AlphaEdit; see the module docstring)
    clamp_norm: str = "output"
    stop_loss: float = 5e-2
    kl_prompt: str = "{} is a"
    prefixes: tuple[str, ...] = ("",)  # texts put before the prompt; "" = the prompt alone
    ridge: float = 1e-3  # relative ridge added to C before solving
    # v*'s steps start at the edited block on the base hidden states entering it (computed once per
    # v*; the blocks below do not depend on delta): the same loss and gradient, fewer blocks per step.
    # False runs every block at every step (the reference path; tests compare the two).
    from_block: bool = True
    # v*'s steps run only each row's live window - the subject's last token (where delta enters) to
    # its last scored position - on a KV cache of the base model's keys and values for the rest (no
    # position before the subject's last token depends on delta). Needs `model.kv_decode` (Llama,
    # GPT-2, GPT-Neo); other models, or False, run the whole padded rows (`from_block` above).
    window: bool = True


@dataclasses.dataclass(frozen=True)
class ROMEResult:
    params: Any  # the edited parameters (only `weight` differs from the input)
    weight: Weight  # the edited kernel
    key: jax.Array  # k*  [in]
    value: jax.Array  # v*  [out]
    old_value: jax.Array  # W k* + b before the edit  [out]
    lookup_index: int  # position of the subject's last token in the bare prompt
    losses: tuple[float, ...]  # v* optimisation loss at each step


# --------------------------------------------------------------------------- where to edit


def rome_weight(model, layer: str | Weight) -> Weight:
    """The MLP output projection of block `layer` (its last MLP weight in the layer table:
    `c_proj` for GPT-2, `down_proj` for Llama), or `layer` itself if it is a Weight."""
    if isinstance(layer, Weight):
        return layer
    block = model.layers[layer]
    if not block.mlp:
        raise ValueError(f"layer {layer!r} lists no MLP weights")
    w, first = block.mlp[-1], block.mlp[0]
    fan_in, fan_out = w.in_out_shape(get_path(model.params, w.path).shape)
    width = first.in_out_shape(get_path(model.params, first.path).shape)[0]
    if fan_out != width:
        raise ValueError(
            f"layer {layer!r}: the last MLP weight {w.path} maps {fan_in} -> {fan_out}, not back to the block "
            f"width {width}; pass the output projection's Weight explicitly"
        )
    return w


def _check_no_remat(model) -> None:
    # intercept_methods reads the projection's input as a side effect, which cannot leave a
    # rematerialised (nn.remat) layer: JAX raises UnexpectedTracerError deep inside.
    if getattr(model.module, "remat", False):
        raise ValueError(
            f"ROME reads layer inputs with flax intercept_methods, which cannot see inside nn.remat layers; "
            f"load {model.name!r} with remat=False"
        )


def _join(prefix: str, prompt: str) -> str:
    return prompt if not prefix else prefix.rstrip() + " " + prompt


def subject_last_index(tokenizer, text: str, subject: str, start: int = 0) -> int:
    """Position (in `tokenizer(text)["input_ids"]`, special tokens included) of the last token
    that overlaps the first occurrence of `subject` in `text[start:]`. An empty subject means
    the last token of the text."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    if not subject:
        return len(ids) - 1
    s0 = text.find(subject, start)
    if s0 < 0:
        raise ValueError(f"subject {subject!r} does not occur in prompt {text[start:]!r}")
    s1 = s0 + len(subject)
    if getattr(tokenizer, "is_fast", False):
        offsets = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)["offset_mapping"]
        hits = [i for i, (a, b) in enumerate(offsets) if b > a and a < s1 and b > s0]
        if not hits:
            raise ValueError(f"no token of {text!r} overlaps the subject {subject!r}")
        return hits[-1]
    # slow tokenizers have no offsets: count the tokens of the text up to the subject's end
    return len(tokenizer(text[:s1], add_special_tokens=True)["input_ids"]) - 1


# --------------------------------------------------------------------------- interception


def _interceptor(module_path: str, on_call: Callable):
    """An intercept_methods interceptor calling `on_call(x, y) -> y'` on the module at
    `module_path` (input x, output y) and leaving every other call alone."""

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name != "__call__" or "/".join(context.module.path) != module_path:
            return next_fun(*args, **kwargs)
        y = next_fun(*args, **kwargs)
        return on_call(args[0], y)

    return interceptor


def _forward_at(apply, module_path, params, batch, idx, delta):
    """Logits with `delta[b]` added to the module's output at (b, idx[b]); also the module's
    input and (unshifted) output at those positions: (logits, k [B, in], o [B, out])."""
    seen = {}

    def on_call(x, y):
        rows = jnp.arange(x.shape[0])
        seen["k"], seen["o"] = x[rows, idx], y[rows, idx]
        if delta is None:
            return y
        hot = jax.nn.one_hot(idx, y.shape[1], dtype=y.dtype)
        return y + hot[:, :, None] * delta[:, None, :].astype(y.dtype)

    with nn.intercept_methods(_interceptor(module_path, on_call)):
        logits = apply(params, batch)
    if "k" not in seen:
        raise KeyError(f"module {module_path!r} was never called by the model; check the weight path")
    return logits, seen["k"].astype(jnp.float32), seen["o"].astype(jnp.float32)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _keys_values(apply, module_path, params, batch, idx):
    _, k, o = _forward_at(apply, module_path, params, batch, idx, None)
    return k, o


@functools.partial(jax.jit, static_argnums=(0, 1))
def _moments(apply, module_paths, params, batch):
    """x^T x of the inputs x [tokens, in] of each module in `module_paths` (padding masked out), from
    one forward pass: ({module path: [in, in] float32}, token count)."""
    seen = {}

    def interceptor(next_fun, args, kwargs, context):
        y = next_fun(*args, **kwargs)
        path = "/".join(context.module.path)
        if context.method_name == "__call__" and path in module_paths:
            seen[path] = args[0]
        return y

    with nn.intercept_methods(interceptor):
        apply(params, batch)
    missing = [m for m in module_paths if m not in seen]
    if missing:
        raise KeyError(f"modules {missing} were never called by the model; check the weight paths")
    mask = batch["attention_mask"][..., None].astype(jnp.float32)
    out = {}
    for m in module_paths:
        x = (seen[m].astype(jnp.float32) * mask).reshape(-1, seen[m].shape[-1])
        out[m] = x.T @ x
    return out, batch["attention_mask"].sum()


# --------------------------------------------------------------------------- the three statistics


def key_covariance(
    model,
    params: Any,
    weight: Weight | str,
    texts: Sequence[str],
    *,
    window: int = 128,
    batch_size: int = 8,
    max_tokens: int | None = None,
    progress: bool = True,
) -> jax.Array:
    """C = E[k k^T] (uncentered, ROME's "mom2") of the input of `weight`'s module over every
    token of `texts`, cut into disjoint windows of `window` tokens: [in, in] float32.
    `weight` may be a layer name. `max_tokens` caps the number of tokens used."""
    weight = rome_weight(model, weight)
    return key_covariances(model, params, [weight], texts, window=window, batch_size=batch_size, max_tokens=max_tokens,
                           progress=progress)[weight.path]


def key_covariances(
    model,
    params: Any,
    weights: Sequence[Weight],
    texts: Sequence[str],
    *,
    window: int = 128,
    batch_size: int = 8,
    max_tokens: int | None = None,
    progress: bool = True,
) -> dict[str, jax.Array]:
    """`key_covariance` of several weights from one pass over the texts (the forward pass, not the
    x^T x, is the cost: a MEND editor's three MLP kernels cost one pass instead of three):
    {weight path: C [in, in] float32}, each equal to `key_covariance(model, params, w, texts, ...)`
    (the same windows, tokens and float32 sums)."""
    weights = [rome_weight(model, w) for w in weights]
    _check_no_remat(model)
    window = min(window, model.max_length)
    toks = tokenize_texts(model, texts, where="key_covariance texts")
    if max_tokens is not None:
        kept, n = [], 0
        for t in toks:
            if n >= max_tokens:
                break
            kept.append(t[: max_tokens - n])
            n += len(kept[-1])
        toks = kept
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    wins = token_windows(toks, window, window, pad)
    n_win = wins["input_ids"].shape[0]
    if n_win == 0:
        raise ValueError("key_covariance: no text has 2 or more tokens")
    modules = tuple(dict.fromkeys(w.module_path for w in weights))
    total, count = None, 0
    for start in tqdm(range(0, n_win, batch_size), desc="key statistics", disable=not progress):
        batch = pad_rows(slice_rows(wins, start, start + batch_size), batch_size)
        s, c = _moments(model.apply, modules, params, batch)
        total = s if total is None else {m: total[m] + s[m] for m in modules}
        count += int(c)
    return {w.path: total[w.module_path] / count for w in weights}


def compute_key(model, params: Any, weight: Weight, prompt: str, subject: str, prefixes: Sequence[str] = ("",)):
    """k*: the input of `weight`'s module at the subject's last token, averaged over the prompt
    preceded by each prefix: ([in] float32, lookup index in the bare prompt)."""
    texts = [_join(p, prompt) for p in prefixes]
    if not texts:
        raise ValueError("compute_key: need at least one prefix ('' = the prompt alone)")
    idx = np.asarray(
        [subject_last_index(model.tokenizer, t, subject, start=len(t) - len(prompt)) for t in texts], np.int32
    )
    # padded to a length bucket (right padding leaves a causal model's earlier positions alone),
    # so `_keys_values` compiles once per bucket, not once per prompt length
    n = max(len(model.tokenizer(t, add_special_tokens=True)["input_ids"]) for t in texts)
    batch = _text_batch(model, texts, length=bucket_length(n, model.max_length))
    k, _ = _keys_values(model.apply, weight.module_path, params, batch, idx)
    bare = subject_last_index(model.tokenizer, prompt, subject)
    return k.mean(0), bare


def _text_batch(model, texts: Sequence[str], length: int | None = None) -> dict[str, np.ndarray]:
    """input_ids / attention_mask of texts (with special tokens), right padded; labels unused."""
    ids = [list(model.tokenizer(t, add_special_tokens=True)["input_ids"]) for t in texts]
    L = length or max(map(len, ids))
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    out = np.full((len(ids), L), pad, np.int32)
    mask = np.zeros((len(ids), L), np.int32)
    for i, r in enumerate(ids):
        out[i, : len(r)], mask[i, : len(r)] = r, 1
    zeros = np.zeros_like(out)
    return dict(input_ids=out, attention_mask=mask, labels=zeros, label_mask=zeros)


@functools.lru_cache(maxsize=32)
def _make_v_step(apply, module_path: str, lr: float, kl_factor: float, weight_decay: float, clamp: float):
    opt = optax.adam(lr)

    def loss_fn(delta, params, batch, idx, n_rw, kl_init, o_norm):
        B = batch["input_ids"].shape[0]
        d = jnp.broadcast_to(delta, (B, delta.shape[0]))
        # the head only at `score_pos` (`_value_batch`): the rewriting rows' target tokens, and the
        # KL row's subject token at slot 0 - the same numbers as full logits, ~20% less work
        logits, labels, mask = scored_logits(lambda p, b: _forward_at(apply, module_path, p, b, idx, d)[0], params, batch)
        return _v_objective(logits, labels, mask, n_rw, kl_init, delta, o_norm, kl_factor, weight_decay)

    return (opt, *_jitted_v_fns(opt, loss_fn, clamp))


def _v_objective(logits, labels, mask, n_rw: int, kl_init, delta, o_norm, kl_factor: float, weight_decay: float):
    """ROME's v* loss from the scored logits [B, K, V], labels / mask [B, K] (row n_rw: the KL row,
    its subject token at slot 0): the rewriting rows' mean NLL + kl_factor * KL(new || init) + the
    weight decay on |delta| / |o|^2."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
    tok_lp = jnp.take_along_axis(logp, labels[..., None], -1)[..., 0]
    mask = mask.astype(jnp.float32)
    nll = -(tok_lp * mask).sum() / jnp.maximum(mask.sum(), 1.0)
    kl_new = logp[n_rw, 0]
    kl = jnp.sum(jnp.exp(kl_new) * (kl_new - kl_init))  # KL(new || init), as ROME's kl_div(init, new)
    # |delta| with a zero gradient at delta = 0 (jnp.linalg.norm's is NaN there, where Adam starts)
    wd = weight_decay * jnp.sqrt(jnp.maximum(jnp.sum(delta * delta), 1e-30)) / o_norm**2
    return nll + kl_factor * kl + wd


def _jitted_v_fns(opt, loss_fn: Callable, clamp: float):
    """(step, loss_only) of a v* loss `loss_fn(delta, params, a, b, n_rw, kl_init, o_norm)` (a, b: the
    path's batch and positions, or cache and windows): one Adam step with the norm clamp at clamp *
    o_norm, and the loss alone; n_rw static."""

    @functools.partial(jax.jit, static_argnums=(5,))
    def step(delta, opt_state, params, a, b, n_rw, kl_init, o_norm):
        loss, g = jax.value_and_grad(loss_fn)(delta, params, a, b, n_rw, kl_init, o_norm)
        upd, opt_state = opt.update(g, opt_state, delta)
        new = optax.apply_updates(delta, upd)
        norm, cap = jnp.linalg.norm(new), clamp * o_norm
        new = jnp.where(norm > cap, new * cap / jnp.maximum(norm, 1e-12), new)
        return new, opt_state, loss

    @functools.partial(jax.jit, static_argnums=(4,))
    def loss_only(delta, params, a, b, n_rw, kl_init, o_norm):
        return loss_fn(delta, params, a, b, n_rw, kl_init, o_norm)

    return step, loss_only


CLAMP_NORMS = ("output", "residual")


def owning_block(model, module_path: str) -> str:
    """Module path of the block (`model.layers.blocks`) that contains the module at `module_path`."""
    for b in model.layers.blocks:
        if module_path.startswith(b.module_path + "/"):
            return b.module_path
    raise ValueError(f"module {module_path!r} lies in no block of {model.name!r}; clamp_norm='residual' needs one")


@functools.partial(jax.jit, static_argnums=(0, 1))
def block_output_at(apply, block_path, params, batch, idx):
    """The output of block `block_path` at (b, idx[b]) of every row: [B, H] float32 (its first
    element when the block returns a tuple)."""
    seen = {}

    def icpt(next_fun, args, kwargs, ctx):
        out = next_fun(*args, **kwargs)
        if ctx.method_name == "__call__" and "/".join(ctx.module.path) == block_path and "h" not in seen:
            seen["h"] = out[0] if isinstance(out, (tuple, list)) else out
        return out

    with nn.intercept_methods(icpt):
        apply(params, batch)
    if "h" not in seen:
        raise KeyError(f"block module {block_path!r} was never called; check the layer table")
    h = seen["h"]
    return h[jnp.arange(h.shape[0]), idx].astype(jnp.float32)


def reference_norm(model, params: Any, weight: Weight, batch: dict, idx, o: jax.Array, config: ROMEConfig) -> jax.Array:
    """The norm v*'s weight decay and clamp are relative to (`config.clamp_norm`): |o| ("output"), or
    |h0| ("residual"), h0 = the owning block's output at idx[0] of batch row 0 (the first prefixed prompt,
    the row o comes from; with the bare prompt first, MEMIT's / AlphaEdit's `target_init`). Scalar."""
    if config.clamp_norm == "output":
        return jnp.linalg.norm(o)
    if config.clamp_norm == "residual":
        h = block_output_at(model.apply, owning_block(model, weight.module_path), params, batch, np.asarray(idx, np.int32))
        return jnp.linalg.norm(h[0])
    raise ValueError(f"ROMEConfig.clamp_norm {config.clamp_norm!r}: choose from {', '.join(CLAMP_NORMS)}")


MIN_SCORED = 8  # the fewest scored positions per row in the v* batch (a static shape)


def _with_value_positions(batch: dict, kl_idx: int, n_rw: int) -> dict:
    """`batch` with `score_pos` [B, K]: each rewriting row's target positions first (as
    `with_score_positions`), and in the KL row (index n_rw, no labels) its subject token at slot 0."""
    need = int(np.asarray(batch["label_mask"]).sum(-1).max())
    # K at least 8: targets of 1 to 8 tokens share one compiled step per length bucket
    out = with_score_positions(batch, k=max(MIN_SCORED, 1 << max(need - 1, 0).bit_length()))
    if SCORE_POS not in out:  # K would not be smaller than S: positions 0..S-1 in order
        S = batch["input_ids"].shape[1]
        out = {**out, SCORE_POS: np.tile(np.arange(S, dtype=np.int32), (batch["input_ids"].shape[0], 1))}
    pos = np.array(out[SCORE_POS])
    pos[n_rw, 0] = kl_idx
    return {**out, SCORE_POS: pos}


@functools.partial(jax.jit, static_argnums=(0, 1))
def _kl_init(apply, module_path, params, batch, idx):
    logits, _, o = _forward_at(apply, module_path, params, batch, idx, None)
    return jax.nn.log_softmax(logits.astype(jnp.float32), -1)[jnp.arange(idx.shape[0]), idx], o


def _value_batch(model, prompt: str, subject: str, target_new: str, config: ROMEConfig):
    """The v* batch: one row per prefixed prompt + target_new (labels on the target), then the KL
    row `config.kl_prompt` (no labels), one bucketed length: (batch, idx [n_rw + 1] = each row's
    subject-last-token position, n_rw)."""
    texts = [_join(p, prompt) for p in config.prefixes]
    n_rw = len(texts)
    kl_text = config.kl_prompt.format(subject)
    rw = encode(model, texts, [target_new] * n_rw, where="ROME rewriting prompts")
    kl_len = len(model.tokenizer(kl_text, add_special_tokens=True)["input_ids"])
    if kl_len > rw["input_ids"].shape[1]:  # one length for both: re-encode to the KL prompt's bucket
        rw = encode(model, texts, [target_new] * n_rw, length=bucket_length(kl_len, model.max_length),
                    where="ROME rewriting prompts")
    kl = _text_batch(model, [kl_text], length=rw["input_ids"].shape[1])
    batch = {k: np.concatenate([rw[k], kl[k]]) for k in ("input_ids", "attention_mask", "labels", "label_mask")}
    idx = np.asarray(
        [subject_last_index(model.tokenizer, t, subject, start=len(t) - len(prompt)) for t in texts]
        + [subject_last_index(model.tokenizer, kl_text, subject)],
        np.int32,
    )
    return batch, idx, n_rw


def _start_at_edited_block(model, params: Any, module_path: str, batch: dict) -> tuple[Callable, dict, int]:
    """(apply, batch, first block run) for v*'s steps: `apply` skips every block called before the
    block that owns `module_path` and `batch` carries their output (`BLOCK_INPUT`, the base hidden
    state entering the edited block, [B, S, H], from one forward pass of `params`). v*'s delta is
    added inside the edited block, so nothing below it changes over the steps and the loss and its
    gradient are the full model's. Falls back to (model.apply, batch, 0) when the model is not a
    decoder-only chain of blocks (`salem_jax.models.from_block.block_chain`) or the module lies in
    no block or in the first."""
    chain, _ = block_chain(model, params, batch)
    start = chain.start(module_path) if chain is not None else None
    if not start:
        return model.apply, batch, 0
    h = block_output(model.apply, chain.last_skipped(start), params, batch)
    return chain.skipping(model.apply, start), {**batch, BLOCK_INPUT: h}, start


def compute_value(
    model,
    params: Any,
    weight: Weight,
    prompt: str,
    subject: str,
    target_new: str,
    config: ROMEConfig = ROMEConfig(),
    progress: bool = True,
) -> tuple[jax.Array, jax.Array, tuple[float, ...]]:
    """v* (see the module docstring): ([out] v*, [out] o = the output it replaces on the first
    prefixed prompt, losses per step). The weight decay and the clamp are relative to
    `reference_norm` (|o|, or the residual's |h0| with `config.clamp_norm="residual"`)."""
    if not target_new:
        raise ValueError(f"ROME needs a non-empty target_new (prompt {prompt!r})")
    if config.clamp_norm not in CLAMP_NORMS:
        raise ValueError(f"ROMEConfig.clamp_norm {config.clamp_norm!r}: choose from {', '.join(CLAMP_NORMS)}")
    batch, idx, n_rw = _value_batch(model, prompt, subject, target_new, config)
    if value_path(model, config) == "window":
        return _compute_value_window(model, params, weight, batch, idx, n_rw, config, progress)
    kl_init_all, o_all = _kl_init(model.apply, weight.module_path, params, batch, idx)
    kl_init, o = kl_init_all[n_rw], o_all[0]
    o_norm = reference_norm(model, params, weight, batch, idx, o, config)  # the name of ROME's case
    batch = _with_value_positions(batch, idx[n_rw], n_rw)
    apply = model.apply
    if config.from_block:
        apply, batch, _ = _start_at_edited_block(model, params, weight.module_path, batch)
    opt, step, loss_only = _make_v_step(
        apply, weight.module_path, float(config.v_lr), float(config.kl_factor), float(config.weight_decay),
        float(config.clamp_norm_factor),
    )
    delta, hist = _adam_loop(opt, lambda d, st: step(d, st, params, batch, idx, n_rw, kl_init, o_norm),
                             lambda d: loss_only(d, params, batch, idx, n_rw, kl_init, o_norm), o, config, progress)
    return o + delta, o, hist


def _adam_loop(opt, step: Callable, loss_only: Callable, o: jax.Array, config: ROMEConfig, progress: bool):
    """ROME's v* loop from delta = 0: at most `config.v_steps` steps `step(delta, opt_state) -> (delta',
    opt_state', loss of delta)`, stopping (and keeping delta) once the loss is below `config.stop_loss`;
    after the last step the final delta's loss (`loss_only(delta)`) is appended: (delta [out], losses)."""
    delta = jnp.zeros_like(o)
    opt_state = opt.init(delta)
    hist: list[float] = []
    for _ in tqdm(range(config.v_steps), desc="ROME v*", disable=not progress):
        new_delta, new_state, loss = step(delta, opt_state)
        hist.append(float(loss))
        if hist[-1] < config.stop_loss:
            break  # loss of the current delta is low enough: keep it, as ROME does
        delta, opt_state = new_delta, new_state
    else:
        hist.append(float(loss_only(delta)))
    return delta, tuple(hist)


# --------------------------------------------------------------------------- v* on live windows
#
# delta enters the edited module's output at each row's subject-last-token position idx[b]; in a
# causal model nothing at an earlier position depends on it, at any layer. So the keys and values
# of the base model (one KV-cached prefill of the whole padded rows) serve every step, and a step
# runs only each row's window [start_b, start_b + W): from idx[b] to the row's last scored position
# (the KL row: idx alone), W one of WINDOW_BUCKETS. On SmolLM2 with 10 prefixes the rows are 32
# tokens and the windows 8: a quarter of the tokens per step. The loss and its gradient are those of
# the whole rows (tests/test_rome.py::test_value_on_live_windows_equals_whole_rows).

WINDOW_BUCKETS = (4, 8, 16, 32, 64, 128)


def value_path(model, config: ROMEConfig) -> str:
    """Which v* path `compute_value` runs: "window" (live windows on a KV cache: `config.window` and
    the model has `kv_decode`), "from_block" (whole rows from the edited block) or "every_block"."""
    if config.window and model.kind == "causal" and getattr(model, "kv_decode", None) is not None:
        return "window"
    return "from_block" if config.from_block else "every_block"


def _window_plan(batch: dict, idx: np.ndarray, n_rw: int) -> dict[str, np.ndarray]:
    """Host side of the window path, from the v* batch with `score_pos` (`_with_value_positions`)
    [B, S] and idx [B]: {input_ids, positions [B, W], start [B] (the window's first position = its
    cache slot), at [B] (idx - start: where delta enters), head_pos [B, K] (the scored positions in
    the window), labels, label_mask [B, K] (at the scored positions), key_mask [B, S]}."""
    mask = np.asarray(batch["label_mask"])
    ids = np.asarray(batch["input_ids"])
    pos = np.asarray(batch[SCORE_POS])
    B, S = ids.shape
    lo = np.asarray(idx, np.int64)
    hi = lo.copy()
    for b in range(n_rw):
        scored = np.nonzero(mask[b])[0]
        if len(scored) == 0 or scored[0] < lo[b]:
            raise ValueError(f"v* row {b}: scored positions {scored.tolist()} must exist and follow the subject's "
                             f"last token {int(lo[b])}")
        hi[b] = scored[-1]
    need = int((hi - lo).max()) + 1
    W = min(next((w for w in WINDOW_BUCKETS if w >= need), S), S)
    start = np.minimum(lo, S - W).astype(np.int32)  # the window fits in the S cache slots
    take = start[:, None] + np.arange(W)[None]
    lab, lmask = np.take_along_axis(np.asarray(batch["labels"]), pos, 1), np.take_along_axis(mask, pos, 1)
    head = pos - start[:, None]
    live = (lmask != 0)
    live[n_rw, 0] = True  # the KL row's subject token
    if ((head < 0) | (head >= W))[live].any():
        raise AssertionError("v* window misses a scored position")  # by construction it cannot
    return {"input_ids": np.take_along_axis(ids, take, 1).astype(np.int32), "positions": take.astype(np.int32),
            "start": start, "at": (lo - start).astype(np.int32), "head_pos": np.clip(head, 0, W - 1).astype(np.int32),
            "labels": lab.astype(np.int32), "label_mask": lmask.astype(np.int32),
            "key_mask": np.asarray(batch["attention_mask"]).astype(np.int32)}


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _window_prefill(decode, module_path: str, block_in: str, W: int, params, input_ids, attention_mask, idx, start):
    """One KV-cached forward of the base model over the whole v* rows [B, S]: (cache, log-probs at
    idx [B, V], the module's input k and output o at idx [B, in] / [B, out], and - when `block_in`
    names the block below the edited one - that block's output on each row's window [B, W, H])."""
    seen = {}

    def icpt(next_fun, args, kwargs, ctx):
        y = next_fun(*args, **kwargs)
        if ctx.method_name == "__call__":
            name = "/".join(ctx.module.path)
            if name == module_path and "k" not in seen:
                rows = jnp.arange(args[0].shape[0])
                seen["k"], seen["o"] = args[0][rows, idx], y[rows, idx]
            elif block_in and name == block_in and "h" not in seen:
                seen["h"] = y
        return y

    B, S = input_ids.shape
    positions = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32)[None], (B, S))
    with nn.intercept_methods(icpt):
        logits, cache = decode(params, None, input_ids, attention_mask, positions, jnp.zeros((B,), jnp.int32),
                               idx[:, None])
    if "k" not in seen:
        raise KeyError(f"module {module_path!r} was never called by the model; check the weight path")
    h = None
    if block_in:
        if not isinstance(seen.get("h"), jax.Array):
            raise ValueError(f"block {block_in!r}: expected one call returning one array")
        take = start[:, None] + jnp.arange(W)[None]
        h = jnp.take_along_axis(seen["h"], take[..., None], axis=1)
    logp = jax.nn.log_softmax(logits[:, 0].astype(jnp.float32), -1)
    return cache, logp, seen["k"].astype(jnp.float32), seen["o"].astype(jnp.float32), h


@functools.lru_cache(maxsize=32)
def _make_window_step(decode, skipped: tuple[str, ...], module_path: str, lr: float, kl_factor: float,
                      weight_decay: float, clamp: float):
    """(opt, step, loss_only) of the window path: the loss of `_make_v_step` on the windows (blocks in
    `skipped` return win[BLOCK_INPUT], the base output of the last of them on the windows)."""
    opt = optax.adam(lr)
    skip = frozenset(skipped)

    def loss_fn(delta, params, cache, win, n_rw, kl_init, o_norm):
        h = win.get(BLOCK_INPUT)

        def icpt(next_fun, args, kwargs, ctx):
            if ctx.method_name == "__call__":
                name = "/".join(ctx.module.path)
                if name in skip:
                    return h
                if name == module_path:
                    y = next_fun(*args, **kwargs)
                    hot = jax.nn.one_hot(win["at"], y.shape[1], dtype=y.dtype)  # [B, W]
                    return y + hot[:, :, None] * delta[None, None, :].astype(y.dtype)
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(icpt):
            logits, _ = decode(params, cache, win["input_ids"], win["key_mask"], win["positions"], win["start"],
                               win["head_pos"])
        return _v_objective(logits, win["labels"], win["label_mask"], n_rw, kl_init, delta, o_norm, kl_factor,
                            weight_decay)

    return (opt, *_jitted_v_fns(opt, loss_fn, clamp))


def _compute_value_window(model, params, weight: Weight, batch: dict, idx: np.ndarray, n_rw: int,
                          config: ROMEConfig, progress: bool):
    """`compute_value` on live windows (see WINDOW_BUCKETS): the same (v*, o, losses)."""
    o_batch = batch
    batch = _with_value_positions(batch, idx[n_rw], n_rw)
    win = _window_plan(batch, idx, n_rw)
    W = win["input_ids"].shape[1]
    skipped, block_in = (), ""
    if config.from_block:
        chain, _ = block_chain(model, params, batch)
        start = chain.start(weight.module_path) if chain is not None else None
        if start:
            skipped, block_in = tuple(chain.order[:start]), chain.last_skipped(start)
    cache, logp, _, o_all, h = _window_prefill(model.kv_decode, weight.module_path, block_in, W, params,
                                               batch["input_ids"], batch["attention_mask"], jnp.asarray(idx),
                                               jnp.asarray(win["start"]))
    kl_init, o = logp[n_rw], o_all[0]
    o_norm = reference_norm(model, params, weight, o_batch, idx, o, config)
    if block_in:
        win = {**win, BLOCK_INPUT: h}
    opt, step, loss_only = _make_window_step(
        model.kv_decode, skipped, weight.module_path, float(config.v_lr), float(config.kl_factor),
        float(config.weight_decay), float(config.clamp_norm_factor),
    )
    delta, hist = _adam_loop(opt, lambda d, st: step(d, st, params, cache, win, n_rw, kl_init, o_norm),
                             lambda d: loss_only(d, params, cache, win, n_rw, kl_init, o_norm), o, config, progress)
    return o + delta, o, hist


# --------------------------------------------------------------------------- the update


def rank_one_update(
    kernel: jax.Array, layout: str, key: jax.Array, value: jax.Array, old_value: jax.Array, c_inv_key: jax.Array
) -> jax.Array:
    """The ROME kernel: W' = W + (value - old_value) u^T / (u^T key) with u = `c_inv_key`
    (old_value = W key + b), returned in the kernel's layout ("out_in": kernel = W [out, in];
    "in_out": kernel = W^T [in, out]) and dtype. Then W' key + b = value."""
    u = c_inv_key.astype(jnp.float32)
    denom = jnp.dot(u, key.astype(jnp.float32))
    dw = jnp.outer(value.astype(jnp.float32) - old_value.astype(jnp.float32), u) / denom  # [out, in]
    if layout == "out_in":
        return (kernel.astype(jnp.float32) + dw).astype(kernel.dtype)
    if layout == "in_out":
        return (kernel.astype(jnp.float32) + dw.T).astype(kernel.dtype)
    raise ValueError(f"unknown kernel layout {layout!r}")


def _module_output(params: Any, weight: Weight, key: jax.Array) -> jax.Array:
    """W key + b of the module owning `weight` (b = 0 when the module has no bias)."""
    kernel = get_path(params, weight.path).astype(jnp.float32)
    w = kernel if weight.layout == "out_in" else kernel.T  # [out, in]
    out = w @ key.astype(jnp.float32)
    try:
        out = out + get_path(params, weight.module_path + "/bias").astype(jnp.float32)
    except KeyError:
        pass  # no bias (Llama)
    return out


def rome_edit(
    model,
    params: Any,
    layer: str | Weight,
    prompt: str,
    subject: str,
    target_new: str,
    *,
    cov: jax.Array | None = None,
    config: ROMEConfig = ROMEConfig(),
    progress: bool = True,
) -> ROMEResult:
    """Insert "prompt -> target_new" with ROME's rank-one update of `layer`'s MLP output
    projection (a layer name such as "h.5" from causal tracing, or a `Weight`).

    `prompt` contains `subject` (e.g. "The mother tongue of Danielle Darrieux is", subject
    "Danielle Darrieux"); `cov` comes from `key_covariance` (None: identity). Returns a
    `ROMEResult` whose `params` differ from `params` in that one kernel only.
    """
    if model.kind != "causal":
        raise ValueError(f"ROME edits causal LMs; {model.name!r} is {model.kind!r}")
    weight = rome_weight(model, layer)
    _check_no_remat(model)
    kernel = get_path(params, weight.path)
    fan_in, fan_out = weight.in_out_shape(kernel.shape)
    key, bare_idx = compute_key(model, params, weight, prompt, subject, config.prefixes)
    if key.shape != (fan_in,):
        raise ValueError(f"{weight.path}: key has shape {key.shape}, kernel expects {fan_in} inputs (wrong layout?)")
    value, _, hist = compute_value(model, params, weight, prompt, subject, target_new, config, progress)
    old = _module_output(params, weight, key)
    if value.shape != (fan_out,):
        raise ValueError(f"{weight.path}: value has shape {value.shape}, kernel has {fan_out} outputs")
    if cov is None:
        u = key
    else:
        if cov.shape != (fan_in, fan_in):
            raise ValueError(f"cov has shape {cov.shape}; {weight.path} needs ({fan_in}, {fan_in})")
        c = cov.astype(jnp.float32)
        lam = config.ridge * jnp.trace(c) / fan_in
        u = jnp.linalg.solve(c + lam * jnp.eye(fan_in, dtype=jnp.float32), key)
    new_kernel = rank_one_update(kernel, weight.layout, key, value, old, u)
    return ROMEResult(
        params=set_path(params, weight.path, new_kernel),
        weight=weight,
        key=key,
        value=value,
        old_value=old,
        lookup_index=bare_idx,
        losses=hist,
    )
