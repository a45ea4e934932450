"""Constructor argument checks shared by the modules: ValueError naming the module and the argument."""

from __future__ import annotations

import numbers

import torch


def positive_int(value: object, name: str, owner: str) -> int:
    """``value`` as an int >= 1; bools and non-integral numbers (2.5) are refused, not truncated."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"red_kernels.nn.{owner}: argument '{name}' must be a positive int, got {value!r}")
    return int(value)


def floating_dtype(value: object, name: str, owner: str) -> torch.dtype | None:
    """None or a floating ``torch.dtype``."""
    if value is not None and not (isinstance(value, torch.dtype) and value.is_floating_point):
        raise ValueError(f"red_kernels.nn.{owner}: argument '{name}' must be a floating torch.dtype, got {value!r}")
    return value
