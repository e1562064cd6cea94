"""JAX's persistent compilation cache in the project's cache folder: compile once per machine.

Tracing and compiling SmolLM2's editor step takes ~20 s on a CPU; with the cache a second run
of any command loads the compiled program from disk instead. JAX keys every entry by the
serialized program (so by every shape, dtype, static argument and sharding), the compile
options, the devices and the jax/jaxlib versions: a changed model or config compiles anew,
an unchanged one is found.

    from salem_jax.compile_cache import enable_compile_cache
    enable_compile_cache()          # <$SALEM_JAX_CACHE>/jax-compile, unless SALEM_JAX_COMPILE_CACHE=0

Importing `salem_jax` changes no global JAX setting: only the entry points (the `salem` CLI,
`experiments.*`, `benchmarks/*`) call `enable_compile_cache`. A library user who wants the cache
calls it once, before the first compilation.

Settings (environment, read by salem_jax.env; `--no-compile-cache` on the entry points sets the first):
  SALEM_JAX_COMPILE_CACHE = 0 / off / false   disable the cache
  SALEM_JAX_COMPILE_CACHE = <path>            use that folder instead of <cache_dir()>/jax-compile
"""

from __future__ import annotations

import os
from pathlib import Path

from salem_jax import env

# JAX is imported inside the functions that use it: the `salem` CLI imports this module to add
# its flag, and `salem --help` (or a user error found before any model work) should not pay
# JAX's ~2 s import.

ENV_COMPILE_CACHE = env.COMPILE_CACHE
_OFF = ("0", "off", "false", "no", "none")


def compile_cache_dir(explicit: str | os.PathLike | None = None) -> Path | None:
    """The cache folder: explicit > $SALEM_JAX_COMPILE_CACHE > <$SALEM_JAX_CACHE>/jax-compile;
    None when the environment variable disables it."""
    if explicit:
        return Path(explicit).expanduser()
    value = env.compile_cache()
    if value.lower() in _OFF:
        return None
    return Path(value).expanduser() if value else env.cache_root() / "jax-compile"


def enable_compile_cache(path: str | os.PathLike | None = None, *, enabled: bool = True,
                         min_compile_time_s: float = 0.5) -> Path | None:
    """Turn on JAX's persistent compilation cache (global JAX config); returns the folder or None.

    enabled=False (a `--no-compile-cache` flag) leaves JAX's configuration untouched.
    min_compile_time_s: programs that compile faster than this are not written (JAX's default
    is 1 s; tiny helper programs would only clutter the folder)."""
    folder = compile_cache_dir(path) if enabled else None
    if folder is None:
        return None
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    folder.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_s))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    # JAX decides once per process whether to use the cache (at the first compilation); reset
    # that decision so enabling after something was already compiled still takes effect.
    compilation_cache.reset_cache()
    return folder


def disable_compile_cache() -> None:
    """Undo `enable_compile_cache` (tests): no persistent cache for later compilations."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    jax.config.update("jax_compilation_cache_dir", None)
    compilation_cache.reset_cache()


def add_flag(parser) -> None:
    """`--no-compile-cache` on an argparse parser (entry points)."""
    parser.add_argument("--no-compile-cache", action="store_true",
                        help=f"do not use JAX's persistent compilation cache (or set {ENV_COMPILE_CACHE}=0)")


def compilations(*jitted) -> int:
    """How many programs the in-memory caches of these `jax.jit` functions hold (all static
    arguments and shapes together). The difference across a call is how many times it traced
    and compiled them, which results report (`SaliencyStats.traces`, the sweep's "compiles") to
    show that a step compiled once. It replaces module-level trace counters (global state that
    every traced function had to bump); tests assert the same with `chex.assert_max_traces`.

    Reads jax's `_cache_size()`, the one count JAX exposes (its own tests use it); it drops
    after `jax.clear_caches()`, so compare two readings taken without a clear in between."""
    return sum(int(f._cache_size()) for f in jitted)
