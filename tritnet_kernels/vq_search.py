"""Exact nearest-code search over a ternary codebook: query ternarisation and the whole-book
argmax.

A codebook of K ternary codes of width `dim` is T_packed uint32 (K, 2G), G = ceil(dim/32),
bitplane32 (docs/kernels.md#bitplane32), with int8 exponents E beside it that the search
ignores.

The distance (exact, integer, identical on every device)
--------------------------------------------------------
Queries are ternarised first (`ternarize_queries`):

    acc_i   = sum_j |x[i, j]|                      float32, added in increasing j
    q[i, j] = sign(x[i, j])  if float32(2 * dim) * |x[i, j]| > acc_i  else 0

i.e. q keeps the sign of the entries above half the row's mean magnitude (about a third of a
Gaussian row becomes 0). Every step is one IEEE float32 operation in a fixed order, so the
bitplanes are the same on every device. NaN entries (and rows holding a NaN or inf) give 0.

For a ternary query q and code c (trits T[c]):

    d(q, c)  = q · T[c] = pc((q+ & c+) | (q- & c-)) - pc((q+ & c-) | (q- & c+))   (per group)
    nn(c)    = max(number of nonzero trits of c, 1)
    score(c) = d * |d| / nn(c)       -- the signed square of the cosine d / (|q| sqrt(nn(c))),
                                        |q| being the same for every code

The nearest code maximises score; ties go to the lowest code index. Scores are compared
exactly, as d1*|d1|*nn2 > d2*|d2|*nn1 (int64 in the twins; float32 on the tensor-core path,
where every term is an integer below 2**24 and so exact too). Code scales s = 2**(E/8) do not enter:
the search picks a direction, the gathered code supplies its learned length.

Kernels
-------
- `ternarize_queries(x)`                     float32 (n, dim) -> bitplanes uint32 (n, 2G)
- `nearest_code(queries, T_packed, dim)`     exact argmax over the whole book. On a GPU with
  dim <= 64 the dot products run on the int8 tensor cores (mma.m16n8k32.s8: trits are exact
  int8), each block takes 256 queries x one chunk of the book, and a second small kernel
  merges the chunks in index order; other shapes use a plain scan (same results).
- `top_codes(queries, T_packed, dim, k)`     the k best codes per query (coarse routing).
- `nearest_code_in_partitions(...)`          exact argmax over the codes of each query's
  probed partitions (routed search); on a GPU with dim <= 64 on the int8 tensor cores too
  (a block per group of 32 (query, partition) pairs), else a popcount scan.
- `count_usage(indices, usage)`              int16 usage counts, saturating at 32767.

The first two live here, the routed search's two in vq_route.py, count_usage in vq_usage.py,
and the rules every search shares in _vq_rules.py.

Each is a CUDA kernel (`_*_cuda`) with a Numba CPU twin of the same argument list (`_*_cpu`)
and a NumPy reference (`*_reference`) written independently (unpacked trits, float64 scores)
that the tests compare against; argmins are identical, not merely close.
"""


from . import _numba_compat  # noqa: F401  (must precede numba.cuda)

import numba
import numpy as np
from numba import cuda

from ._common import check_array
from ._launch import launch, on_device, simulator, target, xp_of
from ._vq_rules import (F32_BIAS, F32_BIAS_BITS, MMA_MT, MMA_QPW, MMA_WARPS, NO_SCORE, THREADS,
                        beats, check_book, check_out, code_nn, f32_from_bits, grid_cap, group_dot,
                        group_nnz, mma_s8, nearest_merge_cpu, nearest_merge_cuda,
                        query_fragments_dev, sm_count, sqrt_f32, trit_bytes, trit_dot, unpack_bits,
                        uses_mma)

__all__ = [
    "ternarize_queries",
    "ternarize_queries_reference",
    "code_nnz",
    "nearest_code",
    "nearest_code_reference",
    "code_scores_reference",
]


# --------------------------------------------------------------------------------------------
# 1. Query ternarisation.


@numba.njit(cache=True)
def _ternarize_row(x, i, out):
    dim = x.shape[1]
    scale = np.float32(2 * dim)
    acc = np.float32(0.0)
    for j in range(dim):
        acc += abs(x[i, j])
    for g in range(out.shape[1] // 2):
        plus = np.uint32(0)
        minus = np.uint32(0)
        for b in range(min(32, dim - 32 * g)):
            v = x[i, 32 * g + b]
            if abs(v) * scale > acc:
                if v > 0:
                    plus |= np.uint32(1) << np.uint32(b)
                else:
                    minus |= np.uint32(1) << np.uint32(b)
        out[i, 2 * g] = plus
        out[i, 2 * g + 1] = minus


_ternarize_row_dev = on_device(_ternarize_row)


@numba.njit(parallel=True, cache=True)
def _ternarize_queries_cpu(x, out):
    for i in numba.prange(x.shape[0]):
        _ternarize_row(x, i, out)


@cuda.jit(cache=True)
def _ternarize_queries_cuda(x, out):
    # A thread per row: the row sum must be added in one fixed order to match the CPU bit for
    # bit, and rows are short (a VQ input is 64 wide).
    for i in range(cuda.grid(1), x.shape[0], cuda.gridsize(1)):
        _ternarize_row_dev(x, i, out)


def ternarize_queries(x, out=None):
    """Ternarise float32 queries x (n, dim) into bitplanes uint32 (n, 2*ceil(dim/32)).

    q = sign(x) where |x| > 0.5 * mean|x| of the row, else 0; exactly as in the module doc.
    `out`, if given, is overwritten and returned.
    """
    op = "ternarize_queries"
    dev = target(x, out, op=op)
    check_array(op, "x", x, np.float32, ndim=2)
    n, dim = x.shape
    if dim == 0:
        raise ValueError(f"{op}: x has shape {tuple(x.shape)}; queries need at least one column")
    words = 2 * -(-dim // 32)
    if out is None:
        out = xp_of(x).empty((n, words), dtype=np.uint32)
    else:
        check_array(op, "out", out, np.uint32, shape=(n, words), writeable=True)
    if n == 0:
        return out
    if dev == "cpu":
        _ternarize_queries_cpu(x, out)
    else:
        blocks = max(1, min(grid_cap(), -(-n // THREADS)))
        launch(_ternarize_queries_cuda, blocks, THREADS, x, out)
    return out


def ternarize_queries_reference(x):
    """NumPy truth: the ternary queries as int8 (n, dim) (not packed)."""
    x = np.asarray(x, dtype=np.float32)
    n, dim = x.shape
    acc = np.zeros(n, dtype=np.float32)
    for j in range(dim):  # one float32 addition per column, in order, as the kernels do
        acc = acc + np.abs(x[:, j])
    with np.errstate(invalid="ignore"):
        keep = np.abs(x) * np.float32(2 * dim) > acc[:, None]
    return np.where(keep, np.sign(x), 0).astype(np.int8)


# --------------------------------------------------------------------------------------------
# 2. Exact nearest code: per-chunk partial argmax, then an in-order merge of the chunks.


@numba.njit(parallel=True, cache=True)
def _code_nnz_cpu(T_packed, out):
    for c in numba.prange(T_packed.shape[0]):
        out[c] = code_nn(T_packed, c)


@cuda.jit(cache=True)
def _code_nnz_cuda(T_packed, out):
    for c in range(cuda.grid(1), T_packed.shape[0], cuda.gridsize(1)):
        nnz = np.int64(0)
        for w in range(0, T_packed.shape[1], 2):
            nnz += group_nnz(T_packed[c, w], T_packed[c, w + 1])
        out[c] = max(nnz, np.int64(1))


_CPU_QB = 16  # queries a CPU task scans the book with, so each code is read once per 16


@numba.njit(parallel=True, cache=True)
def _nearest_partial_cpu(queries, T_packed, code_nnz, chunk, part_dot, part_nnz, part_index):
    n = queries.shape[0]
    K = T_packed.shape[0]
    n_chunks = part_index.shape[0]
    qblocks = (n + _CPU_QB - 1) // _CPU_QB
    for task in numba.prange(n_chunks * qblocks):
        ck = task // qblocks
        q0 = (task - ck * qblocks) * _CPU_QB
        q1 = min(n, q0 + _CPU_QB)
        c0 = ck * chunk
        c1 = min(K, c0 + chunk)
        best_d = np.zeros(_CPU_QB, dtype=np.int64)
        best_nn = np.ones(_CPU_QB, dtype=np.int64)
        best_i = np.full(_CPU_QB, -1, dtype=np.int64)
        for c in range(c0, c1):
            nn = np.int64(code_nnz[c])
            for q in range(q0, q1):
                d = trit_dot(queries, q, T_packed, c)
                k = q - q0
                if beats(d, nn, c, best_d[k], best_nn[k], best_i[k]):
                    best_d[k] = d
                    best_nn[k] = nn
                    best_i[k] = c
        for q in range(q0, q1):
            part_dot[ck, q] = best_d[q - q0]
            part_nnz[ck, q] = best_nn[q - q0]
            part_index[ck, q] = best_i[q - q0]


@cuda.jit(cache=True)
def _nearest_partial_scan_cuda(queries, T_packed, code_nnz, chunk, part_dot, part_nnz,
                               part_index):
    # Any width: a thread per query scans the block's chunk; the threads of a warp read the
    # same code at the same time (one broadcast load).
    n = queries.shape[0]
    K = T_packed.shape[0]
    ck = cuda.blockIdx.y
    c0 = ck * chunk
    c1 = min(K, c0 + chunk)
    q = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    if q >= n:
        return
    best_d = np.int64(0)
    best_nn = np.int64(1)
    best_i = np.int64(-1)
    for c in range(c0, c1):
        d = np.int64(0)
        for w in range(0, queries.shape[1], 2):
            d += group_dot(queries[q, w], queries[q, w + 1], T_packed[c, w], T_packed[c, w + 1])
        nn = np.int64(code_nnz[c])
        if beats(d, nn, np.int64(c), best_d, best_nn, best_i):
            best_d = d
            best_nn = nn
            best_i = c
    part_dot[ck, q] = best_d
    part_nnz[ck, q] = best_nn
    part_index[ck, q] = best_i


@cuda.jit(cache=True)
def _nearest_partial_mma_cuda(queries, T_packed, code_nnz, chunk, part_dot, part_nnz,
                              part_index):
    """dim <= 64: dots on the int8 tensor cores. grid (query blocks, chunks), block 32*w.

    Thread (lane = 4*gid + tq) of a warp holds, per m-tile, the A fragments of query rows gid
    and gid+8, and after each mma the dots of those rows with codes a = n0+2tq and a+1. It
    keeps the best of what it sees for its rows (visiting codes in increasing order, so a
    strict improvement keeps the lowest index); the four threads of a row are merged through
    shared memory at the end. code_nnz is float32 (K + 8,), padded past K.

    Per row and step one filter decides whether either code can beat the row's best: with
    m = max(d_a, d_b) and nn_lo = min(nn_a, nn_b), a code beats (key, nn) only if
    d*|d| * nn > key * nn_code >= key * nn_lo when key >= 0, so m*|m| * nn <= key * nn_lo rules
    both out (a negative best filters nothing). Only rows that pass run the exact compare.
    The next step's code words are loaded before this step's mmas (latency hiding).
    """
    s_d = cuda.shared.array((MMA_WARPS, MMA_QPW, 4), numba.int32)
    s_nn = cuda.shared.array((MMA_WARPS, MMA_QPW, 4), numba.int32)
    s_i = cuda.shared.array((MMA_WARPS, MMA_QPW, 4), numba.int32)
    n = queries.shape[0]
    K = T_packed.shape[0]
    two_groups = queries.shape[1] == 4
    lane = cuda.threadIdx.x & 31
    warp = cuda.threadIdx.x >> 5
    warps = cuda.blockDim.x >> 5
    gid = lane >> 2
    tq = lane & 3
    q_warp = (cuda.blockIdx.x * warps + warp) * MMA_QPW
    ck = cuda.blockIdx.y
    c0 = ck * chunk
    c1 = min(K, c0 + chunk)

    A = cuda.local.array((MMA_MT, 8), numba.uint32)
    best_key = cuda.local.array((MMA_MT, 2), numba.float32)  # d*|d| of the best, exact
    best_nn = cuda.local.array((MMA_MT, 2), numba.float32)
    best_i = cuda.local.array((MMA_MT, 2), numba.int32)
    filt_key = cuda.local.array((MMA_MT, 2), numba.float32)  # best_key, or -1e30 if < 0
    for mt in range(MMA_MT):
        for h in range(2):
            q = q_warp + 16 * mt + gid + 8 * h
            A[mt, h], A[mt, 2 + h], A[mt, 4 + h], A[mt, 6 + h] = query_fragments_dev(
                queries, q, q < n, two_groups, tq)
            best_key[mt, h] = NO_SCORE
            best_nn[mt, h] = np.float32(1.0)
            best_i[mt, h] = -1
            filt_key[mt, h] = NO_SCORE

    # Words of this thread's B code (n0 + gid) and the nn of its C codes (a, a + 1), loaded
    # one step ahead. Unsigned indices: Numba then skips its negative-index wraparound code.
    p0 = np.uint32(0)
    m0 = np.uint32(0)
    p1 = np.uint32(0)
    m1 = np.uint32(0)
    if c0 + gid < c1:
        ub = np.uint64(c0 + gid)
        p0 = T_packed[ub, np.uint64(0)]
        m0 = T_packed[ub, np.uint64(1)]
        if two_groups:
            p1 = T_packed[ub, np.uint64(2)]
            m1 = T_packed[ub, np.uint64(3)]
    nn_a = code_nnz[np.uint64(c0 + 2 * tq)]  # padded: a + 1 <= K + 7 is in range
    nn_b = code_nnz[np.uint64(c0 + 2 * tq + 1)]
    n0 = c0
    while n0 < c1:  # the same trip count for every thread of the block (the simulator's mma)
        b0 = trit_bytes(p0, m0, 4 * tq)
        b1 = trit_bytes(p0, m0, 16 + 4 * tq)
        b2 = trit_bytes(p1, m1, 4 * tq)
        b3 = trit_bytes(p1, m1, 16 + 4 * tq)
        cur_nn_a = nn_a
        cur_nn_b = nn_b
        nxt = n0 + 8
        p0 = np.uint32(0)
        m0 = np.uint32(0)
        p1 = np.uint32(0)
        m1 = np.uint32(0)
        if nxt + gid < c1:
            ub = np.uint64(nxt + gid)
            p0 = T_packed[ub, np.uint64(0)]
            m0 = T_packed[ub, np.uint64(1)]
            if two_groups:
                p1 = T_packed[ub, np.uint64(2)]
                m1 = T_packed[ub, np.uint64(3)]
        if nxt < c1:
            nn_a = code_nnz[np.uint64(nxt + 2 * tq)]
            nn_b = code_nnz[np.uint64(nxt + 2 * tq + 1)]
        nn_lo = min(cur_nn_a, cur_nn_b)
        code_a = n0 + 2 * tq

        # All mmas of the step first, so their latencies overlap; then the filters.
        R = cuda.local.array((MMA_MT, 4), numba.int32)
        for mt in range(MMA_MT):
            # Always both 32-trit groups: for dim <= 32 the second is zeros (a wasted mma,
            # but no branch in the loop).
            r0, r1, r2, r3 = mma_s8(A[mt, 0], A[mt, 1], A[mt, 2], A[mt, 3], b0, b1,
                                    F32_BIAS_BITS, F32_BIAS_BITS, F32_BIAS_BITS,
                                    F32_BIAS_BITS)
            R[mt, 0], R[mt, 1], R[mt, 2], R[mt, 3] = mma_s8(A[mt, 4], A[mt, 5], A[mt, 6],
                                                            A[mt, 7], b2, b3, r0, r1, r2, r3)
        for mt in range(MMA_MT):
            for h in range(2):
                # rows gid (h = 0: values 0, 1) and gid + 8 (h = 1: values 2, 3)
                ra = R[mt, 2 * h]
                rb = R[mt, 2 * h + 1]
                m = f32_from_bits(max(ra, rb)) - F32_BIAS
                # Every term is an integer below 2**24: float32 is exact here.
                if m * abs(m) * best_nn[mt, h] - filt_key[mt, h] * nn_lo > np.float32(0.0):
                    for v in range(2):
                        code = code_a + v
                        nn = cur_nn_a if v == 0 else cur_nn_b
                        d = f32_from_bits(ra if v == 0 else rb) - F32_BIAS
                        key = d * abs(d)
                        if key * best_nn[mt, h] - best_key[mt, h] * nn > np.float32(0.0):
                            if code < c1:
                                best_key[mt, h] = key
                                best_nn[mt, h] = nn
                                best_i[mt, h] = code
                                filt_key[mt, h] = key if key >= 0 else NO_SCORE
        n0 = nxt

    for mt in range(MMA_MT):
        for h in range(2):
            row = 16 * mt + gid + 8 * h
            key = best_key[mt, h]
            d = np.int32(0)
            if best_i[mt, h] >= 0:  # key = d*|d| is a perfect square: its root is exact
                d = np.int32(round(sqrt_f32(abs(key))))
                if key < 0:
                    d = -d
            s_d[warp, row, tq] = d
            s_nn[warp, row, tq] = np.int32(best_nn[mt, h])
            s_i[warp, row, tq] = best_i[mt, h]
    cuda.syncthreads()
    for row in range(lane, MMA_QPW, 32):
        q = q_warp + row
        if q < n:
            bd = np.int64(0)
            bn = np.int64(1)
            bi = np.int64(-1)
            for t in range(4):
                if beats(np.int64(s_d[warp, row, t]), np.int64(s_nn[warp, row, t]),
                         np.int64(s_i[warp, row, t]), bd, bn, bi):
                    bd = np.int64(s_d[warp, row, t])
                    bn = np.int64(s_nn[warp, row, t])
                    bi = np.int64(s_i[warp, row, t])
            part_dot[ck, q] = bd
            part_nnz[ck, q] = bn
            part_index[ck, q] = bi


def code_nnz(T_packed):
    """Per code max(nonzero trits, 1) as float32 (K + 8,) on T_packed's device.

    Entries past K pad the tensor-core kernel's 8-code steps; entry K holds the book's
    smallest nn, which bounds its filter. One pass over the book.
    """
    dev = target(T_packed, op="code_nnz")
    K = T_packed.shape[0]
    xp = xp_of(T_packed)
    out = xp.ones(K + 8, dtype=np.float32)
    if dev == "cpu":
        _code_nnz_cpu(T_packed, out)
    else:
        blocks = max(1, min(grid_cap(), -(-K // 256)))
        launch(_code_nnz_cuda, blocks, 256, T_packed, out)
    out[K] = out[:K].min()  # stays on the device: no sync
    return out


def nearest_code(queries, T_packed, dim, out_index=None, out_dot=None, *, method="auto"):
    """Exact nearest code of each ternary query; returns out_index int32 (n,).

    queries uint32 (n, 2G) bitplanes from `ternarize_queries`; T_packed uint32 (K, 2G);
    dim = the codes' width (G = ceil(dim/32)). out_index gets the code maximising
    d*|d|/nn (module doc), ties to the lowest index; out_dot (optional, int32 (n,)) gets that
    code's dot d. Both are overwritten. method: "auto" (tensor cores when on a GPU and
    dim <= 64), "mma" or "scan" (tests and benchmarks; same results).
    Costs one pass over the book per 256 queries on the GPU, plus a (K + 8,) float32 table of
    nonzero counts made per call (one more pass; a transient, not module state).
    """
    op = "nearest_code"
    dev = target(queries, T_packed, out_index, out_dot, op=op)
    dim = check_book(op, queries, T_packed, dim)
    n = queries.shape[0]
    xp = xp_of(T_packed)
    out_index = check_out(op, "out_index", out_index, n, xp)
    if out_dot is not None:
        check_out(op, "out_dot", out_dot, n, xp)
    use_mma = uses_mma(op, method, dev, dim)
    if n == 0:
        return out_index
    K = T_packed.shape[0]
    nnz = code_nnz(T_packed)
    if dev == "cpu":
        n_chunks = 1 if K < 1 << 16 else min(64, -(-K // (1 << 16)))
        chunk = -(-K // n_chunks)
        kernel = _nearest_partial_cpu
    else:
        if use_mma:
            warps = 1 if simulator() else min(MMA_WARPS, -(-n // MMA_QPW))
            per_block = warps * MMA_QPW
            threads = 32 * warps
            kernel = _nearest_partial_mma_cuda
        else:
            threads = 32 if simulator() else THREADS
            per_block = threads
            kernel = _nearest_partial_scan_cuda
        q_blocks = -(-n // per_block)
        # About 8 blocks per multiprocessor in all: enough to fill it, few enough that the
        # partial results (3 int32 per query and chunk) stay small.
        want = 2 if simulator() else 8 * sm_count()
        n_chunks = max(1, min(-(-K // 8), -(-want // q_blocks)))
        chunk = -(-K // n_chunks)
        chunk = -(-chunk // 8) * 8
        n_chunks = -(-K // chunk)
    part_dot = xp.empty((n_chunks, n), dtype=np.int32)
    part_nnz = xp.empty((n_chunks, n), dtype=np.int32)
    part_index = xp.empty((n_chunks, n), dtype=np.int32)
    dot = out_dot if out_dot is not None else xp.empty(n, dtype=np.int32)
    args = (queries, T_packed, nnz, np.int64(chunk), part_dot, part_nnz, part_index)
    if dev == "cpu":
        kernel(*args)
        nearest_merge_cpu(part_dot, part_nnz, part_index, out_index, dot)
    else:
        launch(kernel, (q_blocks, n_chunks), threads, *args)
        blocks = max(1, min(grid_cap(), -(-n // THREADS)))
        launch(nearest_merge_cuda, blocks, THREADS, part_dot, part_nnz, part_index,
               out_index, dot)
    return out_index


def code_scores_reference(queries, T_packed, dim):
    """(d int64, score float64), each (n, K): dots and scores of every query and code.

    score = d*|d| / max(nnz, 1) in float64. That is exact enough to rank: two different
    scores a/m and b/l (|a|, |b| <= dim**2, m, l <= dim) differ by at least 1/dim**2, far above
    float64 rounding for any dim < 2**17, and equal rationals round to the same double.
    """
    q = unpack_bits(queries, dim).astype(np.float32)
    T = unpack_bits(T_packed, dim)
    # Sums of at most dim products of +-1: exact in float32 below 2**24, and a BLAS product.
    d = (q @ T.T.astype(np.float32)).astype(np.int64)
    nn = np.maximum(np.count_nonzero(T, axis=1), 1)
    return d, (d * np.abs(d)) / nn


def nearest_code_reference(queries, T_packed, dim):
    """NumPy truth: (index int32 (n,), dot int32 (n,))."""
    d, score = code_scores_reference(queries, T_packed, dim)
    idx = np.argmax(score, axis=1)  # the first maximum: the lowest index
    return idx.astype(np.int32), d[np.arange(len(idx)), idx].astype(np.int32)
