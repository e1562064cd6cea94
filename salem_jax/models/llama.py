"""Our own Llama-family causal LM in flax.linen, and its Hugging Face folder format.

Why not transformers' `FlaxLlamaForCausalLM`: it hard-codes the rotary base at 10000 and never
ties `lm_head` to the embeddings, so modern checkpoints (SmolLM2: rope_theta 1e5, tied) drift
by whole logits (see STACK.md). This module reads `rope_theta`, ties when the config says so, and
keeps every projection its own `nn.Dense` (kernel `[in, out]`) inside an explicit python loop
of layers, so parameter paths mirror Hugging Face names one to one:

    model/embed_tokens/embedding                      [V, H]
    model/layers/{i}/input_layernorm/weight           [H]
    model/layers/{i}/self_attn/{q,k,v,o}_proj/kernel  [in, out]
    model/layers/{i}/post_attention_layernorm/weight  [H]
    model/layers/{i}/mlp/{gate,up,down}_proj/kernel   [in, out]
    model/norm/weight                                 [H]
    lm_head/kernel                                    [H, V]   (absent when tied)

and `flax.linen.intercept_methods` sees each projection's call under its module path
(`model/layers/3/mlp/down_proj`). Conversion to and from a PyTorch state dict is a path
rename plus a transpose of 2-D Linear weights (`hf_to_params`, `params_to_hf`).

The config object is transformers' `LlamaConfig`. `dtype` is the computation dtype (bfloat16
on accelerators if you like; norms, softmax and rotary tables run in float32 as in
transformers); the module accepts float32 or bfloat16 parameters, and the loaders cast the
parameters to the same `dtype` (float32 by default).
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from salem_jax.models.base import Block, LayerTable, LoadedModel, Weight, param_paths
from salem_jax.models.blocks import cache_visible, cached_kv, cached_lm_logits, causal_lm_logits, make_kv_decode

# Added to masked attention scores instead of -inf, so a row with no visible key (an all-zero
# attention_mask) softmaxes to uniform weights rather than NaN.
MASK_VALUE = -1e30

SUPPORTED_ROPE = ("default", "linear", "llama3")

_ACTIVATIONS = {
    "silu": nn.silu,
    "swish": nn.silu,
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "relu": nn.relu,
}


# ----------------------------------------------------------------------------- config helpers


class JsonLlamaConfig:
    """A Llama config.json written by transformers' `save_pretrained`, read as attributes without
    importing transformers.

    Why: transformers' `LlamaConfig` imports torch when it is installed (configuration_utils ->
    modeling_rope_utils), 4-5 s of every load of the cached SmolLM2 (`gguf._read_cache`) on this
    2-core CPU, while the model reads only plain fields. Every field of the JSON is an attribute.
    The fields this module probes with a default (`getattr(config, name, default)`: OPTIONAL) are
    absent when the JSON lacks them, so those helpers (`head_dim`, `rope_theta`, `rope_scaling`,
    `rope_inv_freq`, `param_shapes`) take the values LlamaConfig's defaults give
    (tests/test_gguf.py compares them and the logits with LlamaConfig's). Any other attribute, and
    `to_dict` / `save_pretrained` / `hf()`, comes from the real LlamaConfig built from the same
    JSON on first use (transformers imported then), so nothing reads a field this class lacks."""

    OPTIONAL = ("head_dim", "rope_theta", "rope_scaling", "rope_parameters", "partial_rotary_factor",
                "attention_bias", "mlp_bias")

    def __init__(self, fields: dict, where: str = "config.json"):
        if fields.get("model_type") != "llama":
            raise ValueError(f"{where}: field 'model_type' is {fields.get('model_type')!r}, expected 'llama'")
        self.__dict__["_fields"] = dict(fields)
        self.__dict__["_where"] = where
        self.__dict__["_hf"] = None

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> "JsonLlamaConfig":
        path = Path(folder) / "config.json"
        try:
            fields = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        return cls(fields, where=str(path))

    def hf(self):
        """The transformers LlamaConfig of the same JSON (built once)."""
        if self.__dict__["_hf"] is None:
            from transformers import LlamaConfig

            self.__dict__["_hf"] = LlamaConfig.from_dict(dict(self._fields))
        return self.__dict__["_hf"]

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        fields = self.__dict__["_fields"]
        if name in fields:
            return fields[name]
        if name in JsonLlamaConfig.OPTIONAL:
            raise AttributeError(f"{self._where} has no field {name!r}")
        return getattr(self.hf(), name)

    def __setattr__(self, name: str, value) -> None:
        raise AttributeError(f"JsonLlamaConfig is read-only; use .hf() for a LlamaConfig to change ({name!r})")

    def __repr__(self) -> str:
        return f"JsonLlamaConfig({self._where})"


def hf_config(config):
    """`config` as a transformers config object (JsonLlamaConfig -> its LlamaConfig; others unchanged)."""
    return config.hf() if isinstance(config, JsonLlamaConfig) else config


def head_dim(config) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def rope_scaling(config):
    """The rotary settings dict: `config.rope_scaling` (transformers 4), else
    `config.rope_parameters` (transformers 5 moved rope_theta and the scaling there); None
    when neither is set."""
    scaling = getattr(config, "rope_scaling", None)
    if scaling is None:
        scaling = getattr(config, "rope_parameters", None)
    return scaling


def rope_theta(config) -> float:
    """The rotary base: `config.rope_theta` (transformers 4) or `config.rope_parameters["rope_theta"]` (5)."""
    theta = getattr(config, "rope_theta", None)
    if theta is None:
        theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta")
    if theta is None:
        raise ValueError("Llama config has no rope_theta (nor rope_parameters['rope_theta'])")
    return float(theta)


def rope_type(config) -> str:
    """The rotary variant named by `rope_scaling(config)` ("default" when it is None)."""
    scaling = rope_scaling(config)
    if not scaling:
        return "default"
    if not isinstance(scaling, dict):
        raise ValueError(f"config.rope_scaling must be a dict or None, got {scaling!r}")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in SUPPORTED_ROPE:
        raise NotImplementedError(
            f"config.rope_scaling rope_type {kind!r} is not supported by salem_jax's Llama "
            f"(supported: {', '.join(SUPPORTED_ROPE)})"
        )
    return kind


def rope_inv_freq(config) -> np.ndarray:
    """Inverse rotary frequencies `[head_dim // 2]` (float32), as transformers computes them."""
    dim = head_dim(config)
    if getattr(config, "partial_rotary_factor", 1.0) != 1.0:
        raise NotImplementedError("partial_rotary_factor != 1 is not supported by salem_jax's Llama")
    base = np.float32(rope_theta(config))
    inv = (1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))).astype(np.float32)
    kind = rope_type(config)
    if kind == "linear":
        inv = inv / np.float32(rope_scaling(config)["factor"])
    elif kind == "llama3":
        # Llama 3.1 frequency-dependent scaling: long wavelengths are slowed by `factor`, short
        # ones kept, and the band between is interpolated smoothly.
        s = rope_scaling(config)
        factor, lo, hi = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
        old_ctx = float(s["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old_ctx / lo, inv / factor, inv)
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_ctx / hi) & ~(wavelen > old_ctx / lo)
        inv = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv


def check_config(config) -> None:
    """Raise a clear error for Llama configs this implementation cannot run exactly."""
    if config.num_attention_heads % config.num_key_value_heads:
        raise ValueError(
            f"num_attention_heads ({config.num_attention_heads}) must be a multiple of "
            f"num_key_value_heads ({config.num_key_value_heads})"
        )
    if config.hidden_act not in _ACTIVATIONS:
        raise NotImplementedError(f"hidden_act {config.hidden_act!r} is not supported ({', '.join(_ACTIVATIONS)})")
    rope_type(config)


# ----------------------------------------------------------------------------- modules


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 (transformers' LlamaRMSNorm)."""

    eps: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.param("weight", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return w.astype(self.dtype) * y.astype(self.dtype)


def _rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def rotary_tables(config, position_ids: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """cos, sin `[B, T, head_dim]` for integer positions `[B, T]` (float32 math, cast to dtype)."""
    inv = jnp.asarray(rope_inv_freq(config))
    freqs = position_ids.astype(jnp.float32)[..., None] * inv  # [B, T, D/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def _dense(config, features: int, bias: bool, dtype, name: str) -> nn.Dense:
    return nn.Dense(
        features,
        use_bias=bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.initializers.normal(config.initializer_range),
        name=name,
    )


class LlamaAttention(nn.Module):
    """Grouped-query self-attention with rotary positions (kv head h serves query heads
    h*G .. h*G+G-1, G = heads / kv heads, as transformers' repeat_kv).

    With `cache_pos` [B] (cache mode, `salem_jax.models.blocks.cached_kv`) the rotated keys and
    the values of the T new tokens are written to this module's "cache" at each row's slot and
    the queries attend over the whole cache; `visible` is then `[B, T, L]` over cache slots."""

    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, visible: jax.Array, cache_pos=None) -> jax.Array:
        cfg = self.config
        B, T, _ = x.shape
        D, H, Hkv = head_dim(cfg), cfg.num_attention_heads, cfg.num_key_value_heads
        G = H // Hkv
        bias = bool(getattr(cfg, "attention_bias", False))
        q = _dense(cfg, H * D, bias, self.dtype, "q_proj")(x).reshape(B, T, H, D)
        k = _dense(cfg, Hkv * D, bias, self.dtype, "k_proj")(x).reshape(B, T, Hkv, D)
        v = _dense(cfg, Hkv * D, bias, self.dtype, "v_proj")(x).reshape(B, T, Hkv, D)
        c, s = cos[:, :, None, :], sin[:, :, None, :]
        q = q * c + _rotate_half(q) * s
        k = k * c + _rotate_half(k) * s
        if cache_pos is not None:
            k, v = cached_kv(self, k, v, cache_pos)  # [B, L, Hkv, D]
        q = q.reshape(B, T, Hkv, G, D)
        scores = jnp.einsum("bthgd,bshd->bhgts", q, k).astype(jnp.float32) * (D**-0.5)
        scores = jnp.where(visible[:, None, None], scores, MASK_VALUE)  # visible: [B, T, S]
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhgts,bshd->bthgd", probs, v).reshape(B, T, H * D)
        return _dense(cfg, cfg.hidden_size, bias, self.dtype, "o_proj")(out)


class LlamaMLP(nn.Module):
    """SwiGLU: down(act(gate(x)) * up(x))."""

    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        bias = bool(getattr(cfg, "mlp_bias", False))
        act = _ACTIVATIONS[cfg.hidden_act]
        gate = _dense(cfg, cfg.intermediate_size, bias, self.dtype, "gate_proj")(x)
        up = _dense(cfg, cfg.intermediate_size, bias, self.dtype, "up_proj")(x)
        return _dense(cfg, cfg.hidden_size, bias, self.dtype, "down_proj")(act(gate) * up)


class LlamaDecoderLayer(nn.Module):
    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h: jax.Array, cos: jax.Array, sin: jax.Array, visible: jax.Array, cache_pos=None) -> jax.Array:
        cfg = self.config
        a = RMSNorm(cfg.rms_norm_eps, self.dtype, name="input_layernorm")(h)
        h = h + LlamaAttention(cfg, self.dtype, name="self_attn")(a, cos, sin, visible, cache_pos)
        m = RMSNorm(cfg.rms_norm_eps, self.dtype, name="post_attention_layernorm")(h)
        return h + LlamaMLP(cfg, self.dtype, name="mlp")(m)


class LlamaLayers(nn.Module):
    """The decoder layers as submodules "0", "1", ... (a python loop, not nn.scan, so every
    layer has its own parameter path and can be intercepted or edited alone)."""

    config: Any
    dtype: Any = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, h, cos, sin, visible, cache_pos=None):
        layer_cls = nn.remat(LlamaDecoderLayer) if self.remat else LlamaDecoderLayer
        for i in range(self.config.num_hidden_layers):
            h = layer_cls(self.config, self.dtype, name=str(i))(h, cos, sin, visible, cache_pos)
        return h


class LlamaModel(nn.Module):
    """Embeddings, decoder layers and the final norm: hidden states `[B, T, H]`."""

    config: Any
    dtype: Any = jnp.float32
    remat: bool = False

    def setup(self):
        cfg = self.config
        self.embed_tokens = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            embedding_init=nn.initializers.normal(cfg.initializer_range),
        )
        self.layers = LlamaLayers(cfg, self.dtype, self.remat)
        self.norm = RMSNorm(cfg.rms_norm_eps, self.dtype)

    def __call__(
        self, input_ids: jax.Array, attention_mask: jax.Array, position_ids: jax.Array, cache_pos=None
    ) -> jax.Array:
        """Without `cache_pos`: attention_mask [B, T] over the input tokens. With `cache_pos` [B]
        (cache mode): attention_mask [B, L] over the cache slots, the new tokens sit at slots
        cache_pos[b] + t (see `salem_jax.models.blocks.cache_visible`)."""
        T = input_ids.shape[1]
        if cache_pos is None:
            causal = jnp.tril(jnp.ones((T, T), bool))
            visible = causal[None] & (attention_mask[:, None, :] > 0)  # [B, T(query), S(key)]
        else:
            visible = cache_visible(attention_mask, cache_pos, T)  # [B, T, L]
        cos, sin = rotary_tables(self.config, position_ids, self.dtype)
        h = self.embed_tokens(input_ids)
        h = self.layers(h, cos, sin, visible, cache_pos)
        return self.norm(h)


class LlamaForCausalLM(nn.Module):
    """`__call__(input_ids [B,T], attention_mask [B,T] | None, position_ids [B,T] | None)
    -> logits [B, T, V]` (float32). Position ids default to arange(T) (right padding)."""

    config: Any
    dtype: Any = jnp.float32
    remat: bool = False

    def setup(self):
        check_config(self.config)
        self.model = LlamaModel(self.config, self.dtype, self.remat)
        if not self.config.tie_word_embeddings:
            self.lm_head = _dense(self.config, self.config.vocab_size, False, self.dtype, "lm_head")

    def __call__(self, input_ids, attention_mask=None, position_ids=None):
        tied = self.config.tie_word_embeddings
        head = (lambda h: self.model.embed_tokens.attend(h)) if tied else (lambda h: self.lm_head(h))
        return causal_lm_logits(self.model, head, input_ids, attention_mask, position_ids)

    def decode(self, input_ids, key_mask, position_ids, cache_pos, head_pos):
        """KV-cached pass (apply with `mutable=["cache"]`): input_ids and position_ids [B, T] are
        the new tokens, written to the cache at slots cache_pos[b] ..; key_mask [B, L] marks the
        filled slots (these included); logits [B, K, V] at head_pos [B, K] (indices into T).
        The first call (T = L, cache_pos 0) creates the cache. `salem_jax.generate` uses it."""
        tied = self.config.tie_word_embeddings
        head = (lambda h: self.model.embed_tokens.attend(h)) if tied else (lambda h: self.lm_head(h))
        return cached_lm_logits(self.model, head, input_ids, key_mask, position_ids, cache_pos, head_pos)


# ----------------------------------------------------------------------------- LoadedModel glue


def llama_layers(config) -> LayerTable:
    blocks = []
    for i in range(config.num_hidden_layers):
        p = f"model/layers/{i}"
        blocks.append(
            Block(
                name=f"layers.{i}",
                mlp=tuple(Weight(f"{p}/mlp/{n}/kernel", "in_out") for n in ("gate_proj", "up_proj", "down_proj")),
                attention=tuple(
                    Weight(f"{p}/self_attn/{n}/kernel", "in_out") for n in ("q_proj", "k_proj", "v_proj", "o_proj")
                ),
            )
        )
    return LayerTable(tuple(blocks), embedding="model/embed_tokens")


def _make_apply(module: LlamaForCausalLM):
    def apply(params, batch):
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        return module.apply({"params": params}, ids, mask)

    return apply


def from_params(
    name: str, config, params, tokenizer=None, *, dtype="float32", remat: bool = False, **extra
) -> LoadedModel:
    """Wrap Llama `params` (our path layout) and a `LlamaConfig` as a LoadedModel.

    `dtype` is the computation dtype (params are used as given); `remat` recomputes each
    layer's activations in the backward pass (less memory for long sequences); `extra` goes
    to `LoadedModel.extra`."""
    module = LlamaForCausalLM(config, jnp.dtype(dtype), remat)
    check_config(config)
    check_params(params, config, where=name)
    layers = llama_layers(config)
    return LoadedModel(
        name=name,
        arch="llama",
        kind="causal",
        apply=_make_apply(module),
        params=params,
        config=config,
        tokenizer=tokenizer,
        layers=layers,
        max_length=int(config.max_position_embeddings),
        module=module,
        extra=dict(dtype=str(jnp.dtype(dtype)), **extra),
        kv_decode=make_kv_decode(module),
    )


def param_shapes(config) -> dict[str, tuple[int, ...]]:
    """Path -> shape of every parameter for `config`, computed from the config alone (no
    tracing, so validating a 30-layer checkpoint costs nothing). Equal to the shapes of
    `abstract_params(config)` (a test checks that)."""
    H, V, I = config.hidden_size, config.vocab_size, config.intermediate_size
    D = head_dim(config)
    nq, nkv = config.num_attention_heads * D, config.num_key_value_heads * D
    att_bias = bool(getattr(config, "attention_bias", False))
    mlp_bias = bool(getattr(config, "mlp_bias", False))
    out: dict[str, tuple[int, ...]] = {"model/embed_tokens/embedding": (V, H), "model/norm/weight": (H,)}
    for i in range(config.num_hidden_layers):
        p = f"model/layers/{i}"
        out[f"{p}/input_layernorm/weight"] = (H,)
        out[f"{p}/post_attention_layernorm/weight"] = (H,)
        for name, (fi, fo) in {"q_proj": (H, nq), "k_proj": (H, nkv), "v_proj": (H, nkv), "o_proj": (nq, H)}.items():
            out[f"{p}/self_attn/{name}/kernel"] = (fi, fo)
            if att_bias:
                out[f"{p}/self_attn/{name}/bias"] = (fo,)
        for name, (fi, fo) in {"gate_proj": (H, I), "up_proj": (H, I), "down_proj": (I, H)}.items():
            out[f"{p}/mlp/{name}/kernel"] = (fi, fo)
            if mlp_bias:
                out[f"{p}/mlp/{name}/bias"] = (fo,)
    if not config.tie_word_embeddings:
        out["lm_head/kernel"] = (H, V)
    return out


def check_params(params, config, *, where: str = "params") -> None:
    """Raise naming `where` and the path if `params` does not have exactly the parameters
    (paths and shapes) that `config` needs."""
    want = param_shapes(config)
    have = {p: tuple(np.shape(x)) for p, x in zip(param_paths(params), jax.tree_util.tree_leaves(params))}
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    if missing or extra:
        raise ValueError(f"{where}: parameters do not match the config: missing {missing[:5]}, unexpected {extra[:5]}")
    for p, shape in want.items():
        if have[p] != shape:
            raise ValueError(f"{where}: parameter {p} has shape {have[p]}, expected {shape}")


def cast_params(params, dtype):
    """Floating leaves cast to `dtype` (a new tree; float32 leaves stay as they are for
    "float32"). The loaders use it so `dtype="bfloat16"` halves parameter memory, as
    `salem_jax.models.load_model` documents for every architecture."""
    dt = jnp.dtype(dtype)
    return jax.tree_util.tree_map(lambda x: x.astype(dt) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


def abstract_params(config) -> dict:
    """Shapes/dtypes of the parameter tree for `config` by tracing `init` (no allocation)."""
    module = LlamaForCausalLM(config)
    ids = jnp.zeros((1, 2), jnp.int32)
    return jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), ids))["params"]


def init_params(config, seed: int = 0) -> dict:
    """Random parameters (normal(initializer_range) kernels and embeddings, unit norms)."""
    module = LlamaForCausalLM(config)
    return module.init(jax.random.PRNGKey(seed), jnp.zeros((1, 2), jnp.int32))["params"]


def tiny_config(vocab_size: int = 128, **overrides):
    """A 2-layer, width-64, 4-head / 2-kv-head LlamaConfig (GQA) for tests."""
    from transformers import LlamaConfig

    kw = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=0,
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


def tiny_llama(
    seed: int = 0,
    vocab_size: int = 128,
    rope_theta: float = 100000.0,
    tie_word_embeddings: bool = True,
    dtype: str = "float32",
    remat: bool = False,
    **config_overrides,
) -> LoadedModel:
    """A tiny random Llama (2 layers, width 64, 4 heads, 2 kv heads) with the word-level test
    tokenizer of `salem_jax.testing`. Defaults mirror SmolLM2 (rope_theta 1e5, tied)."""
    from salem_jax.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    if vocab_size < len(tok):
        raise ValueError(f"vocab_size {vocab_size} is smaller than the tiny tokenizer's {len(tok)} tokens")
    cfg = tiny_config(vocab_size, rope_theta=rope_theta, tie_word_embeddings=tie_word_embeddings, **config_overrides)
    params = cast_params(init_params(cfg, seed), dtype)
    return from_params("tiny-llama", cfg, params, tok, dtype=dtype, remat=remat)


# ----------------------------------------------------------------------------- HF state dicts


def _hf_key(path: str) -> tuple[str, bool]:
    """Our param path -> (PyTorch state-dict key, whether the array is transposed)."""
    parts = path.split("/")
    last = parts[-1]
    if last == "kernel":
        return ".".join(parts[:-1]) + ".weight", True
    if last == "embedding":
        return ".".join(parts[:-1]) + ".weight", False
    return ".".join(parts), False  # norm "weight", Dense "bias"


# State-dict entries that carry no parameters of ours (buffers of older checkpoints).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def hf_to_params(state: dict[str, np.ndarray], config, *, where: str = "checkpoint") -> dict:
    """A PyTorch-layout Llama state dict (numpy arrays) -> our float32 parameter tree.

    Raises naming `where` and the key for any missing, mis-shaped or unexpected tensor."""
    flat = {}
    used = set()
    for path, shape in param_shapes(config).items():
        key, transpose = _hf_key(path)
        if key not in state:
            raise KeyError(f"{where}: missing tensor {key!r} (needed for parameter {path})")
        arr = np.asarray(state[key])
        arr = arr.T if transpose else arr
        if tuple(arr.shape) != shape:
            raise ValueError(
                f"{where}: tensor {key!r} has shape {tuple(state[key].shape)}, expected "
                f"{tuple(reversed(shape)) if transpose else shape} for this config"
            )
        flat[path] = np.ascontiguousarray(arr, dtype=np.float32)
        used.add(key)
    extra = [
        k
        for k in state
        if k not in used
        and not k.endswith(_IGNORED_SUFFIXES)
        and not (k == "lm_head.weight" and config.tie_word_embeddings)
    ]
    if extra:
        raise ValueError(f"{where}: unexpected tensors for a Llama model: {', '.join(sorted(extra)[:10])}")
    return unflatten({p: jnp.asarray(v) for p, v in flat.items()})


def params_to_hf(params, config) -> dict[str, np.ndarray]:
    """Our parameter tree -> a PyTorch-layout state dict of contiguous float32 numpy arrays."""
    out = {}
    for path, leaf in zip(param_paths(params), jax.tree_util.tree_leaves(params)):
        key, transpose = _hf_key(path)
        arr = np.asarray(jax.device_get(leaf), dtype=np.float32)
        out[key] = np.ascontiguousarray(arr.T if transpose else arr)
    return out


def unflatten(flat: dict[str, Any]) -> dict:
    """{"a/b/c": leaf} -> nested dicts (the inverse of flattening with `param_paths`)."""
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        *head, last = path.split("/")
        for p in head:
            node = node.setdefault(p, {})
        node[last] = v
    return tree


# ----------------------------------------------------------------------------- safetensors I/O

_ST_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a .safetensors file as numpy arrays (memory-mapped; bfloat16 via
    ml_dtypes, which safetensors' own numpy reader rejects)."""
    import ml_dtypes

    path = Path(path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        try:
            header = json.loads(f.read(n))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not a safetensors file (bad header: {e})") from None
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        dt = info["dtype"]
        if dt == "BF16":
            np_dt = np.dtype(ml_dtypes.bfloat16)
        elif dt in _ST_DTYPES:
            np_dt = np.dtype(_ST_DTYPES[dt])
        else:
            raise ValueError(f"{path}: tensor {key!r} has unsupported dtype {dt}")
        start, stop = info["data_offsets"]
        out[key] = data[start:stop].view(np_dt).reshape(info["shape"])
    return out


def write_params_safetensors(params, file: str | os.PathLike) -> None:
    """Save a parameter tree as float32 safetensors keyed by "a/b/c" paths (our layout)."""
    from safetensors.numpy import save_file

    flat = {
        p: np.ascontiguousarray(np.asarray(jax.device_get(x), dtype=np.float32))
        for p, x in zip(param_paths(params), jax.tree_util.tree_leaves(params))
    }
    save_file(flat, str(file), metadata={"format": "salem_jax"})


def read_params_safetensors(file: str | os.PathLike) -> dict:
    """The parameter tree written by `write_params_safetensors` (as jax arrays)."""
    return unflatten({p: jnp.asarray(v) for p, v in read_safetensors(file).items()})


def _read_state_dict(folder: Path) -> dict[str, np.ndarray]:
    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    if single.exists():
        return read_safetensors(single)
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        state = {}
        for shard in sorted(set(weight_map.values())):
            if not (folder / shard).exists():
                raise FileNotFoundError(f"{index}: lists shard {shard!r}, which is missing")
            state.update(read_safetensors(folder / shard))
        return state
    bin_path = folder / "pytorch_model.bin"
    if bin_path.exists():
        try:
            import torch
        except ImportError:
            raise ImportError(
                f"{bin_path}: reading pytorch_model.bin needs torch (pip install salem-jax[torch])"
            ) from None
        sd = torch.load(bin_path, map_location="cpu", weights_only=True)
        return {k: v.float().numpy() for k, v in sd.items()}
    raise FileNotFoundError(
        f"{folder}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin found"
    )


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / n).exists() for n in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))


def load_llama_folder(path: str | os.PathLike, dtype: str = "float32", *, remat: bool = False) -> LoadedModel:
    """A Hugging Face Llama folder (config.json + model.safetensors, sharded safetensors with
    an index, or pytorch_model.bin when torch is installed) -> LoadedModel with our params.

    `dtype` is the computation and parameter dtype (float32 default; bfloat16 on accelerators
    halves memory, but edits are best made on float32 weights). The tokenizer is read with
    `AutoTokenizer` from the same folder (None when the folder has no tokenizer files)."""
    from transformers import AutoTokenizer, LlamaConfig

    folder = Path(path)
    cfg_file = folder / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{folder}: no config.json (is this a Hugging Face model folder?)")
    model_type = json.loads(cfg_file.read_text()).get("model_type")
    if model_type != "llama":
        raise ValueError(f"{cfg_file}: field 'model_type' is {model_type!r}, expected 'llama'")
    config = LlamaConfig.from_pretrained(folder)
    check_config(config)
    params = cast_params(hf_to_params(_read_state_dict(folder), config, where=str(folder)), dtype)
    tok = AutoTokenizer.from_pretrained(folder) if _has_tokenizer(folder) else None
    return from_params(folder.name, config, params, tok, dtype=dtype, remat=remat, source=str(folder))


def write_atomically(out_dir: str | os.PathLike, fill, *, replace: bool = True) -> Path:
    """Run `fill(tmp_dir)` in a fresh directory beside `out_dir`, then move it into place.

    Readers never see a half-written folder. An existing `out_dir` is replaced only after the
    new one is complete (`replace=True`), or kept and the new one dropped (`replace=False`, for
    caches that another process may have filled meanwhile)."""
    out = Path(out_dir).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        fill(tmp)
        if out.exists() and not replace:
            shutil.rmtree(tmp, ignore_errors=True)
        elif out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.replace(tmp, out)
            except OSError:
                if replace or not out.exists():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)  # another writer won the race
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def save_llama_folder(model: LoadedModel, params, out_dir: str | os.PathLike) -> Path:
    """Write `params` (our layout) as a Hugging Face Llama folder: config.json,
    model.safetensors (PyTorch layout, float32; transformers' LlamaForCausalLM opens it) and
    the model's tokenizer. The folder appears atomically. Returns its path."""
    from safetensors.numpy import save_file

    if model.arch != "llama":
        raise ValueError(f"save_llama_folder: model {model.name!r} is a {model.arch!r} model, not llama")
    config = copy.deepcopy(hf_config(model.config))
    config.architectures = ["LlamaForCausalLM"]
    state = params_to_hf(params, config)

    def fill(tmp: Path):
        config.save_pretrained(tmp)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(tmp)

    return write_atomically(out_dir, fill)
