# Two commands for a fresh machine: `make run` and `make test`. Both install into .venv.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install run ablations test test-fast lint clean

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

# The variants of ablations.yaml as DVC experiments in this workspace (`dvc exp run -S ...`), then
# reports/ablations.{json,md} and reports/plots/{ablations_pareto,grpo_curves}.png. Runs already
# copied to reports/ablations/runs are skipped; ARGS="--only rft_grpo grpo_only" or "--dry-run".
ablations: install
	PREFECT_HOME=$(CURDIR)/.prefect $(PY) -m flows.ablations $(ARGS)

# Everything CI must prove, slow tests (real servers, the whole DVC pipeline) included.
test: install
	PREFECT_HOME=$$(mktemp -d) $(PY) -m pytest -q -ra tests

# The quick loop: skips tests marked slow.
test-fast: install
	PREFECT_HOME=$$(mktemp -d) $(PY) -m pytest -q -ra -m "not slow" tests

clean:
	rm -rf data reports/plots reports/summary.* reports/metrics.json mlflow.db mlruns .prefect
