"""Nearest-code search over a ternary codebook, and the small kernels around it.

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

Each is a CUDA kernel (`_*_cuda`) with a Numba CPU twin of the same argument list (`_*_cpu`)
and a NumPy reference (`*_reference`) written independently (unpacked trits, float64 scores)
that the tests compare against; argmins are identical, not merely close.
"""

from . import _numba_compat  # noqa: F401  (must precede numba.cuda)

import math
import threading

import numba
import numpy as np
from numba import cuda

from ._launch import is_cupy, launch, on_device, simulator, target, xp_of
from .tables import _check_indices
from .update import _check_array, _check_int

__all__ = [
    "ternarize_queries",
    "ternarize_queries_reference",
    "nearest_code",
    "nearest_code_reference",
    "top_codes",
    "top_codes_reference",
    "nearest_code_in_partitions",
    "nearest_code_in_partitions_reference",
    "count_usage",
    "count_usage_reference",
    "code_scores_reference",
    "USAGE_MAX",
]

USAGE_MAX = 32767
_MAX_TOP_K = 64
_MAX_TOP_SLICES = 64
_THREADS = 128
_MAX_BLOCKS = 4096

# Tensor-core search geometry: a warp owns _MMA_MT m-tiles of 16 queries (their int8 A
# fragments stay in registers), a block _MMA_WARPS warps; all warps of a block stream the same
# chunk of the book, 8 codes (one n-tile) per step.
_MMA_MT = 4
_MMA_WARPS = 4
_MMA_QPW = 16 * _MMA_MT
# int32 bits of float32 1.5 * 2**23: an mma accumulator started here reads, as a float, as
# exactly 1.5 * 2**23 + d for |d| < 2**22, so the epilogue gets d as a float without a
# conversion instruction (the compare below is float arithmetic on small integers: exact).
_F32_BIAS_BITS = np.int32(0x4B400000)
_F32_BIAS = np.float32(12582912.0)
_NO_SCORE = np.float32(-1.0e30)


# --------------------------------------------------------------------------------------------
# Device intrinsics: the int8 mma and a float bit cast, each with a simulator twin.

if simulator():
    _mma_slots = {}

    def _s8x4(word):
        return np.array([word], dtype=np.uint32).view(np.int8).astype(np.int64)

    def _mma_s8(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
        """D = A·B + C for A 16x32, B 32x8 int8 fragments (PTX mma.m16n8k32 layout)."""
        th = threading.current_thread()
        lane = th.thread_id % 32
        key = (th.blockIdx.x, th.blockIdx.y, th.blockIdx.z, th.thread_id // 32)
        th.syncthreads()  # every lane has finished reading the previous call's slot
        slot = _mma_slots.setdefault(key, [None] * 32)
        slot[lane] = ((a0, a1, a2, a3), (b0, b1))
        th.syncthreads()
        A = np.zeros((16, 32), dtype=np.int64)
        B = np.zeros((32, 8), dtype=np.int64)
        for ln, ((x0, x1, x2, x3), (y0, y1)) in enumerate(slot):
            g, t = ln >> 2, ln & 3
            A[g, 4 * t:4 * t + 4] = _s8x4(x0)
            A[g + 8, 4 * t:4 * t + 4] = _s8x4(x1)
            A[g, 16 + 4 * t:20 + 4 * t] = _s8x4(x2)
            A[g + 8, 16 + 4 * t:20 + 4 * t] = _s8x4(x3)
            B[4 * t:4 * t + 4, g] = _s8x4(y0)
            B[16 + 4 * t:20 + 4 * t, g] = _s8x4(y1)
        D = A @ B
        g, t = lane >> 2, lane & 3
        return (np.int32(int(c0) + D[g, 2 * t]), np.int32(int(c1) + D[g, 2 * t + 1]),
                np.int32(int(c2) + D[g + 8, 2 * t]), np.int32(int(c3) + D[g + 8, 2 * t + 1]))

    def _f32_from_bits(word):
        return np.array([word], dtype=np.int32).view(np.float32)[0]

else:
    from llvmlite import ir
    from numba import types
    from numba.cuda.extending import intrinsic

    @intrinsic
    def _mma_s8(typingctx, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
        sig = types.UniTuple(types.int32, 4)(*([types.uint32] * 6 + [types.int32] * 4))

        def codegen(context, builder, sig, args):
            i32 = ir.IntType(32)
            fnty = ir.FunctionType(ir.LiteralStructType([i32] * 4), [i32] * 10)
            asm = ("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 "
                   "{$0,$1,$2,$3}, {$4,$5,$6,$7}, {$8,$9}, {$10,$11,$12,$13};")
            # Not side-effecting: LLVM may schedule loads across it.
            call = ir.InlineAsm(fnty, asm, "=r,=r,=r,=r,r,r,r,r,r,r,r,r,r,r")
            res = builder.call(call, args)
            vals = [builder.extract_value(res, i) for i in range(4)]
            return context.make_tuple(builder, sig.return_type, vals)

        return sig, codegen

    @intrinsic
    def _f32_from_bits(typingctx, word):
        def codegen(context, builder, sig, args):
            return builder.bitcast(args[0], ir.FloatType())

        return types.float32(types.int32), codegen


# --------------------------------------------------------------------------------------------
# Shared scalar helpers (njit: the CPU twins call them, numba-cuda compiles them into kernels).


@numba.njit(cache=True)
def _popc(x):
    """Population count of a 32-bit value (SWAR; LLVM turns it into one popcnt on the CPU)."""
    x = np.uint64(x) & np.uint64(0xFFFFFFFF)
    x = x - ((x >> np.uint64(1)) & np.uint64(0x5555555555555555))
    x = (x & np.uint64(0x3333333333333333)) + ((x >> np.uint64(2)) & np.uint64(0x3333333333333333))
    x = (x + (x >> np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    return np.int64((x * np.uint64(0x0101010101010101)) >> np.uint64(56))


@numba.njit(cache=True)
def _group_dot(qp, qm, cp, cm):
    """The dot of one 32-trit group: 2 popcounts of disjoint agree / disagree sets."""
    qp = np.uint64(qp)
    qm = np.uint64(qm)
    cp = np.uint64(cp)
    cm = np.uint64(cm)
    return _popc((qp & cp) | (qm & cm)) - _popc((qp & cm) | (qm & cp))


@numba.njit(cache=True)
def _group_nnz(cp, cm):
    return _popc(np.uint64(cp) | np.uint64(cm))


# The scan kernels below loop over groups themselves, scoring dot and nnz in one pass over a
# code's words; `_trit_dot`, `_code_nn` serve the CPU twins. Row and merge rules that both
# twins share are njit functions that a kernel reaches through `on_device` (the simulator
# cannot hand its device arrays to the compiled function, so it gets the Python one).


@numba.njit(cache=True)
def _trit_dot(queries, q, T_packed, c):
    d = np.int64(0)
    for w in range(0, queries.shape[1], 2):
        d += _group_dot(queries[q, w], queries[q, w + 1], T_packed[c, w], T_packed[c, w + 1])
    return d


@numba.njit(cache=True)
def _code_nn(T_packed, c):
    nnz = np.int64(0)
    for w in range(0, T_packed.shape[1], 2):
        nnz += _group_nnz(T_packed[c, w], T_packed[c, w + 1])
    return max(nnz, np.int64(1))


@numba.njit(cache=True)
def _beats(d, nn, idx, best_d, best_nn, best_idx):
    """Whether code idx (dot d, nn) ranks above the current best; exact, ties to lower index."""
    if best_idx < 0:
        return idx >= 0
    if idx < 0:
        return False
    lhs = d * abs(d) * best_nn
    rhs = best_d * abs(best_d) * nn
    if lhs != rhs:
        return lhs > rhs
    return idx < best_idx


@numba.njit(cache=True)
def _trit_bytes(plus, minus, shift):
    """Four trits at bit `shift` of a group as int8x4 in a uint32 (0x01 = +1, 0xFF = -1)."""
    p = ((np.uint64(plus) >> np.uint64(shift)) & np.uint64(0xF)) * np.uint64(0x00204081)
    m = ((np.uint64(minus) >> np.uint64(shift)) & np.uint64(0xF)) * np.uint64(0x00204081)
    p &= np.uint64(0x01010101)
    m &= np.uint64(0x01010101)
    # A valid trit never has both bits, so no byte carries into the next.
    return np.uint32(p + m * np.uint64(0xFF))


@numba.njit(cache=True)
def _query_fragments(queries, q, valid, two_groups, tq):
    """The four A-fragment words that thread tq of a row holds for query q (dim <= 64): its
    trits 4tq.., 16+4tq.. of each 32-trit group as int8x4; zeros when not `valid`."""
    p0 = np.uint32(0)
    m0 = np.uint32(0)
    p1 = np.uint32(0)
    m1 = np.uint32(0)
    if valid:
        p0 = queries[q, 0]
        m0 = queries[q, 1]
        if two_groups:
            p1 = queries[q, 2]
            m1 = queries[q, 3]
    return (_trit_bytes(p0, m0, 4 * tq), _trit_bytes(p0, m0, 16 + 4 * tq),
            _trit_bytes(p1, m1, 4 * tq), _trit_bytes(p1, m1, 16 + 4 * tq))


_query_fragments_dev = on_device(_query_fragments)


@numba.njit(cache=True)
def _sqrt_f32(x):
    return math.sqrt(np.float32(x))


def _grid_cap():
    return 2 if simulator() else _MAX_BLOCKS


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
    _check_array(op, "x", x, np.float32, ndim=2)
    n, dim = x.shape
    if dim == 0:
        raise ValueError(f"{op}: x has shape {tuple(x.shape)}; queries need at least one column")
    words = 2 * -(-dim // 32)
    if out is None:
        out = xp_of(x).empty((n, words), dtype=np.uint32)
    else:
        _check_array(op, "out", out, np.uint32, shape=(n, words), writeable=True)
    if n == 0:
        return out
    if dev == "cpu":
        _ternarize_queries_cpu(x, out)
    else:
        blocks = max(1, min(_grid_cap(), -(-n // _THREADS)))
        launch(_ternarize_queries_cuda, blocks, _THREADS, x, out)
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
        out[c] = _code_nn(T_packed, c)


@cuda.jit(cache=True)
def _code_nnz_cuda(T_packed, out):
    for c in range(cuda.grid(1), T_packed.shape[0], cuda.gridsize(1)):
        nnz = np.int64(0)
        for w in range(0, T_packed.shape[1], 2):
            nnz += _group_nnz(T_packed[c, w], T_packed[c, w + 1])
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
                d = _trit_dot(queries, q, T_packed, c)
                k = q - q0
                if _beats(d, nn, c, best_d[k], best_nn[k], best_i[k]):
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
            d += _group_dot(queries[q, w], queries[q, w + 1], T_packed[c, w], T_packed[c, w + 1])
        nn = np.int64(code_nnz[c])
        if _beats(d, nn, np.int64(c), best_d, best_nn, best_i):
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
    s_d = cuda.shared.array((_MMA_WARPS, _MMA_QPW, 4), numba.int32)
    s_nn = cuda.shared.array((_MMA_WARPS, _MMA_QPW, 4), numba.int32)
    s_i = cuda.shared.array((_MMA_WARPS, _MMA_QPW, 4), numba.int32)
    n = queries.shape[0]
    K = T_packed.shape[0]
    two_groups = queries.shape[1] == 4
    lane = cuda.threadIdx.x & 31
    warp = cuda.threadIdx.x >> 5
    warps = cuda.blockDim.x >> 5
    gid = lane >> 2
    tq = lane & 3
    q_warp = (cuda.blockIdx.x * warps + warp) * _MMA_QPW
    ck = cuda.blockIdx.y
    c0 = ck * chunk
    c1 = min(K, c0 + chunk)

    A = cuda.local.array((_MMA_MT, 8), numba.uint32)
    best_key = cuda.local.array((_MMA_MT, 2), numba.float32)  # d*|d| of the best, exact
    best_nn = cuda.local.array((_MMA_MT, 2), numba.float32)
    best_i = cuda.local.array((_MMA_MT, 2), numba.int32)
    filt_key = cuda.local.array((_MMA_MT, 2), numba.float32)  # best_key, or -1e30 if < 0
    for mt in range(_MMA_MT):
        for h in range(2):
            q = q_warp + 16 * mt + gid + 8 * h
            A[mt, h], A[mt, 2 + h], A[mt, 4 + h], A[mt, 6 + h] = _query_fragments_dev(
                queries, q, q < n, two_groups, tq)
            best_key[mt, h] = _NO_SCORE
            best_nn[mt, h] = np.float32(1.0)
            best_i[mt, h] = -1
            filt_key[mt, h] = _NO_SCORE

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
        b0 = _trit_bytes(p0, m0, 4 * tq)
        b1 = _trit_bytes(p0, m0, 16 + 4 * tq)
        b2 = _trit_bytes(p1, m1, 4 * tq)
        b3 = _trit_bytes(p1, m1, 16 + 4 * tq)
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
        R = cuda.local.array((_MMA_MT, 4), numba.int32)
        for mt in range(_MMA_MT):
            # Always both 32-trit groups: for dim <= 32 the second is zeros (a wasted mma,
            # but no branch in the loop).
            r0, r1, r2, r3 = _mma_s8(A[mt, 0], A[mt, 1], A[mt, 2], A[mt, 3], b0, b1,
                                     _F32_BIAS_BITS, _F32_BIAS_BITS, _F32_BIAS_BITS,
                                     _F32_BIAS_BITS)
            R[mt, 0], R[mt, 1], R[mt, 2], R[mt, 3] = _mma_s8(A[mt, 4], A[mt, 5], A[mt, 6],
                                                             A[mt, 7], b2, b3, r0, r1, r2, r3)
        for mt in range(_MMA_MT):
            for h in range(2):
                # rows gid (h = 0: values 0, 1) and gid + 8 (h = 1: values 2, 3)
                ra = R[mt, 2 * h]
                rb = R[mt, 2 * h + 1]
                m = _f32_from_bits(max(ra, rb)) - _F32_BIAS
                # Every term is an integer below 2**24: float32 is exact here.
                if m * abs(m) * best_nn[mt, h] - filt_key[mt, h] * nn_lo > np.float32(0.0):
                    for v in range(2):
                        code = code_a + v
                        nn = cur_nn_a if v == 0 else cur_nn_b
                        d = _f32_from_bits(ra if v == 0 else rb) - _F32_BIAS
                        key = d * abs(d)
                        if key * best_nn[mt, h] - best_key[mt, h] * nn > np.float32(0.0):
                            if code < c1:
                                best_key[mt, h] = key
                                best_nn[mt, h] = nn
                                best_i[mt, h] = code
                                filt_key[mt, h] = key if key >= 0 else _NO_SCORE
        n0 = nxt

    for mt in range(_MMA_MT):
        for h in range(2):
            row = 16 * mt + gid + 8 * h
            key = best_key[mt, h]
            d = np.int32(0)
            if best_i[mt, h] >= 0:  # key = d*|d| is a perfect square: its root is exact
                d = np.int32(round(_sqrt_f32(abs(key))))
                if key < 0:
                    d = -d
            s_d[warp, row, tq] = d
            s_nn[warp, row, tq] = np.int32(best_nn[mt, h])
            s_i[warp, row, tq] = best_i[mt, h]
    cuda.syncthreads()
    for row in range(lane, _MMA_QPW, 32):
        q = q_warp + row
        if q < n:
            bd = np.int64(0)
            bn = np.int64(1)
            bi = np.int64(-1)
            for t in range(4):
                if _beats(np.int64(s_d[warp, row, t]), np.int64(s_nn[warp, row, t]),
                          np.int64(s_i[warp, row, t]), bd, bn, bi):
                    bd = np.int64(s_d[warp, row, t])
                    bn = np.int64(s_nn[warp, row, t])
                    bi = np.int64(s_i[warp, row, t])
            part_dot[ck, q] = bd
            part_nnz[ck, q] = bn
            part_index[ck, q] = bi


@numba.njit(cache=True)
def _nearest_merge_one(part_dot, part_nnz, part_index, q, out_index, out_dot):
    """The best of query q's per-chunk winners (ties: lower index)."""
    bd = np.int64(0)
    bn = np.int64(1)
    bi = np.int64(-1)
    for ck in range(part_index.shape[0]):
        if _beats(np.int64(part_dot[ck, q]), np.int64(part_nnz[ck, q]),
                  np.int64(part_index[ck, q]), bd, bn, bi):
            bd = np.int64(part_dot[ck, q])
            bn = np.int64(part_nnz[ck, q])
            bi = np.int64(part_index[ck, q])
    out_index[q] = bi
    out_dot[q] = bd


_nearest_merge_one_dev = on_device(_nearest_merge_one)


@numba.njit(parallel=True, cache=True)
def _nearest_merge_cpu(part_dot, part_nnz, part_index, out_index, out_dot):
    for q in numba.prange(out_index.shape[0]):
        _nearest_merge_one(part_dot, part_nnz, part_index, q, out_index, out_dot)


@cuda.jit(cache=True)
def _nearest_merge_cuda(part_dot, part_nnz, part_index, out_index, out_dot):
    for q in range(cuda.grid(1), out_index.shape[0], cuda.gridsize(1)):
        _nearest_merge_one_dev(part_dot, part_nnz, part_index, q, out_index, out_dot)


def _check_book(op, queries, T_packed, dim):
    dim = _check_int(op, "dim", dim, 1, 1 << 20)
    words = 2 * -(-dim // 32)
    _check_array(op, "T_packed", T_packed, np.uint32, ndim=2)
    if T_packed.shape[1] != words:
        raise ValueError(f"{op}: T_packed has shape {tuple(T_packed.shape)}, expected "
                         f"(K, {words}) for dim={dim} (bitplane32: 2 words per 32 columns)")
    if not 1 <= T_packed.shape[0] < 1 << 31:
        raise ValueError(f"{op}: T_packed has {T_packed.shape[0]} codes, expected 1 to 2**31-1")
    if not (hasattr(queries, "dtype") and hasattr(queries, "shape")):
        raise TypeError(f"{op}: queries must be a NumPy or CuPy array, got "
                        f"{type(queries).__name__}")
    if queries.dtype != np.uint32:
        raise TypeError(f"{op}: queries has dtype {queries.dtype}, expected uint32 bitplanes "
                        "(ternarise float queries with ternarize_queries first)")
    if queries.ndim != 2 or queries.shape[1] != words:
        raise ValueError(f"{op}: queries has shape {tuple(queries.shape)}, expected "
                         f"(n, {words}) for dim={dim} (ternarize_queries of (n, {dim}) "
                         "float32 queries)")
    _check_array(op, "queries", queries, np.uint32, ndim=2)
    return dim


def _check_out(op, name, out, n, xp, dtype=np.int32):
    if out is None:
        return xp.empty(n, dtype=dtype)
    _check_array(op, name, out, dtype, shape=(n,), writeable=True)
    return out


def _sm_count():
    if simulator():
        return 1
    import cupy

    return int(cupy.cuda.Device().attributes["MultiProcessorCount"])


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
        blocks = max(1, min(_grid_cap(), -(-K // 256)))
        launch(_code_nnz_cuda, blocks, 256, T_packed, out)
    out[K] = out[:K].min()  # stays on the device: no sync
    return out


def _use_mma(op, method, dev, dim):
    """Whether a search runs on the int8 tensor cores: method "mma", or "auto" with dim <= 64
    (on the CPU the answer is not used); "scan" never. Refuses other methods, and "mma" where
    it cannot run."""
    if method not in ("auto", "mma", "scan"):
        raise ValueError(f"{op}: method = {method!r}, expected 'auto', 'mma' or 'scan'")
    if method == "mma" and (dev == "cpu" or dim > 64):
        raise ValueError(f"{op}: method 'mma' needs a GPU (or the simulator) and dim <= 64, "
                         f"got device {dev} and dim={dim}")
    return method == "mma" or (method == "auto" and dim <= 64)


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
    dim = _check_book(op, queries, T_packed, dim)
    n = queries.shape[0]
    xp = xp_of(T_packed)
    out_index = _check_out(op, "out_index", out_index, n, xp)
    if out_dot is not None:
        _check_out(op, "out_dot", out_dot, n, xp)
    use_mma = _use_mma(op, method, dev, dim)
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
            warps = 1 if simulator() else min(_MMA_WARPS, -(-n // _MMA_QPW))
            per_block = warps * _MMA_QPW
            threads = 32 * warps
            kernel = _nearest_partial_mma_cuda
        else:
            threads = 32 if simulator() else _THREADS
            per_block = threads
            kernel = _nearest_partial_scan_cuda
        q_blocks = -(-n // per_block)
        # About 8 blocks per multiprocessor in all: enough to fill it, few enough that the
        # partial results (3 int32 per query and chunk) stay small.
        want = 2 if simulator() else 8 * _sm_count()
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
        _nearest_merge_cpu(part_dot, part_nnz, part_index, out_index, dot)
    else:
        launch(kernel, (q_blocks, n_chunks), threads, *args)
        blocks = max(1, min(_grid_cap(), -(-n // _THREADS)))
        launch(_nearest_merge_cuda, blocks, _THREADS, part_dot, part_nnz, part_index,
               out_index, dot)
    return out_index


def _unpack_bits(words, dim):
    """Bitplane rows -> trits int8 (rows, dim), straight from the bits (not via the kernels)."""
    words = np.ascontiguousarray(words, dtype=np.uint32)
    rows, W = words.shape
    bits = np.unpackbits(words.view(np.uint8), axis=1, bitorder="little")
    bits = bits.reshape(rows, W // 2, 2, 32).astype(np.int8)
    return (bits[:, :, 0] - bits[:, :, 1]).reshape(rows, -1)[:, :dim]


def code_scores_reference(queries, T_packed, dim):
    """(d int64, score float64), each (n, K): dots and scores of every query and code.

    score = d*|d| / max(nnz, 1) in float64. That is exact enough to rank: two different
    scores a/m and b/l (|a|, |b| <= dim**2, m, l <= dim) differ by at least 1/dim**2, far above
    float64 rounding for any dim < 2**17, and equal rationals round to the same double.
    """
    q = _unpack_bits(queries, dim).astype(np.float32)
    T = _unpack_bits(T_packed, dim)
    # Sums of at most dim products of +-1: exact in float32 below 2**24, and a BLAS product.
    d = (q @ T.T.astype(np.float32)).astype(np.int64)
    nn = np.maximum(np.count_nonzero(T, axis=1), 1)
    return d, (d * np.abs(d)) / nn


def nearest_code_reference(queries, T_packed, dim):
    """NumPy truth: (index int32 (n,), dot int32 (n,))."""
    d, score = code_scores_reference(queries, T_packed, dim)
    idx = np.argmax(score, axis=1)  # the first maximum: the lowest index
    return idx.astype(np.int32), d[np.arange(len(idx)), idx].astype(np.int32)


# --------------------------------------------------------------------------------------------
# 3. The k best codes (coarse routing over a small centroid book).


@numba.njit(cache=True)
def _top_insert(top_d, top_nn, top_i, filled, k, d, nn, c):
    """Insert code c into the sorted top-k lists if it ranks; returns the new fill count."""
    if filled == k and not _beats(d, nn, c, top_d[k - 1], top_nn[k - 1], top_i[k - 1]):
        return filled
    pos = filled if filled < k else k - 1
    # Codes arrive in increasing index, so an equal score stays behind the earlier code.
    while pos > 0 and _beats(d, nn, c, top_d[pos - 1], top_nn[pos - 1], top_i[pos - 1]):
        top_d[pos] = top_d[pos - 1]
        top_nn[pos] = top_nn[pos - 1]
        top_i[pos] = top_i[pos - 1]
        pos -= 1
    top_d[pos] = d
    top_nn[pos] = nn
    top_i[pos] = c
    return filled + 1 if filled < k else filled


@numba.njit(parallel=True, cache=True)
def _top_codes_partial_cpu(queries, T_packed, slice_len, part_d, part_nn, part_i):
    S, n, k = part_i.shape
    K = T_packed.shape[0]
    for task in numba.prange(S * n):
        s = task // n
        q = task - s * n
        top_d = np.zeros(_MAX_TOP_K, dtype=np.int64)
        top_nn = np.ones(_MAX_TOP_K, dtype=np.int64)
        top_i = np.full(_MAX_TOP_K, -1, dtype=np.int64)
        filled = 0
        for c in range(s * slice_len, min(K, (s + 1) * slice_len)):
            filled = _top_insert(top_d, top_nn, top_i, filled, k,
                                 _trit_dot(queries, q, T_packed, c), _code_nn(T_packed, c),
                                 np.int64(c))
        for j in range(k):
            part_d[s, q, j] = top_d[j] if j < filled else 0
            part_nn[s, q, j] = top_nn[j] if j < filled else 1
            part_i[s, q, j] = top_i[j] if j < filled else -1


@numba.njit(cache=True)
def _score_key(d, nn):
    """d·|d|/nn in float64: an exact sort key of the score. Two different such fractions
    (|d| <= nn <= dim) differ by at least 1/dim**2, far above float64 rounding for dim < 2**17,
    and equal fractions round to the same double (code_scores_reference says the same)."""
    return np.float64(d * abs(d)) / np.float64(nn)


_TOP_THREADS = 256
_TOP_SORT = 4096   # keys a block scores a pass: the best k so far, then up to 4096 - k codes
_TOP_CAND = 512    # keys of a pass's sample, then of its candidates
_TOP_MAX_DIM = 1 << 17   # _score_key is exact below this


@cuda.jit(device=True)
def _bitonic_sort(keys, pos, size, tid, threads):
    """Sort keys[:size] (a power of two) best first in place, ties to the lower pos, moving
    pos along; the whole block calls it."""
    width = 2
    while width <= size:
        stride = width // 2
        while stride > 0:
            for t in range(tid, size // 2, threads):
                i = 2 * t - (t & (stride - 1))
                j = i + stride
                # j ranks before i: a higher key, or the same key at a lower position
                j_first = keys[j] > keys[i] or (keys[j] == keys[i] and pos[j] < pos[i])
                if j_first == ((i & width) == 0):   # runs alternate best-first/last
                    x = keys[i]
                    keys[i] = keys[j]
                    keys[j] = x
                    y = pos[i]
                    pos[i] = pos[j]
                    pos[j] = y
            cuda.syncthreads()
            stride //= 2
        width *= 2


@cuda.jit(device=True)
def _pow2_at_least(n):
    size = 1
    while size < n:
        size *= 2
    return size


@cuda.jit(device=True)
def _dot_and_nn(queries, q, T_packed, c):
    """(d, nn) of query q and code c: the dot and max(nonzero trits of c, 1), by popcounts."""
    d = np.int64(0)
    nnz = np.int64(0)
    for w in range(0, queries.shape[1], 2):
        qp = queries[q, w]
        qm = queries[q, w + 1]
        cp = T_packed[c, w]
        cm = T_packed[c, w + 1]
        d += (np.int32(cuda.popc((qp & cp) | (qm & cm)))
              - np.int32(cuda.popc((qp & cm) | (qm & cp))))
        nnz += np.int32(cuda.popc(cp | cm))
    return d, max(nnz, 1)


@cuda.jit(cache=True)
def _top_codes_partial_cuda(queries, T_packed, slice_len, sort_len, cand_len, part_d, part_nn,
                            part_i):
    # A block per (query, slice of the book). A pass scores up to sort_len - k codes of the
    # slice into shared memory as exact float64 keys, after the best k kept from the codes
    # before them: position order is index order, so ties go to the lower position. Then:
    # - a bitonic sort of the first cand_len keys (the kept ones among them) gives tau, their
    #   k-th best: at least k keys of the pass are >= tau, so its best k are among them;
    # - the keys >= tau (a few times k for a sample of a shuffled book) are gathered and
    #   sorted; their first k are the pass's best k.
    # If more than cand_len keys reach tau (a book of many equal scores), the whole pass is
    # sorted instead; so is a pass of at most cand_len keys, at once. For 2048 queries over
    # 3162 centroids, k = 48 (H200), this takes 0.47 ms a call; sorting every pass whole took
    # 1.04 ms, and picking the k one at a time with a block-wide argmax each (96 rounds of a
    # tree a query) 0.95 ms.
    # The winners' dots and counts are scored again at the end (k codes).
    c_s = cuda.shared.array(_TOP_SORT, numba.float64)
    c_p = cuda.shared.array(_TOP_SORT, numba.int16)
    b_s = cuda.shared.array(_TOP_CAND, numba.float64)
    b_p = cuda.shared.array(_TOP_CAND, numba.int16)
    k_i = cuda.shared.array(_MAX_TOP_K, numba.int32)
    k_new = cuda.shared.array(_MAX_TOP_K, numba.int32)
    k_key = cuda.shared.array(_MAX_TOP_K, numba.float64)
    found = cuda.shared.array(1, numba.int32)
    S, n, k = part_i.shape
    K = T_packed.shape[0]
    tid = cuda.threadIdx.x
    threads = cuda.blockDim.x
    for task in range(cuda.blockIdx.x, S * n, cuda.gridDim.x):
        s = task // n
        q = task - s * n
        filled = 0
        start = s * slice_len
        end = min(K, start + slice_len)
        while start < end:
            m = min(sort_len - k, end - start)
            total = filled + m
            for t in range(tid, total, threads):
                c_p[t] = t
                if t >= filled:   # the kept keys stay where the last pass left them
                    d, nn = _dot_and_nn(queries, q, T_packed, start + t - filled)
                    c_s[t] = _score_key(d, nn)
            if tid == 0:
                found[0] = 0
            cuda.syncthreads()
            whole = total <= cand_len or cand_len < 2 * k
            if not whole:
                for t in range(tid, cand_len, threads):   # the sample
                    b_s[t] = c_s[t]
                    b_p[t] = t
                cuda.syncthreads()
                _bitonic_sort(b_s, b_p, cand_len, tid, threads)
                tau = b_s[k - 1]
                cuda.syncthreads()   # every thread has read tau before b is overwritten
                for t in range(tid, total, threads):
                    if c_s[t] >= tau:
                        at = cuda.atomic.add(found, 0, 1)
                        if at < cand_len:
                            b_s[at] = c_s[t]
                            b_p[at] = t
                cuda.syncthreads()
                whole = found[0] > cand_len
            if whole:
                size = _pow2_at_least(total)
                for t in range(total + tid, size, threads):
                    c_s[t] = -math.inf
                    c_p[t] = t
                cuda.syncthreads()
                _bitonic_sort(c_s, c_p, size, tid, threads)
            else:
                size = _pow2_at_least(found[0])
                for t in range(found[0] + tid, size, threads):
                    b_s[t] = -math.inf
                    b_p[t] = _TOP_SORT - 1   # below every real position in a tie
                cuda.syncthreads()
                _bitonic_sort(b_s, b_p, size, tid, threads)
            filled_now = min(k, total)
            for j in range(tid, filled_now, threads):
                at = np.int32(c_p[j] if whole else b_p[j])
                k_key[j] = c_s[j] if whole else b_s[j]
                k_new[j] = k_i[at] if at < filled else np.int32(start + at - filled)
            cuda.syncthreads()
            for j in range(tid, filled_now, threads):
                k_i[j] = k_new[j]
                c_s[j] = k_key[j]
            cuda.syncthreads()
            filled = filled_now
            start += m
        for j in range(tid, k, threads):
            if j < filled:
                c = k_i[j]
                d, nn = _dot_and_nn(queries, q, T_packed, c)
                part_d[s, q, j] = d
                part_nn[s, q, j] = nn
                part_i[s, q, j] = c
            else:
                part_d[s, q, j] = 0
                part_nn[s, q, j] = 1
                part_i[s, q, j] = -1
        cuda.syncthreads()  # the next task reuses the shared arrays


@numba.njit(cache=True)
def _top_merge_one(part_d, part_nn, part_i, q, heads, out_index, out_dot):
    """Merge the sorted per-slice lists of query q, best first (ties: lower index)."""
    S, _, k = part_i.shape
    for s in range(S):
        heads[s] = 0
    for j in range(k):
        best_s = -1
        bd = np.int64(0)
        bn = np.int64(1)
        bi = np.int64(-1)
        for s in range(S):
            h = heads[s]
            if h < k and part_i[s, q, h] >= 0:
                if _beats(np.int64(part_d[s, q, h]), np.int64(part_nn[s, q, h]),
                          np.int64(part_i[s, q, h]), bd, bn, bi):
                    best_s = s
                    bd = np.int64(part_d[s, q, h])
                    bn = np.int64(part_nn[s, q, h])
                    bi = np.int64(part_i[s, q, h])
        out_index[q, j] = bi
        out_dot[q, j] = bd
        if best_s >= 0:
            heads[best_s] += 1


_top_merge_one_dev = on_device(_top_merge_one)


@numba.njit(parallel=True, cache=True)
def _top_codes_merge_cpu(part_d, part_nn, part_i, out_index, out_dot):
    for q in numba.prange(out_index.shape[0]):
        heads = np.zeros(_MAX_TOP_SLICES, dtype=np.int64)
        _top_merge_one(part_d, part_nn, part_i, q, heads, out_index, out_dot)


@cuda.jit(cache=True)
def _top_codes_merge_cuda(part_d, part_nn, part_i, out_index, out_dot):
    heads = cuda.local.array(_MAX_TOP_SLICES, numba.int64)
    for q in range(cuda.grid(1), out_index.shape[0], cuda.gridsize(1)):
        _top_merge_one_dev(part_d, part_nn, part_i, q, heads, out_index, out_dot)


def top_codes(queries, T_packed, dim, k, out_index=None, out_dot=None):
    """The k best codes of each query, best first; returns out_index int32 (n, k).

    Same score and tie rule as `nearest_code` (top_codes(..., 1)[:, 0] == nearest_code);
    entries past the book's size are -1 (dot 0). k in 1..64. Meant for coarse routing over a
    small centroid book: on the GPU a block scores one query against a slice of the book
    (4096 - k codes at a time in shared memory, after the best k so far) and sorts those
    that reach a threshold taken from a sample of them; a second kernel merges the sorted
    slices in order.
    """
    op = "top_codes"
    dev = target(queries, T_packed, out_index, out_dot, op=op)
    dim = _check_book(op, queries, T_packed, dim)
    k = _check_int(op, "k", k, 1, _MAX_TOP_K)
    n = queries.shape[0]
    xp = xp_of(T_packed)
    if out_index is None:
        out_index = xp.empty((n, k), dtype=np.int32)
    else:
        _check_array(op, "out_index", out_index, np.int32, shape=(n, k), writeable=True)
    if out_dot is None:
        out_dot = xp.empty((n, k), dtype=np.int32)
    else:
        _check_array(op, "out_dot", out_dot, np.int32, shape=(n, k), writeable=True)
    if n == 0:
        return out_index
    K = T_packed.shape[0]
    if dev != "cpu" and dim >= _TOP_MAX_DIM:
        raise ValueError(f"{op}: dim = {dim}: the GPU kernel ranks codes by a float64 key, "
                         f"exact for dim < {_TOP_MAX_DIM}; run wider codes on the CPU")
    if dev == "cpu":
        slice_len = K  # the CPU twin is parallel over queries already
    else:
        # A block per (query, slice): slices only when there are too few queries to fill
        # the GPU (about 8 blocks a multiprocessor), of at least 4*k codes.
        want = 2 if simulator() else 8 * _sm_count()
        S = max(1, min(_MAX_TOP_SLICES, -(-want // n)))
        slice_len = max(2 if simulator() else 4 * k, -(-K // S))
    S = -(-K // slice_len)
    part_d = xp.empty((S, n, k), dtype=np.int32)
    part_nn = xp.empty((S, n, k), dtype=np.int32)
    part_i = xp.empty((S, n, k), dtype=np.int32)
    if dev == "cpu":
        _top_codes_partial_cpu(queries, T_packed, np.int64(slice_len), part_d, part_nn, part_i)
        _top_codes_merge_cpu(part_d, part_nn, part_i, out_index, out_dot)
    else:
        threads = 32 if simulator() else _TOP_THREADS
        # the simulator scores 128 keys a pass and samples 32, so tiny books take every path
        sort_len, cand_len = (128, 32) if simulator() else (_TOP_SORT, _TOP_CAND)
        launch(_top_codes_partial_cuda, min(S * n, _grid_cap()), threads, queries, T_packed,
               np.int64(slice_len), np.int64(sort_len), np.int64(cand_len), part_d, part_nn,
               part_i)
        blocks = max(1, min(_grid_cap(), -(-n // _THREADS)))
        launch(_top_codes_merge_cuda, blocks, _THREADS, part_d, part_nn, part_i, out_index,
               out_dot)
    return out_index


def top_codes_reference(queries, T_packed, dim, k):
    d, score = code_scores_reference(queries, T_packed, dim)
    n, K = score.shape
    out = np.full((n, k), -1, dtype=np.int32)
    dots = np.zeros((n, k), dtype=np.int32)
    for q in range(n):
        order = np.lexsort((np.arange(K), -score[q]))[:k]  # score down, then index up
        out[q, :len(order)] = order
        dots[q, :len(order)] = d[q, order]
    return out, dots


# --------------------------------------------------------------------------------------------
# 4. Exact search inside probed partitions (routed search).
#
# Partition-major: a query's probes are (query, probe slot) pairs; `_group_probes` and
# `_place_probes` list each partition's pairs (a counting sort), and a block scans a partition
# once for up to 32 of its pairs at a time (lane l of every warp holds pair l's query; the
# warps split the codes). Each pair's best goes to its own slot and `_nearest_merge` takes each
# query's best slot, so the result does not depend on the order in which the GPU's atomics
# listed the pairs. The query-major scan this replaces (a block per query over its probes'
# codes) read every code once per probing query: 5.7 ms a call against 2.2 ms, for 2048
# queries probing 48 of 3162 partitions of 10M random codes (H200). More groups of pairs
# side by side, or fewer registers (more blocks a multiprocessor), did not change the time:
# the scoring loop's instructions bound it. The tensor-core kernel below takes 1.06 ms at
# that shape (same results); 8 warps a block instead of 4, 1024-code tiles instead of 512
# or 64-80 registers instead of 94 moved it by less than 0.1 ms either way.

_PART_WARPS = 8
_PART_THREADS = 32 * _PART_WARPS  # a literal for the shared arrays' size
_PART_GROUPS = 4


@numba.njit(cache=True)
def _group_probes_cpu(probe, counts, rank):
    nprobe = probe.shape[1]
    for pair in range(probe.shape[0] * nprobe):
        p = probe[pair // nprobe, pair % nprobe]
        rank[pair] = counts[p]
        counts[p] += 1


@cuda.jit(cache=True)
def _group_probes_cuda(probe, counts, rank):
    # counts[p]: pairs that probe p; rank: a pair's place among them (in any order)
    nprobe = probe.shape[1]
    for pair in range(cuda.grid(1), probe.shape[0] * nprobe, cuda.gridsize(1)):
        rank[pair] = cuda.atomic.add(counts, probe[pair // nprobe, pair % nprobe], 1)


@numba.njit(cache=True)
def _place_probes_cpu(probe, pair_offsets, rank, pairs):
    nprobe = probe.shape[1]
    for pair in range(probe.shape[0] * nprobe):
        pairs[pair_offsets[probe[pair // nprobe, pair % nprobe]] + rank[pair]] = pair


@cuda.jit(cache=True)
def _place_probes_cuda(probe, pair_offsets, rank, pairs):
    nprobe = probe.shape[1]
    for pair in range(cuda.grid(1), probe.shape[0] * nprobe, cuda.gridsize(1)):
        pairs[pair_offsets[probe[pair // nprobe, pair % nprobe]] + rank[pair]] = pair


@numba.njit(parallel=True, cache=True)
def _search_partitions_cpu(queries, T_packed, partition_offsets, partition_codes, pair_offsets,
                           pairs, part_d, part_nn, part_i):
    nprobe = part_i.shape[0]
    for p in numba.prange(partition_offsets.shape[0] - 1):
        for e in range(pair_offsets[p], pair_offsets[p + 1]):
            pair = pairs[e]
            q = pair // nprobe
            bd = np.int64(0)
            bn = np.int64(1)
            bi = np.int64(-1)
            for pos in range(partition_offsets[p], partition_offsets[p + 1]):
                c = np.int64(partition_codes[pos])
                d = _trit_dot(queries, q, T_packed, c)
                nn = _code_nn(T_packed, c)
                if _beats(d, nn, c, bd, bn, bi):
                    bd = d
                    bn = nn
                    bi = c
            part_d[pair - q * nprobe, q] = bd
            part_nn[pair - q * nprobe, q] = bn
            part_i[pair - q * nprobe, q] = bi


@cuda.jit(cache=True)
def _search_partitions_cuda(queries, T_packed, partition_offsets, partition_codes, pair_offsets,
                            pairs, part_d, part_nn, part_i):
    # Block (p, y) takes partition p's pairs y, y + gridDim.y, ... in groups of 32. The block
    # loads the partition's codes a tile of one per thread at a time (index, nn and the first
    # two 32-trit groups into shared memory: the loads of a tile overlap), then warp w scores
    # the tile's w-th 32 codes against its lanes' queries, reading each code at once.
    t_c = cuda.shared.array(_PART_THREADS, numba.int32)
    t_nn = cuda.shared.array(_PART_THREADS, numba.int32)
    t_w = cuda.shared.array((_PART_THREADS, 4), numba.uint32)
    s_d = cuda.shared.array(_PART_THREADS, numba.int32)
    s_nn = cuda.shared.array(_PART_THREADS, numba.int32)
    s_i = cuda.shared.array(_PART_THREADS, numba.int32)
    nprobe = part_i.shape[0]
    W = queries.shape[1]
    tid = cuda.threadIdx.x
    threads = cuda.blockDim.x
    lane = tid & 31
    warp = tid >> 5
    zero = np.uint32(0)
    for p in range(cuda.blockIdx.x, partition_offsets.shape[0] - 1, cuda.gridDim.x):
        lo = partition_offsets[p]
        hi = partition_offsets[p + 1]
        last = pair_offsets[p + 1]
        for first in range(pair_offsets[p] + 32 * cuda.blockIdx.y, last, 32 * cuda.gridDim.y):
            e = first + lane
            active = e < last
            q = pairs[e] // nprobe if active else 0
            # the query's first two 32-trit groups in registers (dim <= 64: all of it)
            qp0 = queries[q, 0]
            qm0 = queries[q, 1]
            qp1 = queries[q, 2] if W > 2 else zero
            qm1 = queries[q, 3] if W > 2 else zero
            bd = np.int64(0)
            bn = np.int64(1)
            bi = np.int64(-1)
            for base in range(lo, hi, threads):
                pos = base + tid
                if pos < hi:
                    c = partition_codes[pos]
                    t_c[tid] = c
                    t_w[tid, 0] = T_packed[c, 0]
                    t_w[tid, 1] = T_packed[c, 1]
                    t_w[tid, 2] = T_packed[c, 2] if W > 2 else zero
                    t_w[tid, 3] = T_packed[c, 3] if W > 2 else zero
                    nnz = np.int32(0)
                    for w in range(0, W, 2):
                        nnz += np.int32(cuda.popc(T_packed[c, w] | T_packed[c, w + 1]))
                    t_nn[tid] = max(nnz, np.int32(1))
                cuda.syncthreads()
                if active:
                    for t in range(warp * 32, min(warp * 32 + 32, hi - base)):
                        cp = t_w[t, 0]
                        cm = t_w[t, 1]
                        d = (np.int32(cuda.popc((qp0 & cp) | (qm0 & cm)))
                             - np.int32(cuda.popc((qp0 & cm) | (qm0 & cp))))
                        cp = t_w[t, 2]
                        cm = t_w[t, 3]
                        d += (np.int32(cuda.popc((qp1 & cp) | (qm1 & cm)))
                              - np.int32(cuda.popc((qp1 & cm) | (qm1 & cp))))
                        c = np.int64(t_c[t])
                        for w in range(4, W, 2):
                            qp = queries[q, w]
                            qm = queries[q, w + 1]
                            cp = T_packed[c, w]
                            cm = T_packed[c, w + 1]
                            d += (np.int32(cuda.popc((qp & cp) | (qm & cm)))
                                  - np.int32(cuda.popc((qp & cm) | (qm & cp))))
                        nn = np.int64(t_nn[t])
                        # _beats, unrolled: d·|d|/nn against the best's, exactly, ties to
                        # the lower index
                        lhs = d * abs(d) * bn
                        rhs = bd * abs(bd) * nn
                        if bi < 0 or lhs > rhs or (lhs == rhs and c < bi):
                            bd = d
                            bn = nn
                            bi = c
                cuda.syncthreads()  # the next tile reuses the shared arrays
            s_d[tid] = bd
            s_nn[tid] = bn
            s_i[tid] = bi
            cuda.syncthreads()
            if warp == 0 and active:
                for w in range(1, threads >> 5):
                    t = w * 32 + lane
                    if _beats(np.int64(s_d[t]), np.int64(s_nn[t]), np.int64(s_i[t]), bd, bn, bi):
                        bd = np.int64(s_d[t])
                        bn = np.int64(s_nn[t])
                        bi = np.int64(s_i[t])
                pair = pairs[e]
                part_d[pair - q * nprobe, q] = bd
                part_nn[pair - q * nprobe, q] = bn
                part_i[pair - q * nprobe, q] = bi
            cuda.syncthreads()  # the next pairs reuse the shared arrays


# Tensor-core variant (dim <= 64), as nearest_code's: a block takes one group of up to
# _PMMA_ROWS pairs of one partition (a warp holds their queries' int8 A fragments, _PMMA_MT
# m-tiles of 16) and its warps split the partition's codes, 8 (one n-tile) a step, staged a
# tile at a time in shared memory with their nonzero counts. Groups are work items listed
# by a prefix sum over the partitions (ceil(pairs / _PMMA_ROWS) each), so a partition many
# queries probe spreads over as many blocks as it has groups, whatever the skew; a block
# finds its partition by a binary search of the list.
_PMMA_MT = 2
_PMMA_ROWS = 16 * _PMMA_MT
_PMMA_WARPS = 4
_PMMA_TILE = 512   # codes staged a pass: a multiple of 8 * _PMMA_WARPS


@cuda.jit(cache=True)
def _search_partitions_mma_cuda(queries, T_packed, partition_offsets, partition_codes,
                                pair_offsets, pairs, work_offsets, part_d, part_nn, part_i):
    # Lane 4*gid + tq holds, per m-tile, the A fragments of rows gid and gid + 8, and after
    # each mma the dots of those rows with codes a = n0 + 2tq and a + 1 of the step. It keeps
    # the best it sees for its rows; the block's (warp, tq) bests of a row are merged at the
    # end. Codes of a partition come in list order, not index order, so an equal score
    # replaces the best when its index is lower. The filter of nearest_code's mma kernel,
    # made non-strict for that tie rule: with m = max(d_a, d_b), nn_lo = min(nn_a, nn_b), a
    # code can beat or tie (key, nn) only if m*|m| * nn >= key * nn_lo when key >= 0.
    t_c = cuda.shared.array(_PMMA_TILE, numba.int32)
    t_nn = cuda.shared.array(_PMMA_TILE, numba.float32)
    t_w = cuda.shared.array((_PMMA_TILE, 4), numba.uint32)
    s_key = cuda.shared.array((_PMMA_WARPS, _PMMA_ROWS, 4), numba.float32)
    s_nn = cuda.shared.array((_PMMA_WARPS, _PMMA_ROWS, 4), numba.float32)
    s_i = cuda.shared.array((_PMMA_WARPS, _PMMA_ROWS, 4), numba.int32)
    A = cuda.local.array((_PMMA_MT, 8), numba.uint32)
    best_key = cuda.local.array((_PMMA_MT, 2), numba.float32)  # d*|d| of the best, exact
    best_nn = cuda.local.array((_PMMA_MT, 2), numba.float32)
    best_i = cuda.local.array((_PMMA_MT, 2), numba.int32)
    filt_key = cuda.local.array((_PMMA_MT, 2), numba.float32)  # best_key, or -1e30 if < 0
    R = cuda.local.array((_PMMA_MT, 4), numba.int32)
    nprobe = part_i.shape[0]
    P = partition_offsets.shape[0] - 1
    two_groups = queries.shape[1] == 4
    tid = cuda.threadIdx.x
    threads = cuda.blockDim.x
    warps = threads >> 5
    lane = tid & 31
    warp = tid >> 5
    gid = lane >> 2
    tq = lane & 3
    zero = np.uint32(0)
    for item in range(cuda.blockIdx.x, work_offsets[P], cuda.gridDim.x):
        p = 0          # the last partition whose items start at or before this one
        above = P
        while above - p > 1:
            mid = (p + above) >> 1
            if work_offsets[mid] <= item:
                p = mid
            else:
                above = mid
        first = pair_offsets[p] + _PMMA_ROWS * (item - work_offsets[p])
        last = min(pair_offsets[p + 1], first + _PMMA_ROWS)
        n_mt = (last - first + 15) >> 4   # the same for the whole block
        for mt in range(_PMMA_MT):
            for h in range(2):
                e = first + 16 * mt + gid + 8 * h
                q = pairs[e] // nprobe if e < last else 0
                A[mt, h], A[mt, 2 + h], A[mt, 4 + h], A[mt, 6 + h] = _query_fragments_dev(
                    queries, q, e < last, two_groups, tq)
                best_key[mt, h] = _NO_SCORE
                best_nn[mt, h] = np.float32(1.0)
                best_i[mt, h] = -1
                filt_key[mt, h] = _NO_SCORE
        lo = partition_offsets[p]
        hi = partition_offsets[p + 1]
        for base in range(lo, hi, _PMMA_TILE):
            for t in range(tid, _PMMA_TILE, threads):
                pos = base + t
                c = np.int32(-1)   # past the partition: no code, scores nothing
                w0 = zero
                w1 = zero
                w2 = zero
                w3 = zero
                if pos < hi:
                    c = partition_codes[pos]
                    uc = np.uint64(c)
                    w0 = T_packed[uc, np.uint64(0)]
                    w1 = T_packed[uc, np.uint64(1)]
                    if two_groups:
                        w2 = T_packed[uc, np.uint64(2)]
                        w3 = T_packed[uc, np.uint64(3)]
                t_c[t] = c
                t_w[t, 0] = w0
                t_w[t, 1] = w1
                t_w[t, 2] = w2
                t_w[t, 3] = w3
                nnz = np.int32(cuda.popc(w0 | w1)) + np.int32(cuda.popc(w2 | w3))
                t_nn[t] = np.float32(max(nnz, np.int32(1)))
            cuda.syncthreads()
            # every warp takes the same number of steps (the simulator's mma is block-wide)
            steps = -(-min(_PMMA_TILE, hi - base) // 8)
            steps = -(-steps // warps) * warps
            for s in range(warp, steps, warps):
                n0 = 8 * s
                b = n0 + gid
                b0 = _trit_bytes(t_w[b, 0], t_w[b, 1], 4 * tq)
                b1 = _trit_bytes(t_w[b, 0], t_w[b, 1], 16 + 4 * tq)
                b2 = _trit_bytes(t_w[b, 2], t_w[b, 3], 4 * tq)
                b3 = _trit_bytes(t_w[b, 2], t_w[b, 3], 16 + 4 * tq)
                for mt in range(_PMMA_MT):
                    if mt < n_mt:
                        r0, r1, r2, r3 = _mma_s8(A[mt, 0], A[mt, 1], A[mt, 2], A[mt, 3], b0,
                                                 b1, _F32_BIAS_BITS, _F32_BIAS_BITS,
                                                 _F32_BIAS_BITS, _F32_BIAS_BITS)
                        R[mt, 0], R[mt, 1], R[mt, 2], R[mt, 3] = _mma_s8(
                            A[mt, 4], A[mt, 5], A[mt, 6], A[mt, 7], b2, b3, r0, r1, r2, r3)
                a = n0 + 2 * tq
                nn_a = t_nn[a]
                nn_b = t_nn[a + 1]
                nn_lo = min(nn_a, nn_b)
                for mt in range(_PMMA_MT):
                    if mt < n_mt:
                        for h in range(2):
                            ra = R[mt, 2 * h]
                            rb = R[mt, 2 * h + 1]
                            m = _f32_from_bits(max(ra, rb)) - _F32_BIAS
                            # every term an integer below 2**24: float32 is exact here
                            if m * abs(m) * best_nn[mt, h] - filt_key[mt, h] * nn_lo >= 0:
                                for v in range(2):
                                    c = t_c[a + v]
                                    nn = nn_a if v == 0 else nn_b
                                    d = _f32_from_bits(ra if v == 0 else rb) - _F32_BIAS
                                    key = d * abs(d)
                                    diff = key * best_nn[mt, h] - best_key[mt, h] * nn
                                    if c >= 0 and (diff > 0 or (diff == 0 and c < best_i[mt, h])):
                                        best_key[mt, h] = key
                                        best_nn[mt, h] = nn
                                        best_i[mt, h] = c
                                        filt_key[mt, h] = key if key >= 0 else _NO_SCORE
            cuda.syncthreads()  # the next tile reuses the shared arrays
        for mt in range(_PMMA_MT):
            for h in range(2):
                row = 16 * mt + gid + 8 * h
                s_key[warp, row, tq] = best_key[mt, h]
                s_nn[warp, row, tq] = best_nn[mt, h]
                s_i[warp, row, tq] = best_i[mt, h]
        cuda.syncthreads()
        for row in range(tid, last - first, threads):
            bk = _NO_SCORE
            bn = np.float32(1.0)
            bi = np.int32(-1)
            for w in range(warps):
                for t in range(4):
                    i = s_i[w, row, t]
                    diff = s_key[w, row, t] * bn - bk * s_nn[w, row, t]
                    if i >= 0 and (bi < 0 or diff > 0 or (diff == 0 and i < bi)):
                        bk = s_key[w, row, t]
                        bn = s_nn[w, row, t]
                        bi = i
            d = np.int32(0)
            if bi >= 0:  # bk = d*|d| is a perfect square: its root is exact
                d = np.int32(round(_sqrt_f32(abs(bk))))
                if bk < 0:
                    d = -d
            pair = pairs[first + row]
            q = pair // nprobe
            part_d[pair - q * nprobe, q] = d
            part_nn[pair - q * nprobe, q] = np.int32(bn)
            part_i[pair - q * nprobe, q] = bi
        cuda.syncthreads()  # the next item reuses the shared arrays


def nearest_code_in_partitions(queries, T_packed, dim, partition_offsets, partition_codes,
                               probe, out_index=None, out_dot=None, *, check=True,
                               method="auto"):
    """Exact nearest code among the codes of each query's probed partitions.

    The book's codes are grouped by partition through an index permutation: partition p holds
    codes partition_codes[partition_offsets[p]:partition_offsets[p + 1]].
    partition_offsets int64 (P+1,) rising from 0 to len(partition_codes); partition_codes
    int32 in [0, K); probe int32 (n, nprobe) in [0, P) (e.g. from top_codes over P centroids;
    a partition probed twice is harmless). Score and ties as `nearest_code` (ties go to the
    lowest code index, whatever the list order). A query whose probed partitions are all empty
    gets index -1 and dot 0. Returns out_index int32 (n,).
    `check=False` skips the range/monotonicity checks (one host sync on the GPU).
    method: "auto" (the int8 tensor cores when on a GPU and dim <= 64), "mma" or "scan"
    (tests and benchmarks; same results), as in `nearest_code`.
    Transients: 5 int32 per (query, probe) pair and the partitions' pair counts. Each
    partition's codes are read once per 32 queries that probe it.
    """
    op = "nearest_code_in_partitions"
    dev = target(queries, T_packed, partition_offsets, partition_codes, probe, out_index,
                 out_dot, op=op)
    dim = _check_book(op, queries, T_packed, dim)
    n = queries.shape[0]
    K = T_packed.shape[0]
    _check_array(op, "partition_offsets", partition_offsets, np.int64, ndim=1)
    P = partition_offsets.shape[0] - 1
    if P < 1:
        raise ValueError(f"{op}: partition_offsets has shape {tuple(partition_offsets.shape)}, "
                         "expected (P + 1,) with at least one partition")
    _check_array(op, "partition_codes", partition_codes, np.int32, ndim=1)
    if not (hasattr(probe, "dtype") and probe.dtype == np.int32):
        raise TypeError(f"{op}: probe has dtype {getattr(probe, 'dtype', type(probe).__name__)}"
                        ", expected int32 (n, nprobe)")
    _check_array(op, "probe", probe, np.int32, ndim=2)
    if probe.shape[0] != n:
        raise ValueError(f"{op}: probe has shape {tuple(probe.shape)}, expected ({n}, nprobe) "
                         "to match the queries")
    xp = xp_of(T_packed)
    out_index = _check_out(op, "out_index", out_index, n, xp)
    dot = _check_out(op, "out_dot", out_dot, n, xp)
    use_mma = _use_mma(op, method, dev, dim)
    if check:
        L = partition_codes.shape[0]
        parts = [partition_offsets[0], partition_offsets[-1],
                 (partition_offsets[1:] < partition_offsets[:-1]).sum()]
        parts += [partition_codes.min(), partition_codes.max()] if L else [0, 0]
        parts += [probe.min(), probe.max()] if probe.size else [0, 0]
        stats = xp.stack([xp.asarray(v, dtype=np.int64) for v in parts])
        first, last, falls, cmin, cmax, pmin, pmax = (int(v) for v in stats.tolist())
        if first != 0 or last != L or falls:
            raise ValueError(f"{op}: partition_offsets must rise from 0 to "
                             f"len(partition_codes) = {L}; got offsets[0] = {first}, "
                             f"offsets[-1] = {last}, {falls} decreasing step(s)")
        if L and (cmin < 0 or cmax >= K):
            raise ValueError(f"{op}: partition_codes holds {cmin if cmin < 0 else cmax}, "
                             f"expected code indices in [0, {K})")
        if probe.size and (pmin < 0 or pmax >= P):
            raise ValueError(f"{op}: probe holds {pmin if pmin < 0 else pmax}, expected "
                             f"partition indices in [0, {P})")
    if n == 0:
        return out_index
    nprobe = probe.shape[1]
    pairs_n = n * nprobe
    counts = xp.zeros(P, dtype=np.int32)
    rank = xp.empty(pairs_n, dtype=np.int32)
    pair_offsets = xp.zeros(P + 1, dtype=np.int64)
    pairs = xp.empty(pairs_n, dtype=np.int32)
    # probe-major, as nearest_code's chunk-major partial results: the same merge takes the
    # best of each query's
    part_d = xp.empty((nprobe, n), dtype=np.int32)
    part_nn = xp.empty((nprobe, n), dtype=np.int32)
    part_i = xp.empty((nprobe, n), dtype=np.int32)
    search = (queries, T_packed, partition_offsets, partition_codes, pair_offsets, pairs,
              part_d, part_nn, part_i)
    if dev == "cpu":
        _group_probes_cpu(probe, counts, rank)
        pair_offsets[1:] = np.cumsum(counts)
        _place_probes_cpu(probe, pair_offsets, rank, pairs)
        _search_partitions_cpu(*search)
        _nearest_merge_cpu(part_d, part_nn, part_i, out_index, dot)
    else:
        threads = 32 if simulator() else _THREADS
        blocks = max(1, min(_grid_cap(), -(-pairs_n // threads)))
        launch(_group_probes_cuda, blocks, threads, probe, counts, rank)
        pair_offsets[1:] = xp.cumsum(counts)
        launch(_place_probes_cuda, blocks, threads, probe, pair_offsets, rank, pairs)
        if use_mma:
            # work items: each partition's groups of _PMMA_ROWS pairs, listed by a prefix sum
            work_offsets = xp.zeros(P + 1, dtype=np.int64)
            work_offsets[1:] = xp.cumsum((counts + (_PMMA_ROWS - 1)) // _PMMA_ROWS)
            items = P + -(-pairs_n // _PMMA_ROWS)   # at most; the kernel reads the count
            warps = 2 if simulator() else _PMMA_WARPS
            launch(_search_partitions_mma_cuda, min(items, _grid_cap()), 32 * warps,
                   *search[:6], work_offsets, *search[6:])
        else:
            # up to _PART_GROUPS groups of 32 pairs of one partition run side by side
            launch(_search_partitions_cuda,
                   (min(P, _grid_cap()), 2 if simulator() else _PART_GROUPS),
                   64 if simulator() else _PART_THREADS, *search)
        blocks = max(1, min(_grid_cap(), -(-n // threads)))
        launch(_nearest_merge_cuda, blocks, threads, part_d, part_nn, part_i, out_index, dot)
    return out_index


def nearest_code_in_partitions_reference(queries, T_packed, dim, partition_offsets,
                                         partition_codes, probe):
    d, score = code_scores_reference(queries, T_packed, dim)
    n = d.shape[0]
    out = np.full(n, -1, dtype=np.int32)
    dots = np.zeros(n, dtype=np.int32)
    offsets = np.asarray(partition_offsets)
    codes = np.asarray(partition_codes)
    for q in range(n):
        cand = np.unique(np.concatenate(
            [codes[offsets[p]:offsets[p + 1]] for p in np.asarray(probe)[q]]))
        if cand.size:
            best = cand[np.argmax(score[q, cand])]  # cand is sorted: first max = lowest index
            out[q] = best
            dots[q] = d[q, best]
    return out, dots


# --------------------------------------------------------------------------------------------
# 5. Code usage counts: int16, saturating.


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
    _check_array(op, "usage", usage, np.int16, ndim=1, writeable=True)
    K = usage.shape[0]
    _check_indices(op, "indices", indices, K, check, what="code indices")
    if indices.shape[0] == 0 or K == 0:
        return usage
    tally = xp_of(usage).zeros(K, dtype=np.int32)
    if dev == "cpu":
        _tally_cpu(indices, tally)
        _apply_tally_cpu(indices, tally, usage)
    else:
        blocks = max(1, min(_grid_cap(), -(-indices.shape[0] // 256)))
        launch(_tally_cuda, blocks, 256, indices, tally)
        launch(_apply_tally_cuda, blocks, 256, indices, tally, usage)
    return usage


def count_usage_reference(indices, usage):
    counts = np.bincount(np.asarray(indices, dtype=np.int64), minlength=usage.shape[0])
    return np.minimum(usage.astype(np.int64) + counts, USAGE_MAX).astype(np.int16)
