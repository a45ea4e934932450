"""Drop-in ``torch.nn`` modules built on the red_kernels ops."""

from red_kernels.nn.para import PARAVectorGenerator
from red_kernels.nn.red import REDEdit, REDWrapped

__all__ = ["PARAVectorGenerator", "REDEdit", "REDWrapped"]
