import os

# Eight simulated CPU devices for the data-parallel and sharding tests; must precede jax's import.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Entry points called by tests (cli.main, experiments) must not write to the user's compilation
# cache; tests/test_compile_cache.py tests the cache in a temporary folder.
os.environ.setdefault("SALEM_JAX_COMPILE_CACHE", "0")
