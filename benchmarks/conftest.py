"""Benchmark set-up: pytest-benchmark files are named bench_*.py; the Triton interpreter is never
benchmarked (it measures Python, not kernels)."""

import os

import pytest

from red_kernels.bench.timing import fix_malloc_mmap_threshold

if os.environ.get("TRITON_INTERPRET") == "1":
    raise pytest.UsageError("unset TRITON_INTERPRET for benchmarks: the interpreter is not a kernel")

# Every allocation of >= 1 MiB a fresh mmap in every variant and round (see the function's docstring).
MALLOC_FIXED = fix_malloc_mmap_threshold()


def pytest_configure(config):
    config.addinivalue_line("python_files", "bench_*.py")
