"""Triton kernels for red_edit: y = h * scale + bias (forward) and the fused backward.

Same contract as the C++ ops ``red_kernels_C::red_edit`` and ``red_edit_bwd``: ``scale``/``bias`` are [d] (or
None), the output is contiguous in h's dtype, a gradient that is not needed comes back empty.
Arithmetic is in fp32 (fp64 for fp64 inputs); values are converted right after loading, which also
keeps the interpreter's bf16 arithmetic out of the picture.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from red_kernels._backend import triton_interpreting
from red_kernels.ops._common import acc_dtype, as_rows, empty_unless
from red_kernels.triton._utils import block_d


@triton.jit
def _red_edit_fwd_kernel(h_ptr, s_ptr, b_ptr, out_ptr, M, D, h_stride, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    mask = (rows < M)[:, None] & cmask[None, :]
    s = tl.load(s_ptr + cols, mask=cmask, other=0.0)
    b = tl.load(b_ptr + cols, mask=cmask, other=0.0)
    rows64 = rows.to(tl.int64)[:, None]
    h = tl.load(h_ptr + rows64 * h_stride + cols[None, :], mask=mask, other=0.0).to(s.dtype)
    y = h * s[None, :] + b[None, :]
    tl.store(out_ptr + rows64 * D + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def bwd_row_tile(
    g_ptr,
    h_ptr,
    gh_ptr,
    rows64,
    cols,
    mask,
    s,
    D,
    g_stride,
    h_stride,
    acc_gh,
    acc_g,
    NEED_H: tl.constexpr,
    NEED_S: tl.constexpr,
    NEED_B: tl.constexpr,
):
    # One [BLOCK_M, BLOCK_D] tile of the backward (shared with gathered_red_edit): writes
    # grad_h = g * s for the tile's rows and adds g * h and g into the running column sums.
    g = tl.load(g_ptr + rows64 * g_stride + cols[None, :], mask=mask, other=0.0).to(s.dtype)
    if NEED_H:
        tl.store(gh_ptr + rows64 * D + cols[None, :], (g * s[None, :]).to(gh_ptr.dtype.element_ty), mask=mask)
    if NEED_S:
        h = tl.load(h_ptr + rows64 * h_stride + cols[None, :], mask=mask, other=0.0).to(s.dtype)
        acc_gh += g * h
    if NEED_B:
        acc_g += g
    return acc_gh, acc_g


@triton.jit
def _red_edit_bwd_kernel(
    g_ptr,
    h_ptr,
    s_ptr,
    gh_ptr,
    part_gh_ptr,
    part_g_ptr,
    M,
    D,
    g_stride,
    h_stride,
    rows_per_prog,
    NEED_H: tl.constexpr,
    NEED_S: tl.constexpr,
    NEED_B: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Program (i, j) owns rows [i * rows_per_prog, (i + 1) * rows_per_prog) and one column block:
    # it writes grad_h there and one fp32 partial column sum per output (stage 1 of 2).
    pid_m = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    s = tl.load(s_ptr + cols, mask=cmask, other=0.0)
    acc_gh = tl.zeros([BLOCK_M, BLOCK_D], dtype=s.dtype)
    acc_g = tl.zeros([BLOCK_M, BLOCK_D], dtype=s.dtype)
    row0 = pid_m * rows_per_prog
    for m0 in range(0, rows_per_prog, BLOCK_M):
        local = m0 + tl.arange(0, BLOCK_M)
        rows = row0 + local
        mask = ((rows < M) & (local < rows_per_prog))[:, None] & cmask[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        acc_gh, acc_g = bwd_row_tile(
            g_ptr, h_ptr, gh_ptr, rows64, cols, mask, s, D, g_stride, h_stride, acc_gh, acc_g, NEED_H, NEED_S, NEED_B
        )
    if NEED_S:
        tl.store(part_gh_ptr + pid_m * D + cols, tl.sum(acc_gh, axis=0), mask=cmask)
    if NEED_B:
        tl.store(part_g_ptr + pid_m * D + cols, tl.sum(acc_g, axis=0), mask=cmask)


@triton.jit
def _column_sum_kernel(part_ptr, out_ptr, seg_ptr, NB, D, SEGMENTED: tl.constexpr, BLOCK_D: tl.constexpr):
    # Stage 2: out[s, j] = sum of part[b, j] over the rows b of segment s, in a fixed order
    # (deterministic). Unsegmented: one segment, all NB rows.
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    seg = tl.program_id(1)
    if SEGMENTED:
        b0 = tl.load(seg_ptr + seg)
        b1 = tl.load(seg_ptr + seg + 1)
    else:
        b0 = 0
        b1 = NB
    total = tl.zeros([BLOCK_D], dtype=out_ptr.dtype.element_ty)
    for b in range(b0, b1):
        total += tl.load(part_ptr + b * D + cols, mask=cmask, other=0.0)
    tl.store(out_ptr + seg * D + cols, total, mask=cmask)


def column_sum(part: Tensor, segments: Tensor | None = None) -> Tensor:
    """Deterministic column sums of a contiguous [nblocks, d] partial-sum buffer.

    ``segments`` None: the sum over all rows, [d]. Else an int64 [S + 1] tensor of nondecreasing
    row offsets on part's device: row s of the [S, d] result sums rows ``segments[s]`` to
    ``segments[s + 1] - 1`` (zero for an empty segment).
    """
    nb, d = part.shape
    nseg = 1 if segments is None else segments.numel() - 1
    out = part.new_zeros(d) if segments is None else part.new_zeros((nseg, d))
    if d == 0 or nseg == 0 or (segments is None and nb == 0):
        return out
    bd = block_d(d, 1024)
    seg = segments if segments is not None else part  # unused pointer when unsegmented
    _column_sum_kernel[(triton.cdiv(d, bd), nseg)](part, out, seg, nb, d, SEGMENTED=segments is not None, BLOCK_D=bd)
    return out


def _param(p: Tensor | None, d: int, like: Tensor, fill: float) -> Tensor:
    acc = acc_dtype(like.dtype)
    if p is None:
        return torch.full((d,), fill, dtype=acc, device=like.device)
    return p.to(acc).contiguous()


def red_edit_fwd(h: Tensor, scale: Tensor | None, bias: Tensor | None) -> Tensor:
    d = h.shape[-1]
    out = torch.empty(h.shape, dtype=h.dtype, device=h.device)
    if out.numel() == 0:
        return out
    rows = as_rows(h)
    m = rows.shape[0]
    bd = block_d(d, 1024)
    bm = 64 if triton_interpreting() else max(1, 4096 // bd)
    grid = (triton.cdiv(m, bm), triton.cdiv(d, bd))
    s, b = _param(scale, d, h, 1.0), _param(bias, d, h, 0.0)
    _red_edit_fwd_kernel[grid](rows, s, b, out, m, d, rows.stride(0), BLOCK_M=bm, BLOCK_D=bd)
    return out


def red_edit_bwd(
    grad_out: Tensor,
    h: Tensor | None,
    scale: Tensor | None,
    need_h: bool,
    need_scale: bool,
    need_bias: bool,
    param_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor]:
    d = grad_out.shape[-1]
    acc = acc_dtype(grad_out.dtype)
    grad_h = empty_unless(need_h, grad_out, tuple(grad_out.shape))
    g = as_rows(grad_out)
    m = g.shape[0]
    if m == 0 or d == 0 or not (need_h or need_scale or need_bias):
        return (
            grad_h,
            grad_out.new_zeros(d if need_scale else 0, dtype=param_dtype),
            grad_out.new_zeros(d if need_bias else 0, dtype=param_dtype),
        )
    hr = as_rows(h) if need_scale else g
    if triton_interpreting():
        bd, bm = block_d(d, 256, 2048), 64
        rows_per_prog = triton.cdiv(m, bm) * bm  # one row program: the interpreter pays per program
    else:
        bd, bm = block_d(d, 256), 16
        rows_per_prog = max(bm, triton.cdiv(triton.cdiv(m, 256), bm) * bm)
    nb = triton.cdiv(m, rows_per_prog)
    part_gh = grad_out.new_empty((nb if need_scale else 0, d), dtype=acc)
    part_g = grad_out.new_empty((nb if need_bias else 0, d), dtype=acc)
    s = _param(scale, d, grad_out, 1.0)
    _red_edit_bwd_kernel[(nb, triton.cdiv(d, bd))](
        g,
        hr,
        s,
        grad_h if need_h else g,
        part_gh if need_scale else s,
        part_g if need_bias else s,
        m,
        d,
        g.stride(0),
        hr.stride(0),
        rows_per_prog,
        NEED_H=need_h,
        NEED_S=need_scale,
        NEED_B=need_bias,
        BLOCK_M=bm,
        BLOCK_D=bd,
    )
    grad_scale = column_sum(part_gh).to(param_dtype) if need_scale else part_gh.new_empty(0, dtype=param_dtype)
    grad_bias = column_sum(part_g).to(param_dtype) if need_bias else part_g.new_empty(0, dtype=param_dtype)
    return grad_h, grad_scale, grad_bias
