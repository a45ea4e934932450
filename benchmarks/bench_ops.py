"""Every op's microbenchmarks through pytest-benchmark: the cases of red_kernels.bench.ops (defined
there, once: shapes, eager baseline, torch.compile, backends, memory floor), one test per (case,
variant). ``python -m red_kernels bench --ops-only`` runs the same cases without pytest.

    make bench PYTEST_ARGS="benchmarks/bench_ops.py -k seq_scale"
"""

import pytest
from _common import device, params, run

from red_kernels.bench.ops import cases

CASES = cases(device())


@pytest.mark.parametrize("case, variant", params(CASES))
def test_op(benchmark, case, variant):
    run(benchmark, case, variant)
