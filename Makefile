# vlkit: `make demo` trains SigLIP on ShapesWorld and writes runs/demo/report.html; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check

.PHONY: demo test install lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Torch is installed first and pinned: left to itself pip would pick a multi-GB CUDA build.
$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(PIP) "$(TORCH)"
	$(PIP) -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed pyproject.toml
	$(PIP) -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/vlkit demo --out runs/demo

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest

lint: $(VENV)/.installed-test
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

bench: $(VENV)/.installed-test
	$(BIN)/python bench/train_step.py --out bench/results/train_step.json

clean:
	rm -rf $(VENV) runs .pytest_cache
