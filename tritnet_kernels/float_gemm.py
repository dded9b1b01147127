"""Float matrix products that a captured CUDA graph can hold: `matmul(a, b, out=None)`.

On NumPy arrays this is np.matmul. On CuPy arrays it calls cuBLAS's
cublasGemmStridedBatchedEx itself, through ctypes, on a handle of its own, instead of going
through cupy.matmul: CuPy refuses every cuBLAS call while a stream is capturing ("calling
cuBLAS API during stream capture is currently unsupported"), because a captured cuBLAS call
must not allocate its workspace. This handle has a workspace set once (cublasSetWorkspace),
so its GEMMs capture like any kernel. The same path runs outside capture, so a replayed
graph computes what the eager step computed, bit for bit.

`matmul_gathered(a, b, a_index, b_index)` multiplies matrices picked by index arrays that
stay on the device (out[i] = a[a_index[i]] @ b[b_index[i]]), through cublasGemmBatchedEx
with pointer arrays computed on the device: a grouped product whose grouping the host never
reads (the experts of a mixture, each on its own tiles of rows).

Semantics: np.matmul's for a (..., M, K) and b (..., K, N) with batch dimensions that
broadcast, both float32 or both float64. An operand's matrices may be row- or column-major
(a transposed view costs nothing); other layouts are copied first. Other dtypes go to
cupy.matmul (not capturable). `out` may be any view of the right shape and dtype (one not
C-contiguous receives a copy). Float32 products use TF32 tensor cores after
`set_precision("tf32")`, which tritnet.backend.set_matmul_precision calls.
"""

from __future__ import annotations

import ctypes
import math

import numpy as np

try:  # CuPy is optional: CPU machines run without it.
    import cupy
except Exception:  # pragma: no cover - depends on the machine
    cupy = None

__all__ = ["matmul", "matmul_gathered", "set_precision"]

_OP_N, _OP_T = 0, 1
_CUDA_R_32F, _CUDA_R_64F = 0, 1
_COMPUTE_32F, _COMPUTE_32F_FAST_TF32, _COMPUTE_64F = 68, 77, 70
_GEMM_DEFAULT = -1
_WORKSPACE_BYTES = 32 << 20    # what cuBLAS asks for on Hopper (its docs, "cuBLAS Workspace")

_precision = "fp32"
_lib = None
_handles = {}                  # device id -> _Handle


def set_precision(mode: str) -> None:
    """"tf32" or "fp32": the compute type of float32 products on the GPU."""
    global _precision
    if mode not in ("fp32", "tf32"):
        raise ValueError(f"float_gemm.set_precision: {mode!r}; expected 'fp32' or 'tf32'")
    _precision = mode


def _cublas():
    """The libcublas CuPy already loaded (found in the process's maps: same library, same
    version, whatever the install layout)."""
    global _lib
    if _lib is None:
        cupy.cuda.device.get_cublas_handle()   # makes CuPy load it
        path = None
        with open("/proc/self/maps") as maps:
            for line in maps:
                name = line.rsplit(None, 1)[-1]
                if "/libcublas.so" in name:
                    path = name
                    break
        lib = ctypes.CDLL(path or "libcublas.so")
        lib.cublasCreate_v2.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
        lib.cublasSetStream_v2.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        lib.cublasSetWorkspace_v2.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
        i, ll, p = ctypes.c_int, ctypes.c_longlong, ctypes.c_void_p
        lib.cublasGemmStridedBatchedEx.argtypes = [
            p, i, i, i, i, i, p, p, i, i, ll, p, i, i, ll, p, p, i, i, ll, i, i, i]
        lib.cublasGemmBatchedEx.argtypes = [
            p, i, i, i, i, i, p, p, i, i, p, i, i, p, p, i, i, i, i, i]
        _lib = lib
    return _lib


class _Handle:
    """A cuBLAS handle of one device with its own workspace; knows its current stream."""

    def __init__(self):
        lib = _cublas()
        self.ptr = ctypes.c_void_p()
        _check(lib.cublasCreate_v2(ctypes.byref(self.ptr)), "cublasCreate")
        self.workspace = cupy.empty(_WORKSPACE_BYTES, dtype=np.uint8)   # kept for good
        self.stream = None

    def on(self, stream_ptr: int):
        if stream_ptr != self.stream:
            lib = _cublas()
            _check(lib.cublasSetStream_v2(self.ptr, ctypes.c_void_p(stream_ptr)), "cublasSetStream")
            # setting the stream drops the workspace back to cuBLAS's own pool: set it again
            _check(lib.cublasSetWorkspace_v2(self.ptr, ctypes.c_void_p(self.workspace.data.ptr),
                                             _WORKSPACE_BYTES), "cublasSetWorkspace")
            self.stream = stream_ptr
        return self.ptr


def _check(status, what):
    if status != 0:
        raise RuntimeError(f"gemm: {what} failed with cuBLAS status {status}")


def _handle():
    device = cupy.cuda.runtime.getDevice()
    handle = _handles.get(device)
    if handle is None:
        handle = _handles[device] = _Handle()
    return handle.on(cupy.cuda.get_current_stream().ptr)


def _matrix(x):
    """(x or a copy, op, ld, batch stride) of x (batch..., R, C) for cuBLAS's column-major
    view: a row-major matrix is its transpose there (op N gives back x's transpose, what the
    swapped product needs), a column-major one is itself (op T)."""
    item = x.itemsize
    R, C = x.shape[-2:]
    sr, sc = x.strides[-2] // item, x.strides[-1] // item
    for _ in range(2):
        batch_stride = _batch_stride(x)
        if batch_stride is not None:
            if sc == 1 and sr >= max(C, 1) and x.strides[-2] % item == 0:
                return x, _OP_N, max(sr, 1), batch_stride
            if sr == 1 and sc >= max(R, 1) and x.strides[-1] % item == 0:
                return x, _OP_T, max(sc, 1), batch_stride
        x = cupy.ascontiguousarray(x)
        sr, sc = C, 1
    raise AssertionError("unreachable: a C-contiguous array is row-major")


def _batch_stride(x):
    """One element stride that walks x's (broadcast) batch dimensions in C order, or None."""
    dims = [(n, s // x.itemsize) for n, s in zip(x.shape[:-2], x.strides[:-2]) if n != 1]
    if not dims:
        return 0
    if all(s == 0 for _, s in dims):
        return 0
    for (n0, s0), (n1, s1) in zip(dims, dims[1:]):
        if s0 != n1 * s1:
            return None
    return dims[-1][1]


def matmul(a, b, out=None, *, accumulate=False):
    """np.matmul(a, b) for NumPy arrays; on CuPy arrays, cuBLAS on a capturable handle (the
    module doc). accumulate=True adds the product into `out` (required, C-contiguous) instead
    of overwriting it: cuBLAS's beta = 1, no separate addition pass."""
    if accumulate and (out is None or not out.flags.c_contiguous):
        raise ValueError("matmul: accumulate=True adds into out: pass a C-contiguous out")
    if not (cupy is not None and isinstance(a, cupy.ndarray)):
        if accumulate:
            out += np.matmul(a, b)
            return out
        return np.matmul(a, b, out=out)
    if (a.dtype != b.dtype or a.dtype not in (np.float32, np.float64) or a.ndim < 2
            or b.ndim < 2):
        if accumulate:
            out += cupy.matmul(a, b)
            return out
        return cupy.matmul(a, b, out=out)
    M, K = a.shape[-2:]
    K2, N = b.shape[-2:]
    if K != K2:
        raise ValueError(f"matmul: shapes {tuple(a.shape)} and {tuple(b.shape)} do not fit "
                         f"(the contracted dimensions are {K} and {K2})")
    batch = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    shape = batch + (M, N)
    if out is not None and (out.shape != shape or out.dtype != a.dtype):
        raise ValueError(f"matmul: out has shape {tuple(out.shape)} ({out.dtype}), expected "
                         f"{shape} ({a.dtype})")
    if out is not None and not out.flags.c_contiguous:
        out[...] = matmul(a, b)   # cuBLAS writes C-contiguous results only
        return out
    if out is None:
        out = cupy.empty(shape, a.dtype)
    count = math.prod(batch)
    if out.size == 0 or (K == 0 and accumulate):
        return out
    if K == 0:
        out.fill(0)
        return out
    a = cupy.broadcast_to(a, batch + (M, K))
    b = cupy.broadcast_to(b, batch + (K, N))
    a, op_a, lda, stride_a = _matrix(a)
    b, op_b, ldb, stride_b = _matrix(b)
    kind, compute, one, zero = _precision_of(a.dtype)
    beta = one if accumulate else zero
    # row-major out = a·b is column-major outᵀ = bᵀ·aᵀ: b's matrix comes first
    status = _cublas().cublasGemmStridedBatchedEx(
        _handle(), op_b, op_a, N, M, K, ctypes.addressof(one),
        b.data.ptr, kind, ldb, stride_b, a.data.ptr, kind, lda, stride_a,
        ctypes.addressof(beta), out.data.ptr, kind, N, M * N, count, compute, _GEMM_DEFAULT)
    _check(status, "cublasGemmStridedBatchedEx")
    return out


def _precision_of(dtype):
    """(cuBLAS data type, compute type, alpha, beta) of a float32 or float64 product."""
    if dtype == np.float64:
        return _CUDA_R_64F, _COMPUTE_64F, ctypes.c_double(1.0), ctypes.c_double(0.0)
    compute = _COMPUTE_32F_FAST_TF32 if _precision == "tf32" else _COMPUTE_32F
    return _CUDA_R_32F, compute, ctypes.c_float(1.0), ctypes.c_float(0.0)


def matmul_gathered(a, b, a_index, b_index, out=None):
    """out[i] = a[a_index[i]] @ b[b_index[i]] for a (na, M, K), b (nb, K, N) and integer
    index arrays of one length n: out (n, M, N). No index is read on the host: on CuPy
    arrays the matrices' addresses are computed on the device and cuBLAS reads them there
    (cublasGemmBatchedEx), so the call captures into a CUDA graph like `matmul`. The indices
    must be in range (not checked: that would read them). Matrices may be row- or
    column-major as in `matmul`; float32 (TF32 per `set_precision`) or float64."""
    if a.ndim != 3 or b.ndim != 3 or a.shape[2] != b.shape[1]:
        raise ValueError(f"matmul_gathered: shapes {tuple(a.shape)} and {tuple(b.shape)} do not "
                         "fit: expected a (na, M, K) and b (nb, K, N)")
    if a_index.shape != b_index.shape or a_index.ndim != 1:
        raise ValueError(f"matmul_gathered: a_index {tuple(a_index.shape)} and b_index "
                         f"{tuple(b_index.shape)}: expected two index arrays of one length")
    if a.dtype != b.dtype or a.dtype not in (np.float32, np.float64):
        raise TypeError(f"matmul_gathered: dtypes {a.dtype} and {b.dtype}; expected both "
                        "float32 or both float64")
    n, (M, K), N = a_index.shape[0], a.shape[1:], b.shape[2]
    if out is not None and (out.shape != (n, M, N) or out.dtype != a.dtype
                            or not out.flags.c_contiguous):
        raise ValueError(f"matmul_gathered: out has shape {tuple(out.shape)} ({out.dtype}), "
                         f"expected C-contiguous {(n, M, N)} ({a.dtype})")
    if not (cupy is not None and isinstance(a, cupy.ndarray)):
        return np.matmul(a[a_index], b[b_index], out=out)
    if out is None:
        out = cupy.empty((n, M, N), a.dtype)
    if out.size == 0:
        return out
    if K == 0:
        out.fill(0)
        return out
    a, op_a, lda, stride_a = _matrix(a)
    b, op_b, ldb, stride_b = _matrix(b)
    item = a.itemsize
    # the addresses of each product's matrices, computed where the indices are
    ptrs = cupy.empty((3, n), np.uint64)
    ptrs[0] = b_index.astype(np.uint64) * np.uint64(stride_b * item) + np.uint64(b.data.ptr)
    ptrs[1] = a_index.astype(np.uint64) * np.uint64(stride_a * item) + np.uint64(a.data.ptr)
    ptrs[2] = cupy.arange(n, dtype=np.uint64) * np.uint64(M * N * item) + np.uint64(out.data.ptr)
    kind, compute, one, zero = _precision_of(a.dtype)
    # row-major out = a·b is column-major outᵀ = bᵀ·aᵀ: b's matrix comes first
    status = _cublas().cublasGemmBatchedEx(
        _handle(), op_b, op_a, N, M, K, ctypes.addressof(one),
        ptrs[0].data.ptr, kind, ldb, ptrs[1].data.ptr, kind, lda,
        ctypes.addressof(zero), ptrs[2].data.ptr, kind, N, n, compute, _GEMM_DEFAULT)
    _check(status, "cublasGemmBatchedEx")
    return out
