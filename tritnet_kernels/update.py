"""Integer kernels behind the ternary optimiser (docs/update-rule.md#one-step).

A ternary weight W = diag(s)·T trains without any float copy: its float gradient is
quantised to int8 (`quantize_grad`), added with saturation to the int8 accumulator beside
each trit, and a trit moves one step when its accumulator crosses a threshold
(`ternary_update`). The per-row exponent E (s = 2**(E/8)) moves the same way from its own
accumulator; its gradient dL/dE = (Σ_j G[r, j] T[r, j]) · s · ln2/8 comes from
`exponent_grad_and_scales`, in the same pass over G that finds both quantisation scales.

One optimiser step for a TernaryLinear with weight gradient G (rows, cols) is:

    inv_scales, gE = exponent_grad_and_scales(G, T_packed, E, cols, grad_gain)
    quantize_grad(G,  inv_scales[:1], seed_T, grad_q)
    quantize_grad(gE, inv_scales[1:], seed_E, grad_E_q)
    ternary_update(T_packed, T_accum, grad_q, E, E_accum, grad_E_q, cols, ...)  # one launch

(data-parallel training all-reduces grad_q / grad_E_q between quantisation and update, so the
two stay separate kernels.)

Every job here is a CUDA kernel (`_*_cuda`), a Numba CPU twin with the same argument list
(`_*_cpu`) and a plain-NumPy reference (`*_reference`) used by the tests. Integer outputs are
bit-exact between the twins and the reference: the stochastic rounding draws its uniforms
from a counter-based hash of (seed, flat index), not from a stateful generator, and the
accumulator rule is one njit function (`_update_rules.accumulator_step`) that both twins
call.
"""

from . import _numba_compat  # noqa: F401  (must precede numba.cuda)

import math

import numba
import numpy as np
from numba import cuda

from ._common import (GOLDEN, MASK64, block_tree_sum, blocks, check_array, check_distinct,
                      check_int, mix64, mix64_reference, stream_key)
from ._launch import is_cupy, launch, on_device, target, xp_of
from ._update_rules import (ACCUM_MAX, E_MAX, E_MIN, accumulator_step, exponent_step,
                            exponent_step_dev, rule_reference, sat_accum, trit_group_step)
from .packing import pack_trits_reference, unpack_trits_reference

__all__ = [
    "quantize_grad",
    "quantize_grad_reference",
    "exponent_grad_and_scales",
    "exponent_grad_and_scales_reference",
    "grad_inv_scale_reference",
    "row_trit_dot_reference",
    "SCALE_OF_E",
    "EXPONENT_GRAD_FACTOR",
    "ternary_update",
    "ternary_update_reference",
    "spread_accumulators",
    "spread_accumulators_reference",
    "count_saturated",
    "count_saturated_reference",
    "ACCUM_MAX",
    "E_MIN",
    "E_MAX",
]


# 24 bits: every such integer is exact in float32, so u is the same on every device.
_INV_2_24 = np.float32(1.0 / (1 << 24))
_FLOAT32_MAX = float(np.finfo(np.float32).max)

# s = f(E) = 2 ** (E / 8), correctly rounded to float32, for E = -128..127. A table rather than
# exp2f in the kernels: CUDA's exp2f and the CPU's differ in the last bit for some E, the table
# makes every use of s bit-identical on every device (and costs one cached load).
SCALE_OF_E = np.exp2(np.arange(-128, 128, dtype=np.float64) / 8.0).astype(np.float32)
_SCALE_OF_E = SCALE_OF_E  # the kernels' frozen copy
# dL/dE = dL/ds · ds/dE = dL/ds · s · ln2/8
EXPONENT_GRAD_FACTOR = np.float32(math.log(2) / 8)

# Launch geometry. Grid-stride loops keep the grid bounded; the update kernel adds its counts
# with one global atomic per block, so a bounded grid also bounds atomic traffic.
_QUANT_THREADS = 256
_UPDATE_THREADS = 256       # 8 warps; each warp owns 8 32-trit groups of a row a pass
_UPDATE_WARPS = _UPDATE_THREADS // 32


# --------------------------------------------------------------------------------------------
# Shared rules: njit functions that the CPU twins call and that numba-cuda compiles into the
# CUDA kernels, so both devices run one definition. (The simulator calls the CPU build with
# NumPy scalars; the rules that take arrays reach the kernels through `on_device`.)


@numba.njit(cache=True)
def _uniform24(key, i):
    """Uniform in [0, 1) on the grid k / 2**24, a pure function of (key, flat index i)."""
    z = mix64(key + np.uint64(i) * GOLDEN)
    return np.float32(z >> np.uint64(40)) * _INV_2_24


@numba.njit(cache=True)
def _round_stochastic(v, u, clip):
    """floor(v) + (u < frac(v)) for float32 v clamped to [-clip, clip]; NaN -> 0."""
    if v != v:
        return np.int64(0)
    # Clamp before the integer conversion: a huge v must not overflow it (clip <= 128, and
    # anything beyond ±128 saturates the int8 sum anyway).
    if v > clip:
        v = clip
    elif v < -clip:
        v = -clip
    # np.int64: math.floor of a float32 is an integer on the CPU but a float in numba-cuda.
    lo = np.int64(math.floor(v))
    # v - lo is exact in float32 (the fractional part of a float is representable).
    if u < v - np.float32(lo):
        return lo + 1
    return lo


# --------------------------------------------------------------------------------------------
# Validation shared by the wrappers. Everything a caller can get wrong is raised here, before
# any allocation or launch, so a bad call leaves every array untouched.


def _is_real(x):
    real = isinstance(x, (int, float, np.integer, np.floating))
    return real and not isinstance(x, (bool, np.bool_))


# --------------------------------------------------------------------------------------------
# 1. Gradient quantisation: float32 -> int8, stochastic rounding against a per-tensor scale.


@numba.njit(cache=True)
def _inv_rms(total, n, gain):
    if n <= 0.0:   # no rows count (every touched row is padding)
        return np.float32(0.0)
    m = total / n
    if math.isfinite(m) and m > 0.0:
        return np.float32(gain / math.sqrt(m))
    return np.float32(0.0)


_inv_rms_dev = on_device(_inv_rms)


@numba.njit(cache=True)
def _counted(n, row_size, rows):
    """The elements the mean square is over: all n, or rows[0] rows of row_size."""
    if rows.shape[0] == 0:
        return n
    return np.float64(rows[0]) * row_size


_counted_dev = on_device(_counted)


CLOCK_GAIN_UNIT = 2.0 ** -32   # a clock holds its gain in these units (an integer)


@numba.njit(cache=True)
def _clocked_gain(gain, clock):
    """The gain: clock[1] · 2**-32 when a clock is given (the optimiser's, on the device),
    else gain."""
    if clock.shape[0] == 0:
        return gain
    return np.float64(clock[1]) * CLOCK_GAIN_UNIT


_clocked_gain_dev = on_device(_clocked_gain)


@numba.njit(cache=True)
def _clocked_key(key, clock):
    """The stream key of a step: key itself, or mixed with the step clock[0] when a clock is
    given, so that a replayed CUDA graph draws fresh bits every step."""
    if clock.shape[0] == 0:
        return key
    return mix64(key + np.uint64(clock[0]) * GOLDEN)


_clocked_key_dev = on_device(_clocked_key)


# Device arrays made once and kept, by device: _exponent_grad_and_scales_cuda's int32 (1,)
# block counter (the kernel leaves it at 0) and the empty stand-ins of `_empty`.
_kept_arrays = {}


def _empty(xp, dtype):
    """An empty array on xp's device, kept: the kernels' "not given" for an optional array
    argument (every row counts, no clock)."""
    if xp is np:
        return np.zeros(0, dtype)
    key = (np.dtype(dtype).str, xp.cuda.runtime.getDevice())
    empty = _kept_arrays.get(key)
    if empty is None:
        empty = _kept_arrays[key] = xp.zeros(0, dtype)
    return empty


def _check_clock(op, clock, like):
    target(like, clock, op=op)   # raises if the clock is on another device
    check_array(op, "clock", clock, np.int64, shape=(2,))


def _done_counter(xp):
    if xp is np:
        return np.zeros(1, np.int32)
    key = xp.cuda.runtime.getDevice()
    counter = _kept_arrays.get(key)
    if counter is None:
        counter = _kept_arrays[key] = xp.zeros(1, np.int32)
    return counter


def _check_seed(op, seed):
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"{op}: seed must be an integer in [0, 2**64), got {seed!r}")
    if not 0 <= int(seed) <= MASK64:
        raise ValueError(f"{op}: seed = {int(seed)} is out of range, expected 0 <= seed < 2**64")


@numba.njit(cache=True)
def _quantized(g, scale, key, i, clip, accumulate, held):
    """Element i's new int8 value: round_stochastic(g · scale), added to `held` (its value
    before) when accumulating, saturated."""
    q = _round_stochastic(g * scale, _uniform24(key, i), clip)
    if accumulate:
        q += np.int64(held)
    return sat_accum(q)


@numba.njit(parallel=True, cache=True)
def _quantize_grad_cpu(G, inv_scale, key, clip, accumulate, clock, out):
    scale = inv_scale[0]
    key = _clocked_key(key, clock)
    for i in numba.prange(G.shape[0]):
        out[i] = _quantized(G[i], scale, key, i, clip, accumulate, out[i])


@cuda.jit(cache=True)
def _quantize_grad_cuda(G, inv_scale, key, clip, accumulate, clock, out):
    # Four elements a thread a pass, their loads issued before any is used: with one load in
    # flight a thread the kernel waited on memory latency, not bandwidth.
    scale = inv_scale[0]
    key = _clocked_key_dev(key, clock)
    size = G.shape[0]
    stride = cuda.gridsize(1)
    i = cuda.grid(1)
    while i + 3 * stride < size:
        g0, g1, g2, g3 = G[i], G[i + stride], G[i + 2 * stride], G[i + 3 * stride]
        h0 = h1 = h2 = h3 = np.int8(0)
        if accumulate:
            h0, h1, h2, h3 = out[i], out[i + stride], out[i + 2 * stride], out[i + 3 * stride]
        out[i] = _quantized(g0, scale, key, i, clip, accumulate, h0)
        out[i + stride] = _quantized(g1, scale, key, i + stride, clip, accumulate, h1)
        out[i + 2 * stride] = _quantized(g2, scale, key, i + 2 * stride, clip, accumulate, h2)
        out[i + 3 * stride] = _quantized(g3, scale, key, i + 3 * stride, clip, accumulate, h3)
        i += 4 * stride
    while i < size:
        out[i] = _quantized(G[i], scale, key, i, clip, accumulate, out[i])
        i += stride


def quantize_grad(G, inv_scale, seed, out, *, clip=128, accumulate=True, clock=None):
    """Add round_stochastic(G * inv_scale) into the int8 array `out`, saturating at ±127.
    With accumulate=False, write it instead: out's earlier contents are ignored (so a fresh
    `out` can be xp.empty rather than xp.zeros, one launch fewer).

    G: float32, C-contiguous, any shape (treated as flat, index i in C order).
    inv_scale: a float (finite, >= 0) or a float32 array of shape (1,) on G's device, e.g.
        such as `exponent_grad_and_scales`' inv_scales[:1] (then no host sync is needed).
    seed: integer in [0, 2**64). Use a different seed for every (step, tensor); nearby seeds
        give unrelated streams.
    clock: None, or the optimiser's int64 (2,) [step, gain / 2**-32] on G's device: the stream is
        then that of (seed, step = clock[0]), the step read on the device, so a replayed CUDA
        graph draws fresh bits every step (quantize_grad_reference's `step`).
    out: int8, same shape as G, updated in place and returned (it accumulates, so several
        micro-batches can add into one buffer).
    clip: integer in [1, 128], the most one call adds to one element (128: the int8 range).

    Per element i:
        v = float32(G[i] * inv_scale), NaN -> 0, clamped to [-clip, clip]
        u = uniform(seed, i)            # top 24 bits of a splitmix64 hash, / 2**24
        q = floor(v) + (u < v - floor(v))        # E[q] = v (unbiased)
        out[i] = clamp(out[i] + q, -127, 127)

    uniform(seed, i) = (mix64(key + i * φ) >> 40) / 2**24, key = mix64(seed + φ),
    φ = 0x9E3779B97F4A7C15, mix64 = splitmix64's finaliser; identical on every device.

    Non-finite gradients: the caller checks finiteness (or takes the scale from
    `exponent_grad_and_scales`, which turns a non-finite tensor into a zero update). The
    kernel never writes garbage: NaN rounds to 0, ±inf saturates to ±127.
    """
    op = "quantize_grad"
    scale_on_device = isinstance(inv_scale, np.ndarray) or is_cupy(inv_scale)
    dev = target(G, out, inv_scale if scale_on_device else None, op=op)
    check_array(op, "G", G, np.float32)
    check_array(op, "out", out, np.int8, shape=G.shape, writeable=True)
    if scale_on_device:
        check_array(op, "inv_scale", inv_scale, np.float32, shape=(1,))
    elif _is_real(inv_scale):
        if not 0 <= inv_scale <= _FLOAT32_MAX:  # also rejects NaN
            raise ValueError(f"{op}: inv_scale = {inv_scale!r}, expected a number in "
                             "[0, float32 max]")
    else:
        raise TypeError(f"{op}: inv_scale must be a number or a float32 array of shape (1,), "
                        f"got {type(inv_scale).__name__}")
    _check_seed(op, seed)
    check_distinct(op, G=G, out=out)
    clip = np.float32(check_int(op, "clip", clip, 1, 128))
    if clock is not None:
        _check_clock(op, clock, G)

    if G.size == 0:
        return out
    xp = xp_of(G)
    if not scale_on_device:
        inv_scale = xp.full(1, inv_scale, dtype=np.float32)
    key = stream_key(int(seed))
    G_flat, out_flat = G.reshape(-1), out.reshape(-1)
    args = (G_flat, inv_scale, key, clip, np.int64(bool(accumulate)),
            _empty(xp, np.int64) if clock is None else clock, out_flat)
    if dev == "cpu":
        _quantize_grad_cpu(*args)
    else:
        launch(_quantize_grad_cuda, blocks(G.size, _QUANT_THREADS), _QUANT_THREADS, *args)
    return out


def quantize_grad_reference(G, inv_scale, seed, out, *, clip=128, step=None):
    """NumPy truth for `quantize_grad`, with its signature: updates `out` and returns it.
    step: the step of quantize_grad's clock (clock[0]), when it is given one."""
    scale = np.float32(np.asarray(inv_scale, dtype=np.float32).reshape(-1)[0])
    v = np.asarray(G, dtype=np.float32).reshape(-1) * scale
    v = np.where(np.isnan(v), np.float32(0), v)
    v = np.clip(v, np.float32(-clip), np.float32(clip))
    lo = np.floor(v)
    i = np.arange(v.size, dtype=np.uint64)
    key = np.array([stream_key(int(seed))], np.uint64)
    if step is not None:   # _clocked_key
        key = mix64_reference(key + np.array([int(step)], np.uint64) * GOLDEN)
    z = mix64_reference(key + i * GOLDEN)
    u = (z >> np.uint64(40)).astype(np.float32) * _INV_2_24
    q = lo.astype(np.int64) + (u < v - lo)
    new = np.clip(out.reshape(-1).astype(np.int64) + q, -ACCUM_MAX, ACCUM_MAX)
    out[...] = new.reshape(out.shape)
    return out

# --------------------------------------------------------------------------------------------
# 1b. Spread accumulators: a fresh optimiser's starting positions inside each trit's bin.


@numba.njit(cache=True)
def _spread_value(key, i, bound):
    """A uniform integer in [-bound, bound], a pure function of (key, i): the top 24 bits of
    the hash times the 2·bound + 1 choices, in integers (exact on every device)."""
    z = mix64(key + np.uint64(i) * GOLDEN) >> np.uint64(40)
    return np.int64((z * np.uint64(2 * bound + 1)) >> np.uint64(24)) - bound


@numba.njit(parallel=True, cache=True)
def _spread_accumulators_cpu(accum, key, bound):
    for i in numba.prange(accum.shape[0]):
        accum[i] = _spread_value(key, i, bound)


@cuda.jit(cache=True)
def _spread_accumulators_cuda(accum, key, bound):
    i = cuda.grid(1)
    while i < accum.shape[0]:
        accum[i] = _spread_value(key, i, bound)
        i += cuda.gridsize(1)


def spread_accumulators(accum, seed, bound):
    """Fill the int8 array `accum` (any shape, C-contiguous) with uniform integers in
    [-bound, bound], 0 <= bound <= 127, from a counter-based hash of (seed, flat index):
    identical on every device. Returns accum.

    A float latent weight starts anywhere inside its rounding bin, so some weights sit near a
    boundary and move at the first consistent gradient; zero accumulators all sit at the
    centre and none moves before flip_threshold units have come in. Spread accumulators are
    the integer form of that start.
    """
    op = "spread_accumulators"
    dev = target(accum, op=op)
    check_array(op, "accum", accum, np.int8, writeable=True)
    bound = check_int(op, "bound", bound, 0, ACCUM_MAX)
    _check_seed(op, seed)
    if accum.size == 0:
        return accum
    flat = accum.reshape(-1)
    args = (flat, stream_key(int(seed)), np.int64(bound))
    if dev == "cpu":
        _spread_accumulators_cpu(*args)
    else:
        launch(_spread_accumulators_cuda, blocks(flat.size, _QUANT_THREADS), _QUANT_THREADS,
               *args)
    return accum


def spread_accumulators_reference(shape, seed, bound):
    """NumPy truth for `spread_accumulators`: a new int8 array of `shape`."""
    i = np.arange(int(np.prod(shape)), dtype=np.uint64)
    key = np.array([stream_key(int(seed))], np.uint64)
    z = mix64_reference(key + i * GOLDEN) >> np.uint64(40)
    v = ((z * np.uint64(2 * bound + 1)) >> np.uint64(24)).astype(np.int64) - bound
    return v.astype(np.int8).reshape(shape)


# --------------------------------------------------------------------------------------------
# 2. One pass over a weight gradient G: the exponents' gradient and the quantisation scales.
#
# dL/dE_r = (Σ_j G[r, j] · T[r, j]) · s_r · ln2/8 needs every element of row r; the scale of G
# needs the sum of squares of every element. One kernel reads G once for both, and for the
# scale of dL/dE: per weight, three launches (this one and two quantize_grad) and two reads of
# G, where separate kernels took five launches and three reads.
#
# The float sums are added in an order fixed by G's shape alone -- never by the device's SM
# count -- so the scales and dL/dE are bit-identical on the CPU twin, in the simulator and on
# every GPU:
#   - a row is summed by `width` threads (a power of two, `_row_width(cols)`): thread `lane`
#     adds columns lane, lane + width, ... (the trit-signed float32 values into one sum, their
#     float32 squares into a float64 one), and the width sums meet in a halving tree;
#   - a block holds _GRAD_THREADS / width rows a pass (a group); block b takes groups b,
#     b + nb, ...; its thread 0 adds each row's float64 square sum, and the float32 square of
#     its dL/dE, in row order, into the block's two partial sums;
#   - the last block to finish adds the nb partials: thread t takes partials t,
#     t + _GRAD_THREADS, ..., then a halving tree.
_GRAD_THREADS = 256          # power of two: tree reductions in shared memory
_GRAD_MAX_BLOCKS = 2048      # the last block adds at most 8 partials a thread
_COLS_PER_LANE = 32          # a row's threads: about cols / 32, from 32 to _GRAD_THREADS
# (on an H100, cols / 4 to cols / 80 and blocks of 128 or 256 all took 31-37 us for a
# 2560 x 2560 G, about 0.8 TB/s: the kernel waits on latency, not bandwidth)


def _row_width(cols):
    """The threads that sum a row: fewer rows a block when each has more columns."""
    width = 32
    while width * _COLS_PER_LANE < cols and width < _GRAD_THREADS:
        width *= 2
    return width


def _grad_blocks(rows, width):
    per_block = _GRAD_THREADS // width
    return max(1, min(_GRAD_MAX_BLOCKS, -(-rows // per_block)))


@numba.njit(cache=True)
def _signed(acc, g, T_packed, r, j):
    """acc + T[r, j] · g for a trit read from the bitplane32 masks (an invalid code adds 0)."""
    bit = np.uint32(1) << np.uint32(j & 31)
    plus = T_packed[r, 2 * (j >> 5)] & bit
    minus = T_packed[r, 2 * (j >> 5) + 1] & bit
    if plus != 0 and minus == 0:
        return acc + g
    if minus != 0 and plus == 0:
        return acc - g
    return acc


_signed_dev = on_device(_signed)


@numba.njit(cache=True)
def _row_scale(E, r):
    return _SCALE_OF_E[np.int64(E[r]) + 128]


_row_scale_dev = on_device(_row_scale)


@numba.njit(cache=True)
def _dot_to_exponent_grad(dot, s):
    # dL/dE_r = float32(dot) · s_r · ln2/8, in that order
    return np.float32(dot) * s * EXPONENT_GRAD_FACTOR


@numba.njit(parallel=True, cache=True)
def _exponent_grad_and_scales_cpu(G, T_packed, E, cols, width, n, row_size, rows, gain, clock,
                                  partial, done, inv_scales, grad_E):
    # The CUDA kernel's order of float adds (see the section's comment), thread by thread.
    # (`done` is the GPU's block counter, unused here.)
    nb = partial.shape[0]
    per_block = _GRAD_THREADS // width
    R = G.shape[0]
    n_groups = (R + per_block - 1) // per_block
    for b in numba.prange(nb):
        dots = np.zeros(width, np.float32)
        squares = np.zeros(width, np.float64)
        block_sq = 0.0
        block_esq = 0.0
        for group in range(b, n_groups, nb):
            for r in range(group * per_block, min(R, (group + 1) * per_block)):
                for lane in range(width):
                    d = np.float32(0.0)
                    q = 0.0
                    for j in range(lane, cols, width):
                        g = G[r, j]
                        d = _signed(d, g, T_packed, r, j)
                        q += np.float64(g * g)
                    dots[lane] = d
                    squares[lane] = q
                half = width // 2
                while half > 0:
                    for lane in range(half):
                        dots[lane] += dots[lane + half]
                        squares[lane] += squares[lane + half]
                    half //= 2
                ge = _dot_to_exponent_grad(dots[0], _row_scale(E, r))
                grad_E[r] = ge
                block_sq += squares[0]
                block_esq += np.float64(ge * ge)
        partial[b, 0] = block_sq
        partial[b, 1] = block_esq
    sums = np.zeros((2, _GRAD_THREADS), np.float64)
    for t in range(_GRAD_THREADS):
        for k in range(t, nb, _GRAD_THREADS):
            sums[0, t] += partial[k, 0]
            sums[1, t] += partial[k, 1]
    half = _GRAD_THREADS // 2
    while half > 0:
        for t in range(half):
            sums[0, t] += sums[0, t + half]
            sums[1, t] += sums[1, t + half]
        half //= 2
    gain = _clocked_gain(gain, clock)
    inv_scales[0] = _inv_rms(sums[0, 0], _counted(n, row_size, rows), gain)
    inv_scales[1] = _inv_rms(sums[1, 0], _counted(np.float64(R), 1.0, rows), gain)


@cuda.jit(cache=True)
def _exponent_grad_and_scales_cuda(G, T_packed, E, cols, width, n, row_size, rows, gain, clock,
                                   partial, done, inv_scales, grad_E):
    dots = cuda.shared.array(_GRAD_THREADS, numba.float32)
    squares = cuda.shared.array(_GRAD_THREADS, numba.float64)
    is_last = cuda.shared.array(1, numba.int32)
    tid = cuda.threadIdx.x
    sub = tid // width
    lane = tid - sub * width
    per_block = _GRAD_THREADS // width
    R = G.shape[0]
    nb = cuda.gridDim.x
    n_groups = (R + per_block - 1) // per_block
    block_sq = 0.0
    block_esq = 0.0
    group = cuda.blockIdx.x
    while group < n_groups:   # uniform across the block: every thread reaches syncthreads
        r = group * per_block + sub
        d = np.float32(0.0)
        q = 0.0
        s = np.float32(0.0)
        if r < R:
            if lane == 0:   # loaded now, used after the sums: its latency is hidden
                s = _row_scale_dev(E, r)
            # four loads of G a thread issued before their adds (the adds keep column order)
            j = lane
            while j + 3 * width < cols:
                g0, g1 = G[r, j], G[r, j + width]
                g2, g3 = G[r, j + 2 * width], G[r, j + 3 * width]
                d = _signed_dev(d, g0, T_packed, r, j)
                d = _signed_dev(d, g1, T_packed, r, j + width)
                d = _signed_dev(d, g2, T_packed, r, j + 2 * width)
                d = _signed_dev(d, g3, T_packed, r, j + 3 * width)
                q += np.float64(g0 * g0)
                q += np.float64(g1 * g1)
                q += np.float64(g2 * g2)
                q += np.float64(g3 * g3)
                j += 4 * width
            while j < cols:
                g = G[r, j]
                d = _signed_dev(d, g, T_packed, r, j)
                q += np.float64(g * g)
                j += width
        dots[tid] = d
        squares[tid] = q
        cuda.syncthreads()
        half = width // 2
        while half > 0:
            if lane < half:
                dots[tid] += dots[tid + half]
                squares[tid] += squares[tid + half]
            cuda.syncthreads()
            half //= 2
        if lane == 0 and r < R:
            ge = _dot_to_exponent_grad(dots[tid], s)
            grad_E[r] = ge
            dots[tid] = ge
        cuda.syncthreads()
        if tid == 0:
            for k in range(min(per_block, R - group * per_block)):
                block_sq += squares[k * width]
                block_esq += np.float64(dots[k * width] * dots[k * width])
        cuda.syncthreads()   # dots and squares are reused by the next group
        group += nb
    if tid == 0:
        partial[cuda.blockIdx.x, 0] = block_sq
        partial[cuda.blockIdx.x, 1] = block_esq
        cuda.threadfence()   # this block's partials are visible before its ticket is
        is_last[0] = cuda.atomic.add(done, 0, 1) == nb - 1
    cuda.syncthreads()
    if is_last[0]:   # uniform across the block
        sq = 0.0
        esq = 0.0
        for k in range(tid, nb, _GRAD_THREADS):   # read through L2, not a stale L1
            sq += cuda.atomic.add(partial, (k, 0), 0.0)
            esq += cuda.atomic.add(partial, (k, 1), 0.0)
        squares[tid] = sq
        cuda.syncthreads()
        block_tree_sum(squares, tid, _GRAD_THREADS)
        sq = squares[0]
        cuda.syncthreads()   # every thread has read squares[0] before it is overwritten
        squares[tid] = esq
        cuda.syncthreads()
        block_tree_sum(squares, tid, _GRAD_THREADS)
        if tid == 0:
            gain = _clocked_gain_dev(gain, clock)
            inv_scales[0] = _inv_rms_dev(sq, _counted_dev(n, row_size, rows), gain)
            inv_scales[1] = _inv_rms_dev(squares[0], _counted_dev(np.float64(R), 1.0, rows),
                                         gain)
            done[0] = 0


def exponent_grad_and_scales(G, T_packed, E, cols, grad_gain, *, rows=None, clock=None):
    """One pass over a ternary matrix's weight gradient G = dL/dW (float32 (R, cols)) for the
    optimiser. Returns (inv_scales, grad_E), both float32 on G's device:

    - grad_E (R,): the exponents' gradient, dL/dE_r = (Σ_j G[r, j] · T[r, j]) · s_r · ln2/8
      with s_r = SCALE_OF_E[E_r + 128] (T from T_packed's bitplane32 masks, E int8 (R,));
    - inv_scales (2,): the quantisation scales [grad_gain / rms(G), grad_gain / rms(grad_E)],
      for quantize_grad(G, inv_scales[:1], ...) and quantize_grad(grad_E, inv_scales[1:], ...).

    rows: None, or an int64 (1,) array on G's device holding u: only the first u rows count
    in both mean squares (the rest are zero padding, as for the rows of
    tritnet_kernels.sparse_rows' unique_rows). clock: None, or the optimiser's int64 (2,) [step,
    gain / 2**-32] on G's device: the gain is then read there (grad_gain is ignored), as a
    replayed CUDA graph needs.

    One launch, no host sync. Float32 squares summed in float64 and trit-signed sums in
    float32, in an order fixed by G's shape alone (see the section's comment), so both outputs
    are bit-identical on the CPU, in the simulator and on every GPU. An all-zero or non-finite
    G gives inv_scales[0] = 0, so that the trits then receive no update (quantize_grad maps
    NaN to 0); likewise grad_E and inv_scales[1].

    `grad_gain` is the typical |quantised gradient| of one step, in accumulator units: with
    flip threshold F, a trit whose gradient is consistently one rms in size flips after about
    F / grad_gain steps.
    """
    op = "exponent_grad_and_scales"
    dev = target(G, T_packed, E, rows, clock, op=op)
    check_array(op, "G", G, np.float32, ndim=2)
    cols = check_int(op, "cols", cols, 0, 2**31 - 1)
    if G.shape[1] != cols:
        raise ValueError(f"{op}: G has shape {tuple(G.shape)}, expected (rows, {cols}) for "
                         f"cols = {cols}")
    R = G.shape[0]
    check_array(op, "T_packed", T_packed, np.uint32, ndim=2)
    if T_packed.shape != (R, 2 * -(-cols // 32)):
        raise ValueError(f"{op}: T_packed has shape {tuple(T_packed.shape)}, expected "
                         f"{(R, 2 * -(-cols // 32))} to match G's {R} rows and {cols} "
                         "columns (bitplane32: a plus and a minus word per 32 columns)")
    check_array(op, "E", E, np.int8, shape=(R,))
    if clock is not None:
        _check_clock(op, clock, G)
        grad_gain = 1.0
    if not _is_real(grad_gain):
        raise TypeError(f"{op}: grad_gain must be a real number, got {grad_gain!r}")
    if not (math.isfinite(grad_gain) and grad_gain > 0):
        raise ValueError(f"{op}: grad_gain = {grad_gain!r}, expected a finite number > 0")
    if rows is not None:
        check_array(op, "rows", rows, np.int64, shape=(1,))

    xp = xp_of(G)
    inv_scales = xp.zeros(2, dtype=np.float32)
    grad_E = xp.zeros(R, dtype=np.float32)
    if R == 0:
        return inv_scales, grad_E
    width = _row_width(cols)
    partial = xp.empty((_grad_blocks(R, width), 2), dtype=np.float64)
    args = (G, T_packed, E, np.int64(cols), np.int64(width), float(G.size), float(cols),
            _empty(xp, np.int64) if rows is None else rows, float(grad_gain),
            _empty(xp, np.int64) if clock is None else clock, partial, _done_counter(xp),
            inv_scales, grad_E)
    if dev == "cpu":
        _exponent_grad_and_scales_cpu(*args)
    else:
        launch(_exponent_grad_and_scales_cuda, partial.shape[0], _GRAD_THREADS, *args)
    return inv_scales, grad_E


def exponent_grad_and_scales_reference(G, T_packed, E, cols, grad_gain, rows=None):
    """NumPy truth for `exponent_grad_and_scales`: (inv_scales, grad_E). Its float sums are in
    another order than the kernels': equal within rounding."""
    grad_E = row_trit_dot_reference(G, T_packed, cols, E)
    inv_scales = np.concatenate([grad_inv_scale_reference(G, grad_gain, rows),
                                 grad_inv_scale_reference(grad_E, grad_gain, rows)])
    return inv_scales, grad_E


def grad_inv_scale_reference(G, grad_gain, rows=None):
    """NumPy truth for a quantisation scale: grad_gain / rms(G) in float64, rounded to
    float32 (the rms over G's first `rows` rows when given); 0 when the mean square is 0 or
    not finite. (The kernel adds in another order: equal within float64 rounding.)"""
    G = np.asarray(G, np.float32)
    if rows is not None:
        G = G[:int(np.asarray(rows).reshape(-1)[0])]
    mean_sq = np.mean(np.square(G).astype(np.float64)) if G.size else 0.0
    ok = math.isfinite(mean_sq) and mean_sq > 0
    return np.array([grad_gain / math.sqrt(mean_sq) if ok else 0.0], np.float32)


def row_trit_dot_reference(G, T_packed, cols, E=None):
    """NumPy truth for Σ_j G[r, j] · T[r, j] (float64, rounded to float32), and with E the
    exponent gradient dL/dE_r of `exponent_grad_and_scales`."""
    T = unpack_trits_reference(T_packed, cols)
    dot = (G.astype(np.float64) * T).sum(axis=1).astype(np.float32)
    if E is None:
        return dot
    return dot * SCALE_OF_E[np.asarray(E).astype(np.int64) + 128] * EXPONENT_GRAD_FACTOR


# --------------------------------------------------------------------------------------------
# 3 + 4. The accumulator rule: flip trits, step exponents.


@numba.njit(parallel=True, cache=True)
def _ternary_update_cpu(T_packed, T_accum, grad_q, E, E_accum, grad_E_q, cols, flip_threshold,
                        flip_decay_shift, flip_carry, scale_threshold, scale_decay_shift,
                        zero_grad, counts):
    flips = 0
    steps = 0
    for r in numba.prange(T_accum.shape[0]):
        # Per-row counts added at the top level of the loop body, as in sparse_rows.py's sparse
        # twin (numba 0.68 loses some reductions made inside nested loops).
        row_flips = 0
        for g in range((cols + 31) // 32):
            row_flips += trit_group_step(T_packed, T_accum, grad_q, r, r, g, cols,
                                         flip_threshold, flip_decay_shift, flip_carry)
        row_steps = exponent_step(E, E_accum, grad_E_q, r, r, scale_threshold,
                                  scale_decay_shift)
        if zero_grad:
            grad_q[r, :] = 0
            grad_E_q[r] = 0
        flips += row_flips
        steps += row_steps
    counts[0] += flips
    counts[1] += steps


@cuda.jit(cache=True)
def _ternary_update_cuda(T_packed, T_accum, grad_q, E, E_accum, grad_E_q, cols, flip_threshold,
                         flip_decay_shift, flip_carry, scale_threshold, scale_decay_shift,
                         zero_grad, counts):
    # A warp per 8 consecutive 32-trit groups of a row (256 trits), a lane per 8 trits: lane l
    # takes bits 8(l % 4) ... + 7 of group l // 4, so each of its 8 byte loads of the int8
    # state is, across the warp, one contiguous 256-byte read. The lanes' new bits meet in
    # shared memory (the simulator that CI runs has no warp vote functions), one barrier per
    # block pass, and the first lane of each group writes its two mask words. A lane per trit
    # with two barriers per 32-trit group ran the int8 state at 0.3 TB/s (H200).
    new_plus = cuda.shared.array(_UPDATE_THREADS, numba.uint32)
    new_minus = cuda.shared.array(_UPDATE_THREADS, numba.uint32)
    block_counts = cuda.shared.array(2, numba.int64)
    tid = cuda.threadIdx.x
    lane = tid & 31
    warp = tid >> 5
    rows = T_accum.shape[0]
    groups = (cols + 31) // 32
    per_row = (groups + 7) // 8          # warp tasks a row
    tasks = rows * per_row
    # Zeroed before the loop's first barrier; threads add to it only after the loop (the
    # wrapper gives every block at least one task, so that barrier is always passed).
    if tid == 0:
        block_counts[0] = 0
        block_counts[1] = 0
    flips = 0
    steps = 0
    shift = (lane & 3) * 8
    base = cuda.blockIdx.x * _UPDATE_WARPS
    while base < tasks:  # uniform across the block: every thread reaches the syncthreads
        task = base + warp
        r = task // per_row
        g = (task - r * per_row) * 8 + (lane >> 2)
        plus_bits = np.uint32(0)
        minus_bits = np.uint32(0)
        if task < tasks and g < groups:
            plus = np.int64(T_packed[r, 2 * g])
            minus = np.int64(T_packed[r, 2 * g + 1])
            j0 = 32 * g + shift
            for b in range(8):
                j = j0 + b
                if j < cols:
                    t = ((plus >> (shift + b)) & 1) - ((minus >> (shift + b)) & 1)
                    t_new, a = accumulator_step(t, np.int64(T_accum[r, j]),
                                                np.int64(grad_q[r, j]), flip_threshold, -1,
                                                1, flip_decay_shift, flip_carry)
                    T_accum[r, j] = a
                    if zero_grad:
                        grad_q[r, j] = 0
                    if t_new != t:
                        flips += 1
                    if t_new > 0:
                        plus_bits |= np.uint32(1) << np.uint32(shift + b)
                    elif t_new < 0:
                        minus_bits |= np.uint32(1) << np.uint32(shift + b)
            if g == 0 and lane == 0:
                steps += exponent_step_dev(E, E_accum, grad_E_q, r, r, scale_threshold,
                                           scale_decay_shift)
                if zero_grad:
                    grad_E_q[r] = 0
        new_plus[tid] = plus_bits
        new_minus[tid] = minus_bits
        cuda.syncthreads()
        if task < tasks and g < groups and (lane & 3) == 0:
            T_packed[r, 2 * g] = (new_plus[tid] | new_plus[tid + 1] | new_plus[tid + 2]
                                  | new_plus[tid + 3])
            T_packed[r, 2 * g + 1] = (new_minus[tid] | new_minus[tid + 1] | new_minus[tid + 2]
                                      | new_minus[tid + 3])
        cuda.syncthreads()  # the shared words are written again on the next pass
        base += cuda.gridDim.x * _UPDATE_WARPS
    if flips != 0:
        cuda.atomic.add(block_counts, 0, flips)
    if steps != 0:
        cuda.atomic.add(block_counts, 1, steps)
    cuda.syncthreads()
    if tid == 0:
        if block_counts[0] != 0:
            cuda.atomic.add(counts, 0, block_counts[0])
        if block_counts[1] != 0:
            cuda.atomic.add(counts, 1, block_counts[1])


def _check_trit_state(op, T_packed, T_accum, grad_q, cols):
    cols = check_int(op, "cols", cols, 1, 2**31 - 1)
    check_array(op, "T_accum", T_accum, np.int8, ndim=2, writeable=True)
    if T_accum.shape[1] != cols:
        raise ValueError(f"{op}: T_accum has shape {tuple(T_accum.shape)}, expected "
                         f"(rows, {cols}) for cols = {cols}")
    rows = T_accum.shape[0]
    check_array(op, "grad_q", grad_q, np.int8, shape=(rows, cols), writeable=True)
    check_array(op, "T_packed", T_packed, np.uint32, ndim=2, writeable=True)
    if T_packed.shape != (rows, 2 * -(-cols // 32)):
        raise ValueError(f"{op}: T_packed has shape {tuple(T_packed.shape)}, expected "
                         f"{(rows, 2 * -(-cols // 32))} to match T_accum's {rows} rows and "
                         f"{cols} columns (bitplane32: a plus and a minus word per 32 columns)")
    return rows, cols


def _check_scale_state(op, E, E_accum, grad_E_q, rows):
    check_array(op, "E", E, np.int8, ndim=1, writeable=True)
    if E.shape[0] != rows:
        raise ValueError(f"{op}: E has shape {tuple(E.shape)}, expected ({rows},): one exponent "
                         "per row of T_accum")
    check_array(op, "E_accum", E_accum, np.int8, shape=(rows,), writeable=True)
    check_array(op, "grad_E_q", grad_E_q, np.int8, shape=(rows,), writeable=True)


def ternary_update(T_packed, T_accum, grad_q, E, E_accum, grad_E_q, cols, *, flip_threshold,
                   flip_decay_shift, scale_threshold, scale_decay_shift, flip_carry=False,
                   zero_grad=True, counts=None):
    """Apply one optimiser step to a ternary matrix and its row exponents, in one launch.

    T_packed uint32 (rows, 2*ceil(cols/32)) bitplane32; T_accum, grad_q int8 (rows, cols);
    E, E_accum, grad_E_q int8 (rows,). All updated in place; C-contiguous, one device.
    cols: the matrix's column count (T_accum.shape[1]).
    flip_threshold, scale_threshold in 1..127; flip_decay_shift, scale_decay_shift in 0..7
    (0: no decay).

    For every trit t = T[r, j] (j < cols), with a = T_accum[r, j], g = grad_q[r, j]:

        a = clamp(a + g, -127, 127)
        if   a >=  flip_threshold and t > -1:  t -= 1; a = 0   # positive gradient: descend
        elif a <= -flip_threshold and t < +1:  t += 1; a = 0
        elif flip_decay_shift > 0:             a -= sign(a) * (|a| >> flip_decay_shift)
        T[r, j] = t;  T_accum[r, j] = a;  grad_q[r, j] = 0 (if zero_grad)

    With flip_carry, a flip keeps the accumulator's place instead of zeroing it:
    a -= 2·flip_threshold on a step down, a += 2·flip_threshold on a step up.
    For every row exponent e = E[r] the same rule (never carried) with E_accum[r],
    grad_E_q[r], scale_threshold and scale_decay_shift, e held in [-128, 127], not [-1, 1].
    A value at its end stays there and its accumulator is not reset (only decayed).
    Padding bits of T_packed (columns >= cols) are written zero; a trit coded in both masks
    reads as 0 (validate packed data where it enters, e.g. checkpoint load, not here).

    zero_grad: clear grad_q and grad_E_q in the same pass (they are consumed), saving a
    memset launch; pass False when the caller frees them instead.

    Returns `counts`, int64 (2,) on the arrays' device: counts[0] += trits changed,
    counts[1] += exponents changed (allocated as zeros when None; pass one array to total
    several tensors). The wrapper never syncs: reading the counts is the caller's choice.
    """
    op = "ternary_update"
    dev = target(T_packed, T_accum, grad_q, E, E_accum, grad_E_q, counts, op=op)
    rows, cols = _check_trit_state(op, T_packed, T_accum, grad_q, cols)
    _check_scale_state(op, E, E_accum, grad_E_q, rows)
    flip_threshold = check_int(op, "flip_threshold", flip_threshold, 1, ACCUM_MAX)
    scale_threshold = check_int(op, "scale_threshold", scale_threshold, 1, ACCUM_MAX)
    flip_decay_shift = check_int(op, "flip_decay_shift", flip_decay_shift, 0, 7)
    scale_decay_shift = check_int(op, "scale_decay_shift", scale_decay_shift, 0, 7)
    if counts is not None:
        check_array(op, "counts", counts, np.int64, shape=(2,), writeable=True)
    check_distinct(op, T_packed=T_packed, T_accum=T_accum, grad_q=grad_q, E=E,
                   E_accum=E_accum, grad_E_q=grad_E_q, counts=counts)
    if counts is None:
        counts = xp_of(T_accum).zeros(2, dtype=np.int64)
    if rows == 0:
        return counts
    args = (T_packed, T_accum, grad_q, E, E_accum, grad_E_q, np.int64(cols),
            np.int64(flip_threshold), np.int64(flip_decay_shift), np.int64(bool(flip_carry)),
            np.int64(scale_threshold), np.int64(scale_decay_shift), np.int64(bool(zero_grad)),
            counts)
    if dev == "cpu":
        _ternary_update_cpu(*args)
    else:
        tasks = rows * -(-cols // 256)   # a warp per 8 groups of a row
        launch(_ternary_update_cuda, blocks(tasks, _UPDATE_WARPS), _UPDATE_THREADS, *args)
    return counts


# The references decode and encode masks with packing's NumPy references, not its kernels, so
# they stay independent of every kernel they check.


def ternary_update_reference(T_packed, T_accum, grad_q, E=None, E_accum=None, grad_E_q=None, *,
                             flip_threshold, flip_decay_shift, scale_threshold=1,
                             scale_decay_shift=0, flip_carry=False):
    """NumPy truth for `ternary_update` (with E None: the trits alone).

    Returns (T_packed, T_accum, E, E_accum, counts) as new arrays (E, E_accum None when E is
    None); the gradients are consumed (a zeroing kernel leaves them zero).
    """
    cols = T_accum.shape[1]
    T = unpack_trits_reference(T_packed, cols)
    T_new, T_accum_new = rule_reference(T, T_accum.astype(np.int64), grad_q.astype(np.int64),
                                        flip_threshold, -1, 1, flip_decay_shift, flip_carry)
    counts = np.array([np.count_nonzero(T_new != T), 0], dtype=np.int64)
    E_new = E_accum_new = None
    if E is not None:
        E_new, E_accum_new = rule_reference(E.astype(np.int64), E_accum.astype(np.int64),
                                            grad_E_q.astype(np.int64), scale_threshold,
                                            E_MIN, E_MAX, scale_decay_shift)
        counts[1] = np.count_nonzero(E_new != E)
        E_new, E_accum_new = E_new.astype(np.int8), E_accum_new.astype(np.int8)
    return (pack_trits_reference(T_new), T_accum_new.astype(np.int8), E_new, E_accum_new,
            counts)


# --------------------------------------------------------------------------------------------
# 5. What the optimiser sees: accumulators at saturation.


@numba.njit(parallel=True, cache=True)
def _count_saturated_cpu(accum, out, index):
    total = 0
    for i in numba.prange(accum.shape[0]):
        a = np.int64(accum[i])
        if a >= ACCUM_MAX or a <= -ACCUM_MAX:
            total += 1
    out[index] += total


@cuda.jit(cache=True)
def _count_saturated_cuda(accum, out, index):
    # A grid-stride count per thread, added once per block into shared memory, then one
    # global atomic per block.
    block_total = cuda.shared.array(1, numba.int64)
    if cuda.threadIdx.x == 0:
        block_total[0] = 0
    cuda.syncthreads()
    total = 0
    i = cuda.grid(1)
    while i < accum.shape[0]:
        a = np.int64(accum[i])
        if a >= ACCUM_MAX or a <= -ACCUM_MAX:
            total += 1
        i += cuda.gridsize(1)
    if total != 0:
        cuda.atomic.add(block_total, 0, total)
    cuda.syncthreads()
    if cuda.threadIdx.x == 0 and block_total[0] != 0:
        cuda.atomic.add(out, index, block_total[0])


def count_saturated(accum, out, index=0):
    """out[index] += the number of entries of the int8 array `accum` at ±127 (saturated: the
    accumulator can hold no more of its gradient's direction). out: int64 (n,) on accum's
    device; no host sync, so a captured step can count every step."""
    op = "count_saturated"
    dev = target(accum, out, op=op)
    check_array(op, "accum", accum, np.int8)
    check_array(op, "out", out, np.int64, ndim=1, writeable=True)
    index = check_int(op, "index", index, 0, max(out.shape[0] - 1, 0))
    if out.shape[0] == 0:
        raise ValueError(f"{op}: out is empty; expected an int64 array with an entry {index}")
    if accum.size == 0:
        return out
    flat = accum.reshape(-1)
    if dev == "cpu":
        _count_saturated_cpu(flat, out, np.int64(index))
    else:
        launch(_count_saturated_cuda, blocks(flat.size, _QUANT_THREADS), _QUANT_THREADS, flat,
               out, np.int64(index))
    return out


def count_saturated_reference(accum):
    """NumPy truth for `count_saturated`: the count itself."""
    return int(np.count_nonzero(np.abs(np.asarray(accum, np.int64)) >= ACCUM_MAX))
