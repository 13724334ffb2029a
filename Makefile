# The two commands a newcomer runs (see README): `make demo` and `make test`.
# Both create .venv on first use: exactly TORCH_SPEC first (pinned here, a range in pyproject.toml; setup stops if
# that torch cannot be installed), then the project with its dev extras.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
COMPAT_SPEC ?= transformers==5.17.0

.PHONY: setup demo test test-fast test-serving test-eval compat lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)" || { echo "error: pip could not install $(TORCH_SPEC), the torch \
	this setup pins; pass TORCH_SPEC='torch==<version>' (torch>=2.4) to install another" >&2; exit 1; }
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

demo: setup
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/nvila-quant demo --workdir nvila-demo --overwrite

test: setup
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -q -ra

# The inner loop: everything but the tests marked slow (the longest end-to-end runs).
test-fast: setup
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -q -ra -m "not slow"

# The engines' loader rules and the real CPU client of our int4 LLM (transformers + gptqmodel, the `serving` extra:
# installed here on first use with the pinned torch held in place; its numpy==2.2.6 pin moves numpy down).
test-serving: setup
	$(BIN)/python -c "import gptqmodel" 2>/dev/null || $(BIN)/python -m pip install -q -e ".[dev,serving]" "$(TORCH_SPEC)"
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -q -ra tests/serving

# Benchmark accuracy through lmms-eval (nvila-quant eval, compare --tasks): the `eval` extra is installed into the venv
# on first use, then the tests that need it run (`make test` skips them, with the reason, until it is installed). Not in
# `dev`: lmms-eval moves av, protobuf and filelock down and pulls a torchvision, and PyPI's torchvision for Linux is
# built for the CUDA torch: next to a CPU torch it cannot be imported, and transformers imports it when present (image
# processors fail), so such a torchvision is removed again (lmms-eval's own code does not need it).
EVAL_TESTS ?= tests/eval tests/report/test_benchmark.py
test-eval: $(VENV)/.installed-eval
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -q -ra $(EVAL_TESTS)

$(VENV)/.installed-eval: $(VENV)/.installed
	$(BIN)/python -m pip install -q -e ".[dev,eval]" "$(TORCH_SPEC)"
	@$(BIN)/python -c "import torchvision" 2>/dev/null || { echo "torchvision does not match $(TORCH_SPEC) (a build for \
	another torch): uninstalling it"; $(BIN)/python -m pip uninstall -q -y torchvision; }
	$(BIN)/python -c "import lmms_eval.evaluator"
	touch $@

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

# Our CPU decode / prefill against llama.cpp and ONNX Runtime GenAI (issue 26). Not part of `make test`: the first run
# builds llama.cpp and two venvs under ~/.cache/nvila-quant/cpu_peers (~10 min on 2 cores), then converts the models
# of each case. Pass flags with PEERS_ARGS (e.g. PEERS_ARGS="--shapes 2b --vocab small,real --rounds 3").
.PHONY: bench-cpu-peers
bench-cpu-peers: setup
	$(BIN)/python benchmarks/cpu_peers.py $(PEERS_ARGS)

# Our AWQ's time and KL against llm-compressor's AWQ (issue 21), the peers part of benchmarks/awq.py. Not part of
# `make test`: the first run installs llm-compressor into a venv of its own under ~/.cache/nvila-quant/awq_peers
# (~3 min), then each of the three quantizations runs in its own process (~20 min in all on 2 cores). Pass flags with
# AWQ_ARGS (e.g. AWQ_ARGS="--peer-smoke" for a one-minute self-check).
.PHONY: bench-awq-peers
bench-awq-peers: setup
	$(BIN)/python benchmarks/awq.py --parts peers $(AWQ_ARGS)

clean:
	rm -rf $(VENV) .venv-compat nvila-demo .pytest_cache

# Mutation testing of the fast tests over the numerics, the format packers and the AWQ scale search (not part of
# `make test`; about 15 minutes on 2 cores). Installs the `mutation` extra (mutmut) into the venv when missing; the
# result lands in benchmarks/results/mutation/. Pass flags with MUTATION_ARGS (e.g. MUTATION_ARGS="--modules awq").
.PHONY: mutation
mutation: setup
	$(BIN)/python -c "import mutmut, sys; sys.exit(mutmut.__version__.split('.')[0] != '3')" 2>/dev/null || \
	$(BIN)/python -m pip install -q -e ".[dev,mutation]"
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python benchmarks/mutation.py $(MUTATION_ARGS)
