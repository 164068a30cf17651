# Two commands for a fresh machine: `make run` and `make test`. Both install into .venv.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install run test test-fast lint clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -c constraints.txt
	touch $@

# Runs the whole pipeline on the embedded default (Prefect flow over the DVC stages) and
# prints the results table.
run: install
	PREFECT_HOME=$(CURDIR)/.prefect $(PY) -m flows.pipeline

# Everything CI must prove, slow tests (real servers, the whole DVC pipeline, the pipeline in
# Docker containers) included. ensure_docker.sh installs and starts a Docker engine (as root);
# where it cannot, the tests marked docker say why (skipped without root, failed with it).
test: install
	infra/ensure_docker.sh || echo "no Docker engine: see the docker tests' reports"
	PREFECT_HOME=$$(mktemp -d) $(PY) -m pytest -q -ra tests

# The quick loop: skips tests marked slow.
test-fast: install
	PREFECT_HOME=$$(mktemp -d) $(PY) -m pytest -q -ra -m "not slow" tests

clean:
	rm -rf data reports/plots reports/summary.* reports/metrics.json mlflow.db mlruns .prefect
