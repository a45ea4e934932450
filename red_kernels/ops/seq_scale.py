"""seq_scale: per-sequence scaling of a projection's output, ``y = x * vec[seq]``.

PARA scales the outputs of the query, value and FFN up projections with vectors generated per
sequence. Two layouts:

- dense: ``x`` is ``[B, T, n]``, ``vec`` is ``[B, n]``: ``y[b, t] = x[b, t] * vec[b]``;
- packed (serving engines pack prefill without padding): ``x`` is ``[N, n]`` with ``seq_index``
  ``[N]`` int64 naming each token's sequence: ``y[r] = x[r] * vec[seq_index[r]]``.

``n`` is whatever the scaled projection outputs (query width, the key/value width under GQA, or
d_ffn). The output is contiguous, shaped and typed like ``x``; arithmetic is in fp32 (fp64 for
fp64 ``x``), so fp32 vectors may scale bf16/fp16 activations.

Backward, one pass over ``grad_out`` (g) and the saved ``x``::

    grad_x      = g * vec[seq]                               (x's dtype)
    grad_vec[b] = sum over the rows r of sequence b of g[r] * x[r]
                                                             (fp32 accumulation, vec's dtype)

grad_vec is deterministic (same bits run to run): rows are grouped by sequence (a stable sort of
``seq_index``, so unsorted indices give the bits of the sorted case), cut into chunks whose size
depends on the shapes only, each chunk writes an fp32 partial row, and each sequence sums its
chunks in a fixed order. Autograd saves ``x`` (only when ``vec`` needs a gradient), ``vec`` and
``seq_index``; nothing larger.

Layers in this file: the eager reference, the ``red_kernels::seq_scale`` and
``red_kernels::seq_scale_backward`` custom ops (schema, fake impl, autograd), the per-backend
implementations they dispatch to, and the fake impls of the compiled backends' C++ ops. Eager calls
on the ``cpu``/``cuda`` backends go straight to the C++ op ``red_kernels_C::seq_scale``, whose
autograd is registered in C++: a decode step (T = 1) then costs a few microseconds of overhead
instead of the ~30 us of the Python custom op. Under torch.compile and on the Python backends the
call goes through the custom op.
"""

from __future__ import annotations

import torch
from torch import Tensor

from red_kernels._backend import requested_backend, resolve, when_extension_loads
from red_kernels.ops._common import (
    acc_dtype,
    call_backward,
    check_floating,
    check_same_device,
    check_tensor_args,
    goes_straight_to_ext,
    index_bounds,
)

OP = "seq_scale"


def seq_scale_reference(x: Tensor, vec: Tensor, seq_index: Tensor | None = None) -> Tensor:
    """Eager, differentiable ground truth: ``x * vec[:, None, :]`` (dense) or ``x * vec[seq_index]``
    (packed), computed in fp32 (fp64 for fp64 x) and cast to x's dtype."""
    acc = acc_dtype(x.dtype)
    v = vec.to(acc)
    v = v[:, None, :] if seq_index is None else v[seq_index]
    return (x.to(acc) * v).to(x.dtype)


def _check(x: Tensor, vec: Tensor, seq_index: Tensor | None) -> None:
    """Shapes, dtypes and devices (no data access: this also runs on fake tensors)."""
    check_floating(x, "x", OP)
    check_floating(vec, "vec", OP)
    check_same_device(x, "x", vec, "vec", OP)
    if vec.dim() != 2:
        raise ValueError(f"red_kernels.{OP}: argument 'vec' must be [B, n], got shape {list(vec.shape)}")
    if seq_index is None:
        if x.dim() != 3:
            raise ValueError(
                f"red_kernels.{OP}: argument 'x' must be [B, T, n] (or [N, n] with seq_index, the packed "
                f"form), got shape {list(x.shape)}"
            )
        if vec.shape[0] != x.shape[0]:
            raise ValueError(
                f"red_kernels.{OP}: argument 'vec' has {vec.shape[0]} rows but 'x' has batch size {x.shape[0]}"
            )
    else:
        if not isinstance(seq_index, Tensor):
            raise TypeError(f"red_kernels.{OP}: argument 'seq_index' must be a Tensor, got {type(seq_index).__name__}")
        if x.dim() != 2:
            raise ValueError(
                f"red_kernels.{OP}: argument 'x' must be [N, n] with seq_index (packed form), got shape {list(x.shape)}"
            )
        if seq_index.dtype != torch.int64:
            raise ValueError(f"red_kernels.{OP}: argument 'seq_index' must be int64, got {seq_index.dtype}")
        if seq_index.dim() != 1 or seq_index.shape[0] != x.shape[0]:
            raise ValueError(
                f"red_kernels.{OP}: argument 'seq_index' must have shape [{x.shape[0]}] (one entry per row "
                f"of 'x'), got {list(seq_index.shape)}"
            )
        check_same_device(x, "x", seq_index, "seq_index", OP)
    if vec.shape[1] != x.shape[-1]:
        raise ValueError(
            f"red_kernels.{OP}: argument 'vec' has width {vec.shape[1]} but the last dim of 'x' is {x.shape[-1]}"
        )


def check_seq_index_values(seq_index: Tensor | None, num_seqs: int) -> None:
    """Every entry of ``seq_index`` in ``[0, num_seqs)``. Runs on the host (one sync on GPU) before
    any kernel indexes ``vec`` with it, so a bad index is an error, never an out-of-bounds read."""
    if seq_index is None or seq_index.numel() == 0:
        return
    lo, hi = index_bounds(seq_index)
    if lo < 0 or hi >= num_seqs:
        bad = lo if lo < 0 else hi
        pos = int((seq_index == bad).nonzero()[0, 0])
        raise ValueError(
            f"red_kernels.{OP}: argument 'seq_index': entry {pos} is {bad}; entries must lie in "
            f"[0, {num_seqs}) (the rows of 'vec')"
        )


# --- backend implementations -----------------------------------------------------------------


def _fwd_reference(x: Tensor, vec: Tensor, seq_index: Tensor | None) -> Tensor:
    check_seq_index_values(seq_index, vec.shape[0])
    return seq_scale_reference(x, vec, seq_index).clone(memory_format=torch.contiguous_format)


def _bwd_reference(grad_out, x, vec, seq_index, need_x, need_vec):
    check_seq_index_values(seq_index, vec.shape[0])
    acc = acc_dtype(grad_out.dtype)
    g = grad_out.to(acc)
    v = vec.to(acc)
    grad_x = grad_out.new_empty(0)
    grad_vec = vec.new_empty(0)
    if need_x:
        vr = v[:, None, :] if seq_index is None else v[seq_index]
        grad_x = (g * vr).to(grad_out.dtype).clone(memory_format=torch.contiguous_format)
    if need_vec:
        gx = g * x.to(acc)
        if seq_index is None:
            grad_vec = gx.sum(1)
        else:
            # Each sequence sums only its own rows, so a NaN/Inf stays in its sequence's row (a
            # one-hot matmul spreads it: 0 * NaN = NaN), and the sum is deterministic on every
            # device (index_add_ uses atomics on GPU). One pass per sequence is fine for ground truth.
            rows = [gx[seq_index == b].sum(0) for b in range(vec.shape[0])]
            grad_vec = torch.stack(rows) if rows else gx.new_zeros(vec.shape)
        grad_vec = grad_vec.to(vec.dtype)
    return grad_x, grad_vec


def _fwd_ext(x, vec, seq_index):
    return torch.ops.red_kernels_C.seq_scale(x, vec, seq_index)


def _bwd_ext(grad_out, x, vec, seq_index, need_x, need_vec):
    return torch.ops.red_kernels_C.seq_scale_bwd(grad_out, x, vec, seq_index, need_x, need_vec)


def _fwd_triton(x, vec, seq_index):
    from red_kernels.triton.seq_scale import seq_scale_fwd

    check_seq_index_values(seq_index, vec.shape[0])
    return seq_scale_fwd(x, vec, seq_index)


def _bwd_triton(grad_out, x, vec, seq_index, need_x, need_vec):
    from red_kernels.triton.seq_scale import seq_scale_bwd

    check_seq_index_values(seq_index, vec.shape[0])
    return seq_scale_bwd(grad_out, x, vec, seq_index, need_x, need_vec)


_FWD = {"reference": _fwd_reference, "cpu": _fwd_ext, "cuda": _fwd_ext, "triton": _fwd_triton}
_BWD = {"reference": _bwd_reference, "cpu": _bwd_ext, "cuda": _bwd_ext, "triton": _bwd_triton}
IMPLEMENTED = tuple(_FWD)


# --- custom ops --------------------------------------------------------------------------------


@torch.library.custom_op("red_kernels::seq_scale", mutates_args=())
def _seq_scale_op(x: Tensor, vec: Tensor, seq_index: Tensor | None, backend: str) -> Tensor:
    _check(x, vec, seq_index)
    return _FWD[resolve(backend, x.device, OP, IMPLEMENTED)](x, vec, seq_index)


@_seq_scale_op.register_fake
def _(x, vec, seq_index, backend):
    _check(x, vec, seq_index)
    return x.new_empty(x.shape)


@torch.library.custom_op("red_kernels::seq_scale_backward", mutates_args=())
def _seq_scale_backward_op(
    grad_out: Tensor,
    x: Tensor | None,
    vec: Tensor,
    seq_index: Tensor | None,
    need_x: bool,
    need_vec: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    _check(grad_out, vec, seq_index)
    if need_vec and (x is None or x.shape != grad_out.shape or x.dtype != grad_out.dtype):
        raise ValueError(f"red_kernels.{OP}_backward: argument 'x' must be given, shaped and typed like 'grad_out'")
    impl = _BWD[resolve(backend, grad_out.device, OP, IMPLEMENTED)]
    return impl(grad_out, x, vec, seq_index, need_x, need_vec)


@_seq_scale_backward_op.register_fake
def _fake_backward(grad_out, x, vec, seq_index, need_x, need_vec, *_):
    return (
        grad_out.new_empty(tuple(grad_out.shape) if need_x else (0,)),
        vec.new_empty(tuple(vec.shape) if need_vec else (0,)),
    )


def _setup_context(ctx, inputs, output):
    x, vec, seq_index, backend = inputs
    need_x, need_vec = ctx.needs_input_grad[:2]
    ctx.flags = (need_x, need_vec)
    ctx.backend = backend
    ctx.save_for_backward(x if need_vec else None, vec, seq_index)


def _backward(ctx, grad_out):
    x, vec, seq_index = ctx.saved_tensors
    need_x, need_vec = ctx.flags
    args = (grad_out, x, vec, seq_index, need_x, need_vec)
    grad_x, grad_vec = call_backward(_seq_scale_backward_op, _bwd_reference, args, ctx.backend)
    return (grad_x if need_x else None, grad_vec if need_vec else None, None, None)


_seq_scale_op.register_autograd(_backward, setup_context=_setup_context)


def _fake_ext_forward(x, vec, seq_index):
    _check(x, vec, seq_index)
    return x.new_empty(x.shape)


def _register_ext_fakes() -> None:
    # Fake impls of the compiled backends' C++ ops (their autograd is in C++), for torch.compile
    # and opcheck; csrc/seq_scale/seq_scale.cpp names this module as their home.
    torch.library.register_fake("red_kernels_C::seq_scale")(_fake_ext_forward)
    torch.library.register_fake("red_kernels_C::seq_scale_bwd")(_fake_backward)


when_extension_loads(_register_ext_fakes)


# --- public API --------------------------------------------------------------------------------


def seq_scale(x: Tensor, vec: Tensor, seq_index: Tensor | None = None, *, backend: str | None = None) -> Tensor:
    """Scale every token by its sequence's vector: ``x * vec[:, None, :]`` or ``x * vec[seq_index]``.

    Args:
        x: dense ``[B, T, n]`` or, with ``seq_index``, packed ``[N, n]``; fp32/fp16/bf16/fp64, any
            strides (T = 1 is a decode step).
        vec: ``[B, n]`` per-sequence vectors; may be fp32 on bf16/fp16 ``x`` (mixed precision).
        seq_index: None (dense), or ``[N]`` int64 with each packed token's sequence in ``[0, B)``.
            Validated on the host before any kernel reads memory through it. It need not be sorted:
            rows of one sequence may be interleaved with others'. grad_vec is deterministic, and on
            the cpu, triton and cuda backends bit-identical to that of the same rows sorted stably
            by sequence. A sequence with no rows gets a zero gradient.
        backend: ``"reference" | "cpu" | "triton" | "cuda" | "auto"``; None defers to
            :func:`red_kernels.use_backend` and ``RED_KERNELS_BACKEND``, else automatic.

    Returns:
        A contiguous tensor shaped and typed like ``x``. Backward: ``grad_x = g * vec[seq]`` and
        ``grad_vec[b] = sum_{rows of b} g * x`` (fp32 accumulation, vec's dtype).
    """
    check_tensor_args(OP, {"x": x, "vec": vec}, {"seq_index": seq_index})
    backend = requested_backend(backend)
    if goes_straight_to_ext(backend, x, OP, IMPLEMENTED):
        return torch.ops.red_kernels_C.seq_scale(x, vec, seq_index)
    return _seq_scale_op(x, vec, seq_index, backend)
