"""Packed-trit matmul: y = x · (diag(s)·T)ᵀ and its input gradient gx = gy · diag(s)·T.

T is bitplane32 (see packing.py), s = 2 ** (E / 8) per row with E int8, computed on the fly
as exp2(E * 0.125) in float32. No float copy of the weights outlives a call
(docs/design.md#no-float-weights):
the paths below widen trits in registers, in a small reusable scratch (CPU), or into a
transient workspace freed before the call returns (GPU, large M).

Paths, chosen by shape (M = rows of x; K = cols; N = rows of T):

GPU, M <= 16 (decode / small batch): tensor-core GEMV. Each warp decodes its 16x16 tile of
    trits straight into mma fragments: a trit is one 2-bit code (nonzero, sign) that shifts
    into an fp16/bf16 +-2.0 (bits 14 and 15), two instructions per half2, then one
    `mma.sync.m16n8k16` multiplies it with x (fp16 x as is; fp32 x as bf16 hi+mid+lo, exact
    to fp32 precision). The 16-row tiles are independent, the K range is split over a second
    grid dimension when N alone cannot fill the GPU, and the last block of each row range
    adds the fp32 partial sums in a fixed order (deterministic; no float atomics).
    Weights are read once, 8 bytes per 32 trits; x is staged through shared memory.
GPU, M > 16: widen W = diag(s)·T to x's dtype in a transient (N, K) workspace and call
    cuBLAS through tritnet_kernels.float_gemm (tensor cores for fp16). Numba has no tensor-core
    matmul of its own, so an on-chip tiled kernel would run on the fp32 pipes at a fraction of
    cuBLAS's rate; the widening pass costs one write and one read of the fp16 matrix.
GPU without mma.sync (compute capability < 8.0): the generic kernels below (one thread per
    output, the CUDA twins of the CPU code) for M <= 16, widen + cuBLAS above.
CPU, M <= 8: T-MAC style lookup tables. For each 8 columns of x, the 256 subset sums are
    tabulated once; a row's dot product is then sum over bytes of LUT[plus] - LUT[minus]:
    two loads per 8 trits, the mask bytes themselves being the table indices.
CPU, M > 8: decode blocks of rows to float32 into a bounded scratch (8 MB) and call BLAS.

Measured (H100 80GB HBM3, fp16, CUDA events, medians; benchmarks/results/matmul-*.json):
    M=1,  K=N=8192        forward  19.5 us vs cuBLAS fp16 50.1 us (2.6x); backward 48.6 us (1.0x)
    M=1,  K=8192 N=28672  forward  50.5 us vs 171.9 us (3.4x);          backward 149 us (1.06x)
    M=16, K=N=8192        forward  40.2 us vs 50.8 us (1.26x);          backward 84 us (0.59x)
    M=4096, K=N=8192      forward 751 us vs 715 us (1.05x the time);    backward 747 vs 679 us
    ncu, forward M=1 8192²: 41% achieved occupancy (64 registers, 2 blocks of 512 per SM), 24%
    of DRAM bandwidth, 0.6 instructions issued per scheduler per cycle: latency-bound, not
    at the 6 us bandwidth floor. The backward issues ~3x the forward's instructions (ncu): a
    lane's fragment takes rows by t and columns by g, so 8 lanes decode the same code words.

Invalid trit codes (a bit in both masks) read as 0 on every path and padding columns never
contribute, so bad packed data cannot fault a device; but codes are not re-validated per
call (a pass over the weights would double the cost of a GEMV). Weights are validated where
they enter (pack_trits, checkpoint loading via packing.validate_packed); pass validate=True
to check them here too.

Every kernel has its twin: `_ternary_matmul_cpu` / `_ternary_matmul_cuda` (generic) and the
same for `_t` (backward) and `_widen`; the tensor-core kernels (`_mma_kernel`) are checked
against the CPU twin by the tests (and run under the simulator with an emulated mma).
"""

from . import _numba_compat  # noqa: F401  (must precede numba.cuda)

import math
import os

import numba
import numpy as np
from numba import cuda

from . import _launch, _ptx
from ._common import check_array
from . import float_gemm as kgemm
from ._launch import is_cupy, launch, on_device, simulator, target, xp_of
from .packing import n_groups, unpack_trits_reference, validate_packed

__all__ = [
    "ternary_matmul", "ternary_matmul_t", "widen",
    "ternary_matmul_reference", "ternary_matmul_t_reference",
    "scale_reference", "MMA_MAX_M",
]

MMA_MAX_M = 16            # tensor-core GEMV up to this M (two 8-column mma halves)
_CPU_LUT_MAX_M = 8        # CPU: lookup tables up to this M, BLAS on decoded rows above
_CPU_BITS_MAX_M = 8       # CPU backward: bit-table accumulation up to this M
_CPU_SCRATCH = 1 << 21    # CPU BLAS path: float32 elements of decoded rows per block (8 MB)
_GENERIC_THREADS = 128

# Tensor-core kernels: warps per block. More warps per block let one block's staged x serve
# more rows (forward: 16 per warp) or columns (backward: 32 per warp); the split of K (rows)
# over a second grid dimension then fills the GPU. The simulator runs 2 warps (Python
# threads are slow).
_FWD_WARPS = 2 if simulator() else 16
_BWD_WARPS = 2 if simulator() else 16
# 64 registers: two 512-thread blocks per SM (the driver's compiler took 68 uncapped, one
# block: ncu measured 25% occupancy and latency-bound); ptxas (sm_90) spills nothing at 64.
_fwd_jit = cuda.jit if simulator() else cuda.jit(max_registers=64)
_bwd_jit = _fwd_jit
_EVEN = np.uint32(0x55555555)
_ODD = np.uint32(0xAAAAAAAA)
_HALF2_TRIT = np.uint32(0xC000C000)       # bits 14/15 and 30/31: magnitude and sign of +-2.0
_LO16 = np.uint32(0x0000FFFF)
_HI16 = np.uint32(0xFFFF0000)
_LO32 = np.uint64(0xFFFFFFFF)
_SH32 = np.uint64(32)


# --------------------------------------------------------------------------------------------
# Shared scalar rules (numba-cuda compiles these njit functions into the kernels too).


@numba.njit(cache=True)
def _scale(e):
    """s = f(E) = 2 ** (E / 8) in float32."""
    return np.float32(math.exp2(np.float32(e) * np.float32(0.125)))


@numba.njit(cache=True)
def _trit(T_packed, r, c):
    """T[r, c] in {-1, 0, 1} (a code with both bits set reads as 0)."""
    g = c >> 5
    b = c & 31
    return np.int32((T_packed[r, 2 * g] >> b) & 1) - np.int32((T_packed[r, 2 * g + 1] >> b) & 1)


_scale_dev = on_device(_scale)
_trit_dev = on_device(_trit)

# CPU lookup-table helpers: trailing-zero count and the bits of each byte value.
_CTZ8 = np.array([0] + [(v & -v).bit_length() - 1 for v in range(1, 256)], np.int64)
_BITS8 = ((np.arange(256)[:, None] >> np.arange(8)) & 1).astype(np.float32)


# --------------------------------------------------------------------------------------------
# CPU twins.


@numba.njit(parallel=True, cache=True)
def _ternary_matmul_cpu(x, T_packed, E, y):
    M, K = x.shape
    N = T_packed.shape[0]
    G = T_packed.shape[1] // 2
    # Bytes of the masks (little-endian): group g's PLUS bytes are 8g..8g+3, MINUS 8g+4..8g+7,
    # so a byte load is a table index: no shifts in the inner loop.
    T8 = T_packed.view(np.uint8)
    nchunk = 4 * G                       # 8-column chunks, one byte of a mask word each
    lut = np.empty((M, nchunk, 256), np.float32)
    for mj in numba.prange(M * nchunk):
        m = mj // nchunk
        j = mj - m * nchunk
        xs = np.zeros(8, np.float32)
        for i in range(min(8, K - 8 * j)):
            xs[i] = x[m, 8 * j + i]
        # two 16-entry subset-sum tables (low and high nibble), then their 256 sums
        lo = np.zeros(16, np.float32)
        hi = np.zeros(16, np.float32)
        for v in range(1, 16):
            lo[v] = lo[v & (v - 1)] + xs[_CTZ8[v]]
            hi[v] = hi[v & (v - 1)] + xs[4 + _CTZ8[v]]
        for h in range(16):
            for v in range(16):
                lut[m, j, 16 * h + v] = lo[v] + hi[h]
    for r in numba.prange(N):
        s = _scale(E[r])
        for m in range(M):
            # four independent sums: a single float sum would serialise on add latency
            a0 = np.float32(0.0)
            a1 = np.float32(0.0)
            a2 = np.float32(0.0)
            a3 = np.float32(0.0)
            for g in range(G):
                o = 8 * g
                j = 4 * g
                a0 += lut[m, j, T8[r, o]] - lut[m, j, T8[r, o + 4]]
                a1 += lut[m, j + 1, T8[r, o + 1]] - lut[m, j + 1, T8[r, o + 5]]
                a2 += lut[m, j + 2, T8[r, o + 2]] - lut[m, j + 2, T8[r, o + 6]]
                a3 += lut[m, j + 3, T8[r, o + 3]] - lut[m, j + 3, T8[r, o + 7]]
            y[m, r] = ((a0 + a1) + (a2 + a3)) * s


@numba.njit(parallel=True, cache=True)
def _ternary_matmul_t_cpu(gy, T_packed, E, gx):
    M, N = gy.shape
    K = gx.shape[1]
    G = T_packed.shape[1] // 2
    CG = 8                               # groups (256 columns) per task: no write sharing
    for cb in numba.prange((G + CG - 1) // CG):
        g0 = cb * CG
        g1 = min(G, g0 + CG)
        acc = np.zeros((M, 32 * CG), np.float32)
        for r in range(N):
            s = _scale(E[r])
            for g in range(g0, g1):
                p = T_packed[r, 2 * g]
                n = T_packed[r, 2 * g + 1]
                if (p | n) == 0:
                    continue
                for m in range(M):
                    v = gy[m, r] * s
                    for q in range(4):
                        pb = (p >> (8 * q)) & 255
                        nb = (n >> (8 * q)) & 255
                        base = 32 * (g - g0) + 8 * q
                        for i in range(8):
                            acc[m, base + i] += v * (_BITS8[pb, i] - _BITS8[nb, i])
        for m in range(M):
            for c in range(32 * g0, min(K, 32 * g1)):
                gx[m, c] = acc[m, c - 32 * g0]


@numba.njit(parallel=True, cache=True)
def _widen_cpu(T_packed, E, r0, W):
    """W[i, :] = s[r0+i] * T[r0+i, :] in W's dtype (a transient; see the module docstring)."""
    for i in numba.prange(W.shape[0]):
        s = _scale(E[r0 + i])
        for c in range(W.shape[1]):
            W[i, c] = np.float32(_trit(T_packed, r0 + i, c)) * s


# --------------------------------------------------------------------------------------------
# Generic CUDA kernels (twins of the CPU code: same arguments, one thread per output). Used
# on GPUs without mma.sync and as a second reference in the GPU tests.


@cuda.jit
def _ternary_matmul_cuda(x, T_packed, E, y):
    r, m = cuda.grid(2)
    M, K = x.shape
    if r < T_packed.shape[0] and m < M:
        acc = np.float32(0.0)
        for c in range(K):
            t = _trit_dev(T_packed, r, c)
            if t > 0:
                acc += np.float32(x[m, c])
            elif t < 0:
                acc -= np.float32(x[m, c])
        y[m, r] = acc * _scale_dev(E[r])


@cuda.jit
def _ternary_matmul_t_cuda(gy, T_packed, E, gx):
    c, m = cuda.grid(2)
    M, N = gy.shape
    if c < gx.shape[1] and m < M:
        acc = np.float32(0.0)
        for r in range(N):
            t = _trit_dev(T_packed, r, c)
            if t != 0:
                acc += np.float32(t) * (np.float32(gy[m, r]) * _scale_dev(E[r]))
        gx[m, c] = acc


@cuda.jit
def _widen_cuda(T_packed, E, r0, W):
    # Warp w of block (x, y) owns 32-trit group 8x + w of rows y, y + gridDim.y, ...: lane l
    # writes column 32g + l, so a warp reads the group's two words once (all lanes, one
    # address) and stores 128 contiguous bytes. A thread per element, recomputing the word
    # index and bit per element, ran at half this speed (2560 x 2560: 39 us against 18,
    # H200). While loops: Numba's range() with a run-time step divides in 64 bits at entry.
    lane = cuda.threadIdx.x & 31
    g = cuda.blockIdx.x * (cuda.blockDim.x >> 5) + (cuda.threadIdx.x >> 5)
    c = g * 32 + lane
    if c < W.shape[1]:
        i = cuda.blockIdx.y
        while i < W.shape[0]:
            plus = T_packed[r0 + i, 2 * g]
            minus = T_packed[r0 + i, 2 * g + 1]
            t = np.int32((plus >> lane) & 1) - np.int32((minus >> lane) & 1)
            W[i, c] = np.float32(t) * _scale_dev(E[r0 + i])
            i += cuda.gridDim.y


@cuda.jit
def _widen_f16_cuda(T64, E, W32):
    """The GPU's fp16 widening (even K): W viewed as uint32 pairs, a warp per row, lane l
    writing columns 2l, 2l+1 of each 64-column chunk (one 128-byte store per chunk)."""
    lane = cuda.threadIdx.x & 31
    r = (cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x) >> 5
    one = np.uint32(1)
    while r < W32.shape[0]:
        hs = _ptx.f16_bits(_scale_dev(E[r]))   # fp16 bits of +s; the sign bit makes -s
        j = lane
        while j < W32.shape[1]:
            q = T64[r, j >> 4]
            b = np.uint32((2 * j) & 31)
            minus = np.uint32(q >> _SH32) >> b
            nz = (np.uint32(q & _LO32) >> b) ^ minus   # both bits set (invalid) reads as 0
            v0 = (hs | ((minus & one) << np.uint32(15))) * (nz & one)
            v1 = (hs | (((minus >> one) & one) << np.uint32(15))) * ((nz >> one) & one)
            W32[r, j] = np.uint32(v0 | (v1 << np.uint32(16)))
            j += 32
        r += (cuda.gridDim.x * cuda.blockDim.x) >> 5


# --------------------------------------------------------------------------------------------
# Tensor-core kernels (M <= 16). Notation: lane = 4*g + t (PTX's groupID, threadID_in_group).
#
# A trit code word holds, for each column c of a 32-column group, the pair (nonzero, sign) in
# two adjacent bits: `even` has column c (c even) at bits (c, c+1); `odd` has column c (c odd)
# at bits (c-1, c). Shifting a code word left by 14 - c and masking 0xC000C000 gives the fp16
# or bf16 pair (T[c]*2.0, T[c+16]*2.0): both formats spell +-2.0 as 0x4000 / 0xC000. The
# factor 2 is removed in the epilogue (exact). nonzero = plus XOR minus, so an invalid code
# (both bits) decodes to -0.0 and adds nothing.
#
# The kernels are specialised at compile time (closure constants) for fp16 or fp32 x and
# for M <= 8 or <= 16: run-time flags kept the step loop from unrolling and cost ~4x the
# instructions (ncu, H100). Shared-memory indices are unsigned (no negative-index fixup).

_FRAG_WORDS = 3072        # uint64 fragments of x (gy) staged in shared memory (24 KB)


@cuda.jit(device=True)
def _codes(q):
    """(even, odd) code words of one (plus | minus << 32) word pair."""
    plus = np.uint32(q & _LO32)
    minus = np.uint32(q >> _SH32)
    nz = plus ^ minus
    even = np.uint32((nz & _EVEN) | ((minus << np.uint32(1)) & _ODD))
    odd = np.uint32(((nz >> np.uint32(1)) & _EVEN) | (minus & _ODD))
    return even, odd


@cuda.jit(device=True)
def _half2(code, sh):
    return np.uint32((code << sh) & _HALF2_TRIT)


@cuda.jit(device=True)
def _pair(T64, r, w):
    if r < T64.shape[0] and w < T64.shape[1]:
        return T64[np.uint64(r), np.uint64(w)]   # unsigned: no negative-index fixup
    return np.uint64(0)


@cuda.jit(device=True)
def _split3(v):
    """fp32 v = hi + mid + lo exactly, each a bf16 (bits returned)."""
    hi = _ptx.bf16_bits(v)
    r = v - _ptx.f32_from_bits(hi << np.uint32(16))
    mid = _ptx.bf16_bits(r)
    r = r - _ptx.f32_from_bits(mid << np.uint32(16))
    return hi, mid, _ptx.bf16_bits(r)


@cuda.jit(device=True)
def _stage_f16(frag, i, v0, v1, v2, v3):
    """b0 = (v0, v1), b1 = (v2, v3) as fp16 pairs in one uint64 at frag[i]."""
    b0 = _ptx.f16_bits(v0) | (_ptx.f16_bits(v1) << np.uint32(16))
    b1 = _ptx.f16_bits(v2) | (_ptx.f16_bits(v3) << np.uint32(16))
    frag[i] = np.uint64(b0) | (np.uint64(b1) << _SH32)


@cuda.jit(device=True)
def _stage_bf16(frag, i, v0, v1, v2, v3):
    """The same as three bf16 terms (hi, mid, lo) at frag[i], frag[i+32], frag[i+64]."""
    h0, m0, l0 = _split3(v0)
    h1, m1, l1 = _split3(v1)
    h2, m2, l2 = _split3(v2)
    h3, m3, l3 = _split3(v3)
    s16 = np.uint32(16)
    frag[i] = np.uint64(h0 | (h1 << s16)) | (np.uint64(h2 | (h3 << s16)) << _SH32)
    frag[i + np.uint64(32)] = np.uint64(m0 | (m1 << s16)) | (np.uint64(m2 | (m3 << s16)) << _SH32)
    frag[i + np.uint64(64)] = np.uint64(l0 | (l1 << s16)) | (np.uint64(l2 | (l3 << s16)) << _SH32)


@cuda.jit(device=True)
def _mma_f16_1(a0, a1, a2, a3, frag, i, c0, c1, c2, c3):
    f = frag[i]
    return _ptx.mma_f16(a0, a1, a2, a3, np.uint32(f & _LO32), np.uint32(f >> _SH32),
                        c0, c1, c2, c3)


@cuda.jit(device=True)
def _mma_bf16_3(a0, a1, a2, a3, frag, i, c0, c1, c2, c3):
    f = frag[i]
    c0, c1, c2, c3 = _ptx.mma_bf16(a0, a1, a2, a3, np.uint32(f & _LO32),
                                   np.uint32(f >> _SH32), c0, c1, c2, c3)
    f = frag[i + np.uint64(32)]
    c0, c1, c2, c3 = _ptx.mma_bf16(a0, a1, a2, a3, np.uint32(f & _LO32),
                                   np.uint32(f >> _SH32), c0, c1, c2, c3)
    f = frag[i + np.uint64(64)]
    return _ptx.mma_bf16(a0, a1, a2, a3, np.uint32(f & _LO32), np.uint32(f >> _SH32),
                         c0, c1, c2, c3)


@cuda.jit(device=True)
def _clear(frag):
    # Rows m >= M of the fragments stay zero: clear once, then stage only real rows.
    i = cuda.threadIdx.x
    while i < _FRAG_WORDS:
        frag[i] = np.uint64(0)
        i += cuda.blockDim.x


@cuda.jit(device=True)
def _emit(out, partial, E, m, n, va, vb, unscaled):
    """Write the pair (out[m, n], out[m+1, n]) = 0.5 * (va, vb) (* s[n] unless `unscaled`),
    or store it unscaled in this split's partial sums."""
    M = out.shape[0]
    if n < out.shape[1] and m < M:
        if cuda.gridDim.y == 1:
            s = np.float32(0.5) if unscaled else np.float32(0.5) * _scale_dev(E[n])
            out[m, n] = va * s
            if m + 1 < M:
                out[m + 1, n] = vb * s
        else:
            partial[cuda.blockIdx.y, m, n] = va
            if m + 1 < M:
                partial[cuda.blockIdx.y, m + 1, n] = vb


@cuda.jit(device=True)
def _last_block(counters, slot, nsplit, flag):
    """Count this block in; True (block-wide) for the one that arrives last."""
    cuda.threadfence()
    cuda.syncthreads()
    if cuda.threadIdx.x == 0:
        flag[0] = 1 if cuda.atomic.add(counters, slot, 1) == nsplit - 1 else 0
    cuda.syncthreads()
    if flag[0] == 1:
        cuda.threadfence()
        return True
    return False


def _make_forward(F16, HALVES):
    MP = 8 * HALVES            # rows of x held by the fragments
    MBITS = 3 if HALVES == 1 else 4
    HALF = 32 if F16 else 96   # words per m-half of one step (terms x lanes)
    STEP = HALF * HALVES       # words per step
    STAGE = _FRAG_WORDS // (8 * STEP)   # k-blocks staged per round: 12, 6, 4 or 2
    stage = _stage_f16 if F16 else _stage_bf16
    mma = _mma_f16_1 if F16 else _mma_bf16_3

    def kernel(x, T64, E, y, partial, counters, kb_per_split):
        """y = x · (diag(s)·T)ᵀ for M <= MP. Grid (row blocks, K splits); block = warps x 32.

        Warp w of block (bx, by) owns rows 16*(bx*warps + w) .. +15 and the k-blocks (128
        columns = 4 words) by*kb_per_split ... Lane (g, t) reads word 4*kb + t of rows g and
        g+8. In step s (0..7) of a k-block, mma k-index 2t / 2t+1 / 2t+8 / 2t+9 stands for bit
        2s / 2s+16 / 2s+1 / 2s+17 of that word; x is staged in the same order, once per
        STAGE k-blocks (usually once per launch: a staging round costs a barrier and an L2
        round trip for the whole block). Weight loads run two k-blocks ahead of their use.
        """
        frag = cuda.shared.array(_FRAG_WORDS, numba.uint64)
        flag = cuda.shared.array(1, numba.int32)
        M, K = x.shape
        N, G = T64.shape
        tid = cuda.threadIdx.x
        nthreads = cuda.blockDim.x
        lane = tid & 31
        g = lane >> 2
        t = lane & 3
        row0 = (cuda.blockIdx.x * (nthreads >> 5) + (tid >> 5)) * 16
        ra = row0 + g
        rb = ra + 8
        nkb = (G + 3) >> 2
        kb0 = cuda.blockIdx.y * kb_per_split
        kb1 = min(kb0 + kb_per_split, nkb)
        zero = np.float32(0.0)
        c00 = c01 = c02 = c03 = zero
        c10 = c11 = c12 = c13 = zero
        pa = _pair(T64, ra, 4 * kb0 + t)
        pb = _pair(T64, rb, 4 * kb0 + t)
        na = _pair(T64, ra, 4 * kb0 + 4 + t)
        nb = _pair(T64, rb, 4 * kb0 + 4 + t)
        _clear(frag)
        for st in range(kb0, kb1, STAGE):
            nst = min(STAGE, kb1 - st)
            cuda.syncthreads()
            i = tid
            while i < nst * 8 * MP * 4:    # item (kb*8 + s, m, t) of this round
                m = (i >> 2) & (MP - 1)
                if m < M:
                    tt = i & 3
                    ks = i >> (2 + MBITS)
                    c = (st + (ks >> 3)) * 128 + tt * 32 + 2 * (ks & 7)
                    v0 = v1 = v2 = v3 = zero
                    if c < K:
                        v0 = np.float32(x[m, c])
                    if c + 16 < K:
                        v1 = np.float32(x[m, c + 16])
                    if c + 1 < K:
                        v2 = np.float32(x[m, c + 1])
                    if c + 17 < K:
                        v3 = np.float32(x[m, c + 17])
                    j = np.uint64(ks * STEP + (m >> 3) * HALF + 4 * (m & 7) + tt)
                    stage(frag, j, v0, v1, v2, v3)
                i += nthreads
            cuda.syncthreads()
            for kb in range(st, st + nst):
                ea, oa = _codes(pa)
                eb, ob = _codes(pb)
                pa, pb = na, nb
                if kb + 2 < kb1:
                    na = _pair(T64, ra, 4 * kb + 8 + t)
                    nb = _pair(T64, rb, 4 * kb + 8 + t)
                base = np.uint64((kb - st) * 8 * STEP + lane)
                for s2 in range(4):     # steps 2*s2 and 2*s2 + 1
                    sh = np.uint32(14 - 4 * s2)
                    a0 = _half2(ea, sh)
                    a1 = _half2(eb, sh)
                    a2 = _half2(oa, sh)
                    a3 = _half2(ob, sh)
                    sh = np.uint32(12 - 4 * s2)
                    b0 = _half2(ea, sh)
                    b1 = _half2(eb, sh)
                    b2 = _half2(oa, sh)
                    b3 = _half2(ob, sh)
                    i0 = base + np.uint64(2 * STEP * s2)
                    i1 = i0 + np.uint64(STEP)
                    if HALVES == 1:   # the second set carries odd steps: two mma chains
                        c00, c01, c02, c03 = mma(a0, a1, a2, a3, frag, i0, c00, c01, c02, c03)
                        c10, c11, c12, c13 = mma(b0, b1, b2, b3, frag, i1, c10, c11, c12, c13)
                    else:
                        c00, c01, c02, c03 = mma(a0, a1, a2, a3, frag, i0, c00, c01, c02, c03)
                        c10, c11, c12, c13 = mma(a0, a1, a2, a3, frag, i0 + np.uint64(HALF),
                                                 c10, c11, c12, c13)
                        c00, c01, c02, c03 = mma(b0, b1, b2, b3, frag, i1, c00, c01, c02, c03)
                        c10, c11, c12, c13 = mma(b0, b1, b2, b3, frag, i1 + np.uint64(HALF),
                                                 c10, c11, c12, c13)
        # c0/c1: (m = 2t, 2t+1; row g), c2/c3: (2t, 2t+1; row g+8); m-half 1 adds 8 to m.
        if HALVES == 1:
            c00, c01, c02, c03 = c00 + c10, c01 + c11, c02 + c12, c03 + c13
        _emit(y, partial, E, 2 * t, ra, c00, c01, False)
        _emit(y, partial, E, 2 * t, rb, c02, c03, False)
        if HALVES == 2:
            _emit(y, partial, E, 2 * t + 8, ra, c10, c11, False)
            _emit(y, partial, E, 2 * t + 8, rb, c12, c13, False)
        nsplit = cuda.gridDim.y
        if nsplit > 1 and _last_block(counters, cuda.blockIdx.x, nsplit, flag):
            rows = 16 * (nthreads >> 5)
            r = cuda.blockIdx.x * rows + tid
            if tid < rows and r < N:
                s = np.float32(0.5) * _scale_dev(E[r])
                for m in range(M):
                    acc = zero
                    for k in range(nsplit):
                        acc += partial[k, m, r]
                    y[m, r] = acc * s
            if tid == 0:
                counters[cuda.blockIdx.x] = 0

    kernel.__name__ = kernel.__qualname__ = f"_ternary_matmul_mma_{'f16' if F16 else 'f32'}_m{MP}"
    return _fwd_jit(kernel)


def _make_backward(HALVES):
    MP = 8 * HALVES
    MBITS = 3 if HALVES == 1 else 4
    STEP = 96 * HALVES                  # words per 16-row step: (m-half, term, lane)
    STAGE = _FRAG_WORDS // STEP         # steps staged per round: 32 or 16

    def kernel(gy, T64, E, gx, partial, counters, steps_per_split):
        """gx = gy · diag(s)·T for M <= MP. Grid (column blocks, row splits).

        Warp w of block (bx, by) owns the 32 output columns of word group bx*warps + w, as
        two 16-column tiles (even columns 2g, 2g+16; odd 2g+1, 2g+17), and reduces over the
        16-row steps by*steps_per_split ... In a step, lane (g, t) holds rows 4t..4t+3 (mma
        k-index 2t, 2t+1, 2t+8, 2t+9). gy·s is staged as bf16 hi+mid+lo (fp32 exact, with the
        float32 exponent range whatever gy's dtype: s reaches 2**15.9).
        """
        frag = cuda.shared.array(_FRAG_WORDS, numba.uint64)
        flag = cuda.shared.array(1, numba.int32)
        M, N = gy.shape
        K = gx.shape[1]
        tid = cuda.threadIdx.x
        nthreads = cuda.blockDim.x
        lane = tid & 31
        g = lane >> 2
        t = lane & 3
        w = cuda.blockIdx.x * (nthreads >> 5) + (tid >> 5)
        sh = np.uint32(14 - 2 * g)
        nsteps = (N + 15) >> 4
        j0 = cuda.blockIdx.y * steps_per_split
        j1 = min(j0 + steps_per_split, nsteps)
        _clear(frag)
        zero = np.float32(0.0)
        e00 = e01 = e02 = e03 = zero   # even-column tile, m-half 0
        e10 = e11 = e12 = e13 = zero   # even-column tile, m-half 1
        o00 = o01 = o02 = o03 = zero   # odd-column tile, m-half 0
        o10 = o11 = o12 = o13 = zero   # odd-column tile, m-half 1
        for st in range(j0, j1, STAGE):
            nst = min(STAGE, j1 - st)
            cuda.syncthreads()
            i = tid
            while i < nst * MP * 4:       # item (step j, m, t) of this round
                m = (i >> 2) & (MP - 1)
                if m < M:
                    tt = i & 3
                    j = i >> (2 + MBITS)
                    r = (st + j) * 16 + 4 * tt
                    v0 = v1 = v2 = v3 = zero
                    if r < N:
                        v0 = np.float32(gy[m, r]) * _scale_dev(E[r])
                    if r + 1 < N:
                        v1 = np.float32(gy[m, r + 1]) * _scale_dev(E[r + 1])
                    if r + 2 < N:
                        v2 = np.float32(gy[m, r + 2]) * _scale_dev(E[r + 2])
                    if r + 3 < N:
                        v3 = np.float32(gy[m, r + 3]) * _scale_dev(E[r + 3])
                    _stage_bf16(frag, np.uint64(j * STEP + (m >> 3) * 96 + 4 * (m & 7) + tt),
                                v0, v1, v2, v3)
                i += nthreads
            cuda.syncthreads()
            r = st * 16 + 4 * t
            q0 = _pair(T64, r, w)
            q1 = _pair(T64, r + 1, w)
            q2 = _pair(T64, r + 2, w)
            q3 = _pair(T64, r + 3, w)
            for j in range(nst):
                e0, d0 = _codes(q0)
                e1, d1 = _codes(q1)
                e2, d2 = _codes(q2)
                e3, d3 = _codes(q3)
                if j + 1 < nst:   # next step's weights load while this step computes
                    r += 16
                    q0 = _pair(T64, r, w)
                    q1 = _pair(T64, r + 1, w)
                    q2 = _pair(T64, r + 2, w)
                    q3 = _pair(T64, r + 3, w)
                # rows (4t, 4t+1) and (4t+2, 4t+3) side by side: low half one row, high the other
                ea0 = _half2((e0 & _LO16) | (e1 << np.uint32(16)), sh)
                ea1 = _half2((e0 >> np.uint32(16)) | (e1 & _HI16), sh)
                ea2 = _half2((e2 & _LO16) | (e3 << np.uint32(16)), sh)
                ea3 = _half2((e2 >> np.uint32(16)) | (e3 & _HI16), sh)
                oa0 = _half2((d0 & _LO16) | (d1 << np.uint32(16)), sh)
                oa1 = _half2((d0 >> np.uint32(16)) | (d1 & _HI16), sh)
                oa2 = _half2((d2 & _LO16) | (d3 << np.uint32(16)), sh)
                oa3 = _half2((d2 >> np.uint32(16)) | (d3 & _HI16), sh)
                i = np.uint64(j * STEP + lane)
                e00, e01, e02, e03 = _mma_bf16_3(ea0, ea1, ea2, ea3, frag, i,
                                                 e00, e01, e02, e03)
                o00, o01, o02, o03 = _mma_bf16_3(oa0, oa1, oa2, oa3, frag, i,
                                                 o00, o01, o02, o03)
                if HALVES == 2:
                    i += np.uint64(96)
                    e10, e11, e12, e13 = _mma_bf16_3(ea0, ea1, ea2, ea3, frag, i,
                                                     e10, e11, e12, e13)
                    o10, o11, o12, o13 = _mma_bf16_3(oa0, oa1, oa2, oa3, frag, i,
                                                     o10, o11, o12, o13)
        # D[i][j]: i = column tile index (g: column 2g+u, g+8: 2g+u+16), j = m (2t, 2t+1).
        c = 32 * w + 2 * g
        _emit(gx, partial, E, 2 * t, c, e00, e01, True)
        _emit(gx, partial, E, 2 * t, c + 16, e02, e03, True)
        _emit(gx, partial, E, 2 * t, c + 1, o00, o01, True)
        _emit(gx, partial, E, 2 * t, c + 17, o02, o03, True)
        if HALVES == 2:
            _emit(gx, partial, E, 2 * t + 8, c, e10, e11, True)
            _emit(gx, partial, E, 2 * t + 8, c + 16, e12, e13, True)
            _emit(gx, partial, E, 2 * t + 8, c + 1, o10, o11, True)
            _emit(gx, partial, E, 2 * t + 8, c + 17, o12, o13, True)
        nsplit = cuda.gridDim.y
        if nsplit > 1 and _last_block(counters, cuda.blockIdx.x, nsplit, flag):
            c = cuda.blockIdx.x * nthreads + tid   # 32 columns per warp: one per thread
            if c < K:
                for m in range(M):
                    acc = zero
                    for k in range(nsplit):
                        acc += partial[k, m, c]
                    gx[m, c] = acc * np.float32(0.5)
            if tid == 0:
                counters[cuda.blockIdx.x] = 0

    kernel.__name__ = kernel.__qualname__ = f"_ternary_matmul_t_mma_m{MP}"
    return _bwd_jit(kernel)


_mma_kernels = {}


def _mma_kernel(direction, f16, halves):
    """The specialised tensor-core kernel, built (not compiled) on first use."""
    key = (direction, bool(f16), halves)
    k = _mma_kernels.get(key)
    if k is None:
        k = _make_forward(bool(f16), halves) if direction == "fwd" else _make_backward(halves)
        _mma_kernels[key] = k
    return k


# --------------------------------------------------------------------------------------------
# NumPy references (float64 results).


def scale_reference(E):
    """s = 2 ** (E / 8) as float32, the scale every kernel uses."""
    return np.exp2(np.asarray(E).astype(np.float32) * np.float32(0.125)).astype(np.float32)


def _weights_reference(T_packed, E, cols):
    T = unpack_trits_reference(np.asarray(T_packed), cols).astype(np.float64)
    return scale_reference(E).astype(np.float64)[:, None] * T


def ternary_matmul_reference(x, T_packed, E, cols):
    return np.asarray(x, np.float64) @ _weights_reference(T_packed, E, cols).T


def ternary_matmul_t_reference(gy, T_packed, E, cols):
    return np.asarray(gy, np.float64) @ _weights_reference(T_packed, E, cols)


# --------------------------------------------------------------------------------------------
# Validation: everything is checked before any allocation or launch.


def _check_call(op, a, aname, T_packed, E, cols, inner, out, validate):
    if isinstance(cols, (bool, np.bool_)) or not isinstance(cols, (int, np.integer)):
        raise TypeError(f"{op}: cols must be an integer >= 1, got {cols!r}")
    if cols < 1:
        raise ValueError(f"{op}: cols = {cols}, expected >= 1")
    cols = int(cols)
    float_types = (np.float32, np.float16) if is_cupy(a) else (np.float32,)
    check_array(op, aname, a, float_types, 2)
    check_array(op, "T_packed", T_packed, (np.uint32,), 2)
    check_array(op, "E", E, (np.int8,), 1)
    rows = T_packed.shape[0]
    if T_packed.shape[1] != 2 * n_groups(cols) or rows < 1:
        raise ValueError(f"{op}: T_packed has shape {tuple(T_packed.shape)}, expected (rows >= 1, "
                         f"{2 * n_groups(cols)}) for {cols} columns (2 words per 32 columns)")
    if E.shape[0] != rows:
        raise ValueError(f"{op}: E has shape {tuple(E.shape)}, expected ({rows},): one exponent "
                         "per row of T_packed")
    n_inner = cols if inner == "cols" else rows
    if a.shape[1] != n_inner:
        raise ValueError(f"{op}: {aname} has shape {tuple(a.shape)}, expected (M, {n_inner}) to "
                         f"match T_packed's {n_inner} {'columns' if inner == 'cols' else 'rows'}")
    n_out = rows if inner == "cols" else cols
    if out is not None:
        check_array(op, "out", out, (a.dtype,), 2)
        if tuple(out.shape) != (a.shape[0], n_out):
            raise ValueError(f"{op}: out has shape {tuple(out.shape)}, expected "
                             f"{(a.shape[0], n_out)}")
        if not getattr(out.flags, "writeable", True):
            raise ValueError(f"{op}: out is read-only")
        if _overlap(a, out):
            raise ValueError(f"{op}: out shares memory with {aname}; pass a separate array")
    dev = target(a, T_packed, E, out, op=op)
    if validate:
        validate_packed(T_packed, cols, op=op)
    return dev, cols, n_out


def _overlap(a, b):
    def span(v):
        p = v.data.ptr if is_cupy(v) else v.__array_interface__["data"][0]
        return p, p + v.nbytes
    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


# --------------------------------------------------------------------------------------------
# Device helpers: cached per device, never allocated at import.

_device_info = {}


def _gpu_info():
    """[has mma.sync, blocks that fill the GPU, zeroed counters, dummy partial], per device."""
    if simulator():
        dev = -1
    else:
        dev = _launch.cupy.cuda.runtime.getDevice()
    info = _device_info.get(dev)
    if info is None:
        if dev == -1:
            info = [True, 4, np.zeros(64, np.int32), np.zeros((1, 1, 1), np.float32)]
        else:
            cp = _launch.cupy
            d = cp.cuda.Device(dev)
            sms = d.attributes["MultiProcessorCount"]
            mma = int(d.compute_capability) >= 80 and os.environ.get("TRITNET_MMA", "1") != "0"
            info = [mma, 2 * sms, cp.zeros(4096, cp.int32), cp.zeros((1, 1, 1), cp.float32)]
        _device_info[dev] = info
    return info


def _counters(info, n, xp):
    # Each tensor-core launch with split K leaves its counters at zero again (the last block
    # resets them), so one zeroed array per device serves every call on the device's streams
    # in order. Concurrent launches on two streams would share counters: not supported.
    if info[2].shape[0] < n:
        info[2] = xp.zeros(max(n, 2 * info[2].shape[0]), np.int32)
    return info[2]


def _pad32(n):
    # The last block of a split reads the other blocks' partial sums with plain loads; padding
    # each partial row to whole 128-byte lines keeps a line from holding two blocks' sums, so
    # no SM can have cached a line before all of its sums were written.
    return -(-n // 32) * 32


def _split(parts, fill_blocks, outer_blocks):
    """(per split, splits) so that outer_blocks * splits ~ fill_blocks."""
    want = max(1, min(parts, fill_blocks // max(1, outer_blocks)))
    per = -(-parts // want)
    return per, -(-parts // per)


def _forward_mma(x, T_packed, E, y, xp, warps=None, nsplit=None):
    info = _gpu_info()
    M = x.shape[0]
    N, G = T_packed.shape[0], T_packed.shape[1] // 2
    warps = warps or _FWD_WARPS
    row_blocks = -(-N // (16 * warps))
    nkb = -(-G // 4)
    fill, outer = (info[1], row_blocks) if nsplit is None else (nsplit, 1)
    per, nsplit = _split(nkb, fill, outer)
    if nsplit > 1:
        partial = xp.empty((nsplit, M, _pad32(N)), np.float32)
        counters = _counters(info, row_blocks, xp)
    else:
        partial, counters = info[3], info[2]
    kernel = _mma_kernel("fwd", x.dtype == np.float16, 1 if M <= 8 else 2)
    launch(kernel, (row_blocks, nsplit), 32 * warps, x, T_packed.view(np.uint64), E, y, partial,
           counters, per)


def _backward_mma(gy, T_packed, E, gx, xp, warps=None, nsplit=None):
    info = _gpu_info()
    M, N = gy.shape
    G = T_packed.shape[1] // 2
    warps = warps or _BWD_WARPS
    col_blocks = -(-G // warps)
    nsteps = -(-N // 16)
    fill, outer = (info[1], col_blocks) if nsplit is None else (nsplit, 1)
    per, nsplit = _split(nsteps, fill, outer)
    if nsplit > 1:
        partial = xp.empty((nsplit, M, _pad32(gx.shape[1])), np.float32)
        counters = _counters(info, col_blocks, xp)
    else:
        partial, counters = info[3], info[2]
    kernel = _mma_kernel("bwd", False, 1 if M <= 8 else 2)
    launch(kernel, (col_blocks, nsplit), 32 * warps, gy, T_packed.view(np.uint64), E, gx,
           partial, counters, per)


def _generic_grid(n, M):
    return (-(-n // _GENERIC_THREADS), M), (_GENERIC_THREADS, 1)


def _widen(T_packed, E, cols, dtype, xp):
    N = T_packed.shape[0]
    W = xp.empty((N, cols), dtype)
    fill = _gpu_info()[1]
    if dtype == np.float16 and cols % 2 == 0:
        launch(_widen_f16_cuda, max(1, min(-(-N // 8), 8 * fill)), 256,
               T_packed.view(np.uint64), E, W.view(np.uint32))
    else:
        launch(_widen_cuda, (-(-cols // 256), min(N, 256)), 256, T_packed, E, 0, W)
    return W


def _cpu_blocks(N, cols):
    rb = max(1, min(N, _CPU_SCRATCH // cols))
    return rb, np.empty((rb, cols), np.float32)


# --------------------------------------------------------------------------------------------
# Public API.


def ternary_matmul(x, T_packed, E, cols, out=None, *, validate=False):
    """y = x · (diag(s)·T)ᵀ, s = 2 ** (E / 8): x (M, cols) -> y (M, rows), dtype of x.

    x: float32 (NumPy or CuPy) or float16 (CuPy), C-contiguous, any M >= 0.
    T_packed: bitplane32 uint32 (rows, 2*ceil(cols/32)), C-contiguous. E: int8 (rows,).
    out: optional (M, rows) array of x's dtype to write into. Accumulation is fp32.
    validate: also check every trit code of T_packed (one extra pass; see module docstring).
    """
    op = "ternary_matmul"
    dev, cols, N = _check_call(op, x, "x", T_packed, E, cols, "cols", out, validate)
    xp = xp_of(x)
    M = x.shape[0]
    y = xp.empty((M, N), x.dtype) if out is None else out
    if M == 0:
        return y
    if dev == "cpu":
        if M <= _CPU_LUT_MAX_M:
            _ternary_matmul_cpu(x, T_packed, E, y)
        else:
            rb, scratch = _cpu_blocks(N, cols)
            for r0 in range(0, N, rb):
                W = scratch[:min(rb, N - r0)]
                _widen_cpu(T_packed, E, r0, W)
                y[:, r0:r0 + W.shape[0]] = x @ W.T
        return y
    if M <= MMA_MAX_M:
        if _gpu_info()[0]:
            _forward_mma(x, T_packed, E, y, xp)
        else:
            grid, block = _generic_grid(N, M)
            launch(_ternary_matmul_cuda, grid, block, x, T_packed, E, y)
        return y
    W = _widen(T_packed, E, cols, x.dtype, xp)
    kgemm.matmul(x, W.T, out=y)
    del W  # the widened weights live only inside this call (docs/design.md#no-float-weights)
    return y


def widen(T_packed, E, cols, out):
    """out[...] = diag(s)·T, s = 2 ** (E / 8): the weight as float, for a product the caller
    runs itself (a grouped one: tritnet.nn.ternary.ExpertMatmul). out (rows, cols) float32
    (the kernels) or float64 (the NumPy reference: gradient checks), C-contiguous, on
    T_packed's device. A transient: the caller frees it when its product is done (no float
    copy of a weight outlives the op that made it: docs/design.md#no-float-weights)."""
    op = "widen"
    check_array(op, "out", out, (np.float32, np.float64), 2)
    check_array(op, "T_packed", T_packed, (np.uint32,), 2)
    check_array(op, "E", E, (np.int8,), 1)
    rows = T_packed.shape[0]
    if T_packed.shape[1] != 2 * n_groups(cols) or E.shape != (rows,) or out.shape != (rows, cols):
        raise ValueError(f"{op}: T_packed {tuple(T_packed.shape)}, E {tuple(E.shape)} and out "
                         f"{tuple(out.shape)} do not fit {cols} columns: expected "
                         f"({rows}, {2 * n_groups(cols)}), ({rows},) and ({rows}, {cols})")
    dev = target(T_packed, E, out, op=op)
    if out.dtype == np.float64:
        host = _weights_reference(_host(T_packed), _host(E), cols)
        out[...] = host if dev == "cpu" else xp_of(out).asarray(host)
    elif dev == "cpu":
        _widen_cpu(T_packed, E, 0, out)
    else:
        launch(_widen_cuda, (-(-cols // 256), min(rows, 256)), 256, T_packed, E, 0, out)
    return out


def _host(a):
    return a.get() if is_cupy(a) else np.asarray(a)


def ternary_matmul_t(gy, T_packed, E, cols, out=None, *, validate=False):
    """gx = gy · diag(s)·T: gy (M, rows) -> gx (M, cols), dtype of gy (the input gradient).

    Same rules as `ternary_matmul`; the weight gradient is a separate job (update.py).
    """
    op = "ternary_matmul_t"
    dev, cols, K = _check_call(op, gy, "gy", T_packed, E, cols, "rows", out, validate)
    xp = xp_of(gy)
    M, N = gy.shape
    gx = xp.empty((M, K), gy.dtype) if out is None else out
    if M == 0:
        return gx
    if dev == "cpu":
        if M <= _CPU_BITS_MAX_M:
            _ternary_matmul_t_cpu(gy, T_packed, E, gx)
        else:
            rb, scratch = _cpu_blocks(N, cols)
            gx[...] = 0
            for r0 in range(0, N, rb):
                W = scratch[:min(rb, N - r0)]
                _widen_cpu(T_packed, E, r0, W)
                gx += gy[:, r0:r0 + W.shape[0]] @ W
        return gx
    if M <= MMA_MAX_M:
        if _gpu_info()[0]:
            _backward_mma(gy, T_packed, E, gx, xp)
        else:
            grid, block = _generic_grid(K, M)
            launch(_ternary_matmul_t_cuda, grid, block, gy, T_packed, E, gx)
        return gx
    W = _widen(T_packed, E, cols, gy.dtype, xp)
    kgemm.matmul(gy, W, out=gx)
    del W
    return gx
