# Flowmesh — the two commands that matter: `make run` and `make test`.
# Only python3 (>= 3.11) and make are assumed; everything else is installed here, from PyPI.

SHELL := /bin/bash
PYTHON ?= python3
UV_VERSION := 0.13.8
TOOLS := .tools
UV := $(TOOLS)/bin/uv
VENV := .venv
BIN := $(VENV)/bin
MEMBERS := $(wildcard libs/*/pyproject.toml services/*/pyproject.toml tools/*/pyproject.toml)
export UV_PYTHON_DOWNLOADS := never
export UV_PROJECT_ENVIRONMENT := $(VENV)

.DEFAULT_GOAL := help
.PHONY: help install node run cluster test bench lint typecheck fmt token openapi asyncapi nats-config clean

help: ## Show this help
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(UV):
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Flowmesh needs Python >= 3.11 (found " + sys.version.split()[0] + "); set PYTHON=python3.11")'
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

$(VENV)/.installed: $(UV) pyproject.toml $(MEMBERS)
	$(UV) sync --python $(PYTHON) --all-packages
	@touch $@

install: $(VENV)/.installed ## Create the virtualenv and install the workspace

node_modules/.installed: package.json
	npm install --no-package-lock --no-audit --no-fund --ignore-scripts
	@touch $@

node: node_modules/.installed ## Node tools the tests use (JavaScript integrator examples, AsyncAPI parser), from npm

run: install ## Start the whole mesh (embedded NATS + PostgreSQL, five services); Ctrl-C stops it
	$(BIN)/flowmesh dev

cluster: install ## The distributed shape, no Docker: 3 NATS nodes, PostgreSQL, 2 replicas of each service, a front
	$(BIN)/flowmesh cluster

test: install node ## Run the whole test suite (starts its own NATS and PostgreSQL)
	$(BIN)/pytest

bench: install ## Benchmarks against their targets (prints figures, writes bench/results/*.json)
	$(BIN)/python bench/run.py $(BENCH_ARGS)

lint: install ## ruff: lint and formatting
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install ## mypy --strict over libs, services and tools
	$(BIN)/mypy

fmt: install ## Format and auto-fix
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

token: install ## Print a dev JWT (see `flowmesh token --help`)
	@$(BIN)/flowmesh token

openapi: install ## Regenerate docs/api/openapi.json from the gateway's routes and contract models
	$(BIN)/python -m flowmesh.gateway.openapi > docs/api/openapi.json

asyncapi: install ## Regenerate docs/api/asyncapi.yaml (the public NATS subjects) from the contracts
	$(BIN)/python -m flowmesh.cli.asyncapi > docs/api/asyncapi.yaml

nats-config: install ## Regenerate deploy/nats/flowmesh-auth.conf (NATS users and permissions) from the contracts
	$(BIN)/flowmesh nats-config > deploy/nats/flowmesh-auth.conf

clean: ## Remove the virtualenvs (keeps .flowmesh data)
	rm -rf $(VENV) $(TOOLS)
