"""Benchmark set-up: pytest-benchmark files are named bench_*.py; the Triton interpreter is never
benchmarked (it measures Python, not kernels)."""

import ctypes
import ctypes.util
import os

import pytest

if os.environ.get("TRITON_INTERPRET") == "1":
    raise pytest.UsageError("unset TRITON_INTERPRET for benchmarks: the interpreter is not a kernel")


def _fix_malloc_mmap_threshold(nbytes: int = 1 << 20) -> bool:
    """Make every allocation of >= 1 MiB a fresh mmap, in every variant and every round.

    glibc raises its mmap threshold dynamically (up to 32 MiB) after large frees, so whether a
    16-32 MiB tensor gets recycled heap memory (no page faults) or fresh pages depends on what ran
    before: measured here, the same benchmark swung 3-5x between runs. A fixed threshold makes the
    allocator state the same for eager, torch.compile, the floor and the backends.
    """
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return False
    try:
        libc = ctypes.CDLL(libc_name)
        return bool(libc.mallopt(-3, nbytes))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


MALLOC_FIXED = _fix_malloc_mmap_threshold()


def pytest_configure(config):
    config.addinivalue_line("python_files", "bench_*.py")
