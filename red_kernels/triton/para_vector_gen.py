"""Triton kernels for the PARA vector generator, plain and multi-tenant (one kernel family).

Same contract as the C++ ops ``red_kernels_C::para_vector_gen`` and ``para_vector_gen_bwd``, with the
weights always in the gathered form ``[K, d, r]``, ``[K, r, n]``, ``[K, n]`` (``tenant_ids`` None for
the plain op, K = 1; the caller adds the leading dim), the
output and the weight gradients in the weights' dtype, grad_h in h's dtype, a gradient that is not
needed comes back empty. Arithmetic in fp32 (fp64 when h or the weights are fp64); values are
converted right after loading, which also keeps the interpreter's bf16 arithmetic out of the way.
fp16/bf16 values meet fp64 only through fp32 (``_to_acc``, ``_for_store``), so every dtype mix works.
Rows of tenant -1 mask every load of a weight: they read no generator (K may be 0), write ones
and keep a zero grad_h.
r <= 64 is small, so the projections are broadcast products reduced with ``tl.sum`` (``tl.dot``
needs dims >= 16).

Forward: one kernel. Program (b, c) gathers row b's pooled vector, computes its bottleneck
``a = act(x @ w_down[k])`` (recomputed per column tile: d * r multiply-adds, cheaper than a second
launch) and writes the columns ``b_up[k] + a @ w_up[k]`` of its tile.

Backward: a row kernel (per sequence: z, a, gz = (g @ w_up^T) * act'(z), and grad_h's pooled row
into a zeroed grad_h), then two tenant kernels for the weight gradients, each output element
summing its tenant's rows in batch order (deterministic, no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from red_kernels._backend import triton_interpreting
from red_kernels.triton._activations import act_forward, act_grad


@triton.jit
def _to_acc(x, FP64: tl.constexpr):
    """A loaded value in the accumulation dtype. fp16/bf16 reach fp64 through fp32 (exact): a direct
    16-bit <-> fp64 conversion gives garbage under the interpreter and is not lowered everywhere."""
    if FP64:
        if x.dtype.is_fp16() or x.dtype.is_bf16():
            y = x.to(tl.float32).to(tl.float64)
        else:
            y = x.to(tl.float64)
    else:
        y = x.to(tl.float32)
    return y


@triton.jit
def _for_store(y, ptr):
    """An accumulator in ``ptr``'s element dtype; fp64 narrows to fp16/bf16 through fp32, as above."""
    ty = ptr.dtype.element_ty
    if ty.is_fp16() or ty.is_bf16():
        out = y.to(tl.float32).to(ty)
    else:
        out = y.to(ty)
    return out


@triton.jit
def _tenant(tid_ptr, b, HAS_TENANTS: tl.constexpr):
    """(k, live) for row b: its tenant (clamped to 0 so pointer arithmetic stays in range) and
    whether it has one. Every weight load of a row is masked by ``live``: a tenant -1 row reads no
    generator at all (there may be none, K = 0, and tenant 0's weights may hold anything)."""
    if HAS_TENANTS:
        k_raw = tl.load(tid_ptr + b)
    else:
        k_raw = tl.full((), 0, tl.int64)
    return tl.maximum(k_raw, 0), k_raw >= 0


@triton.jit
def _bottleneck(
    h_ptr, pidx_ptr, wd_ptr, b, k, live, D, R, s_b, s_t, s_d,
    FP64: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """z = h[b, pool_index[b]] @ w_down[k] ([BLOCK_R], zero past R). A row that is not ``live``
    (tenant -1) loads nothing and gets z = 0."""
    rr = tl.arange(0, BLOCK_R)
    rmask = rr < R
    p = tl.load(pidx_ptr + b)
    row = h_ptr + b.to(tl.int64) * s_b + p * s_t
    wd = wd_ptr + k * D * R
    z = _to_acc(tl.zeros([BLOCK_R], dtype=tl.float32), FP64)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        dmask = (dd < D) & live
        x = _to_acc(tl.load(row + dd.to(tl.int64) * s_d, mask=dmask, other=0.0), FP64)
        w = tl.load(wd + dd.to(tl.int64)[:, None] * R + rr[None, :], mask=dmask[:, None] & rmask[None, :], other=0.0)
        z += tl.sum(x[:, None] * _to_acc(w, FP64), axis=0)
    return z


@triton.jit
def _fwd_kernel(
    h_ptr, pidx_ptr, tid_ptr, wd_ptr, wu_ptr, bu_ptr, out_ptr,
    D, N, R, s_b, s_t, s_d, cols_per_prog,
    HAS_TENANTS: tl.constexpr, ACT: tl.constexpr, FP64: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    k, live = _tenant(tid_ptr, b, HAS_TENANTS)
    rr = tl.arange(0, BLOCK_R)
    rmask = rr < R
    wmask = rmask & live
    z = _bottleneck(h_ptr, pidx_ptr, wd_ptr, b, k, live, D, R, s_b, s_t, s_d, FP64, BLOCK_D, BLOCK_R)
    a = tl.where(wmask, act_forward(z, ACT), 0.0)
    wu = wu_ptr + k * R * N
    c_start = tl.program_id(1) * cols_per_prog
    for c0 in range(c_start, c_start + cols_per_prog, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        cmask = cols < N
        w = tl.load(wu + rr[:, None] * N + cols[None, :], mask=wmask[:, None] & cmask[None, :], other=0.0)
        bias = _to_acc(tl.load(bu_ptr + k * N + cols, mask=cmask & live, other=0.0), FP64)
        y = bias + tl.sum(a[:, None] * _to_acc(w, FP64), axis=0)
        y = tl.where(live, y, 1.0)
        tl.store(out_ptr + b.to(tl.int64) * N + cols, _for_store(y, out_ptr), mask=cmask)


@triton.jit
def _bwd_rows_kernel(
    g_ptr, h_ptr, pidx_ptr, tid_ptr, wd_ptr, wu_ptr, a_ptr, gz_ptr, gh_ptr,
    T, D, N, R, s_b, s_t, s_d,
    HAS_TENANTS: tl.constexpr, ACT: tl.constexpr, FP64: tl.constexpr, NEED_H: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    # Row b: a = act(z) and gz = (g @ w_up[k]^T) * act'(z) into [B, R] buffers; grad_h[b, p] row.
    b = tl.program_id(0)
    k, live = _tenant(tid_ptr, b, HAS_TENANTS)
    rr = tl.arange(0, BLOCK_R)
    wmask = (rr < R) & live  # tenant -1: no generator read, zero gradients
    z = _bottleneck(h_ptr, pidx_ptr, wd_ptr, b, k, live, D, R, s_b, s_t, s_d, FP64, BLOCK_D, BLOCK_R)
    ga = tl.zeros_like(z)
    wu = wu_ptr + k * R * N
    grow = g_ptr + b.to(tl.int64) * N
    for c0 in range(0, N, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        cmask = (cols < N) & live
        g = _to_acc(tl.load(grow + cols, mask=cmask, other=0.0), FP64)
        w = tl.load(wu + rr[:, None] * N + cols[None, :], mask=wmask[:, None] & cmask[None, :], other=0.0)
        ga += tl.sum(_to_acc(w, FP64) * g[None, :], axis=1)
    a = tl.where(wmask, act_forward(z, ACT), 0.0)
    gz = tl.where(wmask, act_grad(ga, z, ACT), 0.0)
    tl.store(a_ptr + b * R + rr, a, mask=rr < R)
    tl.store(gz_ptr + b * R + rr, gz, mask=rr < R)
    if NEED_H:  # grad_h is zeroed: a tenant -1 row keeps its zeros
        p = tl.load(pidx_ptr + b)
        dst = gh_ptr + (b.to(tl.int64) * T + p) * D
        wd = wd_ptr + k * D * R
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            dmask = (dd < D) & live
            w = tl.load(
                wd + dd.to(tl.int64)[:, None] * R + rr[None, :], mask=dmask[:, None] & wmask[None, :], other=0.0
            )
            gp = tl.sum(_to_acc(w, FP64) * gz[None, :], axis=1)
            tl.store(dst + dd, _for_store(gp, gh_ptr), mask=dmask)


@triton.jit
def _bwd_w_up_kernel(
    g_ptr, a_ptr, rows_ptr, off_ptr, gwu_ptr, gbu_ptr, N, R,
    FP64: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    # Tenant k, one column tile: grad_w_up[k] = sum a_b^T g_b, grad_b_up[k] = sum g_b over its rows.
    k = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    rr = tl.arange(0, BLOCK_R)
    rmask = rr < R
    acc = _to_acc(tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32), FP64)
    accb = _to_acc(tl.zeros([BLOCK_N], dtype=tl.float32), FP64)
    s0 = tl.load(off_ptr + k)
    s1 = tl.load(off_ptr + k + 1)
    for s in range(s0, s1):
        row = tl.load(rows_ptr + s)
        g = _to_acc(tl.load(g_ptr + row * N + cols, mask=cmask, other=0.0), FP64)
        a = tl.load(a_ptr + row * R + rr, mask=rmask, other=0.0)
        acc += a[:, None] * g[None, :]
        accb += g
    out = gwu_ptr + k.to(tl.int64) * R * N + rr[:, None] * N + cols[None, :]
    tl.store(out, _for_store(acc, gwu_ptr), mask=rmask[:, None] & cmask[None, :])
    tl.store(gbu_ptr + k.to(tl.int64) * N + cols, _for_store(accb, gbu_ptr), mask=cmask)


@triton.jit
def _bwd_w_down_kernel(
    h_ptr, pidx_ptr, gz_ptr, rows_ptr, off_ptr, gwd_ptr, D, R, s_b, s_t, s_d,
    FP64: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    # Tenant k, one tile of d: grad_w_down[k] = sum x_b^T gz_b over its rows.
    k = tl.program_id(0)
    dd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = dd < D
    rr = tl.arange(0, BLOCK_R)
    rmask = rr < R
    acc = _to_acc(tl.zeros([BLOCK_D, BLOCK_R], dtype=tl.float32), FP64)
    s0 = tl.load(off_ptr + k)
    s1 = tl.load(off_ptr + k + 1)
    for s in range(s0, s1):
        row = tl.load(rows_ptr + s)
        p = tl.load(pidx_ptr + row)
        x = tl.load(h_ptr + row * s_b + p * s_t + dd.to(tl.int64) * s_d, mask=dmask, other=0.0)
        gz = tl.load(gz_ptr + row * R + rr, mask=rmask, other=0.0)
        acc += _to_acc(x, FP64)[:, None] * gz[None, :]
    out = gwd_ptr + k.to(tl.int64) * D * R + dd.to(tl.int64)[:, None] * R + rr[None, :]
    tl.store(out, _for_store(acc, gwd_ptr), mask=dmask[:, None] & rmask[None, :])


def _acc_is_fp64(h: Tensor, w: Tensor) -> bool:
    return torch.float64 in (h.dtype, w.dtype)


def _blocks(d: int, n: int, r: int) -> tuple[int, int, int]:
    """(BLOCK_D, BLOCK_N, BLOCK_R): the interpreter pays per program and per loop step, so it gets
    large tiles; on GPU a tile of w_down / w_up stays at ~8K elements."""
    br = max(triton.next_power_of_2(r), 2)
    if triton_interpreting():
        return min(triton.next_power_of_2(max(d, 1)), 4096), min(triton.next_power_of_2(max(n, 1)), 4096), br
    return max(16, 8192 // br), max(16, min(512, 8192 // br)), br


def segments(tenant_ids: Tensor | None, batch: int, num_tenants: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Rows grouped by tenant in batch order: tenant k owns rows[offsets[k]:offsets[k + 1]] (rows of
    tenant -1 belong to none). Same construction as para_segments in csrc, without a host sync."""
    if tenant_ids is None:
        # arange * batch, not torch.tensor([0, batch]): a tensor from a host list is a copy and a sync.
        return torch.arange(batch, device=device), torch.arange(2, device=device) * batch
    rows = torch.argsort(tenant_ids, stable=True)
    counts = torch.zeros(num_tenants + 1, dtype=torch.int64, device=device)
    counts.scatter_add_(0, tenant_ids + 1, torch.ones_like(tenant_ids))
    return rows, torch.cumsum(counts, 0)


def para_vector_gen_fwd(
    h: Tensor, pool_index: Tensor, wd: Tensor, wu: Tensor, bu: Tensor, tenant_ids: Tensor | None, act: int
) -> Tensor:
    batch, _, d = h.shape
    _, r, n = wu.shape
    out = torch.empty((batch, n), dtype=wu.dtype, device=h.device)
    if out.numel() == 0:
        return out
    wd, wu, bu, pool_index = wd.contiguous(), wu.contiguous(), bu.contiguous(), pool_index.contiguous()
    bd, bn, br = _blocks(d, n, r)
    if triton_interpreting():
        cols_per_prog = triton.cdiv(n, bn) * bn
    else:  # enough programs to fill the GPU, each recomputing its row's bottleneck once
        tiles = max(1, min(triton.cdiv(n, bn), triton.cdiv(256, batch)))
        cols_per_prog = triton.cdiv(triton.cdiv(n, tiles), bn) * bn
    grid = (batch, triton.cdiv(n, cols_per_prog))
    tid = tenant_ids.contiguous() if tenant_ids is not None else pool_index
    _fwd_kernel[grid](
        h, pool_index, tid, wd, wu, bu, out, d, n, r, *h.stride(), cols_per_prog,
        HAS_TENANTS=tenant_ids is not None, ACT=act, FP64=_acc_is_fp64(h, wu),
        BLOCK_D=bd, BLOCK_N=bn, BLOCK_R=br,
    )  # fmt: skip
    return out


def para_vector_gen_bwd(
    grad_out: Tensor,
    h: Tensor,
    pool_index: Tensor,
    wd: Tensor,
    wu: Tensor,
    bu: Tensor,
    tenant_ids: Tensor | None,
    act: int,
    need_h: bool,
    need_w: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    batch, t, d = h.shape
    k_count, r, n = wu.shape
    dev = h.device
    grad_h = torch.zeros(h.shape, dtype=h.dtype, device=dev) if need_h else h.new_empty(0)
    gwd = torch.zeros(wd.shape, dtype=wd.dtype, device=dev) if need_w else wd.new_empty(0)
    gwu = torch.zeros(wu.shape, dtype=wu.dtype, device=dev) if need_w else wu.new_empty(0)
    gbu = torch.zeros(bu.shape, dtype=bu.dtype, device=dev) if need_w else bu.new_empty(0)
    if batch == 0 or not (need_h or need_w):
        return grad_h, gwd, gwu, gbu
    wd, wu, pool_index, g = wd.contiguous(), wu.contiguous(), pool_index.contiguous(), grad_out.contiguous()
    fp64 = _acc_is_fp64(h, wu)
    acc = torch.float64 if fp64 else torch.float32
    a_buf = torch.empty((batch, r), dtype=acc, device=dev)
    gz_buf = torch.empty((batch, r), dtype=acc, device=dev)
    bd, bn, br = _blocks(d, n, r)
    tid = tenant_ids.contiguous() if tenant_ids is not None else pool_index
    _bwd_rows_kernel[(batch,)](
        g, h, pool_index, tid, wd, wu, a_buf, gz_buf, grad_h if need_h else a_buf,
        t, d, n, r, *h.stride(),
        HAS_TENANTS=tenant_ids is not None, ACT=act, FP64=fp64, NEED_H=need_h,
        BLOCK_D=bd, BLOCK_N=bn, BLOCK_R=br,
    )  # fmt: skip
    if need_w and k_count > 0:  # K = 0: no generator, nothing to sum
        rows, offsets = segments(tenant_ids, batch, k_count, dev)
        _bwd_w_up_kernel[(k_count, triton.cdiv(n, bn))](
            g, a_buf, rows, offsets, gwu, gbu, n, r, FP64=fp64, BLOCK_N=bn, BLOCK_R=br
        )
        _bwd_w_down_kernel[(k_count, triton.cdiv(d, bd))](
            h, pool_index, gz_buf, rows, offsets, gwd, d, r, *h.stride(), FP64=fp64, BLOCK_D=bd, BLOCK_R=br
        )
    return grad_h, gwd, gwu, gbu
