"""Sparse row access to a large ternary table (docs/update-rule.md#sparse-tables).

A table of `rows` ternary rows of width `cols` is the integer state
    T_packed uint32 (rows, 2G) bitplane32, G = ceil(cols/32)   s_r = 2 ** (E[r] / 8)
    E        int8   (rows,)
    T_accum  int8   (rows, cols), E_accum int8 (rows,)          (training state)
and a training step touches only the rows a batch used:

    T_packed = random_table(xp.empty((rows, 2G), uint32), cols, seed)   # packed-first init
    y        = gather_rows(T_packed, E, indices, cols)                  # forward
    rows_u, inverse, order, offsets, u = unique_rows(indices)           # backward ...
    G_u      = segment_sum_rows(gy, inverse, len(rows_u), segments=(order, offsets))
    (quantise G_u and its exponent gradient to int8: tritnet_kernels.update.quantize_grad)
    sparse_ternary_update(T_packed, T_accum, E, E_accum, rows_u, grad_q_u, grad_E_q_u, ...)

The backward's arrays have len(indices) rows whatever the number u of distinct rows (on the
device, never copied to the host): rows_u ends in -1 padding, which the sum leaves at 0 and
the update skips. So a step makes no host sync and has the same shapes every time.

Every job is a CUDA kernel (`_*_cuda`), a Numba CPU twin with the same argument list
(`_*_cpu`) and a NumPy reference (`*_reference`) that the tests trust. The public wrappers
validate everything a caller can get wrong (dtypes, shapes, contiguity, index ranges) before
anything is allocated or launched, so a failing call leaves every array as it was.

Index checks on CuPy arrays cost one small reduction and a host sync; callers that pass indices
they produced themselves (nearest_code's output, unique_rows' output) may pass `check=False`.
"""

from . import _numba_compat  # noqa: F401  (must precede numba.cuda)

import numba
import numpy as np
from numba import cuda

from ._common import (GOLDEN, blocks, check_array, check_distinct, check_indices, check_int,
                      mix64, mix64_reference, stream_key)
from ._launch import launch, target, xp_of
from ._update_rules import (ACCUM_MAX, E_MAX, E_MIN, exponent_step, exponent_step_dev,
                            rule_reference, trit_group_step, trit_group_step_dev)
from .packing import pack_trits_reference, unpack_trits_reference
from .update import SCALE_OF_E  # re-exported: the table of s = f(E)

__all__ = [
    "SCALE_OF_E",
    "random_table",
    "random_table_reference",
    "gather_rows",
    "gather_rows_reference",
    "unique_rows",
    "segment_sum_rows",
    "ngram_rows",
    "segment_sum_rows_reference",
    "segment_sum_sorted_reference",
    "sparse_ternary_update",
    "sparse_ternary_update_reference",
]


_THREADS = 256
_WARPS = _THREADS // 32
_M32 = np.uint64(0xFFFFFFFF)


# --------------------------------------------------------------------------------------------
# Validation shared by the wrappers.


def _check_strictly_increasing(op, name, idx):
    """One comparison pass: the sparse update needs each row once (xp.unique's output)."""
    if idx.size < 2:
        return
    xp = xp_of(idx)
    bad = xp.flatnonzero(idx[1:] <= idx[:-1])
    if bad.size:
        k = int(bad[0])
        raise ValueError(f"{op}: {name} must be strictly increasing (each row once, as "
                         f"xp.unique or unique_rows returns it), but {name}[{k}] = "
                         f"{int(idx[k])} and {name}[{k + 1}] = {int(idx[k + 1])}")


def _check_table(op, T_packed, cols, E=None, writeable=False):
    check_array(op, "T_packed", T_packed, np.uint32, ndim=2, writeable=writeable)
    cols = check_int(op, "cols", cols, 1, 1 << 30)
    groups = -(-cols // 32)
    if T_packed.shape[1] != 2 * groups:
        raise ValueError(f"{op}: T_packed has shape {tuple(T_packed.shape)}, expected "
                         f"(rows, {2 * groups}) for cols={cols} (bitplane32: a plus and a minus "
                         "word per 32 columns)")
    if E is not None:
        check_array(op, "E", E, np.int8, shape=(T_packed.shape[0],), writeable=writeable)
    return cols


# --------------------------------------------------------------------------------------------
# 1. Packed-first initialisation: uniform random trits straight into bitplane32 words.

_RANDOM_DOC = """
    Trits are uniform on {-1, 0, +1}, a pure function of (seed, row, group): for the 32-trit
    group g of row r,

        h = mix64(key + (r * G + g) * φ),   key = mix64(seed + φ)   (splitmix64, as update.py)
        for b in 0..31:  digit_b = floor(3 * h / 2**64);  h = 3 * h mod 2**64
        t[r, 32 g + b] = digit_b - 1

    i.e. the first 32 base-3 digits of h / 2**64. Each of the 3**32 patterns of a group has
    probability within 1e-4 (relative) of 3**-32, so every trit is uniform to that precision and
    independent of the others. Padding bits (columns >= cols) are zero.
"""


@numba.njit(cache=True)
def _random_group_masks(key, counter, nbits):
    """(plus, minus) masks of one 32-trit group from one 64-bit hash; see _RANDOM_DOC."""
    h = mix64(key + np.uint64(counter) * GOLDEN)
    plus = np.uint64(0)
    minus = np.uint64(0)
    for b in range(nbits):
        # 3*h as a 66-bit number from 32-bit halves: the carry out of 64 bits is the digit.
        lo = (h & _M32) * np.uint64(3)
        hi = (h >> np.uint64(32)) * np.uint64(3) + (lo >> np.uint64(32))
        digit = hi >> np.uint64(32)
        h = ((hi & _M32) << np.uint64(32)) | (lo & _M32)
        if digit == 2:
            plus |= np.uint64(1) << np.uint64(b)
        elif digit == 0:
            minus |= np.uint64(1) << np.uint64(b)
    return np.uint32(plus), np.uint32(minus)


@numba.njit(parallel=True, cache=True)
def _random_table_cpu(T_packed, cols, key):
    groups = T_packed.shape[1] // 2
    for r in numba.prange(T_packed.shape[0]):
        for g in range(groups):
            plus, minus = _random_group_masks(key, r * groups + g, min(32, cols - 32 * g))
            T_packed[r, 2 * g] = plus
            T_packed[r, 2 * g + 1] = minus


@cuda.jit(cache=True)
def _random_table_cuda(T_packed, cols, key):
    groups = T_packed.shape[1] // 2
    tasks = T_packed.shape[0] * groups
    for task in range(cuda.grid(1), tasks, cuda.gridsize(1)):
        r = task // groups
        g = task - r * groups
        plus, minus = _random_group_masks(key, task, min(32, cols - 32 * g))
        T_packed[r, 2 * g] = plus
        T_packed[r, 2 * g + 1] = minus


def random_table(T_packed, cols, seed, *, E=None, exponent=0):
    """Fill T_packed (rows, 2*ceil(cols/32)) uint32 in place with uniform random trits.

    Packed-first (docs/design.md#packed-first): no array of the table's trit shape is ever
    made, only the packed words are written, so a 10M x 64 table costs its 160 MB of words
    and nothing else.
    With `E` (int8 (rows,)), also sets E[:] = exponent. Returns T_packed.
    {doc}
    The CPU twin runs in parallel over rows; the CUDA kernel a thread per (row, group).
    """
    op = "random_table"
    dev = target(T_packed, E, op=op)
    cols = _check_table(op, T_packed, cols, E, writeable=True)
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"{op}: seed must be an integer in [0, 2**64), got {seed!r}")
    if not 0 <= int(seed) < 1 << 64:
        raise ValueError(f"{op}: seed = {int(seed)} is out of range, expected 0 <= seed < 2**64")
    exponent = check_int(op, "exponent", exponent, E_MIN, E_MAX)
    rows = T_packed.shape[0]
    if rows:
        key = stream_key(int(seed))
        if dev == "cpu":
            _random_table_cpu(T_packed, np.int64(cols), key)
        else:
            tasks = rows * (T_packed.shape[1] // 2)
            launch(_random_table_cuda, blocks(tasks, _THREADS), _THREADS, T_packed,
                   np.int64(cols), key)
    if E is not None:
        E.fill(exponent)
    return T_packed


random_table.__doc__ = random_table.__doc__.replace("{doc}", _RANDOM_DOC.strip("\n"))


def random_table_reference(rows, cols, seed):
    """NumPy truth for `random_table`: the trits as int8 (rows, cols) (tests only: it makes
    the full trit array)."""
    groups = -(-cols // 32)
    counter = np.arange(rows * groups, dtype=np.uint64)
    with np.errstate(over="ignore"):
        h = mix64_reference(stream_key(int(seed)) + counter * GOLDEN)
        digits = np.empty((rows * groups, 32), dtype=np.int8)
        for b in range(32):
            lo = (h & _M32) * np.uint64(3)
            hi = (h >> np.uint64(32)) * np.uint64(3) + (lo >> np.uint64(32))
            digits[:, b] = (hi >> np.uint64(32)).astype(np.int8)
            h = ((hi & _M32) << np.uint64(32)) | (lo & _M32)
    T = (digits.reshape(rows, groups * 32) - 1)[:, :cols]
    return np.ascontiguousarray(T)


# --------------------------------------------------------------------------------------------
# 2. Gather: out[i] = s[idx] * T[idx], widened only for the gathered rows.


@numba.njit(parallel=True, cache=True)
def _gather_rows_cpu(T_packed, E, indices, cols, out):
    for i in numba.prange(indices.shape[0]):
        r = indices[i]
        s = SCALE_OF_E[np.int64(E[r]) + 128]
        for g in range((cols + 31) // 32):
            plus = np.int64(T_packed[r, 2 * g])
            minus = np.int64(T_packed[r, 2 * g + 1])
            for b in range(min(32, cols - 32 * g)):
                t = ((plus >> b) & 1) - ((minus >> b) & 1)
                out[i, 32 * g + b] = s * np.float32(t)


@cuda.jit(cache=True)
def _gather_rows_cuda(T_packed, E, indices, cols, out):
    # A warp per gathered row, a lane per column: the two mask words are one broadcast load,
    # the stores of a row are coalesced.
    lane = cuda.threadIdx.x & 31
    i = cuda.blockIdx.x * (cuda.blockDim.x >> 5) + (cuda.threadIdx.x >> 5)
    stride = cuda.gridDim.x * (cuda.blockDim.x >> 5)
    while i < indices.shape[0]:
        r = indices[i]
        s = SCALE_OF_E[np.int64(E[r]) + 128]
        j = lane
        while j < cols:
            g = j >> 5
            t = ((np.int64(T_packed[r, 2 * g]) >> lane) & 1) - ((np.int64(T_packed[r, 2 * g + 1]) >> lane) & 1)
            out[i, j] = s * np.float32(t)
            j += 32
        i += stride


def gather_rows(T_packed, E, indices, cols, out=None, dtype=np.float32, *, check=True):
    """out[i, :] = 2 ** (E[idx] / 8) * T[idx, :cols] for idx = indices[i]; returns out (n, cols).

    T_packed uint32 (rows, 2*ceil(cols/32)), E int8 (rows,), indices int32/int64 (n,) in
    [0, rows) (repeats allowed). dtype float32 (CPU and GPU) or float16 (GPU only; scales below
    2**-14 become fp16 subnormals). The scale is `SCALE_OF_E[E + 128]`, float32(2**(E/8))
    correctly rounded, so each output is exactly 0 or ±s and identical on every device.
    `out`, if given, must be C-contiguous of shape (n, cols) and dtype `dtype`; it is overwritten.
    `check=False` skips the index range check (one reduction and a host sync on the GPU).
    """
    op = "gather_rows"
    dev = target(T_packed, E, indices, out, op=op)
    cols = _check_table(op, T_packed, cols, E)
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float16):
        raise TypeError(f"{op}: dtype {dtype} is not supported, expected float32 (or float16 "
                        "on the GPU)")
    if dtype == np.float16 and dev != "cuda":
        raise TypeError(f"{op}: float16 output is GPU-only (Numba's CPU target has no float16); "
                        "use dtype=float32")
    check_indices(op, "indices", indices, T_packed.shape[0], check)
    n = indices.shape[0]
    if out is None:
        out = xp_of(T_packed).empty((n, cols), dtype=dtype)
    else:
        check_array(op, "out", out, dtype, shape=(n, cols), writeable=True)
    if n == 0:
        return out
    if dev == "cpu":
        _gather_rows_cpu(T_packed, E, indices, np.int64(cols), out)
    else:
        launch(_gather_rows_cuda, blocks(n, _WARPS), _THREADS, T_packed, E, indices,
               np.int64(cols), out)
    return out


def gather_rows_reference(T_packed, E, indices, cols):
    T = unpack_trits_reference(np.asarray(T_packed)[np.asarray(indices)], cols)
    s = np.exp2(np.asarray(E)[np.asarray(indices)].astype(np.float64) / 8).astype(np.float32)
    return (s[:, None] * T.astype(np.float32)).astype(np.float32)


# --------------------------------------------------------------------------------------------
# 3. Backward of a gather: sum the gradient rows of repeated indices.


def unique_rows(indices):
    """The rows a batch touched, and how to sum its gradient deterministically, in arrays
    whose sizes depend only on len(indices): no host sync, and the same shapes every step
    (what a captured CUDA graph needs).

    Returns (rows, inverse, order, offsets, count), for n = len(indices) and u the number of
    distinct values:
        rows     int64 (n,): the sorted distinct values of `indices` (as xp.unique), then
                 n - u entries of -1, the padding that sparse_ternary_update skips;
        inverse  int64 (n,) with rows[inverse] == indices (as xp.unique's return_inverse);
        order    int64 (n,) a stable argsort of indices: positions of row k's occurrences are
                 order[offsets[k]:offsets[k + 1]], in increasing position;
        offsets  int64 (n + 1,), n from offsets[u] on: the padding rows are empty segments;
        count    int64 (1,) on the indices' device: u, for
                 exponent_grad_and_scales(..., rows=count).
    Indices must be >= 0 (not checked here: the forward that read the rows checked them).
    One stable sort (what xp.unique does anyway); pass segments=(order, offsets) to
    segment_sum_rows for a deterministic sum.
    """
    op = "unique_rows"
    check_indices(op, "indices", indices, 0, check=False)
    xp = xp_of(indices)
    n = indices.shape[0]
    order = xp.argsort(indices, kind="stable") if xp is np else xp.argsort(indices)
    order = order.astype(np.int64, copy=False)
    sorted_idx = indices[order].astype(np.int64, copy=False)
    starts = xp.empty(n, dtype=bool)
    if n:
        starts[0] = True
        xp.not_equal(sorted_idx[1:], sorted_idx[:-1], out=starts[1:])
    position = xp.cumsum(starts, dtype=np.int64) - 1   # row of each sorted entry
    inverse = xp.empty(n, dtype=np.int64)
    inverse[order] = position
    # Scatter each row's value and first position to its slot; entries that do not start a
    # row write to the spare slot n instead (sizes stay n, nothing is compacted).
    slot = xp.where(starts, position, n)
    rows = xp.full(n + 1, -1, dtype=np.int64)
    rows[slot] = sorted_idx
    offsets = xp.full(n + 1, n, dtype=np.int64)
    offsets[slot] = xp.arange(n, dtype=np.int64)
    offsets[n] = n
    count = position[n - 1:] + 1 if n else xp.zeros(1, dtype=np.int64)
    return rows[:n], inverse, order, offsets, count


@numba.njit(cache=True)
def _segment_sum_rows_cpu(grad, inverse, out):
    # In order of i: the same additions, in the same order, as np.add.at (bit-identical).
    for i in range(grad.shape[0]):
        u = inverse[i]
        for j in range(grad.shape[1]):
            out[u, j] += grad[i, j]


@cuda.jit(cache=True)
def _segment_sum_rows_cuda(grad, inverse, out):
    # Float atomics: the order in which repeats of one row are added varies from run to run.
    lane = cuda.threadIdx.x & 31
    i = cuda.blockIdx.x * (cuda.blockDim.x >> 5) + (cuda.threadIdx.x >> 5)
    stride = cuda.gridDim.x * (cuda.blockDim.x >> 5)
    cols = grad.shape[1]
    while i < grad.shape[0]:
        u = inverse[i]
        j = lane
        while j < cols:
            cuda.atomic.add(out, (u, j), grad[i, j])
            j += 32
        i += stride


# Segments longer than this are summed in chunks: each chunk's items in increasing position,
# then the chunks' partial sums in order. A hot row (a code that thousands of tokens chose, or
# the padding row every empty edge slot reads) then spreads over many threads instead of one
# warp adding its repeats one after another (2.4 ms a call on the H200, 45% of the small
# preset's GPU time, before this). Rows repeated at most _SEGMENT_CHUNK times keep
# np.add.at's order exactly.
_SEGMENT_CHUNK = 128


@numba.njit(parallel=True, cache=True)
def _segment_sum_sorted_cpu(grad, order, offsets, out):
    # The order of the GPU's two kernels below, so both give bit-identical sums. (A row per
    # iteration needs no chunk bookkeeping: the GPU's chunk_start and partial are not passed.)
    cols = grad.shape[1]
    for u in numba.prange(out.shape[0]):
        p = np.empty(cols, np.float32)
        for j in range(cols):
            out[u, j] = 0.0
        for k0 in range(offsets[u], offsets[u + 1], _SEGMENT_CHUNK):
            for j in range(cols):
                p[j] = 0.0
            for k in range(k0, min(k0 + _SEGMENT_CHUNK, offsets[u + 1])):
                i = order[k]
                for j in range(cols):
                    p[j] += grad[i, j]
            for j in range(cols):
                out[u, j] += p[j]


@cuda.jit(cache=True)
def _segment_chunk_sums_cuda(grad, order, offsets, chunk_start, partial, out):
    # A thread per (chunk, column): chunk c of row r (chunk_start[r] <= c < chunk_start[r + 1])
    # adds its items in increasing position. A row of one chunk writes its sum straight to out
    # (0 + p == p: p starts at +0.0, so it is never -0.0); longer rows leave partial sums for
    # _segment_chunk_totals_cuda.
    cols = grad.shape[1]
    n_rows = out.shape[0]
    n_chunks = chunk_start[n_rows]
    for task in range(cuda.grid(1), partial.shape[0] * cols, cuda.gridsize(1)):
        c = task // cols
        if c >= n_chunks:
            break
        j = task - c * cols
        lo, hi = 0, n_rows - 1           # the row r with chunk_start[r] <= c < chunk_start[r+1]
        while lo < hi:
            mid = (lo + hi + 1) >> 1
            if chunk_start[mid] <= c:
                lo = mid
            else:
                hi = mid - 1
        r = lo
        k0 = offsets[r] + (c - chunk_start[r]) * _SEGMENT_CHUNK
        k1 = min(k0 + _SEGMENT_CHUNK, offsets[r + 1])
        acc = np.float32(0.0)
        for k in range(k0, k1):
            acc += grad[order[k], j]
        if chunk_start[r + 1] - chunk_start[r] == 1:
            out[r, j] = acc
        else:
            partial[c, j] = acc


@cuda.jit(cache=True)
def _segment_chunk_totals_cuda(grad, order, offsets, chunk_start, partial, out):
    # A thread per (row of several chunks or none, column): the partial sums in chunk order;
    # an empty row (the padding of unique_rows) sums to 0.
    cols = out.shape[1]
    for task in range(cuda.grid(1), out.shape[0] * cols, cuda.gridsize(1)):
        r = task // cols
        c0, c1 = chunk_start[r], chunk_start[r + 1]
        if c1 - c0 != 1:
            j = task - r * cols
            acc = np.float32(0.0)
            for c in range(c0, c1):
                acc += partial[c, j]
            out[r, j] = acc


def segment_sum_rows(grad, inverse, n_unique, *, segments=None, out=None, check=True):
    """out[u] = sum of grad[i] over i with inverse[i] == u; returns out float32 (n_unique, cols).

    grad float32 (n, cols); inverse int32/int64 (n,) in [0, n_unique), e.g. from
    xp.unique(indices, return_inverse=True) or `unique_rows`. `out` is overwritten.

    Summation order:
    - with segments=(order, offsets) from `unique_rows` (CPU and GPU, deterministic and
      bit-identical between them): a row's repeats in chunks of _SEGMENT_CHUNK (128), each
      chunk in increasing i, then the chunk sums in order (`segment_sum_sorted_reference`).
      A row repeated at most 128 times is summed exactly as np.add.at sums it; a hotter row
      is spread over its chunks' threads instead of waiting on one long chain of adds.
    - CPU without segments: in increasing i, bit-identical to np.add.at (the reference).
    - GPU without segments: float atomics, one per gradient element; repeats of a row are
      added in an order that varies between runs, so results agree with the CPU only within
      float32 rounding (exactly when no index repeats).
    `check=False` skips the range checks of inverse/order/offsets (a host sync on the GPU).
    """
    op = "segment_sum_rows"
    order, offsets = segments if segments is not None else (None, None)
    dev = target(grad, inverse, order, offsets, out, op=op)
    check_array(op, "grad", grad, np.float32, ndim=2)
    n, cols = grad.shape
    n_unique = check_int(op, "n_unique", n_unique, 0, 1 << 62)
    check_indices(op, "inverse", inverse, n_unique, check, what="unique-row positions")
    if inverse.shape[0] != n:
        raise ValueError(f"{op}: inverse has {inverse.shape[0]} entries, expected {n} (one per "
                         "row of grad)")
    if segments is not None:
        check_array(op, "order", order, np.int64, shape=(n,))
        check_array(op, "offsets", offsets, np.int64, shape=(n_unique + 1,))
        if check:
            check_indices(op, "order", order, n, True, what="positions")
            xp = xp_of(offsets)
            ends = [int(v) for v in xp.stack([offsets[0], offsets[-1]]).tolist()]
            if ends != [0, n] or (n_unique and bool((offsets[1:] < offsets[:-1]).any())):
                raise ValueError(f"{op}: offsets must rise from 0 to {n} (from unique_rows), "
                                 f"got offsets[0] = {ends[0]}, offsets[-1] = {ends[1]}")
    xp = xp_of(grad)
    if out is None:
        out = xp.empty((n_unique, cols), dtype=np.float32)
    else:
        check_array(op, "out", out, np.float32, shape=(n_unique, cols), writeable=True)
        check_distinct(op, grad=grad, out=out)
    if n_unique == 0 or cols == 0:
        return out
    if segments is not None:
        if dev == "cpu":
            _segment_sum_sorted_cpu(grad, order, offsets, out)
            return out
        # chunk_start[r] = chunks before row r, from the row lengths (no host sync: the bound
        # below sizes the partial sums without knowing the exact count)
        chunk_start = xp.zeros(n_unique + 1, dtype=np.int64)
        xp.cumsum((offsets[1:] - offsets[:-1] + (_SEGMENT_CHUNK - 1)) // _SEGMENT_CHUNK,
                  out=chunk_start[1:])
        bound = n_unique + n // _SEGMENT_CHUNK   # >= sum of ceil(length / chunk) over rows
        partial = xp.empty((bound, cols), dtype=np.float32)
        args = (grad, order, offsets, chunk_start, partial, out)
        launch(_segment_chunk_sums_cuda, blocks(bound * cols, _THREADS), _THREADS, *args)
        launch(_segment_chunk_totals_cuda, blocks(n_unique * cols, _THREADS), _THREADS, *args)
        return out
    out.fill(0)
    if n == 0:
        return out
    if dev == "cpu":
        _segment_sum_rows_cpu(grad, inverse, out)
    else:
        launch(_segment_sum_rows_cuda, blocks(n, _WARPS), _THREADS, grad, inverse, out)
    return out


def segment_sum_rows_reference(grad, inverse, n_unique):
    out = np.zeros((n_unique, np.shape(grad)[1]), dtype=np.float32)
    np.add.at(out, np.asarray(inverse), np.asarray(grad, dtype=np.float32))
    return out


def segment_sum_sorted_reference(grad, order, offsets):
    """The chunked order of segment_sum_rows with segments, in NumPy (np.add.at onto one
    slot adds its rows one after another: the serial float32 sums the kernels do)."""
    grad, order, offsets = (np.asarray(a) for a in (grad, order, offsets))
    out = np.zeros((offsets.shape[0] - 1, grad.shape[1]), dtype=np.float32)
    for u in range(out.shape[0]):
        for k0 in range(offsets[u], offsets[u + 1], _SEGMENT_CHUNK):
            chunk = order[k0:min(k0 + _SEGMENT_CHUNK, offsets[u + 1])]
            p = np.zeros((1, grad.shape[1]), dtype=np.float32)
            np.add.at(p, np.zeros(chunk.shape[0], np.int64), grad[chunk].astype(np.float32))
            np.add.at(out, u, p[0])
    return out


# --------------------------------------------------------------------------------------------
# 4. The optimiser step on the touched rows only.

_SPARSE_RULE_DOC = """
    For each listed row r = rows[k] and each trit t = T[r, j] (j < cols), with a = T_accum[r, j]
    and g = grad_q_rows[k, j] (the dense rule of tritnet_kernels.update, same function):

        a = clamp(a + g, -127, 127)
        if   a >=  flip_threshold and t > -1:  t -= 1; a = 0
        elif a <= -flip_threshold and t < +1:  t += 1; a = 0
        elif decay_shift > 0:                  a -= sign(a) * (|a| >> decay_shift)

    (with flip_carry a flip keeps the accumulator's place: a ∓= 2·flip_threshold), and for
    E[r] the same rule (never carried) with E_accum[r], grad_E_q_rows[k], scale_threshold, its own
    decay shift, and E held in [-128, 127]. Rows not listed are not read or written.
"""


@numba.njit(parallel=True, cache=True)
def _sparse_ternary_update_cpu(T_packed, T_accum, E, E_accum, rows, grad_q_rows, grad_E_q_rows,
                               cols, flip_threshold, flip_decay_shift, flip_carry,
                               scale_threshold, scale_decay_shift, counts):
    groups = (cols + 31) // 32
    flips = 0
    steps = 0
    for k in numba.prange(rows.shape[0]):
        # Per-row counts, added to the reductions at the top of the loop body: numba 0.68
        # loses `flips += 1` reductions made inside a branch's nested loop (they read 0).
        row_flips = 0
        r = rows[k]
        if r < 0:   # padding (unique_rows)
            continue
        for g in range(groups):
            row_flips += trit_group_step(T_packed, T_accum, grad_q_rows, r, k, g, cols,
                                         flip_threshold, flip_decay_shift, flip_carry)
        row_steps = exponent_step(E, E_accum, grad_E_q_rows, r, k, scale_threshold,
                                  scale_decay_shift)
        flips += row_flips
        steps += row_steps
    counts[0] += flips
    counts[1] += steps


@cuda.jit(cache=True)
def _sparse_ternary_update_cuda(T_packed, T_accum, E, E_accum, rows, grad_q_rows, grad_E_q_rows,
                                cols, flip_threshold, flip_decay_shift, flip_carry,
                                scale_threshold, scale_decay_shift, counts):
    # A thread per (listed row, 32-trit group): it owns the group's two mask words and its 32
    # accumulator bytes (one 32-byte sector), so no two threads write the same word. The
    # group-0 thread also steps the row's exponent. Counts meet in shared memory, then one
    # global atomic per block.
    block_counts = cuda.shared.array(2, numba.int64)
    if cuda.threadIdx.x == 0:
        block_counts[0] = 0
        block_counts[1] = 0
    cuda.syncthreads()
    groups = (cols + 31) // 32
    flips = 0
    steps = 0
    for task in range(cuda.grid(1), rows.shape[0] * groups, cuda.gridsize(1)):
        k = task // groups
        g = task - k * groups
        r = rows[k]
        if r < 0:   # padding (unique_rows)
            continue
        flips += trit_group_step_dev(T_packed, T_accum, grad_q_rows, r, k, g, cols,
                                     flip_threshold, flip_decay_shift, flip_carry)
        if g == 0:
            steps += exponent_step_dev(E, E_accum, grad_E_q_rows, r, k, scale_threshold,
                                       scale_decay_shift)
    if flips != 0:
        cuda.atomic.add(block_counts, 0, flips)
    if steps != 0:
        cuda.atomic.add(block_counts, 1, steps)
    cuda.syncthreads()
    if cuda.threadIdx.x == 0:
        if block_counts[0] != 0:
            cuda.atomic.add(counts, 0, block_counts[0])
        if block_counts[1] != 0:
            cuda.atomic.add(counts, 1, block_counts[1])


def sparse_ternary_update(T_packed, T_accum, E, E_accum, rows, grad_q_rows, grad_E_q_rows, *,
                          flip_threshold, flip_decay_shift, scale_threshold, scale_decay_shift,
                          flip_carry=False, counts=None, check=True):
    """One optimiser step on the listed rows of a table, trits and exponents in one launch.

    T_packed uint32 (R, 2*ceil(cols/32)), T_accum int8 (R, cols), E, E_accum int8 (R,): the
    table's state, updated in place for the listed rows only. rows int32/int64 (u,): strictly
    increasing (each row once; xp.unique / unique_rows give that), in [0, R), optionally
    followed by -1 entries: padding, skipped (unique_rows pads to a fixed size that way).
    grad_q_rows int8 (u, cols), grad_E_q_rows int8 (u,): the quantised gradients of those rows,
    in the order of `rows` (read, not modified). Thresholds in 1..127, decay shifts in 0..7.
    {rule}
    Returns `counts` int64 (2,) on the table's device: counts[0] += trits changed,
    counts[1] += exponents changed; the wrapper never syncs on it.
    `check=False` skips the range and strictly-increasing checks of `rows` (one host sync on
    the GPU): pass it only for rows that come from unique_rows / xp.unique of valid indices.
    Cost: O(u * cols), independent of R.
    """
    op = "sparse_ternary_update"
    dev = target(T_packed, T_accum, E, E_accum, rows, grad_q_rows, grad_E_q_rows, counts, op=op)
    R, cols = _check_trit_table(op, T_packed, T_accum)
    check_array(op, "E", E, np.int8, shape=(R,), writeable=True)
    check_array(op, "E_accum", E_accum, np.int8, shape=(R,), writeable=True)
    check_indices(op, "rows", rows, 0, check=False)
    u = rows.shape[0]
    check_array(op, "grad_q_rows", grad_q_rows, np.int8, shape=(u, cols))
    check_array(op, "grad_E_q_rows", grad_E_q_rows, np.int8, shape=(u,))
    flip_threshold = check_int(op, "flip_threshold", flip_threshold, 1, ACCUM_MAX)
    flip_decay_shift = check_int(op, "flip_decay_shift", flip_decay_shift, 0, 7)
    scale_threshold = check_int(op, "scale_threshold", scale_threshold, 1, ACCUM_MAX)
    scale_decay_shift = check_int(op, "scale_decay_shift", scale_decay_shift, 0, 7)
    if counts is not None:
        check_array(op, "counts", counts, np.int64, shape=(2,), writeable=True)
    check_distinct(op, T_packed=T_packed, T_accum=T_accum, E=E, E_accum=E_accum,
                   counts=counts)
    if check:
        _check_padded_rows(op, "rows", rows, R)
    if counts is None:
        counts = xp_of(T_accum).zeros(2, dtype=np.int64)
    if u == 0:
        return counts
    args = (T_packed, T_accum, E, E_accum, rows, grad_q_rows, grad_E_q_rows, np.int64(cols),
            np.int64(flip_threshold), np.int64(flip_decay_shift), np.int64(bool(flip_carry)),
            np.int64(scale_threshold), np.int64(scale_decay_shift), counts)
    if dev == "cpu":
        _sparse_ternary_update_cpu(*args)
    else:
        tasks = u * -(-cols // 32)
        launch(_sparse_ternary_update_cuda, blocks(tasks, _THREADS), _THREADS, *args)
    return counts


sparse_ternary_update.__doc__ = sparse_ternary_update.__doc__.replace(
    "{rule}", _SPARSE_RULE_DOC.strip("\n"))


def _check_padded_rows(op, name, rows, R):
    """rows: strictly increasing values in [0, R), then only -1 (padding)."""
    xp = xp_of(rows)
    u = int((rows >= 0).sum())
    pad = rows[u:]
    if pad.size and bool((pad != -1).any()):
        k = u + int(xp.argmax(pad != -1))
        raise ValueError(f"{op}: {name}[{k}] = {int(rows[k])} is out of place; expected rows "
                         f"in [0, {R}), strictly increasing, then only -1 (padding, as "
                         "unique_rows returns them)")
    check_indices(op, name, rows[:u], R, True)
    _check_strictly_increasing(op, name, rows[:u])


def _check_trit_table(op, T_packed, T_accum):
    check_array(op, "T_accum", T_accum, np.int8, ndim=2, writeable=True)
    R, cols = T_accum.shape
    if cols == 0:
        raise ValueError(f"{op}: T_accum has shape {tuple(T_accum.shape)}; a ternary table "
                         "needs at least one column")
    check_array(op, "T_packed", T_packed, np.uint32, ndim=2, writeable=True)
    if T_packed.shape != (R, 2 * -(-cols // 32)):
        raise ValueError(f"{op}: T_packed has shape {tuple(T_packed.shape)}, expected "
                         f"{(R, 2 * -(-cols // 32))} to match T_accum's {R} rows and {cols} "
                         "columns (bitplane32: a plus and a minus word per 32 columns)")
    return R, cols


def sparse_ternary_update_reference(T_packed, T_accum, E, E_accum, rows, grad_q_rows,
                                    grad_E_q_rows, *, flip_threshold, flip_decay_shift,
                                    scale_threshold, scale_decay_shift, flip_carry=False):
    """NumPy truth: returns new (T_packed, T_accum, E, E_accum, counts); inputs untouched.

    E/E_accum/grad_E_q_rows may be None (trits only); T_packed/T_accum/grad_q_rows may be
    None (exponents only). Rows of -1 (padding) and their gradients are skipped.
    """
    rows = np.asarray(rows, dtype=np.int64)
    keep = rows >= 0
    rows = rows[keep]
    grad_q_rows = None if grad_q_rows is None else np.asarray(grad_q_rows)[keep]
    grad_E_q_rows = None if grad_E_q_rows is None else np.asarray(grad_E_q_rows)[keep]
    counts = np.zeros(2, dtype=np.int64)
    T_packed_new = T_accum_new = E_new = E_accum_new = None
    if T_packed is not None:
        cols = T_accum.shape[1]
        T = unpack_trits_reference(T_packed[rows], cols)
        t, a = rule_reference(T, T_accum[rows].astype(np.int64),
                              np.asarray(grad_q_rows, dtype=np.int64), flip_threshold, -1, 1,
                              flip_decay_shift, flip_carry)
        counts[0] = np.count_nonzero(t != T)
        T_packed_new = np.array(T_packed, copy=True)
        T_accum_new = np.array(T_accum, copy=True)
        T_packed_new[rows] = pack_trits_reference(t)
        T_accum_new[rows] = a.astype(np.int8)
    if E is not None:
        e, a = rule_reference(E[rows].astype(np.int64), E_accum[rows].astype(np.int64),
                              np.asarray(grad_E_q_rows, dtype=np.int64), scale_threshold,
                              E_MIN, E_MAX, scale_decay_shift)
        counts[1] = np.count_nonzero(e != E[rows])
        E_new = np.array(E, copy=True)
        E_accum_new = np.array(E_accum, copy=True)
        E_new[rows] = e.astype(np.int8)
        E_accum_new[rows] = a.astype(np.int8)
    return T_packed_new, T_accum_new, E_new, E_accum_new, counts


# --------------------------------------------------------------------------------------------
# Hashed rows of n-grams (the n-gram memory's reads): array arithmetic on NumPy or CuPy, no
# kernel of its own; the same bits on every device.

NGRAM_PRIME = np.uint64(0x100000001B3)   # FNV-1a's 64-bit prime: one token into the hash


def ngram_rows(tokens, previous, orders: int, rows: int):
    """Row ids (B, T, orders - 1) int64 of the n-grams ending at each token, n = 2 … orders:
    row = mix64(hash(the token and the n - 1 before it) ^ n·GOLDEN) mod rows, the hash an
    FNV-style product over token ids + 1. `previous` (B, orders - 1) holds the tokens before
    the window (a pad id where a stream has none: a window's first tokens hash their missing
    history as padding, in training and decoding alike)."""
    xp = xp_of(tokens)
    B, T = tokens.shape
    seq = xp.concatenate([previous, tokens], axis=1).astype(np.uint64) + np.uint64(1)
    h = xp.zeros((B, T), np.uint64)
    ids = xp.empty((B, T, orders - 1), np.int64)
    with np.errstate(over="ignore"):   # the hash wraps by design
        for back in range(orders):          # the token `back` places before position t
            h = (h ^ seq[:, orders - 1 - back:orders - 1 - back + T]) * NGRAM_PRIME
            if back:
                n = np.uint64(back + 1)
                ids[:, :, back - 1] = (mix64_reference(h ^ (n * GOLDEN)) %
                                       np.uint64(rows)).astype(np.int64)
    return ids
