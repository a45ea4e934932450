"""red_kernels: fused kernels for representation-editing fine-tuning (RED, PARA, multi-tenant).

Importing this package needs neither Triton, nor the compiled extension, nor CUDA, and never
initialises CUDA: backends are probed lazily, when an op first runs or :func:`backends` is called.
"""

from red_kernels import nn
from red_kernels._backend import BackendInfo, backend_info, backends, use_backend
from red_kernels.adapters import load_adapter, save_adapter
from red_kernels.ops import (
    gathered_para_vector_gen,
    gathered_para_vector_gen_reference,
    gathered_red_edit,
    gathered_red_edit_reference,
    last_token_index,
    para_vector_gen,
    para_vector_gen_reference,
    red_edit,
    red_edit_reference,
    seq_scale,
    seq_scale_reference,
)
from red_kernels.patch import (
    adapter_names,
    adapter_parameters,
    delete_adapter,
    disable_adapter,
    merge_model,
    patch_model,
    prompt_lengths,
    set_adapter,
    tenants,
    trainable_parameters,
    unpatch_model,
)

__version__ = "0.1.0"

__all__ = [
    "BackendInfo",
    "__version__",
    "adapter_names",
    "adapter_parameters",
    "delete_adapter",
    "disable_adapter",
    "prompt_lengths",
    "set_adapter",
    "tenants",
    "backend_info",
    "backends",
    "gathered_para_vector_gen",
    "gathered_para_vector_gen_reference",
    "gathered_red_edit",
    "gathered_red_edit_reference",
    "last_token_index",
    "load_adapter",
    "merge_model",
    "nn",
    "para_vector_gen",
    "para_vector_gen_reference",
    "patch_model",
    "red_edit",
    "red_edit_reference",
    "save_adapter",
    "seq_scale",
    "seq_scale_reference",
    "trainable_parameters",
    "unpatch_model",
    "use_backend",
]
