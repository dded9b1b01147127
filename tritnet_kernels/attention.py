"""The row-wise half of attention: causal mask, ALiBi bias and softmax, forward and backward.

`tritnet.functional.scaled_dot_product_attention` computes attention a block of query rows
at a time. The two products of a block (scores = q·kᵀ, then p·v) are GEMMs (cuBLAS through
CuPy, NumPy on CPU); everything between them is one pass over each row of the score tile,
done here in one launch instead of a dozen array ops:

    attention_softmax(scores, lse, slopes, scale, row0, causal)
        scores (R, C) in place:  v = scores · scale − slope · |pos − j|   (pos = row0 + i)
                                 p = softmax(v) over the visible keys j (j <= pos when causal;
                                     p = 0 for the rest)
        lse (R,):                log Σ_j exp(v_j), kept for backward
    attention_softmax_grad(scores, dp, lse, g, out, slopes, scale, row0, causal)
        scores (R, C) in place:  p, recomputed from the raw scores and lse
        dp (R, C) in place:      ds = p · (dp − δ) · scale,  δ = Σ_d g[r, d] · out[r, d]
                                 (the gradient with respect to the raw scores q·kᵀ)

Row r of a tile belongs to batch entry b = r // tq (batch = the flattened leading dims, e.g.
(B, H)) and to query i = r % tq of the block; `row0` is the position of the block's first
query in key coordinates (its first row plus Tk − Tq: the causal mask is bottom-right
aligned). `slopes` (batch,) holds each batch entry's ALiBi slope (zeros: no bias).

Arithmetic is float64 inside both kernels (the row's max and sum, exp, log); v is rounded to
the scores' dtype before exp in both passes, so backward's p is forward's p. The CPU twin
and the CUDA kernel agree within the rounding of exp; the NumPy references are the truth the
tests use.
"""

from . import _numba_compat  # noqa: F401  (must precede numba.cuda)

import math

import numba
import numpy as np
from numba import cuda

from ._launch import launch, on_device, target
from ._common import block_tree_sum, check_array, check_distinct, check_int

__all__ = [
    "attention_softmax",
    "attention_softmax_reference",
    "attention_softmax_grad",
    "attention_softmax_grad_reference",
]

_THREADS = 128  # one block per row; a power of two for the shared-memory trees
_FLOATS = (np.float32, np.float64)


@numba.njit(cache=True)
def _row(r, tq, row0, slopes, cols, causal):
    """(pos, slope, n) of tile row r: its query's position in key coordinates, its batch
    entry's ALiBi slope, and how many keys it sees (0..n-1)."""
    pos = row0 + r % tq
    n = max(0, min(cols, pos + 1)) if causal else cols
    return pos, slopes[r // tq], n


@numba.njit(cache=True)
def _biased(raw, scale, slope, pos, j):
    """A raw score q·k scaled and ALiBi-biased, in float64 (stored back rounded)."""
    return raw * scale - slope * abs(pos - j)


_row_dev = on_device(_row)
_biased_dev = on_device(_biased)


# --------------------------------------------------------------------------------------------
# Forward: scores -> probabilities, and each row's logsumexp.


@numba.njit(parallel=True, cache=True)
def _softmax_cpu(scores, lse, slopes, tq, scale, row0, causal):
    rows, cols = scores.shape
    for r in numba.prange(rows):
        pos, slope, n = _row(r, tq, row0, slopes, cols, causal)
        m = -math.inf
        for j in range(n):
            scores[r, j] = _biased(scores[r, j], scale, slope, pos, j)
            m = max(m, scores[r, j])
        total = 0.0
        for j in range(n):
            e = math.exp(scores[r, j] - m)
            scores[r, j] = e
            total += e
        for j in range(n):
            scores[r, j] = scores[r, j] / total
        for j in range(n, cols):
            scores[r, j] = 0.0
        lse[r] = m + math.log(total)


@cuda.jit(device=True)
def _block_tree_max(buf, tid, width):
    half = width // 2
    while half > 0:
        if tid < half:
            buf[tid] = max(buf[tid], buf[tid + half])
        cuda.syncthreads()
        half //= 2


@cuda.jit(device=True)
def _block_all(red, tid, value, is_max):
    """The max (is_max) or the sum of `value` over the block's threads, returned to each."""
    red[tid] = value
    cuda.syncthreads()
    if is_max:
        _block_tree_max(red, tid, _THREADS)
    else:
        block_tree_sum(red, tid, _THREADS)
    value = red[0]
    cuda.syncthreads()  # every thread has read red[0] before red is reused
    return value


@cuda.jit(cache=True)
def _softmax_cuda(scores, lse, slopes, tq, scale, row0, causal):
    # One block per row (grid-strided over rows); the threads stride over the row's keys.
    red = cuda.shared.array(_THREADS, numba.float64)
    tid = cuda.threadIdx.x
    rows, cols = scores.shape
    for r in range(cuda.blockIdx.x, rows, cuda.gridDim.x):
        pos, slope, n = _row_dev(r, tq, row0, slopes, cols, causal)
        m = -math.inf
        for j in range(tid, n, _THREADS):
            scores[r, j] = _biased_dev(scores[r, j], scale, slope, pos, j)
            m = max(m, scores[r, j])
        m = _block_all(red, tid, m, True)
        total = 0.0
        for j in range(tid, n, _THREADS):
            e = math.exp(scores[r, j] - m)
            scores[r, j] = e
            total += e
        total = _block_all(red, tid, total, False)
        for j in range(tid, n, _THREADS):
            scores[r, j] = scores[r, j] / total
        for j in range(n + tid, cols, _THREADS):
            scores[r, j] = 0.0
        if tid == 0:
            lse[r] = m + math.log(total)


def attention_softmax(scores, lse, slopes, scale, row0, causal):
    """scores (R, C) float → softmax probabilities in place; lse (R,) ← each row's logsumexp.

    Row r is query r % tq of batch entry r // tq, with tq = R / len(slopes); its position in
    key coordinates is row0 + r % tq. Under `causal`, key j is visible iff j <= that position.
    slopes (batch,): the ALiBi slope of each batch entry (zeros: no bias). Returns lse.
    """
    op = "attention_softmax"
    tq = _check_tile(op, scores, slopes, row0, causal)
    check_array(op, "lse", lse, scores.dtype, shape=scores.shape[:1], writeable=True)
    check_distinct(op, scores=scores, lse=lse)
    if scores.size == 0:
        return lse
    args = (scores, lse, slopes, np.int64(tq), float(scale), np.int64(row0),
            np.int64(bool(causal)))
    if target(scores, lse, slopes, op=op) == "cpu":
        _softmax_cpu(*args)
    else:
        launch(_softmax_cuda, _grid(scores.shape[0]), _THREADS, *args)
    return lse


# --------------------------------------------------------------------------------------------
# Backward: the probabilities again (from lse), and the gradient of the raw scores.


@numba.njit(parallel=True, cache=True)
def _softmax_grad_cpu(scores, dp, lse, g, out, slopes, tq, scale, row0, causal):
    rows, cols = scores.shape
    for r in numba.prange(rows):
        pos, slope, n = _row(r, tq, row0, slopes, cols, causal)
        delta = 0.0
        for d in range(g.shape[1]):
            delta += g[r, d] * out[r, d]
        for j in range(n):
            scores[r, j] = _biased(scores[r, j], scale, slope, pos, j)  # rounded as forward's
            p = math.exp(scores[r, j] - lse[r])
            scores[r, j] = p
            dp[r, j] = p * (dp[r, j] - delta) * scale
        for j in range(n, cols):
            scores[r, j] = 0.0
            dp[r, j] = 0.0


@cuda.jit(cache=True)
def _softmax_grad_cuda(scores, dp, lse, g, out, slopes, tq, scale, row0, causal):
    red = cuda.shared.array(_THREADS, numba.float64)
    tid = cuda.threadIdx.x
    rows, cols = scores.shape
    for r in range(cuda.blockIdx.x, rows, cuda.gridDim.x):
        pos, slope, n = _row_dev(r, tq, row0, slopes, cols, causal)
        delta = 0.0
        for d in range(tid, g.shape[1], _THREADS):
            delta += g[r, d] * out[r, d]
        delta = _block_all(red, tid, delta, False)
        for j in range(tid, n, _THREADS):
            scores[r, j] = _biased_dev(scores[r, j], scale, slope, pos, j)
            p = math.exp(scores[r, j] - lse[r])
            scores[r, j] = p
            dp[r, j] = p * (dp[r, j] - delta) * scale
        for j in range(n + tid, cols, _THREADS):
            scores[r, j] = 0.0
            dp[r, j] = 0.0


def attention_softmax_grad(scores, dp, lse, g, out, slopes, scale, row0, causal):
    """Backward of attention_softmax for one tile, in place and in one launch.

    scores (R, C): the raw scores q·kᵀ again → the probabilities p. dp (R, C): g·vᵀ → the
    gradient of the raw scores, p · (dp − δ) · scale with δ_r = Σ_d g[r, d] · out[r, d].
    lse (R,): forward's logsumexp; g, out (R, D): the output's gradient and the output.
    slopes, scale, row0, causal: as given to attention_softmax. Returns dp.
    """
    op = "attention_softmax_grad"
    tq = _check_tile(op, scores, slopes, row0, causal)
    rows = scores.shape[0]
    check_array(op, "dp", dp, scores.dtype, shape=scores.shape, writeable=True)
    check_array(op, "lse", lse, scores.dtype, shape=(rows,))
    check_array(op, "g", g, scores.dtype, ndim=2)
    if g.shape[0] != rows:
        raise ValueError(f"{op}: g has shape {tuple(g.shape)}, expected ({rows}, D) to match "
                         f"the {rows} rows of scores")
    check_array(op, "out", out, scores.dtype, shape=g.shape)
    check_distinct(op, scores=scores, dp=dp)
    if scores.size == 0:
        return dp
    args = (scores, dp, lse, g, out, slopes, np.int64(tq), float(scale),
            np.int64(row0), np.int64(bool(causal)))
    if target(scores, dp, lse, g, out, slopes, op=op) == "cpu":
        _softmax_grad_cpu(*args)
    else:
        launch(_softmax_grad_cuda, _grid(rows), _THREADS, *args)
    return dp


# --------------------------------------------------------------------------------------------
# Checks and references.


def _grid(rows):
    return max(1, min(rows, 1 << 20))


def _check_tile(op, scores, slopes, row0, causal):
    """The checks both kernels share; returns tq, the query rows per batch entry."""
    if not hasattr(scores, "dtype") or scores.dtype not in _FLOATS:
        raise TypeError(f"{op}: scores has dtype {getattr(scores, 'dtype', type(scores).__name__)}"
                        ", expected float32 or float64")
    check_array(op, "scores", scores, scores.dtype, ndim=2, writeable=True)
    check_array(op, "slopes", slopes, scores.dtype, ndim=1)
    batch, rows = slopes.shape[0], scores.shape[0]
    if rows and (batch == 0 or rows % batch):
        raise ValueError(f"{op}: scores has {rows} rows, which is not a whole number of rows "
                         f"for each of the {batch} slopes (one per batch entry)")
    check_int(op, "row0", row0, 0, 2**62)
    return rows // batch if batch else 0


def _bias_and_mask(scores, slopes, scale, row0, causal):
    """float64 (R, C) v = scores·scale − slope·|pos − j| rounded to the dtype, and visibility."""
    rows, cols = scores.shape
    tq = rows // slopes.shape[0]
    pos = row0 + np.arange(rows) % tq
    slope = np.asarray(slopes, np.float64)[np.arange(rows) // tq]
    j = np.arange(cols)
    v = scores.astype(np.float64) * scale - slope[:, None] * np.abs(pos[:, None] - j[None, :])
    visible = j[None, :] <= pos[:, None] if causal else np.ones((rows, cols), bool)
    return v.astype(scores.dtype).astype(np.float64), visible


def attention_softmax_reference(scores, slopes, scale, row0, causal):
    """(p, lse) in scores' dtype from NumPy scores (R, C); see attention_softmax."""
    scores, slopes = np.asarray(scores), np.asarray(slopes)
    v, visible = _bias_and_mask(scores, slopes, scale, row0, causal)
    v = np.where(visible, v, -np.inf)
    m = v.max(axis=1, keepdims=True)
    e = np.exp(v - m)
    total = e.sum(axis=1, keepdims=True)
    lse = (m + np.log(total))[:, 0]
    return (e / total).astype(scores.dtype), lse.astype(scores.dtype)


def attention_softmax_grad_reference(scores, dp, lse, g, out, slopes, scale, row0, causal):
    """(p, ds) in scores' dtype; see attention_softmax_grad."""
    scores, slopes = np.asarray(scores), np.asarray(slopes)
    v, visible = _bias_and_mask(scores, slopes, scale, row0, causal)
    p = np.where(visible, np.exp(v - np.asarray(lse, np.float64)[:, None]), 0.0)
    delta = (np.asarray(g, np.float64) * np.asarray(out, np.float64)).sum(axis=1, keepdims=True)
    ds = p * (np.asarray(dp, np.float64) - delta) * scale
    return p.astype(scores.dtype), ds.astype(scores.dtype)
