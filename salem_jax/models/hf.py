"""The five Hugging Face architectures on our own Flax modules, behind the LoadedModel interface.

Each architecture has a flax.linen module of ours (`salem_jax.models.gpt2`, `gpt_neo`, `t5`,
`bart`, `bert`; no transformers Flax class is used), a layer table built from its config
(which pytree paths make up "layer i"), an `apply` mapping the library's batch dict to logits
aligned with `labels` (see base.py), and its PyTorch twin's class name (for equivalence tests
and `to_torch`). The config object is transformers' (`GPT2Config`, ...), read from config.json.

    arch      our module                          blocks                      kernel layout
    gpt2      gpt2.GPT2LMHeadModel                h.0 .. h.{n-1}              in_out (PyTorch Conv1D is [in, out] too)
    gpt_neo   gpt_neo.GPTNeoForCausalLM           h.0 .. h.{n-1}              in_out
    t5        t5.T5ForConditionalGeneration       encoder.i, then decoder.i   in_out
    bart      bart.BartForConditionalGeneration   encoder.i, then decoder.i   in_out
    bert      bert.BertForSequenceClassification  layer.0 .. layer.{n-1}      in_out

Parameter paths are those of transformers' former Flax classes (`LayerTable.check` verifies
the tables against every loaded model). One difference: GPT-2 kernels are now `[in, out]`
("in_out"), where transformers' FlaxGPT2 kept them `[out, in]`; old FlaxGPT2 msgpack files
are transposed on load (`salem_jax.models.convert`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from salem_jax.models import bart, bert, gpt2, gpt_neo, t5
from salem_jax.models.base import Block, Kind, LayerTable, LoadedModel, Weight, param_paths
from salem_jax.models.blocks import make_kv_decode
from salem_jax.models.convert import params_to_torch


# --------------------------------------------------------------------------- layer tables


def _dense(prefix: str, names: tuple[str, ...], layout: str = "in_out") -> tuple[Weight, ...]:
    return tuple(Weight(f"{prefix}/{n}/kernel", layout) for n in names)


def gpt2_layers(config) -> LayerTable:
    """GPT-2: blocks "h.i"; kernels [in, out] like every other architecture here."""
    blocks = []
    for i in range(config.n_layer):
        p = f"transformer/h/{i}"
        blocks.append(
            Block(
                name=f"h.{i}",
                mlp=_dense(f"{p}/mlp", ("c_fc", "c_proj")),
                attention=_dense(f"{p}/attn", ("c_attn", "c_proj")),
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


def _causal_apply(module):
    """GPT-2 / GPT-Neo: logits [B, T, V]; logits[:, t] predicts the token after t."""

    def apply(params, batch):
        return module.apply({"params": params}, batch["input_ids"], batch["attention_mask"])

    return apply


def _seq2seq_apply(module):
    """T5 / BART: logits [B, S, V] over the decoder positions (teacher forced on
    decoder_input_ids; BART positions count from 0 on both sides)."""

    def apply(params, batch):
        return module.apply(
            {"params": params},
            batch["input_ids"],
            batch["attention_mask"],
            batch["decoder_input_ids"],
            batch["decoder_attention_mask"],
        )

    return apply


def _classifier_apply(module):
    """BERT classifier: logits [B, 1, num_labels] (S = 1, see base.py)."""

    def apply(params, batch):
        out = module.apply({"params": params}, batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
        return out[:, None, :]

    return apply


# --------------------------------------------------------------------------- registry


@dataclasses.dataclass(frozen=True)
class Arch:
    """How one transformers model_type becomes a LoadedModel."""

    arch: str  # == config.model_type
    kind: Kind
    module: Callable[..., Any]  # our flax.linen class: module(config, dtype, remat)
    torch_class: str  # the PyTorch twin in `transformers` (conversion, tests)
    layers: Callable[[Any], LayerTable]
    make_apply: Callable[[Any], Callable]
    max_length: Callable[[Any], int]
    dummy: Callable[[], tuple]  # positional inputs for `module.init`


def _ids(n=2):
    return jnp.ones((1, n), jnp.int32)


ARCHS: dict[str, Arch] = {
    "gpt2": Arch(
        "gpt2", "causal", gpt2.GPT2LMHeadModel, "GPT2LMHeadModel", gpt2_layers, _causal_apply,
        lambda c: c.n_positions, lambda: (_ids(), _ids()),
    ),
    "gpt_neo": Arch(
        "gpt_neo", "causal", gpt_neo.GPTNeoForCausalLM, "GPTNeoForCausalLM", gpt_neo_layers, _causal_apply,
        lambda c: c.max_position_embeddings, lambda: (_ids(), _ids()),
    ),
    # T5's relative positions have no hard limit; 512 is what the checkpoints were trained on.
    "t5": Arch(
        "t5", "seq2seq", t5.T5ForConditionalGeneration, "T5ForConditionalGeneration", t5_layers, _seq2seq_apply,
        lambda c: int(getattr(c, "n_positions", 512) or 512), lambda: (_ids(), _ids(), _ids(), _ids()),
    ),
    "bart": Arch(
        "bart", "seq2seq", bart.BartForConditionalGeneration, "BartForConditionalGeneration", bart_layers,
        _seq2seq_apply, lambda c: c.max_position_embeddings, lambda: (_ids(), _ids(), _ids(), _ids()),
    ),
    "bert": Arch(
        "bert", "classifier", bert.BertForSequenceClassification, "BertForSequenceClassification", bert_layers,
        _classifier_apply, lambda c: c.max_position_embeddings, lambda: (_ids(), _ids()),
    ),
}


def arch_of(model_type: str, where: str = "") -> Arch:
    """The registry entry for a transformers `config.model_type`; a clear error for anything else."""
    mt = model_type
    if mt not in ARCHS:
        raise ValueError(
            f"{where + ': ' if where else ''}unsupported architecture model_type={mt!r}; "
            f"supported: {', '.join(sorted(ARCHS))} and llama (salem_jax.models.llama)"
        )
    return ARCHS[mt]


def make_module(arch: str, config, dtype: str = "float32", remat: bool = False):
    """Our flax.linen module for `config` (`dtype`: computation dtype; `remat`: recompute each
    block's activations in the backward pass)."""
    return ARCHS[arch].module(config, jnp.dtype(dtype), remat)


def abstract_shapes(arch: str, config) -> dict[str, tuple[int, ...]]:
    """Path -> shape of every parameter of the module for `config` (traced, nothing allocated)."""
    module = make_module(arch, config)
    tree = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *ARCHS[arch].dummy()))["params"]
    return {p: tuple(x.shape) for p, x in zip(param_paths(tree), jax.tree_util.tree_leaves(tree))}


def init_params(arch: str, config, seed: int = 0) -> dict:
    """Random float32 parameters (normal kernels and embeddings, unit norms, zero biases)."""
    module = make_module(arch, config)
    return module.init(jax.random.PRNGKey(seed), *ARCHS[arch].dummy())["params"]


def torch_class(arch: str):
    """The PyTorch class of an architecture (needs torch)."""
    import transformers

    return getattr(transformers, ARCHS[arch].torch_class)


def to_torch(model: LoadedModel, params=None):
    """The transformers PyTorch twin of a model with `params` (default `model.params`), in eval
    mode and float32: for checking against PyTorch or exporting. Needs torch.

    Raises if PyTorch expects a parameter we do not supply, other than a tied LM head."""
    import torch

    params = model.params if params is None else params
    state = {k: torch.tensor(v) for k, v in params_to_torch(model.arch, params).items()}
    # Eager attention: the reference implementation. (transformers' SDPA path for GPT-2 ignores
    # scale_attn_by_inverse_layer_idx, which our module and eager GPT-2 apply.)
    pt = torch_class(model.arch)._from_config(model.config, attn_implementation="eager").float().eval()
    _untie(pt, state)
    result = pt.load_state_dict(state, strict=False)
    tied = tied_head(model.arch, model.config)
    bad_missing = [k for k in result.missing_keys if not (tied and k == "lm_head.weight")]
    if result.unexpected_keys or bad_missing:
        raise ValueError(
            f"{model.name}: PyTorch {ARCHS[model.arch].torch_class} does not match our parameters: "
            f"missing {bad_missing[:5]}, unexpected {list(result.unexpected_keys)[:5]}"
        )
    if tied:  # transformers 4 builds T5 with a separate lm_head until tie_weights() runs
        pt.tie_weights()
    return pt


def _untie(pt, state: dict) -> None:
    """Give every parameter that `state` fills under two or more names its own tensor.

    transformers 5 builds `T5ForConditionalGeneration` with `lm_head` tied to `shared` even for
    a v1.1 config (untied head); loading both tensors into one shared Parameter would keep the
    last. (Its `from_pretrained` unties when a checkpoint holds two different tensors.)"""
    import torch

    names: dict[int, list[str]] = {}
    for n, p in pt.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(n)
    for group in names.values():
        given = [n for n in group if n in state]
        for n in given[1:]:
            *mod, attr = n.split(".")
            owner = pt.get_submodule(".".join(mod))
            setattr(owner, attr, torch.nn.Parameter(getattr(owner, attr).detach().clone()))


def tied_head(arch: str, config) -> bool:
    """Whether the LM head reuses the token embedding (no `lm_head` parameter of its own)."""
    return t5.ties_head(config) if arch == "t5" else bool(getattr(config, "tie_word_embeddings", True))


def from_params(
    name: str, arch: str, config, params, tokenizer=None, *, dtype: str = "float32", remat: bool = False,
    extra: dict | None = None,
) -> LoadedModel:
    """Wrap `params` (our layout) and a transformers config as a LoadedModel.

    `dtype` is the computation dtype (params are used as given); `remat` recomputes each block's
    activations in the backward pass. The layer table is checked against the parameters."""
    spec = arch_of(arch, name)
    module = make_module(arch, config, dtype, remat)
    layers = spec.layers(config)
    layers.check(params)
    return LoadedModel(
        name=name,
        arch=spec.arch,
        kind=spec.kind,
        apply=spec.make_apply(module),
        params=params,
        config=config,
        tokenizer=tokenizer,
        layers=layers,
        max_length=int(spec.max_length(config)),
        module=module,
        extra=dict(extra or {}),
        # KV-cached greedy decoding where our module has a `decode` method (GPT-2, GPT-Neo)
        kv_decode=make_kv_decode(module) if hasattr(spec.module, "decode") else None,
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
    # transformers 5 returns token_type_ids only when the tokenizer lists them
    tok.model_input_names = ["input_ids", "token_type_ids", "attention_mask"]
    return tok


def tiny(
    arch: str = "gpt2",
    seed: int = 0,
    vocab_size: int = 128,
    *,
    dtype: str = "float32",
    remat: bool = False,
    **config_overrides,
) -> LoadedModel:
    """A tiny random model for tests: 2 blocks (2 encoder + 2 decoder for seq2seq), width 32,
    with the word-level tokenizer of `salem_jax.testing` (ids 0 pad, 1 unk, 2 bos, 3 eos).
    `dtype` is the computation and parameter dtype; `remat` wraps each block in `nn.remat`.

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
    params = jax.tree.map(lambda x: x.astype(dtype), init_params(arch, cfg, seed))
    return from_params(f"tiny-{arch}", arch, cfg, params, tok, dtype=dtype, remat=remat)
