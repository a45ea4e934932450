"""Triton kernels for seq_scale: y = x * vec[seq] (forward) and the fused backward.

Same contract as the C++ ops ``red_kernels_C::seq_scale`` and ``seq_scale_bwd``: dense x [B, T, n] or packed
x [N, n] with seq_index [N] (validated by the caller), vec [B, n]; the output is contiguous in x's
dtype; a gradient that is not needed comes back empty. Arithmetic is in fp32 (fp64 for fp64
inputs); values are converted right after loading, which also keeps the interpreter's bf16
arithmetic out of the picture.

The per-sequence reduction for grad_vec follows csrc/seq_scale (same plan): rows grouped by
sequence (stable sort of seq_index), chunks of a shape-determined size, one fp32 partial row per
chunk, then each sequence sums its chunks in order: deterministic, no atomics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from red_kernels._backend import triton_interpreting
from red_kernels.ops._common import acc_dtype
from red_kernels.triton._utils import block_d


@triton.jit
def _scale_rows_kernel(
    src_ptr,
    v_ptr,
    idx_ptr,
    out_ptr,
    M,
    N,
    t_len,
    s_b,
    s_t,
    s_idx,
    HAS_INDEX: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # out[r] = src[r] * v[seq(r)] for a [BLOCK_M, BLOCK_D] tile; row r sits at (r // t_len) * s_b +
    # (r % t_len) * s_t (packed: t_len = M, s_b = 0) and belongs to idx[r * s_idx] (packed: any view
    # of the index, stride 0 included) or r // t_len.
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    rmask = rows < M
    mask = rmask[:, None] & (cols < N)[None, :]
    if HAS_INDEX:
        seq = tl.load(idx_ptr + rows * s_idx, mask=rmask, other=0)
    else:
        seq = rows // t_len
    offs = (rows // t_len) * s_b + (rows % t_len) * s_t
    v = tl.load(v_ptr + seq[:, None] * N + cols[None, :], mask=mask, other=0.0)
    x = tl.load(src_ptr + offs[:, None] + cols[None, :], mask=mask, other=0.0).to(v.dtype)
    tl.store(out_ptr + rows[:, None] * N + cols[None, :], (x * v).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_chunk_kernel(
    g_ptr,
    x_ptr,
    v_ptr,
    perm_ptr,
    chunks_ptr,
    gx_ptr,
    part_ptr,
    N,
    g_t_len,
    g_s_b,
    g_s_t,
    x_t_len,
    x_s_b,
    x_s_t,
    HAS_PERM: tl.constexpr,
    NEED_X: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Program (k, j): chunk k = positions [begin, end) of sequence b, column block j. Writes
    # grad_x = g * v[b] for those rows and the chunk's fp32 partial sum of g * x (stage 1 of 2).
    k = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < N
    b = tl.load(chunks_ptr + 3 * k)
    begin = tl.load(chunks_ptr + 3 * k + 1)
    end = tl.load(chunks_ptr + 3 * k + 2)
    v = tl.load(v_ptr + b * N + cols, mask=cmask, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=v.dtype)
    for p0 in range(begin, end, BLOCK_M):
        pos = p0 + tl.arange(0, BLOCK_M)
        pmask = pos < end
        if HAS_PERM:
            rows = tl.load(perm_ptr + pos, mask=pmask, other=0)
        else:
            rows = pos
        mask = pmask[:, None] & cmask[None, :]
        g_offs = (rows // g_t_len) * g_s_b + (rows % g_t_len) * g_s_t
        x_offs = (rows // x_t_len) * x_s_b + (rows % x_t_len) * x_s_t
        g = tl.load(g_ptr + g_offs[:, None] + cols[None, :], mask=mask, other=0.0).to(v.dtype)
        if NEED_X:
            tl.store(
                gx_ptr + rows[:, None] * N + cols[None, :], (g * v[None, :]).to(gx_ptr.dtype.element_ty), mask=mask
            )
        x = tl.load(x_ptr + x_offs[:, None] + cols[None, :], mask=mask, other=0.0).to(v.dtype)
        acc += g * x
    tl.store(part_ptr + k * N + cols, tl.sum(acc, axis=0), mask=cmask)


@triton.jit
def _segment_sum_kernel(part_ptr, chunk_off_ptr, out_ptr, N, BLOCK_D: tl.constexpr):
    # Stage 2: out[b] = sum of sequence b's chunk partials, in chunk order (deterministic).
    b = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < N
    c0 = tl.load(chunk_off_ptr + b)
    c1 = tl.load(chunk_off_ptr + b + 1)
    total = tl.zeros([BLOCK_D], dtype=out_ptr.dtype.element_ty)
    for c in range(c0, c1):
        total += tl.load(part_ptr + c * N + cols, mask=cmask, other=0.0)
    tl.store(out_ptr + b * N + cols, total, mask=cmask)


@dataclass
class _Rows:
    t: Tensor
    t_len: int
    s_b: int
    s_t: int


def _rows(x: Tensor, packed: bool) -> _Rows:
    """x with unit stride in the last dim (copied only if needed) and its two leading strides."""
    if x.shape[-1] > 1 and x.stride(-1) != 1:
        x = x.contiguous()
    if packed:
        return _Rows(x, max(x.shape[0], 1), 0, x.stride(0))
    return _Rows(x, max(x.shape[1], 1), x.stride(0), x.stride(1))


@dataclass
class Plan:
    """Rows grouped by sequence; see csrc/seq_scale/seq_scale.h (SeqScalePlan)."""

    perm: Tensor | None  # [M] position -> row, None when rows are already grouped
    chunks: Tensor  # [K, 3] int64 (sequence, begin, end) in positions
    chunk_off: Tensor  # [B + 1] int64
    num_chunks: int


def plan(seq_index: Tensor | None, num_seqs: int, seq_len: int, rows: int, max_chunks: int, min_rows: int) -> Plan:
    """The backward work plan (same rule as csrc seq_scale_plan; seq_index already validated)."""
    dev = seq_index.device if seq_index is not None else torch.device("cpu")
    if seq_index is None:
        counts = torch.full((num_seqs,), seq_len, dtype=torch.int64)
        perm = None
    else:
        counts = torch.bincount(seq_index, minlength=num_seqs)
        grouped = rows < 2 or bool((seq_index[1:] >= seq_index[:-1]).all())
        perm = None if grouped else torch.sort(seq_index, stable=True).indices
    seg_off = torch.zeros(num_seqs + 1, dtype=torch.int64, device=counts.device)
    seg_off[1:] = torch.cumsum(counts, 0)
    chunk = max(-(-rows // max(max_chunks, 1)), min_rows, 1)
    nch = (counts + chunk - 1) // chunk
    chunk_off = torch.zeros(num_seqs + 1, dtype=torch.int64, device=counts.device)
    chunk_off[1:] = torch.cumsum(nch, 0)
    k = int(chunk_off[-1])
    seq = torch.repeat_interleave(torch.arange(num_seqs, device=counts.device), nch, output_size=k)
    begin = seg_off[seq] + (torch.arange(k, device=counts.device) - chunk_off[seq]) * chunk
    end = torch.minimum(begin + chunk, seg_off[seq + 1])
    chunks = torch.stack([seq, begin, end], 1).contiguous()
    return Plan(perm, chunks.to(dev), chunk_off.to(dev), k)


def _vec_acc(vec: Tensor, like: Tensor) -> Tensor:
    return vec.to(acc_dtype(like.dtype)).contiguous()


def _scale_all_rows(src: Tensor, vec: Tensor, seq_index: Tensor | None, out: Tensor) -> None:
    n = src.shape[-1]
    m = out.numel() // n
    r = _rows(src, seq_index is not None)
    bd = block_d(n, 1024)
    bm = 64 if triton_interpreting() else max(1, 4096 // bd)
    idx = seq_index if seq_index is not None else r.t
    _scale_rows_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bd))](
        r.t,
        _vec_acc(vec, src),
        idx,
        out,
        m,
        n,
        r.t_len,
        r.s_b,
        r.s_t,
        seq_index.stride(0) if seq_index is not None else 0,
        HAS_INDEX=seq_index is not None,
        BLOCK_M=bm,
        BLOCK_D=bd,
    )


def seq_scale_fwd(x: Tensor, vec: Tensor, seq_index: Tensor | None) -> Tensor:
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if out.numel() > 0:
        _scale_all_rows(x, vec, seq_index, out)
    return out


def seq_scale_bwd(
    grad_out: Tensor, x: Tensor | None, vec: Tensor, seq_index: Tensor | None, need_x: bool, need_vec: bool
) -> tuple[Tensor, Tensor]:
    packed = seq_index is not None
    num_seqs, n = vec.shape
    m = grad_out.shape[0] if packed else grad_out.shape[0] * grad_out.shape[1]
    grad_x = torch.empty(grad_out.shape if need_x else (0,), dtype=grad_out.dtype, device=grad_out.device)
    if not need_vec:
        if grad_x.numel() > 0:
            _scale_all_rows(grad_out, vec, seq_index, grad_x)
        return grad_x, vec.new_empty(0)

    acc = acc_dtype(grad_out.dtype)
    interp = triton_interpreting()
    # The interpreter pays ~5 ms per program: one chunk per sequence there.
    p = plan(seq_index, num_seqs, 0 if packed else grad_out.shape[1], m, 1 if interp else 256, 16)
    out = torch.zeros((num_seqs, n), dtype=acc, device=grad_out.device)
    if p.num_chunks == 0 or n == 0:
        return grad_x, out.to(vec.dtype)
    part = torch.empty((p.num_chunks, n), dtype=acc, device=grad_out.device)
    g, xr = _rows(grad_out, packed), _rows(x, packed)
    bd = block_d(n, 256, 2048)
    bm = 64 if interp else 16
    v = _vec_acc(vec, grad_out)
    _bwd_chunk_kernel[(p.num_chunks, triton.cdiv(n, bd))](
        g.t,
        xr.t,
        v,
        p.perm if p.perm is not None else p.chunks,
        p.chunks,
        grad_x if need_x else part,
        part,
        n,
        g.t_len,
        g.s_b,
        g.s_t,
        xr.t_len,
        xr.s_b,
        xr.s_t,
        HAS_PERM=p.perm is not None,
        NEED_X=need_x,
        BLOCK_M=bm,
        BLOCK_D=bd,
    )
    bd2 = block_d(n, 1024)
    _segment_sum_kernel[(num_seqs, triton.cdiv(n, bd2))](part, p.chunk_off, out, n, BLOCK_D=bd2)
    return grad_x, out.to(vec.dtype)
