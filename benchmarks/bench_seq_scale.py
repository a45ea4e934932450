"""seq_scale: pytest-benchmark over the cases of red_kernels.bench.ops (defined there: shapes, eager
baseline, torch.compile, backends, floor).

    make bench PYTEST_ARGS="benchmarks/bench_seq_scale.py"
"""

import pytest
from _common import device, params, run

from red_kernels.bench.ops import op_cases

CASES = op_cases("seq_scale", device())


@pytest.mark.parametrize("case, variant", params(CASES))
def test_seq_scale(benchmark, case, variant):
    run(benchmark, case, variant)
