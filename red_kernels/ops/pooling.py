"""last_token_index: which token PARA pools per sequence (the ``pool_index`` of para_vector_gen).

Rule, per row b of ``attention_mask`` (1 = token, 0 = padding):

- without ``prompt_lengths``: the last non-padding position;
- with ``prompt_lengths``: the position of the ``prompt_lengths[b]``-th non-padding token, i.e. the
  last prompt token when the row holds prompt + answer (training) -- the same token inference pools
  from the prompt alone.

Tokens are counted from the row's first non-padding position, so the padding side is read from each
row itself: right padding ``[1 1 1 0 0]`` pools position 2, left padding ``[0 0 1 1 1]`` pools 4, and
with prompt length 2 they pool positions 1 and 3. A batch may mix both sides (or pad on both).
Padding inside a row (a 0 between 1s) is skipped when counting.

Plain PyTorch, registered as a custom op so that its data-dependent checks (all-padding rows,
prompt lengths out of range) run eagerly inside ``torch.compile(fullgraph=True)`` graphs.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

OP = "last_token_index"


def _check_shapes(attention_mask: Tensor, prompt_lengths: Tensor | None) -> None:
    if attention_mask.dtype != torch.bool and (attention_mask.is_floating_point() or attention_mask.is_complex()):
        raise ValueError(
            f"red_kernels.{OP}: argument 'attention_mask' must be bool or integer (1 = token, 0 = padding), "
            f"got {attention_mask.dtype}; for a float mask pass `mask != 0`"
        )
    if attention_mask.dim() != 2:
        raise ValueError(
            f"red_kernels.{OP}: argument 'attention_mask' must be [B, L], got shape {list(attention_mask.shape)}"
        )
    if prompt_lengths is None:
        return
    if prompt_lengths.dtype == torch.bool or prompt_lengths.is_floating_point() or prompt_lengths.is_complex():
        raise ValueError(f"red_kernels.{OP}: argument 'prompt_lengths' must be integer, got {prompt_lengths.dtype}")
    if prompt_lengths.dim() != 1 or prompt_lengths.shape[0] != attention_mask.shape[0]:
        raise ValueError(
            f"red_kernels.{OP}: argument 'prompt_lengths' must have shape [{attention_mask.shape[0]}] (one per row "
            f"of 'attention_mask'), got {list(prompt_lengths.shape)}"
        )
    if prompt_lengths.device != attention_mask.device:
        raise ValueError(
            f"red_kernels.{OP}: argument 'prompt_lengths' is on {prompt_lengths.device} but 'attention_mask' is on "
            f"{attention_mask.device}"
        )


def _first_row(bad: Tensor) -> int:
    return int(bad.nonzero()[0, 0])


@torch.library.custom_op("red_kernels::last_token_index", mutates_args=())
def _last_token_index_op(attention_mask: Tensor, prompt_lengths: Tensor | None) -> Tensor:
    _check_shapes(attention_mask, prompt_lengths)
    if attention_mask.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64, device=attention_mask.device)
    if attention_mask.dtype != torch.bool:
        bad = ((attention_mask != 0) & (attention_mask != 1)).any(1)
        if bool(bad.any()):
            b = _first_row(bad)
            raise ValueError(
                f"red_kernels.{OP}: argument 'attention_mask' must hold only 0 and 1; row {b} has "
                f"{attention_mask[b][(attention_mask[b] != 0) & (attention_mask[b] != 1)][0].item()}"
            )
    valid = attention_mask != 0
    counts = valid.sum(1)
    empty = counts == 0
    if bool(empty.any()):
        raise ValueError(
            f"red_kernels.{OP}: argument 'attention_mask': row {_first_row(empty)} is all padding; there is no "
            "token to pool"
        )
    if prompt_lengths is None:
        k = counts
    else:
        k = prompt_lengths.to(torch.int64)
        out_of_range = (k < 1) | (k > counts)
        if bool(out_of_range.any()):
            b = _first_row(out_of_range)
            raise ValueError(
                f"red_kernels.{OP}: argument 'prompt_lengths': row {b} is {int(k[b])} but must lie in "
                f"[1, {int(counts[b])}] (the row's non-padding tokens)"
            )
    # Position of the k-th token: the first position whose running token count reaches k.
    reached = (valid.cumsum(1) == k[:, None]) & valid
    return reached.to(torch.int32).argmax(1)


@_last_token_index_op.register_fake
def _(attention_mask, prompt_lengths):
    _check_shapes(attention_mask, prompt_lengths)
    return attention_mask.new_empty((attention_mask.shape[0],), dtype=torch.int64)


def last_token_index(attention_mask: Tensor, prompt_lengths: Tensor | Sequence[int] | None = None) -> Tensor:
    """Index of the token to pool in each row: the last non-padding token, or the last prompt token.

    Args:
        attention_mask: ``[B, L]`` bool or integer mask, 1 (True) for tokens, 0 for padding; left-,
            right- or both-side padded, per row (see the module docstring for the rule).
        prompt_lengths: None, or ``[B]`` integers (tensor or sequence): the number of prompt tokens
            in each row, ``1 <= prompt_lengths[b] <= tokens in row b``. Given when a row holds
            prompt + answer, so training pools the same token as inference on the prompt alone.

    Returns:
        ``pool_index`` ``[B]`` int64 on the mask's device: positions in ``[0, L)``.

    Raises:
        ValueError: a row with no token, a prompt length out of range, a mask value other than 0/1,
            or wrong shapes, dtypes or devices (the message names the argument and the row).
    """
    if not isinstance(attention_mask, Tensor):
        raise TypeError(
            f"red_kernels.{OP}: argument 'attention_mask' must be a Tensor, got {type(attention_mask).__name__}"
        )
    if prompt_lengths is not None and not isinstance(prompt_lengths, Tensor):
        prompt_lengths = lengths_tensor(prompt_lengths, OP, "prompt_lengths", attention_mask.device)
    return _last_token_index_op(attention_mask, prompt_lengths)


def lengths_tensor(values: object, op: str, arg: str, device: torch.device | None = None) -> Tensor:
    """A sequence of ints as an int64 tensor; ValueError naming ``op`` and ``arg`` for anything else
    (bool is an int subclass; a float such as 1.5 must not be truncated to 1)."""
    items = list(values) if isinstance(values, Sequence) and not isinstance(values, str) else None
    if items is None or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in items):
        raise ValueError(
            f"red_kernels.{op}: argument '{arg}' must be a LongTensor or a sequence of ints, got {values!r}"
        )
    return torch.tensor(items, dtype=torch.int64, device=device)
