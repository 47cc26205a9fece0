# Fresh machine: `make demo` runs the local demo, `make test` runs the test suite.
# Both create the virtual environment in .venv first when it is missing or stale.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torchvision from PyPI is a CUDA build: install the torch it was built against
# (it also runs on CPU machines), never a CPU-only torch wheel.
TORCH := torch==2.14.1 torchvision==0.29.2
STAMP := $(VENV)/.installed

.PHONY: demo test env bench clean

$(STAMP): setup.cfg pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[test,backends]' $(TORCH)
	touch $(STAMP)

env: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/xai-pipeline demo --out runs/demo

test: $(STAMP)
	$(PY) -m pytest -ra $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/bench_methods.py

clean:
	rm -rf $(VENV) runs .pytest_cache
