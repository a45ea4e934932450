"""Command line: ``python -m red_kernels info | demo | bench [pytest args]``."""

from __future__ import annotations

import argparse
import platform
import sys

import torch


def info() -> None:
    import red_kernels

    print(f"red_kernels {red_kernels.__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__}, {platform.machine()}")
    print(f"torch threads: {torch.get_num_threads()}, CUDA build: {torch.version.cuda or 'no'}")
    print("backends:")
    for b in red_kernels.backends():
        print(f"  {b}")


def demo() -> None:
    """A small RED example on every backend that can run here, checked against the reference."""
    import red_kernels as rk

    info()
    torch.manual_seed(0)
    h = torch.randn(4, 16, 64, requires_grad=True)
    scale = torch.nn.Parameter(1 + 0.1 * torch.randn(64))
    bias = torch.nn.Parameter(0.1 * torch.randn(64))
    ref = rk.red_edit_reference(h, scale, bias)
    ref.square().mean().backward()
    expected = [t.grad.clone() for t in (h, scale, bias)]
    print("\nred_edit(h[4, 16, 64], scale[64], bias[64]) vs the eager reference:")
    for b in rk.backends():
        if not b.available or "cpu" not in b.devices:
            print(f"  {b.name:<10} skipped: {b.reason}")
            continue
        for t in (h, scale, bias):
            t.grad = None
        out = rk.red_edit(h, scale, bias, backend=b.name)
        out.square().mean().backward()
        err = max(
            (out - ref).abs().max().item(),
            *((t.grad - e).abs().max().item() for t, e in zip((h, scale, bias), expected)),
        )
        print(f"  {b.name:<10} max |diff| (output and all gradients) = {err:.2e}")


def bench(extra: list[str]) -> int:
    """Run the pytest-benchmark files of a source checkout (benchmarks/ is not installed)."""
    from pathlib import Path

    bench_dir = Path(__file__).resolve().parents[1] / "benchmarks"
    if not bench_dir.is_dir():
        print("benchmarks/ not found: run this from a source checkout (make bench)", file=sys.stderr)
        return 2
    import pytest

    return pytest.main([str(bench_dir), "-q", "--benchmark-only", *extra])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m red_kernels")
    parser.add_argument("command", choices=["info", "demo", "bench"])
    args, extra = parser.parse_known_args(argv)
    if args.command == "bench":
        return bench(extra)
    {"info": info, "demo": demo}[args.command]()
    return 0


if __name__ == "__main__":
    sys.exit(main())
