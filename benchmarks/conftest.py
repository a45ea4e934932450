"""Benchmark set-up: pytest-benchmark files are named bench_*.py; the Triton interpreter is never
benchmarked (it measures Python, not kernels)."""

import os

import pytest

if os.environ.get("TRITON_INTERPRET") == "1":
    raise pytest.UsageError("unset TRITON_INTERPRET for benchmarks: the interpreter is not a kernel")


def pytest_configure(config):
    config.addinivalue_line("python_files", "bench_*.py")
