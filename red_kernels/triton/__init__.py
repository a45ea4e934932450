"""Triton kernels, one module per op family. Imported lazily by the ops: importing red_kernels must
not import triton. Set TRITON_INTERPRET=1 before the first import of triton to run them on CPU."""
