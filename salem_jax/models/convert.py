"""Hugging Face checkpoints <-> our parameter trees for GPT-2, GPT-Neo, BERT, BART and T5.

Our paths mirror Hugging Face's Flax names, so a PyTorch state-dict key is the path with "/"
replaced by "." and the last part renamed (`kernel`, `embedding`, `scale` -> `weight`).
Kernels are `[in, out]`; PyTorch `nn.Linear` weights are `[out, in]` and are transposed,
except GPT-2's `Conv1D` weights, which are `[in, out]` already. Old transformers Flax files
(flax_model.msgpack) use our paths except that FlaxGPT2 stored its Conv1D kernels `[out, in]`.

    pt_key(arch, path)             -> (state-dict key, transposed?)
    params_from_torch(...)         state dict (numpy) -> (params, missing paths, ignored keys)
    params_from_flax(...)          flat Flax dict     -> (params, missing paths, ignored keys)
    params_to_torch(arch, params)  -> state dict of float32 numpy arrays (what PyTorch loads)
"""

from __future__ import annotations

import re
from typing import Any, Callable

import jax
import numpy as np

from salem_jax.models.base import param_paths

# Top-level prefix of the task model's base model (a checkpoint of the bare base model, e.g.
# `BertModel` or `FlaxBartModel`, lacks it).
BASE_PREFIX = {"gpt2": "transformer", "gpt_neo": "transformer", "bert": "bert", "bart": "model", "t5": ""}

# State-dict entries that hold no parameter of ours: buffers and copies of tied embeddings.
_IGNORED = (
    r"(^|\.)attn\.(bias|masked_bias)$",  # GPT-2 causal-mask buffers (old checkpoints)
    r"(^|\.)attn\.attention\.(bias|masked_bias)$",  # GPT-Neo
    r"(^|\.)position_ids$",
    r"(^|\.)token_type_ids$",
    r"(^|\.)embed_tokens\.weight$",  # T5 / BART: the shared embedding again
    r"^lm_head\.weight$",  # a tied head (only ignored when the config ties it)
)


def _gpt2_conv(arch: str, path: str) -> bool:
    """GPT-2's Conv1D kernels (inside transformer/h/*), stored [in, out] by PyTorch."""
    return arch == "gpt2" and path.startswith("transformer/h/") and path.endswith("/kernel")


def pt_key(arch: str, path: str) -> tuple[str, bool]:
    """Our parameter path -> (PyTorch state-dict key, whether the array is transposed)."""
    parts = path.split("/")
    last = parts[-1]
    if len(parts) == 1:
        return last, False  # final_logits_bias
    stem = ".".join(parts[:-1])
    if last == "kernel":
        return stem + ".weight", not _gpt2_conv(arch, path)
    if last in ("embedding", "scale"):
        return stem + ".weight", False
    return stem + "." + last, False  # bias, T5LayerNorm weight


def _normalise_keys(arch: str, state: dict[str, Any], want_keys: set[str]) -> dict[str, Any]:
    """Old LayerNorm names (gamma/beta) -> weight/bias; add the base-model prefix to a bare
    base-model checkpoint (e.g. `BertModel`: "embeddings.*" -> "bert.embeddings.*")."""
    out = {}
    for k, v in state.items():
        k = re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", k))
        out[k] = v
    prefix = BASE_PREFIX[arch]
    if prefix and not any(k.startswith(prefix + ".") for k in out):
        out = {(k if k in want_keys else f"{prefix}.{k}"): v for k, v in out.items()}
    return out


def params_from_torch(
    arch: str,
    state: dict[str, Any],
    shapes: dict[str, tuple[int, ...]],
    *,
    tied: bool,
    where: str,
    skip: Callable[[str], bool] = lambda path: False,
) -> tuple[dict[str, np.ndarray], list[str], list[str]]:
    """A PyTorch-layout state dict -> (flat {path: float32 array}, missing paths, ignored keys).

    `shapes` is every parameter path and shape of the module (`abstract_shapes`). Paths for
    which `skip(path)` is true are treated as missing (a head being replaced). A tensor of the
    wrong shape is an error naming the key; tensors no parameter uses are returned in
    `ignored` (buffers and tied copies are left out of that list)."""
    want = {path: pt_key(arch, path) for path in shapes}
    state = _normalise_keys(arch, state, {k for k, _ in want.values()})
    flat, missing, used = {}, [], set()
    for path, (key, transpose) in want.items():
        if skip(path) or key not in state:
            missing.append(path)
            continue
        arr = np.asarray(state[key])
        arr = arr.T if transpose else arr
        if tuple(arr.shape) != tuple(shapes[path]):
            raise ValueError(
                f"{where}: tensor {key!r} has shape {tuple(np.shape(state[key]))}, expected "
                f"{tuple(reversed(shapes[path])) if transpose else tuple(shapes[path])} for this config"
            )
        flat[path] = np.ascontiguousarray(arr, dtype=np.float32)
        used.add(key)
    ignored = []
    for k in state:
        if k in used:
            continue
        if any(re.search(p, k) for p in _IGNORED) and (k != "lm_head.weight" or tied):
            continue
        ignored.append(k)
    return flat, missing, sorted(ignored)


def params_from_flax(
    arch: str,
    flat_state: dict[str, Any],
    shapes: dict[str, tuple[int, ...]],
    *,
    where: str,
    skip: Callable[[str], bool] = lambda path: False,
) -> tuple[dict[str, np.ndarray], list[str], list[str]]:
    """Flat {"a/b/c": array} from a transformers Flax checkpoint -> (flat params, missing, ignored).

    A bare base-model checkpoint (no "model/" etc. prefix) gets the prefix; FlaxGPT2's Conv1D
    kernels (`[out, in]`) are transposed."""
    prefix = BASE_PREFIX[arch]
    if prefix and not any(k.startswith(prefix + "/") for k in flat_state):
        flat_state = {(k if k in shapes else f"{prefix}/{k}"): v for k, v in flat_state.items()}
    flat, missing = {}, []
    for path, shape in shapes.items():
        if skip(path) or path not in flat_state:
            missing.append(path)
            continue
        arr = np.asarray(flat_state[path])
        if _gpt2_conv(arch, path):
            arr = arr.T
        if tuple(arr.shape) != tuple(shape):
            raise ValueError(f"{where}: parameter {path!r} has shape {np.shape(flat_state[path])}, expected {shape}")
        flat[path] = np.ascontiguousarray(arr, dtype=np.float32)
    ignored = sorted(k for k in flat_state if k not in shapes)
    return flat, missing, ignored


# Where the encoder-decoders' PyTorch classes keep copies of the shared embedding. transformers 4
# ties them to `shared` always; transformers 5 leaves BART's untied when tie_word_embeddings is
# False, so a state dict without them would leave them random there.
EMBEDDING_COPIES = {
    "bart": ("model.shared.weight", ("model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight")),
    "t5": ("shared.weight", ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")),
}


def params_to_torch(arch: str, params: Any) -> dict[str, np.ndarray]:
    """Our parameter tree -> a PyTorch-layout state dict of contiguous float32 numpy arrays,
    with the encoder-decoders' `embed_tokens` copies of the shared embedding (a tied LM head
    is not written: every transformers version re-ties it)."""
    out = {}
    for path, leaf in zip(param_paths(params), jax.tree_util.tree_leaves(params)):
        key, transpose = pt_key(arch, path)
        arr = np.asarray(jax.device_get(leaf), dtype=np.float32)
        out[key] = np.ascontiguousarray(arr.T if transpose else arr)
    if arch in EMBEDDING_COPIES:
        source, copies = EMBEDDING_COPIES[arch]
        out.update({k: out[source].copy() for k in copies})
    return out
