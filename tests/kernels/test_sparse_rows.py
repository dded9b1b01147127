"""tritnet_kernels.sparse_rows: packed-first init, gather, segment sums, sparse updates.

CPU twin against the NumPy reference (bit-exact), the CUDA kernels against the CPU twin under
the simulator (tiny shapes) and on a GPU (CuPy), bad input, and the 10M-row build's memory.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import cupy, pack
from tritnet_kernels import _common
from tritnet_kernels import sparse_rows as tb
from tritnet_kernels import update as U

# --- independent bitplane32 helpers (docs/kernels.md#bitplane32, written out again; pack is
# in tests/helpers.py) ---


def unpack(T_packed, cols):
    T = np.zeros((T_packed.shape[0], cols), dtype=np.int64)
    for j in range(cols):
        p = (T_packed[:, 2 * (j // 32)] >> np.uint32(j % 32)) & 1
        m = (T_packed[:, 2 * (j // 32) + 1] >> np.uint32(j % 32)) & 1
        T[:, j] = p.astype(np.int64) - m.astype(np.int64)
    return T


def make_table(rows, cols, seed):
    rng = np.random.default_rng(seed)
    T = rng.integers(-1, 2, (rows, cols))
    return (pack(T), rng.integers(-128, 128, rows).astype(np.int8),
            rng.integers(-127, 128, (rows, cols)).astype(np.int8),
            rng.integers(-127, 128, rows).astype(np.int8))


SHAPES = [(1, 64), (40, 64), (33, 37), (17, 70), (5, 1), (9, 32)]
HYPER = dict(flip_threshold=40, flip_decay_shift=2, scale_threshold=30, scale_decay_shift=1)


# --------------------------------------------------------------------------------------------
# random_table


@pytest.mark.parametrize("rows,cols", SHAPES)
def test_random_table_matches_reference(rows, cols):
    T_packed = np.full((rows, 2 * -(-cols // 32)), 0xDEADBEEF, dtype=np.uint32)
    E = np.zeros(rows, dtype=np.int8)
    out = tb.random_table(T_packed, cols, seed=1234, E=E, exponent=-9)
    assert out is T_packed
    np.testing.assert_array_equal(unpack(T_packed, cols), tb.random_table_reference(rows, cols, 1234))
    np.testing.assert_array_equal(pack(unpack(T_packed, cols)), T_packed)  # padding bits zero
    assert (E == -9).all()


def test_random_table_is_uniform_and_seeded():
    T_packed = np.empty((3000, 2), dtype=np.uint32)
    T = unpack(tb.random_table(T_packed, 32, seed=5), 32)
    counts = np.bincount(T.ravel() + 1, minlength=3) / T.size
    assert np.all(np.abs(counts - 1 / 3) < 0.01), counts
    # neighbouring trits are independent: the pair (t_j, t_j+1) is uniform over 9 values
    pairs = np.bincount((3 * (T[:, :-1] + 1) + T[:, 1:] + 1).ravel(), minlength=9) / T[:, 1:].size
    assert np.all(np.abs(pairs - 1 / 9) < 0.01), pairs
    other = unpack(tb.random_table(np.empty((3000, 2), dtype=np.uint32), 32, seed=6), 32)
    assert (other != T).mean() > 0.6


def test_random_table_rejects_bad_input():
    with pytest.raises(ValueError, match=r"random_table: T_packed has shape \(4, 2\), expected \(rows, 4\) for cols=64"):
        tb.random_table(np.empty((4, 2), np.uint32), 64, 1)
    with pytest.raises(TypeError, match=r"random_table: T_packed has dtype int32, expected uint32"):
        tb.random_table(np.empty((4, 4), np.int32), 64, 1)
    with pytest.raises(ValueError, match=r"random_table: seed = -1 is out of range"):
        tb.random_table(np.empty((4, 4), np.uint32), 64, -1)
    with pytest.raises(ValueError, match=r"random_table: exponent = 200 is out of range"):
        tb.random_table(np.empty((4, 4), np.uint32), 64, 1, E=np.zeros(4, np.int8), exponent=200)


_BUILD_SCRIPT = textwrap.dedent("""
    import json, sys, time
    import numpy as np
    from tritnet_kernels.sparse_rows import random_table

    def vm(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    rows, cols = int(sys.argv[1]), int(sys.argv[2])
    random_table(np.empty((4, 2 * -(-cols // 32)), np.uint32), cols, 1)  # compile (or load) first
    rss0 = vm("VmRSS:")
    t0 = time.perf_counter()
    T_packed = np.empty((rows, 2 * -(-cols // 32)), dtype=np.uint32)
    E = np.empty(rows, dtype=np.int8)
    random_table(T_packed, cols, 20261124, E=E, exponent=-5)
    E_accum = np.zeros(rows, dtype=np.int8)
    T_accum = np.zeros((rows, cols), dtype=np.int8)
    seconds = time.perf_counter() - t0
    state = T_packed.nbytes + E.nbytes + E_accum.nbytes + T_accum.nbytes
    print(json.dumps(dict(growth=vm("VmHWM:") - rss0, state=state, packed=T_packed.nbytes,
                          seconds=seconds, bits=float(np.unpackbits(T_packed[:1000].view(np.uint8)).mean()))))
""")


def test_building_10M_by_64_is_packed_first():
    """Packed-first (docs/design.md#packed-first): peak extra host memory <= 1.25x the final
    integer state, <= 60 s.

    Measured in a fresh process through /proc/self/status (VmHWM counts every page, Numba's
    allocations included; tracemalloc and ru_maxrss of this process would not).
    """
    env = dict(os.environ, NUMBA_NUM_THREADS="2")
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _BUILD_SCRIPT, "10000000", "64"], env=env,
                          capture_output=True, text=True, timeout=300, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["state"] == 10_000_000 * (16 + 1 + 1 + 64)
    assert r["growth"] <= 1.25 * r["state"], r
    # Stronger: nothing of the table's trit shape was made beyond the state itself (the
    # packed words are written in place; T_accum's zero pages are the only other big array).
    assert r["growth"] <= 1.25 * (r["packed"] + 2 * 10_000_000) + 640_000_000, r
    assert r["seconds"] <= 60, r
    assert abs(r["bits"] - 1 / 3) < 0.01, r  # each mask bit is set for a third of the trits


# --------------------------------------------------------------------------------------------
# gather_rows


@pytest.mark.parametrize("rows,cols", SHAPES)
@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
def test_gather_matches_reference(rows, cols, index_dtype):
    T_packed, E, _, _ = make_table(rows, cols, rows * cols)
    idx = np.random.default_rng(1).integers(0, rows, 3 * rows + 2).astype(index_dtype)
    idx[:2] = idx[2]  # duplicates
    out = tb.gather_rows(T_packed, E, idx, cols)
    assert out.dtype == np.float32 and out.shape == (len(idx), cols)
    np.testing.assert_array_equal(out, tb.gather_rows_reference(T_packed, E, idx, cols))
    expected = np.exp2(E[idx].astype(np.float64) / 8)[:, None] * unpack(T_packed, cols)[idx]
    np.testing.assert_allclose(out, expected, rtol=6e-8)


def test_gather_into_out_and_empty():
    T_packed, E, _, _ = make_table(10, 64, 3)
    out = np.full((4, 64), np.nan, dtype=np.float32)
    idx = np.array([9, 0, 9, 3], dtype=np.int64)
    assert tb.gather_rows(T_packed, E, idx, 64, out=out) is out
    np.testing.assert_array_equal(out, tb.gather_rows_reference(T_packed, E, idx, 64))
    assert tb.gather_rows(T_packed, E, np.zeros(0, np.int32), 64).shape == (0, 64)


# --------------------------------------------------------------------------------------------
# unique_rows + segment_sum_rows


@pytest.mark.parametrize("n,cols,universe", [(1, 64, 5), (200, 64, 30), (77, 37, 1000), (50, 70, 3)])
@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
def test_segment_sums_match_add_at_exactly(n, cols, universe, index_dtype):
    rng = np.random.default_rng(n + cols)
    indices = rng.integers(0, universe, n).astype(index_dtype)
    grad = (rng.standard_normal((n, cols)) * 10 ** rng.uniform(-3, 3, (n, 1))).astype(np.float32)
    rows, inverse, order, offsets, count = tb.unique_rows(indices)
    u_ref, inv_ref = np.unique(indices, return_inverse=True)
    u = len(u_ref)
    # fixed sizes: the distinct rows, then -1 padding; padding rows are empty segments
    assert rows.shape == inverse.shape == order.shape == (n,) and offsets.shape == (n + 1,)
    assert count.tolist() == [u]
    np.testing.assert_array_equal(rows[:u], u_ref)
    assert (rows[u:] == -1).all() and (offsets[u:] == n).all()
    np.testing.assert_array_equal(inverse, inv_ref)
    np.testing.assert_array_equal(indices[order], np.sort(indices, kind="stable"))
    ref = tb.segment_sum_rows_reference(grad, inverse, len(rows))
    assert not ref[u:].any()
    np.testing.assert_array_equal(tb.segment_sum_rows(grad, inverse, len(rows)), ref)
    np.testing.assert_array_equal(
        tb.segment_sum_rows(grad, inverse.astype(index_dtype), len(rows), segments=(order, offsets)), ref)


def _hot_rows(cols, seed=0):
    """Row 7 repeated 1000 times, row 3 129 times (one past a chunk), row 5 exactly 128, and
    a spread of rows seen once or twice, shuffled; gradients spanning six decades."""
    rng = np.random.default_rng(seed)
    indices = np.concatenate([np.full(1000, 7), np.full(129, 3), np.full(128, 5),
                              rng.integers(10, 60, 80)]).astype(np.int64)
    rng.shuffle(indices)
    grad = (rng.standard_normal((indices.size, cols)) *
            10 ** rng.uniform(-3, 3, (indices.size, 1))).astype(np.float32)
    return indices, grad


@pytest.mark.parametrize("cols", [64, 37, 1])
def test_segment_sums_of_hot_rows_are_chunked(cols):
    indices, grad = _hot_rows(cols)
    rows, inverse, order, offsets, count = tb.unique_rows(indices)
    got = tb.segment_sum_rows(grad, inverse, len(rows), segments=(order, offsets))
    np.testing.assert_array_equal(got, tb.segment_sum_sorted_reference(grad, order, offsets))
    add_at = tb.segment_sum_rows_reference(grad, inverse, len(rows))
    short = np.diff(offsets) <= tb._SEGMENT_CHUNK   # rows 5, the rare ones and the padding
    assert short.sum() == len(rows) - 2
    np.testing.assert_array_equal(got[short], add_at[short])
    assert not np.array_equal(got[rows == 7], add_at[rows == 7])  # the order did change ...
    exact = np.zeros((len(rows), cols))
    np.add.at(exact, inverse, grad.astype(np.float64))
    scale = np.abs(grad).astype(np.float64).max() * 1e-5
    np.testing.assert_allclose(got, exact, rtol=0, atol=scale)  # ... only within rounding


def test_segment_sum_overwrites_out():
    grad = np.ones((3, 4), np.float32)
    out = np.full((2, 4), 7.0, np.float32)
    tb.segment_sum_rows(grad, np.array([1, 1, 0]), 2, out=out)
    np.testing.assert_array_equal(out, [[1] * 4, [2] * 4])


# --------------------------------------------------------------------------------------------
# sparse updates


def _state(rows, cols, seed):
    T_packed, E, T_accum, E_accum = make_table(rows, cols, seed)
    return [T_packed, T_accum, E, E_accum]


@pytest.mark.parametrize("R,cols,u", [(1, 64, 1), (50, 64, 20), (40, 37, 40), (30, 70, 7)])
@pytest.mark.parametrize("hyper", [HYPER, dict(flip_threshold=1, flip_decay_shift=0,
                                               scale_threshold=127, scale_decay_shift=7)])
def test_sparse_update_matches_reference_and_dense_rule(R, cols, u, hyper):
    rng = np.random.default_rng(R * cols + u)
    state = _state(R, cols, R + u)
    before = [a.copy() for a in state]
    rows = np.sort(rng.choice(R, u, replace=False)).astype(np.int32)
    gq = rng.integers(-90, 91, (u, cols)).astype(np.int8)
    gE = rng.integers(-90, 91, u).astype(np.int8)
    gq_copy, gE_copy = gq.copy(), gE.copy()
    counts = tb.sparse_ternary_update(*state, rows, gq, gE, **hyper)
    ref = tb.sparse_ternary_update_reference(*before, rows, gq, gE, **hyper)
    for got, want in zip(state + [counts], ref):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(gq, gq_copy)  # gradients are read, not consumed
    np.testing.assert_array_equal(gE, gE_copy)
    untouched = np.setdiff1d(np.arange(R), rows)
    for got, old in zip(state, before):
        np.testing.assert_array_equal(got[untouched], old[untouched])
    # the dense update on the gathered rows is the same step
    dense = U.ternary_update_reference(before[0][rows], before[1][rows], gq, before[2][rows],
                                       before[3][rows], gE, **hyper)
    for got, want in zip([state[0][rows], state[1][rows], state[2][rows], state[3][rows]], dense):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(counts, dense[4])


def test_sparse_update_halves_are_independent():
    # The one launch does two separate jobs: the trits' result does not depend on the
    # exponent state, nor the exponents' on the trit state, and each half is the reference's
    # trits-only / exponents-only step.
    rng = np.random.default_rng(7)
    a = _state(30, 45, 1)
    other = _state(30, 45, 2)
    rows = np.array([0, 3, 4, 29], dtype=np.int64)
    gq = rng.integers(-90, 91, (4, 45)).astype(np.int8)
    gE = rng.integers(-90, 91, 4).astype(np.int8)
    before = [x.copy() for x in a]
    fused = tb.sparse_ternary_update(*a, rows, gq, gE, **HYPER)
    trit_half = [before[0].copy(), before[1].copy(), other[2], other[3]]
    trit_half_ref = tb.sparse_ternary_update_reference(*trit_half, rows, gq, gE, **HYPER)
    total = np.array([100, 200], np.int64)  # a caller's counter: the step adds into it
    counts_t = tb.sparse_ternary_update(*trit_half, rows, gq, gE, **HYPER, counts=total)
    assert counts_t is total
    np.testing.assert_array_equal(total, trit_half_ref[4] + [100, 200])
    scale_half = [other[0], other[1], before[2].copy(), before[3].copy()]
    counts_e = tb.sparse_ternary_update(*scale_half, rows, gq, gE, **HYPER)
    for x, y in zip(a[:2], trit_half[:2]):
        np.testing.assert_array_equal(x, y)
    for x, y in zip(a[2:], scale_half[2:]):
        np.testing.assert_array_equal(x, y)
    T_ref, Ta_ref, E_none, _, trit_counts = tb.sparse_ternary_update_reference(
        before[0], before[1], None, None, rows, gq, None, **HYPER)
    T_none, _, E_ref, Ea_ref, scale_counts = tb.sparse_ternary_update_reference(
        None, None, before[2], before[3], rows, None, gE, **HYPER)
    assert E_none is None and T_none is None
    for got, want in zip(a, (T_ref, Ta_ref, E_ref, Ea_ref)):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(fused, [trit_counts[0], scale_counts[1]])
    assert trit_counts[1] == 0 and scale_counts[0] == 0
    assert (counts_t[0] - 100, counts_e[1]) == (fused[0], fused[1])
    assert fused[0] > 0 and fused[1] > 0


@pytest.mark.parametrize("check", [True, False])
def test_sparse_update_skips_padding_rows(check):
    # unique_rows pads its rows with -1 to a fixed count: those entries change nothing, and
    # the listed rows get exactly the unpadded step
    rng = np.random.default_rng(11)
    state, plain = _state(20, 37, 6), _state(20, 37, 6)
    rows = np.array([2, 5, 19, -1, -1], dtype=np.int64)
    gq = rng.integers(-90, 91, (5, 37)).astype(np.int8)
    gE = rng.integers(-90, 91, 5).astype(np.int8)
    counts = tb.sparse_ternary_update(*state, rows, gq, gE, **HYPER, check=check)
    plain_counts = tb.sparse_ternary_update(*plain, rows[:3], gq[:3], gE[:3], **HYPER)
    ref = tb.sparse_ternary_update_reference(*_state(20, 37, 6), rows, gq, gE, **HYPER)
    for got, want, ref_ in zip(state + [counts], plain + [plain_counts], ref):
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(got, ref_)
    all_padding = _state(20, 37, 6)
    tb.sparse_ternary_update(*all_padding, np.full(4, -1, np.int64), gq[:4], gE[:4], **HYPER)
    for got, want in zip(all_padding, _state(20, 37, 6)):
        np.testing.assert_array_equal(got, want)


def test_empty_rows_is_a_no_op():
    state = _state(5, 64, 2)
    before = [x.copy() for x in state]
    counts = tb.sparse_ternary_update(*state, np.zeros(0, np.int64), np.zeros((0, 64), np.int8),
                                      np.zeros(0, np.int8), **HYPER)
    np.testing.assert_array_equal(counts, [0, 0])
    for x, y in zip(state, before):
        np.testing.assert_array_equal(x, y)


# --------------------------------------------------------------------------------------------
# bad input: a clear error naming the thing, and nothing changed


def _bad_update_calls():
    good_rows = np.array([1, 4], dtype=np.int32)
    gq = np.ones((2, 64), np.int8)
    gE = np.ones(2, np.int8)
    return [
        (dict(rows=np.array([1, 9], np.int32)), ValueError, r"rows\[1\] = 9 is out of range; expected rows in \[0, 8\)"),
        (dict(rows=np.array([-1, 4], np.int64)), ValueError, r"rows\[1\] = 4 is out of place; expected rows in \[0, 8\), strictly increasing, then only -1"),
        (dict(rows=np.array([1, -2], np.int64)), ValueError, r"rows\[1\] = -2 is out of place"),
        (dict(rows=np.array([1.0, 4.0])), TypeError, r"rows has dtype float64, expected int32 or int64"),
        (dict(rows=np.array([4, 1], np.int32)), ValueError, r"rows must be strictly increasing .* rows\[0\] = 4 and rows\[1\] = 1"),
        (dict(rows=np.array([4, 4], np.int32)), ValueError, r"rows must be strictly increasing"),
        (dict(rows=np.array([[1, 4]], np.int32)), ValueError, r"rows has shape \(1, 2\), expected a 1-D array"),
        (dict(rows=np.arange(8, dtype=np.int32)[::4]), ValueError, r"rows is not C-contiguous"),
        (dict(gq=np.ones((2, 63), np.int8)), ValueError, r"grad_q_rows has shape \(2, 63\), expected \(2, 64\)"),
        (dict(gq=np.ones((2, 64), np.int16)), TypeError, r"grad_q_rows has dtype int16, expected int8"),
        (dict(gE=np.ones(3, np.int8)), ValueError, r"grad_E_q_rows has shape \(3,\), expected \(2,\)"),
        (dict(flip_threshold=0), ValueError, r"flip_threshold = 0 is out of range"),
    ], good_rows, gq, gE


@pytest.mark.parametrize("case", range(12))
def test_sparse_update_rejects_bad_input_and_changes_nothing(case):
    cases, rows, gq, gE = _bad_update_calls()
    change, error, match = cases[case]
    state = _state(8, 64, 4)
    before = [x.copy() for x in state]
    hyper = dict(HYPER)
    if "flip_threshold" in change:
        hyper["flip_threshold"] = change["flip_threshold"]
    with pytest.raises(error, match="sparse_ternary_update: " + match):
        tb.sparse_ternary_update(*state, change.get("rows", rows), change.get("gq", gq),
                                 change.get("gE", gE), **hyper)
    for x, y in zip(state, before):
        np.testing.assert_array_equal(x, y)


def test_gather_and_segment_sum_reject_bad_input():
    T_packed, E, _, _ = make_table(6, 64, 0)
    with pytest.raises(ValueError, match=r"gather_rows: indices\[2\] = 6 is out of range; expected rows in \[0, 6\)"):
        tb.gather_rows(T_packed, E, np.array([0, 1, 6]), 64)
    with pytest.raises(ValueError, match=r"gather_rows: indices\[1\] = -3 is out of range"):
        tb.gather_rows(T_packed, E, np.array([0, -3], np.int32), 64)
    with pytest.raises(TypeError, match=r"gather_rows: indices has dtype uint32, expected int32 or int64"):
        tb.gather_rows(T_packed, E, np.array([0], np.uint32), 64)
    with pytest.raises(ValueError, match=r"gather_rows: T_packed has shape \(6, 4\), expected \(rows, 6\) for cols=70"):
        tb.gather_rows(T_packed, E, np.array([0]), 70)
    with pytest.raises(ValueError, match=r"gather_rows: E has shape \(5,\), expected \(6,\)"):
        tb.gather_rows(T_packed, E[:5], np.array([0]), 64)
    with pytest.raises(TypeError, match=r"gather_rows: float16 output is GPU-only"):
        tb.gather_rows(T_packed, E, np.array([0]), 64, dtype=np.float16)
    with pytest.raises(ValueError, match=r"gather_rows: out has shape \(2, 64\), expected \(1, 64\)"):
        tb.gather_rows(T_packed, E, np.array([0]), 64, out=np.empty((2, 64), np.float32))
    grad = np.ones((3, 8), np.float32)
    with pytest.raises(ValueError, match=r"segment_sum_rows: inverse\[0\] = 2 is out of range; expected unique-row positions in \[0, 2\)"):
        tb.segment_sum_rows(grad, np.array([2, 0, 1]), 2)
    with pytest.raises(ValueError, match=r"segment_sum_rows: inverse has 2 entries, expected 3"):
        tb.segment_sum_rows(grad, np.array([0, 1]), 2)
    with pytest.raises(TypeError, match=r"segment_sum_rows: grad has dtype float64, expected float32"):
        tb.segment_sum_rows(grad.astype(np.float64), np.array([0, 1, 1]), 2)
    with pytest.raises(ValueError, match=r"segment_sum_rows: offsets must rise from 0 to 3"):
        tb.segment_sum_rows(grad, np.array([0, 1, 1]), 2,
                            segments=(np.arange(3, dtype=np.int64), np.array([0, 1, 2], np.int64)))


# --------------------------------------------------------------------------------------------
# the CUDA kernels under the simulator, against the CPU twins (tiny shapes)


def _twin(fn_cpu, *arrays_and_scalars):
    args = [a.copy() if isinstance(a, np.ndarray) else a for a in arrays_and_scalars]
    fn_cpu(*args)
    return args


@pytest.mark.cudasim
@pytest.mark.parametrize("rows,cols", [(3, 64), (5, 37), (2, 70)])
def test_sim_random_table_and_gather(rows, cols):
    T_packed = np.empty((rows, 2 * -(-cols // 32)), dtype=np.uint32)
    tb.random_table(T_packed, cols, 77)
    expected = np.empty_like(T_packed)
    tb._random_table_cpu(expected, np.int64(cols), _common.stream_key(77))
    np.testing.assert_array_equal(T_packed, expected)
    E = np.array([-128, 0, 127, 5, -9][:rows], dtype=np.int8)
    idx = np.array([rows - 1, 0, rows - 1], dtype=np.int32)
    out = tb.gather_rows(T_packed, E, idx, cols)
    np.testing.assert_array_equal(out, tb.gather_rows_reference(T_packed, E, idx, cols))


@pytest.mark.cudasim
def test_sim_segment_sums():
    rng = np.random.default_rng(0)
    indices = np.array([3, 1, 3, 3, 0, 1], dtype=np.int64)
    grad = rng.standard_normal((6, 37)).astype(np.float32)
    rows, inverse, order, offsets, count = tb.unique_rows(indices)
    ref = tb.segment_sum_rows_reference(grad, inverse, 6)   # 3 rows, then 3 of padding
    out = np.full((6, 37), np.nan, np.float32)               # padding sums overwrite it with 0
    np.testing.assert_array_equal(
        tb.segment_sum_rows(grad, inverse, 6, segments=(order, offsets), out=out), ref)
    # the simulator runs threads one after another, so even the atomics add in order here
    np.testing.assert_allclose(tb.segment_sum_rows(grad, inverse, 6), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.cudasim
def test_sim_segment_sums_of_a_hot_row():
    indices = np.array([2] * 300 + [0, 1, 2], dtype=np.int64)  # row 2: three chunks
    grad = np.random.default_rng(1).standard_normal((303, 3)).astype(np.float32)
    rows, inverse, order, offsets, count = tb.unique_rows(indices)
    np.testing.assert_array_equal(tb.segment_sum_rows(grad, inverse, 303, segments=(order, offsets)),
                                  tb.segment_sum_sorted_reference(grad, order, offsets))


@pytest.mark.cudasim
@pytest.mark.parametrize("cols", [64, 37])
def test_sim_sparse_update(cols):
    rng = np.random.default_rng(cols)
    state = _state(6, cols, 3)
    before = [x.copy() for x in state]
    rows = np.array([0, 2, 5, -1], dtype=np.int64)   # and one padding entry
    gq = rng.integers(-90, 91, (4, cols)).astype(np.int8)
    gE = rng.integers(-90, 91, 4).astype(np.int8)
    counts = tb.sparse_ternary_update(*state, rows, gq, gE, **HYPER)
    ref = tb.sparse_ternary_update_reference(*before, rows, gq, gE, **HYPER)
    for got, want in zip(state + [counts], ref):
        np.testing.assert_array_equal(got, want)


# --------------------------------------------------------------------------------------------
# the CUDA kernels on a GPU (CuPy), against the CPU twins


@pytest.mark.cuda
@pytest.mark.parametrize("rows,cols", [(1000, 64), (333, 37), (100, 70)])
def test_cuda_random_table_and_gather(rows, cols):
    T_gpu = cupy.empty((rows, 2 * -(-cols // 32)), dtype=cupy.uint32)
    E_gpu = cupy.empty(rows, dtype=cupy.int8)
    tb.random_table(T_gpu, cols, 99, E=E_gpu, exponent=-7)
    T_cpu = tb.random_table(np.empty(T_gpu.shape, np.uint32), cols, 99)
    np.testing.assert_array_equal(T_gpu.get(), T_cpu)
    E_cpu = np.random.default_rng(0).integers(-128, 128, rows).astype(np.int8)
    E_gpu[...] = cupy.asarray(E_cpu)
    idx = np.random.default_rng(1).integers(0, rows, 5000).astype(np.int64)
    out = tb.gather_rows(T_gpu, E_gpu, cupy.asarray(idx), cols)
    np.testing.assert_array_equal(out.get(), tb.gather_rows(T_cpu, E_cpu, idx, cols))
    half = tb.gather_rows(T_gpu, E_gpu, cupy.asarray(idx.astype(np.int32)), cols, dtype=np.float16)
    np.testing.assert_array_equal(half.get(), tb.gather_rows(T_cpu, E_cpu, idx, cols).astype(np.float16))


@pytest.mark.cuda
def test_cuda_segment_sums():
    rng = np.random.default_rng(2)
    indices = rng.integers(0, 500, 20000).astype(np.int32)
    grad = rng.standard_normal((20000, 64)).astype(np.float32)
    rows, inverse, order, offsets, count = tb.unique_rows(cupy.asarray(indices))
    u = len(np.unique(indices))
    ref = tb.segment_sum_rows_reference(grad, np.unique(indices, return_inverse=True)[1], 20000)
    np.testing.assert_array_equal(rows.get()[:u], np.unique(indices))
    assert (rows.get()[u:] == -1).all() and count.get().tolist() == [u]
    for got, want in zip((rows, inverse, order, offsets, count), tb.unique_rows(indices)):
        np.testing.assert_array_equal(got.get(), want)   # the same arrays as on the CPU
    det = tb.segment_sum_rows(cupy.asarray(grad), inverse, len(rows), segments=(order, offsets),
                              out=cupy.full((20000, 64), cupy.nan, cupy.float32))
    np.testing.assert_array_equal(det.get(), ref)  # sorted segments: bit-identical
    atomic = tb.segment_sum_rows(cupy.asarray(grad), inverse, len(rows))
    np.testing.assert_allclose(atomic.get(), ref, rtol=1e-4, atol=1e-4)  # float order varies


@pytest.mark.cuda
@pytest.mark.parametrize("cols", [64, 37, 384])
def test_cuda_segment_sums_of_hot_rows(cols):
    indices, grad = _hot_rows(cols, seed=cols)
    indices = np.concatenate([indices, np.zeros(50000, np.int64)])  # a padding-row hot spot
    grad = np.concatenate([grad, np.random.default_rng(3).standard_normal((50000, cols))
                           .astype(np.float32)])
    c_rows, c_inverse, c_order, c_offsets, _ = tb.unique_rows(indices)
    cpu = tb.segment_sum_rows(grad, c_inverse, len(c_rows), segments=(c_order, c_offsets))
    rows, inverse, order, offsets, _ = tb.unique_rows(cupy.asarray(indices))
    gpu = tb.segment_sum_rows(cupy.asarray(grad), inverse, len(rows), segments=(order, offsets))
    np.testing.assert_array_equal(gpu.get(), cpu)  # the same chunked order on both


@pytest.mark.cuda
@pytest.mark.parametrize("R,cols,u", [(100_000, 64, 3000), (500, 37, 500), (300, 70, 17)])
def test_cuda_sparse_update(R, cols, u):
    rng = np.random.default_rng(u)
    state = _state(R, cols, 5)
    rows = np.sort(rng.choice(R, u, replace=False)).astype(np.int64)
    rows = np.concatenate([rows, np.full(u // 3, -1, np.int64)])   # padding, as unique_rows
    u = rows.size
    gq = rng.integers(-90, 91, (u, cols)).astype(np.int8)
    gE = rng.integers(-90, 91, u).astype(np.int8)
    gpu = [cupy.asarray(x) for x in state]
    counts = tb.sparse_ternary_update(*gpu, cupy.asarray(rows), cupy.asarray(gq), cupy.asarray(gE), **HYPER)
    cpu_counts = tb.sparse_ternary_update(*state, rows, gq, gE, **HYPER)
    for g, c in zip(gpu + [counts], state + [cpu_counts]):
        np.testing.assert_array_equal(g.get(), c)


@pytest.mark.cuda
def test_cuda_bad_indices_raise_before_launch():
    T_packed, E, T_accum, E_accum = (cupy.asarray(x) for x in make_table(8, 64, 1))
    before = T_packed.get()
    with pytest.raises(ValueError, match=r"gather_rows: indices\[1\] = 8 is out of range"):
        tb.gather_rows(T_packed, E, cupy.asarray([0, 8]), 64)
    with pytest.raises(ValueError, match=r"sparse_ternary_update: rows must be strictly increasing"):
        tb.sparse_ternary_update(T_packed, T_accum, E, E_accum, cupy.asarray([3, 3]),
                                 cupy.ones((2, 64), cupy.int8), cupy.ones(2, cupy.int8), **HYPER)
    np.testing.assert_array_equal(T_packed.get(), before)
