"""Launch-size helpers shared by the Triton kernels."""

from __future__ import annotations

import triton

from red_kernels._backend import triton_interpreting


def block_d(d: int, gpu_max: int, interp_max: int = 4096) -> int:
    """Columns per program: a power of two covering d, capped. The interpreter costs ~5 ms per
    program whatever its size, so it gets large blocks."""
    return min(triton.next_power_of_2(max(d, 1)), interp_max if triton_interpreting() else gpu_max)
