"""What reading an adapter directory needs in both readers: red_kernels' own (:mod:`red_kernels.adapters`)
and PEFT IA3's (:mod:`red_kernels.peft_ia3`), which are kept apart (``adapters`` imports ``peft_ia3``).

The config file name, the error every failed check raises, and the safetensors read (nothing is
unpickled)."""

from __future__ import annotations

import os

import torch

CONFIG_NAME = "adapter_config.json"


def bad(path: str, msg: str) -> ValueError:
    """The ValueError of a failed check of file ``path``: load_adapter changes nothing before its checks pass."""
    return ValueError(f"red_kernels.load_adapter: {path}: {msg}; the model was left unchanged")


def read_safetensors(directory: str | os.PathLike, weights: str, hint: str = "") -> tuple[str, dict[str, torch.Tensor]]:
    """``(path, tensors)`` of the file ``weights`` in ``directory``; ValueError if it is absent (``hint``
    appended to the message) or not a readable safetensors file."""
    from safetensors.torch import load_file

    path = os.path.join(os.fspath(directory), weights)
    if not os.path.isfile(path):
        raise ValueError(
            f"red_kernels.load_adapter: no {weights} in {os.fspath(directory)!r}{hint}; the model was left unchanged"
        )
    try:
        return path, load_file(path)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for any damage
        raise bad(path, f"not a readable safetensors file (truncated, empty or another format: {exc})") from None
