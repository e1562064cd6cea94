"""The environment variables salem_jax reads, all read here (so a reader of the code finds every one).

SALEM_JAX_DATA    the data directory (salem_jax.data.paths.data_dir)
SALEM_JAX_CACHE   the cache of fetched data files and converted GGUF models (~/.cache/salem_jax)
SALEM_JAX_COMPILE_CACHE   0/off: no persistent compilation cache; a path: its folder
                  (salem_jax.compile_cache; default <SALEM_JAX_CACHE>/jax-compile)
HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE, HF_ENDPOINT   Hugging Face hub access (salem_jax.models.loading)
the launcher's variables (TPU_WORKER_HOSTNAMES, ...)  whether this is a multi-process job
                                                     (salem_jax.parallel.initialize_distributed)
SALEM_TRACEBACK   show the traceback of expected errors too (salem_jax.errors)

Each function reads the variable when called (tests set them with monkeypatch.setenv).
"""

from __future__ import annotations

import os
from pathlib import Path

DATA = "SALEM_JAX_DATA"
CACHE = "SALEM_JAX_CACHE"
HF_OFFLINE = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
HF_ENDPOINT = "HF_ENDPOINT"
COMPILE_CACHE = "SALEM_JAX_COMPILE_CACHE"
TRACEBACK = "SALEM_TRACEBACK"


def data_dir() -> str | None:
    """$SALEM_JAX_DATA, or None when unset or empty."""
    return os.environ.get(DATA) or None


def cache_root() -> Path:
    """$SALEM_JAX_CACHE if set, else ~/.cache/salem_jax."""
    value = os.environ.get(CACHE)
    return Path(value).expanduser() if value else Path.home() / ".cache" / "salem_jax"


def compile_cache() -> str:
    """$SALEM_JAX_COMPILE_CACHE stripped, "" when unset."""
    return os.environ.get(COMPILE_CACHE, "").strip()


def hf_offline() -> bool:
    """Whether $HF_HUB_OFFLINE or $TRANSFORMERS_OFFLINE asks for no hub access (1 / on / yes / true)."""
    value = next((os.environ[k] for k in HF_OFFLINE if os.environ.get(k)), "")
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def hf_endpoint(default: str) -> str:
    """$HF_ENDPOINT, else `default` (huggingface_hub's), without a trailing slash."""
    return os.environ.get(HF_ENDPOINT, default).rstrip("/")


def process_env() -> dict[str, str]:
    """A copy of the whole environment (the launcher's variables that say how many processes run)."""
    return dict(os.environ)


def show_tracebacks() -> bool:
    """Whether $SALEM_TRACEBACK is set (non-empty): `salem` commands then show expected errors' tracebacks."""
    return bool(os.environ.get(TRACEBACK))
