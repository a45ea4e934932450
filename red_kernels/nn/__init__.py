"""Drop-in modules built on the red_kernels ops."""

from red_kernels.nn.para import PARAVectorGenerator

__all__ = ["PARAVectorGenerator"]
