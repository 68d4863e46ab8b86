# make demo  : set everything up, start a demo PACS (Orthanc) + the node, route the sample CXRs through it
# make test  : set everything up, lint, and run the whole test suite (real Redis, Orthanc, DCMTK, Celery processes)
# make lint  : ruff and mypy (config in pyproject.toml) on triage_node/ and workers/
.PHONY: setup demo lint test bench clean
PY := .venv/bin/python

setup:
	bash deploy/setup.sh

demo: setup
	$(PY) deploy/demo.py

lint: setup
	$(PY) -m ruff check triage_node workers
	$(PY) -m mypy

test: setup lint
	mkdir -p var
	$(PY) -m pytest -q -ra --basetemp=$(CURDIR)/var/pytest tests

bench: setup
	$(PY) bench/cpu_infer.py

clean:
	rm -rf var test-artifacts .pytest_cache
