"""One module per op: reference, custom-op registration, autograd and backend dispatch."""

from red_kernels.ops.gathered_para_vector_gen import gathered_para_vector_gen, gathered_para_vector_gen_reference
from red_kernels.ops.gathered_red_edit import gathered_red_edit, gathered_red_edit_reference
from red_kernels.ops.para_vector_gen import para_vector_gen, para_vector_gen_reference
from red_kernels.ops.pooling import last_token_index
from red_kernels.ops.red_edit import red_edit, red_edit_reference
from red_kernels.ops.seq_scale import seq_scale, seq_scale_reference

__all__ = [
    "gathered_para_vector_gen",
    "gathered_para_vector_gen_reference",
    "gathered_red_edit",
    "gathered_red_edit_reference",
    "last_token_index",
    "para_vector_gen",
    "para_vector_gen_reference",
    "red_edit",
    "red_edit_reference",
    "seq_scale",
    "seq_scale_reference",
]
