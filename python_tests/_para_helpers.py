"""Shared by test_para_vector_gen.py and test_gathered_para_vector_gen.py: inputs, the comparison of
one backend's forward and gradients with the fp32/fp64 reference, and eager low-precision errors."""

from __future__ import annotations

import torch
from _helpers import LOW_PRECISION, assert_close

import red_kernels as rk
from red_kernels.ops._activations import apply_activation


def default_wdtype(dtype: torch.dtype) -> torch.dtype:
    """Generator weights in fp32 on fp16/bf16 activations (mixed precision), else h's dtype."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


def make_inputs(batch, t, d, r, n, dtype, wdtype=None, k=None, device="cpu", scale_up=1.0):
    """h [B, T, d], pool_index [B], weights [d, r] / [r, n] / [n] (or [K, ...] when k is given).
    w_up is random (not the zero init) so every gradient is exercised."""
    wdtype = wdtype or default_wdtype(dtype)
    lead = () if k is None else (k,)
    h = torch.randn(batch, t, d, device=device).to(dtype).requires_grad_()
    pool_index = torch.randint(0, max(t, 1), (batch,), device=device)
    w_down = (torch.randn(*lead, d, r, device=device) / max(d, 1) ** 0.5).to(wdtype).requires_grad_()
    w_up = (scale_up * torch.randn(*lead, r, n, device=device) / r**0.5).to(wdtype).requires_grad_()
    b_up = (1 + 0.1 * torch.randn(*lead, n, device=device)).to(wdtype).requires_grad_()
    return h, pool_index, w_down, w_up, b_up


def close(out, ref, eager, what):
    """Low precision: the _helpers rule (2x eager's error + 1 ulp). fp32/fp64: a relative bound on
    every element, scaled by the tensor's largest magnitude (the results are sums of d or B terms
    accumulated in a different order than the reference's)."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    if out.dtype in LOW_PRECISION:
        assert_close(out, ref, eager, what, elementwise=False)
        return
    if out.numel() == 0:
        return
    tol = 1e-12 if out.dtype == torch.float64 else 1e-5
    atol = tol * max(ref.abs().max().item(), 1.0)
    torch.testing.assert_close(out, ref.to(out.dtype), rtol=tol, atol=atol, msg=lambda m: f"{what}: {m}")


def eager_low_precision(h, pool_index, w_down, w_up, b_up, grad, activation, tenant_ids=None):
    """The same computation by eager PyTorch in the low-precision dtype (sets the error bound)."""
    low = h.dtype if h.dtype in LOW_PRECISION else w_up.dtype
    ins = [t.detach().to(low).requires_grad_() for t in (h, w_down, w_up, b_up)]
    if tenant_ids is None:
        pooled = ins[0][torch.arange(h.shape[0]), pool_index]
        out = apply_activation(pooled @ ins[1], activation) @ ins[2] + ins[3]
    else:
        out = rk.gathered_para_vector_gen_reference(ins[0], pool_index, *ins[1:], tenant_ids.cpu(), activation)
        out = out.to(low)
    if not out.requires_grad:
        return out, [torch.zeros_like(t) for t in ins]
    grads = torch.autograd.grad(out, ins, grad.to(low), allow_unused=True)
    return out, [torch.zeros_like(t) if g is None else g for g, t in zip(grads, ins)]


def check_against_reference(backend, h, pool_index, w_down, w_up, b_up, activation="gelu", tenant_ids=None):
    """Forward and all four gradients of one backend vs autograd through the reference, computed
    in fp32 (fp64 for fp64 inputs) from upcast copies of the same rounded inputs."""
    params = (h, w_down, w_up, b_up)
    n = w_up.shape[-1]
    grad = torch.randn(h.shape[0], n, device=h.device).to(w_up.dtype)
    if tenant_ids is None:
        out = rk.para_vector_gen(h, pool_index, w_down, w_up, b_up, activation, backend=backend)
    else:
        out = rk.gathered_para_vector_gen(h, pool_index, w_down, w_up, b_up, tenant_ids, activation, backend=backend)
    assert out.dtype == w_up.dtype and out.shape == (h.shape[0], n) and out.is_contiguous()
    grads = torch.autograd.grad(out, params, grad) if out.numel() else [torch.zeros_like(p) for p in params]
    for g_, p in zip(grads, params):
        assert g_.dtype == p.dtype and g_.shape == p.shape

    acc = torch.float64 if torch.float64 in (h.dtype, w_up.dtype) else torch.float32
    ups = [t.detach().to(acc).requires_grad_() for t in params]
    if tenant_ids is None:
        ref = rk.para_vector_gen_reference(ups[0], pool_index, *ups[1:], activation)
    else:
        ref = rk.gathered_para_vector_gen_reference(ups[0], pool_index, *ups[1:], tenant_ids, activation)
    ref_grads = (
        torch.autograd.grad(ref, ups, grad.to(acc), allow_unused=True)
        if ref.numel() and ref.requires_grad  # all rows on tenant -1: constant ones
        else [None] * 4
    )
    ref_grads = [torch.zeros_like(u) if g_ is None else g_ for g_, u in zip(ref_grads, ups)]

    eager_out, eager_grads = None, [None] * 4
    if h.dtype in LOW_PRECISION or w_up.dtype in LOW_PRECISION:
        eager_out, eager_grads = eager_low_precision(h, pool_index, w_down, w_up, b_up, grad, activation, tenant_ids)
    close(out, ref, eager_out, f"{backend} forward")
    for name, g_, r_, e_ in zip(("grad_h", "grad_w_down", "grad_w_up", "grad_b_up"), grads, ref_grads, eager_grads):
        close(g_, r_, e_, f"{backend} {name}")
    return out, grads
