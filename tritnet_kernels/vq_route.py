"""Routed nearest-code search: the k best codes of a small centroid book (`top_codes`,
the coarse routing), then the exact argmax over the codes of each query's probed partitions
(`nearest_code_in_partitions`). Scores and ties as in vq_search.py; the results equal an
exact search restricted to the probed codes.
"""

from . import _numba_compat  # noqa: F401  (must precede numba.cuda)

import math

import numba
import numpy as np
from numba import cuda

from ._common import check_array, check_int
from ._launch import launch, on_device, simulator, target, xp_of
from ._vq_rules import (F32_BIAS, F32_BIAS_BITS, MAX_TOP_K, MAX_TOP_SLICES, NO_SCORE, THREADS,
                        beats, check_book, check_out, code_nn, f32_from_bits, grid_cap, mma_s8,
                        nearest_merge_cpu, nearest_merge_cuda, query_fragments_dev, sm_count,
                        sqrt_f32, trit_bytes, trit_dot, uses_mma)
from .vq_search import code_scores_reference

__all__ = [
    "top_codes",
    "top_codes_reference",
    "nearest_code_in_partitions",
    "nearest_code_in_partitions_reference",
]


# --------------------------------------------------------------------------------------------
# 1. The k best codes (coarse routing over a small centroid book).


@numba.njit(cache=True)
def _top_insert(top_d, top_nn, top_i, filled, k, d, nn, c):
    """Insert code c into the sorted top-k lists if it ranks; returns the new fill count."""
    if filled == k and not beats(d, nn, c, top_d[k - 1], top_nn[k - 1], top_i[k - 1]):
        return filled
    pos = filled if filled < k else k - 1
    # Codes arrive in increasing index, so an equal score stays behind the earlier code.
    while pos > 0 and beats(d, nn, c, top_d[pos - 1], top_nn[pos - 1], top_i[pos - 1]):
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
        top_d = np.zeros(MAX_TOP_K, dtype=np.int64)
        top_nn = np.ones(MAX_TOP_K, dtype=np.int64)
        top_i = np.full(MAX_TOP_K, -1, dtype=np.int64)
        filled = 0
        for c in range(s * slice_len, min(K, (s + 1) * slice_len)):
            filled = _top_insert(top_d, top_nn, top_i, filled, k,
                                 trit_dot(queries, q, T_packed, c), code_nn(T_packed, c),
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
    k_i = cuda.shared.array(MAX_TOP_K, numba.int32)
    k_new = cuda.shared.array(MAX_TOP_K, numba.int32)
    k_key = cuda.shared.array(MAX_TOP_K, numba.float64)
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
                if beats(np.int64(part_d[s, q, h]), np.int64(part_nn[s, q, h]),
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
        heads = np.zeros(MAX_TOP_SLICES, dtype=np.int64)
        _top_merge_one(part_d, part_nn, part_i, q, heads, out_index, out_dot)


@cuda.jit(cache=True)
def _top_codes_merge_cuda(part_d, part_nn, part_i, out_index, out_dot):
    heads = cuda.local.array(MAX_TOP_SLICES, numba.int64)
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
    dim = check_book(op, queries, T_packed, dim)
    k = check_int(op, "k", k, 1, MAX_TOP_K)
    n = queries.shape[0]
    xp = xp_of(T_packed)
    if out_index is None:
        out_index = xp.empty((n, k), dtype=np.int32)
    else:
        check_array(op, "out_index", out_index, np.int32, shape=(n, k), writeable=True)
    if out_dot is None:
        out_dot = xp.empty((n, k), dtype=np.int32)
    else:
        check_array(op, "out_dot", out_dot, np.int32, shape=(n, k), writeable=True)
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
        want = 2 if simulator() else 8 * sm_count()
        S = max(1, min(MAX_TOP_SLICES, -(-want // n)))
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
        launch(_top_codes_partial_cuda, min(S * n, grid_cap()), threads, queries, T_packed,
               np.int64(slice_len), np.int64(sort_len), np.int64(cand_len), part_d, part_nn,
               part_i)
        blocks = max(1, min(grid_cap(), -(-n // THREADS)))
        launch(_top_codes_merge_cuda, blocks, THREADS, part_d, part_nn, part_i, out_index,
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
# 2. Exact search inside probed partitions (routed search).
#
# Partition-major: a query's probes are (query, probe slot) pairs; `_group_probes` and
# `_place_probes` list each partition's pairs (a counting sort), and a block scans a partition
# once for up to 32 of its pairs at a time (lane l of every warp holds pair l's query; the
# warps split the codes). Each pair's best goes to its own slot and `nearest_merge` takes each
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
                d = trit_dot(queries, q, T_packed, c)
                nn = code_nn(T_packed, c)
                if beats(d, nn, c, bd, bn, bi):
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
                        # beats, unrolled: d·|d|/nn against the best's, exactly, ties to
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
                    if beats(np.int64(s_d[t]), np.int64(s_nn[t]), np.int64(s_i[t]), bd, bn, bi):
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
                A[mt, h], A[mt, 2 + h], A[mt, 4 + h], A[mt, 6 + h] = query_fragments_dev(
                    queries, q, e < last, two_groups, tq)
                best_key[mt, h] = NO_SCORE
                best_nn[mt, h] = np.float32(1.0)
                best_i[mt, h] = -1
                filt_key[mt, h] = NO_SCORE
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
                b0 = trit_bytes(t_w[b, 0], t_w[b, 1], 4 * tq)
                b1 = trit_bytes(t_w[b, 0], t_w[b, 1], 16 + 4 * tq)
                b2 = trit_bytes(t_w[b, 2], t_w[b, 3], 4 * tq)
                b3 = trit_bytes(t_w[b, 2], t_w[b, 3], 16 + 4 * tq)
                for mt in range(_PMMA_MT):
                    if mt < n_mt:
                        r0, r1, r2, r3 = mma_s8(A[mt, 0], A[mt, 1], A[mt, 2], A[mt, 3], b0,
                                                b1, F32_BIAS_BITS, F32_BIAS_BITS,
                                                F32_BIAS_BITS, F32_BIAS_BITS)
                        R[mt, 0], R[mt, 1], R[mt, 2], R[mt, 3] = mma_s8(
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
                            m = f32_from_bits(max(ra, rb)) - F32_BIAS
                            # every term an integer below 2**24: float32 is exact here
                            if m * abs(m) * best_nn[mt, h] - filt_key[mt, h] * nn_lo >= 0:
                                for v in range(2):
                                    c = t_c[a + v]
                                    nn = nn_a if v == 0 else nn_b
                                    d = f32_from_bits(ra if v == 0 else rb) - F32_BIAS
                                    key = d * abs(d)
                                    diff = key * best_nn[mt, h] - best_key[mt, h] * nn
                                    if c >= 0 and (diff > 0 or (diff == 0 and c < best_i[mt, h])):
                                        best_key[mt, h] = key
                                        best_nn[mt, h] = nn
                                        best_i[mt, h] = c
                                        filt_key[mt, h] = key if key >= 0 else NO_SCORE
            cuda.syncthreads()  # the next tile reuses the shared arrays
        for mt in range(_PMMA_MT):
            for h in range(2):
                row = 16 * mt + gid + 8 * h
                s_key[warp, row, tq] = best_key[mt, h]
                s_nn[warp, row, tq] = best_nn[mt, h]
                s_i[warp, row, tq] = best_i[mt, h]
        cuda.syncthreads()
        for row in range(tid, last - first, threads):
            bk = NO_SCORE
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
                d = np.int32(round(sqrt_f32(abs(bk))))
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
    dim = check_book(op, queries, T_packed, dim)
    n = queries.shape[0]
    K = T_packed.shape[0]
    check_array(op, "partition_offsets", partition_offsets, np.int64, ndim=1)
    P = partition_offsets.shape[0] - 1
    if P < 1:
        raise ValueError(f"{op}: partition_offsets has shape {tuple(partition_offsets.shape)}, "
                         "expected (P + 1,) with at least one partition")
    check_array(op, "partition_codes", partition_codes, np.int32, ndim=1)
    if not (hasattr(probe, "dtype") and probe.dtype == np.int32):
        raise TypeError(f"{op}: probe has dtype {getattr(probe, 'dtype', type(probe).__name__)}"
                        ", expected int32 (n, nprobe)")
    check_array(op, "probe", probe, np.int32, ndim=2)
    if probe.shape[0] != n:
        raise ValueError(f"{op}: probe has shape {tuple(probe.shape)}, expected ({n}, nprobe) "
                         "to match the queries")
    xp = xp_of(T_packed)
    out_index = check_out(op, "out_index", out_index, n, xp)
    dot = check_out(op, "out_dot", out_dot, n, xp)
    use_mma = uses_mma(op, method, dev, dim)
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
        nearest_merge_cpu(part_d, part_nn, part_i, out_index, dot)
    else:
        threads = 32 if simulator() else THREADS
        blocks = max(1, min(grid_cap(), -(-pairs_n // threads)))
        launch(_group_probes_cuda, blocks, threads, probe, counts, rank)
        pair_offsets[1:] = xp.cumsum(counts)
        launch(_place_probes_cuda, blocks, threads, probe, pair_offsets, rank, pairs)
        if use_mma:
            # work items: each partition's groups of _PMMA_ROWS pairs, listed by a prefix sum
            work_offsets = xp.zeros(P + 1, dtype=np.int64)
            work_offsets[1:] = xp.cumsum((counts + (_PMMA_ROWS - 1)) // _PMMA_ROWS)
            items = P + -(-pairs_n // _PMMA_ROWS)   # at most; the kernel reads the count
            warps = 2 if simulator() else _PMMA_WARPS
            launch(_search_partitions_mma_cuda, min(items, grid_cap()), 32 * warps,
                   *search[:6], work_offsets, *search[6:])
        else:
            # up to _PART_GROUPS groups of 32 pairs of one partition run side by side
            launch(_search_partitions_cuda,
                   (min(P, grid_cap()), 2 if simulator() else _PART_GROUPS),
                   64 if simulator() else _PART_THREADS, *search)
        blocks = max(1, min(grid_cap(), -(-n // threads)))
        launch(nearest_merge_cuda, blocks, threads, part_d, part_nn, part_i, out_index, dot)
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
