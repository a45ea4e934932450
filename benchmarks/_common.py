"""Helpers shared by the benchmark files.

Every benchmark compares, in one process and one run, eager PyTorch (written the way the official
RED/PARA code and PEFT write it), torch.compile of that same eager code, every available backend of
the op, and a memory-bandwidth floor (a copy of the same bytes). pytest-benchmark records medians;
benchmarks/report.py turns its JSON into the README table of ratios. Benchmarks never fail CI.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

import red_kernels as rk

ROUNDS = 15


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def backends_for(dev: torch.device) -> list[str]:
    """Backends that run natively on ``dev`` (the interpreter is excluded by conftest)."""
    return [b.name for b in rk.backends() if b.available and dev.type in b.devices]


def reset_grads(*tensors: torch.Tensor | None) -> None:
    for t in tensors:
        if t is not None:
            t.grad = None


def compiled(fn: Callable) -> Callable:
    """torch.compile of the eager code (compiled lazily, warmed up by the first round)."""
    return torch.compile(fn, dynamic=False)


def run(
    benchmark,
    fn: Callable[[], object],
    group: str,
    variant: str,
    setup: Callable[[], None] | None = None,
    rounds: int = ROUNDS,
    iterations: int = 1,
    **extra,
) -> None:
    """Time ``fn`` with pytest-benchmark: ``rounds`` rounds of ``iterations`` calls (more than one
    for microsecond calls, whose single timings are mostly timer and scheduler noise), ``setup``
    before each round (untimed), two warm-up rounds (compilation, allocator), CUDA synchronised
    inside the timed call."""
    dev = device()

    def timed():
        fn()
        sync(dev)

    benchmark.group = group
    benchmark.extra_info.update(variant=variant, device=str(dev), **extra)
    if dev.type == "cuda":
        benchmark.extra_info["gpu"] = torch.cuda.get_device_name(dev)
    benchmark.pedantic(timed, setup=setup, rounds=rounds, iterations=iterations, warmup_rounds=2)
