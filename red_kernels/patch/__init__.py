"""Patch Hugging Face models with RED: targets per architecture, patch / unpatch / merge."""

from red_kernels.patch.core import (
    PatchState,
    TrainableParameters,
    merge_model,
    patch_model,
    patch_state,
    trainable_parameters,
    unpatch_model,
)
from red_kernels.patch.targets import ARCHITECTURES, ArchSpec

__all__ = [
    "ARCHITECTURES",
    "ArchSpec",
    "PatchState",
    "TrainableParameters",
    "merge_model",
    "patch_model",
    "patch_state",
    "trainable_parameters",
    "unpatch_model",
]
