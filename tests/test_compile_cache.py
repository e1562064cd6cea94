"""The persistent compilation cache: a changed shape compiles (a new cache entry), an unchanged
program in a fresh in-memory state is loaded from disk (no new entry)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import restore_run_cache
from salem_jax import compile_cache


def _entries(folder):
    """Cache entries of `_program` (other entries: the eager ops of jax itself)."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("jit__program") and p.name.endswith("-cache"))


@pytest.fixture
def cache(tmp_path):
    folder = compile_cache.enable_compile_cache(tmp_path / "jc", min_compile_time_s=0.0)
    try:
        yield folder
    finally:
        restore_run_cache()  # the test run's own cache (conftest), or none


def _fresh_program():
    """A new function object each call: its jax.jit starts with empty in-memory caches (nothing
    traced, lowered or compiled for it), while the program it compiles is the same each time.
    Not jax.clear_caches(): that also empties every other test's compiled functions in this
    worker (the tiny models cached per process), which the later tests then compiled again
    (the test took 87 s inside the suite, 0.8 s alone)."""

    def _program(x):
        # a few ops so it is a real program; the constant makes it unlike anything else compiled
        return jnp.tanh(x @ x.T + 0.123456).sum(0) * 7.0

    return _program


@pytest.fixture
def events():
    seen = []
    listener = lambda name, **kw: seen.append(name)  # noqa: E731
    jax.monitoring.register_event_listener(listener)
    try:
        yield seen
    finally:
        jax.monitoring.unregister_event_listener(listener)


def test_unchanged_program_hits_changed_shape_compiles(cache, events):
    f = jax.jit(_fresh_program())
    f(np.ones((4, 3), np.float32)).block_until_ready()
    first = _entries(cache)
    assert len(first) == 1, "the first compilation must be written to the cache folder"

    events.clear()
    out = jax.jit(_fresh_program())(np.ones((4, 3), np.float32))  # no in-memory executable: compile or load
    x = np.ones((4, 3))
    np.testing.assert_allclose(np.asarray(out), np.tanh(x @ x.T + 0.123456).sum(0) * 7.0, rtol=1e-5)
    assert _entries(cache) == first, "an unchanged program must be found, not compiled again"
    assert "/jax/compilation_cache/cache_hits" in events and "/jax/compilation_cache/cache_misses" not in events

    events.clear()

    jax.jit(_fresh_program())(np.ones((5, 3), np.float32)).block_until_ready()
    assert len(_entries(cache)) == len(first) + 1, "a changed shape must compile a new entry"
    assert "/jax/compilation_cache/cache_misses" in events


def test_env_disables_and_redirects(tmp_path, monkeypatch):
    monkeypatch.setenv(compile_cache.ENV_COMPILE_CACHE, "0")
    assert compile_cache.compile_cache_dir() is None
    assert compile_cache.enable_compile_cache() is None
    monkeypatch.setenv(compile_cache.ENV_COMPILE_CACHE, str(tmp_path / "x"))
    assert compile_cache.compile_cache_dir() == tmp_path / "x"
    monkeypatch.delenv(compile_cache.ENV_COMPILE_CACHE)
    monkeypatch.setenv("SALEM_JAX_CACHE", str(tmp_path / "c"))
    assert compile_cache.compile_cache_dir() == tmp_path / "c" / "jax-compile"
    assert compile_cache.enable_compile_cache(enabled=False) is None


def test_import_leaves_jax_config_alone():
    import importlib

    import salem_jax  # noqa: F401

    compile_cache.disable_compile_cache()  # the test run's own cache (conftest) set it: start from none
    try:
        importlib.reload(compile_cache)
        assert jax.config.jax_compilation_cache_dir in (None, "")
    finally:
        restore_run_cache()
