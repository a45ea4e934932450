"""Patch Hugging Face models with RED, RED+, IA3 and PARA adapters: targets per architecture, named
adapters, per-row tenants, patch / unpatch / merge.

Files, one concern each: ``targets`` (per-architecture tables), ``methods`` (what each method
attaches where), ``sites`` (the hooks that apply adapters), ``context`` (the per-forward context:
rows' adapters, pooled tokens, decode vectors), ``core`` (patch / unpatch / named adapters),
``merge`` (folding RED and IA3 into the weights)."""

from red_kernels.patch.context import disable_adapter, prompt_lengths, tenants
from red_kernels.patch.core import (
    PatchState,
    TrainableParameters,
    adapter_names,
    adapter_parameters,
    delete_adapter,
    patch_model,
    patch_state,
    set_adapter,
    trainable_parameters,
    unpatch_model,
)
from red_kernels.patch.merge import merge_model
from red_kernels.patch.targets import ARCHITECTURES, ArchSpec

__all__ = [
    "ARCHITECTURES",
    "ArchSpec",
    "PatchState",
    "TrainableParameters",
    "adapter_names",
    "adapter_parameters",
    "delete_adapter",
    "disable_adapter",
    "merge_model",
    "patch_model",
    "patch_state",
    "prompt_lengths",
    "set_adapter",
    "tenants",
    "trainable_parameters",
    "unpatch_model",
]
