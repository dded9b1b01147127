"""tritnet_kernels.update: gradient quantisation, the row-scale gradient, trit flips and exponent
steps. CPU twin against the NumPy reference (and against hand-worked cases), the CUDA kernels
against the CPU twin under the simulator (tiny shapes) and on a GPU (CuPy)."""

import numba
import numpy as np
import pytest

from tritnet import backend
from tritnet_kernels import _common
from tritnet_kernels import packing as P
from tritnet_kernels import update as U

SIM = bool(numba.config.ENABLE_CUDASIM)

cupy = backend.cupy
HAVE_GPU = backend.gpu_usable()[0]




# --- independent bitplane32 helpers (docs/kernels.md#bitplane32, written out again here) ---


def pack(T):
    rows, cols = T.shape
    groups = -(-cols // 32)
    out = np.zeros((rows, 2 * groups), dtype=np.uint32)
    for r in range(rows):
        for j in range(cols):
            if T[r, j] == 1:
                out[r, 2 * (j // 32)] |= np.uint32(1 << (j % 32))
            elif T[r, j] == -1:
                out[r, 2 * (j // 32) + 1] |= np.uint32(1 << (j % 32))
    return out


def unpack(T_packed, cols):
    rows = T_packed.shape[0]
    T = np.zeros((rows, cols), dtype=np.int64)
    for r in range(rows):
        for j in range(cols):
            p = (int(T_packed[r, 2 * (j // 32)]) >> (j % 32)) & 1
            m = (int(T_packed[r, 2 * (j // 32) + 1]) >> (j % 32)) & 1
            T[r, j] = p - m
    return T


def padding_bits(T_packed, cols):
    """All mask bits that belong to columns >= cols, OR-ed together."""
    tail = cols % 32
    if tail == 0:
        return 0
    mask = np.uint32(~((1 << tail) - 1) & 0xFFFFFFFF)
    return int(np.bitwise_or.reduce(T_packed[:, -2:] & mask, axis=None))


def random_state(rng, rows, cols):
    T = rng.integers(-1, 2, size=(rows, cols))
    return dict(
        T_packed=pack(T),
        T_accum=rng.integers(-128, 128, size=(rows, cols), dtype=np.int8),
        grad_q=rng.integers(-128, 128, size=(rows, cols), dtype=np.int8),
        E=rng.integers(-128, 128, size=rows, dtype=np.int8),
        E_accum=rng.integers(-128, 128, size=rows, dtype=np.int8),
        grad_E_q=rng.integers(-128, 128, size=rows, dtype=np.int8),
    )


def copy_state(s):
    return {k: v.copy() for k, v in s.items()}


HYPER = dict(flip_threshold=40, flip_decay_shift=2, scale_threshold=25, scale_decay_shift=1)
SHAPES = [(1, 1), (1, 31), (2, 32), (3, 33), (5, 70), (4, 100), (2, 257)]


# ---------------------------------------------------------------------- quantize_grad (CPU)


@pytest.mark.parametrize("shape", [(1,), (7,), (3, 33), (5, 70), (2, 3, 17), (1000,)])
@pytest.mark.parametrize("inv_scale", [0.0, 1.0, 7.5, 300.0])
def test_quantize_matches_reference(shape, inv_scale):
    rng = np.random.default_rng(sum(shape))
    G = rng.standard_normal(shape).astype(np.float32) * 3
    out = rng.integers(-127, 128, size=shape, dtype=np.int8)
    expected = U.quantize_grad_reference(G, inv_scale, 1234, out.copy())
    got = U.quantize_grad(G, inv_scale, 1234, out.copy())
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("clip", [1, 5, 32, 128])
def test_quantize_clip_matches_reference_and_bounds_each_call(clip):
    rng = np.random.default_rng(clip)
    G = (rng.standard_normal(2000) * 40).astype(np.float32)
    G[:4] = [np.nan, np.inf, -np.inf, 1e30]
    out = rng.integers(-127, 128, size=2000, dtype=np.int8)
    expected = U.quantize_grad_reference(G, 1.0, 8, out.copy(), clip=clip)
    got = U.quantize_grad(G, 1.0, 8, out.copy(), clip=clip)
    np.testing.assert_array_equal(got, expected)
    added = U.quantize_grad(G, 1.0, 8, np.zeros(2000, np.int8), clip=clip).astype(np.int64)
    bound = min(clip, 127)                    # 128 is the int8 range: the sum saturates first
    assert np.abs(added).max() == bound       # reached (|G| is often > clip) and never passed
    assert added[0] == 0 and added[1] == bound and added[2] == -bound


def test_quantize_adds_into_out_and_accepts_device_scale():
    rng = np.random.default_rng(1)
    G = rng.standard_normal((4, 40)).astype(np.float32)
    inv = U.grad_inv_scale_reference(G, 4.0)
    first = U.quantize_grad(G, inv, 5, np.zeros(G.shape, np.int8))
    twice = U.quantize_grad(G, inv, 5, first.copy())
    np.testing.assert_array_equal(twice, np.clip(2 * first.astype(np.int64), -127, 127))
    from_float = U.quantize_grad(G, float(inv[0]), 5, np.zeros(G.shape, np.int8))
    np.testing.assert_array_equal(first, from_float)


def test_quantize_is_deterministic_per_seed():
    G = np.full(4096, 0.5, dtype=np.float32)
    a = U.quantize_grad(G, 1.0, 42, np.zeros(4096, np.int8))
    b = U.quantize_grad(G, 1.0, 42, np.zeros(4096, np.int8))
    c = U.quantize_grad(G, 1.0, 43, np.zeros(4096, np.int8))
    np.testing.assert_array_equal(a, b)
    assert np.count_nonzero(a != c) > 1000  # nearby seeds: unrelated streams (~2048 expected)
    for seed in (0, 2**63, 2**64 - 1, np.uint64(7)):
        U.quantize_grad(G, 1.0, seed, np.zeros(4096, np.int8))


@pytest.mark.parametrize("value", [0.3, -2.7, 0.0078125, 5.0])
def test_stochastic_rounding_is_unbiased(value):
    n = 400_000
    G = np.full(n, value, dtype=np.float32)
    q = U.quantize_grad(G, 1.0, 99, np.zeros(n, np.int8)).astype(np.int64)
    lo = np.floor(np.float32(value))
    assert set(np.unique(q)) <= {lo, lo + 1}
    p = float(np.float32(value) - lo)
    sigma = np.sqrt(max(p * (1 - p), 1e-12) / n)
    assert abs(q.mean() - float(np.float32(value))) < 5 * sigma + 1e-12


def test_quantize_saturates_and_maps_nan_to_zero():
    G = np.array([np.nan, np.inf, -np.inf, 1e30, -1e30, 0.0, 3.0, -3.0], dtype=np.float32)
    out = np.array([5, 0, 0, 0, 0, 0, 126, -126], dtype=np.int8)
    U.quantize_grad(G, 1.0, 0, out)
    np.testing.assert_array_equal(out, [5, 127, -127, 127, -127, 0, 127, -127])
    out = np.array([-128, 127], dtype=np.int8)  # -128 never survives: the sum saturates at -127
    U.quantize_grad(np.array([-1.0, 1.0], np.float32), 1.0, 0, out)
    np.testing.assert_array_equal(out, [-127, 127])


def _exponent_inputs(rng, rows, cols):
    G = rng.standard_normal((rows, cols)).astype(np.float32)
    T = rng.integers(-1, 2, size=(rows, cols))
    E = rng.integers(-128, 128, rows).astype(np.int8)
    return G, T, E


def _check_against_reference(G, T_packed, E, cols, gain, **kw):
    """exponent_grad_and_scales against its reference, within float rounding (the sums are in
    another order). Returns the kernel's outputs."""
    inv, gE = U.exponent_grad_and_scales(G, T_packed, E, cols, gain, **kw)
    assert inv.dtype == gE.dtype == np.float32 and inv.shape == (2,) and gE.shape == E.shape
    ref_inv, ref_gE = U.exponent_grad_and_scales_reference(G, T_packed, E, cols, gain,
                                                           kw.get("rows"))
    np.testing.assert_allclose(inv, ref_inv, rtol=1e-6)
    np.testing.assert_allclose(gE, ref_gE, rtol=1e-5, atol=1e-6 * np.abs(ref_gE).max(initial=0))
    return inv, gE


@pytest.mark.parametrize("rows,cols", SHAPES + [(40, 300), (9, 2560), (300, 64), (3, 1424)])
def test_exponent_grad_and_scales_match_the_reference(rows, cols):
    rng = np.random.default_rng(rows * 1000 + cols)
    G, T, E = _exponent_inputs(rng, rows, cols)
    inv, gE = _check_against_reference(G, pack(T), E, cols, 8.0)
    # the exponent gradient, from its definition: dL/dE_r = (Σ_j G_rj T_rj) · 2**(E_r/8) · ln2/8
    exact = (G.astype(np.float64) * T).sum(1) * 2.0 ** (E / 8.0) * np.log(2) / 8
    np.testing.assert_allclose(gE, exact, rtol=1e-5, atol=1e-6 * np.abs(exact).max())
    np.testing.assert_allclose(inv[0], 8.0 / np.sqrt(np.mean(G.astype(np.float64) ** 2)),
                               rtol=1e-6)
    np.testing.assert_allclose(inv[1], 8.0 / np.sqrt(np.mean(gE.astype(np.float64) ** 2)),
                               rtol=1e-6)


@pytest.mark.parametrize("rows,cols", [(16400, 64), (4200, 2560)])
def test_exponent_grad_and_scales_over_many_blocks(rows, cols):
    rng = np.random.default_rng(rows + cols)
    G, T, E = _exponent_inputs(rng, rows, cols)
    G *= np.float32(1e-3)
    width = U._row_width(cols)
    assert U._grad_blocks(rows, width) == 2048 < rows / (U._GRAD_THREADS // width)  # strided
    _check_against_reference(G, pack(T), E, cols, 8.0)


def test_exponent_grad_ignores_padding_and_invalid_codes():
    G = np.ones((1, 3), np.float32)
    E = np.zeros(1, np.int8)
    # col 0 -> +1, col 1 -> 0, col 2 an invalid code (both masks): 0; bits 3..31 are padding,
    # set in both masks too
    T_packed = np.array([[0xFFFFFFFD, 0xFFFFFFFC]], dtype=np.uint32)
    _, gE = U.exponent_grad_and_scales(G, T_packed, E, 3, 8.0)
    assert gE[0] == U.EXPONENT_GRAD_FACTOR   # +1 (col 0), 0 (col 1), 0 (col 2: invalid)


def test_scales_of_zero_or_non_finite_gradients_are_zero():
    rng = np.random.default_rng(2)
    G, T, E = _exponent_inputs(rng, 30, 20)
    inv, gE = U.exponent_grad_and_scales(np.zeros_like(G), pack(T), E, 20, 8.0)
    assert not inv.any() and not gE.any()
    for bad in (np.nan, np.inf, 1e20):   # 1e20 squared overflows float32, as in NumPy
        Gb = G.copy()
        Gb[3, 4] = bad
        inv, gE = U.exponent_grad_and_scales(Gb, pack(T), E, 20, 8.0)
        assert inv[0] == 0
        # A non-finite gradient therefore gives the trits no update at all,
        assert not U.quantize_grad(Gb, inv[:1], 1, np.zeros(G.shape, np.int8)).any()
        # nor the exponents when it reaches dL/dE (not through a zero trit)
        assert np.isfinite(gE).all() or inv[1] == 0


def test_a_clock_gives_each_step_its_bits_and_gain():
    """The optimiser's clock [step, gain], read on the device: quantize_grad's stream is that
    of (seed, step) -- the reference's `step` --, a new one each step; the scales' gain is
    clock[1] whatever grad_gain says."""
    rng = np.random.default_rng(9)
    G = rng.standard_normal((40, 30)).astype(np.float32)
    outs = []
    for step in (0, 1, 2):
        clock = np.array([step, 5 << 32])   # gain 5, in units of 2**-32
        got = U.quantize_grad(G, 1.7, 123, np.zeros(G.shape, np.int8), clock=clock)
        want = U.quantize_grad_reference(G, 1.7, 123, np.zeros(G.shape, np.int8), step=step)
        np.testing.assert_array_equal(got, want)
        outs.append(got)
    assert not np.array_equal(outs[0], outs[1]) and not np.array_equal(outs[1], outs[2])
    plain = U.quantize_grad(G, 1.7, 123, np.zeros(G.shape, np.int8))
    np.testing.assert_array_equal(plain, U.quantize_grad_reference(G, 1.7, 123,
                                                                   np.zeros(G.shape, np.int8)))
    _, T, E = _exponent_inputs(rng, 40, 30)
    args = (G, pack(T), E, 30)
    for a, b in zip(U.exponent_grad_and_scales(*args, 99.0, clock=np.array([3, 5 << 32])),
                    U.exponent_grad_and_scales(*args, 5.0)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match=r"quantize_grad: clock has shape \(3,\), expected \(2,\)"):
        U.quantize_grad(G, 1.7, 123, np.zeros(G.shape, np.int8), clock=np.zeros(3, np.int64))
    with pytest.raises(TypeError, match=r"exponent_grad_and_scales: clock has dtype float64, "
                                        r"expected int64"):
        U.exponent_grad_and_scales(*args, 5.0, clock=np.zeros(2))


@pytest.mark.parametrize("u", [0, 1, 17, 40])
def test_exponent_grad_and_scales_over_leading_rows(u):
    # a table's touched rows padded to a fixed count: only the first u rows count
    rng = np.random.default_rng(u)
    G, T, E = _exponent_inputs(rng, 40, 9)
    G[u:] = 0
    rows = np.array([u], np.int64)
    inv, gE = _check_against_reference(G, pack(T), E, 9, 8.0, rows=rows)
    inv_u, gE_u = U.exponent_grad_and_scales(G[:u], pack(T)[:u], E[:u], 9, 8.0)
    np.testing.assert_allclose(inv, inv_u if u else [0, 0], rtol=1e-6)
    np.testing.assert_array_equal(gE[:u], gE_u)
    assert not gE[u:].any()   # padding rows: no gradient


@pytest.mark.parametrize("change,error,match", [
    (dict(G=np.ones(40, np.float32)), ValueError, r"G has shape \(40,\), expected 2 dimensions"),
    (dict(G=np.ones((2, 40), np.float16)), TypeError, "G has dtype float16"),
    (dict(cols=39), ValueError, r"G has shape \(2, 40\), expected \(rows, 39\)"),
    (dict(T_packed=np.zeros((2, 2), np.uint32)), ValueError,
     r"T_packed has shape \(2, 2\), expected \(2, 4\)"),
    (dict(E=np.zeros(3, np.int8)), ValueError, r"E has shape \(3,\), expected \(2,\)"),
    (dict(grad_gain=0.0), ValueError, "grad_gain = 0.0"),
    (dict(grad_gain="8"), TypeError, "grad_gain must be a real number"),
    (dict(rows=np.array([2], np.int32)), TypeError, "rows has dtype int32, expected int64"),
    (dict(rows=np.array([2, 2], np.int64)), ValueError, r"rows has shape \(2,\), expected \(1,\)"),
])
def test_exponent_grad_and_scales_reject_bad_input(change, error, match):
    args = dict(G=np.ones((2, 40), np.float32), T_packed=np.zeros((2, 4), np.uint32),
                E=np.zeros(2, np.int8), cols=40, grad_gain=8.0)
    args.update(change)
    with pytest.raises(error, match=match):
        U.exponent_grad_and_scales(**args)


# ------------------------------------------------------------------ the update rule (CPU)


@pytest.mark.parametrize("rows,cols", SHAPES)
@pytest.mark.parametrize("hyper", [HYPER, dict(flip_threshold=1, flip_decay_shift=0,
                                               scale_threshold=127, scale_decay_shift=7)])
def test_ternary_update_matches_reference(rows, cols, hyper):
    rng = np.random.default_rng(rows * 7 + cols)
    s = random_state(rng, rows, cols)
    T_ref, Ta_ref, E_ref, Ea_ref, counts_ref = U.ternary_update_reference(**s, **hyper)
    got = copy_state(s)
    counts = U.ternary_update(**got, cols=cols, **hyper)
    np.testing.assert_array_equal(got["T_packed"], T_ref)
    np.testing.assert_array_equal(got["T_accum"], Ta_ref)
    np.testing.assert_array_equal(got["E"], E_ref)
    np.testing.assert_array_equal(got["E_accum"], Ea_ref)
    np.testing.assert_array_equal(counts, counts_ref)
    changed = unpack(got["T_packed"], cols) != unpack(s["T_packed"], cols)
    assert counts[0] == np.count_nonzero(changed)
    assert counts[1] == np.count_nonzero(got["E"] != s["E"])
    assert not got["grad_q"].any() and not got["grad_E_q"].any()
    assert padding_bits(got["T_packed"], cols) == 0
    assert not (got["T_packed"][:, 0::2] & got["T_packed"][:, 1::2]).any()
    assert got["T_accum"].min() >= -127 and got["E_accum"].min() >= -127


def _step(s, cols, **hyper):
    """ternary_update on a state dict, with the module's defaults for unspecified hyper."""
    return U.ternary_update(**s, cols=cols, **{**HYPER, **hyper})


def test_hand_worked_trit_cases():
    # (t, accum, grad) -> (t, accum) with flip_threshold 50, flip_decay_shift 2
    cases = [
        ((0, 30, 20), (-1, 0)),      # reaches +50: descend
        ((0, -30, -20), (1, 0)),     # reaches -50: ascend
        ((1, 127, 100), (0, 0)),     # saturates at 127, still flips
        ((-1, 127, 100), (-1, 96)),  # blocked at -1: 127 - (127 >> 2) = 96, no reset
        ((1, -127, -1), (1, -96)),   # blocked at +1
        ((0, 40, 0), (0, 30)),       # decays 40 - 10
        ((0, -3, 0), (0, -3)),       # 3 >> 2 == 0: small values do not decay
        ((-1, -60, 10), (0, 0)),     # -50 after the gradient: ascend
        ((0, -128, -128), (1, 0)),   # -256 saturates at -127
    ]
    cols = len(cases)
    T = np.array([[c[0][0] for c in cases]])
    # The row's exponent sits still (zero accumulator, zero gradient): only trits move.
    s = dict(T_packed=pack(T), T_accum=np.array([[c[0][1] for c in cases]], np.int8),
             grad_q=np.array([[c[0][2] for c in cases]], np.int8),
             E=np.array([5], np.int8), E_accum=np.zeros(1, np.int8),
             grad_E_q=np.zeros(1, np.int8))
    counts = _step(s, cols, flip_threshold=50, flip_decay_shift=2)
    np.testing.assert_array_equal(unpack(s["T_packed"], cols)[0], [c[1][0] for c in cases])
    np.testing.assert_array_equal(s["T_accum"][0], [c[1][1] for c in cases])
    assert counts.dtype == np.int64 and counts.shape == (2,)
    np.testing.assert_array_equal(counts, [5, 0])
    assert s["E"][0] == 5 and s["E_accum"][0] == 0
    assert not s["grad_q"].any()


def test_hand_worked_carried_flips():
    # (t, accum, grad) -> (t, accum) with flip_threshold 50 and flip_carry: a flip moves the
    # accumulator by 2·50 to the far edge of the new trit's bin; a blocked trit keeps it.
    cases = [
        ((0, 30, 20), (-1, -50)),     # reaches +50: descend, 50 - 100
        ((0, -30, -27), (1, 43)),     # reaches -57: ascend, -57 + 100
        ((1, 127, 100), (0, 27)),     # saturates at 127, flips: 127 - 100
        ((-1, 127, 100), (-1, 127)),  # blocked at -1: no flip, nothing taken away
        ((0, 49, 0), (0, 49)),        # under the threshold: kept (no decay)
        ((-1, -60, 5), (0, 45)),      # -55: ascend, -55 + 100
    ]
    cols = len(cases)
    s = dict(T_packed=pack(np.array([[c[0][0] for c in cases]])),
             T_accum=np.array([[c[0][1] for c in cases]], np.int8),
             grad_q=np.array([[c[0][2] for c in cases]], np.int8),
             E=np.array([5], np.int8), E_accum=np.array([9], np.int8),
             grad_E_q=np.array([1], np.int8))
    ref = U.ternary_update_reference(**copy_state(s), flip_threshold=50, flip_decay_shift=0,
                                     scale_threshold=10, flip_carry=True)
    counts = _step(s, cols, flip_threshold=50, flip_decay_shift=0, scale_threshold=10,
                   scale_decay_shift=0, flip_carry=True)
    np.testing.assert_array_equal(unpack(s["T_packed"], cols)[0], [c[1][0] for c in cases])
    np.testing.assert_array_equal(s["T_accum"][0], [c[1][1] for c in cases])
    np.testing.assert_array_equal(counts, [4, 1])
    # exponents are never carried: 9 + 1 reaches 10, E steps down and its accumulator is 0
    assert s["E"][0] == 4 and s["E_accum"][0] == 0
    for got, want in zip((s["T_packed"], s["T_accum"], s["E"], s["E_accum"], counts), ref):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("rows,cols", SHAPES)
def test_carried_update_matches_reference(rows, cols):
    rng = np.random.default_rng(rows * 11 + cols)
    s = random_state(rng, rows, cols)
    ref = U.ternary_update_reference(**copy_state(s), **HYPER, flip_carry=True)
    counts = U.ternary_update(**s, cols=cols, **HYPER, flip_carry=True)
    for got, want in zip((s["T_packed"], s["T_accum"], s["E"], s["E_accum"], counts), ref):
        np.testing.assert_array_equal(got, want)
    assert s["T_accum"].min() >= -127


@pytest.mark.parametrize("shape,bound", [((1,), 0), ((7,), 1), ((3, 33), 63), ((40, 70), 127)])
def test_spread_accumulators_match_reference_and_cover_the_range(shape, bound):
    a = np.full(shape, 99, np.int8)
    assert U.spread_accumulators(a, 1234, bound) is a
    np.testing.assert_array_equal(a, U.spread_accumulators_reference(shape, 1234, bound))
    assert a.min() >= -bound and a.max() <= bound
    if a.size > 50 * (2 * bound + 1):
        assert a.min() == -bound and a.max() == bound
        assert abs(float(a.mean())) < 0.1 * (bound + 1)
    other = np.zeros(shape, np.int8)
    U.spread_accumulators(other, 1235, bound)
    assert bound == 0 or a.size < 8 or not np.array_equal(a, other)


@pytest.mark.parametrize("change,error,match", [
    (dict(accum=np.zeros(3, np.int16)), TypeError, "dtype int16"),
    (dict(accum=np.zeros((3, 4), np.int8)[:, ::2]), ValueError, "C-contiguous"),
    (dict(bound=128), ValueError, "bound = 128"),
    (dict(seed=-1), ValueError, "seed = -1"),
])
def test_spread_accumulators_reject_bad_input(change, error, match):
    args = {**dict(accum=np.zeros(5, np.int8), seed=1, bound=10), **change}
    before = args["accum"].copy()
    with pytest.raises(error, match=match):
        U.spread_accumulators(**args)
    np.testing.assert_array_equal(args["accum"], before)


def test_count_saturated_matches_reference_and_adds():
    rng = np.random.default_rng(3)
    a = rng.integers(-127, 128, size=(37, 41), dtype=np.int8)
    a[0, :5] = 127
    a[1, :3] = -127
    out = np.array([5, 7], np.int64)
    assert U.count_saturated(a, out, 1) is out
    np.testing.assert_array_equal(out, [5, 7 + U.count_saturated_reference(a)])
    assert U.count_saturated_reference(a) == np.count_nonzero((a == 127) | (a == -127)) >= 8
    with pytest.raises(ValueError, match="index = 2"):
        U.count_saturated(a, out, 2)
    with pytest.raises(TypeError, match="dtype int32"):
        U.count_saturated(a, out.astype(np.int32), 0)


def test_hand_worked_exponent_cases():
    # (E, accum, grad) -> (E, accum) with scale_threshold 10, scale_decay_shift 1
    cases = [
        ((0, 5, 5), (-1, 0)),
        ((-128, 100, 27), (-128, 64)),   # blocked at -128: 127 - 63
        ((127, -100, -27), (127, -64)),  # blocked at 127
        ((-128, -9, -1), (-127, 0)),     # leaves the bottom end
        ((127, 9, 1), (126, 0)),
        ((3, 9, 0), (3, 5)),             # 9 - 4
        ((3, -1, 0), (3, -1)),
    ]
    rows = len(cases)
    # One column per row whose trit sits still (zero accumulator, zero gradient).
    T_packed = pack(np.ones((rows, 1), np.int64))
    s = dict(T_packed=T_packed.copy(), T_accum=np.zeros((rows, 1), np.int8),
             grad_q=np.zeros((rows, 1), np.int8),
             E=np.array([c[0][0] for c in cases], np.int8),
             E_accum=np.array([c[0][1] for c in cases], np.int8),
             grad_E_q=np.array([c[0][2] for c in cases], np.int8))
    counts = _step(s, 1, scale_threshold=10, scale_decay_shift=1)
    np.testing.assert_array_equal(s["E"], [c[1][0] for c in cases])
    np.testing.assert_array_equal(s["E_accum"], [c[1][1] for c in cases])
    assert counts.dtype == np.int64 and counts.shape == (2,)
    np.testing.assert_array_equal(counts, [0, 3])
    np.testing.assert_array_equal(s["T_packed"], T_packed)
    assert not s["T_accum"].any()
    assert not s["grad_E_q"].any()


def test_trit_and_exponent_halves_are_independent():
    # The one launch does two separate jobs: the trits' result does not depend on the
    # exponent state, nor the exponents' on the trit state, and each half alone is the
    # reference's trits-only step.
    rng = np.random.default_rng(3)
    s = random_state(rng, 6, 45)
    other = random_state(rng, 6, 45)
    fused = copy_state(s)
    counts = U.ternary_update(**fused, cols=45, **HYPER)
    trit_half = {**copy_state(s), **{k: other[k].copy() for k in ("E", "E_accum", "grad_E_q")}}
    counts_t = U.ternary_update(**trit_half, cols=45, **HYPER)
    scale_half = {**copy_state(other), **{k: s[k].copy() for k in ("E", "E_accum", "grad_E_q")}}
    counts_e = U.ternary_update(**scale_half, cols=45, **HYPER)
    for k in ("T_packed", "T_accum", "grad_q"):
        np.testing.assert_array_equal(trit_half[k], fused[k], err_msg=k)
    for k in ("E", "E_accum", "grad_E_q"):
        np.testing.assert_array_equal(scale_half[k], fused[k], err_msg=k)
    T_ref, Ta_ref, E_none, Ea_none, trit_counts_ref = U.ternary_update_reference(
        s["T_packed"], s["T_accum"], s["grad_q"], **HYPER)
    assert E_none is None and Ea_none is None
    np.testing.assert_array_equal(fused["T_packed"], T_ref)
    np.testing.assert_array_equal(fused["T_accum"], Ta_ref)
    _, _, _, _, counts_ref = U.ternary_update_reference(**s, **HYPER)
    np.testing.assert_array_equal(counts, counts_ref)
    assert (counts_t[0], counts_e[1]) == tuple(counts_ref)
    assert trit_counts_ref[0] == counts_ref[0] and trit_counts_ref[1] == 0
    assert counts_ref[0] > 0 and counts_ref[1] > 0


def test_counts_accumulate_and_zero_grad_false_keeps_gradients():
    rng = np.random.default_rng(4)
    s = random_state(rng, 3, 50)
    counts = np.array([10, 20], np.int64)
    grads = s["grad_q"].copy(), s["grad_E_q"].copy()
    _, _, _, _, counts_ref = U.ternary_update_reference(**s, **HYPER)
    U.ternary_update(**s, cols=50, **HYPER, zero_grad=False, counts=counts)
    np.testing.assert_array_equal(counts, counts_ref + [10, 20])
    np.testing.assert_array_equal(s["grad_q"], grads[0])
    np.testing.assert_array_equal(s["grad_E_q"], grads[1])


def test_invalid_code_reads_as_zero_and_padding_is_cleared():
    T_packed = np.array([[0b101 | (1 << 20), 0b110 | (1 << 21)]], np.uint32)  # col 2: both masks
    s = dict(T_packed=T_packed, T_accum=np.zeros((1, 3), np.int8),
             grad_q=np.zeros((1, 3), np.int8), E=np.zeros(1, np.int8),
             E_accum=np.zeros(1, np.int8), grad_E_q=np.zeros(1, np.int8))
    counts = _step(s, 3, flip_threshold=10, flip_decay_shift=0)
    np.testing.assert_array_equal(unpack(T_packed, 3)[0], [1, -1, 0])
    assert padding_bits(T_packed, 3) == 0
    np.testing.assert_array_equal(counts, [0, 0])


def _still_exponents(rows):
    """E state that never moves: zero accumulator and, each step, zero gradient."""
    return dict(E=np.full(rows, -7, np.int8), E_accum=np.zeros(rows, np.int8),
                grad_E_q=np.zeros(rows, np.int8))


def test_repeated_steps_follow_a_consistent_gradient():
    # A constant positive gradient walks every trit down to -1 (a flip every second step at
    # threshold 60) and then holds it there, its accumulator saturated.
    rows, cols = 4, 37
    s = dict(T_packed=pack(np.ones((rows, cols), np.int64)),
             T_accum=np.zeros((rows, cols), np.int8), **_still_exponents(rows))
    total = np.zeros(2, np.int64)
    for step in range(10):
        s["grad_q"] = np.full((rows, cols), 30, np.int8)
        U.ternary_update(**s, cols=cols, **{**HYPER, "flip_threshold": 60,
                                            "flip_decay_shift": 0}, counts=total)
        assert (unpack(s["T_packed"], cols) == max(-1, 1 - (step + 1) // 2)).all()
    np.testing.assert_array_equal(total, [2 * rows * cols, 0])
    assert (s["T_accum"] == 127).all()
    assert (s["E"] == -7).all() and not s["E_accum"].any()
    # With decay, the same gradient settles below the threshold: no further flips.
    s = dict(T_packed=pack(np.ones((rows, cols), np.int64)),
             T_accum=np.zeros((rows, cols), np.int8), **_still_exponents(rows))
    for _ in range(20):
        s["grad_q"] = np.full((rows, cols), 10, np.int8)
        counts = U.ternary_update(**s, cols=cols, **{**HYPER, "flip_threshold": 60,
                                                     "flip_decay_shift": 1})
        np.testing.assert_array_equal(counts, [0, 0])
    # a = ceil((a + 10) / 2)
    assert (unpack(s["T_packed"], cols) == 1).all() and (s["T_accum"] == 10).all()


# ----------------------------------------------------------------------------- bad input


def _state_for_errors():
    rng = np.random.default_rng(5)
    return random_state(rng, 3, 40)


def _assert_untouched(before, after):
    for k in before:
        np.testing.assert_array_equal(after[k], before[k], err_msg=k)


@pytest.mark.parametrize("change,error,match", [
    (lambda s: s.update(T_accum=s["T_accum"].astype(np.int16)), TypeError, "T_accum has dtype int16"),
    (lambda s: s.update(grad_q=s["grad_q"][:, :39].copy()), ValueError, "grad_q has shape"),
    (lambda s: s.update(T_packed=s["T_packed"][:, :2].copy()), ValueError, r"expected \(3, 4\)"),
    (lambda s: s.update(T_packed=s["T_packed"].astype(np.int32)), TypeError, "T_packed has dtype"),
    (lambda s: s.update(E=s["E"][:2].copy()), ValueError, "one exponent per row"),
    (lambda s: s.update(E_accum=s["E_accum"].astype(np.uint8)), TypeError, "E_accum has dtype"),
    (lambda s: s.update(grad_q=np.zeros((3, 80), np.int8)[:, ::2]), ValueError, "not C-contiguous"),
    (lambda s: s.update(grad_q=s["T_accum"]), ValueError, "share memory"),
    (lambda s: s.update(grad_E_q=s["E_accum"][::-1][::-1]), ValueError, "share memory"),
    (lambda s: s.update(T_accum=s["T_accum"].tolist()), TypeError, "must be a NumPy or CuPy array"),
])
def test_ternary_update_rejects_bad_arrays(change, error, match):
    s = _state_for_errors()
    before, originals = copy_state(s), dict(s)
    change(s)
    with pytest.raises(error, match=match):
        U.ternary_update(**s, cols=40, **HYPER)
    _assert_untouched(before, originals)


@pytest.mark.parametrize("name,value,error", [
    ("flip_threshold", 0, ValueError), ("flip_threshold", 128, ValueError),
    ("scale_threshold", -5, ValueError), ("flip_decay_shift", 8, ValueError),
    ("scale_decay_shift", -1, ValueError), ("flip_threshold", 3.0, TypeError),
    ("flip_threshold", True, TypeError), ("scale_threshold", None, TypeError),
])
def test_ternary_update_rejects_bad_hyperparameters(name, value, error):
    s = _state_for_errors()
    before = copy_state(s)
    with pytest.raises(error, match=name):
        U.ternary_update(**s, cols=40, **{**HYPER, name: value})
    _assert_untouched(before, s)


def test_bad_counts_and_read_only_arrays():
    s = _state_for_errors()
    before = copy_state(s)
    with pytest.raises(TypeError, match="counts has dtype"):
        U.ternary_update(**s, cols=40, **HYPER, counts=np.zeros(2, np.int32))
    with pytest.raises(ValueError, match=r"counts has shape \(1,\), expected \(2,\)"):
        U.ternary_update(**s, cols=40, **HYPER, counts=np.zeros(1, np.int64))
    with pytest.raises(ValueError, match=r"counts has shape \(3,\), expected \(2,\)"):
        U.ternary_update(**s, cols=40, **HYPER, counts=np.zeros(3, np.int64))
    with pytest.raises(ValueError, match=r"T_accum has shape \(3, 40\), expected \(rows, 41\)"):
        U.ternary_update(**s, cols=41, **HYPER)
    with pytest.raises(TypeError, match="cols must be an integer"):
        U.ternary_update(**s, cols=40.0, **HYPER)
    with pytest.raises(ValueError, match="scale_decay_shift = 9 is out of range"):
        U.ternary_update(**s, cols=40, **{**HYPER, "scale_decay_shift": 9})
    with pytest.raises(ValueError, match=r"cols = 0 is out of range, expected 1\.\."):
        U.ternary_update(np.zeros((2, 0), np.uint32), np.zeros((2, 0), np.int8),
                         np.zeros((2, 0), np.int8), np.zeros(2, np.int8), np.zeros(2, np.int8),
                         np.zeros(2, np.int8), 0, **HYPER)
    read_only_counts = np.zeros(2, np.int64)
    read_only_counts.flags.writeable = False
    with pytest.raises(ValueError, match="counts is read-only"):
        U.ternary_update(**s, cols=40, **HYPER, counts=read_only_counts)
    s["T_accum"].flags.writeable = False
    with pytest.raises(ValueError, match="T_accum is read-only"):
        U.ternary_update(**s, cols=40, **HYPER)
    _assert_untouched(before, s)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(G=np.zeros((2, 3), np.float64)), TypeError, "G has dtype float64"),
    (dict(out=np.zeros((3, 2), np.int8)), ValueError, "out has shape"),
    (dict(out=np.zeros((2, 3), np.int16)), TypeError, "out has dtype int16"),
    (dict(G=np.zeros((3, 2), np.float32).T), ValueError, "G is not C-contiguous"),
    (dict(inv_scale=-1.0), ValueError, "inv_scale"),
    (dict(inv_scale=float("nan")), ValueError, "inv_scale"),
    (dict(inv_scale=1e39), ValueError, "float32 max"),
    (dict(inv_scale=np.ones(2, np.float32)), ValueError, "inv_scale has shape"),
    (dict(inv_scale=np.ones(1, np.float64)), TypeError, "inv_scale has dtype"),
    (dict(inv_scale="1"), TypeError, "inv_scale must be"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(seed=2**64), ValueError, "seed"),
    (dict(seed=1.5), TypeError, "seed"),
    (dict(clip=0), ValueError, r"clip = 0 is out of range, expected 1\.\.128"),
    (dict(clip=129), ValueError, "clip = 129"),
    (dict(clip=2.0), TypeError, "clip must be an integer"),
])
def test_quantize_rejects_bad_input(kwargs, error, match):
    args = dict(G=np.ones((2, 3), np.float32), inv_scale=1.0, seed=0, out=np.zeros((2, 3), np.int8))
    args.update(kwargs)
    out_before = args["out"].copy()
    with pytest.raises(error, match=match):
        U.quantize_grad(**args)
    np.testing.assert_array_equal(args["out"], out_before)


# ------------------------------------------------------------ CUDA kernels in the simulator


def _sim_inputs(seed=0, rows=3, cols=37):
    rng = np.random.default_rng(seed)
    return rng, random_state(rng, rows, cols)


def _twin_exponent_grad_and_scales(G, T_packed, E, cols, gain, rows=None, clock=None):
    """The CPU twin called directly (the wrapper runs the simulator when it is on)."""
    width = U._row_width(cols)
    inv, gE = np.zeros(2, np.float32), np.zeros(E.shape[0], np.float32)
    no = np.zeros(0, np.int64)
    U._exponent_grad_and_scales_cpu(
        G, T_packed, E, np.int64(cols), np.int64(width), float(G.size), float(cols),
        no if rows is None else rows, float(gain), no if clock is None else clock,
        np.empty((U._grad_blocks(E.shape[0], width), 2)), np.zeros(1, np.int32), inv, gE)
    return inv, gE


@pytest.mark.cudasim
@pytest.mark.parametrize("rows,cols,max_blocks",
                         [(1, 1, 1024), (9, 37, 1024),   # one block of 8 rows; two blocks
                          (17, 33, 2), (3, 600, 2),      # blocks take several groups
                          (2, 70, 1)])
def test_sim_exponent_grad_and_scales_match_cpu_twin(monkeypatch, rows, cols, max_blocks):
    monkeypatch.setattr(U, "_GRAD_MAX_BLOCKS", max_blocks)
    rng = np.random.default_rng(rows + cols)
    G, T, E = _exponent_inputs(rng, rows, cols)
    for kw in (dict(), dict(clock=np.array([41, 3 << 32])), dict(rows=np.array([rows - 1]))):
        want = _twin_exponent_grad_and_scales(G, pack(T), E, cols, 8.0, **kw)
        for _ in range(2):   # the block counter is left at 0 for the next call
            got = U.exponent_grad_and_scales(G, pack(T), E, cols, 8.0, **kw)
            for g, w in zip(got, want):
                np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_quantize_without_accumulating_overwrites_whatever_out_held(device):
    """accumulate=False writes the quantised gradient: what zeros + add would give, whatever
    the buffer held before (so a fresh buffer needs no zero fill)."""
    rng = np.random.default_rng(9)
    G = backend.to_device((rng.standard_normal(5000) * 3).astype(np.float32), device)
    garbage = backend.to_device(rng.integers(-128, 128, 5000, dtype=np.int8), device)
    want = U.quantize_grad(G, 1.5, 11, backend.to_device(np.zeros(5000, np.int8), device))
    got = U.quantize_grad(G, 1.5, 11, garbage, accumulate=False)
    assert got is garbage
    np.testing.assert_array_equal(backend.to_numpy(got), backend.to_numpy(want))
    np.testing.assert_array_equal(
        backend.to_numpy(want),
        U.quantize_grad_reference(backend.to_numpy(G), 1.5, 11, np.zeros(5000, np.int8)))


@pytest.mark.cudasim
@pytest.mark.parametrize("max_blocks", [_common.MAX_BLOCKS, 1])
def test_sim_quantize_matches_cpu_twin(monkeypatch, max_blocks):
    # 1: every thread strides the grid, four elements a pass and then the rest
    monkeypatch.setattr(_common, "SIMULATOR_MAX_BLOCKS", max_blocks)
    rng = np.random.default_rng(6)
    G = (rng.standard_normal(1100) * 4).astype(np.float32)
    G[:3] = [np.nan, np.inf, -1e30]
    out = rng.integers(-127, 128, size=1100, dtype=np.int8)
    no_clock = np.zeros(0, np.int64)
    expected = out.copy()  # the CPU twin, called directly: the wrapper runs the simulator
    U._quantize_grad_cpu(G, np.array([2.5], np.float32), _common.stream_key(77), np.float32(128),
                         np.int64(1), no_clock, expected)
    got = U.quantize_grad(G, 2.5, 77, out.copy())
    np.testing.assert_array_equal(got, expected)
    expected = out.copy()
    U._quantize_grad_cpu(G, np.array([2.5], np.float32), _common.stream_key(77), np.float32(6),
                         np.int64(1), no_clock, expected)
    np.testing.assert_array_equal(U.quantize_grad(G, 2.5, 77, out.copy(), clip=6), expected)
    expected = out.copy()
    U._quantize_grad_cpu(G, np.array([2.5], np.float32), _common.stream_key(77), np.float32(6),
                         np.int64(0), no_clock, expected)
    np.testing.assert_array_equal(
        U.quantize_grad(G, 2.5, 77, out.copy(), clip=6, accumulate=False), expected)
    clock = np.array([41, 3 << 32])   # the step's bits: the key mixed with step 41 in-kernel
    expected = out.copy()
    U._quantize_grad_cpu(G, np.array([2.5], np.float32), _common.stream_key(77), np.float32(128),
                         np.int64(1), clock, expected)
    np.testing.assert_array_equal(U.quantize_grad(G, 2.5, 77, out.copy(), clock=clock), expected)


@pytest.mark.cudasim
@pytest.mark.parametrize("rows,cols,max_blocks",
                         [(1, 1, 4096), (3, 37, 4096), (5, 64, 1), (9, 33, 1),
                          (2, 300, 1), (3, 520, 4096)])   # rows of more than 8 groups
@pytest.mark.parametrize("carry", [False, True])
def test_sim_ternary_update_matches_cpu_twin(monkeypatch, rows, cols, max_blocks, carry):
    monkeypatch.setattr(_common, "SIMULATOR_MAX_BLOCKS", max_blocks)
    _, s = _sim_inputs(rows * cols, rows, cols)
    cpu = copy_state(s)
    cpu_counts = np.zeros(2, np.int64)
    U._ternary_update_cpu(cpu["T_packed"], cpu["T_accum"], cpu["grad_q"], cpu["E"],
                          cpu["E_accum"], cpu["grad_E_q"], np.int64(cols),
                          np.int64(HYPER["flip_threshold"]), np.int64(HYPER["flip_decay_shift"]),
                          np.int64(carry), np.int64(HYPER["scale_threshold"]),
                          np.int64(HYPER["scale_decay_shift"]), True, cpu_counts)
    sim = copy_state(s)
    counts = U.ternary_update(**sim, cols=cols, **HYPER, flip_carry=carry)
    for k in s:
        np.testing.assert_array_equal(sim[k], cpu[k], err_msg=k)
    np.testing.assert_array_equal(counts, cpu_counts)
    assert padding_bits(sim["T_packed"], cols) == 0


@pytest.mark.cudasim
def test_sim_zero_grad_false_and_counts_accumulate():
    # The kernel's zero_grad=False path and a caller's counter, over two steps.
    hyper = dict(flip_threshold=20, flip_decay_shift=3, scale_threshold=15, scale_decay_shift=2)
    _, s = _sim_inputs(8, 2, 40)
    first = U.ternary_update_reference(**s, **hyper)
    grads = s["grad_q"].copy(), s["grad_E_q"].copy()
    counts = np.array([10, 20], np.int64)
    assert U.ternary_update(**s, cols=40, **hyper, zero_grad=False, counts=counts) is counts
    for got, want in zip((s["T_packed"], s["T_accum"], s["E"], s["E_accum"]), first):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(counts, first[4] + [10, 20])
    np.testing.assert_array_equal(s["grad_q"], grads[0])
    np.testing.assert_array_equal(s["grad_E_q"], grads[1])
    second = U.ternary_update_reference(**s, **hyper)
    U.ternary_update(**s, cols=40, **hyper, counts=counts)
    for got, want in zip((s["T_packed"], s["T_accum"], s["E"], s["E_accum"]), second):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(counts, first[4] + second[4] + [10, 20])
    assert not s["grad_q"].any() and not s["grad_E_q"].any()


@pytest.mark.cudasim
@pytest.mark.parametrize("size,max_blocks", [(1, 4096), (1000, 4096), (3000, 1)])
def test_sim_spread_and_count_saturated_match_cpu_twins(monkeypatch, size, max_blocks):
    monkeypatch.setattr(_common, "SIMULATOR_MAX_BLOCKS", max_blocks)
    cpu = np.zeros(size, np.int8)
    U._spread_accumulators_cpu(cpu, _common.stream_key(77), np.int64(127))
    sim = np.zeros(size, np.int8)
    U.spread_accumulators(sim, 77, 127)
    np.testing.assert_array_equal(sim, cpu)
    np.testing.assert_array_equal(sim, U.spread_accumulators_reference((size,), 77, 127))
    out = np.array([3, 0], np.int64)
    U.count_saturated(sim, out, 0)
    assert out[0] == 3 + U.count_saturated_reference(sim)


@pytest.mark.cudasim
def test_sim_exponents_stride_the_grid(monkeypatch):
    # One block of 8 warps for 300 rows of one group each: every warp strides the grid, and
    # each row's exponent is stepped once, by the warp that owns the row's group 0.
    monkeypatch.setattr(_common, "SIMULATOR_MAX_BLOCKS", 1)
    _, s = _sim_inputs(10, 300, 1)
    cpu = copy_state(s)
    cpu_counts = np.zeros(2, np.int64)
    U._ternary_update_cpu(cpu["T_packed"], cpu["T_accum"], cpu["grad_q"], cpu["E"],
                          cpu["E_accum"], cpu["grad_E_q"], np.int64(1), np.int64(20),
                          np.int64(3), np.int64(0), np.int64(20), np.int64(3), True, cpu_counts)
    counts = U.ternary_update(**s, cols=1, flip_threshold=20, flip_decay_shift=3,
                              scale_threshold=20, scale_decay_shift=3)
    for k in s:
        np.testing.assert_array_equal(s[k], cpu[k], err_msg=k)
    np.testing.assert_array_equal(counts, cpu_counts)
    assert counts[1] > 0


# ---------------------------------------------------------------- CUDA kernels on a GPU


@pytest.mark.cuda
def test_cuda_quantize_matches_cpu_twin():
    rng = np.random.default_rng(9)
    n = 4_500_003  # over 4 · MAX_BLOCKS · 256: the four-a-thread loop runs, then the rest
    G = (rng.standard_normal(n) * 3).astype(np.float32)
    G[:3] = [np.nan, np.inf, -np.inf]
    out = rng.integers(-127, 128, size=n, dtype=np.int8)
    expected = U.quantize_grad(G, 1.75, 2**40 + 3, out.copy())
    G_d, out_d = cupy.asarray(G), cupy.asarray(out)
    U.quantize_grad(G_d, 1.75, 2**40 + 3, out_d)
    np.testing.assert_array_equal(out_d.get(), expected)
    inv = cupy.asarray(U.grad_inv_scale_reference(G[3:], 4.0))
    out_d[...] = 0
    U.quantize_grad(G_d[3:], inv, 5, out_d[3:])
    expected = U.quantize_grad(G[3:], inv.get(), 5, np.zeros(n - 3, np.int8))
    np.testing.assert_array_equal(out_d.get()[3:], expected)
    out_d[...] = 0
    U.quantize_grad(G_d, 9.0, 6, out_d, clip=12)
    expected = U.quantize_grad(G, 9.0, 6, np.zeros(n, np.int8), clip=12)
    np.testing.assert_array_equal(out_d.get(), expected)
    assert np.abs(expected.astype(np.int64)).max() == 12


@pytest.mark.cuda
def test_cuda_exponent_grad_and_scales_are_bit_identical_to_the_cpu_twin():
    rng = np.random.default_rng(12)
    for rows, cols in [(1, 1), (7, 3), (384, 768), (3, 1424), (2560, 2560), (5000, 64)]:
        G, T, E = _exponent_inputs(rng, rows, cols)
        G *= (10 ** rng.uniform(-4, 2, G.shape)).astype(np.float32)
        T_packed = P.pack_trits_reference(T)
        dev = [cupy.asarray(a) for a in (G, T_packed, E)]
        for kw in (dict(), dict(clock=np.array([7, 3 << 32]))):
            want = U.exponent_grad_and_scales(G, T_packed, E, cols, 8.0, **kw)
            kw_d = {k: cupy.asarray(v) for k, v in kw.items()}
            for _ in range(2):   # the block counter is left at 0 for the next call
                got = U.exponent_grad_and_scales(*dev, cols, 8.0, **kw_d)
                for g, w in zip(got, want):
                    assert isinstance(g, cupy.ndarray)
                    np.testing.assert_array_equal(g.get(), w)
    G[1234:] = 0   # padded rows: only the first 1234 count, read from the device
    rows = np.array([1234], np.int64)
    want = U.exponent_grad_and_scales(G, T_packed, E, 64, 8.0, rows=rows)
    got = U.exponent_grad_and_scales(cupy.asarray(G), *dev[1:], 64, 8.0, rows=cupy.asarray(rows))
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g.get(), w)
    with pytest.raises(TypeError, match="exponent_grad_and_scales: arrays are on different "
                                        "devices"):
        U.exponent_grad_and_scales(cupy.asarray(G), *dev[1:], 64, 8.0, rows=rows)
    for bad in (np.nan, np.inf, 1e20):   # 1e20 squared overflows float32, as in NumPy
        G[1, 2] = bad
        got = U.exponent_grad_and_scales(cupy.asarray(G), *dev[1:], 64, 8.0)[0].get()
        assert got[0] == 0 == U.exponent_grad_and_scales(G, T_packed, E, 64, 8.0)[0][0]


@pytest.mark.cuda
@pytest.mark.parametrize("rows,cols", [(1, 1), (3, 37), (64, 1000), (1100, 1000)])
def test_cuda_ternary_update_matches_cpu_twin(rows, cols):
    rng = np.random.default_rng(rows * cols)
    T = rng.integers(-1, 2, size=(rows, cols))
    s = dict(T_packed=P.pack_trits_reference(T),
             T_accum=rng.integers(-128, 128, size=(rows, cols), dtype=np.int8),
             grad_q=rng.integers(-128, 128, size=(rows, cols), dtype=np.int8),
             E=rng.integers(-128, 128, size=rows, dtype=np.int8),
             E_accum=rng.integers(-128, 128, size=rows, dtype=np.int8),
             grad_E_q=rng.integers(-128, 128, size=rows, dtype=np.int8))
    dev = {k: cupy.asarray(v) for k, v in s.items()}
    cpu_counts = U.ternary_update(**s, cols=cols, **HYPER)
    counts = U.ternary_update(**dev, cols=cols, **HYPER)
    assert isinstance(counts, cupy.ndarray)
    for k in s:
        np.testing.assert_array_equal(dev[k].get(), s[k], err_msg=k)
    np.testing.assert_array_equal(counts.get(), cpu_counts)
    # zero_grad=False, then a second step into the same counter, with other hyperparameters
    s2 = {k: v.copy() for k, v in s.items()}
    s2["grad_q"][...] = rng.integers(-128, 128, size=(rows, cols), dtype=np.int8)
    s2["grad_E_q"][...] = rng.integers(-128, 128, size=rows, dtype=np.int8)
    dev2 = {k: cupy.asarray(v) for k, v in s2.items()}
    hyper2 = dict(flip_threshold=9, flip_decay_shift=4, scale_threshold=3, scale_decay_shift=0)
    results = []
    for arrays in (s2, dev2):
        totals = U.ternary_update(**arrays, cols=cols, **hyper2, zero_grad=False)
        U.ternary_update(**arrays, cols=cols, **hyper2, counts=totals)
        results.append(totals)
    for k in s2:
        np.testing.assert_array_equal(dev2[k].get(), s2[k], err_msg=k)
    assert isinstance(results[1], cupy.ndarray)
    np.testing.assert_array_equal(results[1].get(), results[0])


@pytest.mark.cuda
def test_cuda_carry_spread_and_saturation_match_the_cpu():
    rows, cols = 300, 777
    s = random_state(np.random.default_rng(12), rows, cols)
    dev = {k: cupy.asarray(v) for k, v in s.items()}
    want = U.ternary_update(**s, cols=cols, **HYPER, flip_carry=True)
    got = U.ternary_update(**dev, cols=cols, **HYPER, flip_carry=True)
    for k in s:
        np.testing.assert_array_equal(dev[k].get(), s[k], err_msg=k)
    np.testing.assert_array_equal(got.get(), want)
    a = cupy.zeros((1000, 333), np.int8)
    U.spread_accumulators(a, 9, 63)
    np.testing.assert_array_equal(a.get(), U.spread_accumulators_reference((1000, 333), 9, 63))
    out = cupy.zeros(2, np.int64)
    U.count_saturated(dev["T_accum"], out, 1)
    assert int(out[1]) == U.count_saturated_reference(s["T_accum"]) and int(out[0]) == 0


@pytest.mark.cuda
def test_cuda_rejects_mixed_devices_before_launch():
    s = _state_for_errors()
    T_accum_before = s["T_accum"].copy()
    s["grad_q"] = cupy.asarray(s["grad_q"])
    with pytest.raises(TypeError, match="different devices"):
        U.ternary_update(**s, cols=40, **HYPER)
    np.testing.assert_array_equal(s["T_accum"], T_accum_before)
