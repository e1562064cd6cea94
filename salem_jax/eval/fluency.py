"""Generation fluency as in ROME: weighted bi- and tri-gram entropy of generated text.

Definition (ROME's `compute_n_gram_entropy`, defaults). Split a text into word tokens; for
n in (2, 3) take the frequency distribution f_n of its n-grams and its Shannon entropy in
bits, H_n = -sum_g f_n(g) log2 f_n(g) (0 when the text has fewer than n tokens). The text's
score is the arithmetic mean of the weighted entropies, (2/3 * H_2 + 4/3 * H_3) / 2, and the
fluency of a set of generations is the mean of their scores. Repetitive text ("the the the")
scores low; a model damaged by an edit tends to loop, which this catches.

ROME tokenizes with `nltk.word_tokenize`; salem_jax does not depend on nltk, so
`word_tokenize` here is a small regular expression that splits the same way on ordinary
text (words, numbers, punctuation marks, English contractions "do" + "n't", "it" + "'s").
Rare cases (abbreviations such as "U.S.", "o'clock") may split differently, so compare
fluency numbers computed with the same tokenizer only. ROME samples (top-5) up to 100 tokens
per generation prompt and scores prompt + continuation; greedy decoding repeats more and
gives lower absolute numbers, so compare methods under the same decoding.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any, Callable, Sequence

_TOKEN = re.compile(
    r"""\w+(?=n't\b)              # "do" of "don't" (nltk splits "do" + "n't")
      | n't\b
      | '(?:s|re|ve|ll|d|m)\b     # 's 're 've 'll 'd 'm
      | \d+(?:[.,]\d+)+           # 3.14, 1,000
      | \w+(?:-\w+)*              # words, hyphenated words
      | [^\w\s]                   # any other single non-space character
    """,
    re.VERBOSE | re.IGNORECASE,
)


def word_tokenize(text: str) -> list[str]:
    """Word tokens of `text` (an nltk.word_tokenize look-alike; see the module docstring)."""
    return _TOKEN.findall(text)


def ngram_counts(tokens: Sequence[str], n: int) -> Counter:
    """How often each n-gram (tuple of n consecutive tokens) occurs."""
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def entropy_bits(counts: Counter) -> float:
    """Shannon entropy (bits) of the frequency distribution `counts`; 0 for no events."""
    total = sum(counts.values())
    return -sum((c / total) * math.log2(c / total) for c in counts.values()) if total else 0.0


def ngram_entropy(
    text: str,
    ns: Sequence[int] = (2, 3),
    weights: Sequence[float] = (2 / 3, 4 / 3),
    tokenize: Callable[[str], list[str]] = word_tokenize,
) -> float:
    """mean_i(weights[i] * H_{ns[i]}(text)) in bits (ROME's per-text fluency score)."""
    if len(ns) != len(weights) or not ns:
        raise ValueError(f"need one weight per n, got ns={ns} and weights={weights}")
    toks = tokenize(text)
    return sum(w * entropy_bits(ngram_counts(toks, n)) for n, w in zip(ns, weights)) / len(ns)


def fluency(texts: Sequence[str], **kwargs) -> float:
    """Mean `ngram_entropy` over generated texts (ROME's fluency, arithmetic aggregation)."""
    if isinstance(texts, str):
        raise TypeError("fluency: expected a list of texts, got one string")
    if not texts:
        raise ValueError("fluency: no texts")
    return sum(ngram_entropy(t, **kwargs) for t in texts) / len(texts)


def generation_fluency(
    model,
    params: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 100,
    generate: Callable[..., list[str]] | None = None,
) -> float:
    """Fluency of the model's generations from `prompts`, scored as in ROME on the whole text
    (prompt + continuation).

    By default the continuations are greedy (`salem_jax.generate.greedy_ids`, stopping at the
    end token) and each text is the tokenizer's decoding of prompt + continuation ids (special
    tokens dropped). A custom `generate(model, params, prompts, max_new_tokens=...) ->
    list[str]` returns continuations as text, which are appended to their prompts verbatim.
    """
    prompts = list(prompts)
    if generate is None:
        from salem_jax.generate import greedy_ids

        tok = model.tokenizer
        conts = greedy_ids(model, params, prompts, max_new_tokens=max_new_tokens)
        texts = [
            tok.decode(list(tok(p, add_special_tokens=True)["input_ids"]) + list(c), skip_special_tokens=True)
            for p, c in zip(prompts, conts)
        ]
    else:
        conts = generate(model, params, prompts, max_new_tokens=max_new_tokens)
        if len(conts) != len(prompts):
            raise ValueError(f"generate returned {len(conts)} texts for {len(prompts)} prompts")
        texts = [p + c for p, c in zip(prompts, conts)]
    return fluency(texts)
