# make demo  : set everything up, start a demo PACS (Orthanc) + the node, route the sample CXRs through it
# make test  : set everything up and run the whole test suite (real Redis, Orthanc, DCMTK, Celery processes)
.PHONY: setup demo test bench clean
PY := .venv/bin/python

setup:
	bash deploy/setup.sh

demo: setup
	$(PY) deploy/demo.py

test: setup
	mkdir -p var
	$(PY) -m pytest -q -ra --basetemp=$(CURDIR)/var/pytest tests

bench: setup
	$(PY) bench/cpu_infer.py

clean:
	rm -rf var test-artifacts .pytest_cache
