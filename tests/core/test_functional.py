"""Every primitive: float64 central-difference gradients, forward against NumPy, bad input.

The case table drives three checks per primitive: `check_backward` on contiguous, transposed
and strided inputs; the forward result against a plain NumPy reference; and float32 staying
float32 through forward and backward. Each runs on CuPy too under `pytest -m cuda`.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest

import tritnet as tn
from tritnet import backend
from tritnet import functional as F
from tritnet.autograd import Function, Tensor
from tritnet.gradcheck import check_backward

LAYOUTS = ["contiguous", "transposed", "strided"]


@dataclass
class Case:
    id: str
    fn: Callable          # Tensors -> Tensor
    shapes: list          # one shape per input
    ref: Callable         # NumPy arrays -> NumPy array
    domain: str = "any"   # "positive" (log, sqrt, div) | "nonzero" (relu: away from the kink)


def make_input(rng, shape, device, layout, domain, dtype=np.float64):
    """A tensor of `shape` whose array is a contiguous array, or a transposed or strided view.

    The view is taken on the device so that CuPy inputs are non-contiguous too.
    """
    shape = tuple(shape)
    if layout == "transposed" and len(shape) >= 2:
        base, view = shape[::-1], lambda a: a.T
    elif layout != "contiguous" and len(shape) >= 1:
        base, view = shape[:-1] + (2 * shape[-1],), lambda a: a[..., ::2]
    else:
        base, view = shape, lambda a: a
    values = rng.standard_normal(base)
    if domain == "positive":
        values = np.abs(values) + 0.5
    elif domain == "nonzero":
        values = np.sign(values) * (np.abs(values) + 0.1)
    array = view(backend.to_device(values.astype(dtype), device))
    assert array.shape == shape
    return Tensor(array, requires_grad=True)


def softmax_ref(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def cross_entropy_ref(logits, targets, reduction="mean", ignore_index=-100):
    picked = np.take_along_axis(np.log(softmax_ref(logits)), np.maximum(targets, 0)[..., None],
                                axis=-1)[..., 0]
    losses = np.where(targets != ignore_index, -picked, 0.0)
    if reduction == "none":
        return losses
    return losses.sum() / (1 if reduction == "sum" else max((targets != ignore_index).sum(), 1))


def attention_ref(q, k, v, causal=True, scale=None, slopes=None):
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = q @ np.swapaxes(k, -1, -2) * scale
    Tq, Tk = s.shape[-2:]
    if slopes is not None:
        distance = np.abs(np.arange(Tq)[:, None] + Tk - Tq - np.arange(Tk)[None, :])
        s = s - np.asarray(slopes)[..., None, None] * distance
    if causal:
        s = np.where(np.arange(Tk)[None, :] <= np.arange(Tq)[:, None] + Tk - Tq, s, -np.inf)
    return softmax_ref(s) @ v


_rng = np.random.default_rng(1234)  # fixed non-differentiable arguments (masks, targets)
MASK_34 = _rng.random((3, 4)) > 0.5
COND_31 = _rng.random((3, 1)) > 0.5
TARGETS_5 = np.array([0, 6, -100, 3, 3])
TARGETS_23 = _rng.integers(0, 4, (2, 3))
TARGETS_6 = np.array([2, 0, 1, 1, -100, 2])
sdpa = F.scaled_dot_product_attention

CASES = [
    # binary ops, broadcasting and scalars on either side
    Case("add", lambda a, b: a + b, [(3, 4), (3, 4)], np.add),
    Case("add-broadcast", lambda a, b: a + b, [(2, 1, 4), (3, 1)], np.add),
    Case("add-scalar", lambda a: a + 2.5, [(3, 4)], lambda a: a + 2.5),
    Case("radd-numpy-scalar", lambda a: np.float64(2.5) + a, [(3, 4)], lambda a: a + 2.5),
    Case("sub-broadcast", lambda a, b: a - b, [(3, 4), (4,)], np.subtract),
    Case("rsub-scalar", lambda a: 1.0 - a, [(3, 4)], lambda a: 1.0 - a),
    Case("mul-broadcast", lambda a, b: a * b, [(2, 3, 4), (1, 4)], np.multiply),
    Case("rmul-scalar", lambda a: 3 * a, [(4,)], lambda a: 3 * a),
    Case("div-broadcast", lambda a, b: a / b, [(3, 4), (3, 1)], np.divide, "positive"),
    Case("rdiv-scalar", lambda a: 2.0 / a, [(3, 4)], lambda a: 2.0 / a, "positive"),
    Case("pow-int", lambda a: a ** 3, [(3, 4)], lambda a: a ** 3),
    Case("pow-half", lambda a: F.pow(a, 0.5), [(3, 4)], np.sqrt, "positive"),
    Case("pow-tensor", lambda a, b: a ** b, [(3, 4), (4,)], np.power, "positive"),
    # unary
    Case("neg", lambda a: -a, [(3, 4)], np.negative),
    Case("exp", F.exp, [(3, 4)], np.exp),
    Case("log", F.log, [(3, 4)], np.log, "positive"),
    Case("sqrt", F.sqrt, [(2, 3, 4)], np.sqrt, "positive"),
    Case("tanh", F.tanh, [(3, 4)], np.tanh),
    Case("sigmoid", F.sigmoid, [(3, 4)], lambda a: 1 / (1 + np.exp(-a))),
    Case("relu", F.relu, [(3, 4)], lambda a: np.maximum(a, 0), "nonzero"),
    Case("gelu", F.gelu, [(3, 4)],
         lambda a: 0.5 * a * (1 + np.tanh(np.sqrt(2 / np.pi) * (a + 0.044715 * a ** 3)))),
    Case("silu", F.silu, [(3, 4)], lambda a: a / (1 + np.exp(-a))),
    # reductions
    Case("sum-all", lambda a: a.sum(), [(2, 3, 4)], np.sum),
    Case("sum-axis0", lambda a: a.sum(0), [(2, 3, 4)], lambda a: a.sum(0)),
    Case("sum-axes-keepdims", lambda a: a.sum((0, -1), keepdims=True), [(2, 3, 4)],
         lambda a: a.sum((0, 2), keepdims=True)),
    Case("mean-all", lambda a: a.mean(), [(2, 3, 4)], np.mean),
    Case("mean-axis", lambda a: a.mean(-1), [(2, 3, 4)], lambda a: a.mean(-1)),
    Case("mean-axes-keepdims", lambda a: a.mean((0, 1), keepdims=True), [(2, 3, 4)],
         lambda a: a.mean((0, 1), keepdims=True)),
    Case("max-all", lambda a: a.max(), [(3, 4)], np.max),
    Case("max-axis", lambda a: a.max(1), [(2, 3, 4)], lambda a: a.max(1)),
    Case("max-axes-keepdims", lambda a: a.max((0, 2), keepdims=True), [(2, 3, 4)],
         lambda a: a.max((0, 2), keepdims=True)),
    # shapes
    Case("reshape", lambda a: a.reshape(6, 4), [(2, 3, 4)], lambda a: a.reshape(6, 4)),
    Case("reshape-infer", lambda a: F.reshape(a, (4, -1, 2)), [(2, 3, 4)],
         lambda a: a.reshape(4, -1, 2)),
    Case("transpose-reverse", lambda a: a.transpose(), [(2, 3, 4)], lambda a: a.transpose()),
    Case("permute", lambda a: a.permute(1, 0, 2), [(2, 3, 4)], lambda a: a.transpose(1, 0, 2)),
    Case("T", lambda a: a.T, [(3, 4)], lambda a: a.T),
    # indexing
    Case("getitem-int", lambda a: a[1], [(3, 4)], lambda a: a[1]),
    Case("getitem-slices", lambda a: a[:, 1:3], [(3, 4)], lambda a: a[:, 1:3]),
    Case("getitem-negative-step", lambda a: a[::-1, ::2], [(3, 4)], lambda a: a[::-1, ::2]),
    Case("getitem-gather-repeats", lambda a: a[np.array([0, 2, 0, 0])], [(3, 4)],
         lambda a: a[[0, 2, 0, 0]]),
    Case("getitem-gather-list-axis1", lambda a: a[:, [1, 1, 3]], [(3, 4)], lambda a: a[:, [1, 1, 3]]),
    Case("getitem-pairs", lambda a: a[np.array([0, 1, 1]), np.array([2, 2, -1])], [(3, 4)],
         lambda a: a[[0, 1, 1], [2, 2, -1]]),
    Case("getitem-mask", lambda a: a[MASK_34], [(3, 4)], lambda a: a[MASK_34]),
    Case("getitem-newaxis-ellipsis", lambda a: a[None, ..., 1], [(2, 3, 4)],
         lambda a: a[None, ..., 1]),
    Case("take-rows", lambda a: F.take(a, [2, 0, 2]), [(3, 4)], lambda a: a[[2, 0, 2]]),
    Case("take-axis1", lambda a: F.take(a, np.array([3, 3, 0]), axis=1), [(3, 4)],
         lambda a: a[:, [3, 3, 0]]),
    # joining
    Case("concat-axis0", lambda a, b: F.concat([a, b]), [(2, 3), (4, 3)],
         lambda a, b: np.concatenate([a, b])),
    Case("concat-last", lambda a, b, c: F.concat([a, b, c], axis=-1), [(2, 3), (2, 1), (2, 2)],
         lambda a, b, c: np.concatenate([a, b, c], -1)),
    Case("split-reordered", lambda a: F.concat(list(F.split(a, [1, 3]))[::-1]), [(5, 3)],
         lambda a: np.concatenate(np.split(a, [1, 3])[::-1])),
    Case("split-one-part-unused", lambda a: F.split(a, 2, axis=-1)[1] * 2.0, [(3, 4)],
         lambda a: np.split(a, 2, axis=-1)[1] * 2.0),
    Case("stack-axis0", lambda a, b: F.stack([a, b]), [(2, 3), (2, 3)], lambda a, b: np.stack([a, b])),
    Case("stack-last", lambda a, b, c: F.stack([a, b, c], axis=-1), [(2, 3)] * 3,
         lambda a, b, c: np.stack([a, b, c], -1)),
    Case("where-broadcast", lambda a, b: F.where(COND_31, a, b), [(3, 4), (4,)],
         lambda a, b: np.where(COND_31, a, b)),
    Case("where-scalar", lambda a: F.where(MASK_34, a, 0.0), [(3, 4)],
         lambda a: np.where(MASK_34, a, 0.0)),
    Case("cast-same-dtype", lambda a: F.cast(a, a.dtype), [(3, 4)], lambda a: a),
    # matmul
    Case("matmul", lambda a, b: a @ b, [(3, 4), (4, 5)], np.matmul),
    Case("matmul-batched-weight", lambda a, b: a @ b, [(2, 3, 4), (4, 5)], np.matmul),
    Case("matmul-broadcast-batch", lambda a, b: a @ b, [(2, 1, 3, 4), (3, 4, 2)], np.matmul),
    Case("matmul-matrix-batched", lambda a, b: a @ b, [(3, 4), (2, 4, 5)], np.matmul),
    Case("matmul-vector-matrix", lambda a, b: a @ b, [(4,), (2, 4, 5)], np.matmul),
    Case("matmul-matrix-vector", lambda a, b: a @ b, [(3, 4), (4,)], np.matmul),
    Case("matmul-dot", lambda a, b: F.matmul(a, b), [(4,), (4,)], np.matmul),
    # softmax family and cross-entropy
    Case("softmax", F.softmax, [(3, 5)], softmax_ref),
    Case("softmax-axis0", lambda a: F.softmax(a, axis=0), [(3, 5)], lambda a: softmax_ref(a, 0)),
    Case("log_softmax", F.log_softmax, [(2, 3, 5)], lambda a: np.log(softmax_ref(a))),
    Case("log_softmax-axis1", lambda a: F.log_softmax(a, 1), [(2, 3, 5)],
         lambda a: np.log(softmax_ref(a, 1))),
    Case("cross_entropy-mean-ignore", lambda a: F.cross_entropy(a, TARGETS_5), [(5, 7)],
         lambda a: cross_entropy_ref(a, TARGETS_5)),
    Case("cross_entropy-sum-3d", lambda a: F.cross_entropy(a, TARGETS_23, reduction="sum"),
         [(2, 3, 4)], lambda a: cross_entropy_ref(a, TARGETS_23, "sum")),
    Case("cross_entropy-none", lambda a: F.cross_entropy(a, TARGETS_6, reduction="none"),
         [(6, 3)], lambda a: cross_entropy_ref(a, TARGETS_6, "none")),
    # normalisation
    Case("rms_norm", F.rms_norm, [(4, 6)],
         lambda a: a / np.sqrt((a * a).mean(-1, keepdims=True) + 1e-6)),
    Case("rms_norm-3d-eps", lambda a: F.rms_norm(a, eps=0.1), [(2, 3, 5)],
         lambda a: a / np.sqrt((a * a).mean(-1, keepdims=True) + 0.1)),
    # attention (small block sizes force several online-softmax blocks)
    Case("attention-causal", lambda q, k, v: sdpa(q, k, v, block_size=2), [(5, 3)] * 3,
         attention_ref),
    Case("attention-batched-causal", lambda q, k, v: sdpa(q, k, v, block_size=3),
         [(2, 2, 7, 4), (2, 2, 7, 4), (2, 2, 7, 3)], attention_ref),
    Case("attention-full", lambda q, k, v: sdpa(q, k, v, causal=False, block_size=3),
         [(2, 6, 4), (2, 7, 4), (2, 7, 5)], lambda q, k, v: attention_ref(q, k, v, False)),
    Case("attention-causal-fewer-queries", lambda q, k, v: sdpa(q, k, v, block_size=2),
         [(2, 3, 4), (2, 7, 4), (2, 7, 4)], attention_ref),
    Case("attention-scale-one-block", lambda q, k, v: sdpa(q, k, v, scale=0.3),
         [(2, 6, 4)] * 3, lambda q, k, v: attention_ref(q, k, v, scale=0.3)),
    Case("attention-alibi-causal",
         lambda q, k, v: sdpa(q, k, v, block_size=3, alibi_slopes=F.alibi_slopes(2)),
         [(2, 2, 7, 4)] * 3, lambda q, k, v: attention_ref(q, k, v, slopes=F.alibi_slopes(2))),
    Case("attention-alibi-full-fewer-queries",
         lambda q, k, v: sdpa(q, k, v, causal=False, block_size=2, alibi_slopes=[0.5, 0.25]),
         [(2, 3, 4), (2, 6, 4), (2, 6, 4)],
         lambda q, k, v: attention_ref(q, k, v, False, slopes=[0.5, 0.25])),
    Case("attention-full-more-queries",
         lambda q, k, v: sdpa(q, k, v, causal=False, block_size=2),
         [(2, 7, 4), (2, 3, 4), (2, 3, 5)], lambda q, k, v: attention_ref(q, k, v, False)),
]
CASE_IDS = [c.id for c in CASES]


def _inputs(case, device, layout, dtype=np.float64):
    rng = np.random.default_rng(zlib.crc32(case.id.encode()))
    return [make_input(rng, s, device, layout, case.domain, dtype) for s in case.shapes]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_gradient(case, layout, device):
    check_backward(case.fn, _inputs(case, device, layout))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_forward_matches_numpy(case, layout, device):
    inputs = _inputs(case, device, layout)
    out = case.fn(*inputs)
    expected = case.ref(*(x.numpy() for x in inputs))
    assert out.device == device
    assert tuple(out.shape) == np.shape(expected)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_float32_stays_float32(case, device):
    inputs = _inputs(case, device, "contiguous", np.float32)
    out = case.fn(*inputs)
    assert out.dtype == np.float32
    out.backward(backend.to_device(np.ones(out.shape, np.float32), device))
    assert all(x.grad.dtype == np.float32 and x.grad.shape == x.shape for x in inputs)


# --- specific behaviour --------------------------------------------------------------------

def test_max_splits_gradient_among_ties():
    x = tn.tensor(np.array([[1.0, 3.0, 3.0], [2.0, 2.0, 2.0]]), requires_grad=True)
    x.max(axis=1).sum().backward()
    np.testing.assert_allclose(x.grad, [[0, 0.5, 0.5], [1 / 3, 1 / 3, 1 / 3]])


def test_gather_repeated_rows_sum_their_gradients(device):
    x = Tensor(backend.to_device(np.zeros((3, 2)), device), requires_grad=True)
    idx = Tensor(backend.to_device(np.array([2, 0, 2, 2]), device))
    F.take(x, idx).sum().backward()
    np.testing.assert_array_equal(backend.to_numpy(x.grad), [[1, 1], [0, 0], [3, 3]])


def test_take_without_the_range_check_skips_it_and_gives_the_same(device, monkeypatch):
    x = Tensor(backend.to_device(np.arange(6.0).reshape(3, 2), device), requires_grad=True)
    idx = backend.to_device(np.array([2, 0, 2]), device)
    checked = F.take(x, idx).numpy()
    calls = []
    index = F._index
    monkeypatch.setattr(F, "_index", lambda *a: calls.append(a) or index(*a))
    trusted = F.take(x, idx, check=False)
    assert calls == []   # no range check, so no host sync on the GPU
    np.testing.assert_array_equal(trusted.numpy(), checked)
    trusted.sum().backward()
    np.testing.assert_array_equal(backend.to_numpy(x.grad), [[1, 1], [0, 0], [2, 2]])
    with pytest.raises(IndexError, match=r"take: index 3 is out of range for axis 0 of size 3"):
        F.take(x, backend.to_device(np.array([3]), device))


def test_cross_entropy_is_stable_and_all_ignored_gives_zero():
    logits = tn.tensor(np.array([[1000.0, 0.0, -1000.0]], np.float32), requires_grad=True)
    loss = F.cross_entropy(logits, np.array([1]))
    assert loss.dtype == np.float32 and np.isclose(loss.item(), 1000.0)
    loss.backward()
    np.testing.assert_allclose(logits.grad, [[1, -1, 0]], atol=1e-6)
    logits.grad = None
    loss = F.cross_entropy(logits, np.array([-100]))
    loss.backward()
    assert loss.item() == 0.0 and not logits.grad.any()


def test_softmax_is_stable_for_large_logits():
    x = tn.tensor(np.array([1e4, 0.0, -1e4], np.float32))
    np.testing.assert_allclose(F.softmax(x).numpy(), [1, 0, 0])
    np.testing.assert_allclose(F.log_softmax(x).numpy(), [0, -1e4, -2e4])


def test_attention_keeps_no_t_by_t_tensor_for_backward():
    T, D, rng = 64, 4, np.random.default_rng(0)
    q, k, v = (tn.tensor(rng.standard_normal((2, T, D)), requires_grad=True) for _ in range(3))
    out = F.scaled_dot_product_attention(q, k, v, block_size=16)
    saved = [a for a in vars(out._node).values() if isinstance(a, np.ndarray)]
    assert saved and all(a.shape[-2:] != (T, T) for a in saved)
    # q, k, v, out (each (2, T, D)), the per-row logsumexp (2, T) and a slope per batch entry
    # (2,): nothing of size T x T.
    assert sum(a.nbytes for a in saved) == 4 * q.data.nbytes + q.data.nbytes // D + 2 * 8


def test_attention_block_size_does_not_change_the_result():
    rng = np.random.default_rng(1)
    q, k, v = (tn.tensor(rng.standard_normal((3, 10, 4))) for _ in range(3))
    one = F.scaled_dot_product_attention(q, k, v, block_size=1000).numpy()
    for block in (1, 3, 4, 10):
        np.testing.assert_allclose(F.scaled_dot_product_attention(q, k, v, block_size=block).numpy(),
                                   one, rtol=1e-12, atol=1e-12)


def test_pow_gradients_at_zero(device):
    """x ** e at x = 0: d/dx is 0 for e = 0 (x**0 is constant) and e = 2; d/de is 0 for
    e >= 0 (the convention of other frameworks' autograd), never NaN or -inf."""
    x = tn.tensor(backend.to_device(np.array([0.0, 0.0, 2.0]), device), requires_grad=True)
    (x ** 0).sum().backward()
    np.testing.assert_array_equal(backend.to_numpy(x.grad), [0.0, 0.0, 0.0])
    x.grad = None
    (x ** 2).sum().backward()
    np.testing.assert_array_equal(backend.to_numpy(x.grad), [0.0, 0.0, 4.0])
    e = tn.tensor(backend.to_device(np.array([2.0, 0.0, 3.0]), device), requires_grad=True)
    x.grad = None
    (x ** e).sum().backward()
    np.testing.assert_array_equal(backend.to_numpy(x.grad), [0.0, 0.0, 12.0])
    np.testing.assert_allclose(backend.to_numpy(e.grad), [0.0, 0.0, 8 * math.log(2)])


def test_cast_to_float32_and_to_integer():
    x = tn.tensor(np.array([1.5, -2.25]), requires_grad=True)
    y = F.cast(x, np.float32)
    assert y.dtype == np.float32 and y.requires_grad
    y.sum().backward()
    assert x.grad.dtype == np.float64
    i = x.astype(np.int32)
    assert i.dtype == np.int32 and not i.requires_grad


def test_integer_mask_times_float_keeps_the_float_dtype():
    mask = tn.tensor(np.array([1, 0, 1]))
    x = tn.tensor(np.ones(3, np.float32), requires_grad=True)
    assert (mask * x).dtype == np.float32 and (mask * 0.5).dtype == np.float32


def test_gradcheck_reports_a_wrong_backward():
    class WrongSquare(Function):
        def forward(self, x):
            self.x = x
            return x * x

        def backward(self, g):
            return g * self.x  # should be 2 x

    x = tn.tensor(np.array([[1.0, 2.0], [3.0, 4.0]]), requires_grad=True)
    with pytest.raises(AssertionError, match=r"input 0 of shape \(2, 2\).*max abs error"):
        check_backward(WrongSquare.apply, [x])
    with pytest.raises(TypeError, match="float64"):
        check_backward(F.exp, [tn.tensor(np.ones(2, np.float32), requires_grad=True)])


# --- bad input: each message names the op, the shapes/dtypes and what is expected ----------

def t(*shape, dtype=np.float32):
    return tn.tensor(np.ones(shape, dtype))


BAD_INPUT = [
    (lambda: t(3, 4) @ t(5, 6), ValueError, r"matmul: shapes \(3, 4\) and \(5, 6\).*\(4\).*\(5\)"),
    (lambda: t(2, 3, 4) @ t(3, 4, 5), ValueError, r"matmul \(batch dimensions\).*\(2,\) and \(3,\)"),
    (lambda: F.matmul(t(3), 2.0), ValueError, r"matmul: .*0-d"),
    (lambda: t(3, 4) + t(5), ValueError, r"add: shapes \(3, 4\) and \(5,\) do not broadcast"),
    (lambda: t(3) * t(3, dtype=np.float64), TypeError, r"mul: .*float32.*float64.*one dtype"),
    (lambda: t(3) + [1, 2, 3], TypeError, r"add: expected Tensors or .*scalars, got list"),
    (lambda: F.where(np.ones((3, 4)), t(3, 4), t(4)), TypeError, r"where: cond has dtype float64.*bool"),
    (lambda: F.where(np.ones((2, 4), bool), t(3, 4), t(4)), ValueError,
     r"where: shapes \(2, 4\) and \(3, 4\) and \(4,\) do not broadcast"),
    (lambda: F.cross_entropy(t(4, 5), np.zeros(4)), TypeError,
     r"cross_entropy: targets have dtype float64 .*\(4,\).*integer class indices in \[0, 5\)"),
    (lambda: F.cross_entropy(t(4, 5), np.array([0, 1, 5, 2])), ValueError,
     r"cross_entropy: target 5 is out of range for 5 classes .*\(4, 5\).*\[0, 5\).*ignore_index=-100"),
    (lambda: F.cross_entropy(t(4, 5), np.array([0, -1, 2, 2])), ValueError, r"cross_entropy: target -1"),
    (lambda: F.cross_entropy(t(4, 5), np.zeros(3, int)), ValueError,
     r"cross_entropy: targets have shape \(3,\) but logits \(4, 5\); expected .*\(4,\)"),
    (lambda: F.cross_entropy(t(4, 5, dtype=np.int64), np.zeros(4, int)), TypeError,
     r"cross_entropy: logits has dtype int64 \(shape \(4, 5\)\); expected a floating"),
    (lambda: F.cross_entropy(t(4, 5), np.zeros(4, int), reduction="avg"), ValueError,
     r"cross_entropy: reduction 'avg'"),
    (lambda: t(2, 3).reshape(4, 2), ValueError, r"reshape: cannot reshape .*\(2, 3\) \(6 elements\) into \(4, 2\)"),
    (lambda: t(2, 3).transpose(0, 0), ValueError, r"transpose: axis \(0, 0\) names an axis twice"),
    (lambda: t(2, 3).transpose(0, 1, 2), ValueError, r"transpose: axes \(0, 1, 2\) do not match shape \(2, 3\)"),
    (lambda: t(2, 3).sum(axis=2), ValueError, r"sum: axis 2 is out of range for shape \(2, 3\)"),
    (lambda: t(2, 0).max(axis=1), ValueError, r"max: cannot reduce an empty axis \(shape \(2, 0\)"),
    (lambda: t(3, 2)[np.array([0, 3])], IndexError,
     r"getitem: index 3 is out of range for axis 0 of size 3 \(tensor shape \(3, 2\)\)"),
    (lambda: t(3, 2)[:, 2], IndexError, r"getitem: index 2 is out of range for axis 1 of size 2"),
    (lambda: t(3, 2)[np.array([0.0])], IndexError, r"getitem: index array has dtype float64; expected integer"),
    (lambda: t(3, 2)[0, 0, 0], IndexError, r"getitem: too many indices \(3\) for a tensor of shape \(3, 2\)"),
    (lambda: t(3, 2)[np.ones(2, bool)], IndexError, r"getitem: boolean mask of shape \(2,\)"),
    (lambda: F.take(t(3, 2), np.array([1, -4])), IndexError, r"take: index -4 is out of range for axis 0 of size 3"),
    (lambda: F.take(t(3, 2), np.array([True])), TypeError, r"take: indices have dtype bool; expected an integer"),
    (lambda: F.concat([t(2, 3), t(2, 4)]), ValueError, r"concat: shapes \[\(2, 3\), \(2, 4\)\] differ outside axis 0"),
    (lambda: F.concat([t(2, 3), t(2, 3, dtype=np.float64)]), ValueError, r"concat: tensor 1 is \(2, 3\) float64"),
    (lambda: F.concat([]), TypeError, r"concat: expected a non-empty sequence of Tensors"),
    (lambda: F.stack([t(2, 3), t(3, 2)]), ValueError, r"stack: shapes \[\(2, 3\), \(3, 2\)\] differ"),
    (lambda: F.split(t(5, 2), 2), ValueError,
     r"split: 5 entries along axis 0 \(shape \(5, 2\)\) do not split into 2 equal parts"),
    (lambda: F.split(t(5, 2), [3, 1]), ValueError, r"split: bounds \[3, 1\] must rise within \[0, 5\]"),
    (lambda: F.split(t(5, 2), 2, axis=2), ValueError, r"split: axis 2 is out of range for shape \(5, 2\)"),
    (lambda: F.rms_norm(t(3, dtype=np.int32)), TypeError, r"rms_norm: input has dtype int32"),
    (lambda: F.softmax(t(3, 4), axis=2), ValueError, r"softmax: axis 2 is out of range for shape \(3, 4\)"),
    (lambda: sdpa(t(2, 5, 4), t(2, 5, 3), t(2, 5, 4)), ValueError,
     r"scaled_dot_product_attention: shapes q \(2, 5, 4\), k \(2, 5, 3\), v \(2, 5, 4\) do not fit"),
    (lambda: sdpa(t(2, 5, 4), t(3, 5, 4), t(3, 5, 4)), ValueError,
     r"scaled_dot_product_attention: batch dimensions differ"),
    (lambda: sdpa(t(6, 4), t(5, 4), t(5, 4)), ValueError,
     r"scaled_dot_product_attention: causal attention with more queries than keys \(q \(6, 4\)"),
    (lambda: sdpa(t(2, 6, 4), t(2, 5, 4), t(2, 5, 4), causal=False, alibi_slopes=[1.0, 2.0]),
     ValueError, r"scaled_dot_product_attention: ALiBi with more queries than keys \(q \(2, 6, "
                 r"4\).*expected Tq <= Tk"),
    (lambda: sdpa(t(5, 4), t(5, 4), t(5, 4, dtype=np.float64)), TypeError,
     r"scaled_dot_product_attention: dtypes differ \(q float32, k float32, v float64\)"),
    (lambda: sdpa(t(2, 5, 4), t(2, 5, 4), t(2, 5, 4), alibi_slopes=[1.0, 2.0, 3.0]), ValueError,
     r"scaled_dot_product_attention: alibi_slopes of shape \(3,\) do not broadcast to the "
     r"batch dimensions \(2,\)"),
    (lambda: sdpa(t(4), t(4), t(4)), ValueError, r"scaled_dot_product_attention: q has shape \(4,\); expected \(..., T, D\)"),
]


BAD_INPUT_IDS = [f"{message.split(':')[0].split()[0]}-{i}" for i, (_, _, message) in enumerate(BAD_INPUT)]


@pytest.mark.parametrize("call, error, message", BAD_INPUT, ids=BAD_INPUT_IDS)
def test_bad_input_is_rejected_with_a_clear_message(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_mixing_devices_names_the_op_shapes_and_devices(monkeypatch):
    # One GPU-less machine cannot hold a CuPy array, so fake one: tensors named "gpu" say cuda.
    monkeypatch.setattr(Tensor, "device", property(lambda self: "cuda" if self.name == "gpu" else "cpu"))
    a = tn.tensor(np.ones((3, 4), np.float32), requires_grad=True)
    b = tn.tensor(np.ones(4, np.float32))
    b.name = "gpu"
    with pytest.raises(TypeError, match=r"Add: inputs are on different devices \(\(3, 4\) float32 on "
                                        r"cpu, \(4,\) float32 on cuda\).*\.to\("):
        a + b
    targets = tn.tensor(np.zeros(3, np.int64))
    targets.name = "gpu"
    with pytest.raises(TypeError, match=r"cross_entropy: targets is a Tensor on cuda but the input "
                                        r"\(3, 4\) is on cpu"):
        F.cross_entropy(a, targets)


def test_matmul_precision_is_a_checked_process_setting():
    from tritnet.config import ConfigError, preset
    from tritnet.train import build
    assert backend.matmul_precision() == "fp32"
    with pytest.raises(ValueError, match="matmul precision 'bf16': expected one of fp32, tf32"):
        backend.set_matmul_precision("bf16")
    assert backend.matmul_precision() == "fp32"
    with pytest.raises(ConfigError, match="matmul_precision = 'fp16': expected 'fp32' or 'tf32'"):
        preset("tiny").override(matmul_precision="fp16")
    build(preset("tiny").override(d_model=32, n_heads=2, n_layers=1, shared_vq_size=64,
                                  kgvq_size=16))
    assert backend.matmul_precision() == "tf32"   # the presets' default, set by build()
    assert backend.set_matmul_precision("fp32") == "tf32"


@pytest.mark.cuda
def test_tf32_products_are_close_to_fp32_and_switch_back():
    import cupy
    rng = np.random.default_rng(0)
    a = cupy.asarray(rng.standard_normal((512, 768)).astype(np.float32))
    b = cupy.asarray(rng.standard_normal((768, 384)).astype(np.float32))
    exact = a.get().astype(np.float64) @ b.get().astype(np.float64)
    full = (a @ b).get()
    backend.set_matmul_precision("tf32")
    fast = (a @ b).get()
    backend.set_matmul_precision("fp32")
    again = (a @ b).get()
    np.testing.assert_array_equal(again, full)
    err_full, err_fast = np.abs(full - exact).max(), np.abs(fast - exact).max()
    # outputs have std ~28: fp32 errs ~1e-4, TF32 (2**-11 per input) ~0.1 at the worst entry
    assert err_full < 1e-3 < err_fast < 1.0, (err_full, err_fast)


@pytest.mark.cuda
@pytest.mark.parametrize("causal,slopes,block", [(True, None, None), (True, [0.5, 0.25], 3),
                                                 (False, [0.5, 0.25], None), (False, None, 2)])
def test_cuda_attention_matches_the_cpu(causal, slopes, block):
    """The same float32 attention, forward and backward, on CuPy (cuBLAS + the CUDA row
    kernels) and on NumPy (the CPU twins): equal within float32 rounding."""
    rng = np.random.default_rng(0)
    shapes = [(2, 2, 5, 4), (2, 2, 9, 4), (2, 2, 9, 3)]
    host = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    g = rng.standard_normal((2, 2, 5, 3)).astype(np.float32)
    results = []
    for device in ("cpu", "cuda"):
        q, k, v = (tn.tensor(a, requires_grad=True, device=device) for a in host)
        out = F.scaled_dot_product_attention(q, k, v, causal=causal, block_size=block,
                                             alibi_slopes=slopes)
        out.backward(backend.to_device(g, device))
        results.append([backend.to_numpy(a) for a in (out.data, q.grad, k.grad, v.grad)])
    for cpu, gpu in zip(*results):
        np.testing.assert_allclose(gpu, cpu, rtol=1e-5, atol=1e-5)


def test_attention_of_an_empty_batch_is_empty():
    q = tn.tensor(np.zeros((0, 2, 5, 4), np.float32), requires_grad=True)
    out = F.scaled_dot_product_attention(q, q, q, alibi_slopes=[0.5, 0.25])
    assert out.shape == (0, 2, 5, 4)
    out.sum().backward()
    assert q.grad.shape == (0, 2, 5, 4)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_concat_and_stack_of_many_arrays(device):
    """backend.concatenate / stack (F.concat, F.stack): NumPy's results for more than the 8
    arrays past which CuPy would copy an address table from the host (which a captured CUDA
    graph refuses), along any axis."""
    from tritnet import backend as B
    xp = B.cupy if device == "cuda" else np
    rng = np.random.default_rng(0)
    parts = [rng.standard_normal((3, n + 1, 2)).astype(np.float32) for n in range(11)]
    for axis in (1, -2):
        got = B.concatenate([xp.asarray(p) for p in parts], axis=axis)
        np.testing.assert_array_equal(B.to_numpy(got), np.concatenate(parts, axis=axis))
    same = [rng.standard_normal((4, 5)) for _ in range(12)]
    for axis in (0, 1, 2, -1):
        got = B.stack([xp.asarray(p) for p in same], axis=axis)
        np.testing.assert_array_equal(B.to_numpy(got), np.stack(same, axis=axis))
