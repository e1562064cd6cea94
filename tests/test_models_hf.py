"""Our Flax GPT-2, GPT-Neo, T5, BART and BERT behind LoadedModel: layer tables and apply vs
transformers' PyTorch models holding the same weights."""

import re

import flax.linen as nn
import jax
import numpy as np
import pytest

from salem_jax.data.tokenize import encode
from salem_jax.models import hf
from salem_jax.models.base import get_path, param_paths

torch = pytest.importorskip("torch")

T5_V11 = dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False)
CASES = {
    "gpt2": ("gpt2", {}),
    # untied head, a non-default MLP width, and the per-layer score scaling some checkpoints use
    "gpt2_untied": ("gpt2", dict(tie_word_embeddings=False, n_inner=48, scale_attn_by_inverse_layer_idx=True)),
    "gpt_neo": ("gpt_neo", {}),
    # a local window shorter than the prompts, so the local layer's mask matters
    "gpt_neo_window": ("gpt_neo", dict(window_size=3, tie_word_embeddings=False)),
    "t5": ("t5", {}),
    "t5_v1_1": ("t5", T5_V11),
    "t5_gated_tied": ("t5", dict(feed_forward_proj="gated-gelu", tie_word_embeddings=True)),
    "bart": ("bart", {}),
    "bart_scaled_untied": ("bart", dict(scale_embedding=True, tie_word_embeddings=False)),
    "bert": ("bert", {}),
    "bert_5_labels": ("bert", dict(num_labels=5, hidden_act="gelu_new")),
}
# Where each architecture keeps its transformer blocks, read independently of the layer tables.
BLOCK_RE = {
    "gpt2": r"transformer/h/(\d+)/",
    "gpt_neo": r"transformer/h/(\d+)/",
    "t5": r"(encoder|decoder)/block/(\d+)/",
    "bart": r"model/(encoder|decoder)/layers/(\d+)/",
    "bert": r"bert/encoder/layer/(\d+)/",
}


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(case):
        if case not in cache:
            arch, kw = CASES[case]
            cache[case] = hf.tiny(arch, **kw)
        return cache[case]

    return get


def sample_batch(m):
    if m.kind == "classifier":
        return encode(m, ["the capital of france", "red blue"], [0, 2], text_pairs=["paris", "green"])
    return encode(m, ["the capital of france is", "red blue"], ["paris", "green yellow"])


def torch_logits(m, params, batch):
    """Logits of transformers' PyTorch twin with the same weights, on the same batch."""
    pt = hf.to_torch(m, params)
    keys = ["input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask", "token_type_ids"]
    with torch.no_grad():
        out = pt(**{k: torch.tensor(batch[k], dtype=torch.long) for k in keys if k in batch}).logits.numpy()
    return out[:, None, :] if m.kind == "classifier" else out


def real_positions(m, batch):
    """Positions whose logits are defined: padded positions may attend to nothing (GPT-Neo's local
    attention beyond the window), where PyTorch and Flax fill in different values."""
    if m.kind == "classifier":
        return np.ones(batch["labels"].shape, bool)
    if m.kind == "seq2seq":
        return batch["decoder_attention_mask"].astype(bool)
    return batch["attention_mask"].astype(bool)


@pytest.mark.parametrize("case", list(CASES))
def test_apply_matches_pytorch(models, case):
    m = models(case)
    b = sample_batch(m)
    ours = np.asarray(m.apply(m.params, b))
    ref = torch_logits(m, m.params, b)
    assert ours.shape == ref.shape
    S = b["labels"].shape[1]
    V = m.config.num_labels if m.kind == "classifier" else m.config.vocab_size
    assert ours.shape == (2, S, V)
    pos = real_positions(m, b)
    np.testing.assert_allclose(ours[pos], ref[pos], atol=1e-4, rtol=0)
    assert np.abs(ours).max() > 1e-3  # not a degenerate all-zero model


def test_apply_jits_and_differentiates(models):
    m = models("gpt_neo")
    b = sample_batch(m)
    w = m.layers["h.1"].mlp[0].path
    g = jax.jit(jax.grad(lambda p: m.apply(p, b).sum()))(m.params)
    assert get_path(g, w).shape == get_path(m.params, w).shape
    assert np.abs(np.asarray(get_path(g, w))).max() > 0


@pytest.mark.parametrize("case", list(CASES))
def test_layer_table_covers_every_block_once(models, case):
    m = models(case)
    t = m.layers
    t.check(m.params)
    paths = param_paths(m.params)
    # Blocks as found in the parameter tree, in the table's naming.
    found = []
    for p in paths:
        hit = re.match(BLOCK_RE[m.arch], p)
        if hit:
            g = hit.groups()
            name = f"{g[0]}.{g[1]}" if len(g) == 2 else f"{'layer' if m.arch == 'bert' else 'h'}.{g[0]}"
            if name not in found:
                found.append(name)
    assert sorted(t.names()) == sorted(found) and len(set(t.names())) == len(t.names())
    n = 2 if m.kind != "seq2seq" else 4
    assert len(t) == n
    if m.kind == "seq2seq":
        assert t.names() == ["encoder.0", "encoder.1", "decoder.0", "decoder.1"]
    # Each block lists exactly the 2-D kernels that live inside it (MLP + attention), nothing else.
    listed = {w.path for w in t.weights(part="all")}
    assert len(listed) == len(t.weights(part="all"))
    for blk in t:
        inside = {p for p in paths if p.startswith(blk.module_path + "/") and p.endswith("/kernel")}
        assert inside == {w.path for w in blk.weights("all")}, blk.name
    # Layouts: an MLP reads the model width and writes it back (catches a wrong in/out layout).
    d = {"gpt2": "n_embd", "gpt_neo": "hidden_size", "t5": "d_model", "bart": "d_model", "bert": "hidden_size"}
    width = getattr(m.config, d[m.arch])
    for blk in t:
        first, last = blk.mlp[0], blk.mlp[-1]
        fan_in, hidden = first.in_out_shape(get_path(m.params, first.path).shape)
        assert fan_in == width and hidden > width
        assert last.in_out_shape(get_path(m.params, last.path).shape) == (hidden, width)
    # The embedding module holds the token embedding table [vocab, width].
    assert get_path(m.params, t.embedding + "/embedding").shape == (m.config.vocab_size, width)


@pytest.mark.parametrize("case", ["gpt2", "gpt_neo", "t5_v1_1", "bart", "bert"])
def test_module_paths_are_called(models, case):
    """Every weight's module, every block's module and the embedding run during apply under the
    names the table gives (what flax.linen.intercept_methods sees)."""
    m = models(case)
    seen = set()

    def record(f, args, kwargs, ctx):
        seen.add("/".join(ctx.module.path))
        return f(*args, **kwargs)

    with nn.intercept_methods(record):
        m.apply(m.params, sample_batch(m))
    need = {w.module_path for w in m.layers.weights(part="all")} | {b.module_path for b in m.layers}
    assert need | {m.layers.embedding} <= seen


# the encoder-decoders (the costliest to compile twice more) in the slow suite (make test <= 5 min)
@pytest.mark.parametrize("arch", ["gpt2", "gpt_neo", pytest.param("t5", marks=pytest.mark.slow),
                                  pytest.param("bart", marks=pytest.mark.slow), "bert"])
def test_remat_and_bfloat16(arch):
    """remat=True gives the same logits and gradients; dtype="bfloat16" stays close to float32."""
    m = hf.tiny(arch, seed=2)
    r = hf.tiny(arch, seed=2, remat=True)
    b = sample_batch(m)
    loss = lambda model: (lambda p: (model.apply(p, b) ** 2).mean())  # noqa: E731
    (l1, g1), (l2, g2) = (jax.jit(jax.value_and_grad(loss(x)))(x.params) for x in (m, r))
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    for p in param_paths(g1):
        np.testing.assert_allclose(get_path(g1, p), get_path(g2, p), atol=1e-6, err_msg=p)
    bf = hf.tiny(arch, seed=2, dtype="bfloat16")
    assert all(x.dtype == jax.numpy.bfloat16 for x in jax.tree.leaves(bf.params))
    f32, low = np.asarray(m.apply(m.params, b)), np.asarray(bf.apply(bf.params, b), np.float32)
    pos = real_positions(m, b)
    assert np.abs(low[pos] - f32[pos]).max() < 0.05 * max(1.0, np.abs(f32).max())


def test_expected_weight_names():
    """The naming in the brief, spelled out for one block of each architecture."""
    neo = hf.gpt_neo_layers(hf._tiny_config("gpt_neo", 128, {}))["h.1"]
    assert [w.path for w in neo.mlp] == ["transformer/h/1/mlp/c_fc/kernel", "transformer/h/1/mlp/c_proj/kernel"]
    assert {w.layout for w in neo.mlp + neo.attention} == {"in_out"}
    gpt2 = hf.gpt2_layers(hf._tiny_config("gpt2", 128, {}))["h.0"]
    assert {w.layout for w in gpt2.mlp + gpt2.attention} == {"in_out"}  # our GPT-2 uses nn.Dense
    t5 = hf.t5_layers(hf._tiny_config("t5", 128, T5_V11))
    assert [w.path.split("/")[-2] for w in t5["decoder.1"].mlp] == ["wi_0", "wi_1", "wo"]
    assert [w.path.split("/")[-3] for w in t5["decoder.1"].attention] == ["SelfAttention"] * 4 + ["EncDecAttention"] * 4
    t5_v10 = hf.t5_layers(hf._tiny_config("t5", 128, {}))
    assert [w.path.split("/")[-2] for w in t5_v10["encoder.0"].mlp] == ["wi", "wo"]
    bart = hf.bart_layers(hf._tiny_config("bart", 128, {}))["decoder.0"]
    assert [w.path.split("/")[-2] for w in bart.mlp] == ["fc1", "fc2"]
    assert [w.path.split("/")[-3] for w in bart.attention] == ["self_attn"] * 4 + ["encoder_attn"] * 4
    bert = hf.bert_layers(hf._tiny_config("bert", 128, {}))["layer.1"]
    assert [w.path for w in bert.mlp] == [
        "bert/encoder/layer/1/intermediate/dense/kernel",
        "bert/encoder/layer/1/output/dense/kernel",
    ]


@pytest.mark.parametrize("case", ["gpt2", "t5", "bert"])
def test_unknown_layer_lists_valid_names(models, case):
    m = models(case)
    with pytest.raises(KeyError) as e:
        m.layers.select([m.layers.names()[0], "decoder.9"])
    for n in m.layers.names():
        assert n in str(e.value)


def test_tiny_special_ids_agree_with_tokenizer(models):
    for case in ("t5", "bart"):
        m = models(case)
        tok, cfg = m.tokenizer, m.config
        assert (tok.pad_token_id, tok.eos_token_id) == (0, 3)
        assert (cfg.pad_token_id, cfg.eos_token_id) == (0, 3)
        b = encode(m, ["the capital of france"], ["paris"])
        assert b["decoder_input_ids"][0, 0] == cfg.decoder_start_token_id
        assert b["labels"][0, 1] == cfg.eos_token_id and b["input_ids"][0, 4] == cfg.eos_token_id
    for case in ("gpt2", "gpt_neo"):
        m = models(case)
        assert (m.config.bos_token_id, m.config.eos_token_id) == (m.tokenizer.bos_token_id, m.tokenizer.eos_token_id)


def test_bert_uses_token_type_ids(models):
    m = models("bert")
    assert m.config.num_labels == 3
    b = sample_batch(m)
    # [CLS] a [SEP] b [SEP]: the pair's tokens carry type 1
    assert b["token_type_ids"][0].tolist()[:9] == [0, 0, 0, 0, 0, 0, 1, 1, 0]
    assert b["input_ids"][0, 0] == 2 and b["input_ids"][0, 5] == 3
    changed = dict(b, token_type_ids=np.zeros_like(b["token_type_ids"]))
    assert np.abs(np.asarray(m.apply(m.params, b)) - np.asarray(m.apply(m.params, changed))).max() > 1e-6


def test_unknown_architecture_is_a_clear_error():
    with pytest.raises(ValueError, match="unsupported architecture.*roberta.*supported: bart, bert, gpt2, gpt_neo, t5"):
        hf.arch_of("roberta")
    with pytest.raises(ValueError, match="no tiny config"):
        hf.tiny("roberta")
