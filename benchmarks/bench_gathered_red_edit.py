"""gathered_red_edit (multi-tenant RED) vs single-tenant red_edit, the PEFT-style per-tenant loop,
a vectorised eager gather, torch.compile of that gather and the memory floor.

Shape: 16 tenants, h [B=16, T=512, d=4096], one tenant per sequence (ids [16], shuffled), fp32 and
bf16 activations with fp32 [16, 4096] tables; forward (autograd recording, as in training) and
forward+backward. Targets (issue 4): gathered forward at most 1.15x single-tenant red_edit on the
same tensor and backend, and at least 2x faster than the per-tenant loop.

Variants (one group per case and mode, measured side by side in one process):
  eager             the per-tenant loop the way PEFT serves mixed LoRA batches: for each tenant,
                    index its rows, edit them, write them back
  eager-gather      h * scales[ids][:, None] + biases[ids][:, None] in eager PyTorch
  torch.compile     torch.compile of eager-gather (the loop has data-dependent shapes)
  red_edit-<b>      single-tenant red_edit on the same tensor (backend b): the cost to match
  rk-<b>            gathered_red_edit (backend b)
  floor             h.clone() (forward), two clones (forward+backward: y and grad_h)

    .venv/bin/python -m pytest benchmarks/bench_gathered_red_edit.py -q --benchmark-only
"""

from __future__ import annotations

import pytest
import torch
from _common import backends_for, compiled, device, reset_grads, run

import red_kernels as rk

TENANTS, B, T, D = 16, 16, 512, 4096
CASES = {"16x512x4096-fp32": torch.float32, "16x512x4096-bf16": torch.bfloat16}


def eager_loop(h, scales, biases, ids):
    # PEFT's mixed-batch pattern: one sub-batch per tenant, unedited rows (-1) left as they are.
    out = h.clone()
    for t in torch.unique(ids[ids >= 0]).tolist():
        rows = (ids == t).nonzero().squeeze(1)
        out[rows] = h[rows] * scales[t].to(h.dtype) + biases[t].to(h.dtype)
    return out


def eager_gather(h, scales, biases, ids):
    # Vectorised eager alternative (no unedited rows in this benchmark, so no masking needed).
    return h * scales[ids][:, None].to(h.dtype) + biases[ids][:, None].to(h.dtype)


_compiled_gather = compiled(eager_gather)
BACKENDS = backends_for(device())
VARIANTS = [
    "eager",
    "eager-gather",
    "torch.compile",
    "floor",
    *[f"red_edit-{b}" for b in BACKENDS],
    *[f"rk-{b}" for b in BACKENDS],
]


def _forward_fn(variant):
    if variant == "eager":
        return eager_loop
    if variant == "eager-gather":
        return eager_gather
    if variant == "torch.compile":
        return _compiled_gather
    if variant.startswith("red_edit-"):
        backend = variant.removeprefix("red_edit-")
        # The single-tenant cost on the same tensor: every row edited with tenant 0's vectors.
        return lambda h, s, b, ids: rk.red_edit(h, s[0], b[0], backend=backend)
    backend = variant.removeprefix("rk-")
    return lambda h, s, b, ids: rk.gathered_red_edit(h, s, b, ids, backend=backend)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("case", list(CASES))
def test_gathered_red_edit(benchmark, case, mode, variant):
    dtype = CASES[case]
    dev = device()
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(B, T, D, generator=gen).to(dev, dtype).requires_grad_()
    scales = (1 + 0.1 * torch.randn(TENANTS, D, generator=gen)).to(dev).requires_grad_()
    biases = (0.1 * torch.randn(TENANTS, D, generator=gen)).to(dev).requires_grad_()
    ids = torch.randperm(B, generator=gen).remainder(TENANTS).to(dev)
    grad = torch.randn(B, T, D, generator=gen).to(dev, dtype)
    group = f"gathered_red_edit {case} {mode}"
    extra = {"tenants": TENANTS, "shape": [B, T, D], "dtype": str(dtype)}

    if variant == "floor":
        if mode == "fwd":
            fn = lambda: h.detach().clone()  # noqa: E731
        else:
            fn = lambda: (h.detach().clone(), grad.clone())  # noqa: E731
        run(benchmark, fn, group, variant, **extra)
        return

    op = _forward_fn(variant)
    if mode == "fwd":
        run(benchmark, lambda: op(h, scales, biases, ids), group, variant, **extra)
    else:
        run(
            benchmark,
            lambda: op(h, scales, biases, ids).backward(grad),
            group,
            variant,
            setup=lambda: reset_grads(h, scales, biases),
            **extra,
        )
