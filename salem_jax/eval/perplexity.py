"""Perplexity of plain text under a causal LM, in fixed-length sliding windows.

Definition. Each text is tokenized on its own (with the tokenizer's special tokens, e.g. a
BOS) into tokens x_0 .. x_{n-1}. Windows of `window` tokens start at 0, stride, 2*stride, ...
until one reaches the end of the text. A window scores the tokens after its first one that
no earlier window scored; a token's context is the tokens of its window before it (so every
scored token after the first window sees at least `window - stride` tokens of context). With
`stride < window` every token x_t, t >= 1, is scored exactly once; with `stride == window`
(disjoint windows) the first token of each window has no context and is not scored, as in
the Hugging Face recipe. Perplexity = exp(sum of -log p(x_t | context) / number
of scored tokens), summed over all texts (token weighted). A smaller stride gives more
context at more compute.

Every window becomes one row of a [batch_size, window] batch, so the jitted forward compiles
once whatever the texts.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from salem_jax import losses
# token_windows / tokenize_texts / window_spans live in data.tokenize (baselines use them too)
from salem_jax.data.tokenize import pad_rows, slice_rows, token_windows, tokenize_texts, window_spans  # noqa: F401


@dataclasses.dataclass(frozen=True)
class Perplexity:
    ppl: float  # exp(nll_sum / n_tokens)
    nll_sum: float  # nats, summed over scored tokens
    n_tokens: int  # scored tokens
    n_windows: int


def default_window(model, window: int | None, stride: int | None) -> tuple[int, int]:
    """`window` defaults to min(context, 512) and `stride` to half the window."""
    window = min(model.max_length, 512) if window is None else window
    if window > model.max_length:
        raise ValueError(f"window {window} is longer than the model's context ({model.max_length})")
    if window < 2:
        raise ValueError(f"window must hold at least 2 tokens, got {window}")
    return window, (max(1, window // 2) if stride is None else stride)


def row_nll(apply: Callable, params: Any, batch: dict) -> jax.Array:
    """Summed NLL of the counted tokens of each row of a window batch: [B] (traceable)."""
    mask = batch["label_mask"].astype(jnp.float32)
    return -(losses.token_logprobs(apply(params, batch), batch["labels"]) * mask).sum(-1)


@functools.partial(jax.jit, static_argnums=0)
def _nll(apply: Callable, params_list: tuple, batch: dict) -> jax.Array:
    """Summed NLL of the counted tokens of each row, for each parameter set: [P, B]."""
    return jnp.stack([row_nll(apply, p, batch) for p in params_list])


def text_windows(model, texts: Sequence[str], window: int | None, stride: int | None) -> dict[str, np.ndarray]:
    """Every window of `texts` as one batch dict [W, window] (`default_window` for None)."""
    window, stride = default_window(model, window, stride)
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    return token_windows(tokenize_texts(model, texts), window, stride, pad)


def _run(model, params_list: tuple, texts, window, stride, batch_size, progress) -> tuple[np.ndarray, int, int]:
    all_w = text_windows(model, texts, window, stride)
    n_win = all_w["input_ids"].shape[0]
    n_tok = int(all_w["label_mask"].sum())
    if n_tok == 0:
        raise ValueError("no text has 2 or more tokens: nothing to score")
    total = np.zeros(len(params_list), np.float64)
    for start in tqdm(range(0, n_win, batch_size), desc="perplexity", disable=not progress):
        batch = pad_rows(slice_rows(all_w, start, start + batch_size), batch_size)
        total += np.asarray(jax.device_get(_nll(model.apply, params_list, batch)), np.float64).sum(-1)
    return total, n_tok, n_win


def perplexity(
    model,
    params: Any,
    texts: Sequence[str],
    *,
    window: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> Perplexity:
    """Perplexity of `texts` under `model` with `params` (see the module docstring)."""
    total, n_tok, n_win = _run(model, (params,), texts, window, stride, batch_size, progress)
    return Perplexity(ppl=math.exp(total[0] / n_tok), nll_sum=float(total[0]), n_tokens=n_tok, n_windows=n_win)


def perplexity_change(
    model,
    base_params: Any,
    new_params: Any,
    texts: Sequence[str],
    *,
    window: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, float]:
    """Perplexity of `texts` before and after an edit, in one pass over the windows.

    Returns `before`, `after`, `rel` = after / before - 1 and `abs` = after - before."""
    total, n_tok, _ = _run(model, (base_params, new_params), texts, window, stride, batch_size, progress)
    before, after = math.exp(total[0] / n_tok), math.exp(total[1] / n_tok)
    return {"before": before, "after": after, "rel": after / before - 1.0, "abs": after - before}
