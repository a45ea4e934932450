"""para_vector_gen: PARA's prompt-pooled vector generator (reference only so far; the fused op,
its custom-op registration and backends land with issue 3).

    pooled[b] = h[b, pool_index[b]]                                   [B, d]
    out       = act(pooled @ w_down) @ w_up + b_up                    [B, n_out]

Shapes: h [B, T, d], pool_index [B] int64 in [0, T), w_down [d, r], w_up [r, n_out], b_up [n_out].
"""

from __future__ import annotations

import torch
from torch import Tensor

from red_kernels.ops._activations import apply_activation
from red_kernels.ops._common import acc_dtype


def para_vector_gen_reference(
    h: Tensor, pool_index: Tensor, w_down: Tensor, w_up: Tensor, b_up: Tensor, activation: str = "gelu"
) -> Tensor:
    """Eager, differentiable ground truth, computed in fp32 (fp64 for fp64 h), returned in the
    weights' dtype."""
    acc = acc_dtype(h.dtype)
    pooled = h[torch.arange(h.shape[0], device=h.device), pool_index].to(acc)
    mid = apply_activation(pooled @ w_down.to(acc), activation)
    return (mid @ w_up.to(acc) + b_up.to(acc)).to(w_up.dtype)
