"""gathered_para_vector_gen vs a per-tenant sub-batch loop (the way PEFT serves mixed LoRA batches),
torch.compile of that loop, and the single-tenant op on the same batch.

16 tenants, B=16 (one sequence per tenant, shuffled), T=512, d=4096, r=12, n_out = 2*4096 + 11008.
fp32 and bf16 (h and weights in one dtype). Forward (serving: vectors are generated once at
prefill) and forward+backward (mixed-tenant training).

    .venv/bin/python -m pytest benchmarks/bench_gathered_para_vector_gen.py -q --benchmark-only
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _common import backends_for, compiled, device, reset_grads, run

import red_kernels as rk

K, B, T, D, R = 16, 16, 512, 4096, 12
N_OUT = 2 * 4096 + 11008
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def loop_para(h, pool_index, w_down, w_up, b_up, tenant_ids):
    # PEFT-style: split the batch by adapter, run each adapter on its sub-batch, scatter back.
    out = torch.ones(h.shape[0], w_up.shape[-1], dtype=w_up.dtype, device=h.device)
    for k in tenant_ids.unique().tolist():
        if k < 0:
            continue
        rows = (tenant_ids == k).nonzero().squeeze(1)
        pooled = h[rows, pool_index[rows]]
        out = out.index_put((rows,), F.gelu(pooled @ w_down[k]) @ w_up[k] + b_up[k])
    return out


_compiled_loop = compiled(loop_para)
VARIANTS = ["loop", "loop-compile", "single-tenant", *[f"rk-{b}" for b in backends_for(device())]]


def _inputs(dtype):
    dev = device()
    torch.manual_seed(0)
    h = torch.randn(B, T, D, device=dev).to(dtype).requires_grad_()
    pool_index = torch.randint(0, T, (B,), device=dev)
    w_down = (0.02 * torch.randn(K, D, R, device=dev)).to(dtype).requires_grad_()
    w_up = (0.02 * torch.randn(K, R, N_OUT, device=dev)).to(dtype).requires_grad_()
    b_up = torch.ones(K, N_OUT, device=dev).to(dtype).requires_grad_()
    tenant_ids = torch.randperm(K, device=dev)[:B] if B <= K else torch.randint(0, K, (B,), device=dev)
    grad = torch.randn(B, N_OUT, device=dev).to(dtype)
    return h, pool_index, w_down, w_up, b_up, tenant_ids, grad


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dt", list(DTYPES))
def test_gathered_para_vector_gen(benchmark, dt, mode, variant):
    h, p, wd, wu, bu, ids, grad = _inputs(DTYPES[dt])
    group = f"gathered_para_vector_gen K{K} B{B} T{T} d{D} r{R} {dt} {mode}"
    if variant == "loop":
        op = loop_para
    elif variant == "loop-compile":
        op = _compiled_loop
    elif variant == "single-tenant":  # what one generator costs on the same batch
        op = lambda h, p, wd, wu, bu, ids: rk.para_vector_gen(h, p, wd[0], wu[0], bu[0])  # noqa: E731
    else:
        backend = variant.removeprefix("rk-")
        op = lambda *a: rk.gathered_para_vector_gen(*a, backend=backend)  # noqa: E731
    if mode == "fwd":
        run(benchmark, lambda: op(h, p, wd, wu, bu, ids), group, variant)
    else:
        run(benchmark, lambda: op(h, p, wd, wu, bu, ids).backward(grad), group, variant,
            setup=lambda: reset_grads(h, wd, wu, bu))  # fmt: skip
