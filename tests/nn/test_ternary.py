"""TernaryLinear and TritFlip: integer-only state, exact forward, int8 gradient path, learning."""

import math
import time

import numpy as np
import pytest

import tritnet
import tritnet.functional as F
from tritnet import backend
from tritnet import rng as trandom
from tritnet.gradcheck import check_backward
from tritnet.nn import Module
from tritnet.nn.ternary import (TernaryLinear, expert_matmul, initial_exponent,
                                scale_from_exponent)
from tritnet.optim import TritFlip
from tritnet_kernels import packing, update


def float_arrays(module):
    return [(n, a.dtype) for n, a in module.held_arrays() if a.dtype.kind in "fc"]


@pytest.fixture(autouse=True)
def _seed():
    trandom.manual_seed(1234)


def test_state_is_integer_and_shaped():
    layer = TernaryLinear(70, 5)
    shapes = {n: (a.shape, a.dtype) for n, a in layer.held_arrays()}
    assert shapes == {"T_packed": ((5, 6), np.uint32), "E": ((5,), np.int8),
                      "T_accum": ((5, 70), np.int8), "E_accum": ((5,), np.int8)}
    trits = layer.trits()
    assert set(np.unique(trits)) <= {-1, 0, 1}
    assert abs((trits != 0).mean() - 2 / 3) < 0.1
    assert layer.E[0] == initial_exponent(70)


def test_initial_scale_keeps_unit_rms():
    layer = TernaryLinear(512, 256)
    x = np.random.default_rng(0).standard_normal((64, 512)).astype(np.float32)
    y = layer(tritnet.tensor(x)).numpy()
    assert 0.8 < float(np.sqrt((y ** 2).mean())) < 1.25


def test_forward_matches_reference():
    layer = TernaryLinear(37, 11)
    x = np.random.default_rng(1).standard_normal((4, 3, 37)).astype(np.float32)
    y = layer(tritnet.tensor(x)).numpy()
    ref = x @ layer.weight(np.float64).T
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    assert y.shape == (4, 3, 11)


def test_input_gradient_finite_differences():
    layer = TernaryLinear(9, 6)
    x = tritnet.tensor(np.random.default_rng(2).standard_normal((5, 9)), dtype=np.float64,
                       requires_grad=True)
    layer.eval()  # only the input gradient here; the weight path is tested below
    check_backward(lambda t: layer(t), [x])


def test_wrong_width_is_a_clear_error():
    layer = TernaryLinear(8, 4)
    with pytest.raises(ValueError, match=r"TernaryLinear\(8, 4\).*\(3, 7\).*\(\.\.\., 8\)"):
        layer(tritnet.tensor(np.zeros((3, 7), np.float32)))


def test_weight_gradient_is_int8_quantised_reference():
    layer = TernaryLinear(40, 7)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((6, 40)).astype(np.float32)
    gy = rng.standard_normal((6, 7)).astype(np.float32)
    seed_T, seed_E = layer.next_grad_seed(0), layer.next_grad_seed(1)
    y = layer(tritnet.tensor(x))
    y.backward(gy)
    assert layer.grad_q.dtype == np.int8 and layer.grad_q.shape == (7, 40)
    assert layer.grad_E_q.dtype == np.int8 and layer.grad_E_q.shape == (7,)
    G = gy.T @ x
    expected = np.zeros((7, 40), np.int8)
    update.quantize_grad_reference(G, update.grad_inv_scale_reference(G, layer.quantizer.rms_units),
                                   seed_T, expected, clip=layer.quantizer.clip_units)
    np.testing.assert_array_equal(layer.grad_q, expected)
    # the scale gradient: dL/dE_r = (Σ_j G_rj T_rj) · s_r · ln2/8, quantised the same way
    gE = (G * layer.trits()).sum(1) * scale_from_exponent(layer.E) * math.log(2) / 8
    gE = gE.astype(np.float32)
    expected_E = np.zeros(7, np.int8)
    rms_units = layer.quantizer.rms_units
    update.quantize_grad_reference(gE, update.grad_inv_scale_reference(gE, rms_units),
                                   seed_E, expected_E, clip=layer.quantizer.clip_units)
    assert np.abs(layer.grad_E_q.astype(int) - expected_E).max() <= 1  # fp32 sum order


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_expert_matmul_runs_each_tile_through_its_expert(device):
    """expert_matmul: tile t of x times expert tile_expert[t]'s weight; the input gradient by
    float64 central differences; each expert's weight gradient G_e = Σ over its tiles of
    gy_tᵀ·x_t (recorded where it enters the int8 path), nothing from tiles it does not own."""
    xp = backend.cupy if device == "cuda" else np
    layers = [TernaryLinear(9, 5, device=device) for _ in range(3)]
    tile_expert = xp.asarray([2, 0, 0, 1, 0])
    rng = np.random.default_rng(4)
    x = tritnet.tensor(xp.asarray(rng.standard_normal((20, 9))), requires_grad=True,
                       device=device)
    y = expert_matmul(x, layers, tile_expert, 4)
    te = backend.to_numpy(tile_expert)
    xh = backend.to_numpy(x.data)
    with tritnet.no_grad():   # each tile through its expert's own TernaryLinear
        want = np.concatenate([backend.to_numpy(layers[e](x[4 * t:4 * t + 4]).data)
                               for t, e in enumerate(te)])
    np.testing.assert_allclose(backend.to_numpy(y.data), want, rtol=1e-12, atol=1e-12)
    for layer in layers:
        layer.eval()   # the input gradient alone first
    check_backward(lambda t: expert_matmul(t, layers, tile_expert, 4), [x])
    recorded = {}
    for e, layer in enumerate(layers):
        layer.train()
        layer.accumulate_grad = lambda G, e=e: recorded.setdefault(e, backend.to_numpy(G))
    gy = rng.standard_normal((20, 5))
    expert_matmul(x, layers, tile_expert, 4).backward(xp.asarray(gy))
    for e in range(3):
        mine = [t for t in range(5) if te[t] == e]
        G = sum(gy[4 * t:4 * t + 4].T @ xh[4 * t:4 * t + 4] for t in mine)
        np.testing.assert_allclose(recorded[e], G, rtol=1e-10, atol=1e-10)
    # rows=: the tiled input gathered from x inside the op, the same as gathering first
    small = tritnet.tensor(xp.asarray(rng.standard_normal((7, 9))), requires_grad=True,
                           device=device)
    rows = xp.asarray(rng.integers(0, 7, 20))
    recorded.clear()
    expert_matmul(small, layers, tile_expert, 4, rows=rows).backward(xp.asarray(gy))
    fused, recorded_fused = backend.to_numpy(small.grad), dict(recorded)
    small.grad = None
    recorded.clear()
    expert_matmul(F.take(small, rows), layers, tile_expert, 4).backward(xp.asarray(gy))
    np.testing.assert_allclose(fused, backend.to_numpy(small.grad), rtol=1e-12, atol=1e-12)
    for e in range(3):
        np.testing.assert_allclose(recorded_fused[e], recorded[e], rtol=1e-12, atol=1e-12)
    for layer in layers:
        layer.eval()
    check_backward(lambda t: expert_matmul(t, layers, tile_expert, 4, rows=rows), [small])


def test_expert_matmul_bad_input():
    layers = [TernaryLinear(8, 4), TernaryLinear(8, 4)]
    x = tritnet.tensor(np.zeros((6, 8), np.float32))
    with pytest.raises(ValueError, match=r"ExpertMatmul: input has shape \(6, 8\), expected "
                                         r"\(8, 8\): 2 tiles of 4 rows"):
        expert_matmul(x, layers, np.array([0, 1]), 4)
    with pytest.raises(ValueError, match=r"ExpertMatmul: rows has shape \(6,\), expected "
                                         r"\(8,\): one input row for each of 2 tiles of 4"):
        expert_matmul(x, layers, np.array([0, 1]), 4, rows=np.zeros(6, np.int64))
    with pytest.raises(ValueError, match=r"ExpertMatmul: layers of different shapes "
                                         r"\[\(8, 3\), \(8, 4\)\]"):
        expert_matmul(x, [TernaryLinear(8, 4), TernaryLinear(8, 3)], np.array([0, 1, 0]), 2)


@pytest.mark.parametrize("phase", ["forward", "backward", "step"])
def test_no_float_state_survives(phase):
    """No float array on the layer or the optimiser at any phase (docs/design.md#invariants)."""
    model = TernaryLinear(33, 5)
    opt = TritFlip(model)
    x = tritnet.tensor(np.ones((2, 33), np.float32))
    y = model(x)
    if phase in ("backward", "step"):
        (y * y).sum().backward()
        leftover = {n: (a.shape, a.dtype) for n, a in model.held_arrays()
                    if n.startswith("grad")}
        assert leftover == {"grad_q": ((5, 33), np.int8), "grad_E_q": ((5,), np.int8)}
    # the quantizer the optimiser shares with its modules holds one array: its clock
    assert model.quantizer is opt.quantizer
    held = {n: v for n, v in vars(opt.quantizer).items()
            if isinstance(v, np.ndarray) or backend.is_cupy(v)}
    assert held == {"clock": opt.clock} and opt.clock.dtype == np.int64
    if phase == "step":
        opt.step()
        assert model.grad_q is None and model.grad_E_q is None
    assert float_arrays(model) == []
    # the optimiser's arrays: its clock [step, gain], the schedule's gains and the last
    # step's statistics, integers
    held = {n: (v.shape, v.dtype) for n, v in vars(opt).items()
            if isinstance(v, np.ndarray) or backend.is_cupy(v)}
    assert held == {"clock": ((2,), np.int64), "_gains": ((1,), np.int64),
                    "stats": ((1, 3), np.int64)}


def test_float_state_is_detected():
    """The invariant check itself must fail when a float array sneaks onto a module."""
    layer = TernaryLinear(4, 2)
    layer.cache = np.zeros(3, np.float32)
    assert float_arrays(layer) == [("cache", np.float32)]


def test_optimizer_rejects_bad_hyperparameters():
    layer = TernaryLinear(4, 2)
    with pytest.raises(ValueError, match=r"flip_threshold must be an integer in \[1, 127\], got 0"):
        TritFlip(layer, flip_threshold=0)
    with pytest.raises(ValueError, match="decay_shift"):
        TritFlip(layer, decay_shift=9)
    with pytest.raises(ValueError, match="no ternary modules"):
        TritFlip(Module())


def test_a_module_can_flip_at_its_own_threshold():
    """flip_thresholds: the module named there flips at its threshold, the others at
    flip_threshold; with the clip at 8 units one step cannot reach 64, but can reach 8."""
    a, b = TernaryLinear(16, 8), TernaryLinear(16, 8)
    b.T_packed[...] = a.T_packed
    b.E[...] = a.E
    opt = TritFlip([a, b], flip_threshold=64, flip_thresholds={b: 8}, seed=1)
    assert opt.thresholds == [64, 8]
    x = tritnet.tensor(np.random.default_rng(0).standard_normal((32, 16)).astype(np.float32))
    (a(x) * a(x)).sum().backward()
    (b(x) * b(x)).sum().backward()
    before = a.trits().copy()
    opt.step()
    assert np.array_equal(a.trits(), before)
    assert (b.trits() != before).sum() > 0
    with pytest.raises(ValueError, match=r"flip_thresholds' threshold must be an integer in "
                                         r"\[1, 127\], got 0"):
        TritFlip([a, b], flip_thresholds={b: 0})
    with pytest.raises(ValueError, match="flip_thresholds names TernaryLinear, which holds "
                                         "none of the optimised ternary modules"):
        TritFlip([a], flip_thresholds={b: 8})


def _teacher_run(seed, steps=300):
    trandom.manual_seed(seed)
    rng = np.random.default_rng(seed)
    teacher = TernaryLinear(64, 16)
    student = TernaryLinear(64, 16)
    student.E[:] = teacher.E  # same scale: the test is about trits
    opt = TritFlip(student, seed=seed)
    for _ in range(steps):
        x = rng.standard_normal((128, 64)).astype(np.float32)
        with tritnet.no_grad():
            target = teacher(tritnet.tensor(x)).numpy()
        err = student(tritnet.tensor(x)) - tritnet.tensor(target)
        (err * err).mean().backward()
        opt.step()
    return student.trits(), teacher.trits()


def test_recovers_a_ternary_teacher():
    student, teacher = _teacher_run(seed=7)
    assert (student == teacher).mean() >= 0.95


def test_training_is_deterministic_for_a_seed():
    a, _ = _teacher_run(seed=11, steps=20)
    b, _ = _teacher_run(seed=11, steps=20)
    c, _ = _teacher_run(seed=12, steps=20)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


class MLP(Module):
    def __init__(self, sizes):
        super().__init__()
        self.fc1 = TernaryLinear(sizes[0], sizes[1])
        self.fc2 = TernaryLinear(sizes[1], sizes[2])

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


def test_ternary_mlp_learns_digits():
    datasets = pytest.importorskip("sklearn.datasets")
    digits = datasets.load_digits()
    rng = np.random.default_rng(0)
    order = rng.permutation(len(digits.target))
    X = digits.data[order].astype(np.float32)
    y = digits.target[order].astype(np.int64)
    X = (X - X[:1400].mean(0)) / (X[:1400].std(0) + 1e-3)
    trandom.manual_seed(0)
    model = MLP((64, 256, 10))
    opt = TritFlip(model, seed=0)
    start = time.perf_counter()
    for step in range(600):
        idx = rng.integers(0, 1400, 64)
        loss = F.cross_entropy(model(tritnet.tensor(X[idx])), tritnet.tensor(y[idx]))
        loss.backward()
        opt.step()
    with tritnet.no_grad():
        accuracy = (model(tritnet.tensor(X[1400:])).numpy().argmax(1) == y[1400:]).mean()
    assert time.perf_counter() - start < 60
    assert accuracy >= 0.90, accuracy


def test_tritflip_cosine_gain_schedule():
    from tritnet.optim import TritFlip
    layer = TernaryLinear(8, 4)
    opt = TritFlip([layer], grad_rms_units=8, schedule="cosine", final_grad_rms_units=1.0,
                   total_steps=10)
    assert opt.gain(0) == 8.0 and opt.gain(10) == 1.0 and opt.gain(25) == 1.0
    assert opt.gain(5) == pytest.approx(4.5)
    assert all(opt.gain(s) > opt.gain(s + 1) for s in range(10))
    assert layer.quantizer.rms_units == 8.0
    opt.step()
    assert layer.quantizer.rms_units == pytest.approx(opt.gain(1))   # modules follow the step
    constant = TritFlip([TernaryLinear(8, 4)], grad_rms_units=8)
    assert constant.gain(0) == constant.gain(10**6) == 8.0


def test_tritflip_clock_follows_the_steps_on_the_device():
    """The kernels read the step and the gain from the optimiser's clock, which step()
    advances where it lives (a captured CUDA graph replays that) and load_state_dict writes:
    it always says [step_count, gain(step_count)], the gain in units of 2**-32; past the
    schedule's end the gain stays at its last value."""
    from tritnet.optim import TritFlip
    layer = TernaryLinear(8, 4)
    opt = TritFlip([layer], grad_rms_units=8, schedule="cosine", final_grad_rms_units=1.0,
                   total_steps=4)
    assert layer.quantizer.clock is opt.clock
    for step in range(7):
        assert opt.clock.tolist() == [step, round(opt.gain(step) * 2**32)], step
        layer(tritnet.tensor(np.ones((2, 8), np.float32))).sum().backward()
        opt.step()
    restored = TritFlip([TernaryLinear(8, 4)], grad_rms_units=8, schedule="cosine",
                        final_grad_rms_units=1.0, total_steps=4)
    restored.load_state_dict(opt.state_dict())
    np.testing.assert_array_equal(restored.clock, opt.clock)
    # the bits of a step are the clock's: the same seed draws other bits a step later
    seeds = {layer.next_grad_seed(0)}
    opt.step()
    assert {layer.next_grad_seed(0)} == seeds


@pytest.mark.parametrize("kwargs, match", [
    (dict(schedule="linear", total_steps=10), "schedule must be 'constant' or 'cosine'"),
    (dict(schedule="cosine"), "needs total_steps > 0"),
    (dict(schedule="cosine", total_steps=10, final_grad_rms_units=9.0),
     r"final_grad_rms_units must be in \(0, grad_rms_units = 8\], got 9.0"),
])
def test_tritflip_schedule_errors(kwargs, match):
    from tritnet.optim import TritFlip
    with pytest.raises(ValueError, match=match):
        TritFlip([TernaryLinear(8, 4)], grad_rms_units=8, **kwargs)


def _one_concentrated_step(clip, table=False):
    """One step whose weight gradient sits on a single entry: normalised by the tensor's RMS,
    that entry reads as ~sqrt(size) RMS, far past the flip threshold in one step."""
    from tritnet.nn.tables import TernaryEmbeddingTable
    trandom.manual_seed(3)
    layer = TernaryEmbeddingTable(6, 256) if table else TernaryLinear(256, 6)
    push = -100.0 if layer.trits()[2, 7] == 1 else 100.0    # a direction the trit can move
    if table:
        out = layer(np.array([2]))
        target = out.numpy().copy()
        target[..., 7] = push
    else:
        x = np.zeros((1, 256), np.float32)
        x[0, 7] = 1.0
        out = layer(tritnet.tensor(x))
        target = np.zeros(out.shape, np.float32)
        target[0, 2] = push
    opt = TritFlip(layer, grad_clip_units=clip, seed=1)
    before = layer.trits().copy()
    ((out - tritnet.tensor(target)) ** 2).sum().backward()
    added = np.abs(layer.grad_q.astype(np.int64)).max() if not table else None
    opt.step()
    return int((layer.trits() != before).sum()), added, layer


@pytest.mark.parametrize("table", [False, True])
def test_grad_clip_units_bounds_what_one_step_adds(table):
    flips, added, layer = _one_concentrated_step(0, table)
    assert flips == 1                                   # unclipped: the entry flips at once
    if added is not None:
        assert added == 127                             # 8 units x sqrt(1536 entries)
    flips, added, layer = _one_concentrated_step(32, table)
    assert flips == 0                                   # clipped below the threshold 64
    if added is not None:
        assert added == 32
    assert np.abs(layer.T_accum.astype(np.int64)).max() == 32
    assert layer.quantizer.clip_units == 32


def test_grad_clip_units_is_checked_and_saved():
    with pytest.raises(ValueError, match=r"grad_clip_units must be an integer in \[0, 127\], got 128"):
        TritFlip(TernaryLinear(8, 4), grad_clip_units=128)
    assert TritFlip(TernaryLinear(8, 4), grad_clip_units=20).state_dict()["grad_clip_units"] == 20


def test_normalized_grad_gives_unit_entries_under_its_model_of_magnitude():
    from tritnet.nn.ternary import normalized_grad
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0.5, 5, size=(7, 1)), rng.uniform(0.5, 5, size=(1, 9))
    signs = rng.choice([-1.0, 1.0], size=(7, 9))
    G = (a * b * signs).astype(np.float32)
    np.testing.assert_allclose(normalized_grad(G, "factored"), signs, rtol=1e-5)
    rows = normalized_grad(G, "row")
    np.testing.assert_allclose(np.sqrt((rows.astype(np.float64) ** 2).mean(axis=1)), 1.0,
                               rtol=1e-5)
    np.testing.assert_allclose(rows, G / np.sqrt((G.astype(np.float64) ** 2).mean(1,
                                                 keepdims=True)), rtol=1e-5)
    # a table's padding rows (all zero) stay zero, and nothing is NaN; a quiet row is raised
    # at most to the floor's share of the mean
    G[5:] = 0
    G[0] *= 1e-6
    for mode in ("row", "factored"):
        out = normalized_grad(G, mode)
        assert np.isfinite(out).all() and not out[5:].any()
        assert np.abs(out[0]).max() < np.abs(out[1:5]).max()


def test_optimiser_options_are_checked():
    model = TernaryLinear(8, 4)
    with pytest.raises(ValueError, match="grad_norm must be one of"):
        TritFlip(model, grad_norm="adam")
    with pytest.raises(ValueError, match="accum_init must be one of"):
        TritFlip(model, accum_init="random")
    TritFlip(model, accum_init="spread", flip_threshold=10)
    assert model.T_accum.min() >= -9 and model.T_accum.max() <= 9 and model.T_accum.any()
