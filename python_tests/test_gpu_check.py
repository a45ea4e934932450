"""`make gpu-check`'s dry run (scripts/gpu_check.py): it runs here without a GPU, exits 0 and lists
every stage, op, benchmark variant and model case the real run on a GPU machine would go through.
The real run needs a GPU; this keeps the plan (and the script itself) from rotting in between."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

OPS = ["red_edit", "seq_scale", "gathered_red_edit", "para_vector_gen", "gathered_para_vector_gen"]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    out = tmp_path_factory.mktemp("gpu_check") / "out"
    env = {**os.environ, "GPU_CHECK_DRY_RUN": "1", "OUT": str(out)}
    proc = subprocess.run(
        ["make", "-s", "gpu-check", f"GPU_PYTHON={sys.executable}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return proc, out


def test_dry_run_exits_0_and_writes_nothing(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "dry run" in proc.stdout
    assert not out.exists(), "a dry run must not create the results folder"


def test_dry_run_checks_the_environment(dry_run):
    text = dry_run[0].stdout
    for item in ["python", "torch", "triton", "transformers", "peft", "nvcc", "CUDA device"]:
        assert f"  {item}" in text, item
    assert "MISSING" not in text, "a package the check needs is missing here"


def test_dry_run_lists_every_stage_command_and_case(dry_run):
    text = dry_run[0].stdout
    for stage in ["build", "tests", "bench", "models"]:
        assert f"stage {stage}" in text, stage
    # build: in place, CUDA forced, the device's architecture; tests: Triton compiled, not interpreted
    assert "FORCE_CUDA=1" in text and "TORCH_CUDA_ARCH_LIST=" in text and "MAX_JOBS=" in text
    assert f"{sys.executable} setup.py build_ext --inplace" in text
    assert "TRITON_INTERPRET=0" in text and "-m pytest -q" in text and "-p gpu_check" in text
    for test_file in ["test_red_edit.py", "test_seq_scale.py", "test_gathered_red_edit.py", "test_cpp_autograd.py"]:
        assert f"python_tests/{test_file}" in text, test_file
    bench = text.split("\nstage bench:")[1].split("\nstage models:")[0]
    for op in OPS:
        for dt in ["fp32", "bf16"]:
            assert any(line.strip().startswith(f"{op} ") and f" {dt}:" in line for line in bench.splitlines()), (op, dt)
    for line in bench.splitlines():
        if line.strip().startswith(tuple(f"{op} " for op in OPS)):
            assert all(v in line for v in ["eager", "torch.compile", "cuda", "triton"]), line
    models = text.split("\nstage models:")[1]
    for case in ["decode base", "decode red", "decode para", "decode mixed tenants", "train base", "train red"]:
        assert case in models, case
    assert "train para" in models and "train mixed tenants" in models and "peft-lora" in models


def test_dry_run_checks_the_bench_baselines_import(dry_run):
    assert "eager baselines (import red_kernels.bench.ops): ok" in dry_run[0].stdout


def test_bench_baselines_import_without_matplotlib():
    """The bench child imports red_kernels.bench.ops; the GPU machine may lack matplotlib (only the
    chart of ``python -m red_kernels bench`` needs it)."""
    probe = "import sys; sys.modules['matplotlib'] = None; import red_kernels.bench.ops"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("case", range(len(OPS)), ids=OPS)
def test_bench_cases_use_the_shared_eager_baselines(case, monkeypatch):
    """build_case (on the CPU here, with small shapes) times red_kernels.bench.ops's eager code, and
    it runs on the case's inputs."""
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import gpu_check
    import torch

    from red_kernels.bench import ops as bench_ops

    monkeypatch.setattr(gpu_check, "DEVICE", "cpu")
    para = {"B": 2, "T": 5, "d": 16, "r": 3, "n": 10}
    op, params = [
        ("red_edit", {"shape": (2, 3, 16)}),
        ("seq_scale", {"shape": (2, 3, 16)}),
        ("gathered_red_edit", {"K": 2, "shape": (4, 3, 16)}),
        ("para_vector_gen", para),
        ("gathered_para_vector_gen", {**para, "K": 3, "B": 3}),
    ][case]
    inputs, grad, fns, _ = gpu_check.build_case(op, params, torch.float32)
    shared = {
        "red_edit": (bench_ops.eager_red_edit, None),
        "seq_scale": (bench_ops.eager_seq_scale, None),
        "gathered_red_edit": (bench_ops.eager_gathered_red_edit, bench_ops.eager_gathered_red_edit_loop),
        "para_vector_gen": (bench_ops.eager_para_vector_gen, None),
        "gathered_para_vector_gen": (None, bench_ops.eager_gathered_para_loop),
    }[op]
    for name, fn in zip(["eager", "loop"], shared):
        if fn is not None:
            assert fns[name] is fn, name
    want = fns["eager"](*inputs)
    assert want.shape == grad.shape
    if "loop" in fns:
        torch.testing.assert_close(fns["loop"](*inputs), want)
