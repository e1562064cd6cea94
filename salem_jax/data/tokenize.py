"""Text -> the library's static-shape batch dict (see models/base.py for the convention).

One function, `encode`, serves saliency, editor training and evaluation for all three kinds
of model:

* causal LM: tokens = prompt (with the tokenizer's special tokens) + target (without);
  the loss counts only target tokens: `labels[t] = tokens[t + 1]` where t + 1 is a target
  position, `label_mask[t] = 1` there.
* encoder-decoder: `input_ids` = prompt, `labels` = target + EOS, `decoder_input_ids` =
  decoder start token + labels shifted right.
* classifier: `input_ids` = text (and text pair), `labels[:, 0]` = class index.

Sequence lengths are padded up to a bucket (powers of two from 16, capped at the model's
context) so a jitted function compiles once per bucket, not once per record.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

DEFAULT_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
# The `salem` commands' default limit on prompt + target tokens (`--max-tokens`): far above any
# fact, question or NLI pair of the benchmarks, far below the 8k contexts whose padded batches
# (logits [B, 8192, vocab]) take tens of GB. The library's default is the model's context.
DEFAULT_MAX_TOKENS = 1024
# Padded tokens per scoring batch (`--token-budget`): a batch of rows of length L holds at most
# budget // L rows (at least one), so one long row cannot take the machine's memory.
DEFAULT_TOKEN_BUDGET = 8192


def token_limit(model, max_tokens: int | None = None) -> tuple[int, str]:
    """(the longest sequence allowed, how to say it in an error): the model's context, or
    `max_tokens` when that is smaller."""
    ctx = int(model.max_length)
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if max_tokens is None or max_tokens >= ctx:
        return ctx, f"the model's context ({ctx} tokens)"
    return int(max_tokens), f"the limit of {max_tokens} tokens (max_tokens / --max-tokens; the model's context is {ctx})"


def rows_per_batch(batch_size: int, tokens_per_row: int, token_budget: int | None) -> int:
    """Rows of `tokens_per_row` padded tokens in one batch: `batch_size`, fewer when that exceeds
    `token_budget` (never fewer than one)."""
    if token_budget is None:
        return batch_size
    if token_budget < 1:
        raise ValueError(f"token_budget must be >= 1, got {token_budget}")
    return max(1, min(batch_size, token_budget // max(1, tokens_per_row)))


def bucket_length(n: int, max_length: int, buckets: Sequence[int] = DEFAULT_BUCKETS) -> int:
    """The smallest bucket >= n (never above max_length). Raises if n > max_length."""
    if n > max_length:
        raise ValueError(f"sequence of {n} tokens is longer than the model's context ({max_length})")
    for b in buckets:
        if b >= n:
            return min(b, max_length)
    return max_length


def _pad(rows: list[list[int]], length: int, value: int = 0) -> np.ndarray:
    out = np.full((len(rows), length), value, dtype=np.int32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def token_ids(tokenizer, text: str, special: bool) -> list[int]:
    """The token ids of `text` (with the tokenizer's special tokens when `special`)."""
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def target_text(target: str, kind: str) -> str:
    """Targets of causal LMs follow the prompt after a space (" Paris"), as in ROME/MEND."""
    if kind == "causal" and target and not target[0].isspace():
        return " " + target
    return target


def encode(
    model,
    prompts: Sequence[str],
    targets: Sequence[str] | Sequence[int],
    *,
    text_pairs: Sequence[str] | None = None,
    length: int | None = None,
    target_length: int | None = None,
    buckets: Sequence[int] = DEFAULT_BUCKETS,
    where: str = "",
    max_tokens: int | None = None,
    names: Sequence[str] | None = None,
) -> dict[str, np.ndarray]:
    """Tokenize (prompt, target) pairs into one padded batch for `model` (a LoadedModel).

    `targets` are strings for causal / seq2seq models and class indices for classifiers.
    `length` / `target_length` force a sequence length instead of bucketing (for fixed
    shapes across batches). `where` prefixes error messages (e.g. "zsre.json"); `names[i]` names
    row i in them (default "record i", e.g. "line 7" for a requests file). Every row is checked
    against the model's context and `max_tokens` before anything is padded.
    Returns int32 numpy arrays: input_ids, attention_mask, labels, label_mask [, decoder_*,
    token_type_ids].
    """
    # --- checks and the limits every kind shares
    if len(prompts) == 0:
        raise ValueError(f"{where or 'encode'}: empty batch")
    if len(prompts) != len(targets):
        raise ValueError(f"{where or 'encode'}: {len(prompts)} prompts but {len(targets)} targets")
    tok = model.tokenizer
    if tok is None:
        raise ValueError(f"model {model.name!r} has no tokenizer")
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    kind = model.kind
    max_len, limit_text = token_limit(model, max_tokens)
    ctx = int(model.max_length)  # buckets are capped by the context, whatever the limit: same shapes

    def err(i, msg):
        name = names[i] if names is not None else f"record {i}"
        return ValueError(f"{where + ' ' if where else ''}{name}: {msg}")

    # --- causal LM: prompt + target in one sequence, labels shifted by one
    if kind == "causal":
        seqs, starts = [], []
        for i, (p, t) in enumerate(zip(prompts, targets)):
            p_ids = token_ids(tok, p, True)
            t_ids = token_ids(tok, target_text(t, kind), False)
            if not p_ids:
                raise err(i, "field 'prompt' tokenizes to nothing")
            if not t_ids:
                raise err(i, "field 'target' tokenizes to nothing")
            if len(p_ids) + len(t_ids) > max_len:
                raise err(i, f"prompt + target is {len(p_ids) + len(t_ids)} tokens, more than {limit_text}; shorten it")
            seqs.append(p_ids + t_ids)
            starts.append(len(p_ids))
        L = length or bucket_length(max(len(s) for s in seqs), ctx, buckets)
        if max(len(s) for s in seqs) > L:
            raise ValueError(f"{where or 'encode'}: a record is longer than the forced length {L}")
        ids = _pad(seqs, L, pad_id)
        mask = _pad([[1] * len(s) for s in seqs], L)
        labels = np.zeros_like(ids)
        lmask = np.zeros_like(ids)
        for i, (s, st) in enumerate(zip(seqs, starts)):
            labels[i, : len(s) - 1] = s[1:]
            lmask[i, st - 1 : len(s) - 1] = 1
        return dict(input_ids=ids, attention_mask=mask, labels=labels, label_mask=lmask)

    # --- encoder-decoder: prompt to the encoder, target to the decoder
    if kind == "seq2seq":
        srcs, tgts = [], []
        eos = tok.eos_token_id
        for i, (p, t) in enumerate(zip(prompts, targets)):
            p_ids = token_ids(tok, p, True)
            t_ids = token_ids(tok, t, False)
            if eos is not None and (not t_ids or t_ids[-1] != eos):
                t_ids = t_ids + [eos]
            if not p_ids:
                raise err(i, "field 'prompt' tokenizes to nothing")
            if len(t_ids) <= (1 if eos is not None else 0):
                raise err(i, "field 'target' tokenizes to nothing")
            if len(p_ids) > max_len or len(t_ids) > max_len:
                raise err(i, f"prompt ({len(p_ids)} tokens) or target ({len(t_ids)}) is more than {limit_text}; shorten it")
            srcs.append(p_ids)
            tgts.append(t_ids)
        L = length or bucket_length(max(map(len, srcs)), ctx, buckets)
        S = target_length or bucket_length(max(map(len, tgts)), ctx, buckets)
        start = model.config.decoder_start_token_id
        if start is None:
            start = pad_id
        dec_in = [[start] + t[:-1] for t in tgts]
        return dict(
            input_ids=_pad(srcs, L, pad_id),
            attention_mask=_pad([[1] * len(s) for s in srcs], L),
            decoder_input_ids=_pad(dec_in, S, pad_id),
            decoder_attention_mask=_pad([[1] * len(t) for t in tgts], S),
            labels=_pad(tgts, S, 0),
            label_mask=_pad([[1] * len(t) for t in tgts], S),
        )

    # --- classifier: the text (and text pair), one label per row
    if kind == "classifier":
        n_labels = int(getattr(model.config, "num_labels", 0) or 0)
        rows, types = [], []
        for i, p in enumerate(prompts):
            pair = text_pairs[i] if text_pairs is not None else None
            enc = tok(p, pair, add_special_tokens=True) if pair is not None else tok(p, add_special_tokens=True)
            if len(enc["input_ids"]) > max_len:
                raise err(i, f"text is {len(enc['input_ids'])} tokens, more than {limit_text}; shorten it")
            lab = targets[i]
            if not isinstance(lab, (int, np.integer)) or not (0 <= int(lab) < n_labels):
                raise err(i, f"field 'label' = {lab!r} is not a class index in [0, {n_labels})")
            rows.append(list(enc["input_ids"]))
            types.append(list(enc.get("token_type_ids", [0] * len(enc["input_ids"]))))
        L = length or bucket_length(max(map(len, rows)), ctx, buckets)
        return dict(
            input_ids=_pad(rows, L, pad_id),
            attention_mask=_pad([[1] * len(r) for r in rows], L),
            token_type_ids=_pad(types, L, 0),
            labels=np.asarray([[int(t)] for t in targets], np.int32),
            label_mask=np.ones((len(rows), 1), np.int32),
        )

    raise ValueError(f"unknown model kind {kind!r}")


def pad_rows(batch: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    """Pad every array of a batch to n rows; padded rows have all-zero masks (they count nowhere)."""
    b = next(iter(batch.values())).shape[0]
    if b > n:
        raise ValueError(f"batch has {b} rows, more than {n}")
    if b == n:
        return batch
    return {k: np.concatenate([v, np.zeros((n - b,) + v.shape[1:], v.dtype)]) for k, v in batch.items()}


def slice_rows(batch: dict[str, np.ndarray], start: int, stop: int) -> dict[str, np.ndarray]:
    return {k: v[start:stop] for k, v in batch.items()}


# -- plain text: token windows for perplexity and key statistics (eval.perplexity, baselines.rome/keystats)


def window_spans(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_scored) of each window over a text of n tokens: the window holds
    tokens [begin, end) and scores the targets x_t for t in [first_scored, end)."""
    if not 0 < stride <= window:
        raise ValueError(f"need 0 < stride <= window, got stride={stride}, window={window}")
    spans, scored_to, begin = [], 1, 0
    while n >= 2:
        end = min(begin + window, n)
        spans.append((begin, end, max(scored_to, begin + 1)))
        scored_to = end
        if end == n:
            break
        begin += stride
    return spans


def token_windows(token_lists: Sequence[Sequence[int]], window: int, stride: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """All windows of all token lists as one batch dict [W, window] (the library's causal
    convention: labels[j] = token after position j, label_mask = 1 where that token is scored)."""
    ids, att, lab, lm = [], [], [], []
    for toks in token_lists:
        toks = list(toks)
        for begin, end, first in window_spans(len(toks), window, stride):
            w = toks[begin:end]
            row = np.full(window, pad_id, np.int32)
            row[: len(w)] = w
            a = np.zeros(window, np.int32)
            a[: len(w)] = 1
            labels = np.zeros(window, np.int32)
            labels[: len(w) - 1] = w[1:]
            m = np.zeros(window, np.int32)
            # position j predicts token begin + j + 1; it counts if that token is in [first, end)
            m[first - begin - 1 : end - begin - 1] = 1
            ids.append(row), att.append(a), lab.append(labels), lm.append(m)
    if not ids:
        shape = (0, window)
        return {k: np.zeros(shape, np.int32) for k in ("input_ids", "attention_mask", "labels", "label_mask")}
    return dict(input_ids=np.stack(ids), attention_mask=np.stack(att), labels=np.stack(lab), label_mask=np.stack(lm))


def tokenize_texts(model, texts: Sequence[str], where: str = "texts") -> list[list[int]]:
    """Token ids of each text (with special tokens); texts with fewer than 2 tokens score nothing."""
    if model.kind != "causal":
        raise ValueError(f"perplexity of plain text needs a causal LM; {model.name!r} is {model.kind!r}")
    if isinstance(texts, str):
        raise TypeError(f"{where}: expected a list of texts, got one string")
    out = []
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"{where} item {i}: expected a string, got {type(t).__name__}")
        out.append(list(model.tokenizer(t, add_special_tokens=True)["input_ids"]))
    return out
