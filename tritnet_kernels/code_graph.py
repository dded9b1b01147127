"""The code graph of MoEGraph: a bounded, bucketed edge table learned from code transitions
(docs/model.md#code-graph).

Edge state
----------
A graph over the K codes of a codebook is four flat arrays of `capacity = n_buckets * slots`
entries, the same in both of MoEGraph's modes:

    edge_src   int32  source code of the slot
    edge_dst   int32  destination code; -1 marks an empty slot (the only marker the kernels
                      read: edge_src, edge_attr and edge_score of an empty slot are ignored)
    edge_attr  int8   ternary sign of the edge, -1 / 0 / +1
    edge_score int8   residual score, 0..127

Slots `bucket * slots .. bucket * slots + slots - 1` form one bucket; the out-edges of code a
live in bucket(a):

    dense mode  (n_buckets == K):  bucket(a) = a
        every code owns `slots` out-edges; MoEGraph exposes edge_index = (edge_src, edge_dst).
    active mode (n_buckets <  K):  bucket(a) = mix64(uint64(a)) mod n_buckets
        codes share buckets; a bounded active edge set of fixed capacity (e.g. 4096 * 8 slots
        for K = 10M codes).

    mix64(z):  z ^= z >> 30;  z *= 0xBF58476D1CE4E5B9;          (splitmix64's finaliser, all
               z ^= z >> 27;  z *= 0x94D049BB133111EB;          arithmetic mod 2**64; the same
               z ^= z >> 31                                      function as tritnet_kernels.update)

`empty_edges(n_buckets, slots)` makes the empty state (every field -1 / -1 / 0 / 0).

The admission / eviction rule (`observe_edges`)
-----------------------------------------------
An observation is a transition (a, b, sign): code a followed by code b in a sequence, with the
ternary attribute `sign` chosen by the caller. Observations are applied one by one, in their
order within the call, each to the slots of B = bucket(a) only:

    0. a == b (a self-transition): ignored.
    1. some slot of B holds (a, b):         score = min(score + 1, 127); attr = sign
                                                                                (reinforced)
    2. else B has an empty slot:            the lowest empty slot := (a, b, sign, score 1)
                                                                                (admitted)
    3. else m = the slot of B with the lowest score (ties: the lowest slot):
         score[m] == 0:                     slot m := (a, b, sign, score 1)    (admitted and
                                                                                 evicted)
         otherwise:                         every score of B -= 1; (a, b) is not stored
                                                                                (aged)

A bucket under pressure forgets: each rejected newcomer ages all its edges by one, and an edge
whose score reaches 0 is the next to go. Capacity never grows, no slot is ever emptied again,
and scores stay in 0..127.

Determinism: buckets are independent, so the result equals applying the observations one by
one in their given order, on every device. The wrapper hashes the sources, sorts the
observations stably by bucket (and gathers them in that order, so that a run reads its
observations one after another rather than through the permutation: a code book's popular
code makes one run of thousands), and each run of equal buckets is applied in order by one
worker: on the CPU a thread, on the GPU a block whose threads hold one slot each and scan
them in parallel for each observation. Finding the
runs' heads in the kernel, rather than building per-bucket offsets, keeps the call free of
host syncs (offsets would need the number of touched buckets on the host). No atomics touch
the edge state; CPU and GPU results are bit-identical.

`edge_neighbors` reads the out-edges of query codes (the one-hop expansion), O(n * slots)
independent of K; `decay_scores` shrinks all scores geometrically (optional, for a graph that
should forget without pressure).

Each job is a CUDA kernel (`_*_cuda`), a Numba CPU twin with the same argument list (`_*_cpu`)
and a NumPy reference (`*_reference`, a plain sequential loop for the rule) used by the tests.
"""

from . import _numba_compat  # noqa: F401  (must precede numba.cuda)

import numba
import numpy as np
from numba import cuda

from ._launch import launch, on_device, target, xp_of
from ._common import (blocks, check_array, check_distinct, check_indices, check_int, mix64,
                      mix64_reference)

__all__ = [
    "SCORE_MAX",
    "MAX_SLOTS",
    "MAX_CODES",
    "empty_edges",
    "edge_bucket",
    "edge_bucket_reference",
    "observe_edges",
    "observe_edges_reference",
    "edge_neighbors",
    "edge_neighbors_reference",
    "decay_scores",
    "decay_scores_reference",
]

SCORE_MAX = 127
# A bucket is scanned linearly by one thread for every observation; 64 slots keeps that scan
# within a few cache lines of each array.
MAX_SLOTS = 64
# Codes are stored as int32 and -1 marks an empty slot.
MAX_CODES = 2**31 - 1

_THREADS = 256


# --------------------------------------------------------------------------------------------
# Validation shared by the wrappers: everything is raised before any allocation or launch, so
# a failing call leaves the edge state as it was.


def _check_geometry(op, n_buckets, slots, K):
    K = check_int(op, "K", K, 1, MAX_CODES)
    n_buckets = check_int(op, "n_buckets", n_buckets, 1, K)
    slots = check_int(op, "slots", slots, 1, MAX_SLOTS)
    return n_buckets, slots, K


def _check_edges(op, edge_src, edge_dst, edge_attr, edge_score, n_buckets, slots, writeable):
    capacity = n_buckets * slots
    for name, a, dtype in (("edge_src", edge_src, np.int32), ("edge_dst", edge_dst, np.int32),
                           ("edge_attr", edge_attr, np.int8),
                           ("edge_score", edge_score, np.int8)):
        check_array(op, name, a, dtype, ndim=1, writeable=writeable)
        if a.shape[0] != capacity:
            raise ValueError(f"{op}: {name} has shape {tuple(a.shape)}, expected ({capacity},) "
                             f"= n_buckets * slots = {n_buckets} * {slots} (the edge table's "
                             "capacity never changes)")


def _check_codes(op, name, codes, K, check):
    check_indices(op, name, codes, K, check, what="codes")


def _check_signs(op, name, signs, n):
    check_array(op, name, signs, np.int8, shape=(n,))
    if n == 0:
        return
    xp = xp_of(signs)
    lo, hi = (int(v) for v in xp.stack([signs.min(), signs.max()]).astype(np.int64).tolist())
    if lo < -1 or hi > 1:
        bad_value = lo if lo < -1 else hi
        pos = int(xp.argmax(signs == bad_value))
        raise ValueError(f"{op}: {name}[{pos}] = {bad_value} is not a ternary sign; expected "
                         "-1, 0 or +1")


# --------------------------------------------------------------------------------------------
# 0. The empty table.


def empty_edges(n_buckets, slots, xp=np):
    """(edge_src, edge_dst, edge_attr, edge_score) of an empty table of n_buckets * slots slots,
    on xp's device (numpy or cupy): -1, -1, 0, 0 everywhere."""
    op = "empty_edges"
    n_buckets = check_int(op, "n_buckets", n_buckets, 1, MAX_CODES)
    slots = check_int(op, "slots", slots, 1, MAX_SLOTS)
    capacity = n_buckets * slots
    return (xp.full(capacity, -1, dtype=np.int32), xp.full(capacity, -1, dtype=np.int32),
            xp.zeros(capacity, dtype=np.int8), xp.zeros(capacity, dtype=np.int8))


# --------------------------------------------------------------------------------------------
# 1. The bucket of a source code.


@numba.njit(cache=True)
def _bucket_of(code, n_buckets, K):
    if n_buckets == K:
        return np.int64(code)
    return np.int64(mix64(np.uint64(code)) % np.uint64(n_buckets))


@numba.njit(parallel=True, cache=True)
def _edge_bucket_cpu(codes, n_buckets, K, out):
    for i in numba.prange(codes.shape[0]):
        out[i] = _bucket_of(codes[i], n_buckets, K)


@cuda.jit(cache=True)
def _edge_bucket_cuda(codes, n_buckets, K, out):
    for i in range(cuda.grid(1), codes.shape[0], cuda.gridsize(1)):
        out[i] = _bucket_of(codes[i], n_buckets, K)


def _launch_edge_bucket(dev, codes, n_buckets, K, out):
    args = (codes, np.int64(n_buckets), np.int64(K), out)
    if dev == "cpu":
        _edge_bucket_cpu(*args)
    else:
        launch(_edge_bucket_cuda, blocks(codes.shape[0], _THREADS), _THREADS, *args)


def edge_bucket(codes, n_buckets, K, *, check=True):
    """The bucket of each source code: int64 (n,) on codes' device.

    codes int32/int64 (n,) in [0, K). n_buckets == K: bucket(a) = a (dense mode); otherwise
    bucket(a) = mix64(uint64(a)) mod n_buckets (splitmix64's finaliser; see the module doc).
    `check=False` skips the range check (a reduction and a host sync on the GPU).
    """
    op = "edge_bucket"
    dev = target(codes, op=op)
    K = check_int(op, "K", K, 1, MAX_CODES)
    n_buckets = check_int(op, "n_buckets", n_buckets, 1, K)
    _check_codes(op, "codes", codes, K, check)
    out = xp_of(codes).empty(codes.shape[0], dtype=np.int64)
    if codes.shape[0]:
        _launch_edge_bucket(dev, codes, n_buckets, K, out)
    return out


def edge_bucket_reference(codes, n_buckets, K):
    codes = np.asarray(codes)
    if n_buckets == K:
        return codes.astype(np.int64)
    z = mix64_reference(codes.astype(np.uint64))
    return (z % np.uint64(n_buckets)).astype(np.int64)


# --------------------------------------------------------------------------------------------
# 2. Admission, reinforcement, eviction and ageing.


@numba.njit(cache=True)
def _observe_run(edge_src, edge_dst, edge_attr, edge_score, obs_bucket, obs_src, obs_dst,
                 obs_attr, slots, start):
    """Apply the run of observations of one bucket that begins at position `start` of the
    observations sorted by bucket, in order. Returns (admitted, reinforced, evicted, aged)."""
    n = obs_bucket.shape[0]
    i = np.int64(start)
    bucket = obs_bucket[i]
    base = bucket * slots
    admitted = 0
    reinforced = 0
    evicted = 0
    aged = 0
    while i < n:
        if obs_bucket[i] != bucket:
            break
        a = np.int64(obs_src[i])
        b = np.int64(obs_dst[i])
        sign = np.int64(obs_attr[i])
        i += 1
        if a == b:
            continue
        match = -1
        empty = -1
        lowest = -1
        lowest_score = SCORE_MAX + 1
        for s in range(slots):
            d = np.int64(edge_dst[base + s])
            if d == -1:
                if empty < 0:
                    empty = s
            elif d == b and np.int64(edge_src[base + s]) == a:
                match = s
                break
            else:
                score = np.int64(edge_score[base + s])
                if score < lowest_score:  # strict: ties keep the lowest slot
                    lowest_score = score
                    lowest = s
        if match >= 0:
            k = base + match
            edge_score[k] = min(np.int64(edge_score[k]) + 1, SCORE_MAX)
            edge_attr[k] = sign
            reinforced += 1
        elif empty >= 0 or lowest_score == 0:
            k = base + (empty if empty >= 0 else lowest)
            if empty < 0:
                evicted += 1
            edge_src[k] = a
            edge_dst[k] = b
            edge_attr[k] = sign
            edge_score[k] = 1
            admitted += 1
        else:
            for s in range(slots):
                edge_score[base + s] = np.int64(edge_score[base + s]) - 1
            aged += 1
    return admitted, reinforced, evicted, aged


@numba.njit(parallel=True, cache=True)
def _observe_edges_cpu(edge_src, edge_dst, edge_attr, edge_score, obs_bucket, obs_src,
                       obs_dst, obs_attr, slots, counts):
    # obs_*: the observations in bucket order (the wrapper's stable sort)
    admitted = 0
    reinforced = 0
    evicted = 0
    aged = 0
    for p in numba.prange(obs_bucket.shape[0]):
        i = np.int64(p)  # prange's index may be unsigned; i - 1 must stay an integer
        # Per-run counts added at the top of the loop body: numba 0.68 loses reductions made
        # inside a branch (see tables._sparse_ternary_update_cpu).
        ad = 0
        re = 0
        ev = 0
        ag = 0
        if i == 0 or obs_bucket[i] != obs_bucket[i - 1]:
            ad, re, ev, ag = _observe_run(edge_src, edge_dst, edge_attr, edge_score, obs_bucket,
                                          obs_src, obs_dst, obs_attr, slots, i)
        admitted += ad
        reinforced += re
        evicted += ev
        aged += ag
    counts[0] += admitted
    counts[1] += reinforced
    counts[2] += evicted
    counts[3] += aged


_RUN_THREADS = 64   # a block per run, a thread per slot (slots <= 64)
_NONE = 1 << 30     # "no such slot" in the block's shared minima


@cuda.jit(cache=True)
def _observe_edges_cuda(edge_src, edge_dst, edge_attr, edge_score, obs_bucket, obs_src,
                        obs_dst, obs_attr, slots, counts):
    # A block per bucket run (the block of the run's first sorted position), a thread per
    # slot. The rule is _observe_run's, applied observation after observation (it is
    # order-dependent), but each observation's slot scan is parallel: the bucket's slots sit
    # in the threads' registers from the run's start to its end, and three shared minima
    # give the first matching slot, the first empty one and the first of the lowest score.
    # A code book's popular code makes a run of thousands: this is that run's time.
    first = cuda.shared.array(3, numba.int32)   # match, empty, lowest (score * 64 + slot)
    t = cuda.threadIdx.x
    n = obs_bucket.shape[0]
    admitted = 0
    reinforced = 0
    evicted = 0
    aged = 0
    start = cuda.blockIdx.x
    while start < n:
        if start == 0 or obs_bucket[start] != obs_bucket[start - 1]:
            bucket = obs_bucket[start]
            k = bucket * slots + t
            mine = t < slots
            src = np.int64(edge_src[k]) if mine else np.int64(0)
            dst = np.int64(edge_dst[k]) if mine else np.int64(0)
            attr = np.int64(edge_attr[k]) if mine else np.int64(0)
            score = np.int64(edge_score[k]) if mine else np.int64(0)
            i = start
            while i < n and obs_bucket[i] == bucket:
                a = np.int64(obs_src[i])
                b = np.int64(obs_dst[i])
                sign = np.int64(obs_attr[i])
                i += 1
                if a == b:
                    continue
                if t < 3:
                    first[t] = _NONE
                cuda.syncthreads()
                if mine:
                    if dst == -1:
                        cuda.atomic.min(first, 1, t)
                    elif dst == b and src == a:
                        cuda.atomic.min(first, 0, t)
                    else:
                        cuda.atomic.min(first, 2, numba.int32(score * 64 + t))
                cuda.syncthreads()
                match, empty, lowest = first[0], first[1], first[2]
                cuda.syncthreads()   # read before the next observation resets them
                if match != _NONE:
                    if t == match:
                        score = min(score + 1, SCORE_MAX)
                        attr = sign
                    reinforced += 1
                elif empty != _NONE or lowest // 64 == 0:
                    if (empty if empty != _NONE else lowest % 64) == t:
                        src, dst, attr, score = a, b, sign, np.int64(1)
                    if empty == _NONE:
                        evicted += 1
                    admitted += 1
                else:
                    score -= 1
                    aged += 1
            if mine:
                edge_src[k] = src
                edge_dst[k] = dst
                edge_attr[k] = attr
                edge_score[k] = score
        start += cuda.gridDim.x
    if t == 0:   # every thread counted the same: thread 0 reports
        if admitted != 0:
            cuda.atomic.add(counts, 0, admitted)
        if reinforced != 0:
            cuda.atomic.add(counts, 1, reinforced)
        if evicted != 0:
            cuda.atomic.add(counts, 2, evicted)
        if aged != 0:
            cuda.atomic.add(counts, 3, aged)


def _check_not_sharing(op, writes, reads):
    """The kernel writes `writes` while reading `reads`; reads may share memory with each other
    (obs_src = seq[:-1], obs_dst = seq[1:] is the usual call)."""
    check_distinct(op, **writes)
    for read_name, r in reads.items():
        for write_name, w in writes.items():
            check_distinct(op, **{write_name: w, read_name: r})


def observe_edges(edge_src, edge_dst, edge_attr, edge_score, obs_src, obs_dst, obs_attr,
                  n_buckets, slots, K, *, counts=None, check=True):
    """Apply the admission / eviction rule (module doc) for each observation, in place.

    edge_src, edge_dst int32 and edge_attr, edge_score int8, each (n_buckets * slots,): the
    edge table, updated in place. obs_src, obs_dst int32/int64 (n,) in [0, K): the transitions
    a -> b; obs_attr int8 (n,) in {-1, 0, +1}: the sign stored on the edge. n_buckets in 1..K
    (== K: dense mode, bucket(a) = a), slots in 1..64, K in 1..2**31 - 1.

    Returns `counts` int64 (4,) on the table's device, without a host sync:
        counts[0] += admitted    new edges stored (into an empty slot or over an evicted one)
        counts[1] += reinforced  observations of an edge already stored
        counts[2] += evicted     edges overwritten (score 0) by an admitted one
        counts[3] += aged        observations rejected by a full bucket (which then aged)
    (allocated as zeros when None). Self-transitions count nowhere, so
    admitted + reinforced + aged = number of observations with a != b; the number of stored
    edges grows by admitted - evicted.

    `check=False` skips the range checks of obs_src, obs_dst and obs_attr (reductions and a
    host sync on the GPU): pass it only for codes and signs produced by trusted kernels.
    Cost: one hash launch, one stable argsort of n bucket ids, four gathers into its order,
    one launch that does O(n * slots) work (serial within a bucket); independent of K.
    """
    op = "observe_edges"
    dev = target(edge_src, edge_dst, edge_attr, edge_score, obs_src, obs_dst, obs_attr, counts,
                 op=op)
    n_buckets, slots, K = _check_geometry(op, n_buckets, slots, K)
    _check_edges(op, edge_src, edge_dst, edge_attr, edge_score, n_buckets, slots, True)
    _check_codes(op, "obs_src", obs_src, K, False)
    n = obs_src.shape[0]
    _check_codes(op, "obs_dst", obs_dst, K, False)
    if obs_dst.shape[0] != n:
        raise ValueError(f"{op}: obs_dst has shape {tuple(obs_dst.shape)}, expected ({n},) to "
                         f"match obs_src (one destination per transition)")
    check_array(op, "obs_attr", obs_attr, np.int8, shape=(n,))
    if counts is not None:
        check_array(op, "counts", counts, np.int64, shape=(4,), writeable=True)
    _check_not_sharing(op, dict(edge_src=edge_src, edge_dst=edge_dst, edge_attr=edge_attr,
                                edge_score=edge_score, counts=counts),
                       dict(obs_src=obs_src, obs_dst=obs_dst, obs_attr=obs_attr))
    if check:
        _check_codes(op, "obs_src", obs_src, K, True)
        _check_codes(op, "obs_dst", obs_dst, K, True)
        _check_signs(op, "obs_attr", obs_attr, n)
    xp = xp_of(edge_src)
    counts = xp.zeros(4, dtype=np.int64) if counts is None else counts
    if n == 0:
        return counts
    obs_bucket = xp.empty(n, dtype=np.int64)
    _launch_edge_bucket(dev, obs_src, n_buckets, K, obs_bucket)
    # Stable: within a bucket the observations keep their order (CuPy's argsort is always a
    # stable sort and takes no `kind`).
    order = xp.argsort(obs_bucket, kind="stable") if xp is np else xp.argsort(obs_bucket)
    args = (edge_src, edge_dst, edge_attr, edge_score, obs_bucket[order], obs_src[order],
            obs_dst[order], obs_attr[order], np.int64(slots), counts)
    if dev == "cpu":
        _observe_edges_cpu(*args)
    else:
        launch(_observe_edges_cuda, min(n, 1 << 20), _RUN_THREADS, *args)
    return counts


def observe_edges_reference(edge_src, edge_dst, edge_attr, edge_score, obs_src, obs_dst,
                            obs_attr, n_buckets, slots, K):
    """NumPy truth: the rule applied one observation at a time in the given order (no
    grouping). Returns new (edge_src, edge_dst, edge_attr, edge_score, counts); inputs
    untouched."""
    src, dst, attr, score = (np.array(x, copy=True) for x in (edge_src, edge_dst, edge_attr,
                                                               edge_score))
    counts = np.zeros(4, dtype=np.int64)
    buckets = edge_bucket_reference(obs_src, n_buckets, K)
    for a, b, sign, bucket in zip(np.asarray(obs_src).tolist(), np.asarray(obs_dst).tolist(),
                                  np.asarray(obs_attr).tolist(), buckets.tolist()):
        if a == b:
            continue
        cell = slice(bucket * slots, (bucket + 1) * slots)
        b_src, b_dst, b_attr, b_score = src[cell], dst[cell], attr[cell], score[cell]  # views
        hit = np.flatnonzero((b_dst == b) & (b_src == a))
        if hit.size:
            k = hit[0]
            b_score[k] = min(int(b_score[k]) + 1, SCORE_MAX)
            b_attr[k] = sign
            counts[1] += 1
            continue
        empty = np.flatnonzero(b_dst == -1)
        if empty.size:
            k = empty[0]
        else:
            k = int(np.argmin(b_score))  # first of the lowest
            if b_score[k] != 0:
                b_score -= 1
                counts[3] += 1
                continue
            counts[2] += 1
        b_src[k], b_dst[k], b_attr[k], b_score[k] = a, b, sign, 1
        counts[0] += 1
    return src, dst, attr, score, counts


# --------------------------------------------------------------------------------------------
# 3. The one-hop read: out-edges of query codes.


@numba.njit(cache=True)
def _neighbor_slot(edge_src, edge_dst, edge_attr, edge_score, code, k):
    """(dst, weight) of slot k for source `code`: (-1, 0) unless the slot holds an edge of it.
    The weight is one float32 division of an exact integer, so every device rounds it alike."""
    d = np.int64(edge_dst[k])
    if d == -1 or np.int64(edge_src[k]) != code:
        return np.int64(-1), np.float32(0.0)
    w = np.int64(edge_attr[k]) * np.int64(edge_score[k])
    return d, np.float32(w) / np.float32(SCORE_MAX)


_neighbor_slot_dev = on_device(_neighbor_slot)


@numba.njit(parallel=True, cache=True)
def _edge_neighbors_cpu(edge_src, edge_dst, edge_attr, edge_score, codes, n_buckets, K, slots,
                        out_dst, out_weight):
    for i in numba.prange(codes.shape[0]):
        code = np.int64(codes[i])
        base = _bucket_of(code, n_buckets, K) * slots
        for s in range(slots):
            d, w = _neighbor_slot(edge_src, edge_dst, edge_attr, edge_score, code, base + s)
            out_dst[i, s] = d
            out_weight[i, s] = w


@cuda.jit(cache=True)
def _edge_neighbors_cuda(edge_src, edge_dst, edge_attr, edge_score, codes, n_buckets, K, slots,
                         out_dst, out_weight):
    # A thread per (query, slot): a query's slots are adjacent, so loads and stores coalesce.
    for task in range(cuda.grid(1), codes.shape[0] * slots, cuda.gridsize(1)):
        i = task // slots
        s = task - i * slots
        code = np.int64(codes[i])
        base = _bucket_of(code, n_buckets, K) * slots
        d, w = _neighbor_slot_dev(edge_src, edge_dst, edge_attr, edge_score, code, base + s)
        out_dst[i, s] = d
        out_weight[i, s] = w


def edge_neighbors(edge_src, edge_dst, edge_attr, edge_score, codes, n_buckets, slots, K,
                   out_dst=None, out_weight=None, *, check=True):
    """The out-edges of each query code: returns (out_dst int32 (n, slots),
    out_weight float32 (n, slots)).

    For query i with code c and slot s of bucket(c):
        out_dst[i, s]    = edge_dst of the slot if it holds an edge of c, else -1
                           (empty, or an edge of another code sharing the bucket);
        out_weight[i, s] = float32(attr * score) / 127 for such an edge, else 0
    (a slot with score 0 or attr 0 yields its destination with weight 0). The layout follows
    the slots, so the -1 entries are scattered; mask with out_dst >= 0.
    Cost O(n * slots), independent of K. codes int32/int64 (n,) in [0, K); `out_*`, if given,
    must be C-contiguous with those shapes and dtypes and are overwritten. `check=False` skips
    the range check of codes (a host sync on the GPU).
    """
    op = "edge_neighbors"
    dev = target(edge_src, edge_dst, edge_attr, edge_score, codes, out_dst, out_weight, op=op)
    n_buckets, slots, K = _check_geometry(op, n_buckets, slots, K)
    _check_edges(op, edge_src, edge_dst, edge_attr, edge_score, n_buckets, slots, False)
    _check_codes(op, "codes", codes, K, False)
    n = codes.shape[0]
    xp = xp_of(edge_src)
    if out_dst is None:
        out_dst = xp.empty((n, slots), dtype=np.int32)
    else:
        check_array(op, "out_dst", out_dst, np.int32, shape=(n, slots), writeable=True)
    if out_weight is None:
        out_weight = xp.empty((n, slots), dtype=np.float32)
    else:
        check_array(op, "out_weight", out_weight, np.float32, shape=(n, slots), writeable=True)
    check_distinct(op, out_dst=out_dst, out_weight=out_weight)
    _check_codes(op, "codes", codes, K, check)
    if n == 0:
        return out_dst, out_weight
    args = (edge_src, edge_dst, edge_attr, edge_score, codes, np.int64(n_buckets), np.int64(K),
            np.int64(slots), out_dst, out_weight)
    if dev == "cpu":
        _edge_neighbors_cpu(*args)
    else:
        launch(_edge_neighbors_cuda, blocks(n * slots, _THREADS), _THREADS, *args)
    return out_dst, out_weight


def edge_neighbors_reference(edge_src, edge_dst, edge_attr, edge_score, codes, n_buckets, slots,
                             K):
    codes = np.asarray(codes).astype(np.int64)
    cells = edge_bucket_reference(codes, n_buckets, K)[:, None] * slots + np.arange(slots)
    dst = np.asarray(edge_dst)[cells]
    own = (dst != -1) & (np.asarray(edge_src)[cells] == codes[:, None])
    w = np.asarray(edge_attr)[cells].astype(np.int64) * np.asarray(edge_score)[cells]
    out_dst = np.where(own, dst, -1).astype(np.int32)
    out_weight = np.where(own, w, 0).astype(np.float32) / np.float32(SCORE_MAX)
    return out_dst, out_weight.astype(np.float32)


# --------------------------------------------------------------------------------------------
# 4. Forgetting without pressure.


def decay_scores(edge_score, shift):
    """edge_score -= edge_score >> shift, in place (int8 (capacity,), scores 0..127); returns it.

    shift in 1..7. A score of 1 (or any score below 2**shift) is left as it is: decay weakens
    edges geometrically but never makes one evictable by itself; only the ageing of a bucket
    under pressure brings a score to 0. Two elementwise xp operations (no kernel of its own:
    the job is one line on either device).
    """
    op = "decay_scores"
    check_array(op, "edge_score", edge_score, np.int8, ndim=1, writeable=True)
    shift = check_int(op, "shift", shift, 1, 7)
    edge_score -= edge_score >> shift
    return edge_score


def decay_scores_reference(edge_score, shift):
    s = np.asarray(edge_score).astype(np.int64)
    return (s - (s >> shift)).astype(np.int8)
