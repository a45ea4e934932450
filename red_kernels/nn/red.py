"""RED editor modules: the learned ``scale`` and ``bias`` vectors of one edited module.

``REDEdit`` holds the vectors and applies :func:`red_kernels.red_edit` to a tensor ``[..., dim]``.
It is attached to a model in one of two ways:

- :func:`red_kernels.patch_model` registers it as the child ``red_edit`` of each target module and
  adds a forward hook to the target, so the target keeps its class, its parameter names and every
  attribute model code reads (e.g. T5 reads ``wo.weight.dtype``); unpatching removes both.
- :class:`REDWrapped` wraps any module explicitly: ``REDWrapped(base, editor)(x) == editor(base(x))``,
  for hand-built models.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from red_kernels.nn._checks import floating_dtype, positive_int
from red_kernels.ops.red_edit import red_edit


class REDEdit(nn.Module):
    """``y = h * scale + bias`` over the last dim, with learned ``scale`` (init 1) and ``bias`` (init 0).

    Args:
        dim: width ``d`` of the edited representation (the last dim of ``h``).
        scale: learn a scaling vector ``[d]``; False is the paper's "w/o scaling" ablation.
        bias: learn a bias vector ``[d]``; False is the "w/o bias" ablation.
        dtype: dtype of the vectors. None means fp32 whatever the model's dtype: the op computes in
            fp32 and casts back to ``h``'s dtype, so fp32 vectors edit bf16/fp16 activations.
        device: device of the vectors.
        backend: backend for :func:`red_kernels.red_edit` (None: the usual selection rules).

    Shapes: ``h`` is ``[..., d]``; the output has ``h``'s shape and dtype. At initialisation the
    edit is the identity bit for bit.
    """

    def __init__(
        self,
        dim: int,
        scale: bool = True,
        bias: bool = True,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        dim = positive_int(dim, "dim", "REDEdit")
        if not (scale or bias):
            raise ValueError("red_kernels.nn.REDEdit: at least one of arguments 'scale' and 'bias' must be True")
        dtype = floating_dtype(dtype, "dtype", "REDEdit") or torch.float32
        self.dim = dim
        self.backend = backend
        self.scale = nn.Parameter(torch.empty(dim, dtype=dtype, device=device)) if scale else None
        self.bias = nn.Parameter(torch.empty(dim, dtype=dtype, device=device)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The identity edit: ``scale = 1``, ``bias = 0``."""
        with torch.no_grad():
            if self.scale is not None:
                self.scale.fill_(1.0)
            if self.bias is not None:
                self.bias.zero_()

    def forward(self, h: Tensor) -> Tensor:
        if h.shape[-1] != self.dim:
            raise ValueError(
                f"red_kernels.nn.REDEdit: argument 'h' has last dim {h.shape[-1]} but the editor has dim {self.dim}"
            )
        return red_edit(h, self.scale, self.bias, backend=self.backend)

    def extra_repr(self) -> str:
        dtype = (self.scale if self.scale is not None else self.bias).dtype
        return f"dim={self.dim}, scale={self.scale is not None}, bias={self.bias is not None}, dtype={dtype}"


class REDWrapped(nn.Module):
    """``editor(base(*args, **kwargs))``: RED applied to the output of any module returning a tensor."""

    def __init__(self, base: nn.Module, editor: REDEdit) -> None:
        super().__init__()
        self.base = base
        self.editor = editor

    def forward(self, *args, **kwargs) -> Tensor:
        return self.editor(self.base(*args, **kwargs))
