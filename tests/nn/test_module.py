"""Module tree: registration by attribute, state_dict round trip, train/eval, bad loads."""

import numpy as np
import pytest

import tritnet
from tritnet.nn import Module, ModuleList, Parameter, Sequential


class Affine(Module):
    def __init__(self, n):
        super().__init__()
        self.w = Parameter(np.arange(n, dtype=np.float32))
        self.register_buffer("count", np.zeros(n, np.int16))
        self.note = "plain attribute"

    def forward(self, x):
        return x * self.w


class Net(Module):
    def __init__(self):
        super().__init__()
        self.a = Affine(3)
        self.blocks = ModuleList([Affine(3), Affine(3)])


def test_registration_and_walk():
    net = Net()
    assert [n for n, _ in net.named_modules()] == ["", "a", "blocks", "blocks.0", "blocks.1"]
    assert [n for n, _ in net.named_parameters()] == ["a.w", "blocks.0.w", "blocks.1.w"]
    assert [n for n, _ in net.named_buffers()] == ["a.count", "blocks.0.count", "blocks.1.count"]
    assert list(net.children())[0] is net.a
    assert net.a.note == "plain attribute" and "note" not in net.a.state_dict()


def test_buffer_reassignment_stays_registered():
    m = Affine(2)
    m.count = np.ones(2, np.int16)
    assert np.array_equal(m.state_dict()["count"], [1, 1])


def test_assigning_wrong_kind_to_parameter_is_refused():
    m = Affine(2)
    with pytest.raises(TypeError, match="Affine.w is a parameter"):
        m.w = np.zeros(2)


def test_state_dict_round_trip():
    src, dst = Net(), Net()
    src.a.w.data[:] = 7
    src.blocks[1].count[:] = 3
    dst.load_state_dict(src.state_dict())
    assert np.array_equal(dst.a.w.data, [7, 7, 7])
    assert np.array_equal(dst.blocks[1].count, [3, 3, 3])
    assert dst.a.w.data is not src.a.w.data  # copied, not aliased


def test_bad_load_names_problem_and_changes_nothing():
    net = Net()
    before = {k: v.copy() for k, v in net.state_dict().items()}
    bad = dict(net.state_dict())
    bad["a.w"] = np.zeros(4, np.float32)                   # wrong shape
    bad["blocks.0.count"] = np.zeros(3, np.float32)        # wrong dtype
    bad["blocks.1.w"] = np.full(3, 9, np.float32)           # fine, must not be applied either
    del bad["a.count"]
    bad["extra"] = np.zeros(1)
    with pytest.raises(ValueError) as e:
        net.load_state_dict(bad)
    msg = str(e.value)
    assert "a.w: shape (4,), expected (3,)" in msg
    assert "blocks.0.count: dtype float32, expected int16" in msg
    assert "missing keys: a.count" in msg and "unexpected keys: extra" in msg
    for k, v in net.state_dict().items():
        assert np.array_equal(v, before[k])


def test_train_eval_propagates():
    net = Net()
    net.eval()
    assert not any(m.training for m in net.modules())
    net.train()
    assert all(m.training for m in net.modules())


def test_sequential_and_parameters_get_grads():
    seq = Sequential([Affine(3), Affine(3)])
    x = tritnet.tensor(np.ones(3, np.float32))
    seq(x).sum().backward()
    assert all(p.grad is not None for p in seq.parameters())
    seq.zero_grad()
    assert all(p.grad is None for p in seq.parameters())
