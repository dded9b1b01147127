"""Numba kernels for tritnet: each CUDA kernel beside its CPU twin and a NumPy reference.

This package knows nothing of Tensors or autograd; it takes NumPy or CuPy arrays.
Modules by job: packing, matmul, float_gemm, update, sparse_rows, vq_search, vq_route,
vq_usage, code_graph, attention; shared helpers in _common.
"""

from . import _numba_compat  # noqa: F401  (must precede any numba.cuda import)
