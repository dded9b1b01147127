"""tritnet_kernels.attention: the fused row kernels between attention's two GEMMs. CPU twin
against the NumPy reference, the CUDA kernels against the CPU twin under the simulator (tiny
shapes) and on a GPU (CuPy), and every bad input named before anything is written."""

import numpy as np
import pytest

from tritnet import backend
from tritnet_kernels import attention as A

# (batch, tq, cols, row0, causal): several rows per batch entry, rows that see one key,
# rows past the end (all keys visible), non-causal, cols past a 128-thread block.
SHAPES = [(1, 1, 1, 0, True), (2, 3, 5, 2, True), (3, 4, 4, 0, True), (2, 3, 6, 0, False),
          (2, 5, 300, 150, True), (1, 2, 257, 0, False)]


def _tile(rng, batch, tq, cols, dtype, alibi=True):
    scores = (rng.standard_normal((batch * tq, cols)) * 3).astype(dtype)
    slopes = (rng.random(batch) if alibi else np.zeros(batch)).astype(dtype)
    return scores, slopes


def _forward(scores, slopes, scale, row0, causal):
    p = scores.copy()
    lse = A.attention_softmax(p, backend.get_array_module(p).empty(p.shape[0], p.dtype), slopes,
                              scale, row0, causal)
    return p, lse


def _backward(rng, scores, slopes, scale, row0, causal, lse, D=3):
    dtype = scores.dtype
    dp = rng.standard_normal(scores.shape).astype(dtype)
    g = rng.standard_normal((scores.shape[0], D)).astype(dtype)
    out = rng.standard_normal((scores.shape[0], D)).astype(dtype)
    p, ds = scores.copy(), dp.copy()
    A.attention_softmax_grad(p, ds, lse, g, out, slopes, scale, row0, causal)
    want = A.attention_softmax_grad_reference(scores, dp, lse, g, out, slopes, scale, row0, causal)
    return (p, ds), want


@pytest.mark.parametrize("dtype,tol", [(np.float32, 2e-6), (np.float64, 1e-13)])
@pytest.mark.parametrize("batch,tq,cols,row0,causal", SHAPES)
def test_cpu_twins_match_the_reference(batch, tq, cols, row0, causal, dtype, tol):
    rng = np.random.default_rng(cols * 7 + tq)
    scores, slopes = _tile(rng, batch, tq, cols, dtype)
    p, lse = _forward(scores, slopes, 0.7, row0, causal)
    want_p, want_lse = A.attention_softmax_reference(scores, slopes, 0.7, row0, causal)
    assert p.dtype == lse.dtype == dtype
    np.testing.assert_allclose(p, want_p, rtol=tol, atol=tol)
    np.testing.assert_allclose(lse, want_lse, rtol=tol, atol=tol)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=10 * tol)
    (p2, ds), (want_p2, want_ds) = _backward(rng, scores, slopes, 0.7, row0, causal, lse)
    np.testing.assert_allclose(p2, p, rtol=tol, atol=tol)  # backward's p is forward's p
    np.testing.assert_allclose(ds, want_ds, rtol=10 * tol, atol=10 * tol)


def test_mask_and_bias_by_hand():
    """Two queries at positions 1 and 2 over three keys, one head with slope 1: the first row
    sees keys 0, 1 with bias -1, 0; the second sees all three with bias -2, -1, 0."""
    scores = np.zeros((2, 3), np.float64)
    p, lse = _forward(scores, np.ones(1), 1.0, 1, True)
    e = np.exp([-1.0, 0.0])
    np.testing.assert_allclose(p[0], [*(e / e.sum()), 0.0])
    e = np.exp([-2.0, -1.0, 0.0])
    np.testing.assert_allclose(p[1], e / e.sum())
    np.testing.assert_allclose(lse, [np.log(np.exp(-1) + 1), np.log(np.exp(-2) + np.exp(-1) + 1)])


def test_large_scores_do_not_overflow():
    scores = np.array([[1e4, 0.0, -1e4]], np.float32)
    p, lse = _forward(scores, np.zeros(1, np.float32), 1.0, 2, True)
    np.testing.assert_array_equal(p, [[1.0, 0.0, 0.0]])
    np.testing.assert_allclose(lse, [1e4])


@pytest.mark.parametrize("call,error,match", [
    (lambda s, l, sl: A.attention_softmax(s.astype(np.int32), l, sl, 1.0, 0, True), TypeError,
     r"attention_softmax: scores has dtype int32, expected float32 or float64"),
    (lambda s, l, sl: A.attention_softmax(s, l, sl.astype(np.float64), 1.0, 0, True), TypeError,
     r"attention_softmax: slopes has dtype float64, expected float32"),
    (lambda s, l, sl: A.attention_softmax(s, l, sl[:1].repeat(4), 1.0, 0, True), ValueError,
     r"attention_softmax: scores has 6 rows, which is not a whole number of rows for each of "
     r"the 4 slopes"),
    (lambda s, l, sl: A.attention_softmax(s[:, ::2], l, sl, 1.0, 0, True), ValueError,
     r"attention_softmax: scores is not C-contiguous"),
    (lambda s, l, sl: A.attention_softmax(s, l[:5], sl, 1.0, 0, True), ValueError,
     r"attention_softmax: lse has shape \(5,\), expected \(6,\)"),
    (lambda s, l, sl: A.attention_softmax(s, l, sl, 1.0, -1, True), ValueError,
     r"attention_softmax: row0 = -1 is out of range"),
    (lambda s, l, sl: A.attention_softmax(s, s[0], sl, 1.0, 0, True), ValueError,
     r"attention_softmax: lse has shape \(4,\), expected \(6,\)"),
    (lambda s, l, sl: A.attention_softmax_grad(s, s.copy(), l, s[:, :2].copy(), s[:, :3].copy(),
                                               sl, 1.0, 0, True), ValueError,
     r"attention_softmax_grad: out has shape \(6, 3\), expected \(6, 2\)"),
    (lambda s, l, sl: A.attention_softmax_grad(s, s, l, s, s, sl, 1.0, 0, True), ValueError,
     r"attention_softmax_grad: scores and dp share memory"),
    (lambda s, l, sl: A.attention_softmax_grad(s, s.copy(), l, s[:3].copy(), s[:3].copy(), sl,
                                               1.0, 0, True), ValueError,
     r"attention_softmax_grad: g has shape \(3, 4\), expected \(6, D\)"),
])
def test_bad_input_is_named_and_nothing_is_written(call, error, match):
    scores = np.arange(24, dtype=np.float32).reshape(6, 4)
    lse, slopes = np.full(6, 7.0, np.float32), np.zeros(2, np.float32)
    before = scores.copy(), lse.copy()
    with pytest.raises(error, match=match):
        call(scores, lse, slopes)
    np.testing.assert_array_equal(scores, before[0])
    np.testing.assert_array_equal(lse, before[1])


@pytest.mark.cudasim
@pytest.mark.parametrize("batch,tq,cols,row0,causal", [(2, 3, 5, 2, True), (1, 2, 130, 0, False),
                                                       (1, 2, 131, 129, True)])
def test_sim_kernels_match_the_cpu_twins(batch, tq, cols, row0, causal):
    rng = np.random.default_rng(cols)
    scores, slopes = _tile(rng, batch, tq, cols, np.float32)
    args = (np.int64(tq), 0.7, np.int64(row0), np.int64(causal))
    p_cpu, lse_cpu = scores.copy(), np.empty(batch * tq, np.float32)
    A._softmax_cpu(p_cpu, lse_cpu, slopes, *args)
    p, lse = _forward(scores, slopes, 0.7, row0, causal)   # the wrapper runs the simulator
    np.testing.assert_allclose(p, p_cpu, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(lse, lse_cpu, rtol=1e-6)
    (p2, ds), (want_p, want_ds) = _backward(rng, scores, slopes, 0.7, row0, causal, lse)
    np.testing.assert_allclose(p2, want_p, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ds, want_ds, rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("batch,tq,cols,row0,causal", SHAPES + [(40, 64, 512, 0, True)])
def test_cuda_kernels_match_the_cpu_twins(batch, tq, cols, row0, causal, dtype):
    cupy = backend.cupy
    rng = np.random.default_rng(cols + tq)
    scores, slopes = _tile(rng, batch, tq, cols, dtype)
    p, lse = _forward(scores, slopes, 0.7, row0, causal)
    p_gpu, lse_gpu = _forward(cupy.asarray(scores), cupy.asarray(slopes), 0.7, row0, causal)
    tol = 1e-6 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(p_gpu.get(), p, rtol=tol, atol=tol)
    np.testing.assert_allclose(lse_gpu.get(), lse, rtol=tol, atol=tol)
    dp = rng.standard_normal(scores.shape).astype(dtype)
    g, out = (rng.standard_normal((scores.shape[0], 5)).astype(dtype) for _ in range(2))
    host = [scores.copy(), dp.copy()]
    A.attention_softmax_grad(*host, lse, g, out, slopes, 0.7, row0, causal)
    dev = [cupy.asarray(scores), cupy.asarray(dp)]
    A.attention_softmax_grad(*dev, cupy.asarray(lse), cupy.asarray(g), cupy.asarray(out),
                             cupy.asarray(slopes), 0.7, row0, causal)
    for got, want in zip(dev, host):
        np.testing.assert_allclose(got.get(), want, rtol=10 * tol, atol=10 * tol)
