# One command to set up and run the demo, one to set up and run the tests (see README.md).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= demo
STAMP := $(VENV)/.installed
VENV_BIN := $(abspath $(VENV))/bin
# The demo and the tests see the venv's commands first; the tests see nothing else but the system's
# directories, so a command that only a leftover global install provides fails here as on a fresh
# machine (set TEST_PATH to widen it, e.g. for a SExtractor built into /usr/local/bin).
TEST_PATH ?= $(VENV_BIN):/usr/sbin:/usr/bin:/sbin:/bin

.PHONY: setup tools demo test bench container-check clean

setup: $(STAMP) tools

tools:
	bin/install-system-packages

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: setup
	PATH="$(VENV_BIN):$$PATH" $(PY) -m dre_hpc.demo --workdir $(DEMO_DIR)

# The container build (about 4 minutes cold, mostly mpi4py's single-threaded compile) starts in the
# background and overlaps the other tests; tests/test_container_build.py runs last and waits for it.
test: setup
	@mkdir -p build
	$(PY) containers/build_rootfs.py > build/container-prebuild.log 2>&1 & prebuild=$$!; \
	env PATH="$(TEST_PATH)" $(PY) -m pytest -q; status=$$?; \
	kill $$prebuild 2>/dev/null; wait $$prebuild 2>/dev/null; exit $$status

bench: setup
	$(PY) benchmarks/bench_fit.py

# containers/dre_hpc.def executed without Apptainer: a Debian rootfs in build/container (or
# $DRE_CONTAINER_CACHE), cached by the hash of the recipe and the package; `make test` runs it too
# (tests/test_container_build.py)
container-check: setup
	$(PY) containers/build_rootfs.py

clean:
	rm -rf $(VENV) $(DEMO_DIR) build dist *.egg-info
