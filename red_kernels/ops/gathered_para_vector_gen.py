"""gathered_para_vector_gen: the PARA vector generator for mixed-tenant batches.

Each sequence uses its tenant's generator (a batched gathered GEMV, in the spirit of Punica's
BGMV)::

    k         = tenant_ids[b]                                           in [-1, K)
    out[b]    = act(h[b, pool_index[b]] @ w_down[k]) @ w_up[k] + b_up[k]        (k >= 0)
    out[b]    = 1                                                               (k == -1)

Shapes: h [B, T, d], pool_index [B] int64 in [0, T), w_down [K, d, r], w_up [K, r, n_out],
b_up [K, n_out], tenant_ids [B] int64. Tenant -1 is the base model: all-ones vectors, so the
scaled projections are unchanged. Dtype rule as in :mod:`red_kernels.ops.para_vector_gen`.

Backward: grad_h as for the plain op (rows of tenant -1 get zeros), and each tenant's weight
gradients summed over its rows in batch order (deterministic; zero for tenants absent from the
batch).

The plain op is the K = 1 case of the same kernels, so this module holds only the public function;
the reference, the custom ops and the backends live in :mod:`red_kernels.ops.para_vector_gen`.
"""

from __future__ import annotations

from torch import Tensor

from red_kernels._backend import requested_backend
from red_kernels.ops.para_vector_gen import call_para_op, gathered_para_vector_gen_reference

__all__ = ["gathered_para_vector_gen", "gathered_para_vector_gen_reference"]


def gathered_para_vector_gen(
    h: Tensor,
    pool_index: Tensor,
    w_down: Tensor,
    w_up: Tensor,
    b_up: Tensor,
    tenant_ids: Tensor,
    activation: str = "gelu",
    *,
    backend: str | None = None,
) -> Tensor:
    """Per-tenant PARA vector generation for a mixed batch, fused.

    Args:
        h: ``[B, T, d]`` hidden states, fp32/fp16/bf16/fp64, any strides.
        pool_index: ``[B]`` int64 in ``[0, T)``, the pooled (last prompt) position per sequence.
        w_down: ``[K, d, r]``; w_up: ``[K, r, n_out]``; b_up: ``[K, n_out]``: one generator per
            tenant, one dtype for all three.
        tenant_ids: ``[B]`` int64 in ``[-1, K)``; -1 = no adapter (all-ones vectors).
        activation: ``"gelu"`` (default), ``"gelu_tanh"``, ``"relu"`` or ``"silu"``.
        backend: as for :func:`red_kernels.para_vector_gen`.

    Returns:
        ``[B, n_out]`` in the weights' dtype.
    """
    if not isinstance(tenant_ids, Tensor):
        raise TypeError(
            "red_kernels.gathered_para_vector_gen: argument 'tenant_ids' must be a Tensor, "
            f"got {type(tenant_ids).__name__}"
        )
    return call_para_op(h, pool_index, w_down, w_up, b_up, tenant_ids, activation, requested_backend(backend))
