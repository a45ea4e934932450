"""Does the cpu backend's huge-page advice stall here after other code frees a lot of memory?

Times gathered_red_edit forward+backward ([16, 512, 4096] bf16, 16 tenants; the op whose
benchmark row showed it) on the cpu backend, alone, and right after a call of the reference
backend (eager PyTorch, which allocates and frees ~2 GB of 4 KiB pages per call). On a VM whose
memory balloon takes freed blocks back (free page reporting: /sys/module/page_reporting), the
huge pages of the next large output must be faulted back in by the host: some calls then take
10x longer. RED_KERNELS_NO_HUGE_PAGES=1 (advice off) and THP_MEM_ALLOC_ENABLE=1 (huge pages for
every allocation, so the reference reuses them) show the alternatives:

    python scripts/bench_huge_page_stall.py [--rounds 20]
    RED_KERNELS_NO_HUGE_PAGES=1 python scripts/bench_huge_page_stall.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import red_kernels as rk
from red_kernels.bench.timing import fix_malloc_mmap_threshold


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args()
    fix_malloc_mmap_threshold()  # every large tensor a fresh mapping, as in the benchmarks
    gen = torch.Generator().manual_seed(0)
    k = 16
    h = torch.randn(16, 512, 4096, generator=gen).to(torch.bfloat16).requires_grad_()
    scales = (1 + 0.1 * torch.randn(k, 4096, generator=gen)).requires_grad_()
    biases = (0.1 * torch.randn(k, 4096, generator=gen)).requires_grad_()
    ids = torch.randint(0, k, (16,), generator=gen)
    grad = torch.randn(h.shape, generator=gen).to(h.dtype)

    def call(backend: str) -> float:
        for t in (h, scales, biases):
            t.grad = None
        t0 = time.perf_counter()
        rk.gathered_red_edit(h, scales, biases, ids, backend=backend).backward(grad)
        return (time.perf_counter() - t0) * 1e3

    call("cpu")  # warm-up
    alone = [call("cpu") for _ in range(args.rounds)]
    after = []
    for _ in range(args.rounds):
        call("reference")
        after.append(call("cpu"))
    env = {k: os.environ[k] for k in ("RED_KERNELS_NO_HUGE_PAGES", "THP_MEM_ALLOC_ENABLE") if k in os.environ}
    print(f"# {env or 'default environment'}; free page reporting: {os.path.isdir('/sys/module/page_reporting')}")
    for name, ts in (("cpu alone", alone), ("cpu after reference", after)):
        print(
            f"{name:20s} median {statistics.median(ts):7.1f} ms  max {max(ts):7.1f} ms  "
            f"calls > 3x median-alone: {sum(t > 3 * statistics.median(alone) for t in ts)}/{len(ts)}"
        )


if __name__ == "__main__":
    main()
