"""Test set-up: the Triton interpreter must be switched on before anything imports triton, so the
`triton` backend runs here on CPU tensors. GPU tests carry the `gpu` marker and skip without CUDA.

Hypothesis profiles for the property tests (test_properties.py): "ci", the default, runs 200
derandomized examples per test (the same cases every run, so CI is reproducible); "deep" runs 2000
random ones. Choose with RED_KERNELS_HYPOTHESIS_PROFILE=deep. Neither writes an example database
into the tree; "deep" prints a reproduce_failure blob for each failure instead."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

try:
    from hypothesis import HealthCheck, settings
except ImportError:  # only the property tests need it (make setup installs it)
    settings = None

if settings is not None:
    # Cases run in a worker process and the Triton interpreter is slow: no deadline, no too_slow.
    # The function-scoped fixture below only seeds torch's global RNG, which the cases never use.
    _quiet = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
    settings.register_profile(
        "ci", max_examples=200, derandomize=True, deadline=None, database=None, suppress_health_check=_quiet
    )
    settings.register_profile(
        "deep", max_examples=2000, deadline=None, database=None, print_blob=True, suppress_health_check=_quiet
    )
    settings.load_profile(os.environ.get("RED_KERNELS_HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
