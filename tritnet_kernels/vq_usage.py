"""Code usage counts of a VQ codebook: int16 per code, saturating at USAGE_MAX.

`count_usage(indices, usage)` adds one per chosen code. A CUDA kernel, its Numba CPU twin and a
NumPy reference, as every kernel here.
"""

from . import _numba_compat  # noqa: F401  (must precede numba.cuda)

import numba
import numpy as np
from numba import cuda

from ._common import check_array, check_indices
from ._launch import launch, on_device, target, xp_of
from ._vq_rules import grid_cap

__all__ = [
    "count_usage",
    "count_usage_reference",
    "USAGE_MAX",
]


USAGE_MAX = 32767


# Two passes: int32 atomics tally each chosen code, then the thread that takes a code's tally
# (atomic exchange with 0, so exactly one thread per code) adds it to the int16 counter with
# saturation -- the same result as adding 1 at a time. (A compare-and-swap loop on the 32-bit
# word that holds two int16 counters serialised every query that chose a popular code: 3 ms
# a call on the small preset's 8192 queries early in training, H200.)


@numba.njit(cache=True)
def _tally_cpu(indices, tally):
    for i in range(indices.shape[0]):
        tally[indices[i]] += 1


@cuda.jit(cache=True)
def _tally_cuda(indices, tally):
    for i in range(cuda.grid(1), indices.shape[0], cuda.gridsize(1)):
        cuda.atomic.add(tally, indices[i], 1)


@numba.njit(cache=True)
def _saturating_add(count, n):
    return np.int16(min(np.int64(count) + n, USAGE_MAX))


_saturating_add_dev = on_device(_saturating_add)


@numba.njit(cache=True)
def _apply_tally_cpu(indices, tally, usage):
    for i in range(indices.shape[0]):
        c = indices[i]
        n = tally[c]
        tally[c] = 0
        if n:
            usage[c] = _saturating_add(usage[c], n)


@cuda.jit(cache=True)
def _apply_tally_cuda(indices, tally, usage):
    for i in range(cuda.grid(1), indices.shape[0], cuda.gridsize(1)):
        c = indices[i]
        n = cuda.atomic.exch(tally, c, 0)
        if n:
            usage[c] = _saturating_add_dev(usage[c], n)


def count_usage(indices, usage, *, check=True):
    """usage[c] += (number of times c occurs in indices), saturating at 32767, in place.

    indices int32/int64 (n,) in [0, K); usage int16 (K,) C-contiguous, on the same device.
    Returns usage. `check=False` skips the index range check (a host sync on the GPU); pass
    it for nearest_code's own output. Holds a transient int32 (K,) tally.
    """
    op = "count_usage"
    dev = target(indices, usage, op=op)
    check_array(op, "usage", usage, np.int16, ndim=1, writeable=True)
    K = usage.shape[0]
    check_indices(op, "indices", indices, K, check, what="code indices")
    if indices.shape[0] == 0 or K == 0:
        return usage
    tally = xp_of(usage).zeros(K, dtype=np.int32)
    if dev == "cpu":
        _tally_cpu(indices, tally)
        _apply_tally_cpu(indices, tally, usage)
    else:
        blocks = max(1, min(grid_cap(), -(-indices.shape[0] // 256)))
        launch(_tally_cuda, blocks, 256, indices, tally)
        launch(_apply_tally_cuda, blocks, 256, indices, tally, usage)
    return usage


def count_usage_reference(indices, usage):
    counts = np.bincount(np.asarray(indices, dtype=np.int64), minlength=usage.shape[0])
    return np.minimum(usage.astype(np.int64) + counts, USAGE_MAX).astype(np.int16)
