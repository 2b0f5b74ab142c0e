# One command to set up and run the demo, one to set up and run the tests (see README.md).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= demo
STAMP := $(VENV)/.installed

.PHONY: setup tools demo test bench clean

setup: $(STAMP) tools

tools:
	bin/install-system-packages

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: setup
	$(PY) -m dre_hpc.demo --workdir $(DEMO_DIR)

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/bench_fit.py

clean:
	rm -rf $(VENV) $(DEMO_DIR) build dist *.egg-info
