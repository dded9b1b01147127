"""tritnet_kernels.code_graph: the bucketed edge table of MoEGraph's code graph.

The rule by hand, the CPU twin against the sequential NumPy reference (bit-exact) in dense and
active mode, the fixed capacity under a long stream, the one-hop read, the CUDA kernels against
the CPU twins under the simulator (tiny shapes) and on a GPU (CuPy), and bad input.
"""

import numba
import numpy as np
import pytest

from tritnet import backend
from tritnet_kernels import code_graph as g

SIM = bool(numba.config.ENABLE_CUDASIM)

cupy = backend.cupy
HAVE_GPU = backend.gpu_usable()[0]




# --- an independent statement of the documented hash, on Python integers ---

M64 = (1 << 64) - 1


def mix64_py(z):
    z ^= z >> 30
    z = (z * 0xBF58476D1CE4E5B9) & M64
    z ^= z >> 27
    z = (z * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def bucket_py(a, n_buckets, K):
    return a if n_buckets == K else mix64_py(a) % n_buckets


def stream(rng, n, src_universe, dst_universe, K, dtype=np.int32, self_every=17):
    """Transitions with many repeats (small universes), some self-transitions, random signs."""
    src = rng.integers(0, src_universe, n)
    dst = rng.integers(0, dst_universe, n)
    if K > src_universe:  # spread the sources over the whole code range
        spread = rng.integers(0, K // src_universe, src_universe) * src_universe
        src = src + spread[src]
        dst = src[rng.integers(0, n, n)] if dst_universe == src_universe else dst
    src[::self_every] = dst[::self_every]
    attr = rng.integers(-1, 2, n).astype(np.int8)
    return src.astype(dtype), dst.astype(dtype), attr


def assert_state_equal(state, want):
    for name, got, exp in zip(("edge_src", "edge_dst", "edge_attr", "edge_score", "counts"),
                              state, want):
        np.testing.assert_array_equal(got, exp, err_msg=name)


def assert_invariants(state, n_buckets, slots, K):
    src, dst, attr, score = state
    cap = n_buckets * slots
    assert [a.shape for a in state] == [(cap,)] * 4
    assert [a.dtype for a in state] == [np.int32, np.int32, np.int8, np.int8]
    live = dst >= 0
    assert np.all(dst >= -1) and np.all(dst < K)
    assert np.all(src[live] >= 0) and np.all(src[live] < K)
    assert np.all(src[live] != dst[live]), "a self-transition was stored"
    assert np.all((score >= 0) & (score <= g.SCORE_MAX))
    assert np.all((attr >= -1) & (attr <= 1))
    slot_bucket = np.arange(cap) // slots
    np.testing.assert_array_equal(g.edge_bucket_reference(src[live], n_buckets, K),
                                  slot_bucket[live])
    pairs = src[live].astype(np.int64) * K + dst[live]
    assert np.unique(pairs).size == pairs.size, "an edge is stored twice"
    return int(live.sum())


# --------------------------------------------------------------------------------------------
# edge_bucket


def test_bucket_is_identity_in_dense_mode():
    codes = np.array([0, 5, 49, 17, 5], dtype=np.int32)
    np.testing.assert_array_equal(g.edge_bucket(codes, 50, 50), codes.astype(np.int64))
    assert g.edge_bucket(codes, 50, 50).dtype == np.int64


@pytest.mark.parametrize("n_buckets", [4096, 1, 7, 9_999_999])
@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_bucket_is_the_documented_hash(n_buckets, dtype):
    K = 10_000_000
    rng = np.random.default_rng(n_buckets)
    codes = np.concatenate([[0, 1, 2, K - 1], rng.integers(0, K, 500)]).astype(dtype)
    got = g.edge_bucket(codes, n_buckets, K)
    np.testing.assert_array_equal(got, [bucket_py(int(c), n_buckets, K) for c in codes])
    np.testing.assert_array_equal(got, g.edge_bucket_reference(codes, n_buckets, K))


def test_bucket_spreads_consecutive_codes_evenly():
    n_buckets = 4096
    codes = np.arange(64 * n_buckets, dtype=np.int32)  # 64 per bucket on average
    load = np.bincount(g.edge_bucket(codes, n_buckets, 10_000_000), minlength=n_buckets)
    assert load.min() >= 25 and load.max() <= 110  # Poisson(64) lies far inside this


# --------------------------------------------------------------------------------------------
# observe_edges: the rule


def test_rule_by_hand():
    K, slots = 10, 2  # dense: code 1 owns slots 2 and 3
    obs = [(1, 2, 1),    # admitted into slot 2
           (1, 2, -1),   # reinforced: score 2, attr -1
           (1, 3, 0),    # admitted into slot 3
           (1, 1, 1),    # self-transition: ignored
           (1, 4, 1),    # full, lowest is slot 3 (score 1): the bucket ages -> scores 1, 0
           (1, 4, 1),    # lowest is slot 3 with score 0: evicted, (1, 4) admitted
           (1, 5, 1),    # scores 1, 1: tie -> slot 2, not 0: ages -> 0, 0
           (1, 5, -1),   # slot 2 (lowest of a tie at 0) evicted, (1, 5) admitted
           (3, 1, 1)]    # another code's bucket
    src, dst, attr = (np.array(c, dtype=dt) for c, dt in zip(zip(*obs), (np.int32, np.int32, np.int8)))
    state = g.empty_edges(K, slots)
    want = g.observe_edges_reference(*state, src, dst, attr, K, slots, K)
    counts = g.observe_edges(*state, src, dst, attr, K, slots, K)
    assert_state_equal(list(state) + [counts], want)
    e_src, e_dst, e_attr, e_score = state
    np.testing.assert_array_equal(e_src[2:4], [1, 1])
    np.testing.assert_array_equal(e_dst[2:4], [5, 4])
    np.testing.assert_array_equal(e_attr[2:4], [-1, 1])
    np.testing.assert_array_equal(e_score[2:4], [1, 0])
    np.testing.assert_array_equal(e_dst[6:8], [1, -1])
    np.testing.assert_array_equal(counts, [5, 1, 2, 2])  # admitted, reinforced, evicted, aged
    assert np.count_nonzero(e_dst >= 0) == counts[0] - counts[2]
    # One observation per call gives the same table.
    again = g.empty_edges(K, slots)
    total = np.zeros(4, np.int64)
    for k in range(len(obs)):
        g.observe_edges(*again, src[k:k + 1], dst[k:k + 1], attr[k:k + 1], K, slots, K,
                        counts=total)
    assert_state_equal(list(again) + [total], list(state) + [counts])


def test_scores_saturate_at_127_and_attr_follows_the_last_sign():
    state = g.empty_edges(4, 1)
    n = 300
    attr = np.where(np.arange(n) % 2 == 0, 1, -1).astype(np.int8)
    counts = g.observe_edges(*state, np.zeros(n, np.int32), np.ones(n, np.int32), attr, 4, 1, 4)
    assert state[3][0] == 127 and state[2][0] == -1
    np.testing.assert_array_equal(counts, [1, n - 1, 0, 0])


def test_sources_sharing_a_bucket_compete_for_its_slots():
    K, n_buckets, slots = 100, 1, 2
    state = g.empty_edges(n_buckets, slots)
    src = np.array([5, 7, 9, 9], np.int64)
    dst = np.array([6, 8, 10, 10], np.int64)
    counts = g.observe_edges(*state, src, dst, np.ones(4, np.int8), n_buckets, slots, K)
    np.testing.assert_array_equal(counts, [1 + 1 + 1, 0, 1, 1])  # (9, 10) ages, then evicts (5, 6)
    out_dst, out_w = g.edge_neighbors(*state, np.array([5, 7, 9, 42]), n_buckets, slots, K)
    np.testing.assert_array_equal(out_dst, [[-1, -1], [-1, 8], [10, -1], [-1, -1]])
    np.testing.assert_array_equal(out_w, np.array([[0, 0], [0, 0], [1, 0], [0, 0]],
                                                  np.float32) / np.float32(127))


# K, n_buckets, slots, observations, source universe, destination universe, index dtype
OBSERVE_CASES = [
    (64, 64, 4, 3000, 64, 10, np.int32),                  # dense, full buckets, heavy repeats
    (1000, 16, 3, 3000, 1000, 1000, np.int64),            # active, heavy pressure
    (200, 7, 1, 2000, 200, 5, np.int32),                  # one slot per bucket
    (100, 2, 64, 3000, 100, 100, np.int32),               # the widest bucket
    (10_000_000, 4096, 8, 20000, 3000, 5, np.int32),      # 10M codes, 4096 x 8 slots
    (10_000_000, 256, 4, 6000, 3000, 5, np.int64),        # 10M codes, a crowded table
]


@pytest.mark.parametrize("K,n_buckets,slots,n,src_u,dst_u,dtype", OBSERVE_CASES)
def test_observe_matches_sequential_reference(K, n_buckets, slots, n, src_u, dst_u, dtype):
    rng = np.random.default_rng(K + slots)
    state = list(g.empty_edges(n_buckets, slots))
    total = np.zeros(4, np.int64)
    n_self = 0
    for chunk in range(3):  # the state carries from call to call
        src, dst, attr = stream(rng, n // 3, src_u, dst_u, K, dtype)
        n_self += int(np.count_nonzero(src == dst))
        want = g.observe_edges_reference(*state, src, dst, attr, n_buckets, slots, K)
        counts = g.observe_edges(*state, src, dst, attr, n_buckets, slots, K)
        assert counts.dtype == np.int64 and counts.shape == (4,)
        assert_state_equal(state, want[:4])
        np.testing.assert_array_equal(counts, want[4])
        total += counts
    admitted, reinforced, evicted, aged = total.tolist()
    assert admitted + reinforced + aged == 3 * (n // 3) - n_self
    assert assert_invariants(state, n_buckets, slots, K) == admitted - evicted
    assert reinforced > 0 and admitted > 0
    if n_buckets * slots < 10_000:  # the small tables are under pressure: every path runs
        assert evicted > 0 and aged > 0


def test_shared_sequence_views_are_accepted():
    # The usual call: transitions of one code sequence, obs_src = seq[:-1], obs_dst = seq[1:].
    seq = np.random.default_rng(3).integers(0, 30, 500).astype(np.int32)
    attr = np.ones(499, np.int8)
    state = g.empty_edges(30, 4)
    counts = g.observe_edges(*state, seq[:-1], seq[1:], attr, 30, 4, 30)
    want = g.observe_edges_reference(*g.empty_edges(30, 4), seq[:-1], seq[1:], attr, 30, 4, 30)
    assert_state_equal(list(state) + [counts], want)


def test_empty_observation_list_is_a_no_op():
    state = g.empty_edges(8, 2)
    counts = g.observe_edges(*state, np.zeros(0, np.int32), np.zeros(0, np.int32),
                             np.zeros(0, np.int8), 8, 2, 8)
    np.testing.assert_array_equal(counts, [0, 0, 0, 0])
    assert_state_equal(state, g.empty_edges(8, 2))


@pytest.mark.parametrize("K,n_buckets,slots", [(10_000_000, 4096, 8), (500, 500, 4)])
def test_capacity_never_grows_under_a_long_stream(K, n_buckets, slots):
    rng = np.random.default_rng(slots)
    state = g.empty_edges(n_buckets, slots)
    arrays = [id(a) for a in state]
    whole = ([], [], [])
    total = np.zeros(4, np.int64)
    for _ in range(20):
        # Zipf-like sources: a few hot codes revisit their edges, a long tail keeps arriving.
        src = (rng.zipf(1.3, 10_000) % K).astype(np.int32)
        dst = (rng.zipf(1.3, 10_000) * 7919 % K).astype(np.int32)
        attr = rng.integers(-1, 2, 10_000).astype(np.int8)
        g.observe_edges(*state, src, dst, attr, n_buckets, slots, K, counts=total)
        live = assert_invariants(state, n_buckets, slots, K)
        assert live <= n_buckets * slots
        assert [id(a) for a in state] == arrays
        for part, x in zip(whole, (src, dst, attr)):
            part.append(x)
    assert live == total[0] - total[2]
    assert total[2] > 0 and total[3] > 0  # the stream overflowed the table: it evicts and ages
    # Buckets are independent and keep their order: one call over the whole stream agrees.
    one = g.empty_edges(n_buckets, slots)
    counts = g.observe_edges(*one, *(np.concatenate(p) for p in whole), n_buckets, slots, K)
    assert_state_equal(list(one) + [counts], list(state) + [total])


# --------------------------------------------------------------------------------------------
# edge_neighbors


def _built_table(K, n_buckets, slots, seed, n=4000, dtype=np.int32):
    rng = np.random.default_rng(seed)
    state = g.empty_edges(n_buckets, slots)
    src, dst, attr = stream(rng, n, min(K, 600), min(K, 600), K, dtype)
    g.observe_edges(*state, src, dst, attr, n_buckets, slots, K)
    return state, src


@pytest.mark.parametrize("K,n_buckets,slots", [(600, 600, 4), (10_000_000, 64, 8),
                                               (1000, 13, 3)])
@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_neighbors_match_reference_and_the_table(K, n_buckets, slots, dtype):
    state, seen = _built_table(K, n_buckets, slots, seed=slots)
    rng = np.random.default_rng(1)
    codes = np.concatenate([seen[:300], rng.integers(0, K, 100), [0, K - 1]]).astype(dtype)
    out_dst = np.full((codes.size, slots), 77, np.int32)  # overwritten
    out_weight = np.full((codes.size, slots), np.nan, np.float32)
    got = g.edge_neighbors(*state, codes, n_buckets, slots, K, out_dst, out_weight)
    assert got[0] is out_dst and got[1] is out_weight
    want = g.edge_neighbors_reference(*state, codes, n_buckets, slots, K)
    np.testing.assert_array_equal(out_dst, want[0])
    np.testing.assert_array_equal(out_weight, want[1])
    # Independently of buckets: the listed edges are exactly the stored edges of each code.
    e_src, e_dst, e_attr, e_score = state
    live = e_dst >= 0
    for i, c in enumerate(codes.tolist()):
        mine = live & (e_src == c)
        assert sorted(out_dst[i][out_dst[i] >= 0].tolist()) == sorted(e_dst[mine].tolist())
        w = dict(zip(e_dst[mine].tolist(), (e_attr[mine] * e_score[mine].astype(np.int64)).tolist()))
        for d, wt in zip(out_dst[i].tolist(), out_weight[i].tolist()):
            assert wt == (np.float32(w[d]) / np.float32(127) if d >= 0 else 0.0)
    assert np.any(out_weight > 0) and np.any(out_weight < 0)


def test_neighbors_of_no_codes():
    state = g.empty_edges(5, 3)
    out_dst, out_weight = g.edge_neighbors(*state, np.zeros(0, np.int64), 5, 3, 5)
    assert out_dst.shape == (0, 3) and out_dst.dtype == np.int32
    assert out_weight.shape == (0, 3) and out_weight.dtype == np.float32


# --------------------------------------------------------------------------------------------
# decay_scores


@pytest.mark.parametrize("shift", [1, 3, 7])
def test_decay_scores(shift):
    score = np.arange(128, dtype=np.int8)
    want = g.decay_scores_reference(score, shift)
    assert g.decay_scores(score, shift) is score
    np.testing.assert_array_equal(score, want)
    assert score[1] == 1 and score[0] == 0  # decay alone never makes an edge evictable


# --------------------------------------------------------------------------------------------
# bad input: a clear error naming the thing, and nothing changed


def _bad_observe_calls():
    K, nb, sl = 50, 10, 2
    src = np.array([1, 2, 3], np.int32)
    dst = np.array([4, 5, 6], np.int32)
    attr = np.array([1, 0, -1], np.int8)
    base = dict(src=src, dst=dst, attr=attr, n_buckets=nb, slots=sl, K=K, counts=None)
    cases = [
        (dict(src=np.array([1, 50, 3], np.int32)), ValueError,
         r"obs_src\[1\] = 50 is out of range; expected codes in \[0, 50\)"),
        (dict(dst=np.array([4, 5, -1], np.int64)), ValueError,
         r"obs_dst\[2\] = -1 is out of range; expected codes in \[0, 50\)"),
        (dict(src=src.astype(np.float64)), TypeError,
         r"obs_src has dtype float64, expected int32 or int64"),
        (dict(dst=dst.astype(np.uint32)), TypeError,
         r"obs_dst has dtype uint32, expected int32 or int64"),
        (dict(attr=attr.astype(np.int32)), TypeError, r"obs_attr has dtype int32, expected int8"),
        (dict(attr=np.array([1, 2, 0], np.int8)), ValueError,
         r"obs_attr\[1\] = 2 is not a ternary sign; expected -1, 0 or \+1"),
        (dict(attr=np.array([1, -1, -3], np.int8)), ValueError, r"obs_attr\[2\] = -3 is not"),
        (dict(dst=dst[:2]), ValueError, r"obs_dst has shape \(2,\), expected \(3,\) to match obs_src"),
        (dict(attr=attr[:2]), ValueError, r"obs_attr has shape \(2,\), expected \(3,\)"),
        (dict(src=src.reshape(3, 1)), ValueError, r"obs_src has shape \(3, 1\), expected a 1-D array"),
        (dict(src=np.arange(6, dtype=np.int32)[::2]), ValueError, r"obs_src is not C-contiguous"),
        (dict(slots=0), ValueError, r"slots = 0 is out of range, expected 1..64"),
        (dict(slots=65), ValueError, r"slots = 65 is out of range, expected 1..64"),
        (dict(slots=3), ValueError,
         r"edge_src has shape \(20,\), expected \(30,\) = n_buckets \* slots = 10 \* 3"),
        (dict(n_buckets=51), ValueError, r"n_buckets = 51 is out of range, expected 1..50"),
        (dict(K=2**31), ValueError, r"K = 2147483648 is out of range"),
        (dict(K=10.0), TypeError, r"K must be an integer"),
        (dict(counts=np.zeros(3, np.int64)), ValueError, r"counts has shape \(3,\), expected \(4,\)"),
        (dict(counts=np.zeros(4, np.int32)), TypeError, r"counts has dtype int32, expected int64"),
    ]
    return cases, base


def _bad_state_cases():
    return [
        (lambda s: (s[0].astype(np.int64),) + s[1:], TypeError,
         r"edge_src has dtype int64, expected int32"),
        (lambda s: s[:2] + (s[2].astype(np.int16), s[3]), TypeError,
         r"edge_attr has dtype int16, expected int8"),
        (lambda s: s[:3] + (s[3][:19],), ValueError, r"edge_score has shape \(19,\), expected \(20,\)"),
        (lambda s: (s[0], s[0]) + s[2:], ValueError, r"edge_src and edge_dst share memory"),
        (lambda s: (s[0], s[1], _read_only(s[2]), s[3]), ValueError,
         r"edge_attr is read-only"),
    ]


def _read_only(a):
    a.flags.writeable = False
    return a


@pytest.mark.parametrize("case", range(19))
def test_observe_rejects_bad_input_and_changes_nothing(case):
    cases, base = _bad_observe_calls()
    change, error, match = cases[case]
    args = dict(base, **change)
    state = list(g.empty_edges(10, 2))
    g.observe_edges(*state, np.array([7, 8]), np.array([9, 9]), np.ones(2, np.int8), 10, 2, 50)
    before = [x.copy() for x in state]
    with pytest.raises(error, match="observe_edges: " + match):
        g.observe_edges(*state, args["src"], args["dst"], args["attr"], args["n_buckets"],
                        args["slots"], args["K"], counts=args["counts"])
    assert_state_equal(state, before)


@pytest.mark.parametrize("case", range(5))
def test_observe_rejects_bad_state(case):
    make, error, match = _bad_state_cases()[case]
    state = make(g.empty_edges(10, 2))
    before = [x.copy() for x in state]
    with pytest.raises(error, match="observe_edges: " + match):
        g.observe_edges(*state, np.array([1]), np.array([2]), np.ones(1, np.int8), 10, 2, 50)
    assert_state_equal(state, before)


def test_obs_overlapping_the_table_is_rejected():
    state = g.empty_edges(10, 2)
    with pytest.raises(ValueError, match=r"observe_edges: edge_dst and obs_dst share memory"):
        g.observe_edges(*state, np.array([1, 2], np.int32), state[1][:2], np.ones(2, np.int8),
                        10, 2, 50, check=False)


def test_neighbors_bucket_decay_and_empty_reject_bad_input():
    state = g.empty_edges(10, 2)
    codes = np.array([0, 3], np.int32)
    with pytest.raises(ValueError, match=r"edge_neighbors: codes\[1\] = 50 is out of range; expected codes in \[0, 50\)"):
        g.edge_neighbors(*state, np.array([0, 50]), 10, 2, 50)
    with pytest.raises(TypeError, match=r"edge_neighbors: codes has dtype int8, expected int32 or int64"):
        g.edge_neighbors(*state, codes.astype(np.int8), 10, 2, 50)
    with pytest.raises(TypeError, match=r"edge_neighbors: out_dst has dtype int64, expected int32"):
        g.edge_neighbors(*state, codes, 10, 2, 50, out_dst=np.empty((2, 2), np.int64))
    with pytest.raises(ValueError, match=r"edge_neighbors: out_weight has shape \(2, 3\), expected \(2, 2\)"):
        g.edge_neighbors(*state, codes, 10, 2, 50, out_weight=np.empty((2, 3), np.float32))
    with pytest.raises(ValueError, match=r"edge_neighbors: edge_src has shape \(20,\), expected \(40,\)"):
        g.edge_neighbors(*state, codes, 20, 2, 50)
    with pytest.raises(ValueError, match=r"edge_bucket: codes\[0\] = -1 is out of range"):
        g.edge_bucket(np.array([-1, 0]), 10, 50)
    with pytest.raises(ValueError, match=r"edge_bucket: n_buckets = 0 is out of range, expected 1..50"):
        g.edge_bucket(codes, 0, 50)
    with pytest.raises(ValueError, match=r"decay_scores: shift = 0 is out of range, expected 1..7"):
        g.decay_scores(state[3], 0)
    with pytest.raises(TypeError, match=r"decay_scores: edge_score has dtype int32, expected int8"):
        g.decay_scores(state[0], 1)
    with pytest.raises(ValueError, match=r"empty_edges: slots = 65 is out of range, expected 1..64"):
        g.empty_edges(10, 65)


# --------------------------------------------------------------------------------------------
# the CUDA kernels under the simulator, against the CPU twins (tiny shapes)


def _cpu_twin_observe(state, src, dst, attr, n_buckets, slots, K):
    """The CPU twin called directly, with the wrapper's grouping; returns new state + counts."""
    state = [a.copy() for a in state]
    buckets = np.empty(src.size, np.int64)
    g._edge_bucket_cpu(src, np.int64(n_buckets), np.int64(K), buckets)
    order = np.argsort(buckets, kind="stable").astype(np.int64)
    counts = np.zeros(4, np.int64)
    g._observe_edges_cpu(*state, buckets[order], src[order], dst[order], attr[order],
                         np.int64(slots), counts)
    return state + [counts]


@pytest.mark.cudasim
@pytest.mark.parametrize("slots", [3, 5])
def test_sim_hot_bucket_takes_every_path_of_the_rule(slots):
    """One bucket takes every observation (a popular code): reinforcements, admissions into
    empty slots, ageing of a full bucket and evictions at score 0, in the order the rule
    gives them, as the CPU twin and the reference apply them one by one."""
    rng = np.random.default_rng(slots)
    K = 50
    state = list(g.empty_edges(1, slots))
    src = np.full(90, 7, np.int32)
    dst = rng.choice(np.array([1, 2, 3, 4, 5, 6, 7, 8, 9], np.int32), 90)  # 7: self, skipped
    attr = rng.choice(np.array([-1, 1], np.int8), 90)
    want = _cpu_twin_observe(state, src, dst, attr, 1, slots, K)
    truth = g.observe_edges_reference(*state, src, dst, attr, 1, slots, K)
    counts = g.observe_edges(*state, src, dst, attr, 1, slots, K)
    assert_state_equal(state + [counts], want)
    assert_state_equal(state + [counts], list(truth))
    assert (counts > 0).all(), counts   # admitted, reinforced, evicted, aged: each happened


@pytest.mark.cudasim
@pytest.mark.parametrize("K,n_buckets,slots", [(12, 12, 2), (1000, 3, 2), (40, 5, 1)])
def test_sim_observe_bucket_and_neighbors(K, n_buckets, slots):
    rng = np.random.default_rng(K)
    state = list(g.empty_edges(n_buckets, slots))
    for dtype in (np.int32, np.int64):
        src, dst, attr = stream(rng, 24, min(K, 12), 6, K, dtype, self_every=7)
        want = _cpu_twin_observe(state, src, dst, attr, n_buckets, slots, K)
        truth = g.observe_edges_reference(*state, src, dst, attr, n_buckets, slots, K)
        counts = g.observe_edges(*state, src, dst, attr, n_buckets, slots, K)
        assert_state_equal(state + [counts], want)
        assert_state_equal(want, truth)
    buckets = np.empty(src.size, np.int64)
    g._edge_bucket_cpu(src, np.int64(n_buckets), np.int64(K), buckets)
    np.testing.assert_array_equal(g.edge_bucket(src, n_buckets, K), buckets)
    np.testing.assert_array_equal(buckets, g.edge_bucket_reference(src, n_buckets, K))
    codes = np.concatenate([src[:5], [K - 1]]).astype(np.int64)
    got = g.edge_neighbors(*state, codes, n_buckets, slots, K)
    out_dst = np.empty((codes.size, slots), np.int32)
    out_weight = np.empty((codes.size, slots), np.float32)
    g._edge_neighbors_cpu(*state, codes, np.int64(n_buckets), np.int64(K), np.int64(slots),
                          out_dst, out_weight)
    np.testing.assert_array_equal(got[0], out_dst)
    np.testing.assert_array_equal(got[1], out_weight)


# --------------------------------------------------------------------------------------------
# the CUDA kernels on a GPU (CuPy), against the CPU twins


@pytest.mark.cuda
@pytest.mark.parametrize("K,n_buckets,slots,src_u,dst_u",
                         [(10_000_000, 4096, 8, 200_000, 200_000), (5000, 5000, 4, 5000, 20),
                          (1000, 16, 3, 1000, 1000), (100, 2, 64, 100, 100)])
def test_cuda_observe_and_neighbors_match_cpu(K, n_buckets, slots, src_u, dst_u):
    rng = np.random.default_rng(slots)
    cpu = list(g.empty_edges(n_buckets, slots))
    gpu = list(g.empty_edges(n_buckets, slots, xp=cupy))
    gpu_counts = cupy.zeros(4, cupy.int64)
    cpu_counts = np.zeros(4, np.int64)
    for _ in range(4):
        src, dst, attr = stream(rng, 50_000, src_u, dst_u, K, np.int32)
        g.observe_edges(*cpu, src, dst, attr, n_buckets, slots, K, counts=cpu_counts)
        g.observe_edges(*gpu, cupy.asarray(src), cupy.asarray(dst), cupy.asarray(attr),
                        n_buckets, slots, K, counts=gpu_counts)
        assert_state_equal([a.get() for a in gpu + [gpu_counts]], cpu + [cpu_counts])
    codes = np.concatenate([src[:3000], rng.integers(0, K, 1000)]).astype(np.int64)
    got = g.edge_neighbors(*gpu, cupy.asarray(codes), n_buckets, slots, K)
    want = g.edge_neighbors(*cpu, codes, n_buckets, slots, K)
    np.testing.assert_array_equal(got[0].get(), want[0])
    np.testing.assert_array_equal(got[1].get(), want[1])
    np.testing.assert_array_equal(g.edge_bucket(cupy.asarray(codes), n_buckets, K).get(),
                                  g.edge_bucket(codes, n_buckets, K))
    np.testing.assert_array_equal(g.decay_scores(gpu[3], 2).get(), g.decay_scores(cpu[3], 2))


@pytest.mark.cuda
def test_cuda_bad_input_raises_before_launch():
    state = list(g.empty_edges(10, 2, xp=cupy))
    g.observe_edges(*state, cupy.asarray([1, 2]), cupy.asarray([3, 4]), cupy.ones(2, cupy.int8),
                    10, 2, 50)
    before = [a.get() for a in state]
    with pytest.raises(ValueError, match=r"observe_edges: obs_dst\[1\] = 50 is out of range"):
        g.observe_edges(*state, cupy.asarray([1, 2]), cupy.asarray([3, 50]),
                        cupy.ones(2, cupy.int8), 10, 2, 50)
    with pytest.raises(ValueError, match=r"observe_edges: obs_attr\[0\] = 5 is not a ternary sign"):
        g.observe_edges(*state, cupy.asarray([1, 2]), cupy.asarray([3, 4]),
                        cupy.asarray([5, 1], dtype=cupy.int8), 10, 2, 50)
    with pytest.raises(TypeError, match=r"observe_edges: arrays are on different devices"):
        g.observe_edges(*state, np.array([1, 2]), cupy.asarray([3, 4]), cupy.ones(2, cupy.int8),
                        10, 2, 50)
    assert_state_equal([a.get() for a in state], before)
