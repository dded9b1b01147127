"""tritnet_kernels.float_gemm: np.matmul's semantics, on a cuBLAS handle that stream capture
accepts."""

import numpy as np
import pytest

from tritnet import backend
from tritnet_kernels import float_gemm

cupy = backend.cupy   # None without CuPy: the `cuda` tests then skip (tests/conftest.py)


def test_numpy_arrays_take_numpy_matmul():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((3, 4, 5)), rng.standard_normal((5, 2))
    np.testing.assert_array_equal(float_gemm.matmul(a, b), np.matmul(a, b))
    out = np.empty((3, 4, 2))
    assert float_gemm.matmul(a, b, out=out) is out
    np.testing.assert_array_equal(out, np.matmul(a, b))
    again = np.ones((3, 4, 2))
    float_gemm.matmul(a, b, out=again, accumulate=True)
    np.testing.assert_allclose(again, 1 + np.matmul(a, b))
    with pytest.raises(ValueError, match=r"matmul: accumulate=True adds into out"):
        float_gemm.matmul(a, b, accumulate=True)


def test_gathered_products_on_numpy():
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((3, 4, 5)), rng.standard_normal((2, 6, 5)).swapaxes(1, 2)
    ai, bi = np.array([2, 0, 2, 1]), np.array([1, 1, 0, 0])
    got = float_gemm.matmul_gathered(a, b, ai, bi)
    np.testing.assert_allclose(got, np.stack([a[i] @ b[j] for i, j in zip(ai, bi)]))
    with pytest.raises(ValueError, match=r"matmul_gathered: shapes \(3, 4, 5\) and \(2, 4, 6\) "
                                         r"do not fit"):
        float_gemm.matmul_gathered(a, b.swapaxes(1, 2).swapaxes(1, 2)[:, :4], ai, bi)
    with pytest.raises(ValueError, match=r"matmul_gathered: a_index \(4,\) and b_index \(3,\)"):
        float_gemm.matmul_gathered(a, b, ai, bi[:3])
    with pytest.raises(TypeError, match=r"matmul_gathered: dtypes float64 and float32"):
        float_gemm.matmul_gathered(a, b.astype(np.float32), ai, bi)


def test_precision_names_are_checked():
    with pytest.raises(ValueError,
                       match=r"float_gemm.set_precision: 'bf16'; expected 'fp32' or 'tf32'"):
        float_gemm.set_precision("bf16")


def _layouts(rng, dtype):
    """(name, a, b) pairs covering the layouts the framework multiplies."""
    def r(*shape):
        return cupy.asarray(rng.standard_normal(shape).astype(dtype))
    wide = r(7, 40)
    return [
        ("row-major", r(33, 17), r(17, 9)),
        ("a transposed", r(17, 33).T, r(17, 9)),
        ("b transposed", r(33, 17), r(9, 17).T),
        ("both transposed", r(17, 33).T, r(9, 17).T),
        ("column slice (ld > cols)", wide[:, 3:20], r(17, 5)),
        ("batched", r(4, 6, 8), r(4, 8, 3)),
        ("batched, b transposed per batch", r(2, 3, 6, 8), r(2, 3, 5, 8).swapaxes(-1, -2)),
        ("weight broadcast over a batch", r(2, 5, 6, 8), r(8, 3)),
        ("batch broadcast (1, H) against (B, H)", r(1, 3, 6, 8), r(2, 3, 8, 4)),
        ("batch dims not collapsible", r(3, 2, 6, 8).swapaxes(0, 1), r(2, 3, 8, 4)),
        ("one row", r(1, 17), r(17, 9)),
        ("one column", r(33, 17), r(17, 1)),
        ("empty rows", r(0, 17), r(17, 9)),
        ("empty contraction", r(5, 0), r(0, 4)),
    ]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cuda_matmul_matches_cupy_on_every_layout(dtype):
    rng = np.random.default_rng(1)
    float_gemm.set_precision("fp32")
    tol = 1e-5 if dtype == np.float32 else 1e-12
    for name, a, b in _layouts(rng, dtype):
        got = float_gemm.matmul(a, b)
        want = np.matmul(a.get().astype(np.float64), b.get().astype(np.float64))
        assert got.shape == want.shape and got.dtype == dtype, name
        assert got.flags.c_contiguous, name
        np.testing.assert_allclose(got.get(), want, rtol=tol, atol=tol * 10, err_msg=name)


@pytest.mark.cuda
def test_cuda_matmul_out_tf32_and_fallbacks():
    rng = np.random.default_rng(2)
    a = cupy.asarray(rng.standard_normal((64, 96)).astype(np.float32))
    b = cupy.asarray(rng.standard_normal((96, 48)).astype(np.float32))
    want = np.matmul(a.get().astype(np.float64), b.get().astype(np.float64))
    out = cupy.empty((64, 48), np.float32)
    assert float_gemm.matmul(a, b, out=out) is out
    np.testing.assert_allclose(out.get(), want, rtol=1e-5, atol=1e-4)
    big = cupy.zeros((64, 60), np.float32)
    view = big[:, 5:53]                      # not C-contiguous: filled with a copy
    assert float_gemm.matmul(a, b, out=view) is view
    np.testing.assert_allclose(view.get(), want, rtol=1e-5, atol=1e-4)
    assert not big[:, :5].any() and not big[:, 53:].any()
    with pytest.raises(ValueError, match=r"matmul: out has shape \(64, 47\)"):
        float_gemm.matmul(a, b, out=cupy.empty((64, 47), np.float32))
    with pytest.raises(ValueError, match=r"contracted dimensions are 96 and 95"):
        float_gemm.matmul(a, b[:95])
    try:
        float_gemm.set_precision("tf32")   # tensor cores: inputs rounded to 10-bit mantissas
        tf32 = float_gemm.matmul(a, b).get()
    finally:
        float_gemm.set_precision("fp32")
    np.testing.assert_allclose(tf32, want, rtol=0, atol=0.05)
    assert not np.array_equal(tf32, out.get())
    half = float_gemm.matmul(a.astype(np.float16), b.astype(np.float16))   # cupy.matmul's
    assert half.dtype == np.float16


@pytest.mark.cuda
def test_cuda_matmul_is_captured_in_a_graph_and_replays_on_new_inputs():
    rng = np.random.default_rng(3)
    a = cupy.asarray(rng.standard_normal((4, 32, 16)).astype(np.float32))
    b = cupy.asarray(rng.standard_normal((16, 8)).astype(np.float32))
    float_gemm.matmul(a, b)   # first call outside: the handle, its workspace, the library
    # As tritnet.capture does: the graph's arrays (b's copy, out) come from a pool of their own
    # that nothing else allocates from while the graph lives, and all work is on one stream.
    pool = cupy.cuda.MemoryPool()
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        with cupy.cuda.using_allocator(pool.malloc):
            stream.begin_capture()
            out = float_gemm.matmul(a, b.T.copy().T)
            graph = stream.end_capture()
        a[...] = cupy.asarray(rng.standard_normal(a.shape).astype(np.float32))
        b[...] = cupy.asarray(rng.standard_normal(b.shape).astype(np.float32))
        graph.launch(stream)
        eager = float_gemm.matmul(a, b)
    stream.synchronize()
    np.testing.assert_array_equal(out.get(), eager.get())   # same handle, same algorithm


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cuda_gathered_products_match_numpy_and_capture(dtype):
    rng = np.random.default_rng(2)
    a = rng.standard_normal((5, 16, 24)).astype(dtype)
    b = rng.standard_normal((3, 40, 24)).astype(dtype).swapaxes(1, 2)   # column-major matrices
    ai, bi = np.array([4, 0, 0, 3, 1, 2]), np.array([2, 2, 0, 1, 0, 1])
    want = np.stack([a[i].astype(np.float64) @ b[j] for i, j in zip(ai, bi)])
    ga, gb = cupy.asarray(a), cupy.asarray(b.swapaxes(1, 2)).swapaxes(1, 2)
    gai, gbi = cupy.asarray(ai), cupy.asarray(bi)
    float_gemm.set_precision("fp32")
    got = float_gemm.matmul_gathered(ga, gb, gai, gbi)
    np.testing.assert_allclose(got.get(), want, rtol=1e-5 if dtype == np.float32 else 1e-12,
                               atol=1e-4 if dtype == np.float32 else 1e-12)
    # captured into a graph, it replays on new indices written into the same arrays
    out = cupy.empty_like(got)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        float_gemm.matmul_gathered(ga, gb, gai, gbi, out=out)   # warm: the handle and its workspace
        stream.begin_capture()
        float_gemm.matmul_gathered(ga, gb, gai, gbi, out=out)
        graph = stream.end_capture()
    gbi[...] = cupy.asarray(bi[::-1].copy())
    graph.launch(stream)
    stream.synchronize()
    want = np.stack([a[i].astype(np.float64) @ b[j] for i, j in zip(ai, bi[::-1])])
    np.testing.assert_allclose(out.get(), want, rtol=1e-5 if dtype == np.float32 else 1e-12,
                               atol=1e-4 if dtype == np.float32 else 1e-12)


@pytest.mark.cuda
def test_cuda_matmul_accumulates_into_out():
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((6, 33, 17)), rng.standard_normal((17, 9))
    out = cupy.asarray(rng.standard_normal((6, 33, 9)))
    want = out.get() + a @ b
    float_gemm.matmul(cupy.asarray(a), cupy.asarray(b), out=out, accumulate=True)
    np.testing.assert_allclose(out.get(), want, rtol=1e-12, atol=1e-12)
