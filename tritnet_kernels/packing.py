"""Trit packing: the in-memory form "bitplane32" and the on-disk form "base3-5".

A ternary matrix W (rows, cols) = diag(s) · T with T in {-1, 0, +1} is stored as

**bitplane32** (device and host memory; every kernel reads this form)
    `T_packed`: C-contiguous uint32, shape (rows, 2*G), G = ceil(cols / 32). For the 32-trit
    group g of row r, word [r, 2g] is the PLUS mask (bit b set iff T[r, 32g+b] == +1) and
    word [r, 2g+1] is the MINUS mask (bit b set iff T[r, 32g+b] == -1). Bits of columns
    >= cols (padding) are zero; a bit set in both masks is an invalid trit code.
    Why: 2 bits per trit, and the plus/minus words of a group sit side by side, so one
    8-byte load fetches 32 trits; a trit-times-float product is a select on two bits; a
    ternary dot product is four popcounts,
    a·b = pc(a+ & b+) + pc(a- & b-) - pc(a+ & b-) - pc(a- & b+).

**base3-5** (checkpoints; 1.6 bits per trit, 20% smaller than bitplane32)
    uint8, shape (rows, ceil(cols / 5)). Byte k of a row is
    sum_{i<5} (t_{5k+i} + 1) * 3**i; padding trits (columns >= cols) encode as t = 0, i.e.
    digit 1. 3**5 = 243 codes fit a byte, so bytes > 242 are invalid. Decoding costs a
    divide per trit, which is why kernels never read this form.

The scale s = 2 ** (E / 8) with E int8 per row lives beside T (see matmul.py); packing
never touches it.

Every job here is a CUDA kernel (`_*_cuda`), a Numba CPU twin with the same arguments
(`_*_cpu`) and a NumPy reference (`*_reference`). The public functions validate everything
before any launch; `validate_packed` is the cheap check that checkpoint loading runs.
"""

from . import _numba_compat  # noqa: F401  (must precede numba.cuda)

import numba
import numpy as np
from numba import cuda

from ._common import blocks, check_array
from ._launch import launch, on_device, target, xp_of

__all__ = [
    "n_groups", "n_base3_bytes",
    "pack_trits", "unpack_trits", "pack_base3", "unpack_base3",
    "bitplane_to_base3", "base3_to_bitplane", "validate_packed",
    "pack_trits_reference", "unpack_trits_reference",
    "pack_base3_reference", "unpack_base3_reference",
]

_THREADS = 256
# Row chunks for checks and converters: their temporaries stay near 16 MB whatever the table
# (a 10M-row table must not need a full-size int8 or bool copy).
_CHUNK_ELEMS = 1 << 24


def n_groups(cols):
    return (cols + 31) // 32


def n_base3_bytes(cols):
    return (cols + 4) // 5


def _row_chunks(rows, row_elems):
    step = max(1, _CHUNK_ELEMS // max(1, row_elems))
    for r0 in range(0, rows, step):
        yield r0, min(rows, r0 + step)


# --------------------------------------------------------------------------------------------
# Per-group rules: njit functions that both twins call (numba-cuda compiles them into the
# kernels), so the two devices share one definition.


@numba.njit(cache=True)
def _pack_group(trits, T_packed, r, g):
    cols = trits.shape[1]
    c0 = 32 * g
    plus = np.uint32(0)
    minus = np.uint32(0)
    for b in range(min(32, cols - c0)):
        t = trits[r, c0 + b]
        if t == 1:
            plus |= np.uint32(1 << b)
        elif t == -1:
            minus |= np.uint32(1 << b)
    T_packed[r, 2 * g] = plus
    T_packed[r, 2 * g + 1] = minus


@numba.njit(cache=True)
def _unpack_group(T_packed, trits, r, g):
    cols = trits.shape[1]
    c0 = 32 * g
    plus = T_packed[r, 2 * g]
    minus = T_packed[r, 2 * g + 1]
    for b in range(min(32, cols - c0)):
        trits[r, c0 + b] = np.int8((plus >> b) & 1) - np.int8((minus >> b) & 1)


@numba.njit(cache=True)
def _pack_base3_byte(trits, packed, r, k):
    cols = trits.shape[1]
    v = 0
    w = 1
    for i in range(5):
        c = 5 * k + i
        d = 1 if c >= cols else np.int32(trits[r, c]) + 1
        v += d * w
        w *= 3
    packed[r, k] = np.uint8(v)


@numba.njit(cache=True)
def _unpack_base3_byte(packed, trits, r, k):
    cols = trits.shape[1]
    v = np.int32(packed[r, k])
    for i in range(5):
        c = 5 * k + i
        if c < cols:
            trits[r, c] = np.int8(v % 3 - 1)
        v //= 3


_pack_group_dev = on_device(_pack_group)
_unpack_group_dev = on_device(_unpack_group)
_pack_base3_byte_dev = on_device(_pack_base3_byte)
_unpack_base3_byte_dev = on_device(_unpack_base3_byte)


# --------------------------------------------------------------------------------------------
# CPU twins (parallel over rows) and CUDA kernels (one thread per group or byte, grid-stride
# so 10M-row tables need no giant grid).


@numba.njit(parallel=True, cache=True)
def _pack_trits_cpu(trits, T_packed):
    G = T_packed.shape[1] // 2
    for r in numba.prange(trits.shape[0]):
        for g in range(G):
            _pack_group(trits, T_packed, r, g)


@cuda.jit
def _pack_trits_cuda(trits, T_packed):
    G = T_packed.shape[1] // 2
    for i in range(cuda.grid(1), trits.shape[0] * G, cuda.gridsize(1)):
        _pack_group_dev(trits, T_packed, i // G, i % G)


@numba.njit(parallel=True, cache=True)
def _unpack_trits_cpu(T_packed, trits):
    G = T_packed.shape[1] // 2
    for r in numba.prange(trits.shape[0]):
        for g in range(G):
            _unpack_group(T_packed, trits, r, g)


@cuda.jit
def _unpack_trits_cuda(T_packed, trits):
    G = T_packed.shape[1] // 2
    for i in range(cuda.grid(1), trits.shape[0] * G, cuda.gridsize(1)):
        _unpack_group_dev(T_packed, trits, i // G, i % G)


@numba.njit(parallel=True, cache=True)
def _pack_base3_cpu(trits, packed):
    for r in numba.prange(trits.shape[0]):
        for k in range(packed.shape[1]):
            _pack_base3_byte(trits, packed, r, k)


@cuda.jit
def _pack_base3_cuda(trits, packed):
    nb = packed.shape[1]
    for i in range(cuda.grid(1), trits.shape[0] * nb, cuda.gridsize(1)):
        _pack_base3_byte_dev(trits, packed, i // nb, i % nb)


@numba.njit(parallel=True, cache=True)
def _unpack_base3_cpu(packed, trits):
    for r in numba.prange(trits.shape[0]):
        for k in range(packed.shape[1]):
            _unpack_base3_byte(packed, trits, r, k)


@cuda.jit
def _unpack_base3_cuda(packed, trits):
    nb = packed.shape[1]
    for i in range(cuda.grid(1), trits.shape[0] * nb, cuda.gridsize(1)):
        _unpack_base3_byte_dev(packed, trits, i // nb, i % nb)


# --------------------------------------------------------------------------------------------
# NumPy references: the truth the tests compare against, written for clarity, not speed.


def pack_trits_reference(trits):
    trits = np.asarray(trits)
    rows, cols = trits.shape
    G = n_groups(cols)
    padded = np.zeros((rows, 32 * G), np.int64)
    padded[:, :cols] = trits
    weights = np.uint64(1) << np.arange(32, dtype=np.uint64)
    plus = ((padded == 1).reshape(rows, G, 32) * weights).sum(-1)
    minus = ((padded == -1).reshape(rows, G, 32) * weights).sum(-1)
    return np.stack([plus, minus], axis=-1).reshape(rows, 2 * G).astype(np.uint32)


def unpack_trits_reference(T_packed, cols):
    T_packed = np.asarray(T_packed)
    rows = T_packed.shape[0]
    bits = (T_packed[:, :, None] >> np.arange(32, dtype=np.uint32)) & 1
    plus = bits[:, 0::2].reshape(rows, -1)[:, :cols]
    minus = bits[:, 1::2].reshape(rows, -1)[:, :cols]
    return (plus.astype(np.int8) - minus.astype(np.int8))


def pack_base3_reference(trits):
    trits = np.asarray(trits)
    rows, cols = trits.shape
    nb = n_base3_bytes(cols)
    digits = np.ones((rows, 5 * nb), np.int64)
    digits[:, :cols] = trits.astype(np.int64) + 1
    return (digits.reshape(rows, nb, 5) * 3 ** np.arange(5)).sum(-1).astype(np.uint8)


def unpack_base3_reference(packed, cols):
    packed = np.asarray(packed).astype(np.int64)
    rows = packed.shape[0]
    digits = (packed[:, :, None] // 3 ** np.arange(5)) % 3
    return (digits.reshape(rows, -1)[:, :cols] - 1).astype(np.int8)


# --------------------------------------------------------------------------------------------
# Validation. Shape/dtype errors are plain checks; value checks run on the array's own device
# in row chunks (bounded temporaries) and name the first offending row and column.


def _check_cols(op, cols):
    if isinstance(cols, (bool, np.bool_)) or not isinstance(cols, (int, np.integer)):
        raise TypeError(f"{op}: cols must be an integer >= 1, got {cols!r}")
    if cols < 1:
        raise ValueError(f"{op}: cols = {cols}, expected >= 1")
    return int(cols)


def _first_true(mask):
    """(row, col) of the first True of a 2-D mask, or None (one host sync)."""
    if not bool(mask.any()):
        return None
    return divmod(int(mask.argmax()), mask.shape[1])


def _check_trit_values(op, trits):
    for r0, r1 in _row_chunks(trits.shape[0], trits.shape[1]):
        chunk = trits[r0:r1]
        bad = _first_true((chunk < -1) | (chunk > 1))
        if bad is not None:
            r, c = bad[0] + r0, bad[1]
            raise ValueError(f"{op}: trits[{r}, {c}] = {int(trits[r, c])}, expected -1, 0 or 1")


def validate_packed(T_packed, cols, op="validate_packed"):
    """Check a bitplane32 array: dtype, shape, contiguity, and every trit code.

    Raises TypeError/ValueError naming the first bad row and column: a bit set in both the
    PLUS and MINUS word, or a set padding bit (column >= cols). One pass over the array, in
    row chunks, on the array's own device; this is what checkpoint loading calls.
    """
    cols = _check_cols(op, cols)
    check_array(op, "T_packed", T_packed, np.uint32, 2)
    G = n_groups(cols)
    if T_packed.shape[1] != 2 * G:
        raise ValueError(f"{op}: T_packed has shape {tuple(T_packed.shape)}, expected "
                         f"(rows, {2 * G}) for {cols} columns (2 words per 32 columns)")
    tail = cols - 32 * (G - 1)   # valid bits in the last group
    pad_mask = np.uint32(0 if tail == 32 else (0xFFFFFFFF << tail) & 0xFFFFFFFF)
    for r0, r1 in _row_chunks(T_packed.shape[0], T_packed.shape[1]):
        chunk = T_packed[r0:r1]
        both = _first_true((chunk[:, 0::2] & chunk[:, 1::2]) != 0)
        if both is not None:
            r, g = both[0] + r0, both[1]
            word = int(T_packed[r, 2 * g]) & int(T_packed[r, 2 * g + 1])
            c = 32 * g + (word & -word).bit_length() - 1
            raise ValueError(f"{op}: invalid trit code at row {r}, col {c}: the bit is set in "
                             f"both the PLUS and MINUS mask (T_packed[{r}, {2 * g}:{2 * g + 2}])")
        if pad_mask:
            pad = _first_true((chunk[:, -2:] & pad_mask) != 0)
            if pad is not None:
                r = pad[0] + r0
                word = int(T_packed[r, 2 * G - 2 + pad[1]]) & int(pad_mask)
                c = 32 * (G - 1) + (word & -word).bit_length() - 1
                raise ValueError(f"{op}: invalid trit code at row {r}, col {c}: padding bit set "
                                 f"(only {cols} columns exist; padding must be zero)")


def _check_base3(op, packed, cols):
    cols = _check_cols(op, cols)
    check_array(op, "packed", packed, np.uint8, 2)
    nb = n_base3_bytes(cols)
    if packed.shape[1] != nb:
        raise ValueError(f"{op}: packed has shape {tuple(packed.shape)}, expected (rows, {nb}) "
                         f"for {cols} columns (5 trits per byte)")
    k = cols - 5 * (nb - 1)  # real trits in the last byte
    pad_code = (3 ** (5 - k) - 1) // 2  # remaining digits all 1 (t = 0)
    for r0, r1 in _row_chunks(packed.shape[0], packed.shape[1]):
        chunk = packed[r0:r1]
        bad = _first_true(chunk > 242)
        if bad is not None:
            r, b = bad[0] + r0, bad[1]
            raise ValueError(f"{op}: packed[{r}, {b}] = {int(packed[r, b])} is not a base-3 code "
                             f"(bytes hold 5 trits, so at most 242); row {r}, cols {5 * b}.."
                             f"{5 * b + 4}")
        if k < 5:
            pad = _first_true(chunk[:, -1:] // 3 ** k != pad_code)
            if pad is not None:
                r = pad[0] + r0
                raise ValueError(f"{op}: packed[{r}, {nb - 1}] = {int(packed[r, nb - 1])} encodes "
                                 f"padding trits other than 0 beyond col {cols - 1}")
    return cols


# --------------------------------------------------------------------------------------------
# Public API.


def _run(kernel_cpu, kernel_cuda, work, src, dst, op):
    dev = target(src, dst, op=op)
    if dev == "cpu":
        kernel_cpu(src, dst)
    else:
        launch(kernel_cuda, blocks(work, _THREADS), _THREADS, src, dst)


def _packed_like(src, shape, dtype, kernel_cpu, kernel_cuda, work, op):
    dst = xp_of(src).empty(shape, dtype)
    if shape[0]:
        _run(kernel_cpu, kernel_cuda, work, src, dst, op)
    return dst


def _pack_trits(trits, op):
    rows, cols = trits.shape
    return _packed_like(trits, (rows, 2 * n_groups(cols)), np.uint32, _pack_trits_cpu,
                        _pack_trits_cuda, rows * n_groups(cols), op)


def _unpack_trits(T_packed, cols, op):
    rows = T_packed.shape[0]
    return _packed_like(T_packed, (rows, cols), np.int8, _unpack_trits_cpu, _unpack_trits_cuda,
                        rows * n_groups(cols), op)


def _pack_base3(trits, op):
    rows, cols = trits.shape
    return _packed_like(trits, (rows, n_base3_bytes(cols)), np.uint8, _pack_base3_cpu,
                        _pack_base3_cuda, rows * n_base3_bytes(cols), op)


def _unpack_base3(packed, cols, op):
    return _packed_like(packed, (packed.shape[0], cols), np.int8, _unpack_base3_cpu,
                        _unpack_base3_cuda, packed.size, op)


def _check_trits(op, trits):
    check_array(op, "trits", trits, np.int8, 2)
    if trits.shape[1] < 1:
        raise ValueError(f"{op}: trits has shape {tuple(trits.shape)}, expected >= 1 column")
    _check_trit_values(op, trits)


def pack_trits(trits):
    """int8 trits (rows, cols) -> bitplane32 uint32 (rows, 2*ceil(cols/32)), same device."""
    _check_trits("pack_trits", trits)
    return _pack_trits(trits, "pack_trits")


def unpack_trits(T_packed, cols):
    """bitplane32 (rows, 2G) -> int8 trits (rows, cols), after `validate_packed`."""
    validate_packed(T_packed, cols, op="unpack_trits")
    return _unpack_trits(T_packed, int(cols), "unpack_trits")


def pack_base3(trits):
    """int8 trits (rows, cols) -> base3-5 uint8 (rows, ceil(cols/5)), same device."""
    _check_trits("pack_base3", trits)
    return _pack_base3(trits, "pack_base3")


def unpack_base3(packed, cols):
    """base3-5 uint8 (rows, ceil(cols/5)) -> int8 trits (rows, cols); rejects bytes > 242."""
    cols = _check_base3("unpack_base3", packed, cols)
    return _unpack_base3(packed, cols, "unpack_base3")


# The converters validate the whole input once (so errors name rows of the whole table), then
# go through int8 in row chunks: peak extra memory stays near 16 MB for any table size.


def bitplane_to_base3(T_packed, cols):
    """bitplane32 -> base3-5 (writing checkpoints)."""
    op = "bitplane_to_base3"
    validate_packed(T_packed, cols, op=op)
    cols = int(cols)
    out = xp_of(T_packed).empty((T_packed.shape[0], n_base3_bytes(cols)), np.uint8)
    for r0, r1 in _row_chunks(T_packed.shape[0], cols):
        out[r0:r1] = _pack_base3(_unpack_trits(T_packed[r0:r1], cols, op), op)
    return out


def base3_to_bitplane(packed, cols):
    """base3-5 -> bitplane32 (loading checkpoints)."""
    op = "base3_to_bitplane"
    cols = _check_base3(op, packed, cols)
    out = xp_of(packed).empty((packed.shape[0], 2 * n_groups(cols)), np.uint32)
    for r0, r1 in _row_chunks(packed.shape[0], cols):
        out[r0:r1] = _pack_trits(_unpack_base3(packed[r0:r1], cols, op), op)
    return out
