# The two set-up commands in the README are `make serve` and `make test`; both install first when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The package alone (what serving needs), then the test, docs and Ray tools on top.
RUNTIME := $(VENV)/.installed-runtime
STAMP := $(VENV)/.installed

.PHONY: install test test-fast lint format docs grpc serve bench images clean

install: $(STAMP)

$(RUNTIME): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -c constraints.txt -e .
	touch $(RUNTIME)

$(STAMP): $(RUNTIME)
	$(BIN)/pip install -c constraints.txt -e '.[test]'
	touch $(STAMP)

# Everything CI runs: style, the documentation site, then every test (slow ones included).
test: lint docs
	$(BIN)/python -m pytest -q

# Leaves out the tests marked slow (training runs, real process topologies) while iterating.
test-fast: install
	$(BIN)/python -m pytest -m "not slow" -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Rewrites the tree in the project's style.
format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# The documentation site; broken links and missing pages fail the build.
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet --site-dir build/site

# The gRPC modules from service/grpc/inference.proto (a test fails while they are stale).
grpc: install
	$(BIN)/python -m scripts.generate_grpc

serve: $(RUNTIME)
	$(BIN)/transfiner serve

bench: install
	$(BIN)/python -m scripts.bench_model

# The CPU and GPU images: Docker where its engine runs, else buildah; on a local Debian base where
# the official bases cannot be pulled. Needs only the system Python (no virtual environment).
images:
	$(PYTHON) -m scripts.build_images

clean:
	rm -rf $(VENV) build *.egg-info
