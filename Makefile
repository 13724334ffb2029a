# The two commands a newcomer runs (see README): `make demo` and `make test`.
# Both create .venv on first use: the CPU build of torch first (pinned here, a range in pyproject.toml),
# then the project with its dev extras.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test lint bench clean

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

lint: setup
	$(BIN)/ruff check nvila_quant tests benchmarks

bench: setup
	$(BIN)/python benchmarks/runtime.py

clean:
	rm -rf $(VENV) nvila-demo .pytest_cache
