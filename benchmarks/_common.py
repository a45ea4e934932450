"""pytest-benchmark glue over the package's benchmark cases (red_kernels.bench).

The cases (inputs, eager baselines, torch.compile, backends, floors, model variants) are defined
once in ``red_kernels/bench/``; ``python -m red_kernels bench`` runs them without pytest. Here each
(case, variant) is one pytest-benchmark test, so ``make bench`` keeps its JSON, groups and
``-k`` selection; ``benchmarks/report.py`` renders that JSON with the package's tables. The variants
of a case run one after another here (pytest-benchmark's model), not interleaved as in the command.
Benchmarks never fail CI.
"""

from __future__ import annotations

import gc

import pytest
import torch

from red_kernels.bench.timing import Case, sync


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def params(cases: list[Case]) -> list:
    """One pytest parameter per (case, variant), named "<group>-<variant>" with '-' for spaces, case
    by case."""
    return [
        pytest.param(case, variant, id=f"{case.group}-{variant}".replace(" ", "-"))
        for case in cases
        for variant in case.variants
    ]


# The last case built: its variants share its inputs, and consecutive tests are its variants; one
# case at a time keeps memory flat.
_built: dict = {}


def run(benchmark, case: Case, variant: str) -> None:
    """Time one variant of ``case`` with pytest-benchmark: ``case.rounds`` rounds of
    ``case.iterations`` calls, the variant's setup (untimed) before each round, ``case.warmup``
    warm-up rounds, CUDA synchronised inside the timed call."""
    if _built.get("group") != case.group:
        _built.clear()
        gc.collect()
        _built.update(group=case.group, variants=case.build())
    timed_variant = _built["variants"][variant]
    dev = device()

    def timed():
        timed_variant.fn()
        sync(dev)

    benchmark.group = case.group
    benchmark.extra_info.update(
        variant=variant,
        device=str(dev),
        kind=case.kind,
        baseline=case.baseline,
        compiled=case.compiled,
        floor=case.floor,
        tokens=case.tokens,
    )
    if dev.type == "cuda":
        benchmark.extra_info["gpu"] = torch.cuda.get_device_name(dev)
    benchmark.pedantic(
        timed, setup=timed_variant.setup, rounds=case.rounds, iterations=case.iterations, warmup_rounds=case.warmup
    )
