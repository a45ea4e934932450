"""One module per op: reference, custom-op registration, autograd and backend dispatch."""

from red_kernels.ops.gathered_red_edit import gathered_red_edit, gathered_red_edit_reference
from red_kernels.ops.red_edit import red_edit, red_edit_reference

__all__ = ["gathered_red_edit", "gathered_red_edit_reference", "red_edit", "red_edit_reference"]
