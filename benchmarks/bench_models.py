"""Model-level benchmarks with pytest-benchmark, over the cases of red_kernels.bench.models (defined
there): a training step of a random LLaMA (hidden 512, 4 layers; frozen base, RED, RED+, PARA, PEFT
IA3, PEFT LoRA r=8), greedy decoding (base, RED, PARA, mixed tenants), and the tenants comparison
(hidden 1024, 8 layers: base, RED / PARA tenants, PEFT LoRA mixed, PEFT IA3 loop) for batch 8 /
8 tenants, plus batch 64 / 1, 8, 64 tenants with ``RK_BENCH_TENANTS_FULL=1`` (the default run keeps
batch 8 to fit a 2-core CPU). Memory per case: ``python -m red_kernels bench`` or
``benchmarks/models_side_by_side.py tenants`` (one process's RSS high-water mark cannot tell cases apart).

    make bench PYTEST_ARGS="benchmarks/bench_models.py"
"""

import os

import pytest
from _common import device, params, run

from red_kernels.bench import models

pytest.importorskip("transformers")

# models.cases() holds the tenants comparison at batch 8 / 8 tenants; the full run adds batch 64.
_MORE_TENANT_RUNS = [(64, 1), (64, 8), (64, 64)] if os.environ.get("RK_BENCH_TENANTS_FULL") == "1" else []

CASES = [
    *models.cases(device()),
    *[models.tenants_case(batch=b, tenants=t, device=device()) for b, t in _MORE_TENANT_RUNS],
]


@pytest.mark.parametrize("case, variant", params(CASES))
def test_model(benchmark, case, variant):
    run(benchmark, case, variant)
