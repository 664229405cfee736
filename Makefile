PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip
STAMP := $(VENV)/.installed

.PHONY: venv test demo lint importlint typecheck fuzz bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel -c constraints.txt
	$(PIP) install -c constraints.txt -e '.[all,dev]'
	$(PIP) install -c constraints.txt --no-deps tf-keras deepctr-torch
	touch $(STAMP)

lint: venv importlint
	$(BIN)/ruff check bridge server backends adapters examples benchmarks tests tools

# import-linter contracts of .importlinter (the core imports no server, backend or
# adapter; the server only the core's wire, specs and kernels; no cycles)
importlint: venv
	$(BIN)/python tools/lint_imports.py

# atheris over the shard's dispatcher for a fixed time (FUZZ_SECONDS)
FUZZ_SECONDS ?= 60
fuzz: venv
	$(BIN)/python tests/fuzz/fuzz_shard.py -max_total_time=$(FUZZ_SECONDS)

typecheck: venv
	$(BIN)/mypy

test: venv lint typecheck
	$(BIN)/pytest -q tests

demo: venv
	$(BIN)/python examples/din_movielens.py

bench: venv
	$(BIN)/python benchmarks/ps_throughput.py $(if $(PSLITE),--pslite $(PSLITE))
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/deepctr_throughput.py
	$(BIN)/python benchmarks/train_throughput_tf.py --keras
	$(BIN)/python benchmarks/train_throughput_mxnet.py
	$(BIN)/python benchmarks/wal_cost.py

clean:
	rm -rf $(VENV) build *.egg-info
