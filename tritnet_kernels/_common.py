"""Helpers every kernel module shares: argument checks, launch geometry, the counter hash.

One copy of each; a kernel module imports what it needs from here and never another kernel
module's private names. Everything a caller can get wrong is raised by these checks before any
allocation or launch, so a bad call leaves every array untouched.
"""

from . import _numba_compat  # noqa: F401  (must precede numba.cuda)

import numba
import numpy as np
from numba import cuda

from ._launch import simulator, xp_of

# --------------------------------------------------------------------------------------------
# Launch geometry.

MAX_BLOCKS = 4096
SIMULATOR_MAX_BLOCKS = 2   # the simulator runs each thread as a Python thread: tiny grids


def blocks(work_items, per_block):
    """Blocks of a launch that covers `work_items` at `per_block` a block: every kernel strides
    its grid, so any grid is correct, and a bounded one bounds the per-block atomics."""
    cap = SIMULATOR_MAX_BLOCKS if simulator() else MAX_BLOCKS
    return max(1, min(cap, -(-work_items // per_block)))


@cuda.jit(device=True)
def block_tree_sum(buf, tid, width):
    """buf[0] = the sum of buf[:width] (shared memory, width a power of two), by halving in
    a fixed order. Every thread of the block calls it, after a syncthreads."""
    half = width // 2
    while half > 0:
        if tid < half:
            buf[tid] += buf[tid + half]
        cuda.syncthreads()
        half //= 2


# --------------------------------------------------------------------------------------------
# Counter-based random bits: splitmix64 (Steele, Lea & Flood 2014), the golden-ratio increment
# and the finaliser. A draw is a pure function of (key, counter), identical on every device.

GOLDEN = np.uint64(0x9E3779B97F4A7C15)
MIX1 = np.uint64(0xBF58476D1CE4E5B9)
MIX2 = np.uint64(0x94D049BB133111EB)
MASK64 = (1 << 64) - 1


@numba.njit(cache=True)
def mix64(z):
    z = (z ^ (z >> np.uint64(30))) * MIX1
    z = (z ^ (z >> np.uint64(27))) * MIX2
    return z ^ (z >> np.uint64(31))


def mix64_reference(z):
    """mix64 on uint64 arrays (whose arithmetic wraps silently, as the kernels' does)."""
    z = (z ^ (z >> np.uint64(30))) * MIX1
    z = (z ^ (z >> np.uint64(27))) * MIX2
    return z ^ (z >> np.uint64(31))


def stream_key(seed: int) -> np.uint64:
    """Premix the seed on the host so that nearby seeds (step, step+1) give unrelated streams."""
    z = (seed + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return np.uint64(z ^ (z >> 31))


# --------------------------------------------------------------------------------------------
# Argument checks.


def check_array(op, name, a, dtype, ndim=None, shape=None, writeable=False):
    """`a` is a NumPy or CuPy array of `dtype` (or one of a tuple of dtypes), C-contiguous,
    of `ndim` dimensions or of `shape` when given, and writeable when the kernel writes it.

    A non-contiguous array is an error rather than a silent copy: a copy would hide a
    full-size allocation and an extra pass on the hot path, and the caller can usually
    produce contiguous data."""
    if not (hasattr(a, "dtype") and hasattr(a, "shape") and hasattr(a, "flags")):
        raise TypeError(f"{op}: {name} must be a NumPy or CuPy array, got {type(a).__name__}")
    dtypes = dtype if isinstance(dtype, tuple) else (dtype,)
    if a.dtype not in dtypes:
        want = " or ".join(np.dtype(d).name for d in dtypes)
        raise TypeError(f"{op}: {name} has dtype {a.dtype}, expected {want}")
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{op}: {name} has shape {tuple(a.shape)}, expected {ndim} dimensions")
    if shape is not None and tuple(a.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} has shape {tuple(a.shape)}, expected {tuple(shape)}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{op}: {name} is not C-contiguous; pass xp.ascontiguousarray({name})")
    if writeable and not getattr(a.flags, "writeable", True):
        raise ValueError(f"{op}: {name} is read-only, but the kernel writes it in place")


def check_int(op, name, value, lo, hi):
    """`value` as an int, if it is an integer (not a bool) in [lo, hi]."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{op}: {name} must be an integer in [{lo}, {hi}], got {value!r}")
    if not lo <= int(value) <= hi:
        raise ValueError(f"{op}: {name} = {int(value)} is out of range, expected {lo}..{hi}")
    return int(value)


def _byte_range(a):
    ptr = a.data.ptr if hasattr(a.data, "ptr") else a.__array_interface__["data"][0]
    return ptr, ptr + a.nbytes


def check_distinct(op, **arrays):
    """In-place kernels read one array while writing another: they must not overlap."""
    items = [(n, _byte_range(a)) for n, a in arrays.items() if a is not None and a.nbytes]
    for k, (name_a, (a0, a1)) in enumerate(items):
        for name_b, (b0, b1) in items[k + 1:]:
            if a0 < b1 and b0 < a1:
                raise ValueError(f"{op}: {name_a} and {name_b} share memory; the kernel updates "
                                 "them in place and needs separate arrays")


def check_indices(op, name, idx, limit, check, what="rows"):
    """idx: int32/int64, 1-D, C-contiguous; with `check`, every value in [0, limit)."""
    if not (hasattr(idx, "dtype") and hasattr(idx, "shape") and hasattr(idx, "flags")):
        raise TypeError(f"{op}: {name} must be a NumPy or CuPy array of int32 or int64, got "
                        f"{type(idx).__name__}")
    if idx.dtype not in (np.int32, np.int64):
        raise TypeError(f"{op}: {name} has dtype {idx.dtype}, expected int32 or int64")
    if idx.ndim != 1:
        raise ValueError(f"{op}: {name} has shape {tuple(idx.shape)}, expected a 1-D array")
    if not idx.flags.c_contiguous:
        raise ValueError(f"{op}: {name} is not C-contiguous; pass xp.ascontiguousarray({name})")
    if check and idx.size:
        xp = xp_of(idx)
        lo, hi = (int(v) for v in xp.stack([idx.min().astype(np.int64),
                                            idx.max().astype(np.int64)]).tolist())
        if lo < 0 or hi >= limit:
            bad_value = lo if lo < 0 else hi
            pos = int(xp.argmax(idx == bad_value))
            raise ValueError(f"{op}: {name}[{pos}] = {bad_value} is out of range; expected "
                             f"{what} in [0, {limit})")
