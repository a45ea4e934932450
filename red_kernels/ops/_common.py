"""Helpers shared by the op modules: argument checks with clear messages and small tensor utils."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from red_kernels._backend import resolve

# Backends whose kernels are C++ ops of the compiled extension, with their autograd registered in
# C++ (csrc/common/autograd.h).
EXT_BACKENDS = ("cpu", "cuda")


def goes_straight_to_ext(backend: str, x: object, op: str, implemented: tuple[str, ...]) -> bool:
    """Whether a public op call should skip its Python custom op and call the compiled backend's
    C++ op directly: eager (not being traced by torch.compile), a tensor input, and a request that
    resolves to ``cpu`` or ``cuda``. That C++ op checks its arguments (its messages name the
    argument too, in C++'s wording) and carries its own autograd, so the call costs ~3 us of
    overhead instead of ~30 us. An explicit backend that cannot run raises here, as it would
    inside the custom op."""
    if not isinstance(x, Tensor) or torch.compiler.is_compiling():
        return False
    return resolve(backend, x.device, op, implemented) in EXT_BACKENDS


def check_tensor_args(op: str, required: dict[str, object], optional: dict[str, object] | None = None) -> None:
    """A TypeError naming the argument for a non-tensor, before torch's schema check (whose message
    names neither the public op nor a fix) sees it."""
    for name, value in required.items():
        if not isinstance(value, Tensor):
            raise TypeError(f"red_kernels.{op}: argument '{name}' must be a Tensor, got {type(value).__name__}")
    for name, value in (optional or {}).items():
        if value is not None and not isinstance(value, Tensor):
            raise TypeError(f"red_kernels.{op}: argument '{name}' must be a Tensor or None, got {type(value).__name__}")


def call_backward(backward_op, differentiable, args: tuple, backend: str):
    """The gradients of a custom op's registered autograd backward: ``backward_op(*args, backend)``
    (the fused kernels), or ``differentiable(*args)`` (the op's eager reference formulas) when the
    backward runs under ``create_graph=True``, which autograd signals by turning grad mode on. The
    ``*_backward`` custom ops are opaque to autograd: their gradients would be constants of the
    graph create_graph builds, and every second derivative silently zero (or an error). The eager
    formulas are differentiable, so double backward is correct. The check is one flag read: the
    ordinary backward keeps its speed. The C++ autograd does the same (csrc/common/autograd.h)."""
    if torch.is_grad_enabled():
        return differentiable(*args)
    return backward_op(*args, backend)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp64 stays fp64 (gradcheck), everything else accumulates in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_floating(t: Tensor, name: str, op: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"red_kernels.{op}: argument '{name}' must be a Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise ValueError(f"red_kernels.{op}: argument '{name}' must be floating point, got {t.dtype}")


def check_same_device(ref: Tensor, ref_name: str, t: Tensor, name: str, op: str) -> None:
    if t.device != ref.device:
        raise ValueError(f"red_kernels.{op}: argument '{name}' is on {t.device} but '{ref_name}' is on {ref.device}")


def check_vector(v: Tensor | None, name: str, d: int, h: Tensor, op: str) -> None:
    """``v`` is None or a floating [d] vector on h's device."""
    if v is None:
        return
    check_floating(v, name, op)
    if v.dim() != 1 or v.shape[0] != d:
        raise ValueError(
            f"red_kernels.{op}: argument '{name}' must have shape [{d}] (the last dim of 'h'), got {list(v.shape)}"
        )
    check_same_device(h, "h", v, name, op)


def index_bounds(idx: Tensor) -> tuple[int, int]:
    """(min, max) of a non-empty integer tensor, read on the host in one transfer (one sync on GPU)."""
    lo, hi = torch.stack(torch.aminmax(idx.reshape(-1))).tolist()
    return lo, hi


def leading_size(x: Tensor) -> int:
    """Product of all dims but the last (well defined even when the last dim is 0)."""
    return math.prod(x.shape[:-1])


def as_rows(x: Tensor) -> Tensor:
    """View ``x`` as [rows, x.shape[-1]] with unit stride in the last dim (copies only when needed)."""
    rows = x.reshape(leading_size(x), x.shape[-1])
    if rows.shape[1] > 1 and rows.stride(1) != 1:
        rows = rows.contiguous()
    return rows


def empty_unless(need: bool, like: Tensor, shape: tuple[int, ...], dtype: torch.dtype | None = None) -> Tensor:
    """A tensor of ``shape`` when the gradient is needed, else an empty placeholder."""
    return like.new_empty(shape if need else (0,), dtype=dtype or like.dtype)
