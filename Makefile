# Two commands for a fresh machine: `make run` and `make test`. Both install into .venv;
# `make test` also installs .venv-vllm (vLLM, for the slow tests against a real engine).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
VLLM_VENV := .venv-vllm
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export PREFECT_SERVER_ANALYTICS_ENABLED := false
# The flows start an ephemeral Prefect API server; its 20 s default start-up timeout fails on a
# loaded 2-core machine ("Timed out while attempting to connect to ephemeral Prefect API server").
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 180
export DO_NOT_TRACK := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install install-vllm run serve ablations compare test test-fast clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -c constraints.txt
	touch $@

# vLLM in an environment of its own (requirements-vllm.txt says why). Its CPU build pulls in
# torchvision, torchaudio and torchcodec built for another torch: with them installed, importing
# vLLM fails ("operator torchvision::nms does not exist"), and text models need none of them.
install-vllm: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: requirements-vllm.txt constraints-vllm.txt
	python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q -r requirements-vllm.txt -c constraints-vllm.txt
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

# Runs the whole pipeline on the embedded default (Prefect flow over the DVC stages) and
# prints the results table.
run: install
	PREFECT_HOME=$(CURDIR)/.prefect $(PY) -m flows.pipeline

# The registry's champion under vLLM's OpenAI-compatible server (flows/serve.py: download,
# checksum check, CPU flags without a GPU), until Ctrl-C. ARGS="--port 8001", "--version 3", ...
serve: install install-vllm
	$(PY) -m flows.serve $(ARGS)

# The variants of ablations.yaml as DVC experiments in this workspace (`dvc exp run -S ...`), then
# reports/ablations.{json,md} and reports/plots/{ablations_pareto,grpo_curves}.png. Runs already
# copied to reports/ablations/runs from the same params, lock and code are skipped;
# ARGS="--only rft_grpo grpo_only" or "--dry-run".
ablations: install
	PREFECT_HOME=$(CURDIR)/.prefect $(PY) -m flows.ablations $(ARGS)

# Every method of the model registry (params.yaml `models`) on the embedded default with its seeds,
# as DVC experiments, then reports/methods.{json,md} and reports/plots/methods_pareto.png.
# Seeds already copied to reports/compare/runs from the same params, lock and code are skipped;
# ARGS="--dry-run" prints the plan.
compare: install
	PREFECT_HOME=$(CURDIR)/.prefect $(PY) -m flows.compare $(ARGS)

# Everything CI must prove, slow tests (real servers, real vLLM, the whole DVC pipeline, the pipeline
# in Docker containers) included. ensure_docker.sh installs and starts a Docker engine (as root);
# where it cannot, the tests marked docker say why (skipped without root, failed with it).
# The images take ~9 minutes to build from nothing, so they build in the background while the
# other tests run; the docker tests run last (tests/conftest.py) and wait for that build through
# build_images.sh's lock, which then finds every layer cached. Its log: .cache/build_images.log.
test: install install-vllm
	infra/ensure_docker.sh || echo "no Docker engine: see the docker tests' reports"
	mkdir -p .cache; \
	if [ "$$(id -u)" = 0 ] && docker info >/dev/null 2>&1; then \
	  TAG=$${LIVETHINKING_IMAGE_TAG:-dev} PYTHON=$(CURDIR)/$(PY) infra/build_images.sh light train vllm \
	    > .cache/build_images.log 2>&1 & \
	fi; \
	PREFECT_HOME=$$(mktemp -d) $(PY) -m pytest -q -ra --durations=25 tests; rc=$$?; wait; exit $$rc

# The quick loop: skips tests marked slow.
test-fast: install
	PREFECT_HOME=$$(mktemp -d) $(PY) -m pytest -q -ra -m "not slow" tests

clean:
	rm -rf data reports/plots reports/summary.* reports/metrics.json mlflow.db mlruns .prefect
