# ortune: `make help` lists the targets. Settings live in conf/; pass overrides as ARGS="key=value ...".
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export DVC_NO_ANALYTICS := 1
ARGS ?=
NAME ?=
SET_ARGS := $(foreach a,$(ARGS),-S '$(a)')
NAME_ARG := $(if $(NAME),-n $(NAME),)

.DEFAULT_GOAL := help
.PHONY: help setup test test-fast params all repro clean-outputs

help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-12s %s\n", $$1, $$2}'
	@echo '  Overrides: make all ARGS="lora.r=32 precision=int4" [NAME=my-exp]'

setup: $(VENV)/.installed ## Create .venv with the exact pins (idempotent; PyPI only)

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || python3.11 -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt
	$(PY) -m pip install --disable-pip-version-check -q --no-deps -e .
	touch $@

test: setup ## Run the whole test suite (unit + end-to-end pipeline on the tiny model)
	$(PY) -m pytest -q

test-fast: setup ## Unit tests only (skips the slow end-to-end pipeline tests)
	$(PY) -m pytest -q -m "not slow"

params: setup ## Compose params.yaml from conf/ and ARGS (never edit params.yaml by hand)
	$(PY) -m ortune.config $(ARGS)

all: setup ## Run the whole pipeline as a DVC experiment (ARGS=Hydra overrides, NAME=experiment name)
	dvc exp run $(NAME_ARG) $(SET_ARGS)
	@echo
	@echo "Results: metrics/eval.json (accuracy, macro-F1, baseline), models/onnx/ (the shipped model)"
	@dvc metrics show 2>/dev/null | head -20 || true

repro: params ## Compose params.yaml from conf/ + ARGS, then `dvc repro` (no experiment recorded)
	dvc repro
