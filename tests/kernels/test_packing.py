"""tritnet_kernels.packing: bitplane32 and base3-5 round trips, the CPU twins against the
NumPy references, the CUDA kernels against the CPU twins (simulator, tiny shapes; GPU), and
every bad input raising before any launch."""

import numba
import numpy as np
import pytest

from tritnet import backend
from tritnet_kernels import packing as P
from tritnet_kernels._launch import launch

SIM = bool(numba.config.ENABLE_CUDASIM)

cupy = backend.cupy
HAVE_GPU = backend.gpu_usable()[0]




SHAPES = [(1, 1), (1, 5), (2, 31), (3, 32), (4, 33), (1, 64), (5, 65), (7, 100), (33, 161),
          (2, 1000)]


def random_trits(rng, rows, cols):
    return rng.integers(-1, 2, (rows, cols)).astype(np.int8)


@pytest.mark.parametrize("rows,cols", SHAPES)
def test_bitplane_round_trip_matches_reference(rows, cols):
    rng = np.random.default_rng(rows * 1000 + cols)
    trits = random_trits(rng, rows, cols)
    T_packed = P.pack_trits(trits)
    assert T_packed.dtype == np.uint32 and T_packed.shape == (rows, 2 * P.n_groups(cols))
    np.testing.assert_array_equal(T_packed, P.pack_trits_reference(trits))
    np.testing.assert_array_equal(P.unpack_trits(T_packed, cols), trits)
    np.testing.assert_array_equal(P.unpack_trits_reference(T_packed, cols), trits)
    P.validate_packed(T_packed, cols)


def test_bitplane_layout_is_plus_minus_words_per_group():
    trits = np.zeros((1, 40), np.int8)
    trits[0, 0], trits[0, 31], trits[0, 32], trits[0, 39] = 1, -1, -1, 1
    np.testing.assert_array_equal(P.pack_trits(trits), [[1, 1 << 31, 1 << 7, 1]])


@pytest.mark.parametrize("rows,cols", SHAPES)
def test_base3_round_trip_matches_reference(rows, cols):
    rng = np.random.default_rng(rows * 7 + cols)
    trits = random_trits(rng, rows, cols)
    packed = P.pack_base3(trits)
    assert packed.dtype == np.uint8 and packed.shape == (rows, P.n_base3_bytes(cols))
    assert packed.max() <= 242
    np.testing.assert_array_equal(packed, P.pack_base3_reference(trits))
    np.testing.assert_array_equal(P.unpack_base3(packed, cols), trits)
    np.testing.assert_array_equal(P.unpack_base3_reference(packed, cols), trits)


def test_base3_layout():
    # byte = sum (t_i + 1) 3**i; padding trits are digit 1
    trits = np.array([[1, -1, 0, 0, 0, 1]], np.int8)
    np.testing.assert_array_equal(P.pack_base3(trits), [[2 + 0 + 9 + 27 + 81, 2 + 3 + 9 + 27 + 81]])


@pytest.mark.parametrize("rows,cols", [(1, 1), (9, 37), (70, 64)])
def test_converters_round_trip_in_row_chunks(rows, cols, monkeypatch):
    monkeypatch.setattr(P, "_CHUNK_ELEMS", 100)  # several row chunks even for tiny tables
    trits = random_trits(np.random.default_rng(cols), rows, cols)
    T_packed = P.pack_trits(trits)
    packed = P.bitplane_to_base3(T_packed, cols)
    np.testing.assert_array_equal(packed, P.pack_base3_reference(trits))
    np.testing.assert_array_equal(P.base3_to_bitplane(packed, cols), T_packed)


def test_zero_rows():
    assert P.pack_trits(np.zeros((0, 5), np.int8)).shape == (0, 2)
    assert P.unpack_trits(np.zeros((0, 2), np.uint32), 5).shape == (0, 5)
    assert P.pack_base3(np.zeros((0, 5), np.int8)).shape == (0, 1)
    assert P.unpack_base3(np.zeros((0, 1), np.uint8), 5).shape == (0, 5)


# ---- bad input: a clear exception before any launch, naming the first bad row/col


@pytest.mark.parametrize("value", [2, -2, 127, -128])
@pytest.mark.parametrize("fn", [P.pack_trits, P.pack_base3])
def test_out_of_range_trits_are_rejected(fn, value):
    trits = np.zeros((4, 40), np.int8)
    trits[2, 33] = value
    trits[3, 0] = value
    with pytest.raises(ValueError, match=r"trits\[2, 33\] = %d" % value):
        fn(trits)


def test_invalid_codes_are_rejected_with_row_and_col():
    T_packed = P.pack_trits(np.zeros((3, 40), np.int8))
    T_packed[1, 2] |= np.uint32(1 << 5)
    T_packed[1, 3] |= np.uint32(1 << 5)
    with pytest.raises(ValueError, match="row 1, col 37.*both the PLUS and MINUS"):
        P.unpack_trits(T_packed, 40)
    with pytest.raises(ValueError, match="row 1, col 37"):
        P.validate_packed(T_packed, 40)
    with pytest.raises(ValueError, match="row 1, col 37"):
        P.bitplane_to_base3(T_packed, 40)
    T_packed[1, 3] = 0
    T_packed[2, 3] = np.uint32(1 << 9)   # column 41 of a 40-column matrix
    with pytest.raises(ValueError, match="row 2, col 41.*padding"):
        P.unpack_trits(T_packed, 40)


def test_bad_base3_bytes_are_rejected():
    packed = P.pack_base3(np.zeros((3, 7), np.int8))
    packed[2, 0] = 243
    with pytest.raises(ValueError, match=r"packed\[2, 0\] = 243.*at most 242"):
        P.unpack_base3(packed, 7)
    with pytest.raises(ValueError, match="at most 242"):
        P.base3_to_bitplane(packed, 7)
    packed[2, 0] = 121
    packed[1, 1] = 0   # padding trits (cols 7..9) must be 0, i.e. digit 1
    with pytest.raises(ValueError, match=r"packed\[1, 1\].*padding"):
        P.unpack_base3(packed, 7)


@pytest.mark.parametrize("call,exc,match", [
    (lambda: P.pack_trits(np.zeros((2, 3), np.int16)), TypeError, "dtype int16, expected int8"),
    (lambda: P.pack_trits(np.zeros(3, np.int8)), ValueError, "expected 2 dimensions"),
    (lambda: P.pack_trits(np.zeros((2, 0), np.int8)), ValueError, ">= 1 column"),
    (lambda: P.pack_trits(np.zeros((4, 6), np.int8)[:, ::2]), ValueError, "not C-contiguous"),
    (lambda: P.pack_trits([[0, 1]]), TypeError, "NumPy or CuPy array"),
    (lambda: P.unpack_trits(np.zeros((2, 2), np.int32), 5), TypeError, "expected uint32"),
    (lambda: P.unpack_trits(np.zeros((2, 4), np.uint32), 5), ValueError, r"expected \(rows, 2\)"),
    (lambda: P.unpack_trits(np.zeros((2, 4), np.uint32)[:, ::2], 5), ValueError, "C-contiguous"),
    (lambda: P.unpack_trits(np.zeros((2, 2), np.uint32), 0), ValueError, "cols = 0"),
    (lambda: P.unpack_trits(np.zeros((2, 2), np.uint32), 2.0), TypeError, "integer"),
    (lambda: P.unpack_trits(np.zeros((2, 2), np.uint32), True), TypeError, "integer"),
    (lambda: P.unpack_base3(np.zeros((2, 2), np.uint8), 5), ValueError, r"expected \(rows, 1\)"),
    (lambda: P.unpack_base3(np.zeros((2, 1), np.int8), 5), TypeError, "expected uint8"),
    (lambda: P.validate_packed(np.zeros((2, 2), np.float32), 5), TypeError, "expected uint32"),
])
def test_bad_arguments(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# ---- CUDA kernels under the simulator, tiny shapes, against the CPU twins


@pytest.mark.cudasim
@pytest.mark.parametrize("rows,cols", [(1, 1), (3, 33), (2, 70)])
def test_cuda_kernels_match_cpu_twins_in_simulator(rows, cols):
    trits = random_trits(np.random.default_rng(cols), rows, cols)
    G, nb = P.n_groups(cols), P.n_base3_bytes(cols)
    T_cpu = np.empty((rows, 2 * G), np.uint32)
    P._pack_trits_cpu(trits, T_cpu)
    T_sim = np.empty_like(T_cpu)
    launch(P._pack_trits_cuda, 2, 32, trits, T_sim)
    np.testing.assert_array_equal(T_sim, T_cpu)
    back = np.empty_like(trits)
    launch(P._unpack_trits_cuda, 2, 32, T_sim, back)
    np.testing.assert_array_equal(back, trits)
    b_cpu = np.empty((rows, nb), np.uint8)
    P._pack_base3_cpu(trits, b_cpu)
    b_sim = np.empty_like(b_cpu)
    launch(P._pack_base3_cuda, 2, 32, trits, b_sim)
    np.testing.assert_array_equal(b_sim, b_cpu)
    back[...] = 0
    launch(P._unpack_base3_cuda, 2, 32, b_sim, back)
    np.testing.assert_array_equal(back, trits)


# ---- CuPy arrays on a GPU


@pytest.mark.cuda
@pytest.mark.parametrize("rows,cols", [(1, 1), (5, 65), (300, 161), (4096, 64)])
def test_gpu_round_trips_match_cpu(rows, cols):
    trits = random_trits(np.random.default_rng(rows + cols), rows, cols)
    d = cupy.asarray(trits)
    T_packed = P.pack_trits(d)
    assert isinstance(T_packed, cupy.ndarray)
    np.testing.assert_array_equal(T_packed.get(), P.pack_trits_reference(trits))
    np.testing.assert_array_equal(P.unpack_trits(T_packed, cols).get(), trits)
    packed = P.pack_base3(d)
    np.testing.assert_array_equal(packed.get(), P.pack_base3_reference(trits))
    np.testing.assert_array_equal(P.unpack_base3(packed, cols).get(), trits)
    np.testing.assert_array_equal(P.bitplane_to_base3(T_packed, cols).get(), packed.get())
    np.testing.assert_array_equal(P.base3_to_bitplane(packed, cols).get(), T_packed.get())


@pytest.mark.cuda
def test_gpu_bad_values_are_rejected():
    trits = cupy.zeros((3, 40), cupy.int8)
    trits[1, 7] = 3
    with pytest.raises(ValueError, match=r"trits\[1, 7\] = 3"):
        P.pack_trits(trits)
    T_packed = P.pack_trits(cupy.zeros((3, 40), cupy.int8))
    T_packed[2, 0:2] = 1
    with pytest.raises(ValueError, match="row 2, col 0"):
        P.unpack_trits(T_packed, 40)
    with pytest.raises(TypeError, match="different devices"):
        P._run(P._pack_trits_cpu, P._pack_trits_cuda, 1, np.zeros((1, 1), np.int8),
               cupy.zeros((1, 2), cupy.uint32), "pack_trits")
