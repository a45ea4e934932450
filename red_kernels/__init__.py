"""red_kernels: fused kernels for representation-editing fine-tuning (RED, PARA, multi-tenant).

Importing this package needs neither Triton, nor the compiled extension, nor CUDA, and never
initialises CUDA: backends are probed lazily, when an op first runs or :func:`backends` is called.
"""

from red_kernels import nn
from red_kernels._backend import BackendInfo, backend_info, backends, use_backend
from red_kernels.ops import (
    gathered_para_vector_gen,
    gathered_para_vector_gen_reference,
    para_vector_gen,
    para_vector_gen_reference,
    red_edit,
    red_edit_reference,
)

__version__ = "0.1.0"

__all__ = [
    "BackendInfo",
    "__version__",
    "backend_info",
    "backends",
    "gathered_para_vector_gen",
    "gathered_para_vector_gen_reference",
    "nn",
    "para_vector_gen",
    "para_vector_gen_reference",
    "red_edit",
    "red_edit_reference",
    "use_backend",
]
