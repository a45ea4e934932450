"""One module per op: reference, custom-op registration, autograd and backend dispatch."""

from red_kernels.ops.red_edit import red_edit, red_edit_reference

__all__ = ["red_edit", "red_edit_reference"]
