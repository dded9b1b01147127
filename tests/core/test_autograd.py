"""The autograd core: the tape, backward, accumulation, hooks, memory release, the backend."""

import gc
import os
import subprocess
import sys
import weakref

import numpy as np
import pytest

import tritnet as tn
from tritnet import backend
from tritnet import functional as F
from tritnet.autograd import Function, Tensor


def leaf(values):
    return tn.tensor(np.asarray(values, np.float64), requires_grad=True)


def test_deep_chain_backpropagates_without_recursion():
    x = leaf(1.0)
    y = x
    for _ in range(20_000):
        y = y * 1.0001
    y.backward()
    np.testing.assert_allclose(x.grad, 1.0001 ** 20_000)


def test_deep_chain_can_be_dropped_without_backward():
    y = leaf(1.0)
    for _ in range(20_000):
        y = y + 1.0
    del y  # the tape is freed node by node (CPython's trashcan), not by deep recursion
    gc.collect()


def test_gradients_accumulate_across_uses_and_backward_calls():
    x = leaf([1.0, 2.0])
    (x * x + x).sum().backward()  # x used three times in one graph
    np.testing.assert_allclose(x.grad, 2 * x.data + 1)
    (x * 3.0).sum().backward()    # a second graph adds to .grad
    np.testing.assert_allclose(x.grad, 2 * x.data + 4)
    x.zero_grad()
    assert x.grad is None


def test_no_grad_records_nothing():
    x = leaf([1.0, 2.0])
    with tn.no_grad():
        y = (x * 2).exp()
    assert not y.requires_grad and y.is_leaf and tn.is_grad_enabled()
    with pytest.raises(RuntimeError, match="does not require grad"):
        y.sum().backward()


def test_detach_shares_data_and_cuts_the_tape():
    x = leaf([1.0, 2.0])
    y = x * 2
    d = y.detach()
    assert not d.requires_grad and d.is_leaf and np.shares_memory(d.data, y.data)
    (d * x).sum().backward()  # only the direct path through x counts
    np.testing.assert_allclose(x.grad, d.data)


def test_requires_grad_propagates():
    a = tn.tensor(np.ones(3))
    b = leaf(np.ones(3))
    assert (a + b).requires_grad and not (a + b).is_leaf
    assert not (a * a).requires_grad and (a * a).is_leaf
    assert not a.requires_grad and a.requires_grad_().requires_grad
    with pytest.raises(TypeError, match="only floating-point tensors can require grad, got int64"):
        tn.tensor(np.arange(3), requires_grad=True)


def test_leaf_hook_sees_the_total_and_can_replace_it():
    x = leaf([1.0, 2.0])
    seen = []
    x.register_hook(lambda g: seen.append(g.copy()))
    x.register_hook(lambda g: g * 10)
    (x * 2 + x * 3).sum().backward()
    np.testing.assert_allclose(seen[0], [5, 5])
    np.testing.assert_allclose(x.grad, [50, 50])


def test_non_leaf_hook_replaces_the_gradient_flowing_on():
    x = leaf([1.0, 2.0])
    h = x * 2
    h.register_hook(lambda g: g * 0.5)
    (h * 3).sum().backward()
    np.testing.assert_allclose(x.grad, [3.0, 3.0])  # 3 * 0.5 * 2
    with pytest.raises(RuntimeError, match="register_hook: tensor does not require grad"):
        tn.tensor(np.ones(2)).register_hook(print)


def test_retain_grad_keeps_a_non_leaf_gradient():
    x = leaf([1.0, 2.0])
    kept, dropped = x * 2, x * 4
    kept.retain_grad()
    (kept * 3 + dropped).sum().backward()
    np.testing.assert_allclose(kept.grad, [3, 3])
    assert dropped.grad is None


def test_intermediates_are_released_after_backward():
    x = leaf(np.arange(6.0).reshape(2, 3) / 10)

    def forward():
        h = x.exp()            # Exp saves its output array, h.data
        k = (h * h).tanh()     # Mul keeps h, Tanh saves its output
        refs = {"h": weakref.ref(h), "k": weakref.ref(k), "h.data": weakref.ref(h.data),
                "exp node": weakref.ref(h._node), "tanh node": weakref.ref(k._node),
                "tanh saved": weakref.ref(k._node.out)}
        return k.sum(), refs

    loss, refs = forward()
    gc.collect()
    assert all(r() is not None for r in refs.values())  # the tape holds them until backward
    loss.backward()
    gc.collect()
    assert [name for name, r in refs.items() if r() is not None] == []
    assert not hasattr(loss._node, "inputs")  # the root's node let go of its inputs
    assert x.grad is not None


def test_backward_twice_needs_retain_graph():
    x = leaf([1.0, 2.0])
    y = (x * x).sum()
    y.backward(retain_graph=True)
    y.backward()
    np.testing.assert_allclose(x.grad, 4 * x.data)
    with pytest.raises(RuntimeError, match="already freed by an earlier backward.*retain_graph=True"):
        y.backward()


def test_backward_on_non_scalar_needs_a_gradient():
    y = leaf(np.ones((2, 3))) * 2
    with pytest.raises(RuntimeError, match=r"non-scalar tensor of shape \(2, 3\) without a gradient"):
        y.backward()
    with pytest.raises(ValueError, match=r"backward: grad has shape \(3,\), expected \(2, 3\)"):
        y.backward(np.ones(3))
    y.backward(np.ones((2, 3)))


def test_multi_output_function_fills_unused_output_gradients_with_zeros():
    class Split(Function):
        def forward(self, x):
            return x[:1] * 2, x[1:] * 3

        def backward(self, g_first, g_rest):
            return np.concatenate([g_first * 2, g_rest * 3])

    x = leaf([1.0, 1.0, 1.0])
    first, _ = Split.apply(x)
    first.sum().backward()
    np.testing.assert_allclose(x.grad, [2, 0, 0])


def test_integer_output_beside_a_float_one_carries_no_gradient():
    class MaxWithIndex(Function):  # the shape of a nearest-code op: values and their indices
        def forward(self, x):
            self.x, self.index = x, x.argmax(-1)
            return x.max(-1), self.index

        def backward(self, g_values, g_index):
            grad = np.zeros_like(self.x)
            np.put_along_axis(grad, self.index[..., None], g_values[..., None], -1)
            return grad

    x = leaf([[1.0, 3.0, 2.0], [5.0, 4.0, 0.0]])
    values, index = MaxWithIndex.apply(x)
    assert values.requires_grad and not index.requires_grad and index.dtype.kind == "i"
    values.sum().backward()
    np.testing.assert_allclose(x.grad, [[0, 1, 0], [1, 0, 0]])


def test_function_inputs_must_be_tensors():
    with pytest.raises(TypeError, match="Exp: inputs must be Tensors, got ndarray"):
        F.Exp.apply(np.ones(2))


# --- backend selection ---------------------------------------------------------------------

def test_tritnet_device_cpu_works_on_any_machine():
    env = dict(os.environ, TRITNET_DEVICE="cpu")
    code = ("import numpy as np, tritnet as tn; from tritnet import backend;"
            "x = tn.tensor([1.0, 2.0], requires_grad=True); (x * x).sum().backward();"
            "print(backend.device(), type(x.grad).__module__, x.grad.tolist())")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["cpu", "numpy", "[2.0,", "4.0]"]


def test_cuda_without_a_gpu_is_a_one_line_error_that_says_what_to_do(monkeypatch):
    monkeypatch.setattr(backend, "gpu_usable", lambda: (False, "CuPy is not installed"))
    monkeypatch.setattr(backend, "_device", None)
    monkeypatch.setenv("TRITNET_DEVICE", "cuda")
    with pytest.raises(backend.DeviceError) as err:
        backend.device()
    message = str(err.value)
    assert "\n" not in message
    assert "'cuda'" in message and "no GPU is usable: CuPy is not installed" in message
    assert "TRITNET_DEVICE=cpu" in message
    with pytest.raises(backend.DeviceError, match="unknown device 'tpu'"):
        backend.set_device("tpu")


@pytest.mark.skipif(backend.gpu_usable()[0], reason="this machine has a usable GPU")
def test_cuda_without_a_gpu_fails_in_a_fresh_process():
    env = dict(os.environ, TRITNET_DEVICE="cuda")
    out = subprocess.run([sys.executable, "-c", "import tritnet; tritnet.tensor([1.0])"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("tritnet.backend.DeviceError: device 'cuda'") and "TRITNET_DEVICE=cpu" in last


# --- several roots, and recomputation -------------------------------------------------------

def test_backward_from_several_roots_sums_their_contributions():
    from tritnet.autograd import backward
    x = leaf([1.0, 2.0, 3.0])
    h = x * x                 # shared by both roots
    a, b = h.sum(), (h * 3.0).sum()
    backward([a, b], [np.array(2.0), np.array(1.0)])
    np.testing.assert_allclose(x.grad, (2.0 + 3.0) * 2 * np.array([1.0, 2.0, 3.0]))


def test_backward_from_roots_where_one_feeds_the_other():
    from tritnet.autograd import backward
    x = leaf([0.5, -1.0])
    inner = x.exp()
    outer = inner * 2.0
    backward([outer, inner], [np.ones(2), np.ones(2)])   # the root fed by the other one first
    np.testing.assert_allclose(x.grad, 3.0 * np.exp([0.5, -1.0]))


def _two_outputs(x, y):
    h = (x * y).tanh()
    return h * x, (h * h).sum()


def test_recompute_matches_central_differences():
    from tritnet.autograd import recompute
    from tritnet.gradcheck import check_backward
    rng = np.random.default_rng(0)
    x, y = leaf(rng.standard_normal((3, 4))), leaf(rng.standard_normal((3, 4)))

    def fn(x, y):
        out, total = recompute(_two_outputs, x, y)
        return out * 2.0 + total   # both outputs reach the checked scalar
    check_backward(fn, [x, y])


def test_recompute_gives_the_gradients_of_the_plain_function():
    from tritnet.autograd import recompute
    rng = np.random.default_rng(1)
    values = [rng.standard_normal((5, 3)), rng.standard_normal((5, 3))]
    grads = []
    for wrap in (lambda *t: _two_outputs(*t), lambda *t: recompute(_two_outputs, *t)):
        x, y = leaf(values[0]), leaf(values[1])
        out, total = wrap(x, y)
        (out.sum() + total * 0.5).backward()
        grads.append((x.grad, y.grad))
    for plain, again in zip(*grads):
        np.testing.assert_array_equal(plain, again)


def test_recompute_keeps_only_its_inputs_until_backward():
    from tritnet.autograd import recompute
    x = leaf(np.linspace(-1, 1, 8))
    seen = []

    def fn(x):
        h = x.exp()           # an intermediate the plain tape would keep
        seen.append(weakref.ref(h.data))
        return (h * x).sum()

    loss = recompute(fn, x)
    gc.collect()
    assert seen[0]() is None   # the first run's intermediates are gone already
    loss.backward()            # runs fn again, with a tape, then frees that tape too
    gc.collect()
    assert len(seen) == 2 and seen[1]() is None
    np.testing.assert_allclose(x.grad, np.exp(x.data) * (1 + x.data))


def test_recompute_outside_grad_mode_is_a_plain_call():
    from tritnet.autograd import recompute
    x = leaf([1.0, 2.0])
    with tn.no_grad():
        out = recompute(lambda t: t * 2.0, x)
    assert out._node is None and not out.requires_grad
    np.testing.assert_array_equal(out.data, [2.0, 4.0])


def test_once_per_recompute_runs_its_work_once_per_training_forward():
    from tritnet.autograd import once_per_recompute, recompute
    calls = []

    def search(x):   # stands for a code-book search: not differentiable, deterministic
        calls.append(1)
        return np.argmax(x.data, axis=-1)

    def fn(x):
        picks = once_per_recompute(lambda: search(x))
        return (x[np.arange(x.shape[0]), picks] * x.sum(axis=-1)).sum()

    values = np.random.default_rng(3).standard_normal((4, 5))
    x = leaf(values)
    recompute(fn, x).backward()
    assert len(calls) == 1                      # the backward re-run took the kept result
    plain = leaf(values)
    fn(plain).backward()                        # outside recomputation: a plain call
    assert len(calls) == 2
    np.testing.assert_array_equal(x.grad, plain.grad)
    twice = leaf(values)
    loss = recompute(fn, twice)
    loss.backward(retain_graph=True)
    loss.backward()                             # the second re-run replays the same result
    assert len(calls) == 3
    np.testing.assert_array_equal(twice.grad, 2 * plain.grad)


def test_once_per_recompute_names_a_function_that_changes_its_path():
    from tritnet.autograd import once_per_recompute, recompute
    runs = []

    def fn(x):
        runs.append(1)
        for _ in range(len(runs)):              # one kept result first, two in the re-run
            once_per_recompute(lambda: 0)
        return (x * x).sum()

    with pytest.raises(RuntimeError, match="more than the 1 results its first run kept"):
        recompute(fn, leaf([1.0, 2.0])).backward()

    def fewer(x):
        runs.append(1)
        if len(runs) == 3:                      # the first run of this function only
            once_per_recompute(lambda: 0)
        return (x * x).sum()

    with pytest.raises(RuntimeError, match="asked for 0 kept results, the first run kept 1"):
        recompute(fewer, leaf([1.0, 2.0])).backward()
