"""Activations of the PARA vector generator, shared by every op that runs the bottleneck.

Each has an integer code that the C++/CUDA (csrc/common/activations.h) and Triton
(red_kernels/triton/_activations.py) kernels switch on; the eager functions here are the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

ACTIVATIONS: dict[str, int] = {"gelu": 0, "gelu_tanh": 1, "relu": 2, "silu": 3}


def activation_code(name: str, op: str) -> int:
    """The kernel code of ``name``; ValueError naming the argument for anything else."""
    if name not in ACTIVATIONS:
        raise ValueError(f"red_kernels.{op}: argument 'activation' must be one of {list(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]


def apply_activation(x: Tensor, name: str) -> Tensor:
    """Eager reference: gelu is the exact (erf) GELU, gelu_tanh its tanh approximation."""
    if name == "gelu":
        return F.gelu(x)
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if name == "relu":
        return torch.relu(x)
    if name == "silu":
        return F.silu(x)
    raise ValueError(f"unknown activation {name!r}")


def activation_grad(x: Tensor, name: str) -> Tensor:
    """Eager ``d act(x) / dx`` (the kernels' act_derivative), for code that cannot run autograd,
    such as a custom op's reference backward (through :func:`activation_backward`)."""
    if name == "gelu":
        return 0.5 * (1 + torch.erf(x * 0.7071067811865476)) + x * 0.3989422804014327 * torch.exp(-0.5 * x * x)
    if name == "gelu_tanh":
        k, c = 0.7978845608028654, 0.044715
        t = torch.tanh(k * (x + c * x**3))
        return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * k * (1 + 3 * c * x * x)
    if name == "relu":
        return (~(x <= 0)).to(x.dtype)  # 1 at NaN, where activation_backward passes the gradient
    if name == "silu":
        s = torch.sigmoid(x)
        return s * (1 + x * (1 - s))
    raise ValueError(f"unknown activation {name!r}")


def activation_backward(grad: Tensor, x: Tensor, name: str) -> Tensor:
    """Eager ``grad * d act(x) / dx`` (the kernels' act_backward), with NaN and inf where torch's
    autograd puts them: relu's backward selects (0 where x <= 0, else grad, also at NaN x), so a
    NaN or inf grad is dropped where x <= 0 instead of becoming NaN * 0; the others multiply."""
    if name == "relu":
        return torch.where(x <= 0, torch.zeros_like(grad), grad)
    return grad * activation_grad(x, name)
