"""PARAVectorGenerator: the per-layer PARA vector generator as a module.

Owns ``w_down [d_model, rank]``, ``w_up [rank, sum(out_sizes)]`` and ``b_up [sum(out_sizes)]``,
initialised as in the PARA paper: ``w_down ~ N(0, 0.02)``, ``w_up = 0``, ``b_up = 1``, so every
generated vector is all ones at step 0 and the patched model starts out unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from red_kernels.nn._checks import floating_dtype, positive_int
from red_kernels.ops._activations import activation_code
from red_kernels.ops.para_vector_gen import para_vector_gen


class PARAVectorGenerator(nn.Module):
    """``act(h[b, pool_index[b]] @ w_down) @ w_up + b_up``, split into one vector per scaled
    projection.

    Args:
        d_model: hidden size of the layer input ``h``.
        out_sizes: widths of the vectors, e.g. ``(n_q, n_v, n_ffn)`` for ``l_q, l_v, l_u``.
        rank: bottleneck width r (12 in the paper). The kernel backends run 1..64; automatic
            backend selection runs a larger rank on the reference backend.
        activation: ``"gelu"`` (default), ``"gelu_tanh"``, ``"relu"`` or ``"silu"``.
        up_bias: ``b_up`` is a trainable parameter (default); False keeps it a fixed buffer of ones.
        backend: optional backend for every call (None: automatic / context / environment).
        device, dtype: of the parameters.

    Forward: ``h [B, T, d_model]`` and ``pool_index [B]`` int64 -> a tuple of ``[B, n_i]`` vectors
    in the parameters' dtype.
    """

    def __init__(
        self,
        d_model: int,
        out_sizes: Sequence[int],
        rank: int = 12,
        activation: str = "gelu",
        up_bias: bool = True,
        *,
        backend: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        owner = "PARAVectorGenerator"
        d_model = positive_int(d_model, "d_model", owner)
        rank = positive_int(rank, "rank", owner)
        if not isinstance(out_sizes, Sequence) or isinstance(out_sizes, str) or not out_sizes:
            raise ValueError(
                f"red_kernels.nn.{owner}: argument 'out_sizes' must be a non-empty list of widths, got {out_sizes!r}"
            )
        sizes = tuple(positive_int(s, "out_sizes", owner) for s in out_sizes)
        floating_dtype(dtype, "dtype", owner)
        if not isinstance(up_bias, bool):
            raise ValueError(f"red_kernels.nn.{owner}: argument 'up_bias' must be True or False, got {up_bias!r}")
        activation_code(activation, "nn.PARAVectorGenerator")
        self.d_model, self.out_sizes, self.rank, self.activation, self.backend = (
            d_model,
            sizes,
            rank,
            activation,
            backend,
        )
        factory = {"device": device, "dtype": dtype}
        self.w_down = nn.Parameter(torch.empty(d_model, rank, **factory))
        self.w_up = nn.Parameter(torch.empty(rank, sum(sizes), **factory))
        if up_bias:
            self.b_up = nn.Parameter(torch.empty(sum(sizes), **factory))
        else:  # fixed ones: the vectors are 1 + act(x W_down) W_up (PARA's parameter count)
            self.register_buffer("b_up", torch.empty(sum(sizes), **factory), persistent=False)
        self.up_bias = up_bias
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The paper's init: the generator outputs all-ones vectors until w_up learns."""
        with torch.no_grad():
            nn.init.normal_(self.w_down, mean=0.0, std=0.02)
            nn.init.zeros_(self.w_up)
            nn.init.ones_(self.b_up)

    def forward(self, h: Tensor, pool_index: Tensor) -> tuple[Tensor, ...]:
        out = para_vector_gen(h, pool_index, self.w_down, self.w_up, self.b_up, self.activation, backend=self.backend)
        return tuple(torch.split(out, self.out_sizes, dim=-1))

    def extra_repr(self) -> str:
        sizes = list(self.out_sizes)
        return (
            f"d_model={self.d_model}, out_sizes={sizes}, rank={self.rank}, activation={self.activation!r}, "
            f"up_bias={self.up_bias}"
        )
