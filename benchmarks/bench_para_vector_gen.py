"""para_vector_gen vs eager PyTorch, torch.compile and the floor, at LLaMA-2-7B sizes.

B=8, T=512, d=4096, r=12, n_out = 2*4096 + 11008 (l_q, l_v, l_u). "fp32": h and weights fp32;
"bf16": h and weights bf16 (a model cast wholesale). Forward as in training (autograd recording)
and forward+backward with h requiring grad (the residual stream). Floors: the forward reads
B rows of h and w_up (reported, no separate floor); forward+backward must materialise a dense
grad_h, so its floor is ``torch.zeros_like(h)``.

    .venv/bin/python -m pytest benchmarks/bench_para_vector_gen.py -q --benchmark-only
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _common import backends_for, compiled, device, reset_grads, run

import red_kernels as rk

B, T, D, R = 8, 512, 4096, 12
N_OUT = 2 * 4096 + 11008
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def eager_para(h, pool_index, w_down, w_up, b_up):
    # The way the PARA code writes it: pool the last prompt token, Linear -> GELU -> Linear.
    pooled = h[torch.arange(h.shape[0], device=h.device), pool_index]
    return F.gelu(pooled @ w_down) @ w_up + b_up


_compiled_para = compiled(eager_para)
VARIANTS = ["eager", "torch.compile", "floor", *[f"rk-{b}" for b in backends_for(device())]]


def _inputs(dtype):
    dev = device()
    torch.manual_seed(0)
    h = torch.randn(B, T, D, device=dev).to(dtype).requires_grad_()
    pool_index = torch.randint(0, T, (B,), device=dev)
    w_down = (0.02 * torch.randn(D, R, device=dev)).to(dtype).requires_grad_()
    w_up = (0.02 * torch.randn(R, N_OUT, device=dev)).to(dtype).requires_grad_()
    b_up = torch.ones(N_OUT, device=dev).to(dtype).requires_grad_()
    grad = torch.randn(B, N_OUT, device=dev).to(dtype)
    return h, pool_index, w_down, w_up, b_up, grad


def _op(variant):
    if variant == "eager":
        return eager_para
    if variant == "torch.compile":
        return _compiled_para
    backend = variant.removeprefix("rk-")
    return lambda *a: rk.para_vector_gen(*a, backend=backend)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dt", list(DTYPES))
def test_para_vector_gen(benchmark, dt, mode, variant):
    h, p, wd, wu, bu, grad = _inputs(DTYPES[dt])
    group = f"para_vector_gen B{B} T{T} d{D} r{R} n{N_OUT} {dt} {mode}"
    if variant == "floor":
        if mode == "fwd":  # the bytes the op must read: B pooled rows and the weights
            fn = lambda: (h.detach()[torch.arange(B), p].clone(), wu.detach().clone())  # noqa: E731
        else:
            fn = lambda: torch.zeros_like(h)  # noqa: E731
        run(benchmark, fn, group, variant)
        return
    op = _op(variant)
    if mode == "fwd":
        run(benchmark, lambda: op(h, p, wd, wu, bu), group, variant)
    else:
        run(benchmark, lambda: op(h, p, wd, wu, bu).backward(grad), group, variant,
            setup=lambda: reset_grads(h, wd, wu, bu))  # fmt: skip
