"""Integer kernels behind the ternary optimiser (DESIGN §5).

A ternary weight W = diag(s)·T trains without any float copy: its float gradient is
quantised to int8 (`quantize_grad`), added with saturation to the int8 accumulator beside
each trit, and a trit moves one step when its accumulator crosses a threshold
(`ternary_update`). The per-row exponent E (s = 2**(E/8)) moves the same way from its own
accumulator; its float gradient comes from `row_trit_dot`.

One optimiser step for a TernaryLinear with weight gradient G (rows, cols) is:

    gE  = row_trit_dot(G, T_packed, cols, E=E)           # dL/dE = dot · s · ln2/8 (rows,)
    quantize_grad(G,  grad_inv_scale(G,  grad_gain),  seed_T, grad_q)
    quantize_grad(gE, grad_inv_scale(gE, scale_gain), seed_E, grad_E_q)
    ternary_update(T_packed, T_accum, grad_q, E, E_accum, grad_E_q, cols, ...)  # one launch

(data-parallel training all-reduces grad_q / grad_E_q between quantisation and update, so the
two stay separate kernels.)

Every job here is a CUDA kernel (`_*_cuda`), a Numba CPU twin with the same argument list
(`_*_cpu`) and a plain-NumPy reference (`*_reference`) used by the tests. Integer outputs are
bit-exact between the twins and the reference: the stochastic rounding draws its uniforms
from a counter-based hash of (seed, flat index), not from a stateful generator, and the
accumulator rule is one njit function (`_accumulator_step`) that both twins call.
"""

from . import _numba_compat  # noqa: F401  (must precede numba.cuda)

import math

import numba
import numpy as np
from numba import cuda

from ._launch import is_cupy, launch, on_device, target, xp_of
from .packing import pack_trits_reference, unpack_trits_reference

__all__ = [
    "grad_inv_scale",
    "grad_inv_scale_reference",
    "quantize_grad",
    "quantize_grad_reference",
    "row_trit_dot",
    "row_trit_dot_reference",
    "SCALE_OF_E",
    "EXPONENT_GRAD_FACTOR",
    "ternary_update",
    "ternary_update_reference",
    "ACCUM_MAX",
    "E_MIN",
    "E_MAX",
]

# int8 accumulators saturate at ±127, never -128, so that a run of positive and a run of
# negative gradients of the same size are treated the same (no asymmetric extra step).
ACCUM_MAX = 127
E_MIN, E_MAX = -128, 127

# splitmix64 (Steele, Lea & Flood 2014): the golden-ratio increment and the finaliser.
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_MASK64 = (1 << 64) - 1
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
_DOT_THREADS = 128          # power of two: tree reduction in shared memory
_UPDATE_THREADS = 256       # 8 warps; each warp owns 8 32-trit groups of a row a pass
_UPDATE_WARPS = _UPDATE_THREADS // 32
_MAX_BLOCKS = 4096


# --------------------------------------------------------------------------------------------
# Shared rules: njit functions that the CPU twins call and that numba-cuda compiles into the
# CUDA kernels, so both devices run one definition. (The simulator calls the CPU build with
# NumPy scalars; the rules that take arrays reach the kernels through `on_device`.)


@numba.njit(cache=True)
def _mix64(z):
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


@numba.njit(cache=True)
def _uniform24(key, i):
    """Uniform in [0, 1) on the grid k / 2**24, a pure function of (key, flat index i)."""
    z = _mix64(key + np.uint64(i) * _GOLDEN)
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


@numba.njit(cache=True)
def _sat_accum(a):
    if a > ACCUM_MAX:
        return ACCUM_MAX
    if a < -ACCUM_MAX:
        return -ACCUM_MAX
    return a


@numba.njit(cache=True)
def _accumulator_step(value, accum, grad, threshold, lowest, highest, decay_shift):
    """The update rule for one trit (lowest=-1, highest=1) or one exponent (-128, 127).

    Returns the new (value, accum). All arguments are int64.
    """
    a = _sat_accum(accum + grad)
    # Positive accumulated gradient: the loss falls as the value falls.
    if a >= threshold and value > lowest:
        return value - 1, 0
    if a <= -threshold and value < highest:
        return value + 1, 0
    if decay_shift > 0:
        if a > 0:
            a -= a >> decay_shift
        else:
            a += (-a) >> decay_shift
    return value, a


@numba.njit(cache=True)
def _trit_group_step(T_packed, T_accum, grad_q, r, grad_row, g, cols, flip_threshold,
                     flip_decay_shift):
    """The rule for the 32-trit group g of row r, whose gradients are row grad_row of grad_q.

    Rewrites the group's mask words and accumulators; returns how many trits changed.
    """
    plus = np.int64(T_packed[r, 2 * g])
    minus = np.int64(T_packed[r, 2 * g + 1])
    new_plus = 0
    new_minus = 0
    flips = 0
    for b in range(min(32, cols - 32 * g)):
        j = 32 * g + b
        t = ((plus >> b) & 1) - ((minus >> b) & 1)
        t_new, a = _accumulator_step(t, np.int64(T_accum[r, j]), np.int64(grad_q[grad_row, j]),
                                     flip_threshold, -1, 1, flip_decay_shift)
        T_accum[r, j] = a
        if t_new != t:
            flips += 1
        if t_new > 0:
            new_plus |= 1 << b
        elif t_new < 0:
            new_minus |= 1 << b
    T_packed[r, 2 * g] = new_plus
    T_packed[r, 2 * g + 1] = new_minus
    return flips


@numba.njit(cache=True)
def _exponent_step(E, E_accum, grad_E_q, r, grad_row, scale_threshold, scale_decay_shift):
    """The rule for the exponent of row r (its gradient at grad_row); returns 1 if E[r] moved."""
    e = np.int64(E[r])
    e_new, a = _accumulator_step(e, np.int64(E_accum[r]), np.int64(grad_E_q[grad_row]),
                                 scale_threshold, E_MIN, E_MAX, scale_decay_shift)
    E[r] = e_new
    E_accum[r] = a
    if e_new != e:
        return 1
    return 0


_trit_group_step_dev = on_device(_trit_group_step)
_exponent_step_dev = on_device(_exponent_step)


def _stream_key(seed: int) -> np.uint64:
    """Premix the seed on the host so that nearby seeds (step, step+1) give unrelated streams."""
    z = (seed + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return np.uint64(z ^ (z >> 31))


# --------------------------------------------------------------------------------------------
# Validation shared by the wrappers. Everything a caller can get wrong is raised here, before
# any allocation or launch, so a bad call leaves every array untouched.


def _check_array(op, name, a, dtype, ndim=None, shape=None, writeable=False):
    if not (hasattr(a, "dtype") and hasattr(a, "shape") and hasattr(a, "flags")):
        raise TypeError(f"{op}: {name} must be a NumPy or CuPy array, got {type(a).__name__}")
    if a.dtype != dtype:
        raise TypeError(f"{op}: {name} has dtype {a.dtype}, expected {np.dtype(dtype).name}")
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{op}: {name} has shape {tuple(a.shape)}, expected {ndim} dimensions")
    if shape is not None and tuple(a.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} has shape {tuple(a.shape)}, expected {tuple(shape)}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{op}: {name} is not C-contiguous; pass xp.ascontiguousarray({name})")
    if writeable and not getattr(a.flags, "writeable", True):
        raise ValueError(f"{op}: {name} is read-only, but the kernel writes it in place")


def _is_real(x):
    real = isinstance(x, (int, float, np.integer, np.floating))
    return real and not isinstance(x, (bool, np.bool_))


def _check_int(op, name, value, lo, hi):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{op}: {name} must be an integer in [{lo}, {hi}], got {value!r}")
    if not lo <= int(value) <= hi:
        raise ValueError(f"{op}: {name} = {int(value)} is out of range, expected {lo}..{hi}")
    return int(value)


def _byte_range(a):
    ptr = a.data.ptr if hasattr(a.data, "ptr") else a.__array_interface__["data"][0]
    return ptr, ptr + a.nbytes


def _check_distinct(op, **arrays):
    """In-place kernels read one array while writing another: they must not overlap."""
    items = [(n, _byte_range(a)) for n, a in arrays.items() if a is not None and a.nbytes]
    for k, (name_a, (a0, a1)) in enumerate(items):
        for name_b, (b0, b1) in items[k + 1:]:
            if a0 < b1 and b0 < a1:
                raise ValueError(f"{op}: {name_a} and {name_b} share memory; the kernel updates "
                                 "them in place and needs separate arrays")


def _blocks(work_items, per_block):
    return max(1, min(_MAX_BLOCKS, -(-work_items // per_block)))


# --------------------------------------------------------------------------------------------
# 1. Gradient quantisation: float32 -> int8, stochastic rounding against a per-tensor scale.


@cuda.jit(device=True)
def _block_tree_sum(buf, tid, width):
    """buf[0] = the sum of buf[:width] (shared memory, width a power of two), by halving in
    a fixed order. Every thread of the block calls it, after a syncthreads."""
    half = width // 2
    while half > 0:
        if tid < half:
            buf[tid] += buf[tid + half]
        cuda.syncthreads()
        half //= 2


# grad_inv_scale's reduction: a fixed number of blocks for a given size (never the device's
# SM count), so the float64 sum of squares is added in one order everywhere -- CPU twin, every
# GPU, the simulator -- and the scale is bit-identical on all of them.
_RMS_THREADS = 256           # power of two: tree reduction in shared memory
_RMS_PER_THREAD = 16         # elements a thread adds before the tree, at the most blocks
_RMS_MAX_BLOCKS = 1024       # a full GPU of threads: 256 blocks (2 an SM) kept too few loads
                             # in flight (0.5-0.9 TB/s on the H200)


def _rms_blocks(n):
    return max(1, min(_RMS_MAX_BLOCKS, -(-n // (_RMS_THREADS * _RMS_PER_THREAD))))


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
    return _mix64(key + np.uint64(clock[0]) * _GOLDEN)


_clocked_key_dev = on_device(_clocked_key)


@numba.njit(parallel=True, cache=True)
def _grad_inv_scale_cpu(G, n, row_size, rows, gain, clock, partial, done, out):
    # The CUDA kernel's order: thread t of block b adds elements b*T + t, then + nb*T, ...;
    # the block's threads meet in a halving tree. Then thread t adds block sums t, t + T, ...
    # and those meet in a halving tree. (`done` is the GPU's block counter, unused here.)
    nb = partial.shape[0]
    for b in numba.prange(nb):
        acc = np.zeros(_RMS_THREADS, np.float64)
        for t in range(_RMS_THREADS):
            for i in range(b * _RMS_THREADS + t, G.shape[0], nb * _RMS_THREADS):
                acc[t] += np.float64(G[i] * G[i])
        half = _RMS_THREADS // 2
        while half > 0:
            for t in range(half):
                acc[t] += acc[t + half]
            half //= 2
        partial[b] = acc[0]
    acc = np.zeros(_RMS_THREADS, np.float64)
    for t in range(_RMS_THREADS):
        for b in range(t, nb, _RMS_THREADS):
            acc[t] += partial[b]
    half = _RMS_THREADS // 2
    while half > 0:
        for t in range(half):
            acc[t] += acc[t + half]
        half //= 2
    out[0] = _inv_rms(acc[0], _counted(n, row_size, rows), _clocked_gain(gain, clock))


@cuda.jit(cache=True)
def _grad_inv_scale_cuda(G, n, row_size, rows, gain, clock, partial, done, out):
    # One launch: each block writes its sum of squares; the last block to finish (counted in
    # `done`, which it resets for the next call) adds the block sums, its threads in
    # parallel, and writes the scale. Squares in float32 (as G * G), sums in float64. Four
    # loads a thread are issued before their adds (the same order of adds as one at a time).
    sums = cuda.shared.array(_RMS_THREADS, numba.float64)
    is_last = cuda.shared.array(1, numba.int32)
    tid = cuda.threadIdx.x
    nb = cuda.gridDim.x
    size = G.shape[0]
    stride = nb * _RMS_THREADS
    acc = 0.0
    i = cuda.blockIdx.x * _RMS_THREADS + tid
    while i + 3 * stride < size:
        g0 = G[i]
        g1 = G[i + stride]
        g2 = G[i + 2 * stride]
        g3 = G[i + 3 * stride]
        acc += np.float64(g0 * g0)
        acc += np.float64(g1 * g1)
        acc += np.float64(g2 * g2)
        acc += np.float64(g3 * g3)
        i += 4 * stride
    while i < size:
        g = G[i]
        acc += np.float64(g * g)
        i += stride
    sums[tid] = acc
    cuda.syncthreads()
    _block_tree_sum(sums, tid, _RMS_THREADS)
    if tid == 0:
        partial[cuda.blockIdx.x] = sums[0]
        cuda.threadfence()   # this block's sum is visible before its ticket is
        is_last[0] = cuda.atomic.add(done, 0, 1) == nb - 1
    cuda.syncthreads()
    if is_last[0]:   # uniform across the block
        acc = 0.0
        for b in range(tid, nb, _RMS_THREADS):
            acc += cuda.atomic.add(partial, b, 0.0)  # read through L2, not a stale L1
        sums[tid] = acc
        cuda.syncthreads()
        _block_tree_sum(sums, tid, _RMS_THREADS)
        if tid == 0:
            out[0] = _inv_rms_dev(sums[0], _counted_dev(n, row_size, rows),
                                  _clocked_gain_dev(gain, clock))
            done[0] = 0


# Device arrays made once and kept, by device: _grad_inv_scale_cuda's int32 (1,) block
# counter (the kernel leaves it at 0) and the empty stand-ins of `_empty`.
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
    _check_array(op, "clock", clock, np.int64, shape=(2,))


def _done_counter(xp):
    if xp is np:
        return np.zeros(1, np.int32)
    key = xp.cuda.runtime.getDevice()
    counter = _kept_arrays.get(key)
    if counter is None:
        counter = _kept_arrays[key] = xp.zeros(1, np.int32)
    return counter


def grad_inv_scale(G, grad_gain, *, rows=None, clock=None):
    """The per-tensor quantisation scale: grad_gain / rms(G), as a float32 array of shape (1,).

    rows: None, or an int64 array of shape (1,) on G's device holding u: only G's first u
    rows count (the rest are zero padding, as for the rows of tritnet_kernels.tables'
    unique_rows), so the rms is over u · (G.size / G.shape[0]) elements. Read on the device.
    clock: None, or the optimiser's int64 (2,) [step, gain / 2**-32] on G's device: the gain
    is then read there (grad_gain is ignored), as a replayed CUDA graph needs.

    Computed on G's device without a host sync (the result feeds `quantize_grad` directly),
    in one launch on the GPU: float32 squares summed in float64, in an order fixed by G's size
    alone, so the scale is bit-identical on the CPU, in the simulator and on every GPU. An
    all-zero or non-finite G gives 0, so that the whole tensor then receives no update (the
    kernel maps NaN to 0).

    `grad_gain` is the typical |quantised gradient| of one step, in accumulator units: with
    flip threshold F, a trit whose gradient is consistently one rms in size flips after about
    F / grad_gain steps.
    """
    op = "grad_inv_scale"
    dev = target(G, op=op)
    _check_array(op, "G", G, np.float32)
    if clock is not None:
        _check_clock(op, clock, G)
        grad_gain = 1.0
    if not _is_real(grad_gain):
        raise TypeError(f"{op}: grad_gain must be a real number, got {grad_gain!r}")
    if not (math.isfinite(grad_gain) and grad_gain > 0):
        raise ValueError(f"{op}: grad_gain = {grad_gain!r}, expected a finite number > 0")
    xp = xp_of(G)
    if rows is None:
        rows, row_size = _empty(xp, np.int64), 0.0
    else:
        target(G, rows, op=op)   # raises if rows is on another device
        _check_array(op, "rows", rows, np.int64, shape=(1,))
        if G.ndim == 0:
            raise ValueError(f"{op}: rows needs G with a row axis, got a 0-d G")
        row_size = float(G.size // G.shape[0]) if G.shape[0] else 0.0
    if G.size == 0:
        return xp.zeros(1, dtype=np.float32)
    out = xp.empty(1, dtype=np.float32)  # the kernel's last block writes it
    partial = xp.empty(_rms_blocks(G.size), dtype=np.float64)
    args = (G.reshape(-1), float(G.size), row_size, rows, float(grad_gain),
            _empty(xp, np.int64) if clock is None else clock, partial, _done_counter(xp), out)
    if dev == "cpu":
        _grad_inv_scale_cpu(*args)
    else:
        launch(_grad_inv_scale_cuda, partial.shape[0], _RMS_THREADS, *args)
    return out


def grad_inv_scale_reference(G, grad_gain, rows=None):
    """NumPy truth: grad_gain / rms(G) in float64, rounded to float32 (the rms over G's first
    `rows` rows when given); 0 when the mean square is 0 or not finite. (The kernels add in
    another order: equal within float64 rounding.)"""
    G = np.asarray(G, np.float32)
    if rows is not None:
        G = G[:int(np.asarray(rows).reshape(-1)[0])]
    mean_sq = np.mean(np.square(G).astype(np.float64)) if G.size else 0.0
    ok = math.isfinite(mean_sq) and mean_sq > 0
    return np.array([grad_gain / math.sqrt(mean_sq) if ok else 0.0], np.float32)


@numba.njit(parallel=True, cache=True)
def _quantize_grad_cpu(G, inv_scale, key, clip, accumulate, clock, out):
    scale = inv_scale[0]
    key = _clocked_key(key, clock)
    for i in numba.prange(G.shape[0]):
        q = _round_stochastic(G[i] * scale, _uniform24(key, i), clip)
        if accumulate:
            q += np.int64(out[i])
        out[i] = _sat_accum(q)


@cuda.jit(cache=True)
def _quantize_grad_cuda(G, inv_scale, key, clip, accumulate, clock, out):
    scale = inv_scale[0]
    key = _clocked_key_dev(key, clock)
    for i in range(cuda.grid(1), G.shape[0], cuda.gridsize(1)):
        q = _round_stochastic(G[i] * scale, _uniform24(key, i), clip)
        if accumulate:
            q += np.int64(out[i])
        out[i] = _sat_accum(q)


def quantize_grad(G, inv_scale, seed, out, *, clip=128, accumulate=True, clock=None):
    """Add round_stochastic(G * inv_scale) into the int8 array `out`, saturating at ±127.
    With accumulate=False, write it instead: out's earlier contents are ignored (so a fresh
    `out` can be xp.empty rather than xp.zeros, one launch fewer).

    G: float32, C-contiguous, any shape (treated as flat, index i in C order).
    inv_scale: a float (finite, >= 0) or a float32 array of shape (1,) on G's device, e.g.
        from `grad_inv_scale` (then no host sync is needed).
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

    Non-finite gradients: the caller checks finiteness (or uses `grad_inv_scale`, which turns
    a non-finite tensor into a zero update). The kernel never writes garbage: NaN rounds to 0,
    ±inf saturates to ±127.
    """
    op = "quantize_grad"
    scale_on_device = isinstance(inv_scale, np.ndarray) or is_cupy(inv_scale)
    dev = target(G, out, inv_scale if scale_on_device else None, op=op)
    _check_array(op, "G", G, np.float32)
    _check_array(op, "out", out, np.int8, shape=G.shape, writeable=True)
    if scale_on_device:
        _check_array(op, "inv_scale", inv_scale, np.float32, shape=(1,))
    elif _is_real(inv_scale):
        if not 0 <= inv_scale <= _FLOAT32_MAX:  # also rejects NaN
            raise ValueError(f"{op}: inv_scale = {inv_scale!r}, expected a number in "
                             "[0, float32 max]")
    else:
        raise TypeError(f"{op}: inv_scale must be a number or a float32 array of shape (1,), "
                        f"got {type(inv_scale).__name__}")
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"{op}: seed must be an integer in [0, 2**64), got {seed!r}")
    if not 0 <= int(seed) <= _MASK64:
        raise ValueError(f"{op}: seed = {int(seed)} is out of range, expected 0 <= seed < 2**64")
    _check_distinct(op, G=G, out=out)
    clip = np.float32(_check_int(op, "clip", clip, 1, 128))
    if clock is not None:
        _check_clock(op, clock, G)

    if G.size == 0:
        return out
    xp = xp_of(G)
    if not scale_on_device:
        inv_scale = xp.full(1, inv_scale, dtype=np.float32)
    key = _stream_key(int(seed))
    G_flat, out_flat = G.reshape(-1), out.reshape(-1)
    args = (G_flat, inv_scale, key, clip, np.int64(bool(accumulate)),
            _empty(xp, np.int64) if clock is None else clock, out_flat)
    if dev == "cpu":
        _quantize_grad_cpu(*args)
    else:
        launch(_quantize_grad_cuda, _blocks(G.size, _QUANT_THREADS), _QUANT_THREADS, *args)
    return out


def _mix64_reference(z):
    """_mix64 on uint64 arrays (whose arithmetic wraps silently, as the kernels' does)."""
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def quantize_grad_reference(G, inv_scale, seed, out, *, clip=128, step=None):
    """NumPy truth for `quantize_grad`, with its signature: updates `out` and returns it.
    step: the step of quantize_grad's clock (clock[0]), when it is given one."""
    scale = np.float32(np.asarray(inv_scale, dtype=np.float32).reshape(-1)[0])
    v = np.asarray(G, dtype=np.float32).reshape(-1) * scale
    v = np.where(np.isnan(v), np.float32(0), v)
    v = np.clip(v, np.float32(-clip), np.float32(clip))
    lo = np.floor(v)
    i = np.arange(v.size, dtype=np.uint64)
    key = np.array([_stream_key(int(seed))], np.uint64)
    if step is not None:   # _clocked_key
        key = _mix64_reference(key + np.array([int(step)], np.uint64) * _GOLDEN)
    z = _mix64_reference(key + i * _GOLDEN)
    u = (z >> np.uint64(40)).astype(np.float32) * _INV_2_24
    q = lo.astype(np.int64) + (u < v - lo)
    new = np.clip(out.reshape(-1).astype(np.int64) + q, -ACCUM_MAX, ACCUM_MAX)
    out[...] = new.reshape(out.shape)
    return out


# --------------------------------------------------------------------------------------------
# 2. Row scale gradient: sum_j G[r, j] * T[r, j], T read from the bitplane32 masks.


@numba.njit(cache=True)
def _dot_to_exponent_grad(dot, E, r):
    # with E (rows,): dL/dE_r = float32(dot) · s_r · ln2/8, in that order; with E empty: dot
    if E.shape[0] == 0:
        return np.float32(dot)
    return np.float32(dot) * _SCALE_OF_E[np.int64(E[r]) + 128] * EXPONENT_GRAD_FACTOR


_dot_to_exponent_grad_dev = on_device(_dot_to_exponent_grad)


@numba.njit(parallel=True, cache=True)
def _row_trit_dot_cpu(G, T_packed, E, cols, out):
    for r in numba.prange(G.shape[0]):
        acc = 0.0  # float64 accumulation: free on the CPU
        for g in range((cols + 31) // 32):
            plus = np.int64(T_packed[r, 2 * g])
            minus = np.int64(T_packed[r, 2 * g + 1])
            for b in range(min(32, cols - 32 * g)):
                t = ((plus >> b) & 1) - ((minus >> b) & 1)
                if t > 0:
                    acc += G[r, 32 * g + b]
                elif t < 0:
                    acc -= G[r, 32 * g + b]
        out[r] = _dot_to_exponent_grad(acc, E, r)


@cuda.jit(cache=True)
def _row_trit_dot_cuda(G, T_packed, E, cols, out):
    # One block per row (grid-stride over rows); a thread per column, so the loads of G
    # are coalesced and a warp's 32 columns share one plus/minus word pair.
    partial = cuda.shared.array(_DOT_THREADS, numba.float32)
    tid = cuda.threadIdx.x
    r = cuda.blockIdx.x
    while r < G.shape[0]:  # uniform across the block: every thread reaches syncthreads
        acc = np.float32(0.0)
        j = tid
        while j < cols:
            g = j >> 5
            b = j & 31
            plus = np.int64(T_packed[r, 2 * g])
            minus = np.int64(T_packed[r, 2 * g + 1])
            t = ((plus >> b) & 1) - ((minus >> b) & 1)
            if t > 0:
                acc += G[r, j]
            elif t < 0:
                acc -= G[r, j]
            j += _DOT_THREADS
        partial[tid] = acc
        cuda.syncthreads()
        _block_tree_sum(partial, tid, _DOT_THREADS)
        if tid == 0:
            out[r] = _dot_to_exponent_grad_dev(partial[0], E, r)
        cuda.syncthreads()  # partial is reused by the next row
        r += cuda.gridDim.x


def row_trit_dot(G, T_packed, cols, out=None, *, E=None):
    """out[r] = sum_j G[r, j] * T[r, j] for float32 G (rows, cols); returns out (float32 (rows,)).

    cols: the matrix's column count (must equal G.shape[1]; T_packed holds ceil(cols/32)
    plus/minus word pairs per row). `out` is allocated when None.

    With s_r = 2**(E_r/8), the gradient of the loss with respect to the exponent is
    dL/dE_r = s_r * ln(2)/8 * row_trit_dot(G)[r], where G = dL/dW (rows, cols). Pass the
    int8 exponents E (rows,) to get that gradient from the same launch:
    out[r] = float32(dot) * SCALE_OF_E[E[r] + 128] * EXPONENT_GRAD_FACTOR.
    Float result: the CUDA kernel accumulates in float32 (per-thread, then a tree), the CPU
    twin in float64, so they agree within fp32 rounding. `out` is overwritten.
    """
    op = "row_trit_dot"
    dev = target(G, T_packed, out, E, op=op)
    _check_array(op, "G", G, np.float32, ndim=2)
    cols = _check_int(op, "cols", cols, 0, 2**31 - 1)
    if G.shape[1] != cols:
        raise ValueError(f"{op}: G has shape {tuple(G.shape)}, expected (rows, {cols}) for "
                         f"cols = {cols}")
    rows = G.shape[0]
    _check_array(op, "T_packed", T_packed, np.uint32, ndim=2)
    if T_packed.shape != (rows, 2 * -(-cols // 32)):
        raise ValueError(f"{op}: T_packed has shape {tuple(T_packed.shape)}, expected "
                         f"{(rows, 2 * -(-cols // 32))} to match G's {rows} rows and {cols} "
                         "columns (bitplane32: a plus and a minus word per 32 columns)")
    if E is None:
        E = xp_of(G).empty(0, dtype=np.int8)
    else:
        _check_array(op, "E", E, np.int8, shape=(rows,))
    if out is None:
        out = xp_of(G).empty(rows, dtype=np.float32)
    else:
        _check_array(op, "out", out, np.float32, shape=(rows,), writeable=True)
    if rows == 0:
        return out
    if cols == 0:
        out[...] = 0
        return out
    if dev == "cpu":
        _row_trit_dot_cpu(G, T_packed, E, np.int64(cols), out)
    else:
        launch(_row_trit_dot_cuda, _blocks(rows, 1), _DOT_THREADS,
               G, T_packed, E, np.int64(cols), out)
    return out


def row_trit_dot_reference(G, T_packed, cols, E=None):
    T = unpack_trits_reference(T_packed, cols)
    dot = (G.astype(np.float64) * T).sum(axis=1).astype(np.float32)
    if E is None:
        return dot
    return dot * SCALE_OF_E[np.asarray(E).astype(np.int64) + 128] * EXPONENT_GRAD_FACTOR


# --------------------------------------------------------------------------------------------
# 3 + 4. The accumulator rule: flip trits, step exponents.


@numba.njit(parallel=True, cache=True)
def _ternary_update_cpu(T_packed, T_accum, grad_q, E, E_accum, grad_E_q, cols, flip_threshold,
                        flip_decay_shift, scale_threshold, scale_decay_shift, zero_grad, counts):
    flips = 0
    steps = 0
    for r in numba.prange(T_accum.shape[0]):
        # Per-row counts added at the top level of the loop body, as in tables.py's sparse
        # twin (numba 0.68 loses some reductions made inside nested loops).
        row_flips = 0
        for g in range((cols + 31) // 32):
            row_flips += _trit_group_step(T_packed, T_accum, grad_q, r, r, g, cols,
                                          flip_threshold, flip_decay_shift)
        row_steps = _exponent_step(E, E_accum, grad_E_q, r, r, scale_threshold,
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
                         flip_decay_shift, scale_threshold, scale_decay_shift, zero_grad, counts):
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
                    t_new, a = _accumulator_step(t, np.int64(T_accum[r, j]),
                                                 np.int64(grad_q[r, j]), flip_threshold, -1,
                                                 1, flip_decay_shift)
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
                steps += _exponent_step_dev(E, E_accum, grad_E_q, r, r, scale_threshold,
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
    cols = _check_int(op, "cols", cols, 1, 2**31 - 1)
    _check_array(op, "T_accum", T_accum, np.int8, ndim=2, writeable=True)
    if T_accum.shape[1] != cols:
        raise ValueError(f"{op}: T_accum has shape {tuple(T_accum.shape)}, expected "
                         f"(rows, {cols}) for cols = {cols}")
    rows = T_accum.shape[0]
    _check_array(op, "grad_q", grad_q, np.int8, shape=(rows, cols), writeable=True)
    _check_array(op, "T_packed", T_packed, np.uint32, ndim=2, writeable=True)
    if T_packed.shape != (rows, 2 * -(-cols // 32)):
        raise ValueError(f"{op}: T_packed has shape {tuple(T_packed.shape)}, expected "
                         f"{(rows, 2 * -(-cols // 32))} to match T_accum's {rows} rows and "
                         f"{cols} columns (bitplane32: a plus and a minus word per 32 columns)")
    return rows, cols


def _check_scale_state(op, E, E_accum, grad_E_q, rows):
    _check_array(op, "E", E, np.int8, ndim=1, writeable=True)
    if E.shape[0] != rows:
        raise ValueError(f"{op}: E has shape {tuple(E.shape)}, expected ({rows},): one exponent "
                         "per row of T_accum")
    _check_array(op, "E_accum", E_accum, np.int8, shape=(rows,), writeable=True)
    _check_array(op, "grad_E_q", grad_E_q, np.int8, shape=(rows,), writeable=True)


def ternary_update(T_packed, T_accum, grad_q, E, E_accum, grad_E_q, cols, *, flip_threshold,
                   flip_decay_shift, scale_threshold, scale_decay_shift, zero_grad=True,
                   counts=None):
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

    and for every row exponent e = E[r] the same rule with E_accum[r], grad_E_q[r],
    scale_threshold and scale_decay_shift, e held in [-128, 127] instead of [-1, 1].
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
    flip_threshold = _check_int(op, "flip_threshold", flip_threshold, 1, ACCUM_MAX)
    scale_threshold = _check_int(op, "scale_threshold", scale_threshold, 1, ACCUM_MAX)
    flip_decay_shift = _check_int(op, "flip_decay_shift", flip_decay_shift, 0, 7)
    scale_decay_shift = _check_int(op, "scale_decay_shift", scale_decay_shift, 0, 7)
    if counts is not None:
        _check_array(op, "counts", counts, np.int64, shape=(2,), writeable=True)
    _check_distinct(op, T_packed=T_packed, T_accum=T_accum, grad_q=grad_q, E=E,
                    E_accum=E_accum, grad_E_q=grad_E_q, counts=counts)
    if counts is None:
        counts = xp_of(T_accum).zeros(2, dtype=np.int64)
    if rows == 0:
        return counts
    args = (T_packed, T_accum, grad_q, E, E_accum, grad_E_q, np.int64(cols),
            np.int64(flip_threshold), np.int64(flip_decay_shift), np.int64(scale_threshold),
            np.int64(scale_decay_shift), np.int64(bool(zero_grad)), counts)
    if dev == "cpu":
        _ternary_update_cpu(*args)
    else:
        tasks = rows * -(-cols // 256)   # a warp per 8 groups of a row
        launch(_ternary_update_cuda, _blocks(tasks, _UPDATE_WARPS), _UPDATE_THREADS, *args)
    return counts


# The references decode and encode masks with packing's NumPy references, not its kernels, so
# they stay independent of every kernel they check.


def _rule_reference(value, accum, grad, threshold, lowest, highest, decay_shift):
    """Vectorised `_accumulator_step` over integer arrays: returns (value, accum)."""
    a = np.clip(accum + grad, -ACCUM_MAX, ACCUM_MAX)
    down = (a >= threshold) & (value > lowest)
    up = ~down & (a <= -threshold) & (value < highest)
    if decay_shift > 0:
        decayed = a - np.sign(a) * (np.abs(a) >> decay_shift)
    else:
        decayed = a
    value = value - down + up
    accum = np.where(down | up, 0, decayed)
    return value, accum


def ternary_update_reference(T_packed, T_accum, grad_q, E=None, E_accum=None, grad_E_q=None, *,
                             flip_threshold, flip_decay_shift, scale_threshold=1,
                             scale_decay_shift=0):
    """NumPy truth for `ternary_update` (with E None: the trits alone).

    Returns (T_packed, T_accum, E, E_accum, counts) as new arrays (E, E_accum None when E is
    None); the gradients are consumed (a zeroing kernel leaves them zero).
    """
    cols = T_accum.shape[1]
    T = unpack_trits_reference(T_packed, cols)
    T_new, T_accum_new = _rule_reference(T, T_accum.astype(np.int64), grad_q.astype(np.int64),
                                         flip_threshold, -1, 1, flip_decay_shift)
    counts = np.array([np.count_nonzero(T_new != T), 0], dtype=np.int64)
    E_new = E_accum_new = None
    if E is not None:
        E_new, E_accum_new = _rule_reference(E.astype(np.int64), E_accum.astype(np.int64),
                                             grad_E_q.astype(np.int64), scale_threshold,
                                             E_MIN, E_MAX, scale_decay_shift)
        counts[1] = np.count_nonzero(E_new != E)
        E_new, E_accum_new = E_new.astype(np.int8), E_accum_new.astype(np.int8)
    return (pack_trits_reference(T_new), T_accum_new.astype(np.int8), E_new, E_accum_new,
            counts)

