# The two commands a newcomer runs (see README): `make demo` and `make test`.
# Both create .venv on first use: the CPU build of torch first (pinned here, a range in pyproject.toml),
# then the project with its dev extras.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
COMPAT_SPEC ?= transformers==5.17.0

.PHONY: setup demo test test-fast compat lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)" || $(BIN)/python -m pip install -q "torch>=2.4"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

demo: setup
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/nvila-quant demo --workdir nvila-demo --overwrite

test: setup
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -q -ra

# The inner loop: everything but the tests marked slow (the longest end-to-end runs).
test-fast: setup
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -q -ra -m "not slow"

# The suite against the oldest transformers pyproject.toml accepts, in its own venv (.venv-compat).
compat:
	$(MAKE) setup VENV=.venv-compat
	.venv-compat/bin/python -m pip install -q "$(COMPAT_SPEC)"
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 .venv-compat/bin/python -m pytest -q -ra -p no:cacheprovider

lint: setup
	$(BIN)/ruff check nvila_quant tests benchmarks export
	$(BIN)/lint-imports

bench: setup
	$(BIN)/python benchmarks/runtime.py

clean:
	rm -rf $(VENV) .venv-compat nvila-demo .pytest_cache
