# Developer and CI entry points. `make test` and `make demo` need only Python 3.10+ and make:
# they build their own virtual environment in .venv first.

PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Touched after a successful install; older than pyproject.toml means "install again".
STAMP := $(VENV)/.stamp
PYTEST_ARGS ?=

.PHONY: venv fmt lint test demo

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e '.[dev]'
	touch $(STAMP)

fmt: venv
	$(BIN)/ruff format

lint: venv
	$(BIN)/ruff format --check
	$(BIN)/ruff check
	$(BIN)/mypy

# pytest exits 5 when it collected no tests: the suite is broken, so that fails too.
test: venv lint
	@$(BIN)/pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then \
		echo "make test: pytest collected no tests (exit 5): the test suite is broken" >&2; \
	fi; \
	exit $$rc

demo: venv
	$(BIN)/python demo/run_demo.py

# Performance benchmark against its own private redis-server (never the shared one).
# Full run: `make bench` (100,000 jobs, a few minutes); smoke check: BENCH_ARGS="--jobs 2000".
BENCH_ARGS ?=

.PHONY: bench

bench: venv
	$(BIN)/python bench/run_bench.py $(BENCH_ARGS)

# The RQ compatibility matrix alone: opsctl against real workers of RQ 1.16, 2.12 and 3.0,
# each checked through its own API. The first run builds one virtual environment per
# release in .compat-venvs/ (needs the package index); later runs reuse them.
# `make test` runs the matrix too.
.PHONY: compat

compat: venv
	$(BIN)/pytest tests/compat $(PYTEST_ARGS)
