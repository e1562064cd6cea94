"""GGUF loading: tiny files written here the way llama.cpp writes them, read back by our loader
and by transformers' own GGUF loader (PyTorch)."""

import os

import gguf
import jax
import numpy as np
import pytest

from salem_jax.models import gguf as G
from salem_jax.models import llama
from salem_jax.models.base import get_path, param_paths

_BLOCK = {v: k for k, v in G._BLOCK_TENSORS.items()}


def _random_state(config, seed=0):
    """A PyTorch-layout state dict with weights large enough to make logits informative."""
    rng = np.random.RandomState(seed)
    sd = llama.params_to_hf(llama.init_params(config, seed), config)
    return {k: ((1 + 0.3 * rng.randn(*v.shape)) if "norm" in k else 0.2 * rng.randn(*v.shape)).astype(np.float32)
            for k, v in sd.items()}


def _tokenizer_fields(w, add_bos):
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    b2u = bytes_to_unicode()
    tokens = ["<|endoftext|>", "<s>", "</s>"] + [b2u[i] for i in range(256)] + ["th", "the", "Ġthe", "Ġp"]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_merges(["t h", "th e", "Ġ the", "Ġ p"])
    w.add_token_types([3] * 3 + [1] * (len(tokens) - 3))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    w.add_add_bos_token(add_bos)
    return tokens


VOCAB_WITH_TOKENIZER = 3 + 256 + 4


def write_llama_gguf(path, config, state, *, arch="llama", tokenizer=False, add_bos=False, skip=()):
    """Write F32 tensors under llama.cpp names with its q/k row permutation applied."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(config.num_hidden_layers)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_rope_freq_base(llama.rope_theta(config))  # transformers 5 keeps it in rope_parameters
    w.add_rope_dimension_count(llama.head_dim(config))
    if tokenizer:
        _tokenizer_fields(w, add_bos)
    inverse_globals = {v: k for k, v in G._GLOBAL_TENSORS.items()}
    for key, arr in state.items():
        if key in skip:
            continue
        if key in inverse_globals:
            name = inverse_globals[key]
        else:
            _, _, i, rest = key.split(".", 3)
            module, kind = rest.rsplit(".", 1)
            name = f"blk.{i}.{_BLOCK[module]}.{kind}"
        if ".self_attn.q_proj." in key:
            arr = G.permute_rows(arr, config.num_attention_heads)
        elif ".self_attn.k_proj." in key:
            arr = G.permute_rows(arr, config.num_key_value_heads)
        w.add_tensor(name, np.ascontiguousarray(arr))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _ids():
    rng = np.random.RandomState(0)
    ids = rng.randint(3, 100, (2, 9)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    return ids, mask


def test_permutation_is_inverted():
    w = np.arange(48 * 5, dtype=np.float32).reshape(48, 5)
    b = np.arange(48, dtype=np.float32)
    for n in (1, 2, 3, 4):
        np.testing.assert_array_equal(G.unpermute_rows(G.permute_rows(w, n), n), w)
        np.testing.assert_array_equal(G.unpermute_rows(G.permute_rows(b, n), n), b)
    # Rows of a head go from [first half, second half] to interleaved pairs (llama.cpp's rotary layout).
    head = np.arange(8, dtype=np.float32)
    np.testing.assert_array_equal(G.permute_rows(head, 1), [0, 4, 1, 5, 2, 6, 3, 7])


def test_round_trip_matches_source_and_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = llama.tiny_config(tie_word_embeddings=False, rope_theta=5e4, rms_norm_eps=1e-4,
                               vocab_size=VOCAB_WITH_TOKENIZER)
    state = _random_state(config, seed=1)
    path = write_llama_gguf(tmp_path / "tiny.gguf", config, state, tokenizer=True)

    m = G.load_gguf(path, cache=False)
    assert llama.rope_theta(m.config) == 5e4 and m.config.num_key_value_heads == 2
    assert m.config.rms_norm_eps == pytest.approx(1e-4) and m.config.max_position_embeddings == 128
    assert not m.config.tie_word_embeddings and m.extra["cache_hit"] is False
    want = llama.hf_to_params(state, config)
    for p in param_paths(want):
        np.testing.assert_array_equal(np.asarray(get_path(m.params, p)), np.asarray(get_path(want, p)))

    # transformers' own GGUF loader undoes llama.cpp's permutation the same way.
    pt = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", dtype=torch.float32).eval()
    ids, mask = _ids()
    with torch.no_grad():
        ref = pt(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).logits.numpy()
    ours = np.asarray(m.apply(m.params, {"input_ids": ids, "attention_mask": mask}))
    assert np.abs(ours - ref).max() < 1e-4

    # Tokenizer: special tokens follow the metadata (transformers alone would say eos = <s>).
    tok = m.tokenizer
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 0)
    assert tok.convert_ids_to_tokens(tok("the the pit")["input_ids"]) == ["the", "Ġthe", "Ġp", "i", "t"]


def test_tied_tokenizerless_file_and_bos(tmp_path):
    config = llama.tiny_config(tie_word_embeddings=True)
    state = _random_state(config, seed=2)
    m = G.load_gguf(write_llama_gguf(tmp_path / "tied.gguf", config, state), cache=False)
    assert m.config.tie_word_embeddings and "lm_head" not in m.params
    assert m.tokenizer is None  # no tokenizer.ggml.* metadata in the file
    np.testing.assert_array_equal(
        np.asarray(m.params["model"]["embed_tokens"]["embedding"]), state["model.embed_tokens.weight"]
    )

    config2 = llama.tiny_config(vocab_size=VOCAB_WITH_TOKENIZER)
    path = write_llama_gguf(tmp_path / "bos.gguf", config2, _random_state(config2), tokenizer=True, add_bos=True)
    tok = G.load_gguf(path, cache=False).tokenizer
    assert tok("the")["input_ids"] == [1, 260]


def test_cache_is_written_once_and_read_alone(tmp_path, monkeypatch):
    config = llama.tiny_config(vocab_size=VOCAB_WITH_TOKENIZER)
    state = _random_state(config, seed=3)
    path = write_llama_gguf(tmp_path / "c.gguf", config, state, tokenizer=True)
    root = tmp_path / "cache"

    first = G.load_gguf(path, cache_dir=root)
    entry = G.cache_entry(path, root)
    assert first.extra["cache_hit"] is False and first.extra["cache_dir"] == str(entry)
    assert sorted(p.name for p in root.iterdir()) == [entry.name]  # no temp folders left
    assert (entry / "params.safetensors").exists() and (entry / "tokenizer.json").exists()

    def no_conversion(*a, **k):
        raise AssertionError("a cached load must not convert the GGUF file again")

    monkeypatch.setattr(G, "convert_gguf", no_conversion)
    second = G.load_gguf(path, cache_dir=root)
    assert second.extra["cache_hit"] is True
    for a, b in zip(jax.tree_util.tree_leaves(first.params), jax.tree_util.tree_leaves(second.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert second.tokenizer("the pit")["input_ids"] == first.tokenizer("the pit")["input_ids"]
    assert second.tokenizer.eos_token_id == 2
    assert second.config.to_dict() == first.config.to_dict()

    # A changed file gets a new entry; the environment variable moves the default root.
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert G.cache_entry(path, root) != entry
    monkeypatch.setenv("SALEM_JAX_CACHE", str(tmp_path / "env"))
    assert G.cache_entry(path).parent == tmp_path / "env"


TEXTS = ["the the pit", "The capital of Peru is Lima", "  leading spaces and <s> specials </s>", "é ü 北京 🙂",
         "the\nnew line\tand tab", ""]


def _same_as_transformers(entry, config, tok):
    """A cache entry's torch-free config and tokenizer (`_read_cache`) against transformers'
    LlamaConfig.from_pretrained and AutoTokenizer.from_pretrained of the same folder: every field
    our Llama reads, the helpers' results, the tokenizer's class, special tokens and token ids."""
    from transformers import AutoTokenizer, LlamaConfig

    real = LlamaConfig.from_pretrained(entry)
    assert isinstance(config, llama.JsonLlamaConfig)
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "hidden_act", "initializer_range",
                 "tie_word_embeddings", "eos_token_id", "bos_token_id", "pad_token_id", "num_labels", "architectures"):
        assert getattr(config, name) == getattr(real, name), name
    for name in llama.JsonLlamaConfig.OPTIONAL:  # absent here, or the same value
        assert getattr(config, name, "absent") in ("absent", getattr(real, name, "absent")), name
    assert llama.head_dim(config) == llama.head_dim(real)
    assert llama.rope_theta(config) == llama.rope_theta(real)
    assert llama.rope_type(config) == llama.rope_type(real)
    np.testing.assert_array_equal(llama.rope_inv_freq(config), llama.rope_inv_freq(real))
    assert llama.param_shapes(config) == llama.param_shapes(real)
    assert config.to_dict() == real.to_dict()
    auto = AutoTokenizer.from_pretrained(entry)
    assert type(tok) is type(auto)
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (auto.bos_token, auto.eos_token,
                                                                             auto.pad_token, auto.unk_token)
    for t in TEXTS:
        assert tok(t)["input_ids"] == auto(t)["input_ids"], t
        assert tok.decode(auto(t)["input_ids"]) == auto.decode(auto(t)["input_ids"]), t
    batch = [t for t in TEXTS if t]
    assert tok(batch, padding=True)["input_ids"] == auto(batch, padding=True)["input_ids"]


def test_cached_load_reads_config_and_tokenizer_without_torch_equal_to_transformers(tmp_path):
    config = llama.tiny_config(vocab_size=VOCAB_WITH_TOKENIZER, rope_theta=5e4)
    state = _random_state(config, seed=4)
    path = write_llama_gguf(tmp_path / "t.gguf", config, state, tokenizer=True)
    root = tmp_path / "cache"
    first = G.load_gguf(path, cache_dir=root)  # converts (transformers' LlamaConfig)
    second = G.load_gguf(path, cache_dir=root)  # the cached entry: JsonLlamaConfig
    assert second.extra["cache_hit"] is True
    _same_as_transformers(G.cache_entry(path, root), second.config, second.tokenizer)
    ids, mask = _ids()
    batch = {"input_ids": ids, "attention_mask": mask}
    np.testing.assert_array_equal(np.asarray(second.apply(second.params, batch)),
                                  np.asarray(first.apply(first.params, batch)))
    # the config is read-only; a copy for saving is transformers' own
    with pytest.raises(AttributeError):
        second.config.vocab_size = 3
    assert llama.hf_config(second.config).to_dict() == first.config.to_dict()
    saved = llama.load_llama_folder(llama.save_llama_folder(second, second.params, tmp_path / "saved"))
    np.testing.assert_array_equal(np.asarray(saved.apply(saved.params, batch)),
                                  np.asarray(first.apply(first.params, batch)))


def test_cached_load_imports_no_torch(tmp_path):
    """In a fresh interpreter, a cached load imports neither torch nor transformers' Llama."""
    import subprocess
    import sys

    config = llama.tiny_config(vocab_size=VOCAB_WITH_TOKENIZER)
    path = write_llama_gguf(tmp_path / "t.gguf", config, _random_state(config, seed=5), tokenizer=True)
    G.load_gguf(path, cache_dir=tmp_path / "cache")
    code = ("import sys; from salem_jax.models import gguf as G; "
            f"m = G.load_gguf({str(path)!r}, cache_dir={str(tmp_path / 'cache')!r}); "
            "assert m.extra['cache_hit']; m.tokenizer('the pit'); llama_cfg = m.config.hidden_size; "
            "print('torch' in sys.modules, 'transformers.models.llama' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.stdout.split()[-2:] == ["False", "False"], out.stdout + out.stderr


@pytest.mark.slow
def test_packaged_smollm2_cached_tokenizer_and_config_equal_transformers():
    """The main job's model (the packaged SmolLM2 GGUF, cached): the torch-free config and tokenizer
    against transformers', on the capitals rows' prompts too."""
    from salem_jax.models.loading import load_model

    m = load_model("smollm2-135m")
    m = load_model("smollm2-135m")  # the first load may have converted; this one reads the cache
    assert m.extra["cache_hit"] is True
    entry = m.extra["cache_dir"]
    _same_as_transformers(entry, m.config, m.tokenizer)
    from transformers import AutoTokenizer

    from salem_jax.data.countries import country_records

    auto = AutoTokenizer.from_pretrained(entry)
    texts = [t for r in country_records("all") for t in (r.prompt, r.prompt + " " + r.target_true, *r.rephrases)]
    assert len(texts) > 1000
    for t in texts:
        assert m.tokenizer(t)["input_ids"] == auto(t)["input_ids"], t


def test_bad_files_raise_clearly(tmp_path):
    config = llama.tiny_config()
    state = _random_state(config)
    with pytest.raises(NotImplementedError, match="general.architecture.*'gpt2'"):
        G.load_gguf(write_llama_gguf(tmp_path / "a.gguf", config, state, arch="gpt2"), cache=False)
    missing = write_llama_gguf(tmp_path / "m.gguf", config, state, skip=("model.layers.1.mlp.up_proj.weight",))
    with pytest.raises(KeyError, match=r"m\.gguf.*model\.layers\.1\.mlp\.up_proj\.weight"):
        G.load_gguf(missing, cache=False)
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="junk.gguf"):
        G.load_gguf(tmp_path / "junk.gguf", cache=False)
    with pytest.raises(FileNotFoundError):
        G.load_gguf(tmp_path / "absent.gguf")
