# The two set-up commands in the README are `make serve` and `make test`; both install first when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The package alone (what serving needs), then the test tools on top (Ray, Playwright, ...).
RUNTIME := $(VENV)/.installed-runtime
STAMP := $(VENV)/.installed

.PHONY: install test test-fast serve bench clean

install: $(STAMP)

$(RUNTIME): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -c constraints.txt -e .
	touch $(RUNTIME)

$(STAMP): $(RUNTIME)
	$(BIN)/pip install -c constraints.txt -e '.[test]'
	touch $(STAMP)

# Everything, slow tests included: what .ci/run runs.
test: install
	$(BIN)/python -m pytest -q

# Leaves out the tests marked slow (training runs, real process topologies) while iterating.
test-fast: install
	$(BIN)/python -m pytest -m "not slow" -q

serve: $(RUNTIME)
	$(BIN)/transfiner serve

bench: install
	$(BIN)/python scripts/bench_model.py

clean:
	rm -rf $(VENV) build *.egg-info
