"""red_edit vs eager PyTorch, torch.compile and the memory floor.

Shapes: (4096, 4096) fp32 and (8, 512, 4096) bf16 with fp32 vectors; forward (with autograd
recording, as in training) and forward+backward. Floor: h.clone() for the forward, two clones (the
op's two large outputs, y and grad_h) for forward+backward.

Decode: one KV-cached step, h [8, 1, 4096] bf16 with fp32 vectors, under torch.inference_mode as
in serving, and the same step with autograd recording (training-sized overhead). Microseconds of
work, so this measures per-call overhead (200 calls per round).

    make bench PYTEST_ARGS="-k red_edit"
"""

from __future__ import annotations

import pytest
import torch
from _common import backends_for, compiled, device, reset_grads, run

import red_kernels as rk

CASES = {"4096x4096-fp32": ((4096, 4096), torch.float32), "8x512x4096-bf16": ((8, 512, 4096), torch.bfloat16)}


def eager_red(h, scale, bias):
    # What the official RED code does; vectors cast to h's dtype so the output dtype matches.
    return h * scale.to(h.dtype) + bias.to(h.dtype)


_compiled_red = compiled(eager_red)
VARIANTS = ["eager", "torch.compile", "floor", *[f"rk-{b}" for b in backends_for(device())]]


def _forward_fn(variant):
    if variant == "eager":
        return eager_red
    if variant == "torch.compile":
        return _compiled_red
    backend = variant.removeprefix("rk-")
    return lambda h, s, b: rk.red_edit(h, s, b, backend=backend)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("case", list(CASES))
def test_red_edit(benchmark, case, mode, variant):
    shape, dtype = CASES[case]
    dev = device()
    h = torch.randn(shape, device=dev).to(dtype).requires_grad_()
    d = shape[-1]
    scale = torch.randn(d, device=dev, requires_grad=True)
    bias = torch.randn(d, device=dev, requires_grad=True)
    grad = torch.randn(shape, device=dev).to(dtype)
    group = f"red_edit {case} {mode}"

    if variant == "floor":
        if mode == "fwd":
            fn = lambda: h.detach().clone()  # noqa: E731
        else:
            fn = lambda: (h.detach().clone(), grad.clone())  # noqa: E731
        run(benchmark, fn, group, variant)
        return

    op = _forward_fn(variant)
    if mode == "fwd":
        run(benchmark, lambda: op(h, scale, bias), group, variant)
    else:
        run(
            benchmark,
            lambda: op(h, scale, bias).backward(grad),
            group,
            variant,
            setup=lambda: reset_grads(h, scale, bias),
        )


DECODE_ITERATIONS = 200


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", ["inference", "autograd"])
def test_red_edit_decode(benchmark, mode, variant):
    dev = device()
    grad = mode == "autograd"
    h = torch.randn(8, 1, 4096, device=dev).to(torch.bfloat16).requires_grad_(grad)
    scale = torch.randn(4096, device=dev, requires_grad=grad)
    bias = torch.randn(4096, device=dev, requires_grad=grad)
    fn = (lambda: h.detach().clone()) if variant == "floor" else (lambda: _forward_fn(variant)(h, scale, bias))  # noqa: E731
    if grad:
        step = fn
    else:

        def step():
            with torch.inference_mode():
                fn()

    run(benchmark, step, f"red_edit decode 8x1x4096 bf16 {mode}", variant, iterations=DECODE_ITERATIONS)
