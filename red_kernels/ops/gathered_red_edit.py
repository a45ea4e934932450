"""gathered_red_edit: multi-tenant RED, one batch mixing the RED vectors of many tenants.

Shapes: ``h`` is ``[..., d]`` with at least 2 dims; ``scales`` and ``biases`` are ``[K, d]`` (one
row per tenant; either may be None, not both); ``tenant_ids`` is int64 with shape ``h.shape[:k]``
for some ``1 <= k < h.dim()``: ``[B]`` for ``h [B, T, d]`` (one id per sequence), ``[N]`` for packed
``h [N, d]`` (one id per token), or ``[B, T]`` for ``h [B, T, d]``. Each id covers the rows under
it. Row ``i`` of the output, with ``t`` the tenant of row ``i``::

    y[i] = h[i] * scales[t] + biases[t]      if t >= 0
    y[i] = h[i]                              if t == -1 (the base model, unedited)

computed in fp32 (fp64 for fp64 ``h``) and stored contiguous in h's dtype, so fp32 vectors may
edit bf16/fp16 activations. Ids outside ``[-1, K)`` raise ``ValueError`` before any kernel reads
memory through them (on CUDA this costs one small device-to-host copy per call).

Backward (mixed-tenant training), one pass over ``grad_out`` (g) and the saved ``h``::

    grad_h[i]        = g[i] * scales[t]     (g[i] for unedited rows)
    grad_scales[k]   = sum over rows i of tenant k of g[i] * h[i]     (zero if k is absent)
    grad_biases[k]   = sum over rows i of tenant k of g[i]

accumulated in fp32 and deterministic: rows are sorted by tenant (a stable counting sort of the
ids on the host), cut into chunks of one tenant each, summed per chunk, then each tenant's chunks
are summed in order (two-stage reduction, no atomics). Autograd saves ``h`` (only when ``scales``
needs a gradient), the ``[K, d]`` scales and the ids, nothing larger.

Layers in this file: the eager reference, the ``red_kernels::gathered_red_edit`` and
``red_kernels::gathered_red_edit_backward`` custom ops (schema, fake impl, autograd), the
per-backend implementations they dispatch to, and the fake impls of the compiled backends' C++ ops.
Eager calls on the ``cpu``/``cuda`` backends go straight to the C++ op
``red_kernels_C::gathered_red_edit``, whose autograd is registered in C++ (~3 us of call overhead
instead of ~30 us); under torch.compile and on the Python backends the call goes through the
custom op.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from red_kernels._backend import requested_backend, resolve, when_extension_loads
from red_kernels.ops._common import (
    acc_dtype,
    call_backward,
    check_floating,
    check_same_device,
    check_tensor_args,
    empty_unless,
    goes_straight_to_ext,
    index_bounds,
    leading_size,
)

OP = "gathered_red_edit"


# --- shapes and checks ---------------------------------------------------------------------------


def rows_per_unit(h: Tensor, tenant_ids: Tensor) -> int:
    """Rows of h's ``[m, d]`` view covered by one id (T for ids [B] on h [B, T, d], else 1)."""
    return math.prod(h.shape[tenant_ids.dim() : -1])


def row_tenants(h: Tensor, tenant_ids: Tensor) -> Tensor:
    """The tenant id of every row of h's ``[m, d]`` view, int64 ``[m]``."""
    return tenant_ids.reshape(-1, 1).expand(-1, rows_per_unit(h, tenant_ids)).reshape(-1)


def _num_tenants(scales: Tensor | None, biases: Tensor | None) -> int:
    return (scales if scales is not None else biases).shape[0]


def _check_table(p: Tensor | None, name: str, d: int, h: Tensor) -> None:
    if p is None:
        return
    check_floating(p, name, OP)
    if p.dim() != 2 or p.shape[1] != d:
        raise ValueError(
            f"red_kernels.{OP}: argument '{name}' must have shape [num_tenants, {d}] (d = the last dim "
            f"of 'h'), got {list(p.shape)}"
        )
    check_same_device(h, "h", p, name, OP)


def _check_ids(tenant_ids: Tensor, h: Tensor, h_name: str = "h") -> None:
    if not isinstance(tenant_ids, Tensor):
        raise TypeError(f"red_kernels.{OP}: argument 'tenant_ids' must be a Tensor, got {type(tenant_ids).__name__}")
    if tenant_ids.dtype != torch.int64:
        raise ValueError(f"red_kernels.{OP}: argument 'tenant_ids' must be int64, got {tenant_ids.dtype}")
    k = tenant_ids.dim()
    if not (1 <= k < h.dim()) or tuple(tenant_ids.shape) != tuple(h.shape[:k]):
        raise ValueError(
            f"red_kernels.{OP}: argument 'tenant_ids' must have shape {list(h.shape[:1])} (one id per "
            f"sequence) or another prefix of '{h_name}'.shape[:-1] = {list(h.shape[:-1])} (one per token), "
            f"got {list(tenant_ids.shape)}"
        )
    check_same_device(h, h_name, tenant_ids, "tenant_ids", OP)


def _check(h: Tensor, scales: Tensor | None, biases: Tensor | None, tenant_ids: Tensor) -> None:
    """Shapes, dtypes and devices (no values: the fake impl runs this on meta tensors too)."""
    check_floating(h, "h", OP)
    if h.dim() < 2:
        raise ValueError(
            f"red_kernels.{OP}: argument 'h' must have at least 2 dims [units, ..., d] (the leading dims "
            f"are indexed by 'tenant_ids'), got {list(h.shape)}"
        )
    d = h.shape[-1]
    if scales is None and biases is None:
        raise ValueError(
            f"red_kernels.{OP}: arguments 'scales' and 'biases' are both None; at least one is needed "
            "(it defines the number of tenants)"
        )
    _check_table(scales, "scales", d, h)
    _check_table(biases, "biases", d, h)
    if scales is not None and biases is not None:
        if biases.shape[0] != scales.shape[0]:
            raise ValueError(
                f"red_kernels.{OP}: argument 'biases' has {biases.shape[0]} tenants (rows) but 'scales' "
                f"has {scales.shape[0]}"
            )
        if biases.dtype != scales.dtype:
            raise ValueError(
                f"red_kernels.{OP}: argument 'biases' has dtype {biases.dtype} but 'scales' has "
                f"{scales.dtype}; they must match"
            )
    _check_ids(tenant_ids, h)


def check_id_values(tenant_ids: Tensor, num_tenants: int) -> None:
    """Every id in ``[-1, num_tenants)``; ValueError naming the first bad one otherwise."""
    if tenant_ids.numel() == 0:
        return
    flat = tenant_ids.reshape(-1)
    lo, hi = index_bounds(flat)
    if lo < -1 or hi >= num_tenants:
        pos = int(((flat < -1) | (flat >= num_tenants)).nonzero()[0, 0])
        raise ValueError(
            f"red_kernels.{OP}: argument 'tenant_ids' has value {int(flat[pos])} at flat position {pos}, "
            f"outside [-1, {num_tenants}) (-1 = unedited, else a row of 'scales'/'biases')"
        )


# --- reference -------------------------------------------------------------------------------------


def _with_identity_row(table: Tensor, fill: float, acc: torch.dtype) -> Tensor:
    """``[K + 1, d]`` table whose row 0 is the unedited row, so row ``t + 1`` serves id ``t``."""
    t = table.to(acc)
    return torch.cat([t.new_full((1, t.shape[1]), fill), t])


def gathered_red_edit_reference(h: Tensor, scales: Tensor | None, biases: Tensor | None, tenant_ids: Tensor) -> Tensor:
    """Eager, differentiable ground truth: gather each row's vectors, edit in fp32, cast to h's dtype."""
    acc = acc_dtype(h.dtype)
    d = h.shape[-1]
    slot = row_tenants(h, tenant_ids) + 1
    y = h.to(acc).reshape(leading_size(h), d)
    if scales is not None:
        y = y * _with_identity_row(scales, 1.0, acc)[slot]
    if biases is not None:
        y = y + _with_identity_row(biases, 0.0, acc)[slot]
    return y.reshape(h.shape).to(h.dtype)


# --- backend implementations -----------------------------------------------------------------


def _fwd_reference(h, scales, biases, tenant_ids):
    check_id_values(tenant_ids, _num_tenants(scales, biases))
    return gathered_red_edit_reference(h, scales, biases, tenant_ids).clone(memory_format=torch.contiguous_format)


def _bwd_reference(grad_out, h, scales, tenant_ids, num_tenants, need_h, need_scales, need_biases, param_dtype):
    check_id_values(tenant_ids, num_tenants)
    d = grad_out.shape[-1]
    acc = acc_dtype(grad_out.dtype)
    g = grad_out.to(acc).reshape(leading_size(grad_out), d)
    tenant = row_tenants(grad_out, tenant_ids)
    grad_h = empty_unless(False, grad_out, ())
    if need_h:
        gh = g * _with_identity_row(scales, 1.0, acc)[tenant + 1] if scales is not None else g
        grad_h = gh.reshape(grad_out.shape).to(grad_out.dtype).clone(memory_format=torch.contiguous_format)
    grad_scales = g.new_zeros((num_tenants, d) if need_scales else (0,))
    grad_biases = g.new_zeros((num_tenants, d) if need_biases else (0,))
    hr = h.to(acc).reshape(leading_size(h), d) if need_scales else None
    # One fixed-order column sum per present tenant: deterministic, no scatter-add.
    for k in torch.unique(tenant[tenant >= 0]).tolist():
        rows = tenant == k
        if need_scales:
            grad_scales[k] = (g[rows] * hr[rows]).sum(0)
        if need_biases:
            grad_biases[k] = g[rows].sum(0)
    return grad_h, grad_scales.to(param_dtype), grad_biases.to(param_dtype)


def _fwd_ext(h, scales, biases, tenant_ids):
    return torch.ops.red_kernels_C.gathered_red_edit(h, scales, biases, tenant_ids)


def _bwd_ext(grad_out, h, scales, tenant_ids, num_tenants, need_h, need_scales, need_biases, param_dtype):
    return torch.ops.red_kernels_C.gathered_red_edit_bwd(
        grad_out, h, scales, tenant_ids, num_tenants, need_h, need_scales, need_biases, param_dtype
    )


def _fwd_triton(h, scales, biases, tenant_ids):
    from red_kernels.triton.gathered_red_edit import gathered_red_edit_fwd

    check_id_values(tenant_ids, _num_tenants(scales, biases))
    return gathered_red_edit_fwd(h, scales, biases, tenant_ids)


def _bwd_triton(grad_out, h, scales, tenant_ids, num_tenants, need_h, need_scales, need_biases, param_dtype):
    from red_kernels.triton.gathered_red_edit import gathered_red_edit_bwd

    ids_cpu = tenant_ids.cpu()  # one copy serves the check and the backward plan
    check_id_values(ids_cpu, num_tenants)
    return gathered_red_edit_bwd(
        grad_out, h, scales, tenant_ids, ids_cpu, num_tenants, need_h, need_scales, need_biases, param_dtype
    )


_FWD = {"reference": _fwd_reference, "cpu": _fwd_ext, "cuda": _fwd_ext, "triton": _fwd_triton}
_BWD = {"reference": _bwd_reference, "cpu": _bwd_ext, "cuda": _bwd_ext, "triton": _bwd_triton}
IMPLEMENTED = tuple(_FWD)


# --- custom ops --------------------------------------------------------------------------------


@torch.library.custom_op("red_kernels::gathered_red_edit", mutates_args=())
def _gathered_red_edit_op(
    h: Tensor, scales: Tensor | None, biases: Tensor | None, tenant_ids: Tensor, backend: str
) -> Tensor:
    _check(h, scales, biases, tenant_ids)
    return _FWD[resolve(backend, h.device, OP, IMPLEMENTED)](h, scales, biases, tenant_ids)


@_gathered_red_edit_op.register_fake
def _(h, scales, biases, tenant_ids, backend):
    _check(h, scales, biases, tenant_ids)
    return h.new_empty(h.shape)


@torch.library.custom_op("red_kernels::gathered_red_edit_backward", mutates_args=())
def _gathered_red_edit_backward_op(
    grad_out: Tensor,
    h: Tensor | None,
    scales: Tensor | None,
    tenant_ids: Tensor,
    num_tenants: int,
    need_h: bool,
    need_scales: bool,
    need_biases: bool,
    param_dtype: torch.dtype,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    if need_scales and h is None:
        raise ValueError(f"red_kernels.{OP}: argument 'h' is required when need_scales is true")
    _check_ids(tenant_ids, grad_out, "grad_out")
    impl = _BWD[resolve(backend, grad_out.device, OP, IMPLEMENTED)]
    return impl(grad_out, h, scales, tenant_ids, num_tenants, need_h, need_scales, need_biases, param_dtype)


@_gathered_red_edit_backward_op.register_fake
def _fake_backward(grad_out, h, scales, tenant_ids, num_tenants, need_h, need_scales, need_biases, param_dtype, *_):
    d = grad_out.shape[-1]
    return (
        empty_unless(need_h, grad_out, tuple(grad_out.shape)),
        empty_unless(need_scales, grad_out, (num_tenants, d), param_dtype),
        empty_unless(need_biases, grad_out, (num_tenants, d), param_dtype),
    )


def _setup_context(ctx, inputs, output):
    h, scales, biases, tenant_ids, backend = inputs
    need_h, need_scales, need_biases = ctx.needs_input_grad[:3]
    ctx.flags = (need_h, need_scales, need_biases)
    ctx.param_dtype = (scales if scales is not None else biases).dtype
    ctx.num_tenants = _num_tenants(scales, biases)
    ctx.backend = backend
    ctx.save_for_backward(h if need_scales else None, scales if need_h else None, tenant_ids)


def _backward(ctx, grad_out):
    h, scales, tenant_ids = ctx.saved_tensors
    need_h, need_scales, need_biases = ctx.flags
    args = (grad_out, h, scales, tenant_ids, ctx.num_tenants, need_h, need_scales, need_biases, ctx.param_dtype)
    grad_h, grad_scales, grad_biases = call_backward(_gathered_red_edit_backward_op, _bwd_reference, args, ctx.backend)
    return (
        grad_h if need_h else None,
        grad_scales if need_scales else None,
        grad_biases if need_biases else None,
        None,
        None,
    )


_gathered_red_edit_op.register_autograd(_backward, setup_context=_setup_context)


def _fake_ext_forward(h, scales, biases, tenant_ids):
    _check(h, scales, biases, tenant_ids)
    return h.new_empty(h.shape)


def _register_ext_fakes() -> None:
    # Fake impls of the compiled backends' C++ ops (their autograd is in C++), for torch.compile
    # and opcheck; csrc/gathered_red_edit/gathered_red_edit.cpp names this module as their home.
    torch.library.register_fake("red_kernels_C::gathered_red_edit")(_fake_ext_forward)
    torch.library.register_fake("red_kernels_C::gathered_red_edit_bwd")(_fake_backward)


when_extension_loads(_register_ext_fakes)


# --- public API --------------------------------------------------------------------------------


def gathered_red_edit(
    h: Tensor,
    scales: Tensor | None,
    biases: Tensor | None,
    tenant_ids: Tensor,
    *,
    backend: str | None = None,
) -> Tensor:
    """Multi-tenant RED edit: row ``i`` becomes ``h[i] * scales[t] + biases[t]``, ``t = tenant of i``.

    Args:
        h: activations ``[..., d]`` (at least 2 dims), fp32/fp16/bf16/fp64, any strides.
        scales: ``[K, d]``, one row per tenant, or None (no scaling). Same dtype as ``biases``;
            may be fp32 on bf16/fp16 ``h``.
        biases: ``[K, d]`` or None (no bias). ``scales`` and ``biases`` cannot both be None.
        tenant_ids: int64, shape ``h.shape[:k]`` for some ``1 <= k < h.dim()``: ``[B]`` for
            ``h [B, T, d]`` (per sequence) or ``[N]`` for packed ``h [N, d]`` (per token). Values
            in ``[-1, K)``; ``-1`` leaves the rows unedited (the base model).
        backend: ``"reference" | "cpu" | "triton" | "cuda" | "auto"``; None defers to
            :func:`red_kernels.use_backend` and ``RED_KERNELS_BACKEND``, else automatic.

    Returns:
        ``[..., d]`` contiguous tensor in h's dtype. Gradients flow to ``h``, ``scales`` and
        ``biases`` (each tenant's rows get the sums over that tenant's rows only; absent tenants
        get zeros), deterministically.

    Raises:
        ValueError: an id outside ``[-1, K)`` (before any kernel runs), or a shape, dtype or device
            mismatch (the message names the argument).
    """
    check_tensor_args(OP, {"h": h, "tenant_ids": tenant_ids}, {"scales": scales, "biases": biases})
    backend = requested_backend(backend)
    if goes_straight_to_ext(backend, h, OP, IMPLEMENTED):
        return torch.ops.red_kernels_C.gathered_red_edit(h, scales, biases, tenant_ids)
    return _gathered_red_edit_op(h, scales, biases, tenant_ids, backend)
