"""transformers' Flax classes behind the LoadedModel interface.

Each architecture has a layer table built from its config (which pytree paths make up
"layer i"), an `apply` mapping the library's batch dict to logits aligned with `labels`
(see base.py), and the Flax / PyTorch class names used to load and save it.

    arch      Flax class                         blocks                      kernel layout
    gpt2      FlaxGPT2LMHeadModel                h.0 .. h.{n-1}              out_in (Conv1D)
    gpt_neo   FlaxGPTNeoForCausalLM              h.0 .. h.{n-1}              in_out (Dense)
    t5        FlaxT5ForConditionalGeneration     encoder.i, then decoder.i   in_out
    bart      FlaxBartForConditionalGeneration   encoder.i, then decoder.i   in_out
    bert      FlaxBertForSequenceClassification  layer.0 .. layer.{n-1}      in_out

Weight paths were read off the parameter trees of the real classes; `LayerTable.check`
verifies them against every loaded model.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np

from salem_jax.models.base import Block, Kind, LayerTable, LoadedModel, Weight


# --------------------------------------------------------------------------- layer tables


def _dense(prefix: str, names: tuple[str, ...], layout: str = "in_out") -> tuple[Weight, ...]:
    return tuple(Weight(f"{prefix}/{n}/kernel", layout) for n in names)


def gpt2_layers(config) -> LayerTable:
    """GPT-2: Conv1D kernels stored [out, in]; blocks "h.i"."""
    blocks = []
    for i in range(config.n_layer):
        p = f"transformer/h/{i}"
        blocks.append(
            Block(
                name=f"h.{i}",
                mlp=_dense(f"{p}/mlp", ("c_fc", "c_proj"), "out_in"),
                attention=_dense(f"{p}/attn", ("c_attn", "c_proj"), "out_in"),
            )
        )
    return LayerTable(tuple(blocks), embedding="transformer/wte")


def gpt_neo_layers(config) -> LayerTable:
    """GPT-Neo: same names as GPT-2 but plain nn.Dense kernels ([in, out]); blocks "h.i"."""
    blocks = []
    for i in range(config.num_layers):
        p = f"transformer/h/{i}"
        blocks.append(
            Block(
                name=f"h.{i}",
                mlp=_dense(f"{p}/mlp", ("c_fc", "c_proj")),
                attention=_dense(f"{p}/attn/attention", ("q_proj", "k_proj", "v_proj", "out_proj")),
            )
        )
    return LayerTable(tuple(blocks), embedding="transformer/wte")


def t5_layers(config) -> LayerTable:
    """T5 (v1.0 `wi` and v1.1 gated `wi_0`/`wi_1`): blocks "encoder.i" then "decoder.i".

    Encoder block i: layer/0 = SelfAttention, layer/1 = DenseReluDense.
    Decoder block i: layer/0 = SelfAttention, layer/1 = EncDecAttention, layer/2 = DenseReluDense.
    """
    gated = bool(getattr(config, "is_gated_act", False))
    wi = ("wi_0", "wi_1", "wo") if gated else ("wi", "wo")
    qkvo = ("q", "k", "v", "o")
    blocks = []
    for i in range(config.num_layers):
        p = f"encoder/block/{i}/layer"
        blocks.append(
            Block(
                name=f"encoder.{i}",
                mlp=_dense(f"{p}/1/DenseReluDense", wi),
                attention=_dense(f"{p}/0/SelfAttention", qkvo),
            )
        )
    for i in range(config.num_decoder_layers):
        p = f"decoder/block/{i}/layer"
        blocks.append(
            Block(
                name=f"decoder.{i}",
                mlp=_dense(f"{p}/2/DenseReluDense", wi),
                attention=_dense(f"{p}/0/SelfAttention", qkvo) + _dense(f"{p}/1/EncDecAttention", qkvo),
            )
        )
    return LayerTable(tuple(blocks), embedding="shared")


def bart_layers(config) -> LayerTable:
    """BART: blocks "encoder.i" then "decoder.i"; MLP fc1/fc2; attention q/k/v/out_proj."""
    qkvo = ("q_proj", "k_proj", "v_proj", "out_proj")
    blocks = []
    for i in range(config.encoder_layers):
        p = f"model/encoder/layers/{i}"
        blocks.append(
            Block(name=f"encoder.{i}", mlp=_dense(p, ("fc1", "fc2")), attention=_dense(f"{p}/self_attn", qkvo))
        )
    for i in range(config.decoder_layers):
        p = f"model/decoder/layers/{i}"
        blocks.append(
            Block(
                name=f"decoder.{i}",
                mlp=_dense(p, ("fc1", "fc2")),
                attention=_dense(f"{p}/self_attn", qkvo) + _dense(f"{p}/encoder_attn", qkvo),
            )
        )
    return LayerTable(tuple(blocks), embedding="model/shared")


def bert_layers(config) -> LayerTable:
    """BERT encoder: blocks "layer.i"; MLP intermediate/dense + output/dense."""
    blocks = []
    for i in range(config.num_hidden_layers):
        p = f"bert/encoder/layer/{i}"
        blocks.append(
            Block(
                name=f"layer.{i}",
                mlp=(Weight(f"{p}/intermediate/dense/kernel"), Weight(f"{p}/output/dense/kernel")),
                attention=_dense(f"{p}/attention/self", ("query", "key", "value"))
                + (Weight(f"{p}/attention/output/dense/kernel"),),
            )
        )
    return LayerTable(tuple(blocks), embedding="bert/embeddings/word_embeddings")


# --------------------------------------------------------------------------- apply functions


def _positions(ids):
    return jnp.broadcast_to(jnp.arange(ids.shape[1])[None], ids.shape)


def _causal_apply(module):
    """GPT-2 / GPT-Neo: logits [B, T, V]; logits[:, t] predicts the token after t."""

    def apply(params, batch):
        ids = batch["input_ids"]
        out = module.apply({"params": params}, ids, batch["attention_mask"], _positions(ids), deterministic=True)
        return out.logits

    return apply


def _t5_apply(module):
    """T5: logits [B, S, V] over the decoder positions (teacher forced on decoder_input_ids)."""

    def apply(params, batch):
        out = module.apply(
            {"params": params},
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            decoder_input_ids=batch["decoder_input_ids"],
            decoder_attention_mask=batch["decoder_attention_mask"],
            deterministic=True,
        )
        return out.logits

    return apply


def _bart_apply(module):
    """BART: logits [B, S, V] over the decoder positions (positions count from 0 on both sides)."""

    def apply(params, batch):
        ids, dec = batch["input_ids"], batch["decoder_input_ids"]
        out = module.apply(
            {"params": params},
            ids,
            batch["attention_mask"],
            dec,
            batch["decoder_attention_mask"],
            _positions(ids),
            _positions(dec),
            deterministic=True,
        )
        return out.logits

    return apply


def _classifier_apply(module):
    """BERT classifier: logits [B, 1, num_labels] (S = 1, see base.py)."""

    def apply(params, batch):
        ids = batch["input_ids"]
        types = batch.get("token_type_ids")
        if types is None:
            types = jnp.zeros_like(ids)
        out = module.apply(
            {"params": params}, ids, batch["attention_mask"], types, _positions(ids), None, deterministic=True
        )
        return out.logits[:, None, :]

    return apply


# --------------------------------------------------------------------------- registry


@dataclasses.dataclass(frozen=True)
class Arch:
    """How one transformers model_type becomes a LoadedModel."""

    arch: str  # == config.model_type
    kind: Kind
    flax_class: str  # class name in `transformers`
    torch_class: str  # the PyTorch twin (conversion, tests)
    layers: Callable[[Any], LayerTable]
    make_apply: Callable[[Any], Callable]
    max_length: Callable[[Any], int]


ARCHS: dict[str, Arch] = {
    "gpt2": Arch(
        "gpt2", "causal", "FlaxGPT2LMHeadModel", "GPT2LMHeadModel", gpt2_layers, _causal_apply, lambda c: c.n_positions
    ),
    "gpt_neo": Arch(
        "gpt_neo",
        "causal",
        "FlaxGPTNeoForCausalLM",
        "GPTNeoForCausalLM",
        gpt_neo_layers,
        _causal_apply,
        lambda c: c.max_position_embeddings,
    ),
    # T5's relative positions have no hard limit; 512 is what the checkpoints were trained on.
    "t5": Arch(
        "t5",
        "seq2seq",
        "FlaxT5ForConditionalGeneration",
        "T5ForConditionalGeneration",
        t5_layers,
        _t5_apply,
        lambda c: int(getattr(c, "n_positions", 512) or 512),
    ),
    "bart": Arch(
        "bart",
        "seq2seq",
        "FlaxBartForConditionalGeneration",
        "BartForConditionalGeneration",
        bart_layers,
        _bart_apply,
        lambda c: c.max_position_embeddings,
    ),
    "bert": Arch(
        "bert",
        "classifier",
        "FlaxBertForSequenceClassification",
        "BertForSequenceClassification",
        bert_layers,
        _classifier_apply,
        lambda c: c.max_position_embeddings,
    ),
}


def arch_of(model_type: str, where: str = "") -> Arch:
    """The registry entry for a transformers `config.model_type`; a clear error for anything else."""
    mt = model_type
    if mt not in ARCHS:
        raise ValueError(
            f"{where + ': ' if where else ''}unsupported architecture model_type={mt!r}; "
            f"supported: {', '.join(sorted(ARCHS))} (transformers Flax) and llama/mistral (salem_jax.models.llama)"
        )
    return ARCHS[mt]


def flax_class(arch: str):
    import transformers

    return getattr(transformers, ARCHS[arch].flax_class)


def torch_class(arch: str):
    """The PyTorch class of an architecture (needs torch)."""
    import transformers

    return getattr(transformers, ARCHS[arch].torch_class)


def to_torch(model: LoadedModel, params=None):
    """The transformers PyTorch twin of a model with `params` (default `model.params`), in eval
    mode and float32: for checking against PyTorch or exporting. Needs torch.

    (`PTModel.from_pretrained(dir, from_flax=True)` is broken in transformers 4.57; this uses
    `load_flax_weights_in_pytorch_model`, which works.)
    """
    import jax

    from transformers.modeling_flax_pytorch_utils import load_flax_weights_in_pytorch_model

    params = model.params if params is None else params
    # Writable float32 copies: torch.from_numpy has no bfloat16 and warns on read-only arrays.
    params = jax.tree.map(
        lambda x: np.array(x, np.float32) if jnp.issubdtype(x.dtype, jnp.floating) else np.array(x),
        jax.device_get(params),
    )
    pt = torch_class(model.arch)(model.config)
    return load_flax_weights_in_pytorch_model(pt, params).float().eval()


def from_flax_model(name: str, model, tokenizer=None, params=None, extra: dict | None = None) -> LoadedModel:
    """Wrap an instantiated transformers Flax model.

    `params` defaults to `model.params`; pass it for models built with `_do_init=False`.
    The layer table is checked against the parameters (a missing path is an error).
    """
    cfg = model.config
    spec = arch_of(cfg.model_type, name)
    if params is None:
        params = model.params
    layers = spec.layers(cfg)
    layers.check(params)
    return LoadedModel(
        name=name,
        arch=spec.arch,
        kind=spec.kind,
        apply=spec.make_apply(model.module),
        params=params,
        config=cfg,
        tokenizer=tokenizer,
        layers=layers,
        max_length=int(spec.max_length(cfg)),
        module=model.module,
        extra=dict(extra or {}),
    )


# --------------------------------------------------------------------------- tiny models


def _tiny_config(arch: str, vocab_size: int, overrides: dict):
    # Special ids follow salem_jax.testing.tiny_tokenizer: 0 <pad>, 1 <unk>, 2 <s>, 3 </s>.
    import transformers as tf

    if arch == "gpt2":
        kw = dict(n_layer=2, n_embd=32, n_head=2, n_positions=64, bos_token_id=2, eos_token_id=3)
        return tf.GPT2Config(vocab_size=vocab_size, **{**kw, **overrides})
    if arch == "gpt_neo":
        kw = dict(
            num_layers=2,
            hidden_size=32,
            num_heads=2,
            intermediate_size=128,
            attention_types=[[["global", "local"], 1]],
            window_size=8,
            max_position_embeddings=64,
            bos_token_id=2,
            eos_token_id=3,
        )
        return tf.GPTNeoConfig(vocab_size=vocab_size, **{**kw, **overrides})
    if arch == "t5":
        kw = dict(
            num_layers=2,
            num_decoder_layers=2,
            d_model=32,
            d_kv=16,
            d_ff=64,
            num_heads=2,
            relative_attention_num_buckets=8,
            pad_token_id=0,
            eos_token_id=3,
            decoder_start_token_id=0,
        )
        return tf.T5Config(vocab_size=vocab_size, **{**kw, **overrides})
    if arch == "bart":
        kw = dict(
            encoder_layers=2,
            decoder_layers=2,
            d_model=32,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            max_position_embeddings=64,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=3,
            decoder_start_token_id=3,
            forced_bos_token_id=None,
            forced_eos_token_id=None,  # a generation setting; transformers warns when it sits in the config
        )
        return tf.BartConfig(vocab_size=vocab_size, **{**kw, **overrides})
    if arch == "bert":
        kw = dict(
            num_hidden_layers=2,
            hidden_size=32,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
            num_labels=3,
            pad_token_id=0,
        )
        return tf.BertConfig(vocab_size=vocab_size, **{**kw, **overrides})
    raise ValueError(f"no tiny config for {arch!r}; choose one of {', '.join(sorted(ARCHS))} (llama: llama.tiny_llama)")


def _tiny_bert_tokenizer():
    """The tiny word tokenizer with BERT's framing: [CLS] a [SEP] b [SEP] and token_type_ids
    (0 for the first text, 1 for the pair), using <s> as [CLS] and </s> as [SEP]."""
    from tokenizers import processors

    from salem_jax.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> $B:1 </s>:1", special_tokens=[("<s>", 2), ("</s>", 3)]
    )
    tok.cls_token, tok.sep_token = "<s>", "</s>"
    return tok


def tiny(arch: str = "gpt2", seed: int = 0, vocab_size: int = 128, **config_overrides) -> LoadedModel:
    """A tiny random model for tests: 2 blocks (2 encoder + 2 decoder for seq2seq), width 32,
    with the word-level tokenizer of `salem_jax.testing` (ids 0 pad, 1 unk, 2 bos, 3 eos).

    `config_overrides` go to the transformers config, e.g.
    `tiny("t5", feed_forward_proj="gated-gelu", tie_word_embeddings=False)` for a T5 v1.1.
    The BERT classifier has 3 labels unless `num_labels=` says otherwise.
    """
    from salem_jax.testing import tiny_tokenizer

    cfg = _tiny_config(arch, vocab_size, config_overrides)
    spec = ARCHS[arch]
    if spec.kind == "seq2seq":
        tok = tiny_tokenizer(seq2seq=True)
    elif spec.kind == "classifier":
        tok = _tiny_bert_tokenizer()
    else:
        tok = tiny_tokenizer()
    model = flax_class(arch)(cfg, seed=seed)
    return from_flax_model(f"tiny-{arch}", model, tok)
