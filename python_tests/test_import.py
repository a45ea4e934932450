"""`import red_kernels` works without Triton, without the compiled extension and without CUDA, and
never initialises CUDA. Each case runs in a fresh interpreter."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PROBE = r"""
import json, sys, torch
import red_kernels as rk
h = torch.randn(3, 8, requires_grad=True)
out = rk.red_edit(h, torch.ones(8), torch.zeros(8))
out.sum().backward()
info = {b.name: [b.available, b.reason] for b in rk.backends()}
print(json.dumps({
    "cuda_initialized": torch.cuda.is_initialized(),
    "triton_imported": "triton" in sys.modules,
    "backends": info,
    "ok": bool(torch.equal(out, h)),
}))
"""


def _run(env_extra: dict[str, str], prelude: str = "") -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(env_extra)
    proc = subprocess.run([sys.executable, "-c", prelude + PROBE], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_plain_import_is_lazy_and_does_not_touch_cuda():
    code = "import sys, torch, red_kernels; print(int(torch.cuda.is_initialized()), int('triton' in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["0", "0"]


def test_runs_without_cuda_init():
    res = _run({})
    assert res["ok"] and not res["cuda_initialized"]


def test_runs_without_triton():
    # Make `import triton` fail as if it were not installed.
    res = _run({}, prelude="import sys; sys.modules['triton'] = None\n")
    assert res["ok"]
    available, reason = res["backends"]["triton"]
    assert not available and "triton" in reason


def test_runs_without_extension():
    res = _run({"RED_KERNELS_DISABLE_EXT": "1"})
    assert res["ok"]
    for name in ("cpu", "cuda"):
        available, reason = res["backends"][name]
        assert not available and reason


def test_cpu_backend_built_in_ci():
    """In CI (and after `make setup`) the extension must be there: a silent fallback to the
    reference would hide a broken build."""
    if os.environ.get("RED_KERNELS_NO_EXT") == "1":
        pytest.skip("pure-Python install requested")
    import red_kernels as rk

    info = {b.name: b for b in rk.backends()}
    assert info["cpu"].available, info["cpu"].reason
    assert info["triton"].available, info["triton"].reason  # conftest switches the interpreter on


def test_info_command_lists_every_backend():
    proc = subprocess.run([sys.executable, "-m", "red_kernels", "info"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for name in ("reference", "cpu", "triton", "cuda"):
        assert name in proc.stdout
    assert "unavailable" in proc.stdout  # cuda, at least, on this machine: and it says why
    assert "cpu outputs: huge-page advice on" in proc.stdout


def test_info_command_says_when_huge_page_advice_is_off():
    env = {**os.environ, "RED_KERNELS_NO_HUGE_PAGES": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "red_kernels", "info"], capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stderr
    assert "cpu outputs: huge-page advice off (RED_KERNELS_NO_HUGE_PAGES)" in proc.stdout
