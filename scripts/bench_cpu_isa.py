"""The cpu backend's forward with each build of its row kernels (RED_KERNELS_CPU_ISA: base, avx2,
avx512) against torch.compile of the eager code, side by side in one process.

Shapes and setup as the red_edit and seq_scale cases of red_kernels/bench/ops.py (inputs require grad, as in
training). Rounds are interleaved (every variant once per round, order rotated), medians reported,
ratios = torch.compile median / variant median (> 1: faster than torch.compile). Builds the CPU
cannot run are left out. Run with huge pages for every variant, as the README's second table:

    THP_MEM_ALLOC_ENABLE=1 python scripts/bench_cpu_isa.py [--rounds 25] [--warm]

--warm keeps freed outputs in the heap so every variant writes already-faulted memory: it times the
loops and their memory traffic without the page faults (which dominate on a loaded machine).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import os
import platform
import statistics
import time

import torch

import red_kernels as rk
from red_kernels import _C

ISAS = ("base", "avx2", "avx512")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=25)
    ap.add_argument("--isas", default="avx2,avx512", help="comma-separated builds to time")
    ap.add_argument(
        "--warm",
        action="store_true",
        help="outputs reuse already-faulted heap memory (no mmap, no trim): times the loops without page faults",
    )
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if args.warm:
        libc.mallopt(-4, 0)  # M_MMAP_MAX: never mmap, so freed outputs stay in the heap
        libc.mallopt(-1, 1 << 40)  # M_TRIM_THRESHOLD: never give heap pages back
    else:
        # Every allocation >= 1 MiB a fresh mmap in every variant (benchmarks/conftest.py says why).
        libc.mallopt(-3, 1 << 20)
    supported = _C.cpu_isa_supported()
    isas = [i for i in args.isas.split(",") if ISAS.index(i) <= ISAS.index(supported)]
    print(f"# {_cpu_name()}, {os.cpu_count()} cpus, torch {torch.__version__}, threads {torch.get_num_threads()}")
    mem = "warm heap (no page faults)" if args.warm else "fresh mmap per output"
    print(f"# THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE')}, {mem}, widest build {supported}")
    print(f"# medians of {args.rounds} interleaved rounds; ratio = torch.compile / variant")

    def eager_red(h, s, b):
        return h * s.to(h.dtype) + b.to(h.dtype)

    def eager_seq(x, v):
        return x * v.to(x.dtype)[:, None, :]

    comp_red = torch.compile(eager_red, dynamic=False)
    comp_seq = torch.compile(eager_seq, dynamic=False)
    cases = []
    for shape, dtype in [
        ((4096, 4096), torch.float32),
        ((8, 512, 4096), torch.bfloat16),
        ((4096, 4096), torch.bfloat16),
        ((8, 512, 4096), torch.float32),
    ]:
        h = torch.randn(shape).to(dtype).requires_grad_()
        s = torch.randn(shape[-1], requires_grad=True)
        b = torch.randn(shape[-1], requires_grad=True)
        name = f"red_edit {'x'.join(map(str, shape))} {str(dtype).removeprefix('torch.')} fwd"
        cases.append(
            (name, lambda h=h, s=s, b=b: comp_red(h, s, b), lambda h=h, s=s, b=b: rk.red_edit(h, s, b, backend="cpu"))
        )
    for shape, dtype in [((8, 512, 4096), torch.float32), ((8, 512, 4096), torch.bfloat16)]:
        x = torch.randn(shape).to(dtype).requires_grad_()
        v = (torch.randn(shape[0], shape[-1]) * 0.1 + 1).requires_grad_()
        name = f"seq_scale {'x'.join(map(str, shape))} {str(dtype).removeprefix('torch.')} fwd"
        cases.append((name, lambda x=x, v=v: comp_seq(x, v), lambda x=x, v=v: rk.seq_scale(x, v, backend="cpu")))

    head = "| op, shape | torch.compile ms | " + " | ".join(f"rk-cpu {i} ms" for i in isas)
    head += " | " + " | ".join(f"{i} vs compile" for i in isas)
    if "avx2" in isas and "avx512" in isas:
        head += " | avx512 vs avx2"
    print(head + " |")
    print("|" + "---|" * (head.count("|")))
    for name, comp, kern in cases:
        variants = [("compile", comp, None)] + [(i, kern, i) for i in isas]
        times = {v[0]: [] for v in variants}
        for _ in range(3):  # warm-up: compilation, allocator, page tables
            for _, fn, isa in variants:
                if isa:
                    _C._set_cpu_isa(isa)
                fn()
        for r in range(args.rounds):
            order = variants[r % len(variants) :] + variants[: r % len(variants)]
            for label, fn, isa in order:
                if isa:
                    _C._set_cpu_isa(isa)
                t0 = time.perf_counter()
                out = fn()
                times[label].append(time.perf_counter() - t0)
                del out
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        row = f"| {name} | {med['compile']:.2f} | " + " | ".join(f"{med[i]:.2f}" for i in isas)
        row += " | " + " | ".join(f"{med['compile'] / med[i]:.2f}x" for i in isas)
        if "avx2" in isas and "avx512" in isas:
            row += f" | {med['avx2'] / med['avx512']:.2f}x"
        print(row + " |", flush=True)
    _C._set_cpu_isa(supported)


if __name__ == "__main__":
    main()
