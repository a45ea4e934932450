"""gathered_red_edit: pytest-benchmark over the cases of red_kernels.bench.ops (defined there: shapes, eager
baseline, torch.compile, backends, floor).

    make bench PYTEST_ARGS="benchmarks/bench_gathered_red_edit.py"
"""

import pytest
from _common import device, params, run

from red_kernels.bench.ops import op_cases

CASES = op_cases("gathered_red_edit", device())


@pytest.mark.parametrize("case, variant", params(CASES))
def test_gathered_red_edit(benchmark, case, variant):
    run(benchmark, case, variant)
