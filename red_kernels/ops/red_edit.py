"""red_edit: the RED representation edit, ``y = h * scale + bias``.

Shapes: ``h`` is ``[..., d]`` (any leading dims, any strides); ``scale`` and ``bias`` are ``[d]``
or None (the "w/o scaling" / "w/o bias" ablations). The output is contiguous, shaped and typed
like ``h``; arithmetic is in fp32 (fp64 for fp64 ``h``), so fp32 vectors may edit bf16/fp16
activations (mixed precision).

Backward, fused into one pass over ``grad_out`` (g) and the saved ``h``::

    grad_h     = g * scale
    grad_scale = sum over all leading dims of g * h      (fp32 accumulation, scale's dtype)
    grad_bias  = sum over all leading dims of g          (fp32 accumulation, bias's dtype)

Autograd saves ``h`` (only when ``scale`` needs a gradient) and nothing larger.

Layers in this file: the eager reference, the ``red_kernels::red_edit`` and
``red_kernels::red_edit_backward`` custom ops (schema, fake impl, autograd), the per-backend
implementations they dispatch to, and the fake impls of the compiled backends' C++ ops. Eager calls
on the ``cpu``/``cuda`` backends go straight to the C++ op ``red_kernels_C::red_edit``, whose
autograd is registered in C++ (~3 us of call overhead instead of ~30 us, which matters at decode
sizes); under torch.compile and on the Python backends the call goes through the custom op.
"""

from __future__ import annotations

import torch
from torch import Tensor

from red_kernels._backend import requested_backend, resolve, when_extension_loads
from red_kernels.ops._common import (
    acc_dtype,
    call_backward,
    check_floating,
    check_tensor_args,
    check_vector,
    empty_unless,
    goes_straight_to_ext,
    leading_size,
)

OP = "red_edit"


def red_edit_reference(h: Tensor, scale: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
    """Eager, differentiable ground truth: ``(h * scale + bias)`` computed in fp32, cast to h's dtype."""
    acc = acc_dtype(h.dtype)
    y = h.to(acc)
    if scale is not None:
        y = y * scale.to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(h.dtype)


def _check(h: Tensor, scale: Tensor | None, bias: Tensor | None) -> None:
    check_floating(h, "h", OP)
    if h.dim() == 0:
        raise ValueError(f"red_kernels.{OP}: argument 'h' must have at least 1 dim [..., d], got a scalar")
    d = h.shape[-1]
    check_vector(scale, "scale", d, h, OP)
    check_vector(bias, "bias", d, h, OP)
    if scale is not None and bias is not None and scale.dtype != bias.dtype:
        raise ValueError(
            f"red_kernels.{OP}: argument 'bias' has dtype {bias.dtype} but 'scale' has {scale.dtype}; they must match"
        )


# --- backend implementations -----------------------------------------------------------------


def _fwd_reference(h: Tensor, scale: Tensor | None, bias: Tensor | None) -> Tensor:
    return red_edit_reference(h, scale, bias).clone(memory_format=torch.contiguous_format)


def _bwd_reference(grad_out, h, scale, need_h, need_scale, need_bias, param_dtype):
    d = grad_out.shape[-1]
    acc = acc_dtype(grad_out.dtype)
    g = grad_out.to(acc)
    grad_h = empty_unless(False, grad_out, ())
    if need_h:
        gh = g * scale.to(acc) if scale is not None else g
        grad_h = gh.to(grad_out.dtype).clone(memory_format=torch.contiguous_format)
    g2 = g.reshape(leading_size(g), d)
    grad_scale = (
        (g2 * h.to(acc).reshape(leading_size(h), d)).sum(0).to(param_dtype)
        if need_scale
        else empty_unless(False, grad_out, (), param_dtype)
    )
    grad_bias = g2.sum(0).to(param_dtype) if need_bias else empty_unless(False, grad_out, (), param_dtype)
    return grad_h, grad_scale, grad_bias


def _fwd_ext(h, scale, bias):
    return torch.ops.red_kernels_C.red_edit(h, scale, bias)


def _bwd_ext(grad_out, h, scale, need_h, need_scale, need_bias, param_dtype):
    return torch.ops.red_kernels_C.red_edit_bwd(grad_out, h, scale, need_h, need_scale, need_bias, param_dtype)


def _fwd_triton(h, scale, bias):
    from red_kernels.triton.red_edit import red_edit_fwd

    return red_edit_fwd(h, scale, bias)


def _bwd_triton(grad_out, h, scale, need_h, need_scale, need_bias, param_dtype):
    from red_kernels.triton.red_edit import red_edit_bwd

    return red_edit_bwd(grad_out, h, scale, need_h, need_scale, need_bias, param_dtype)


_FWD = {"reference": _fwd_reference, "cpu": _fwd_ext, "cuda": _fwd_ext, "triton": _fwd_triton}
_BWD = {"reference": _bwd_reference, "cpu": _bwd_ext, "cuda": _bwd_ext, "triton": _bwd_triton}
IMPLEMENTED = tuple(_FWD)


# --- custom ops --------------------------------------------------------------------------------


@torch.library.custom_op("red_kernels::red_edit", mutates_args=())
def _red_edit_op(h: Tensor, scale: Tensor | None, bias: Tensor | None, backend: str) -> Tensor:
    _check(h, scale, bias)
    return _FWD[resolve(backend, h.device, OP, IMPLEMENTED)](h, scale, bias)


@_red_edit_op.register_fake
def _(h, scale, bias, backend):
    _check(h, scale, bias)
    return h.new_empty(h.shape)


@torch.library.custom_op("red_kernels::red_edit_backward", mutates_args=())
def _red_edit_backward_op(
    grad_out: Tensor,
    h: Tensor | None,
    scale: Tensor | None,
    need_h: bool,
    need_scale: bool,
    need_bias: bool,
    param_dtype: torch.dtype,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    impl = _BWD[resolve(backend, grad_out.device, OP, IMPLEMENTED)]
    return impl(grad_out, h, scale, need_h, need_scale, need_bias, param_dtype)


@_red_edit_backward_op.register_fake
def _fake_backward(grad_out, h, scale, need_h, need_scale, need_bias, param_dtype, *_):
    d = grad_out.shape[-1]
    return (
        empty_unless(need_h, grad_out, tuple(grad_out.shape)),
        empty_unless(need_scale, grad_out, (d,), param_dtype),
        empty_unless(need_bias, grad_out, (d,), param_dtype),
    )


def _setup_context(ctx, inputs, output):
    h, scale, bias, backend = inputs
    need_h, need_scale, need_bias = ctx.needs_input_grad[:3]
    ctx.flags = (need_h, need_scale, need_bias)
    ctx.param_dtype = scale.dtype if scale is not None else (bias.dtype if bias is not None else h.dtype)
    ctx.backend = backend
    ctx.save_for_backward(h if need_scale else None, scale if need_h else None)


def _backward(ctx, grad_out):
    h, scale = ctx.saved_tensors
    need_h, need_scale, need_bias = ctx.flags
    args = (grad_out, h, scale, need_h, need_scale, need_bias, ctx.param_dtype)
    grad_h, grad_scale, grad_bias = call_backward(_red_edit_backward_op, _bwd_reference, args, ctx.backend)
    return (
        grad_h if need_h else None,
        grad_scale if need_scale else None,
        grad_bias if need_bias else None,
        None,
    )


_red_edit_op.register_autograd(_backward, setup_context=_setup_context)


def _fake_ext_forward(h, scale, bias):
    _check(h, scale, bias)
    return h.new_empty(h.shape)


def _register_ext_fakes() -> None:
    # Fake impls of the compiled backends' C++ ops (their autograd is in C++), for torch.compile
    # and opcheck; csrc/red_edit/red_edit.cpp names this module as their home.
    torch.library.register_fake("red_kernels_C::red_edit")(_fake_ext_forward)
    torch.library.register_fake("red_kernels_C::red_edit_bwd")(_fake_backward)


when_extension_loads(_register_ext_fakes)


# --- public API --------------------------------------------------------------------------------


def red_edit(
    h: Tensor, scale: Tensor | None = None, bias: Tensor | None = None, *, backend: str | None = None
) -> Tensor:
    """RED edit ``h * scale + bias`` over the last dim, fused forward and backward.

    Args:
        h: activations ``[..., d]``, fp32/fp16/bf16/fp64, any strides.
        scale: ``[d]`` or None (no scaling). Same dtype as ``bias``; may be fp32 on bf16/fp16 ``h``.
        bias: ``[d]`` or None (no bias).
        backend: ``"reference" | "cpu" | "triton" | "cuda" | "auto"``; None defers to
            :func:`red_kernels.use_backend` and ``RED_KERNELS_BACKEND``, else automatic.

    Returns:
        ``[..., d]`` contiguous tensor in h's dtype.
    """
    check_tensor_args(OP, {"h": h}, {"scale": scale, "bias": bias})
    backend = requested_backend(backend)
    if goes_straight_to_ext(backend, h, OP, IMPLEMENTED):
        return torch.ops.red_kernels_C.red_edit(h, scale, bias)
    return _red_edit_op(h, scale, bias, backend)
