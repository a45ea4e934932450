# red_kernels developer and user entry points. `make demo` and `make test` do all the set-up.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU wheel by default; GPU users: make setup TORCH_SPEC="torch==2.13.0 --index-url ..."
TORCH_SPEC ?= torch==2.13.0
TRITON_SPEC ?= triton==3.7.1
PYTEST_ARGS ?=
STAMP := $(VENV)/.red_kernels_setup

.PHONY: setup build demo test test-asan bench lint format clean gpu-check

setup: $(STAMP)

$(STAMP): Makefile setup.py pyproject.toml $(shell find csrc -type f 2>/dev/null)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q $(TRITON_SPEC) numpy ninja pytest pytest-benchmark pytest-timeout hypothesis safetensors "transformers>=5" accelerate peft matplotlib tqdm ruff clang-format
	$(PY) -m pip install -q --no-build-isolation -e .
	touch $(STAMP)

build: setup
	$(PY) -m pip install -q --no-build-isolation -e .

demo: setup
	$(PY) -m red_kernels demo

test: setup
	$(PY) -m pytest python_tests -q $(PYTEST_ARGS)

# The CPU extension built with AddressSanitizer + UndefinedBehaviorSanitizer into build/asan (a
# copy of the package; the normal build is untouched), and the op tests run against it from there.
# Python is not instrumented: libasan is preloaded (with libstdc++, or its __cxa_throw interceptor
# finds nothing to wrap), leak checks (Python's own allocations) are off, and pytest captures
# sys.stderr only, so a sanitizer report that ends the process is printed.
ASAN_DIR := build/asan
ASAN_FLAGS := -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer
ASAN_PRELOAD = $$(g++ -print-file-name=libasan.so) $$(g++ -print-file-name=libstdc++.so)
ASAN_TESTS := red_edit seq_scale gathered_red_edit para_vector_gen gathered_para_vector_gen cpp_autograd
test-asan: setup
	rm -rf $(ASAN_DIR)/red_kernels && mkdir -p $(ASAN_DIR) && cp --parents $$(find red_kernels -name '*.py') $(ASAN_DIR)
	CUDA_VISIBLE_DEVICES= CFLAGS="$(ASAN_FLAGS)" LDFLAGS="$(ASAN_FLAGS)" $(PY) setup.py -q build_ext \
		--build-lib $(ASAN_DIR) --build-temp $(ASAN_DIR)/tmp
	cd $(ASAN_DIR) && LD_PRELOAD="$(ASAN_PRELOAD)" ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=print_stacktrace=1 \
		$(abspath $(PY)) -m pytest -q --capture=sys -p no:cacheprovider $(PYTEST_ARGS) \
		$(foreach t,$(ASAN_TESTS),$(CURDIR)/python_tests/test_$(t).py)

# BENCH_TAG names the result files; e.g. make bench BENCH_ENV="THP_MEM_ALLOC_ENABLE=1" BENCH_TAG=thp
BENCH_TAG ?= latest
BENCH_ENV ?=
bench: setup
	$(PY) -m pip install -q matplotlib || echo "matplotlib not installed: no plot"
	env -u TRITON_INTERPRET $(BENCH_ENV) $(PY) -m pytest benchmarks -q --benchmark-only \
		--benchmark-json=benchmarks/results/$(BENCH_TAG).json $(PYTEST_ARGS)
	$(PY) benchmarks/report.py benchmarks/results/$(BENCH_TAG).json --plot benchmarks/results/$(BENCH_TAG).png \
		| tee benchmarks/results/$(BENCH_TAG).md

lint: setup
	$(VENV)/bin/ruff check red_kernels python_tests benchmarks scripts setup.py
	$(VENV)/bin/ruff format --check red_kernels python_tests benchmarks scripts setup.py
	$(VENV)/bin/clang-format --dry-run --Werror $$(find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh')

format: setup
	$(VENV)/bin/ruff format red_kernels python_tests benchmarks scripts setup.py
	$(VENV)/bin/ruff check --fix red_kernels python_tests benchmarks scripts setup.py
	$(VENV)/bin/clang-format -i $$(find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh')

# One-command check on a GPU machine whose python3 already has a CUDA torch, triton, nvcc,
# transformers and pytest (no .venv, no downloads): builds the extension in place for the local GPU,
# runs the GPU and op tests, times the ops and a small LLaMA; results in $OUT (default gpu_out/).
# GPU_CHECK_DRY_RUN=1 checks the environment and prints the plan without a GPU.
GPU_PYTHON ?= python3
gpu-check:
	$(GPU_PYTHON) scripts/gpu_check.py

clean:
	rm -rf build *.egg-info red_kernels/*.so $(VENV)
