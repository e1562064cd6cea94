"""What every loaded model looks like to the rest of salem_jax.

A model is a pure function of (params, batch) plus the tables that name its layers.
Nothing here knows about a particular architecture; `hf.py` (our Flax GPT-2, GPT-Neo,
T5, BART, BERT) and `llama.py` (our own Llama) fill these structures in.

Batch convention (a dict of int32 arrays with static shapes, built by `salem_jax.data`):

    input_ids        [B, T]   token ids (right padded)
    attention_mask   [B, T]   1 for real tokens, 0 for padding
    decoder_input_ids, decoder_attention_mask [B, S]   encoder-decoder models only
    token_type_ids   [B, T]   optional, BERT-style classifiers
    labels           [B, S]   the token (or class) that logits[:, s] must predict
    label_mask       [B, S]   1 where labels[:, s] counts, 0 elsewhere

`LoadedModel.apply(params, batch)` returns logits `[B, S, V]` aligned with `labels`:
S = T for causal LMs (logits[:, t] predicts labels[:, t], the token after position t),
S = decoder length for encoder-decoders, S = 1 and V = number of classes for classifiers.
Every loss, metric, saliency and editor function in the library works on that one shape.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Literal

import jax

Layout = Literal["in_out", "out_in"]
Kind = Literal["causal", "seq2seq", "classifier"]
Part = Literal["mlp", "attention", "all"]


@dataclasses.dataclass(frozen=True)
class Weight:
    """One weight matrix of a block, named by its pytree path.

    `layout` says how the kernel is stored: "in_out" is flax.linen.Dense (`y = x @ W`,
    kernel `[in, out]`); "out_in" is the GPT-2 Conv1D layout of transformers' FlaxGPT2
    (kernel `[out, in]`, `y = x @ W.T`). The *module* that owns the kernel (for
    `flax.linen.intercept_methods`) is the path without its last component.
    """

    path: str  # e.g. "transformer/h/3/mlp/c_fc/kernel"
    layout: Layout = "in_out"

    @property
    def module_path(self) -> str:
        return self.path.rsplit("/", 1)[0]

    def in_out_shape(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """(fan_in, fan_out) of a kernel of this layout and the given stored shape."""
        if len(shape) != 2:
            raise ValueError(f"{self.path}: expected a 2-D kernel, got shape {shape}")
        return (shape[0], shape[1]) if self.layout == "in_out" else (shape[1], shape[0])


@dataclasses.dataclass(frozen=True)
class Block:
    """One transformer block ("layer i" in the paper) and its weight matrices."""

    name: str  # "h.3", "layers.5", "encoder.3", "decoder.22"
    mlp: tuple[Weight, ...]
    attention: tuple[Weight, ...] = ()

    @property
    def module_path(self) -> str:
        """Path of the block's own module (the longest common prefix of its weights' modules),
        e.g. "transformer/h/3": intercept it to read or replace the block's output hidden state."""
        parts = [w.module_path.split("/") for w in self.mlp + self.attention]
        common = []
        for level in zip(*parts):
            if len(set(level)) != 1:
                break
            common.append(level[0])
        return "/".join(common)

    def weights(self, part: Part = "mlp") -> tuple[Weight, ...]:
        if part == "mlp":
            return self.mlp
        if part == "attention":
            return self.attention
        if part == "all":
            return self.mlp + self.attention
        raise ValueError(f"unknown part {part!r}; choose 'mlp', 'attention' or 'all'")


@dataclasses.dataclass(frozen=True)
class LayerTable:
    """The ordered blocks of an architecture: "layer i" -> pytree paths of its weights."""

    blocks: tuple[Block, ...]
    # Module path of the token embedding (e.g. "transformer/wte"); causal tracing adds noise
    # to its output. For encoder-decoders, the shared/encoder input embedding.
    embedding: str = ""

    def names(self) -> list[str]:
        return [b.name for b in self.blocks]

    def __len__(self) -> int:
        return len(self.blocks)

    def __iter__(self):
        return iter(self.blocks)

    def __getitem__(self, name: str) -> Block:
        for b in self.blocks:
            if b.name == name:
                return b
        raise KeyError(f"unknown layer {name!r}; valid layers are: {', '.join(self.names())}")

    def select(self, names: list[str] | tuple[str, ...]) -> tuple[Block, ...]:
        """Blocks by name, in the order given; an unknown name is an error listing valid ones."""
        return tuple(self[n] for n in names)

    def weights(self, names: list[str] | tuple[str, ...] | None = None, part: Part = "mlp") -> tuple[Weight, ...]:
        blocks = self.blocks if names is None else self.select(names)
        return tuple(w for b in blocks for w in b.weights(part))

    def check(self, params: Any) -> None:
        """Raise if a listed path is missing from `params` or listed twice."""
        have = set(param_paths(params))
        seen: set[str] = set()
        for b in self.blocks:
            for w in b.mlp + b.attention:
                if w.path not in have:
                    raise KeyError(f"layer table lists {w.path!r} (block {b.name}) but the parameters have no such path")
                if w.path in seen:
                    raise ValueError(f"layer table lists {w.path!r} twice")
                seen.add(w.path)


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """Everything a job needs from a model.

    `apply(params, batch) -> logits [B, S, V]` is pure (safe to jit, grad, and to call inside
    `flax.linen.intercept_methods`). `params` is a plain nested dict of arrays; it is never
    modified in place by the library.
    """

    name: str
    arch: str  # "gpt2", "gpt_neo", "t5", "bart", "bert", "llama"
    kind: Kind
    apply: Callable[[Any, dict], jax.Array]
    params: Any
    config: Any
    tokenizer: Any
    layers: LayerTable
    max_length: int  # longest sequence the model accepts (positions / context)
    module: Any = None  # the flax.linen module, for users who need it
    extra: dict = dataclasses.field(default_factory=dict)
    # KV-cached decoding (`salem_jax.models.blocks.make_kv_decode`): `kv_decode(params, cache,
    # input_ids, key_mask, position_ids, cache_pos, head_pos) -> (logits [B, K, V], cache)`, set
    # by the decoder-only families that support it (Llama, GPT-2, GPT-Neo); None for the others,
    # which `salem_jax.generate` then decodes by re-running the whole buffer every step.
    kv_decode: Callable | None = None

    @property
    def supports_kv_cache(self) -> bool:
        """Whether greedy decoding can use a KV cache (`kv_decode` is set)."""
        return self.kv_decode is not None

    @property
    def is_encoder_decoder(self) -> bool:
        return self.kind == "seq2seq"


def param_paths(params: Any) -> list[str]:
    """All leaf paths of a pytree as "a/b/c" strings, in tree order."""
    return [path_str(k) for k, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def path_str(keypath) -> str:
    return jax.tree_util.keystr(keypath, simple=True, separator="/")


def get_path(params: Any, path: str):
    """The leaf at "a/b/c"; a clear KeyError naming the first missing part."""
    node = params
    for i, part in enumerate(path.split("/")):
        try:
            node = node[part]
        except (KeyError, TypeError):
            raise KeyError(f"no parameter at {path!r}: {'/'.join(path.split('/')[: i + 1])!r} does not exist") from None
    return node


def set_path(params: Any, path: str, value) -> Any:
    """A new tree equal to `params` with the leaf at `path` replaced (inputs are not mutated)."""
    parts = path.split("/")

    def rec(node, i):
        if i == len(parts):
            return value
        if parts[i] not in node:
            raise KeyError(f"no parameter at {path!r}")
        new = dict(node)
        new[parts[i]] = rec(node[parts[i]], i + 1)
        return new

    return rec(params, 0)
