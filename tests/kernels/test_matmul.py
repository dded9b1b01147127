"""tritnet_kernels.matmul: y = x·(diag(s)·T)ᵀ and gx = gy·diag(s)·T.

CPU twins (lookup-table and BLAS paths) against the float64 NumPy reference; the CUDA kernels
(generic, tensor-core with emulated mma, widening) against the CPU twin under the simulator on
tiny shapes; CuPy arrays on a GPU (float32 and float16, both kernel paths); and every bad
input raising before any launch."""

import numba
import numpy as np
import pytest

from tritnet import backend
from tritnet_kernels import matmul as MM
from tritnet_kernels import packing as P
from tritnet_kernels._launch import launch

SIM = bool(numba.config.ENABLE_CUDASIM)

cupy = backend.cupy
HAVE_GPU = backend.gpu_usable()[0]




def problem(seed, M, N, K, dtype=np.float32):
    rng = np.random.default_rng(seed)
    T_packed = P.pack_trits(rng.integers(-1, 2, (N, K)).astype(np.int8))
    E = rng.integers(-24, 24, N).astype(np.int8)
    x = rng.standard_normal((M, K)).astype(dtype)
    gy = rng.standard_normal((M, N)).astype(dtype)
    return x, T_packed, E, gy


def assert_close(got, ref, rel):
    """Max error relative to the largest |ref|: fp32 sums of K terms land near 1e-7."""
    got = np.asarray(got, np.float64)
    scale = max(float(np.abs(ref).max()), 1e-30)
    err = float(np.abs(got - ref).max()) / scale
    assert err <= rel, f"max error {err:.3g} x max|ref| > {rel}"


SHAPES = [(1, 1, 1), (1, 7, 33), (2, 40, 70), (3, 33, 100), (8, 64, 256), (1, 100, 1),
          (9, 20, 65), (16, 70, 130), (40, 33, 97)]


@pytest.mark.parametrize("M,N,K", SHAPES)
def test_cpu_matches_reference(M, N, K):
    x, T_packed, E, gy = problem(M * 31 + N + K, M, N, K)
    y = MM.ternary_matmul(x, T_packed, E, K)
    assert y.dtype == np.float32 and y.shape == (M, N)
    assert_close(y, MM.ternary_matmul_reference(x, T_packed, E, K), 1e-5)
    gx = MM.ternary_matmul_t(gy, T_packed, E, K)
    assert gx.dtype == np.float32 and gx.shape == (M, K)
    assert_close(gx, MM.ternary_matmul_t_reference(gy, T_packed, E, K), 1e-5)


@pytest.mark.parametrize("M", [1, 12])
def test_cpu_twins_directly_at_any_M(M):
    # The wrappers take BLAS above M = 8; the twins themselves handle every M.
    x, T_packed, E, gy = problem(M, M, 37, 77)
    y = np.empty((M, 37), np.float32)
    MM._ternary_matmul_cpu(x, T_packed, E, y)
    assert_close(y, MM.ternary_matmul_reference(x, T_packed, E, 77), 1e-5)
    gx = np.empty((M, 77), np.float32)
    MM._ternary_matmul_t_cpu(gy, T_packed, E, gx)
    assert_close(gx, MM.ternary_matmul_t_reference(gy, T_packed, E, 77), 1e-5)
    W = np.empty((37, 77), np.float32)
    MM._widen_cpu(T_packed, E, 0, W)
    np.testing.assert_array_equal(W, MM._weights_reference(T_packed, E, 77).astype(np.float32))


def test_scale_is_two_to_the_e_over_8():
    np.testing.assert_allclose(MM.scale_reference(np.array([-8, 0, 8, 16], np.int8)),
                               [0.5, 1, 2, 4])
    T_packed = P.pack_trits(np.ones((4, 3), np.int8))
    y = MM.ternary_matmul(np.ones((1, 3), np.float32), T_packed,
                          np.array([-8, 0, 8, 16], np.int8), 3)
    np.testing.assert_allclose(y, [[1.5, 3, 6, 12]], rtol=1e-6)


def test_out_and_empty_batch():
    x, T_packed, E, gy = problem(0, 3, 10, 20)
    out = np.full((3, 10), np.nan, np.float32)
    assert MM.ternary_matmul(x, T_packed, E, 20, out=out) is out
    assert_close(out, MM.ternary_matmul_reference(x, T_packed, E, 20), 1e-5)
    gout = np.full((3, 20), np.nan, np.float32)
    assert MM.ternary_matmul_t(gy, T_packed, E, 20, out=gout) is gout
    assert_close(gout, MM.ternary_matmul_t_reference(gy, T_packed, E, 20), 1e-5)
    assert MM.ternary_matmul(x[:0], T_packed, E, 20).shape == (0, 10)
    assert MM.ternary_matmul_t(gy[:0], T_packed, E, 20).shape == (0, 20)


# ---- bad input: raised before any launch


def bad_calls():
    x, T_packed, E, gy = problem(1, 2, 10, 40)
    f, ft = MM.ternary_matmul, MM.ternary_matmul_t
    invalid = T_packed.copy()
    invalid[3, 2:4] = 1  # row 3, col 32 in both masks
    return [
        (lambda: f(x.astype(np.float64), T_packed, E, 40), TypeError, "x has dtype float64"),
        (lambda: f(x.astype(np.float16), T_packed, E, 40), TypeError, "expected float32"),
        (lambda: f(np.zeros((2, 80), np.float32)[:, ::2], T_packed, E, 40), ValueError,
         "x is not C-contiguous.*ascontiguousarray"),
        (lambda: f(np.zeros((2, 39), np.float32), T_packed, E, 40), ValueError,
         r"x has shape \(2, 39\), expected \(M, 40\)"),
        (lambda: f(x, T_packed, E, 70), ValueError, r"expected \(rows >= 1, 6\) for 70 columns"),
        (lambda: f(x, T_packed.astype(np.int64), E, 40), TypeError, "T_packed has dtype int64"),
        (lambda: f(x, np.asfortranarray(T_packed), E, 40), ValueError, "T_packed is not C-contig"),
        (lambda: f(x, T_packed, E.astype(np.int16), 40), TypeError, "E has dtype int16"),
        (lambda: f(x, T_packed, E[:9], 40), ValueError, r"E has shape \(9,\), expected \(10,\)"),
        (lambda: f(x, T_packed, E, 0), ValueError, "cols = 0"),
        (lambda: f(x, T_packed, E, 40.0), TypeError, "cols must be an integer"),
        (lambda: f(x, T_packed, E, 40, out=np.empty((2, 10), np.float64)), TypeError,
         "out has dtype float64"),
        (lambda: f(x, T_packed, E, 40, out=np.empty((2, 11), np.float32)), ValueError,
         r"out has shape \(2, 11\)"),
        (lambda: f(x, T_packed, E, 40, out=x.reshape(-1)[:20].reshape(2, 10)), ValueError,
         "out shares memory with x"),
        (lambda: f(x, invalid, E, 40, validate=True), ValueError, "row 3, col 32"),
        (lambda: ft(np.zeros((2, 9), np.float32), T_packed, E, 40), ValueError,
         r"gy has shape \(2, 9\), expected \(M, 10\)"),
        (lambda: ft(gy.astype(np.int32), T_packed, E, 40), TypeError, "gy has dtype int32"),
        (lambda: ft(np.zeros((2, 20), np.float32)[:, ::2], T_packed, E, 40), ValueError,
         "gy is not C-contiguous"),
        (lambda: ft(gy, T_packed, E, 40, out=np.empty((2, 10), np.float32)), ValueError,
         r"out has shape \(2, 10\), expected \(2, 40\)"),
    ]


@pytest.mark.parametrize("case", range(len(bad_calls())))
def test_bad_input_raises_before_launch(case):
    call, exc, match = bad_calls()[case]
    with pytest.raises(exc, match=match):
        call()


# ---- CUDA kernels under the simulator (tiny shapes) against the CPU twin


@pytest.mark.cudasim
@pytest.mark.parametrize("M,N,K", [(1, 5, 33), (3, 20, 40), (2, 6, 100)])
def test_generic_and_widen_kernels_in_simulator(M, N, K):
    x, T_packed, E, gy = problem(K, M, N, K)
    y_cpu, y_sim = np.empty((M, N), np.float32), np.empty((M, N), np.float32)
    MM._ternary_matmul_cpu(x, T_packed, E, y_cpu)
    grid, block = MM._generic_grid(N, M)
    launch(MM._ternary_matmul_cuda, grid, block, x, T_packed, E, y_sim)
    assert_close(y_sim, y_cpu.astype(np.float64), 1e-5)
    gx_cpu, gx_sim = np.empty((M, K), np.float32), np.empty((M, K), np.float32)
    MM._ternary_matmul_t_cpu(gy, T_packed, E, gx_cpu)
    grid, block = MM._generic_grid(K, M)
    launch(MM._ternary_matmul_t_cuda, grid, block, gy, T_packed, E, gx_sim)
    assert_close(gx_sim, gx_cpu.astype(np.float64), 1e-5)
    W_cpu, W_sim = np.empty((N, K), np.float32), np.empty((N, K), np.float32)
    MM._widen_cpu(T_packed, E, 0, W_cpu)
    launch(MM._widen_cuda, (-(-K // 64), 4), 64, T_packed, E, 0, W_sim)  # 2 groups a block
    np.testing.assert_array_equal(W_sim, W_cpu)


@pytest.mark.cudasim
@pytest.mark.parametrize("M,N,K", [(3, 20, 40), (10, 17, 70), (2, 40, 150)])
def test_tensor_core_kernels_in_simulator(M, N, K):
    # (2, 40, 150): two row blocks and split K / split rows, i.e. the last-block reduction.
    x, T_packed, E, gy = problem(N + K, M, N, K)
    y_cpu = np.empty((M, N), np.float32)
    MM._ternary_matmul_cpu(x, T_packed, E, y_cpu)
    assert_close(MM.ternary_matmul(x, T_packed, E, K), y_cpu.astype(np.float64), 1e-5)
    gx_cpu = np.empty((M, K), np.float32)
    MM._ternary_matmul_t_cpu(gy, T_packed, E, gx_cpu)
    assert_close(MM.ternary_matmul_t(gy, T_packed, E, K), gx_cpu.astype(np.float64), 1e-5)
    assert not MM._gpu_info()[2].any(), "split counters must be back at zero"


@pytest.mark.cudasim
def test_tensor_core_fp16_input_path_in_simulator():
    # The fp16 path stages x as one fp16 term; fp16-representable inputs make it exact.
    x, T_packed, E, _ = problem(5, 4, 20, 45)
    x16 = x.astype(np.float16).astype(np.float32)
    y = np.empty((4, 20), np.float32)
    info = MM._gpu_info()
    launch(MM._mma_kernel("fwd", True, 1), (1, 1), 64, x16, T_packed.view(np.uint64), E, y,
           info[3], info[2], 99)
    assert_close(y, MM.ternary_matmul_reference(x16, T_packed, E, 45), 1e-6)


# ---- CuPy arrays on a GPU


GPU_SHAPES = [(1, 1, 1), (1, 7, 33), (3, 300, 129), (1, 4096, 4096), (16, 1000, 777),
              (5, 2048, 8192), (2, 32768, 4096), (17, 300, 500), (64, 1024, 1000)]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("M,N,K", GPU_SHAPES)
def test_gpu_matches_cpu(M, N, K, dtype):
    # M <= 16: tensor-core kernels (split K / split rows at the larger shapes); M > 16: widen
    # plus cuBLAS. float16 results carry fp16 rounding of the output (and of s when widened).
    x, T_packed, E, gy = problem(M + N + K, M, N, K, dtype)
    ref = MM.ternary_matmul_reference(x.astype(np.float32), T_packed, E, K)
    refg = MM.ternary_matmul_t_reference(gy.astype(np.float32), T_packed, E, K)
    dT, dE = cupy.asarray(T_packed), cupy.asarray(E)
    rel = 2e-5 if dtype == np.float32 else 2e-3
    for _ in range(2):  # second call: warm kernels, reused counters
        y = MM.ternary_matmul(cupy.asarray(x), dT, dE, K)
        assert y.dtype == dtype and y.shape == (M, N)
        assert_close(y.get(), ref, rel)
        gx = MM.ternary_matmul_t(cupy.asarray(gy), dT, dE, K)
        assert gx.dtype == dtype and gx.shape == (M, K)
        assert_close(gx.get(), refg, rel)
    assert not MM._gpu_info()[2].any(), "split counters must be back at zero"


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("M", [3, 12])
def test_gpu_tensor_core_kernels_unsplit_several_staging_rounds(M, dtype):
    # One split and 4 warps: the forward stages x in several rounds (K = 3000 is 24 k-blocks),
    # the backward stages gy in two (600 rows are 38 steps).
    x, T_packed, E, gy = problem(11, M, 600, 3000, dtype)
    dx, dT, dE, dgy = map(cupy.asarray, (x, T_packed, E, gy))
    y = cupy.empty((M, 600), dtype)
    MM._forward_mma(dx, dT, dE, y, cupy, 4, 1)
    rel = 2e-5 if dtype == np.float32 else 2e-3
    assert_close(y.get(), MM.ternary_matmul_reference(x.astype(np.float32), T_packed, E, 3000), rel)
    gx = cupy.empty((M, 3000), dtype)
    MM._backward_mma(dgy, dT, dE, gx, cupy, 4, 1)
    assert_close(gx.get(), MM.ternary_matmul_t_reference(gy.astype(np.float32), T_packed, E, 3000),
                 rel)


@pytest.mark.cuda
@pytest.mark.parametrize("M,N,K", [(1, 7, 33), (4, 300, 129)])
def test_gpu_generic_kernels_match_cpu_twin(M, N, K):
    x, T_packed, E, gy = problem(7, M, N, K)
    dx, dT, dE, dgy = map(cupy.asarray, (x, T_packed, E, gy))
    y = cupy.empty((M, N), cupy.float32)
    grid, block = MM._generic_grid(N, M)
    launch(MM._ternary_matmul_cuda, grid, block, dx, dT, dE, y)
    assert_close(y.get(), MM.ternary_matmul_reference(x, T_packed, E, K), 1e-5)
    gx = cupy.empty((M, K), cupy.float32)
    grid, block = MM._generic_grid(K, M)
    launch(MM._ternary_matmul_t_cuda, grid, block, dgy, dT, dE, gx)
    assert_close(gx.get(), MM.ternary_matmul_t_reference(gy, T_packed, E, K), 1e-5)


@pytest.mark.cuda
def test_gpu_bad_input():
    x, T_packed, E, gy = problem(3, 2, 10, 40)
    dx, dT, dE = map(cupy.asarray, (x, T_packed, E))
    with pytest.raises(TypeError, match="different devices"):
        MM.ternary_matmul(dx, T_packed, dE, 40)
    with pytest.raises(ValueError, match="x is not C-contiguous"):
        MM.ternary_matmul(cupy.zeros((2, 80), cupy.float32)[:, ::2], dT, dE, 40)
    with pytest.raises(TypeError, match="x has dtype float64"):
        MM.ternary_matmul(dx.astype(cupy.float64), dT, dE, 40)
    with pytest.raises(TypeError, match="out has dtype float32, expected float16"):
        MM.ternary_matmul(dx.astype(cupy.float16), dT, dE, 40, out=cupy.empty((2, 10)).astype(
            cupy.float32))
    bad = dT.copy()
    bad[1, 0:2] = 1
    with pytest.raises(ValueError, match="row 1, col 0"):
        MM.ternary_matmul(dx, bad, dE, 40, validate=True)


@pytest.mark.cuda
def test_gpu_kernels_take_the_fast_launch_path():
    from tritnet_kernels._launch import fast_launch_status

    x, T_packed, E, gy = problem(9, 2, 64, 96)
    dx, dT, dE = map(cupy.asarray, (x, T_packed, E))
    MM.ternary_matmul(dx, dT, dE, 96)
    MM.ternary_matmul_t(cupy.asarray(gy), dT, dE, 96)
    status = fast_launch_status()
    assert status.get("_ternary_matmul_mma_f32_m8") == "fast", status
    assert status.get("_ternary_matmul_t_mma_m8") == "fast", status


def test_widen_writes_the_scaled_trits():
    x, T_packed, E, gy = problem(5, 2, 6, 45)
    ref = MM._weights_reference(T_packed, E, 45)
    np.testing.assert_array_equal(MM.widen(T_packed, E, 45, np.empty((6, 45))), ref)
    np.testing.assert_array_equal(MM.widen(T_packed, E, 45, np.empty((6, 45), np.float32)),
                                  ref.astype(np.float32))
    with pytest.raises(ValueError, match=r"widen: T_packed \(6, 4\), E \(6,\) and out \(6, 44\) "
                                         r"do not fit 45 columns"):
        MM.widen(T_packed, E, 45, np.empty((6, 44), np.float32))
    with pytest.raises(TypeError, match=r"widen: out has dtype float16"):
        MM.widen(T_packed, E, 45, np.empty((6, 45), np.float16))
