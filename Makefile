# Flywheel developer loop. `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export GX_ANALYTICS_ENABLED ?= false
export RAY_USAGE_STATS_ENABLED ?= 0
export DO_NOT_TRACK ?= 1

.PHONY: help setup train serve stop up down demo demo-live pipeline ingest etl test test-fast test-containers images check lock bench mlflow-ui clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

setup: $(STAMP) ## create .venv from requirements.lock with pip (first use only)

$(STAMP): requirements.lock pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -r requirements.lock
	$(PIP) install --quiet --no-deps -e .
	@touch $@

train: setup ## the main job on embedded defaults: data -> Ray Tune/Train -> MLflow registry
	$(PY) -m flows.train

serve: setup ## serve the flights champion (and challenger) on http://127.0.0.1:3000 after `make train`
	$(PY) -m flows.deploy serve

stop: setup ## stop the service `make serve` started
	$(PY) -m flows.deploy stop

up: setup ## the local stack: Prefect server + UI, worker, deployments, service, MLflow, Evidently, Prometheus
	$(PY) -m devstack up

down: setup ## stop exactly what `make up` (and the demo) started, by process id
	$(PY) -m devstack down

demo: setup ## the closed loop on 2013 data: train Jan-Mar, replay Apr-Sep as live traffic (after `make up`)
	$(PY) -m devstack.demo

demo-live: setup ## the demo with flights arriving on a Redis stream (flows.stream) instead of daily files
	$(PY) -m devstack.demo --live

pipeline: setup ## the data half only: ingest -> validate -> ETL
	$(PY) -m flows.pipeline

ingest: setup ## ingest and validate the sources into raw Delta tables
	$(PY) -m flows.ingest

etl: setup ## build the versioned feature table with Dask
	$(PY) -m flows.etl

test: setup ## all tests but the container images' and the demo's files variant (unit, flow, integration with real servers)
	$(PY) -m pytest -m "not containers and not variant"

test-containers: setup ## build the images with a private dockerd and run them (Docker work pool, serving container)
	$(PY) -m pytest -m containers

images: setup ## build flywheel-runner and flywheel-serving (deployments/docker/build.sh; a private dockerd: deployments/docker/dockerd.sh)
	bash deployments/docker/build.sh

test-fast: setup ## unit tests only
	$(PY) -m pytest -m "not slow and not integration"

check: setup ## ruff and mypy
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy core tasks compute flows serving monitoring devstack

bench: setup ## side-by-side benchmarks (see benchmarks/README.md)
	$(PY) -m benchmarks.transform
	$(PY) -m benchmarks.etl
	$(PY) -m benchmarks.validation
	$(PY) -m benchmarks.ingest
	$(PY) -m benchmarks.training
	$(PY) -m benchmarks.ab_sequential
	$(PY) -m benchmarks.bandit

lock: ## re-pin requirements.lock from pyproject.toml (pip, in a scratch venv)
	rm -rf /tmp/flywheel-lock && $(PYTHON) -m venv /tmp/flywheel-lock
	/tmp/flywheel-lock/bin/pip install --quiet --upgrade pip
	/tmp/flywheel-lock/bin/pip install --quiet -e '.[dev]'
	/tmp/flywheel-lock/bin/pip freeze --exclude-editable | grep -v '^-e' > requirements.lock

mlflow-ui: setup ## the MLflow UI on http://127.0.0.1:5000 (runs, trials, registry)
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/.flywheel/mlflow.db --host 127.0.0.1 --port 5000

clean: ## remove local state (.flywheel: lake, tracking, reports)
	rm -rf .flywheel
