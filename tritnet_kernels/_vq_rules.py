"""What every nearest-code search shares: the int8 mma and bit-cast intrinsics, the trit
scoring rules, the search geometry and the argument checks (vq_search.py states the distance).

The rules are njit functions: the CPU twins call them, numba-cuda compiles them into the
kernels, and the simulator gets the Python function through `on_device`.
"""

from . import _numba_compat  # noqa: F401  (must precede numba.cuda)

import math
import threading

import numba
import numpy as np
from numba import cuda

from ._common import MAX_BLOCKS, SIMULATOR_MAX_BLOCKS, check_array, check_int
from ._launch import on_device, simulator

MAX_TOP_K = 64
MAX_TOP_SLICES = 64
THREADS = 128

# Tensor-core search geometry: a warp owns MMA_MT m-tiles of 16 queries (their int8 A
# fragments stay in registers), a block MMA_WARPS warps; all warps of a block stream the same
# chunk of the book, 8 codes (one n-tile) per step.
MMA_MT = 4
MMA_WARPS = 4
MMA_QPW = 16 * MMA_MT
# int32 bits of float32 1.5 * 2**23: an mma accumulator started here reads, as a float, as
# exactly 1.5 * 2**23 + d for |d| < 2**22, so the epilogue gets d as a float without a
# conversion instruction (the compare below is float arithmetic on small integers: exact).
F32_BIAS_BITS = np.int32(0x4B400000)
F32_BIAS = np.float32(12582912.0)
NO_SCORE = np.float32(-1.0e30)


# --------------------------------------------------------------------------------------------
# Device intrinsics: the int8 mma and a float bit cast, each with a simulator twin.

if simulator():
    _mma_slots = {}

    def s8x4(word):
        return np.array([word], dtype=np.uint32).view(np.int8).astype(np.int64)

    def mma_s8(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
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
            A[g, 4 * t:4 * t + 4] = s8x4(x0)
            A[g + 8, 4 * t:4 * t + 4] = s8x4(x1)
            A[g, 16 + 4 * t:20 + 4 * t] = s8x4(x2)
            A[g + 8, 16 + 4 * t:20 + 4 * t] = s8x4(x3)
            B[4 * t:4 * t + 4, g] = s8x4(y0)
            B[16 + 4 * t:20 + 4 * t, g] = s8x4(y1)
        D = A @ B
        g, t = lane >> 2, lane & 3
        return (np.int32(int(c0) + D[g, 2 * t]), np.int32(int(c1) + D[g, 2 * t + 1]),
                np.int32(int(c2) + D[g + 8, 2 * t]), np.int32(int(c3) + D[g + 8, 2 * t + 1]))

    def f32_from_bits(word):
        return np.array([word], dtype=np.int32).view(np.float32)[0]

else:
    from llvmlite import ir
    from numba import types
    from numba.cuda.extending import intrinsic

    @intrinsic
    def mma_s8(typingctx, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
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
    def f32_from_bits(typingctx, word):
        def codegen(context, builder, sig, args):
            return builder.bitcast(args[0], ir.FloatType())

        return types.float32(types.int32), codegen


# --------------------------------------------------------------------------------------------
# Shared scalar helpers (njit: the CPU twins call them, numba-cuda compiles them into kernels).


@numba.njit(cache=True)
def popc(x):
    """Population count of a 32-bit value (SWAR; LLVM turns it into one popcnt on the CPU)."""
    x = np.uint64(x) & np.uint64(0xFFFFFFFF)
    x = x - ((x >> np.uint64(1)) & np.uint64(0x5555555555555555))
    x = (x & np.uint64(0x3333333333333333)) + ((x >> np.uint64(2)) & np.uint64(0x3333333333333333))
    x = (x + (x >> np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    return np.int64((x * np.uint64(0x0101010101010101)) >> np.uint64(56))


@numba.njit(cache=True)
def group_dot(qp, qm, cp, cm):
    """The dot of one 32-trit group: 2 popcounts of disjoint agree / disagree sets."""
    qp = np.uint64(qp)
    qm = np.uint64(qm)
    cp = np.uint64(cp)
    cm = np.uint64(cm)
    return popc((qp & cp) | (qm & cm)) - popc((qp & cm) | (qm & cp))


@numba.njit(cache=True)
def group_nnz(cp, cm):
    return popc(np.uint64(cp) | np.uint64(cm))


# The scan kernels below loop over groups themselves, scoring dot and nnz in one pass over a
# code's words; `trit_dot`, `code_nn` serve the CPU twins. Row and merge rules that both
# twins share are njit functions that a kernel reaches through `on_device` (the simulator
# cannot hand its device arrays to the compiled function, so it gets the Python one).


@numba.njit(cache=True)
def trit_dot(queries, q, T_packed, c):
    d = np.int64(0)
    for w in range(0, queries.shape[1], 2):
        d += group_dot(queries[q, w], queries[q, w + 1], T_packed[c, w], T_packed[c, w + 1])
    return d


@numba.njit(cache=True)
def code_nn(T_packed, c):
    nnz = np.int64(0)
    for w in range(0, T_packed.shape[1], 2):
        nnz += group_nnz(T_packed[c, w], T_packed[c, w + 1])
    return max(nnz, np.int64(1))


@numba.njit(cache=True)
def beats(d, nn, idx, best_d, best_nn, best_idx):
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
def trit_bytes(plus, minus, shift):
    """Four trits at bit `shift` of a group as int8x4 in a uint32 (0x01 = +1, 0xFF = -1)."""
    p = ((np.uint64(plus) >> np.uint64(shift)) & np.uint64(0xF)) * np.uint64(0x00204081)
    m = ((np.uint64(minus) >> np.uint64(shift)) & np.uint64(0xF)) * np.uint64(0x00204081)
    p &= np.uint64(0x01010101)
    m &= np.uint64(0x01010101)
    # A valid trit never has both bits, so no byte carries into the next.
    return np.uint32(p + m * np.uint64(0xFF))


@numba.njit(cache=True)
def query_fragments(queries, q, valid, two_groups, tq):
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
    return (trit_bytes(p0, m0, 4 * tq), trit_bytes(p0, m0, 16 + 4 * tq),
            trit_bytes(p1, m1, 4 * tq), trit_bytes(p1, m1, 16 + 4 * tq))


query_fragments_dev = on_device(query_fragments)


@numba.njit(cache=True)
def sqrt_f32(x):
    return math.sqrt(np.float32(x))


def grid_cap():
    return SIMULATOR_MAX_BLOCKS if simulator() else MAX_BLOCKS




# --------------------------------------------------------------------------------------------
# Checks and geometry shared by the searches.


def check_book(op, queries, T_packed, dim):
    dim = check_int(op, "dim", dim, 1, 1 << 20)
    words = 2 * -(-dim // 32)
    check_array(op, "T_packed", T_packed, np.uint32, ndim=2)
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
    check_array(op, "queries", queries, np.uint32, ndim=2)
    return dim


def check_out(op, name, out, n, xp, dtype=np.int32):
    if out is None:
        return xp.empty(n, dtype=dtype)
    check_array(op, name, out, dtype, shape=(n,), writeable=True)
    return out


def sm_count():
    if simulator():
        return 1
    import cupy

    return int(cupy.cuda.Device().attributes["MultiProcessorCount"])


def uses_mma(op, method, dev, dim):
    """Whether a search runs on the int8 tensor cores: method "mma", or "auto" with dim <= 64
    (on the CPU the answer is not used); "scan" never. Refuses other methods, and "mma" where
    it cannot run."""
    if method not in ("auto", "mma", "scan"):
        raise ValueError(f"{op}: method = {method!r}, expected 'auto', 'mma' or 'scan'")
    if method == "mma" and (dev == "cpu" or dim > 64):
        raise ValueError(f"{op}: method 'mma' needs a GPU (or the simulator) and dim <= 64, "
                         f"got device {dev} and dim={dim}")
    return method == "mma" or (method == "auto" and dim <= 64)


def unpack_bits(words, dim):
    """Bitplane rows -> trits int8 (rows, dim), straight from the bits (not via the kernels)."""
    words = np.ascontiguousarray(words, dtype=np.uint32)
    rows, W = words.shape
    bits = np.unpackbits(words.view(np.uint8), axis=1, bitorder="little")
    bits = bits.reshape(rows, W // 2, 2, 32).astype(np.int8)
    return (bits[:, :, 0] - bits[:, :, 1]).reshape(rows, -1)[:, :dim]


# The in-order merge of per-chunk (or per-probe) bests, shared by both searches.


@numba.njit(cache=True)
def nearest_merge_one(part_dot, part_nnz, part_index, q, out_index, out_dot):
    """The best of query q's per-chunk winners (ties: lower index)."""
    bd = np.int64(0)
    bn = np.int64(1)
    bi = np.int64(-1)
    for ck in range(part_index.shape[0]):
        if beats(np.int64(part_dot[ck, q]), np.int64(part_nnz[ck, q]),
                 np.int64(part_index[ck, q]), bd, bn, bi):
            bd = np.int64(part_dot[ck, q])
            bn = np.int64(part_nnz[ck, q])
            bi = np.int64(part_index[ck, q])
    out_index[q] = bi
    out_dot[q] = bd


nearest_merge_one_dev = on_device(nearest_merge_one)


@numba.njit(parallel=True, cache=True)
def nearest_merge_cpu(part_dot, part_nnz, part_index, out_index, out_dot):
    for q in numba.prange(out_index.shape[0]):
        nearest_merge_one(part_dot, part_nnz, part_index, q, out_index, out_dot)


@cuda.jit(cache=True)
def nearest_merge_cuda(part_dot, part_nnz, part_index, out_index, out_dot):
    for q in range(cuda.grid(1), out_index.shape[0], cuda.gridsize(1)):
        nearest_merge_one_dev(part_dot, part_nnz, part_index, q, out_index, out_dot)
