"""Shared test helpers: which backends run here, and per-dtype comparisons.

Low-precision rule (DESIGN.md): compare an fp16/bf16 result with the fp32 reference computed from
the same (rounded) inputs, and allow at most 2x the error that eager PyTorch makes in that dtype,
plus one ulp of the output (the Triton interpreter truncates fp32 -> bf16 stores).
"""

from __future__ import annotations

import torch

import red_kernels as rk

LOW_PRECISION = (torch.float16, torch.bfloat16)


def cpu_backends() -> list[str]:
    """Backends that run on CPU tensors in this process (reference, cpu, triton-interpreted)."""
    return [b.name for b in rk.backends() if b.available and "cpu" in b.devices]


def gpu_backends() -> list[str]:
    return [b.name for b in rk.backends() if b.available and "cuda" in b.devices]


def ulp(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def assert_close(
    out: torch.Tensor,
    ref: torch.Tensor,
    eager: torch.Tensor | None = None,
    what: str = "",
    elementwise: bool = True,
) -> None:
    """``out`` vs ``ref`` (fp32 or fp64 ground truth). For fp16/bf16 ``out``, ``eager`` is the same
    computation done by eager PyTorch in that dtype; its error sets the bound: element by element
    (``elementwise``, for elementwise ops, where each output's eager error is a sharp bound), or the
    largest eager error over the tensor (for outputs of long sums, whose per-element eager error is
    noisy)."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    if out.numel() == 0:
        return
    if out.dtype in LOW_PRECISION:
        ref32 = ref.float()
        err = (out.float() - ref32).abs()
        eager_err = (eager.float() - ref32).abs() if eager is not None else torch.zeros_like(ref32)
        if not elementwise:
            eager_err = eager_err.max()
        bound = 2 * eager_err + ulp(out.dtype) * ref32.abs() + 1e-6
        assert bool((err <= bound).all()), (
            f"{what}: max error {err.max().item():.3g} exceeds 2x eager ({eager_err.max().item():.3g}) + 1 ulp"
        )
    else:
        tol = {torch.float32: (2e-5, 1e-5), torch.float64: (1e-10, 1e-10)}[out.dtype]
        torch.testing.assert_close(out, ref.to(out.dtype), rtol=tol[0], atol=tol[1], msg=lambda m: f"{what}: {m}")


def assert_sum_close(out: torch.Tensor, ref: torch.Tensor, abs_sum: torch.Tensor, what: str = "") -> None:
    """A reduction accumulated in fp32 (or fp64): error relative to the sum of absolute terms."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    if out.numel() == 0:
        return
    rel = 1e-12 if ref.dtype == torch.float64 and out.dtype == torch.float64 else 2e-6
    rel = max(rel, ulp(out.dtype))  # the result is rounded once to the parameter's dtype
    bound = rel * abs_sum.to(ref.dtype) + 1e-30
    err = (out.to(ref.dtype) - ref).abs()
    assert bool((err <= bound * 4).all()), f"{what}: max error {err.max().item():.3g} (bound {bound.max().item():.3g})"


# Builds of the CPU row kernels (csrc/common/cpu_isa.h), narrowest first; RED_KERNELS_CPU_ISA forces one.
CPU_ISAS = ("base", "avx2", "avx512")
ISA_ENVS = [{"RED_KERNELS_CPU_ISA": isa} for isa in CPU_ISAS]


def run_cpu_probe(probe: str, env: dict[str, str]) -> None:
    """Run ``probe`` (a script that prints "ok") in a fresh interpreter with ``env`` added. With
    RED_KERNELS_CPU_ISA in ``env``: skip when this CPU cannot run that build, else check that it is
    the build that ran."""
    import os
    import subprocess
    import sys

    import pytest

    isa = env.get("RED_KERNELS_CPU_ISA")
    if isa is not None:
        from red_kernels import _C

        if CPU_ISAS.index(isa) > CPU_ISAS.index(_C.cpu_isa_supported()):
            pytest.skip(f"this CPU cannot run the {isa} build (it supports {_C.cpu_isa_supported()})")
        probe += "\nfrom red_kernels import _C\nprint(_C.cpu_isa())\n"
    proc = subprocess.run(
        [sys.executable, "-c", probe], env={**os.environ, **env}, capture_output=True, text=True, timeout=300
    )
    lines = proc.stdout.split()
    assert proc.returncode == 0 and lines[:1] == ["ok"], proc.stderr[-3000:]
    if isa is not None:
        assert lines[1:] == [isa], f"asked for the {isa} build, ran {lines[1:]}"
