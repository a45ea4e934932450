"""Triton kernels for gathered_red_edit: multi-tenant RED forward and deterministic backward.

Same contract as the C++ ops ``red_kernels_C::gathered_red_edit`` and ``gathered_red_edit_bwd`` (see
``red_kernels/ops/gathered_red_edit.py`` for the math and shapes); the ids are checked by the caller.
The backward uses the plan of ``csrc/gathered_red_edit/gathered_red_edit.h``: rows sorted by tenant
(stable), cut into one-tenant chunks, one fp32 partial row per chunk (stage 1), then each tenant's
chunks summed in order by red_edit's :func:`column_sum` in its segmented form (stage 2).
Values are converted to fp32 (fp64) right after loading, which also keeps the interpreter's bf16
arithmetic out of the picture.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from red_kernels._backend import triton_interpreting
from red_kernels.ops._common import acc_dtype, as_rows, empty_unless
from red_kernels.ops.gathered_red_edit import rows_per_unit
from red_kernels.triton._utils import block_d
from red_kernels.triton.red_edit import bwd_row_tile, column_sum


@triton.jit
def _gathered_fwd_kernel(
    h_ptr,
    ids_ptr,
    s_ptr,
    b_ptr,
    out_ptr,
    M,
    D,
    h_stride,
    rows_per_unit,
    HAS_S: tl.constexpr,
    HAS_B: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    rmask = rows < M
    cmask = cols < D
    mask = rmask[:, None] & cmask[None, :]
    t = tl.load(ids_ptr + rows // rows_per_unit, mask=rmask, other=-1)
    # Unedited rows (t = -1) read nothing from the tables: the masked loads give 1 and 0.
    vmask = mask & (t >= 0)[:, None]
    t_off = t.to(tl.int64)[:, None] * D + cols[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    y = tl.load(h_ptr + rows64 * h_stride + cols[None, :], mask=mask, other=0.0).to(s_ptr.dtype.element_ty)
    if HAS_S:
        y = y * tl.load(s_ptr + t_off, mask=vmask, other=1.0)
    if HAS_B:
        y = y + tl.load(b_ptr + t_off, mask=vmask, other=0.0)
    tl.store(out_ptr + rows64 * D + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gathered_bwd_kernel(
    g_ptr,
    h_ptr,
    s_ptr,
    plan_ptr,
    gh_ptr,
    part_gh_ptr,
    part_g_ptr,
    D,
    g_stride,
    h_stride,
    rows_per_unit,
    units,
    nchunks,
    NEED_H: tl.constexpr,
    NEED_S: tl.constexpr,
    NEED_B: tl.constexpr,
    HAS_S: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Program (c, j) owns chunk c of the plan (sorted rows [begin, end) of one tenant t) and one
    # column block: it writes grad_h there and, when t >= 0, one fp32 partial column sum per output.
    c = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    t = tl.load(plan_ptr + units + c)
    p_begin = tl.load(plan_ptr + units + nchunks + c)
    p_end = tl.load(plan_ptr + units + 2 * nchunks + c)
    if HAS_S:
        s = tl.load(s_ptr + t * D + cols, mask=cmask & (t >= 0), other=1.0)
    else:
        s = tl.full([BLOCK_D], 1.0, dtype=s_ptr.dtype.element_ty)
    acc_gh = tl.zeros([BLOCK_M, BLOCK_D], dtype=s.dtype)
    acc_g = tl.zeros([BLOCK_M, BLOCK_D], dtype=s.dtype)
    for p0 in range(p_begin, p_end, BLOCK_M):
        p = p0 + tl.arange(0, BLOCK_M)
        pmask = p < p_end
        unit = tl.load(plan_ptr + p // rows_per_unit, mask=pmask, other=0)
        rows64 = (unit * rows_per_unit + p % rows_per_unit)[:, None]
        mask = pmask[:, None] & cmask[None, :]
        acc_gh, acc_g = bwd_row_tile(
            g_ptr, h_ptr, gh_ptr, rows64, cols, mask, s, D, g_stride, h_stride, acc_gh, acc_g, NEED_H, NEED_S, NEED_B
        )
    if t >= 0:
        if NEED_S:
            tl.store(part_gh_ptr + c * D + cols, tl.sum(acc_gh, axis=0), mask=cmask)
        if NEED_B:
            tl.store(part_g_ptr + c * D + cols, tl.sum(acc_g, axis=0), mask=cmask)


def _table(p: Tensor | None, like: Tensor) -> Tensor:
    """[K, d] table in the accumulation dtype; a 1-element dummy (never read) when absent."""
    acc = acc_dtype(like.dtype)
    return p.to(acc).contiguous() if p is not None else torch.ones(1, dtype=acc, device=like.device)


def gathered_red_edit_fwd(h: Tensor, scales: Tensor | None, biases: Tensor | None, tenant_ids: Tensor) -> Tensor:
    d = h.shape[-1]
    out = torch.empty(h.shape, dtype=h.dtype, device=h.device)
    if out.numel() == 0:
        return out
    rows = as_rows(h)
    m = rows.shape[0]
    bd = block_d(d, 1024)
    bm = 64 if triton_interpreting() else max(1, 4096 // bd)
    grid = (triton.cdiv(m, bm), triton.cdiv(d, bd))
    s, b = _table(scales, h), _table(biases, h)
    _gathered_fwd_kernel[grid](
        rows,
        tenant_ids.contiguous(),
        s,
        b,
        out,
        m,
        d,
        rows.stride(0),
        rows_per_unit(h, tenant_ids),
        HAS_S=scales is not None,
        HAS_B=biases is not None,
        BLOCK_M=bm,
        BLOCK_D=bd,
    )
    return out


def backward_plan(ids_cpu: Tensor, num_tenants: int, rows_per_unit: int, rows_per_chunk: int) -> tuple[Tensor, int]:
    """The backward plan of gathered_red_edit.h, built with torch ops on the CPU.

    Returns ``(table, tenant_chunks)``: int64 ``order [units] | chunk_tenant [n] | chunk_begin [n] |
    chunk_end [n] | seg [K + 1]``, tenant chunks first (in tenant order), unedited chunks last.
    """
    k = num_tenants
    ids = ids_cpu.reshape(-1)
    slot = torch.where(ids < 0, k, ids)  # the unedited rows sort after every tenant
    order = torch.sort(slot, stable=True).indices
    rows = torch.bincount(slot, minlength=k + 1) * rows_per_unit
    zero = rows.new_zeros(1)
    first_row = torch.cat([zero, rows.cumsum(0)])
    first_chunk = torch.cat([zero, ((rows + rows_per_chunk - 1) // rows_per_chunk).cumsum(0)])
    chunk_slot = torch.repeat_interleave(torch.arange(k + 1), first_chunk.diff())
    begin = first_row[chunk_slot] + (torch.arange(chunk_slot.numel()) - first_chunk[chunk_slot]) * rows_per_chunk
    end = torch.minimum(begin + rows_per_chunk, first_row[chunk_slot + 1])
    tenant = torch.where(chunk_slot == k, -1, chunk_slot)
    return torch.cat([order, tenant, begin, end, first_chunk[: k + 1]]), int(first_chunk[k])


def gathered_red_edit_bwd(
    grad_out: Tensor,
    h: Tensor | None,
    scales: Tensor | None,
    tenant_ids: Tensor,
    ids_cpu: Tensor,
    num_tenants: int,
    need_h: bool,
    need_scales: bool,
    need_biases: bool,
    param_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor]:
    d = grad_out.shape[-1]
    acc = acc_dtype(grad_out.dtype)
    grad_h = empty_unless(need_h, grad_out, tuple(grad_out.shape))
    g = as_rows(grad_out)
    m = g.shape[0]

    def unneeded():
        return grad_out.new_empty(0, dtype=param_dtype)

    if m == 0 or d == 0 or not (need_h or need_scales or need_biases):
        return (
            grad_h,
            grad_out.new_zeros((num_tenants, d), dtype=param_dtype) if need_scales else unneeded(),
            grad_out.new_zeros((num_tenants, d), dtype=param_dtype) if need_biases else unneeded(),
        )
    hr = as_rows(h) if need_scales else g
    if triton_interpreting():
        bd, bm = block_d(d, 256, 2048), 64
        rows_per_chunk = triton.cdiv(m, bm) * bm  # one chunk per tenant: the interpreter pays per program
    else:
        bd, bm = block_d(d, 256), 16
        rows_per_chunk = max(bm, triton.cdiv(triton.cdiv(m, 256), bm) * bm)
    table, tenant_chunks = backward_plan(ids_cpu, num_tenants, rows_per_unit(grad_out, tenant_ids), rows_per_chunk)
    units = ids_cpu.numel()
    nchunks = (table.numel() - units - num_tenants - 1) // 3
    plan = table.to(grad_out.device)
    part_gh = grad_out.new_empty((tenant_chunks if need_scales else 0, d), dtype=acc)
    part_g = grad_out.new_empty((tenant_chunks if need_biases else 0, d), dtype=acc)
    s = _table(scales, grad_out)
    launched = nchunks if need_h else tenant_chunks  # unedited chunks only produce grad_h
    if launched > 0:
        _gathered_bwd_kernel[(launched, triton.cdiv(d, bd))](
            g,
            hr,
            s,
            plan,
            grad_h if need_h else g,
            part_gh if need_scales else s,
            part_g if need_biases else s,
            d,
            g.stride(0),
            hr.stride(0),
            rows_per_unit(grad_out, tenant_ids),
            units,
            nchunks,
            NEED_H=need_h,
            NEED_S=need_scales,
            NEED_B=need_biases,
            HAS_S=scales is not None,
            BLOCK_M=bm,
            BLOCK_D=bd,
        )
    seg = plan[units + 3 * nchunks :]
    grad_scales = column_sum(part_gh, seg).to(param_dtype) if need_scales else unneeded()
    grad_biases = column_sum(part_g, seg).to(param_dtype) if need_biases else unneeded()
    return grad_h, grad_scales, grad_biases
