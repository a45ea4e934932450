"""seq_scale vs eager PyTorch, torch.compile and the memory floor.

Shapes: x [8, 512, n] with n in {4096, 11008} (query/value width and d_ffn of a 7B model), fp32,
and bf16 with fp32 vectors (mixed precision); vec [8, n]. Forward (with autograd recording, as in
training) and forward+backward with both gradients. Floor: x.clone() for the forward, two clones
(the op's two large outputs, y and grad_x) for forward+backward.

Decode: one KV-cached step of a batch of 8, x [8, 1, n] with the vectors made at prefill, under
torch.inference_mode as in serving. Microseconds of work, so this measures per-call overhead
(200 calls per round).

    make bench PYTEST_ARGS="-k seq_scale"
"""

from __future__ import annotations

import pytest
import torch
from _common import backends_for, compiled, device, reset_grads, run

import red_kernels as rk

B, T = 8, 512
CASES = {
    f"{B}x{T}x{n}-{name}": (n, dtype)
    for n in (4096, 11008)
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))
}


def eager_seq_scale(x, vec):
    # What the PARA code does; the vectors cast to x's dtype so the output dtype matches.
    return x * vec.to(x.dtype)[:, None, :]


_compiled_seq_scale = compiled(eager_seq_scale)
VARIANTS = ["eager", "torch.compile", "floor", *[f"rk-{b}" for b in backends_for(device())]]


def _forward_fn(variant):
    if variant == "eager":
        return eager_seq_scale
    if variant == "torch.compile":
        return _compiled_seq_scale
    backend = variant.removeprefix("rk-")
    return lambda x, v: rk.seq_scale(x, v, backend=backend)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("case", list(CASES))
def test_seq_scale(benchmark, case, mode, variant):
    n, dtype = CASES[case]
    dev = device()
    x = torch.randn(B, T, n, device=dev).to(dtype).requires_grad_()
    vec = torch.randn(B, n, device=dev, requires_grad=True)
    grad = torch.randn(B, T, n, device=dev).to(dtype)
    group = f"seq_scale {case} {mode}"

    if variant == "floor":
        if mode == "fwd":
            fn = lambda: x.detach().clone()  # noqa: E731
        else:
            fn = lambda: (x.detach().clone(), grad.clone())  # noqa: E731
        run(benchmark, fn, group, variant)
        return

    op = _forward_fn(variant)
    if mode == "fwd":
        run(benchmark, lambda: op(x, vec), group, variant)
    else:
        run(benchmark, lambda: op(x, vec).backward(grad), group, variant, setup=lambda: reset_grads(x, vec))


DECODE_ITERATIONS = 200


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("n", [4096, 11008])
def test_seq_scale_decode(benchmark, n, variant):
    dev = device()
    x = torch.randn(B, 1, n, device=dev).to(torch.bfloat16)
    vec = torch.randn(B, n, device=dev)
    fn = (lambda: x.clone()) if variant == "floor" else (lambda: _forward_fn(variant)(x, vec))  # noqa: E731

    def step():
        with torch.inference_mode():
            fn()

    run(benchmark, step, f"seq_scale decode {B}x1x{n} bf16", variant, iterations=DECODE_ITERATIONS)
