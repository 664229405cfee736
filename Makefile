PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip
STAMP := $(VENV)/.installed

.PHONY: venv test demo lint typecheck bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel -c constraints.txt
	$(PIP) install -c constraints.txt -e '.[all,dev]'
	$(PIP) install -c constraints.txt --no-deps tf-keras
	touch $(STAMP)

lint: venv
	$(BIN)/ruff check bridge server backends adapters examples benchmarks tests

typecheck: venv
	$(BIN)/mypy

test: venv lint typecheck
	$(BIN)/pytest -q tests

demo: venv
	$(BIN)/python examples/din_movielens.py

bench: venv
	$(BIN)/python benchmarks/ps_throughput.py
	$(BIN)/python benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) build *.egg-info
