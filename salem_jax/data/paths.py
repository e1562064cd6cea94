"""Where data files live, and an explicit download of the canonical public files.

Resolution of the data directory (first that applies):
  1. an explicit argument (`--data-dir`, a config field);
  2. the environment variable `SALEM_JAX_DATA`;
  3. `../shared/data` beside the repository checkout (the folder next to the directory that
     holds the `salem_jax` package), when it exists.
An explicit or environment path that does not exist is an error (not skipped over), so a typo
never silently switches data sets. When nothing applies the error names everything tried.

`fetch_public_data` downloads the full ROME/MEMIT dataset files (the addresses ROME's code uses)
into a cache (`SALEM_JAX_CACHE`, default ~/.cache/salem_jax). It is only ever run on request,
fails within a few seconds when there is no network, and never retries.
"""

from __future__ import annotations

import os
import socket
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterable

from salem_jax import env

ENV_DATA = env.DATA
ENV_CACHE = env.CACHE

# Name -> path inside the data directory (the real subsets in ../shared/data).
KNOWN_FILES = {
    "zsre": "zsre/zsre_mend_eval_2200.json",
    "zsre-train": "zsre/zsre_mend_train_1k.json",
    "zsre-portability": "zsre/zsre_mend_eval_portability_gpt4.json",
    "counterfact": "counterfact/counterfact_hf_test_part1.json",
    "counterfact-preknown": "counterfact/counterfact_preknown.json",
    "knowns": "rome_knowns/known_1000.json",
    "fever": "fever/fever_paper_dev.jsonl",
    "rte": "rte/rte_train.jsonl",
    "wikitext": "wikitext/wiki.test.raw",
    "wikitext-articles": "wikitext/wikitext_test_articles.jsonl",
}
# The reader format of each known file.
KNOWN_FORMATS = {
    "zsre": "zsre", "zsre-train": "zsre", "zsre-portability": "zsre",
    "counterfact": "counterfact", "counterfact-preknown": "counterfact", "knowns": "knowns",
    "fever": "fever", "rte": "nli", "wikitext": "text", "wikitext-articles": "text",
}

# The canonical full files, as ROME/MEMIT's code downloads them (REMOTE_ROOT_URL/data/dsets/...).
ROME_DATA_URL = "https://rome.baulab.info/data/dsets"
PUBLIC_FILES = {
    "counterfact-full": "counterfact.json",
    "multi-counterfact": "multi_counterfact.json",
    "zsre-full": "zsre_mend_eval.json",
    "zsre-train-full": "zsre_mend_train.json",
    "knowns-full": "known_1000.json",
}
PUBLIC_FORMATS = {
    "counterfact-full": "counterfact", "multi-counterfact": "counterfact", "zsre-full": "zsre",
    "zsre-train-full": "zsre", "knowns-full": "knowns",
}


class DataNotFoundError(FileNotFoundError):
    """No data directory or file could be found; the message says what was tried."""


class DataFetchError(OSError):
    """A download failed (typically: no network)."""


def repo_shared_data() -> Path:
    """`../shared/data` beside the checkout: <dir holding salem_jax>/../shared/data."""
    package_dir = Path(__file__).resolve().parents[1]  # .../salem_jax
    return package_dir.parent.parent / "shared" / "data"


def data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The data directory (see the module docstring for the order)."""
    tried = []
    if explicit is not None and str(explicit) != "":
        p = Path(explicit).expanduser()
        if p.is_dir():
            return p
        raise DataNotFoundError(f"data directory {p} (given explicitly) does not exist")
    from_env = env.data_dir()
    if from_env:
        p = Path(from_env).expanduser()
        if p.is_dir():
            return p
        raise DataNotFoundError(f"data directory {p} (from ${ENV_DATA}) does not exist")
    tried.append(f"${ENV_DATA} (not set)")
    shared = repo_shared_data()
    if shared.is_dir():
        return shared
    tried.append(f"{shared} (../shared/data beside the checkout: absent)")
    raise DataNotFoundError(
        "no data directory found; tried: " + "; ".join(tried)
        + f". Pass --data-dir, set ${ENV_DATA}, or run `salem fetch-data` for the public ROME files."
    )


def cache_dir(explicit: str | os.PathLike | None = None) -> Path:
    """Where `fetch_public_data` puts files: explicit > $SALEM_JAX_CACHE > ~/.cache/salem_jax."""
    if explicit:
        return Path(explicit).expanduser()
    return env.cache_root()


def find_data_file(name: str, data_dir_: str | os.PathLike | None = None) -> Path:
    """Path of a known data file by name (`KNOWN_FILES`, or a fetched `PUBLIC_FILES` name).

    Raises DataNotFoundError naming the directory and the file when it is absent.
    """
    if name in PUBLIC_FILES:
        p = cache_dir() / "rome" / PUBLIC_FILES[name]
        if p.is_file():
            return p
        raise DataNotFoundError(f"{name}: {p} not found; download it with `salem fetch-data --files {name}`")
    if name not in KNOWN_FILES:
        raise KeyError(f"unknown data file {name!r}; known: {', '.join(list(KNOWN_FILES) + list(PUBLIC_FILES))}")
    root = data_dir(data_dir_)
    p = root / KNOWN_FILES[name]
    if not p.is_file():
        raise DataNotFoundError(f"{name}: {p} not found in the data directory {root}")
    return p


def fetch_public_data(
    names: Iterable[str] = ("counterfact-full", "zsre-full"),
    *,
    cache: str | os.PathLike | None = None,
    base_url: str = ROME_DATA_URL,
    timeout: float = 5.0,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Download the canonical ROME/MEMIT files (`PUBLIC_FILES`) into `<cache>/rome/`.

    One attempt per file with a `timeout`-second connect/read timeout and no retries: without a
    network this raises DataFetchError within seconds, saying what to do instead. Files already
    present are kept unless `overwrite`. Writes go to a temporary file renamed into place, so an
    interrupted download never leaves a half file under the final name.
    """
    out_dir = cache_dir(cache) / "rome"
    result = {}
    for name in names:
        if name not in PUBLIC_FILES:
            raise KeyError(f"unknown public file {name!r}; choose from {', '.join(PUBLIC_FILES)}")
        dest = out_dir / PUBLIC_FILES[name]
        if dest.is_file() and not overwrite:
            result[name] = dest
            continue
        url = f"{base_url.rstrip('/')}/{PUBLIC_FILES[name]}"
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{dest.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=timeout) as resp:
                while True:
                    chunk = resp.read(1 << 20)
                    if not chunk:
                        break
                    f.write(chunk)
            os.replace(tmp, dest)
        except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError, OSError) as e:
            if os.path.exists(tmp):
                os.unlink(tmp)
            reason = getattr(e, "reason", e)
            raise DataFetchError(
                f"could not download {name} from {url} ({type(e).__name__}: {reason}); "
                f"this machine may have no network. Copy {PUBLIC_FILES[name]} into {out_dir} by hand, "
                f"or use the subsets in a data directory (--data-dir / ${ENV_DATA})."
            ) from None
        result[name] = dest
    return result
