# The two commands of the README: `make demo` and `make test`. Both set up .venv first.
# On GPU machines override TORCH_SPEC with pip arguments for a CUDA build, e.g.
#   make test TORCH_SPEC='torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128'
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
BIN := $(VENV)/bin
# The stamp changes whenever pyproject.toml or the torch spec does, and only then.
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | { cat; echo '$(TORCH_SPEC)'; } | sha256sum | cut -c1-16)

.PHONY: setup system-deps lint format test test-fast chaos demo clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	@# torch first: an unpinned torch requirement would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e '.[dev,digits]'
	@rm -f $(VENV)/.installed-*
	@touch $@

# Debian packages the tests need (slurm-wlm, munge: tests marked `slurm`; chromium: `browser`); no-op when present.
system-deps:
	bash scripts/system-deps.sh

# ruff with the project's settings (pyproject.toml): lint, and the formatter's check. `make format` applies it.
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: setup system-deps
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

# The fault-injection suite alone; writes docs/reliability.md (make test runs it too, writing runs/chaos/).
chaos: setup system-deps
	FAR_SCALE_RELIABILITY_DOC=docs/reliability.md $(BIN)/python -m pytest -m chaos $(PYTEST_ARGS)

# DEMO_ARGS shrinks it (the CI test runs `make demo DEMO_ARGS="--steps 20 ..."`); see scripts/demo.py --help.
DEMO_ARGS ?=
demo: setup
	$(BIN)/python scripts/demo.py $(DEMO_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
