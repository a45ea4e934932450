"""One module per op: reference, custom-op registration, autograd and backend dispatch."""

from red_kernels.ops.gathered_para_vector_gen import gathered_para_vector_gen, gathered_para_vector_gen_reference
from red_kernels.ops.para_vector_gen import para_vector_gen, para_vector_gen_reference
from red_kernels.ops.red_edit import red_edit, red_edit_reference

__all__ = [
    "gathered_para_vector_gen",
    "gathered_para_vector_gen_reference",
    "para_vector_gen",
    "para_vector_gen_reference",
    "red_edit",
    "red_edit_reference",
]
