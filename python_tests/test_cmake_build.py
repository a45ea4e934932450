"""CMakeLists.txt builds csrc/ against libtorch into a library that torch.ops.load_library loads, for
C++ stacks; the operators it registers compute what the Python package's do."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch.utils

ROOT = Path(__file__).resolve().parents[1]

LOAD_AND_RUN = r"""
import sys, torch
torch.ops.load_library(sys.argv[1])
h = torch.randn(5, 33, requires_grad=True)
s, b = torch.randn(33), torch.randn(33, requires_grad=True)
out = torch.ops.red_kernels_C.red_edit(h, s, b)
assert torch.allclose(out, h * s + b, rtol=1e-6, atol=1e-6), "red_edit mismatch"
out.backward(torch.ones_like(out))  # the op's autograd is C++: no Python package needed
assert torch.allclose(h.grad, s.expand(5, 33)) and torch.allclose(b.grad, torch.full((33,), 5.0)), "grads"
print("ok")
"""


@pytest.mark.slow
def test_cmake_build_loads_with_torch_ops(tmp_path):
    if shutil.which("cmake") is None:
        pytest.skip("cmake not found")
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    configure = [
        "cmake",
        "-S",
        str(ROOT),
        "-B",
        str(tmp_path),
        *generator,
        f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
    ]
    for cmd in (configure, ["cmake", "--build", str(tmp_path), "-j2"]):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    libs = list(tmp_path.glob("libred_kernels_ops.*"))
    assert libs, "no library produced"
    proc = subprocess.run([sys.executable, "-c", LOAD_AND_RUN, str(libs[0])], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
