# make demo  : set everything up, start a demo PACS (Orthanc) + the node, route the sample CXRs through it
# make test  : set everything up, lint, and run the whole test suite (real Redis, Orthanc, DCMTK, Celery processes)
# make lint  : ruff on triage_node/ workers/ tests/ bench/, mypy on triage_node/ and workers/ (config in pyproject.toml)
# make images       : build the container images here (no registry; cached by input hash)
# make compose-demo : the node in containers (deploy/compose.yaml) beside a containerised Orthanc, samples routed
# make compose-down : stop it (VOLUMES=1 also drops its volumes; COMPOSE_PROJECT=name for a project other than "triage")
# make test-containers : only the container tests (tests/containers)
.PHONY: setup demo lint test bench clean images compose-demo compose-down test-containers
PY := .venv/bin/python

setup:
	bash deploy/setup.sh

demo: setup
	$(PY) deploy/demo.py

lint: setup
	$(PY) -m ruff check triage_node workers tests bench
	$(PY) -m mypy

test: setup lint
	mkdir -p var
	$(PY) -m pytest -q -ra --basetemp=$(CURDIR)/var/pytest tests

export CONTAINERS_CONF ?= $(CURDIR)/deploy/containers/containers.conf
COMPOSE_PROJECT ?= triage
COMPOSE := podman-compose -p $(COMPOSE_PROJECT) -f deploy/compose.yaml

images: setup
	bash deploy/containers/build.sh

compose-demo: images
	$(PY) deploy/compose_demo.py --project $(COMPOSE_PROJECT)

compose-down:
	$(COMPOSE) down $(if $(VOLUMES),-v,) >/dev/null
	-podman network rm -f $(COMPOSE_PROJECT)_default >/dev/null 2>&1

test-containers: setup
	mkdir -p var
	$(PY) -m pytest -q -ra --basetemp=$(CURDIR)/var/pytest-containers tests/containers

bench: setup
	$(PY) bench/cpu_infer.py

clean:
	rm -rf var test-artifacts .pytest_cache
