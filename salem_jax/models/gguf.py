"""Llama-architecture GGUF files (llama.cpp's format) -> our Flax Llama, with a disk cache.

A GGUF file holds (possibly quantized) tensors under llama.cpp names plus metadata. Loading:

1. read with `gguf.GGUFReader`, dequantize every tensor to float32 (`gguf.quants.dequantize`);
   GGUF lists shapes fastest-axis first, so the numpy arrays already come in PyTorch's
   `[out, in]` order;
2. undo llama.cpp's row permutation of `attn_q` / `attn_k` (its converter interleaves the two
   rotary halves of every head; transformers' Llama keeps them in two contiguous halves);
3. rename to Hugging Face keys and hand the state dict to `llama.hf_to_params`;
4. build a `LlamaConfig` from the `llama.*` metadata and the tokenizer with
   `AutoTokenizer.from_pretrained(dir, gguf_file=name)`, then correct its special tokens from
   the metadata (transformers 4.57 takes eos = bos and always adds BOS; see `_fix_tokenizer`).

Step 4's tokenizer conversion alone takes about 16 s for a 49k vocabulary, so the result is
cached under `<cache root>/<file stem>-<key>`: config.json, params.safetensors (float32, our
parameter paths and `[in, out]` layout, so a cached load is a memory map and no transposes),
the tokenizer files and gguf_source.json. The key hashes the file's absolute path, size, mtime
and the converter version; the cache root is `$SALEM_JAX_CACHE` or `~/.cache/salem_jax`. Later
loads read only that folder (about 2 s for SmolLM2-135M). For a Hugging Face folder that
transformers opens, use `llama.save_llama_folder(model, model.params, out_dir)`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from salem_jax import env
from salem_jax.models import llama
from salem_jax.models.base import LoadedModel

# Bump when the conversion changes, so old cache entries are not reused.
CONVERTER_VERSION = 1

SUPPORTED_ARCHS = ("llama",)

_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def default_cache_root() -> Path:
    """`$SALEM_JAX_CACHE` if set, else `~/.cache/salem_jax`."""
    return env.cache_root()


def cache_entry(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache folder for a GGUF file: `<cache root>/<stem>-<key>`; the key changes when the
    file (absolute path, size, mtime) or the converter version changes."""
    p = Path(path).resolve()
    st = p.stat()
    key = hashlib.sha1(f"{p}|{st.st_size}|{st.st_mtime_ns}|v{CONVERTER_VERSION}".encode()).hexdigest()[:12]
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    return root / f"{p.stem}-{key}"


# ----------------------------------------------------------------------------- metadata


def _field(reader, name: str, default: Any = ..., *, where: str = "") -> Any:
    f = reader.fields.get(name)
    if f is None:
        if default is ...:
            raise KeyError(f"{where}: GGUF metadata field {name!r} is missing")
        return default
    return f.contents()


def _scalar_int(reader, name: str, default: Any = ..., *, where: str) -> Any:
    v = _field(reader, name, default, where=where)
    if isinstance(v, list):
        if len(set(v)) != 1:
            raise NotImplementedError(f"{where}: field {name!r} varies per layer ({v}); not supported")
        v = v[0]
    return v if v is None else int(v)


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's q/k permutation: rows `(n, 2, r, ...)` were stored as
    `(n, r, 2, ...)` (r = rows / n / 2). Works for weights `[rows, cols]` and biases `[rows]`."""
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"cannot unpermute {rows} rows into {n_heads} heads")
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter permutation of q/k rows (the inverse of `unpermute_rows`); used to
    write test files the way llama.cpp does."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_config(reader, *, where: str):
    """A transformers `LlamaConfig` from the GGUF metadata (and tensor list, for tying)."""
    from transformers import LlamaConfig

    arch = _field(reader, "general.architecture", where=where)
    if arch not in SUPPORTED_ARCHS:
        raise NotImplementedError(
            f"{where}: field 'general.architecture' is {arch!r}; salem_jax loads only "
            f"{', '.join(SUPPORTED_ARCHS)} GGUF files"
        )
    a = arch
    names = {t.name for t in reader.tensors}
    if _scalar_int(reader, f"{a}.expert_count", 0, where=where):
        raise NotImplementedError(f"{where}: mixture-of-experts GGUF files are not supported")
    if "rope_freqs.weight" in names:
        raise NotImplementedError(f"{where}: tensor 'rope_freqs.weight' (llama3 rope factors) is not supported")
    heads = _scalar_int(reader, f"{a}.attention.head_count", where=where)
    kv_heads = _scalar_int(reader, f"{a}.attention.head_count_kv", heads, where=where)
    hidden = _scalar_int(reader, f"{a}.embedding_length", where=where)
    hd = _scalar_int(reader, f"{a}.attention.key_length", hidden // heads, where=where)
    rope_dim = _scalar_int(reader, f"{a}.rope.dimension_count", hd, where=where)
    if rope_dim != hd:
        raise NotImplementedError(f"{where}: rope.dimension_count {rope_dim} != head dim {hd} (partial rotary)")
    scaling_type = _field(reader, f"{a}.rope.scaling.type", "none", where=where)
    if scaling_type in ("none", None):
        rope_scaling = None
    elif scaling_type == "linear":
        rope_scaling = {"rope_type": "linear", "factor": float(_field(reader, f"{a}.rope.scaling.factor", where=where))}
    else:
        raise NotImplementedError(f"{where}: field '{a}.rope.scaling.type' = {scaling_type!r} is not supported")
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embd is None:
        raise KeyError(f"{where}: tensor 'token_embd.weight' is missing")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = _scalar_int(reader, f"{a}.vocab_size", None, where=where)
    if vocab is None:
        vocab = len(tokens.data) if tokens is not None else int(embd.shape[-1])

    def tok_id(name):
        return _scalar_int(reader, f"tokenizer.ggml.{name}", None, where=where)

    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=_scalar_int(reader, f"{a}.feed_forward_length", where=where),
        num_hidden_layers=_scalar_int(reader, f"{a}.block_count", where=where),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hd,
        max_position_embeddings=_scalar_int(reader, f"{a}.context_length", where=where),
        rms_norm_eps=float(_field(reader, f"{a}.attention.layer_norm_rms_epsilon", 1e-5, where=where)),
        rope_theta=float(_field(reader, f"{a}.rope.freq_base", 10000.0, where=where)),
        rope_scaling=rope_scaling,
        tie_word_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names,
        mlp_bias="blk.0.ffn_up.bias" in names,
        bos_token_id=tok_id("bos_token_id"),
        eos_token_id=tok_id("eos_token_id"),
        pad_token_id=tok_id("padding_token_id"),
        architectures=["LlamaForCausalLM"],
    )


# ----------------------------------------------------------------------------- tensors


def _hf_name(gguf_name: str, *, where: str) -> str:
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _BLOCK_TENSORS:
        return f"model.layers.{parts[1]}.{_BLOCK_TENSORS[parts[2]]}.{parts[3]}"
    raise KeyError(f"{where}: unknown tensor {gguf_name!r} for a llama GGUF file")


def gguf_state_dict(reader, config, *, where: str, progress: bool = False) -> dict[str, np.ndarray]:
    """Dequantized float32 tensors under Hugging Face Llama names, PyTorch `[out, in]` layout,
    with the q/k row permutation undone."""
    from gguf.quants import dequantize
    from tqdm.auto import tqdm

    state = {}
    for t in tqdm(reader.tensors, desc=f"dequantizing {Path(where).name}", disable=not progress, leave=False):
        name = _hf_name(t.name, where=where)
        try:
            arr = dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise NotImplementedError(f"{where}: tensor {t.name!r} has unsupported type {t.tensor_type.name}: {e}")
        arr = np.asarray(arr, dtype=np.float32).reshape(tuple(int(d) for d in reversed(t.shape)))
        if ".self_attn.q_proj." in name:
            arr = unpermute_rows(arr, config.num_attention_heads)
        elif ".self_attn.k_proj." in name:
            arr = unpermute_rows(arr, config.num_key_value_heads)
        state[name] = arr
    return state


# ----------------------------------------------------------------------------- tokenizer


def _fix_tokenizer(tok, reader, *, where: str):
    """Make special tokens follow the GGUF metadata. transformers 4.57's GGUF conversion sets
    eos to the bos token and always adds BOS, whatever `tokenizer.ggml.eos_token_id` and
    `tokenizer.ggml.add_bos_token` say; llama.cpp (and the original HF tokenizer) follow them."""
    tokens = _field(reader, "tokenizer.ggml.tokens", None, where=where)
    if tokens is None:
        return tok
    specials = (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("pad_token", "padding_token_id"))
    for attr, field in specials:
        i = _scalar_int(reader, f"tokenizer.ggml.{field}", None, where=where)
        if i is not None:
            if not 0 <= i < len(tokens):
                raise ValueError(f"{where}: field 'tokenizer.ggml.{field}' = {i} is outside the vocabulary")
            setattr(tok, attr, tokens[i])
    add_bos = _field(reader, "tokenizer.ggml.add_bos_token", None, where=where)
    if add_bos is not None and hasattr(tok, "add_bos_token"):
        tok.add_bos_token = bool(add_bos)
    return tok


def gguf_tokenizer(path: Path, reader):
    """The tokenizer stored in the GGUF file, or None when the file has none."""
    from transformers import AutoTokenizer

    if "tokenizer.ggml.model" not in reader.fields:
        return None
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return _fix_tokenizer(tok, reader, where=str(path))


# ----------------------------------------------------------------------------- loading


def convert_gguf(path: str | os.PathLike, *, progress: bool = False):
    """GGUF file -> (LlamaConfig, PyTorch-layout float32 state dict, tokenizer or None)."""
    import gguf

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"GGUF file {p} does not exist")
    where = str(p)
    try:
        reader = gguf.GGUFReader(p)
    except Exception as e:  # the reader raises bare ValueErrors on bad magic / version
        raise ValueError(f"{where}: cannot read as GGUF: {e}") from e
    config = gguf_config(reader, where=where)
    llama.check_config(config)
    state = gguf_state_dict(reader, config, where=where, progress=progress)
    tok = gguf_tokenizer(p, reader)
    return config, state, tok


def load_gguf(
    path: str | os.PathLike,
    cache_dir: str | os.PathLike | None = None,
    dtype: str = "float32",
    *,
    cache: bool = True,
    remat: bool = False,
    progress: bool = True,
) -> LoadedModel:
    """A Llama-architecture GGUF file -> LoadedModel. `dtype` is the computation and parameter
    dtype (the cache always holds float32).

    `cache_dir` is the cache ROOT (default `$SALEM_JAX_CACHE` or `~/.cache/salem_jax`); the
    converted model lives in `<root>/<stem>-<key>` (see the module docstring) and later loads
    read only it. `cache=False` converts without reading or writing the cache.
    A first load converts the tokenizer from the GGUF metadata, which takes transformers
    about 16 s for a 49k vocabulary; a cached load takes about 2 s.
    `model.extra` records the source, the cache folder, whether it was a cache hit and the
    load time in seconds."""
    t0 = time.perf_counter()
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"GGUF file {p} does not exist")
    entry = cache_entry(p, cache_dir) if cache else None
    hit = entry is not None and entry.exists()
    if hit:
        config, params, tok = _read_cache(entry)
    else:
        config, state, tok = convert_gguf(p, progress=progress)
        params = llama.hf_to_params(state, config, where=str(p))
        del state
        if entry is not None:
            _write_cache(entry, config, params, tok, p)
    model = llama.from_params(p.stem, config, llama.cast_params(params, dtype), tok, dtype=dtype, remat=remat)
    extra = dict(
        model.extra,
        source=str(p),
        cache_dir=str(entry) if entry is not None else None,
        cache_hit=hit,
        load_seconds=round(time.perf_counter() - t0, 3),
    )
    return dataclasses.replace(model, name=p.stem, extra=extra)


def _write_cache(entry: Path, config, params, tok, source: Path) -> None:
    """config.json + params.safetensors (our layout, so a cached load needs no transposes) +
    tokenizer files + gguf_source.json, moved into place atomically."""
    st = source.resolve().stat()

    def fill(tmp: Path):
        config.save_pretrained(tmp)
        llama.write_params_safetensors(params, tmp / "params.safetensors")
        if tok is not None:
            tok.save_pretrained(tmp)
        info = {
            "source": str(source.resolve()),
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "converter_version": CONVERTER_VERSION,
            "has_tokenizer": tok is not None,
        }
        (tmp / "gguf_source.json").write_text(json.dumps(info, indent=1))

    llama.write_atomically(entry, fill, replace=False)


# tokenizer classes that `AutoTokenizer` builds as `PreTrainedTokenizerFast` itself (transformers 5
# names it TokenizersBackend): from tokenizer.json alone, no model-specific class
_PLAIN_FAST_TOKENIZERS = ("TokenizersBackend", "PreTrainedTokenizerFast")


def cached_tokenizer(entry: Path):
    """The tokenizer of a cache entry, as `AutoTokenizer.from_pretrained(entry)` builds it. When the
    entry's tokenizer_config.json names the plain fast tokenizer class (`_PLAIN_FAST_TOKENIZERS`,
    what transformers 5 writes for a GGUF tokenizer) it is built by that class directly: the same
    class and files, without `AutoTokenizer`'s import of torch (~3 s here; tests/test_gguf.py
    checks the two give the same object type, special tokens and token ids)."""
    import transformers

    tc = entry / "tokenizer_config.json"
    cls = json.loads(tc.read_text()).get("tokenizer_class") if tc.exists() else None
    if cls in _PLAIN_FAST_TOKENIZERS and (entry / "tokenizer.json").exists():
        return transformers.PreTrainedTokenizerFast.from_pretrained(str(entry))
    return transformers.AutoTokenizer.from_pretrained(str(entry))


def _read_cache(entry: Path):
    info_file = entry / "gguf_source.json"
    if not info_file.exists():
        raise FileNotFoundError(f"{entry}: not a salem_jax GGUF cache entry (no gguf_source.json); delete it")
    info = json.loads(info_file.read_text())
    # our own save_pretrained output: read without transformers' LlamaConfig (which imports torch)
    config = llama.JsonLlamaConfig.from_folder(entry)
    params = llama.read_params_safetensors(entry / "params.safetensors")
    llama.check_params(params, config, where=str(entry))
    tok = cached_tokenizer(entry) if info.get("has_tokenizer") else None
    return config, params, tok
