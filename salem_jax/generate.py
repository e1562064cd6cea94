"""Greedy decoding for any LoadedModel, jitted with static shapes.

Two loops, the same tokens (tests/test_kv_cache.py):

* **KV-cached** (`_cached_causal_loop`), chosen automatically for the decoder-only models that
  declare it (`LoadedModel.supports_kv_cache`: our Llama - SmolLM2 -, GPT-2 and GPT-Neo): one
  prefill over the prompts' columns of the right-padded buffer (the longest prompt rounded up
  to 8, not the whole buffer) fills every attention layer's cache of keys and values
  (`[B, L, kv heads, head_dim]` per layer, zero-padded to L = the buffer's bucket length; a flax
  "cache" collection, `salem_jax.models.blocks.cached_kv`) and gives each row's first token; each later
  step runs the model on one token per row - the token the row wrote last, at its own slot and
  position (RoPE for Llama, learned positions for GPT-2 / GPT-Neo) - attending to that row's
  filled slots only. A step costs one token's forward pass instead of the whole buffer's.
* **uncached** (`_causal_loop`, the reference and the path for every other model): every step
  re-runs the model on the whole buffer and reads the logits at each row's own last position
  (the vocabulary head runs at that position only, `salem_jax.scored_logits`). It needs nothing
  from the model beyond `apply(params, batch)`, so it also serves the encoder-decoders
  (`_seq2seq_loop`). `greedy_ids(..., kv_cache=False)` forces it.

Both take the parameters as an argument (edited weights work as they are) and run the model's
own submodules, so `flax.linen.intercept_methods` sees every call (an edit applied on the fly
works on both paths; in a cached step the intercepted inputs are `[B, 1, ...]`). The jitted loops
are keyed by the model's functions, not by the interceptors active: an interceptor must be active
when a model's loop is first traced (use a fresh LoadedModel for intercepted generation).

Shapes are static: prompts are right padded into a buffer whose length is a bucket
(`salem_jax.data.tokenize.bucket_length`) of prompt + new tokens, and the number of rows is
padded to a power of two, so each loop compiles once per (model, rows, length) bucket; the number
of new tokens and the end tokens are traced values and never cause a recompile. The cached loop
holds two copies of the model (prefill [B, L] and step [B, 1]), so its first call compiles about
twice as long as the uncached loop's (README, "Speed").

* causal models: row b appends its next token at its own position `pos[b]` (its prompt length
  plus the tokens generated so far) and attends only to its filled positions;
* seq2seq models: the encoder reads the prompt; the decoder buffer starts with the decoder
  start token and every row appends at the same position.

A row stops when it emits an end token (`stop_at_eos`); the loop ends when every row stopped or
`max_new_tokens` were generated.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from salem_jax.data.tokenize import bucket_length
from salem_jax.scored_logits import SCORE_POS, scored_logits


def _row_bucket(n: int, batch_size: int) -> int:
    b = 1
    while b < n:
        b *= 2
    return min(b, batch_size)


PREFILL_MULTIPLE = 8


def _prefill_length(longest_prompt: int, L: int) -> int:
    """The cached loop's prefill length: the longest prompt rounded up to a multiple of
    PREFILL_MULTIPLE (few distinct compiles), at most the buffer length L."""
    return min(L, -(-longest_prompt // PREFILL_MULTIPLE) * PREFILL_MULTIPLE)


def _eos_ids(model, eos_token_id) -> tuple[int, ...]:
    if eos_token_id is None:
        eos_token_id = getattr(model.tokenizer, "eos_token_id", None)
        if eos_token_id is None:
            eos_token_id = getattr(model.config, "eos_token_id", None)
    if eos_token_id is None:
        return ()
    if isinstance(eos_token_id, (int, np.integer)):
        return (int(eos_token_id),)
    return tuple(int(i) for i in eos_token_id)


def _eos_array(eos: tuple[int, ...]) -> np.ndarray:
    # A traced argument (not static), so stopping or not and the end-token ids never cause a
    # recompile; -1 matches no token.
    return np.asarray(eos or (-1,), np.int32)


def _stopped(tokens: jax.Array, eos: jax.Array) -> jax.Array:
    return jnp.any(tokens[:, None] == eos[None, :].astype(tokens.dtype), axis=-1)


@functools.partial(jax.jit, static_argnames=("apply",))
def _causal_loop(apply, params, ids, mask, pos, done, steps, eos):
    """ids/mask [B, L] right padded, pos [B] = next write position, done [B], steps: scalar,
    eos [E] end-token ids. Returns (ids, pos): row b's new tokens are
    ids[b, prompt_len[b] : pos[b]]."""
    zeros = jnp.zeros_like(ids)

    def cond(state):
        i, _, _, _, done = state
        return (i < steps) & ~jnp.all(done)

    def body(state):
        i, ids, mask, pos, done = state
        # the head at each row's own last filled position only ([B, 1, V], salem_jax.scored_logits)
        batch = {"input_ids": ids, "attention_mask": mask, "labels": zeros, "label_mask": zeros,
                 SCORE_POS: (pos - 1)[:, None]}
        last = scored_logits(apply, params, batch)[0][:, 0]
        ids, mask, pos, done = _append(ids, mask, pos, done, jnp.argmax(last, axis=-1), eos)
        return i + 1, ids, mask, pos, done

    _, ids, _, pos, _ = jax.lax.while_loop(cond, body, (jnp.int32(0), ids, mask, pos, done))
    return ids, pos


def _append(ids, mask, pos, done, nxt, eos):
    """Row b writes nxt[b] at pos[b] unless it is done; returns the new (ids, mask, pos, done)."""
    rows = jnp.arange(ids.shape[0])
    nxt = nxt.astype(ids.dtype)
    write = ~done
    ids = ids.at[rows, pos].set(jnp.where(write, nxt, ids[rows, pos]))
    mask = mask.at[rows, pos].set(jnp.where(write, 1, mask[rows, pos]))
    pos = pos + write.astype(pos.dtype)
    done = done | (write & _stopped(nxt, eos))
    return ids, mask, pos, done


@functools.partial(jax.jit, static_argnames=("decode", "prefill"))
def _cached_causal_loop(decode, params, ids, mask, pos, done, steps, eos, prefill=None):
    """`_causal_loop` with a KV cache (`LoadedModel.kv_decode`); same arguments and results.

    One prefill over the first `prefill` = P columns of the right-padded buffer (P >= every row's
    prompt length, static; None: the whole buffer, P = L) fills every layer's cache (keys and
    values [B, P, kv heads, D], then zero-padded to [B, L, ...]; slots past a row's prompt hold
    padding until that row writes there, masked until then) and gives each row's first token from
    the logits at pos[b] - 1. The prefill is the loop's dominant cost (B x P tokens through the
    whole model against B tokens per step), so P is the longest prompt rounded up
    (`_prefill_length`), not the buffer's bucket of prompt + new tokens. Then each step runs
    the model on one token per row: the token a row wrote last, at slot (and RoPE / learned
    position) pos[b] - 1, attending to its filled slots; done rows recompute their last slot
    with the same values and write nothing. Static shapes throughout: the loop carries the
    cache, so it compiles once per (model, rows, length)."""
    logits, cache = _prefill(decode, params, ids, mask, pos, prefill)
    return _cached_steps(decode, params, ids, mask, pos, done, steps, eos, logits, cache)


def _prefill(decode, params, ids, mask, pos, prefill=None):
    """`_cached_causal_loop`'s prefill: (logits at each row's last prompt position [B, V], the
    cache of every layer zero-padded to the buffer length L). Traced inside the jitted loops."""
    B, L = ids.shape
    P = L if prefill is None else prefill
    if not 0 < P <= L:
        raise ValueError(f"prefill length {P} outside 1..{L} (the buffer length)")
    positions = jnp.broadcast_to(jnp.arange(P, dtype=pos.dtype)[None], (B, P))
    logits, cache = decode(params, None, ids[:, :P], mask[:, :P], positions, jnp.zeros((B,), pos.dtype),
                           (pos - 1)[:, None])
    if P < L:  # every cache leaf is [B, P, heads, D] (salem_jax.models.blocks.cached_kv): slots P.. empty
        cache = jax.tree_util.tree_map(lambda c: jnp.pad(c, [(0, 0), (0, L - P)] + [(0, 0)] * (c.ndim - 2)), cache)
    return logits[:, 0], cache


def _cached_steps(decode, params, ids, mask, pos, done, steps, eos, first, cache):
    """`_cached_causal_loop` after its prefill: each row appends `first` ([B, V] logits: their argmax)
    and then one token per step, on the KV cache `cache` (every layer, [B, L, ...] leaves)."""
    rows = jnp.arange(ids.shape[0])
    zeros = jnp.zeros((ids.shape[0],), pos.dtype)
    ids, mask, pos, done = _append(ids, mask, pos, done, jnp.argmax(first, axis=-1), eos)

    def cond(state):
        i, _, _, _, done, _ = state
        return (i < steps) & ~jnp.all(done)

    def body(state):
        i, ids, mask, pos, done, cache = state
        last = pos - 1
        logits, cache = decode(params, cache, ids[rows, last][:, None], mask, last[:, None], last, zeros[:, None])
        ids, mask, pos, done = _append(ids, mask, pos, done, jnp.argmax(logits[:, 0], axis=-1), eos)
        return i + 1, ids, mask, pos, done, cache

    _, ids, _, pos, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), ids, mask, pos, done, cache))
    return ids, pos


@functools.partial(jax.jit, static_argnames=("apply",))
def _seq2seq_loop(apply, params, src, src_mask, dec, done, steps, eos):
    """src/src_mask [B, L]; dec [B, S] holding the start token at 0; steps, eos as in
    `_causal_loop`. Returns (dec, n_new [B])."""
    zeros = jnp.zeros_like(dec)
    n_new = jnp.zeros(dec.shape[0], jnp.int32)

    def cond(state):
        i, _, done, _ = state
        return (i < steps) & ~jnp.all(done)

    def body(state):
        i, dec, done, n_new = state
        dec_mask = (jnp.arange(dec.shape[1])[None] <= i).astype(dec.dtype) * jnp.ones_like(dec)
        batch = {
            "input_ids": src,
            "attention_mask": src_mask,
            "decoder_input_ids": dec,
            "decoder_attention_mask": dec_mask,
            "labels": zeros,
            "label_mask": zeros,
        }
        logits = apply(params, batch)  # [B, S, V]
        nxt = jnp.argmax(logits[:, i], axis=-1).astype(dec.dtype)
        write = ~done
        dec = dec.at[:, i + 1].set(jnp.where(write, nxt, dec[:, i + 1]))
        n_new = n_new + write.astype(jnp.int32)
        done = done | (write & _stopped(nxt, eos))
        return i + 1, dec, done, n_new

    _, dec, _, n_new = jax.lax.while_loop(cond, body, (jnp.int32(0), dec, done, n_new))
    return dec, n_new


def _encode_prompts(tok, prompts: Sequence[str]) -> list[list[int]]:
    out = []
    for i, p in enumerate(prompts):
        ids = list(tok(p, add_special_tokens=True)["input_ids"])
        if not ids:
            raise ValueError(f"prompt {i} ({p!r}) tokenizes to nothing")
        out.append(ids)
    return out


def greedy_ids(
    model,
    params,
    prompts: Sequence[str],
    max_new_tokens: int = 8,
    stop_at_eos: bool = True,
    *,
    batch_size: int = 32,
    eos_token_id: int | Sequence[int] | None = None,
    kv_cache: bool | None = None,
) -> list[list[int]]:
    """Greedy continuations as token ids, one list per prompt (without the prompt). With
    `stop_at_eos` a row ends at its first end token, which is included as the list's last id.

    kv_cache: None (default) decodes with a KV cache when the model supports one
    (`model.supports_kv_cache`: our Llama, GPT-2, GPT-Neo) and re-runs the whole buffer every
    step otherwise; False always re-runs the buffer (the reference path); True requires the cache.

    `model` is a LoadedModel of kind "causal" or "seq2seq"; prompts are tokenized with the
    model's tokenizer and its special tokens (as `salem_jax.data.tokenize.encode` does). The end
    token is `eos_token_id` if given, else the tokenizer's (else the config's)."""
    if model.kind not in ("causal", "seq2seq"):
        raise ValueError(f"greedy decoding needs a causal or seq2seq model; {model.name!r} is a {model.kind}")
    if model.tokenizer is None:
        raise ValueError(f"model {model.name!r} has no tokenizer")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if kv_cache and not (model.kind == "causal" and model.supports_kv_cache):
        raise ValueError(
            f"kv_cache=True: model {model.name!r} ({model.arch}, {model.kind}) has no KV-cached decoding "
            "(LoadedModel.kv_decode); pass kv_cache=None to fall back to the uncached loop"
        )
    if not prompts:
        return []
    use_cache = model.kind == "causal" and model.supports_kv_cache and kv_cache is not False
    tok = model.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    eos = _eos_ids(model, eos_token_id) if stop_at_eos else ()
    encoded = _encode_prompts(tok, prompts)
    out: list[list[int]] = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        B = _row_bucket(len(chunk), batch_size)
        if model.kind == "causal":
            out += _greedy_causal(model, params, chunk, B, pad, max_new_tokens, eos, use_cache)
        else:
            out += _greedy_seq2seq(model, params, chunk, B, pad, max_new_tokens, eos)
    return out


def _greedy_causal(model, params, rows, B, pad, steps, eos, use_cache=False):
    longest = max(map(len, rows))
    if longest + steps > model.max_length:
        raise ValueError(
            f"a prompt of {longest} tokens + {steps} new tokens exceeds the model's context ({model.max_length})"
        )
    L = bucket_length(longest + steps, model.max_length)
    ids = np.full((B, L), pad, np.int32)
    mask = np.zeros((B, L), np.int32)
    lens = np.ones(B, np.int32)  # padding rows: one dummy token, already done
    for b, r in enumerate(rows):
        ids[b, : len(r)] = r
        mask[b, : len(r)] = 1
        lens[b] = len(r)
    mask[len(rows) :, 0] = 1
    done = np.arange(B) >= len(rows)
    if use_cache:
        ids_out, pos = _cached_causal_loop(model.kv_decode, params, ids, mask, lens, done, np.int32(steps),
                                           _eos_array(eos), prefill=_prefill_length(longest, L))
    else:
        ids_out, pos = _causal_loop(model.apply, params, ids, mask, lens, done, np.int32(steps), _eos_array(eos))
    ids_out, pos = np.asarray(ids_out), np.asarray(pos)
    return [ids_out[b, lens[b] : pos[b]].tolist() for b in range(len(rows))]


def _with_leaves(params, paths: tuple[str, ...], leaves) -> dict:
    """`params` with the leaves at `paths` replaced by `leaves` (a sequence in the same order)."""
    from salem_jax.models.base import set_path

    for p, v in zip(paths, leaves):
        params = set_path(params, p, v)
    return params


@functools.partial(jax.jit, static_argnames=("fn", "paths", "cached", "prefill"))
def _many_loop(fn, paths, cached, params, leaves, ids, mask, pos, done, steps, eos, prefill=None):
    """`_cached_causal_loop` (cached) or `_causal_loop` for E models at once: model e is `params`
    with the leaves at `paths` replaced by leaves[k][e] ([E, ...] each); ids/mask [E, B, L], pos /
    done [E, B], steps [E] (each model its own number of new tokens). vmap over the models: the
    weights every model shares (all but `paths`) are read once per step for E x B rows, which is
    the point (a one-token step of a 135M model is bound by reading its weights, README "Speed").
    A model's loop stops contributing once its rows are done (vmap of `lax.while_loop` keeps
    finished members' state)."""
    def one(lv, ids, mask, pos, done, steps):
        p = _with_leaves(params, paths, lv)
        if cached:
            return _cached_causal_loop(fn, p, ids, mask, pos, done, steps, eos, prefill=prefill)
        return _causal_loop(fn, p, ids, mask, pos, done, steps, eos)

    return jax.vmap(one)(leaves, ids, mask, pos, done, steps)


def greedy_ids_many(model, params, paths: Sequence[str], leaves: Sequence, prompts: Sequence[Sequence[str]],
                    max_new_tokens: Sequence[int], stop_at_eos: bool = True, *, batch_size: int = 32,
                    models_per_call: int = 32, eos_token_id: int | Sequence[int] | None = None,
                    kv_cache: bool | None = None) -> list[list[list[int]]]:
    """`greedy_ids` of E models that differ from `params` only in the leaves at `paths` (model e:
    leaves[k][e] at paths[k], each [E, ...]), model e on its own prompts[e] with its own
    max_new_tokens[e], in few calls: per call up to `models_per_call` models x B rows
    (the most prompts of a model, up to batch_size) x one buffer length L (the longest prompt +
    new tokens of any model), so the call compiles once per (models_per_call, B, L); a model with
    more than batch_size prompts takes several slots. Returns per model a list per prompt, the ids
    `greedy_ids(model, params_e, prompts[e], max_new_tokens[e])` gives (the same tokens: rows are
    independent, padding rows and slots count nowhere; tests/test_generate_many.py).

    Causal LMs only (the pipeline's per-edit generations after each edit: one call instead of
    one per edit)."""
    if model.kind != "causal":
        raise ValueError(f"greedy_ids_many: causal models only; {model.name!r} is a {model.kind}")
    if model.tokenizer is None:
        raise ValueError(f"model {model.name!r} has no tokenizer")
    paths = tuple(paths)
    if len(leaves) != len(paths):
        raise ValueError(f"greedy_ids_many: {len(leaves)} leaf stacks for {len(paths)} paths")
    n_models = len(prompts)
    if len(max_new_tokens) != n_models or any(int(np.shape(v)[0]) != n_models for v in leaves):
        raise ValueError(f"greedy_ids_many: {n_models} prompt lists, {len(max_new_tokens)} max_new_tokens and "
                         f"leaf stacks of {[int(np.shape(v)[0]) for v in leaves]} models: give one per model")
    if any(n < 1 for n in max_new_tokens):
        raise ValueError(f"max_new_tokens must be >= 1, got {list(max_new_tokens)}")
    if kv_cache and not model.supports_kv_cache:
        raise ValueError(f"kv_cache=True: model {model.name!r} ({model.arch}) has no KV-cached decoding")
    use_cache = model.supports_kv_cache and kv_cache is not False
    tok = model.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    eos = _eos_array(_eos_ids(model, eos_token_id) if stop_at_eos else ())
    slots, B, L = _slots(model, prompts, max_new_tokens, batch_size)
    out: list[list[list[int]]] = [[[] for _ in ps] for ps in prompts]
    if not slots:
        return out
    M = min(models_per_call, len(slots))
    fn = model.kv_decode if use_cache else model.apply
    for start in range(0, len(slots), M):
        ids, mask, lens, done, lv, steps, prefill = _call_arrays(slots[start : start + M], M, B, L, pad, leaves,
                                                                 max_new_tokens)
        prefill = prefill if use_cache else None
        ids_out, pos = _many_loop(fn, paths, use_cache, params, lv, ids, mask, lens, done, steps, eos, prefill=prefill)
        _unpack(out, slots[start : start + M], np.asarray(ids_out), np.asarray(pos), lens)
    return out


def _slots(model, prompts: Sequence[Sequence[str]], max_new_tokens: Sequence[int], batch_size: int):
    """(slots, B, L) of `greedy_ids_many`: slots (model, first prompt, encoded prompts) with at most
    batch_size prompts each; B rows per slot - the most prompts of any model, not rounded up to a
    power of two as `greedy_ids` does (there, to share compiles across calls): padding rows cost a
    whole prefill and every step -; L the buffer length (a bucket of the longest prompt + new tokens)."""
    tok = model.tokenizer
    slots = []
    for e, ps in enumerate(prompts):
        enc = _encode_prompts(tok, ps) if len(ps) else []
        for s in range(0, len(enc), batch_size):
            slots.append((e, s, enc[s : s + batch_size]))
    if not slots:
        return slots, 0, 0
    B = min(max(len(c) for _, _, c in slots), batch_size)
    need = max(max(map(len, c)) + int(max_new_tokens[e]) for e, _, c in slots)
    if need > model.max_length:
        raise ValueError(f"a prompt + its new tokens ({need} tokens) exceed the model's context ({model.max_length})")
    return slots, B, bucket_length(need, model.max_length)


def _pack(call, B: int, L: int, pad: int):
    """(ids, mask [M, B, L] right padded, lens, done [M, B]) of the M slots `call`."""
    M = len(call)
    ids = np.full((M, B, L), pad, np.int32)
    mask = np.zeros((M, B, L), np.int32)
    lens = np.ones((M, B), np.int32)  # padding rows: one dummy token, already done
    done = np.ones((M, B), bool)
    for m, (_, _, rows) in enumerate(call):
        for b, r in enumerate(rows):
            ids[m, b, : len(r)] = r
            mask[m, b, : len(r)] = 1
            lens[m, b] = len(r)
            done[m, b] = False
        mask[m, len(rows) :, 0] = 1
    return ids, mask, lens, done


def _call_arrays(call, M: int, B: int, L: int, pad: int, leaves, max_new_tokens):
    """One call's inputs for the M-model loops: `_pack` of the slots `call` (repeated up to M: one
    shape per call, the repeats' results are dropped), each slot's model leaves and new-token
    count, and the cached loop's prefill length."""
    call = call + [call[-1]] * (M - len(call))
    ids, mask, lens, done = _pack(call, B, L, pad)
    which = np.asarray([e for e, _, _ in call])
    lv = tuple(jnp.asarray(v)[which] for v in leaves)
    steps = np.asarray([max_new_tokens[e] for e, _, _ in call], np.int32)
    prefill = _prefill_length(max(max(map(len, rows)) for _, _, rows in call), L)
    return ids, mask, lens, done, lv, steps, prefill


def _unpack(out, slots, ids_out, pos, lens) -> None:
    """Each slot's new tokens (ids_out[m, b, lens[m, b] : pos[m, b]]) into out[model][prompt]."""
    for m, (e, s, rows) in enumerate(slots):
        for b in range(len(rows)):
            out[e][s + b] = ids_out[m, b, lens[m, b] : pos[m, b]].tolist()


def _merge_cache(full, part):
    """`full` (a KV cache tree of every layer) with the leaves `part` has (a cache of some layers,
    the same paths; none when no attention layer ran) replaced by part's."""
    named = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(part)[0]}
    have = {jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(full)[0]}
    if set(named) - have:
        raise ValueError(f"KV cache of the edited blocks {sorted(named)[:4]}... is not part of the whole model's "
                         f"({sorted(have)[:4]}...)")
    return jax.tree_util.tree_map_with_path(lambda k, v: named.get(jax.tree_util.keystr(k), v), full)


@functools.partial(jax.jit, static_argnames=("decode", "paths", "skipped", "prefill"))
def _before_after_loop(decode, paths, skipped, params, leaves, ids, mask, pos, done, steps, eos, prefill):
    """Greedy generation of E prompt sets [E, B, L] by the base model `params` and by E edited
    models (model e: `params` with leaves[k][e] at paths[k]) that change no block in `skipped`
    (module paths, every block before the first one an edit changed, in call order): the
    `_many_loop` (cached) of the 2E models [base x E, edited x E], with the edited models'
    prefill started at the first block they changed.

    The base prefill keeps the output of the last skipped block; each edited model's prefill
    runs from there (`from_block.FromBlock`'s interception: the skipped blocks return it) and its
    KV cache of the skipped blocks is the base prefill's (same weights, same tokens, so the same
    keys and values). Then the 2E models' decoding steps, vmapped as in `_many_loop`. Returns
    (ids [2E, B, L], pos [2E, B]): the base model's E rows first."""
    import flax.linen as nn

    from salem_jax.models.from_block import _name, keeping_block_output

    last, skip_set = skipped[-1], frozenset(skipped)
    E = ids.shape[0]
    base_leaves = tuple(jnp.broadcast_to(v[None], (E,) + v.shape) for v in (get_leaf(params, p) for p in paths))

    def base_prefill(lv, ids, mask, pos):
        with keeping_block_output(last) as kept:
            first, cache = _prefill(decode, _with_leaves(params, paths, lv), ids, mask, pos, prefill)
        if len(kept) != 1:
            raise ValueError(f"block {last!r}: expected one call in the prefill, got {len(kept)}")
        return first, cache, kept[0]

    def edited_prefill(lv, ids, mask, pos, h, base_cache):
        def skip(next_fun, args, kwargs, context):
            if context.method_name == "__call__" and _name(context) in skip_set:
                return h
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(skip):
            first, cache = _prefill(decode, _with_leaves(params, paths, lv), ids, mask, pos, prefill)
        return first, _merge_cache(base_cache, cache)

    first_b, cache_b, h = jax.vmap(base_prefill)(base_leaves, ids, mask, pos)
    first_e, cache_e = jax.vmap(edited_prefill)(leaves, ids, mask, pos, h, cache_b)

    def cat(a, b):
        return jnp.concatenate([a, b])

    def one(lv, ids, mask, pos, done, steps, first, cache):
        return _cached_steps(decode, _with_leaves(params, paths, lv), ids, mask, pos, done, steps, eos, first, cache)

    return jax.vmap(one)(tuple(cat(b, e) for b, e in zip(base_leaves, leaves)), cat(ids, ids), cat(mask, mask),
                         cat(pos, pos), cat(done, done), cat(steps, steps), cat(first_b, first_e),
                         jax.tree_util.tree_map(cat, cache_b, cache_e))


def get_leaf(params, path: str):
    from salem_jax.models.base import get_path

    return get_path(params, path)


def greedy_ids_before_after(model, params, paths: Sequence[str], leaves: Sequence, prompts: Sequence[Sequence[str]],
                            max_new_tokens: Sequence[int], stop_at_eos: bool = True, *, batch_size: int = 32,
                            edits_per_call: int = 32, eos_token_id: int | Sequence[int] | None = None,
                            shared_prefill: bool = True) -> tuple[list[list[list[int]]], list[list[list[int]]]]:
    """(before, after): `greedy_ids_many` of the base model `params` and of E edited models
    (model e: leaves[k][e] at paths[k]) on the same prompts, prompts[e] with max_new_tokens[e]
    new tokens for both the base model and edited model e - what the pipeline's evaluation
    generates before and after each edit - `edits_per_call` edits (2x as many models) per call.

    shared_prefill (KV-cached decoder-only models whose blocks form a chain,
    `from_block.block_chain`): the edited models' prefill starts at the first block any edit
    changed, on the base prefill's output of the block before it, and takes the base prefill's
    keys and values below it (`_before_after_loop`; on SmolLM2 with MEND edits of layers.26, 4 of
    30 blocks of the edited half of the prefill). The same tokens as `greedy_ids_many` of the 2E
    models (tests/test_generate_many.py). Otherwise (False, or a model where no block may be
    skipped, or an edit outside the blocks): that call, [base x E, edited x E]."""
    from salem_jax.models.from_block import block_chain

    paths = tuple(paths)
    E = len(prompts)
    if len(leaves) != len(paths) or any(int(np.shape(v)[0]) != E for v in leaves) or len(max_new_tokens) != E:
        raise ValueError(f"greedy_ids_before_after: {E} prompt lists, {len(max_new_tokens)} max_new_tokens and "
                         f"{len(leaves)} leaf stacks of {[int(np.shape(v)[0]) for v in leaves]} models for "
                         f"{len(paths)} paths: give one per edit and path")
    if any(n < 1 for n in max_new_tokens):
        raise ValueError(f"max_new_tokens must be >= 1, got {list(max_new_tokens)}")
    start = 0
    if shared_prefill and model.kind == "causal" and model.supports_kv_cache and E:
        tok = model.tokenizer
        one = np.asarray([_encode_prompts(tok, [next(p for ps in prompts for p in ps)])[0]], np.int32) \
            if any(len(ps) for ps in prompts) else None
        chain = None
        if one is not None:
            zeros = np.zeros_like(one)
            chain = block_chain(model, params, {"input_ids": one, "attention_mask": np.ones_like(one),
                                                "labels": zeros, "label_mask": zeros})[0]
        if chain is not None:
            at = [chain.start(p) for p in paths]
            # no edit changed a block (identity edits): the last block still runs (its keys and
            # values are the cache's only source in a prefill), with unchanged weights
            start = 0 if any(a is None for a in at) else min(at, default=len(chain.order) - 1)
    if start == 0:
        base = tuple(jnp.broadcast_to(jnp.asarray(get_leaf(params, p))[None], (E,) + np.shape(get_leaf(params, p)))
                     for p in paths)
        both = greedy_ids_many(model, params, paths, tuple(jnp.concatenate([b, jnp.asarray(v)]) for b, v in zip(base, leaves)),
                               list(prompts) * 2, list(max_new_tokens) * 2, stop_at_eos, batch_size=batch_size,
                               models_per_call=2 * edits_per_call, eos_token_id=eos_token_id)
        return both[:E], both[E:]
    skipped = chain.order[:start]
    tok = model.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    eos = _eos_array(_eos_ids(model, eos_token_id) if stop_at_eos else ())
    slots, B, L = _slots(model, prompts, max_new_tokens, batch_size)
    before: list[list[list[int]]] = [[[] for _ in ps] for ps in prompts]
    after: list[list[list[int]]] = [[[] for _ in ps] for ps in prompts]
    if not slots:
        return before, after
    M = min(edits_per_call, len(slots))
    for s0 in range(0, len(slots), M):
        ids, mask, lens, done, lv, steps, prefill = _call_arrays(slots[s0 : s0 + M], M, B, L, pad, leaves,
                                                                 max_new_tokens)
        ids_out, pos = _before_after_loop(model.kv_decode, paths, skipped, params, lv, ids, mask, lens, done, steps,
                                          eos, prefill=prefill)
        ids_out, pos = np.asarray(ids_out), np.asarray(pos)
        _unpack(before, slots[s0 : s0 + M], ids_out[:M], pos[:M], lens)
        _unpack(after, slots[s0 : s0 + M], ids_out[M:], pos[M:], lens)
    return before, after


def greedy_many(model, params, paths: Sequence[str], leaves: Sequence, prompts: Sequence[Sequence[str]],
                max_new_tokens: Sequence[int], **kw) -> list[list[str]]:
    """`greedy_ids_many` as text: per model, per prompt, what `greedy(model, params_e, ...)` gives."""
    new = greedy_ids_many(model, params, paths, leaves, prompts, max_new_tokens, **kw)
    tok = model.tokenizer
    return [[decode_continuation(tok, p, n) for p, n in zip(_encode_prompts(tok, ps), ns)] if ps else []
            for ps, ns in zip(prompts, new)]


def _greedy_seq2seq(model, params, rows, B, pad, steps, eos):
    longest = max(map(len, rows))
    if longest > model.max_length or steps + 1 > model.max_length:
        raise ValueError(f"prompt ({longest}) or answer ({steps} + 1) tokens exceed the context ({model.max_length})")
    L = bucket_length(longest, model.max_length)
    S = bucket_length(steps + 1, model.max_length)
    src = np.full((B, L), pad, np.int32)
    src_mask = np.zeros((B, L), np.int32)
    for b, r in enumerate(rows):
        src[b, : len(r)] = r
        src_mask[b, : len(r)] = 1
    src_mask[len(rows) :, 0] = 1
    start = getattr(model.config, "decoder_start_token_id", None)
    if start is None:
        start = pad
    dec = np.full((B, S), pad, np.int32)
    dec[:, 0] = start
    done = np.arange(B) >= len(rows)
    dec_out, n_new = _seq2seq_loop(model.apply, params, src, src_mask, dec, done, np.int32(steps), _eos_array(eos))
    dec_out, n_new = np.asarray(dec_out), np.asarray(n_new)
    return [dec_out[b, 1 : 1 + n_new[b]].tolist() for b in range(len(rows))]


def decode_continuation(tok, prompt_ids: list[int], new_ids: list[int]) -> str:
    """Text of `new_ids` as it reads after the prompt (keeps the leading space that
    sentencepiece-style tokenizers drop when a continuation is decoded alone)."""
    before = tok.decode(prompt_ids, skip_special_tokens=True)
    full = tok.decode(prompt_ids + new_ids, skip_special_tokens=True)
    if full.startswith(before):
        return full[len(before) :]
    return tok.decode(new_ids, skip_special_tokens=True)


def greedy(
    model,
    params,
    prompts: Sequence[str],
    max_new_tokens: int = 8,
    stop_at_eos: bool = True,
    *,
    batch_size: int = 32,
    eos_token_id: int | Sequence[int] | None = None,
    kv_cache: bool | None = None,
) -> list[str]:
    """Greedy continuations as text, one per prompt (special tokens such as EOS dropped).

    Causal models: the text that follows the prompt, e.g. " Paris." for "The capital of
    France is". Seq2seq models: the decoded answer."""
    new = greedy_ids(
        model, params, prompts, max_new_tokens, stop_at_eos, batch_size=batch_size, eos_token_id=eos_token_id,
        kv_cache=kv_cache,
    )
    tok = model.tokenizer
    if model.kind == "seq2seq":
        return [tok.decode(n, skip_special_tokens=True) for n in new]
    return [decode_continuation(tok, p, n) for p, n in zip(_encode_prompts(tok, prompts), new)]
