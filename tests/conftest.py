import os

import pytest

# Eight simulated CPU devices for the data-parallel and sharding tests; must precede jax's import.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# SALEM_JAX_TEST_FAST_COMPILE=1 (`make test`): also XLA's CPU code generator in its cheaper form
# (see pytest_configure); read when the backend starts, so set here, and inherited by subprocesses.
_FAST_XLA_FLAGS = "--xla_cpu_use_fusion_emitters=false --xla_cpu_parallel_codegen_split_count=1"
if os.environ.get("SALEM_JAX_TEST_FAST_COMPILE") == "1" and "xla_cpu_use_fusion_emitters" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " " + _FAST_XLA_FLAGS
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One compilation cache per test run, shared by its workers and the subprocesses they start (the
# CLI and benchmark tests): a program that several tests compile (the same tiny model's step, the
# same entry point run twice) is compiled once per run. Never the user's cache (entry points called
# by tests must not write there), and empty at the start of every run, so a run's time is a cold
# run's. SALEM_JAX_TEST_COMPILE_CACHE=0 turns it off; tests/test_compile_cache.py tests the cache
# in its own temporary folder and gives this one back afterwards (`restore_run_cache`).
_RUN_CACHE_OFF = os.environ.get("SALEM_JAX_TEST_COMPILE_CACHE", "").strip().lower() in ("0", "off", "false", "no")


def _run_cache_dir() -> str:
    """This run's folder, named by the process that starts the run (pytest-xdist's workers inherit
    it through SALEM_JAX_TEST_RUN_CACHE; xdist's run id names it for a worker started without it)."""
    import tempfile

    run = os.environ.get("PYTEST_XDIST_TESTRUNUID") or f"pid{os.getpid()}"
    return os.path.join(tempfile.gettempdir(), f"salem-jax-test-compile-{run}")


if _RUN_CACHE_OFF:
    os.environ.setdefault("SALEM_JAX_COMPILE_CACHE", "0")
else:
    os.environ["SALEM_JAX_COMPILE_CACHE"] = os.environ.get("SALEM_JAX_TEST_RUN_CACHE") or _run_cache_dir()
    # subprocesses of this run (a CLI test's `python -m salem_jax ...`) read the same folder
    os.environ["SALEM_JAX_TEST_RUN_CACHE"] = os.environ["SALEM_JAX_COMPILE_CACHE"]


def restore_run_cache() -> None:
    """Point JAX's persistent cache back at this run's folder (or nowhere when it is off): for tests
    that point it elsewhere."""
    from salem_jax import compile_cache

    if _RUN_CACHE_OFF:
        compile_cache.disable_compile_cache()
    else:
        compile_cache.enable_compile_cache(os.environ["SALEM_JAX_TEST_RUN_CACHE"], min_compile_time_s=0.0)


# Single cases of fixture-parametrised tests that run in the slow suite (issue 14: `make test` <= 5
# min). A fixture's params cannot carry a mark per test, so they are marked here, before `-m`
# selects; the other architecture's case of each test stays in `make test`.
_SLOW_CASES = frozenset({
    # Llama stays: the same vmapped cached decoding loop over edited models
    "tests/test_generate_many.py::test_many_equals_one_model_at_a_time[gpt2-True]",
    "tests/test_generate_many.py::test_generations_after_edits_equal_generate_answers[gpt2]",
    # session 16's shared prefill: Llama stays (GPT-2's blocks are intercepted the same way)
    "tests/test_generate_many.py::test_before_after_with_a_shared_prefill_equals_the_2e_models[gpt2-1]",
    "tests/test_generate_many.py::test_before_after_with_a_shared_prefill_equals_the_2e_models[gpt2-0]",
    "tests/test_generate_many.py::test_before_after_edits_as_text[gpt2]",
    # Llama stays; GPT-2's Conv1D ("out_in") kernels stay covered by the file's EMMET / MEMIT cases
    "tests/test_mass_edit.py::test_alphaedit_spares_preserved_keys_and_remembers[gpt2]",
    "tests/test_mass_edit.py::test_alphaedit_with_v_from_the_edited_block_equals_every_block[gpt2]",
})


# Test files that share a process-wide cached setup (`test_mend_train.trained_run`: a 100-step editor
# training, about 15 s of CPU): `make test`'s scheduler (-n 2 --dist loadfile) hands them out as one
# unit, so one worker trains it once instead of each worker that gets one of them.
_SHARED_SETUP_FILES = {f"tests/{name}.py": "tests/(trained_run)" for name in (
    "test_mend_train", "test_checkpoint", "test_edit_command", "test_failure_modes", "test_pipeline")}


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """--dist loadfile with the files of `_SHARED_SETUP_FILES` as one unit (pytest-xdist's own
    scheduler otherwise: every other file its own unit, the units with the most tests first)."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class _SharedSetupScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            file = super()._split_scope(nodeid)
            return _SHARED_SETUP_FILES.get(file, file)

    return _SharedSetupScheduling(config, log)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Marks `_SLOW_CASES` slow before the mark plugin's `-m` selection runs (tryfirst)."""
    for item in items:
        if item.nodeid in _SLOW_CASES:
            item.add_marker(pytest.mark.slow)


def pytest_configure(config):
    """SALEM_JAX_TEST_FAST_COMPILE=1 (`make test` sets it; `make test-slow` does not): the tiny programs of
    the suite compile with XLA's backend optimisation off (jax_disable_most_optimizations: no
    LLVM -O2 and expensive passes), which costs far more than it saves on programs that run for
    milliseconds. Measured, same conditions: tests/test_from_block.py 61.3 s -> 33.1 s; six heavy files
    (parallel, sharding, mend_train, ke_enn, llama, finetune) 482.8 s -> 303.8 s. Results move
    by float rounding only; the one comparison it moved past its tolerance (an Adam update near
    eps in test_mend_train.py) now compares the parameters at 0.2% of one Adam step. Also
    exported to the subprocesses."""
    if os.environ.get("SALEM_JAX_TEST_FAST_COMPILE") == "1":
        os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
        import jax

        jax.config.update("jax_disable_most_optimizations", True)
    if not _RUN_CACHE_OFF:
        restore_run_cache()


def pytest_unconfigure(config):
    """The run's compilation cache goes with the run: removed by the process that created the run
    (xdist's controller, or the only process), after every worker has stopped."""
    if _RUN_CACHE_OFF or hasattr(config, "workerinput"):
        return
    import shutil

    shutil.rmtree(os.environ["SALEM_JAX_TEST_RUN_CACHE"], ignore_errors=True)


@pytest.fixture(autouse=True)
def _optimised_compile_for_real_models(request):
    """Tests marked `real_model` (SmolLM2, MiniLM: programs that run long enough for XLA's
    optimisation to pay) compile with it on even under SALEM_JAX_TEST_FAST_COMPILE=1, which `make
    test-slow` also sets for its tiny-model tests (measured, one process each, same load: three
    tiny slow tests 229.7 s -> 83.7 s CPU). The XLA_FLAGS part stays (read once per process)."""
    if not (os.environ.get("SALEM_JAX_TEST_FAST_COMPILE") == "1" and request.node.get_closest_marker("real_model")):
        yield
        return
    import jax

    jax.config.update("jax_disable_most_optimizations", False)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", True)
