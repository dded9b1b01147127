"""tritnet_kernels' VQ kernels (vq_search, vq_route, vq_usage): query ternarisation, exact
nearest code, top-k routing, partition search, usage counts. CPU twin against the independent NumPy reference (identical argmins), tie rules,
the CUDA kernels against the CPU twin under the simulator and on a GPU, and bad input."""

import numpy as np
import pytest

from tests.helpers import cupy, pack
from tritnet_kernels import _vq_rules
from tritnet_kernels import vq_route
from tritnet_kernels import vq_search
from tritnet_kernels import vq_usage


def book(K, dim, seed, density=2 / 3):
    rng = np.random.default_rng(seed)
    T = rng.choice([-1, 0, 1], size=(K, dim), p=[density / 2, 1 - density, density / 2])
    return pack(T)


def queries(n, dim, seed):
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return vq_search.ternarize_queries(x)


def near_book_queries(T_packed, dim, n, seed, flips=6):
    """Queries that are noisy copies of random codes: realistic, tie-light search."""
    rng = np.random.default_rng(seed)
    src = rng.integers(0, T_packed.shape[0], n)
    T = _vq_rules.unpack_bits(T_packed[src], dim)
    for row in T:
        j = rng.choice(dim, min(flips, dim), replace=False)
        row[j] = rng.integers(-1, 2, len(j))
    return pack(T)


DIMS = [64, 37, 70, 5, 1]


# --------------------------------------------------------------------------------------------
# ternarisation


@pytest.mark.parametrize("dim", [64, 37, 70, 1])
def test_ternarize_matches_reference(dim):
    rng = np.random.default_rng(dim)
    x = (rng.standard_normal((50, dim)) * rng.uniform(0.01, 100, (50, 1))).astype(np.float32)
    x[0] = 0  # all-zero row
    x[1, 0] = np.nan  # a NaN poisons its row: all zero
    x[2] = 1.0  # every |x| equals the mean: 2*dim*|x| > sum fails only by rounding, not here
    q = vq_search.ternarize_queries(x)
    assert q.dtype == np.uint32 and q.shape == (50, 2 * -(-dim // 32))
    ref = vq_search.ternarize_queries_reference(x)
    np.testing.assert_array_equal(_vq_rules.unpack_bits(q, dim), ref)
    np.testing.assert_array_equal(pack(ref.astype(np.int64)), q)  # padding bits stay zero
    assert not ref[0].any() and not ref[1].any()
    assert (ref[2] == 1).all()


def test_ternarize_keeps_about_two_thirds_of_a_gaussian():
    q = vq_search.ternarize_queries_reference(np.random.default_rng(0).standard_normal((2000, 64)).astype(np.float32))
    assert 0.62 < (q != 0).mean() < 0.72


# --------------------------------------------------------------------------------------------
# exact nearest code


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("K,n", [(1, 3), (300, 41), (2000, 17)])
def test_nearest_matches_reference(dim, K, n):
    T_packed = book(K, dim, K + dim)
    q = queries(n, dim, dim)
    dot = np.full(n, 12345, dtype=np.int32)
    idx = vq_search.nearest_code(q, T_packed, dim, out_dot=dot)
    ref_idx, ref_dot = vq_search.nearest_code_reference(q, T_packed, dim)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_array_equal(dot, ref_dot)


def test_nearest_over_several_cpu_chunks_and_sparse_codes():
    dim = 64
    T_packed = book(70_000, dim, 3, density=0.2)  # > 65536 codes: the CPU twin chunks the book
    T_packed[5] = 0  # an all-zero code scores 0
    q = near_book_queries(T_packed, dim, 24, 4)
    idx = vq_search.nearest_code(q, T_packed, dim)
    np.testing.assert_array_equal(idx, vq_search.nearest_code_reference(q, T_packed, dim)[0])


def test_ties_go_to_the_lowest_index():
    dim = 40
    base = book(6, dim, 9)
    T_packed = np.concatenate([base[[3]], base, base, base[[3]]])  # duplicates everywhere
    q = np.concatenate([base, pack(-_vq_rules.unpack_bits(base, dim))])  # each code and its negative
    idx = vq_search.nearest_code(q, T_packed, dim)
    ref = vq_search.nearest_code_reference(q, T_packed, dim)[0]
    np.testing.assert_array_equal(idx, ref)
    assert idx[3] == 0  # base[3] sits at 0, 4, 10 and 13
    assert all(idx[k] == (0 if k == 3 else k + 1) for k in range(6))
    # different codes with exactly equal scores against q2 = all ones: d*|d|/nn is
    # 2*2/4 == 1*1/1 == 3*3/9 == 1
    T2 = pack(np.array([[1, 1, -1, 1, 0, 0, 0, 0, 0],
                        [1, 0, 0, 0, 0, 0, 0, 0, 0],
                        [1, 1, 1, -1, -1, -1, 1, 1, 1]]))
    q2 = pack(np.ones((1, 9), dtype=np.int64))
    np.testing.assert_array_equal(vq_search.code_scores_reference(q2, T2, 9)[1], [[1.0, 1.0, 1.0]])
    for order in ([0, 1, 2], [1, 2, 0], [2, 0, 1]):
        assert vq_search.nearest_code(q2, T2[order], 9)[0] == 0
    # a zero query ties with every code: the first one wins
    assert vq_search.nearest_code(np.zeros((1, 2), np.uint32), T2, 9)[0] == 0


def test_negative_best_and_zero_code():
    # every code points away from the query: the least negative score wins, the zero code
    # (score 0) beats them all
    T = pack(np.array([[-1, -1, 0], [-1, 0, 0], [-1, -1, -1], [0, 0, 0]]))
    q = pack(np.array([[1, 1, 1]]))
    assert vq_search.nearest_code(q, T, 3)[0] == 3
    np.testing.assert_array_equal(vq_search.nearest_code(q, T[:3], 3), vq_search.nearest_code_reference(q, T[:3], 3)[0])
    assert vq_search.nearest_code(q, T[:3], 3)[0] == 1  # -1/1 > -4/2 > -9/3


# --------------------------------------------------------------------------------------------
# top-k and partition search


@pytest.mark.parametrize("dim,K,k", [(64, 50, 5), (37, 20, 1), (70, 9, 12), (8, 200, 64)])
def test_top_codes_match_reference(dim, K, k):
    T_packed = book(K, dim, k)
    q = queries(23, dim, K)
    dot = np.empty((23, k), np.int32)
    idx = vq_route.top_codes(q, T_packed, dim, k, out_dot=dot)
    ref_idx, ref_dot = vq_route.top_codes_reference(q, T_packed, dim, k)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_array_equal(dot, ref_dot)
    np.testing.assert_array_equal(idx[:, 0], vq_search.nearest_code(q, T_packed, dim))
    if k > K:
        assert (idx[:, K:] == -1).all()


def test_top_codes_slices_merge_in_order():
    # The GPU splits the book into slices and merges their sorted lists; check that path on
    # the CPU twins with small slices and many ties.
    dim, K, k, n = 6, 90, 10, 15
    T_packed = book(K, dim, 4)
    T_packed[45:] = T_packed[:45]
    q = queries(n, dim, 8)
    S, slice_len = 13, 7
    part = [np.empty((S, n, k), np.int32) for _ in range(3)]
    vq_route._top_codes_partial_cpu(q, T_packed, np.int64(slice_len), *part)
    idx = np.empty((n, k), np.int32)
    dot = np.empty((n, k), np.int32)
    vq_route._top_codes_merge_cpu(*part, idx, dot)
    ref_idx, ref_dot = vq_route.top_codes_reference(q, T_packed, dim, k)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_array_equal(dot, ref_dot)


def _partitions(K, P, seed):
    assign = np.random.default_rng(seed).integers(0, P, K)
    assign[: min(K, 3)] = 0  # partition 0 is not empty; some others may be
    codes = np.argsort(assign, kind="stable")[::-1].astype(np.int32)  # list order != index order
    codes = codes[np.argsort(assign[codes], kind="stable")]
    offsets = np.zeros(P + 1, np.int64)
    offsets[1:] = np.cumsum(np.bincount(assign, minlength=P))
    return offsets, np.ascontiguousarray(codes)


@pytest.mark.parametrize("dim,K,P", [(64, 400, 16), (37, 50, 9), (70, 30, 40)])
def test_partition_search_matches_reference(dim, K, P):
    T_packed = book(K, dim, P)
    T_packed[K // 2:] = T_packed[: K - K // 2]  # duplicate codes: ties across partitions
    offsets, codes = _partitions(K, P, dim)
    q = queries(31, dim, P)
    probe = np.random.default_rng(K).integers(0, P, (31, 3)).astype(np.int32)
    probe[0] = probe[0, 0]  # one partition probed three times
    dot = np.empty(31, np.int32)
    idx = vq_route.nearest_code_in_partitions(q, T_packed, dim, offsets, codes, probe, out_dot=dot)
    ref_idx, ref_dot = vq_route.nearest_code_in_partitions_reference(q, T_packed, dim, offsets, codes, probe)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_array_equal(dot, ref_dot)
    # probing every partition is the exact search
    everything = np.tile(np.arange(P, dtype=np.int32), (31, 1))
    np.testing.assert_array_equal(
        vq_route.nearest_code_in_partitions(q, T_packed, dim, offsets, codes, everything),
        vq_search.nearest_code(q, T_packed, dim))


def test_partition_search_empty_partitions_give_minus_one():
    T_packed = book(10, 64, 1)
    offsets = np.array([0, 10, 10, 10], np.int64)  # partitions 1 and 2 are empty
    codes = np.arange(10, dtype=np.int32)
    q = queries(2, 64, 2)
    dot = np.empty(2, np.int32)
    idx = vq_route.nearest_code_in_partitions(q, T_packed, 64, offsets, codes,
                                        np.array([[1, 2], [2, 0]], np.int32), out_dot=dot)
    assert idx[0] == -1 and dot[0] == 0
    assert idx[1] == vq_search.nearest_code(q[1:], T_packed, 64)[0]


# --------------------------------------------------------------------------------------------
# usage counts


@pytest.mark.parametrize("K", [1, 7, 64])
@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
def test_count_usage_saturates(K, index_dtype):
    rng = np.random.default_rng(K)
    usage = rng.integers(0, 32767, K).astype(np.int16)
    usage[0] = 32760
    usage[-1] = 32766
    indices = np.concatenate([rng.integers(0, K, 300), np.zeros(20, int), np.full(5, K - 1)])
    indices = indices.astype(index_dtype)
    ref = vq_usage.count_usage_reference(indices, usage)
    assert vq_usage.count_usage(indices, usage) is usage
    np.testing.assert_array_equal(usage, ref)
    assert usage[0] == 32767 and usage[-1] == 32767
    big = np.zeros(K + 1, np.int16)  # a view at an odd offset works too (no word access)
    vq_usage.count_usage(indices, big[1:])
    np.testing.assert_array_equal(big[1:], vq_usage.count_usage_reference(indices, np.zeros(K, np.int16)))


# --------------------------------------------------------------------------------------------
# bad input


def test_bad_queries_and_books():
    T_packed = book(10, 64, 0)
    q = queries(3, 64, 0)
    with pytest.raises(ValueError, match=r"nearest_code: queries has shape \(3, 2\), expected \(n, 4\) for dim=64"):
        vq_search.nearest_code(q[:, :2].copy(), T_packed, 64)
    with pytest.raises(TypeError, match=r"nearest_code: queries has dtype float32, expected uint32 bitplanes \(ternarise"):
        vq_search.nearest_code(np.zeros((3, 64), np.float32), T_packed, 64)
    with pytest.raises(ValueError, match=r"nearest_code: T_packed has shape \(10, 4\), expected \(K, 6\) for dim=70"):
        vq_search.nearest_code(queries(3, 70, 0), T_packed, 70)
    with pytest.raises(ValueError, match=r"nearest_code: T_packed has 0 codes"):
        vq_search.nearest_code(q, T_packed[:0], 64)
    with pytest.raises(ValueError, match=r"nearest_code: queries is not C-contiguous"):
        vq_search.nearest_code(np.asfortranarray(q), T_packed, 64)
    with pytest.raises(ValueError, match=r"nearest_code: out_index has shape \(2,\), expected \(3,\)"):
        vq_search.nearest_code(q, T_packed, 64, out_index=np.empty(2, np.int32))
    with pytest.raises(ValueError, match=r"nearest_code: method 'mma' needs a GPU"):
        vq_search.nearest_code(q, T_packed, 64, method="mma")
    with pytest.raises(ValueError, match=r"top_codes: k = 65 is out of range, expected 1..64"):
        vq_route.top_codes(q, T_packed, 64, 65)
    with pytest.raises(TypeError, match=r"ternarize_queries: x has dtype float64, expected float32"):
        vq_search.ternarize_queries(np.zeros((2, 64)))


def test_bad_partitions():
    T_packed = book(10, 64, 0)
    q = queries(2, 64, 0)
    codes = np.arange(10, dtype=np.int32)
    offsets = np.array([0, 4, 10], np.int64)
    probe = np.zeros((2, 1), np.int32)
    call = vq_route.nearest_code_in_partitions
    with pytest.raises(ValueError, match=r"probe holds 2, expected partition indices in \[0, 2\)"):
        call(q, T_packed, 64, offsets, codes, np.array([[0], [2]], np.int32))
    with pytest.raises(ValueError, match=r"probe holds -1"):
        call(q, T_packed, 64, offsets, codes, np.array([[0], [-1]], np.int32))
    with pytest.raises(TypeError, match=r"probe has dtype int64, expected int32"):
        call(q, T_packed, 64, offsets, codes, probe.astype(np.int64))
    with pytest.raises(ValueError, match=r"partition_codes holds 10, expected code indices in \[0, 10\)"):
        call(q, T_packed, 64, offsets, codes + 1, probe)
    with pytest.raises(ValueError, match=r"partition_offsets must rise from 0 to len\(partition_codes\) = 10"):
        call(q, T_packed, 64, np.array([0, 6, 4, 10], np.int64), codes, probe)
    with pytest.raises(ValueError, match=r"probe has shape \(3, 1\), expected \(2, nprobe\)"):
        call(q, T_packed, 64, offsets, codes, np.zeros((3, 1), np.int32))
    with pytest.raises(ValueError, match=r"method = 'fast', expected 'auto', 'mma' or 'scan'"):
        call(q, T_packed, 64, offsets, codes, probe, method="fast")
    with pytest.raises(ValueError, match=r"method 'mma' needs a GPU \(or the simulator\) and "
                                         r"dim <= 64, got device cpu and dim=64"):
        call(q, T_packed, 64, offsets, codes, probe, method="mma")


def test_bad_usage_calls_change_nothing():
    usage = np.arange(8, dtype=np.int16)
    before = usage.copy()
    with pytest.raises(ValueError, match=r"count_usage: indices\[2\] = 8 is out of range; expected code indices in \[0, 8\)"):
        vq_usage.count_usage(np.array([0, 1, 8]), usage)
    with pytest.raises(ValueError, match=r"count_usage: indices\[0\] = -1 is out of range"):
        vq_usage.count_usage(np.array([-1, 1], np.int32), usage)
    with pytest.raises(TypeError, match=r"count_usage: indices has dtype float64, expected int32 or int64"):
        vq_usage.count_usage(np.array([1.0]), usage)
    with pytest.raises(TypeError, match=r"count_usage: usage has dtype int32, expected int16"):
        vq_usage.count_usage(np.array([1]), usage.astype(np.int32))
    np.testing.assert_array_equal(usage, before)


# --------------------------------------------------------------------------------------------
# the CUDA kernels under the simulator, against the CPU twins (tiny shapes)


@pytest.mark.cudasim
@pytest.mark.parametrize("dim,K,n", [(64, 45, 20), (20, 30, 70), (70, 20, 5)])
def test_sim_ternarize_and_nearest(dim, K, n):
    x = np.random.default_rng(dim).standard_normal((n, dim)).astype(np.float32)
    q = vq_search.ternarize_queries(x)
    expected = np.empty_like(q)
    vq_search._ternarize_queries_cpu(x, expected)
    np.testing.assert_array_equal(q, expected)
    T_packed = book(K, dim, n)
    T_packed[K // 2:] = T_packed[: K - K // 2]  # ties across chunks
    ref = vq_search.nearest_code_reference(q, T_packed, dim)
    for method in (["mma", "scan"] if dim <= 64 else ["scan"]):
        dot = np.empty(n, np.int32)
        idx = vq_search.nearest_code(q, T_packed, dim, out_dot=dot, method=method)
        np.testing.assert_array_equal(idx, ref[0], err_msg=method)
        np.testing.assert_array_equal(dot, ref[1], err_msg=method)


@pytest.mark.cudasim
def test_sim_top_codes_partitions_and_usage():
    dim, K, P = 37, 24, 5
    T_packed = book(K, dim, 1)
    q = queries(9, dim, 2)
    np.testing.assert_array_equal(vq_route.top_codes(q, T_packed, dim, 4),
                                  vq_route.top_codes_reference(q, T_packed, dim, 4)[0])
    offsets, codes = _partitions(K, P, 3)
    probe = np.random.default_rng(4).integers(0, P, (9, 2)).astype(np.int32)
    for method in ("mma", "scan"):
        np.testing.assert_array_equal(
            vq_route.nearest_code_in_partitions(q, T_packed, dim, offsets, codes, probe, method=method),
            vq_route.nearest_code_in_partitions_reference(q, T_packed, dim, offsets, codes, probe)[0],
            err_msg=method)
    usage = np.array([32766, 0, 5, 32767, 9], np.int16)
    indices = np.array([0, 0, 0, 1, 4, 4, 3, 2], np.int64)
    ref = vq_usage.count_usage_reference(indices, usage)
    np.testing.assert_array_equal(vq_usage.count_usage(indices, usage), ref)


@pytest.mark.cudasim
def test_sim_top_codes_tiles_keep_the_best_so_far():
    # a slice longer than a block's sort (128 keys a pass in the simulator): each later
    # pass's codes compete with the best k kept from the passes before it
    dim, K = 20, 400
    T_packed = book(K, dim, 11)
    T_packed[350:] = T_packed[:50]  # ties across the passes
    q = queries(2, dim, 12)
    idx = vq_route.top_codes(q, T_packed, dim, 3)
    np.testing.assert_array_equal(idx, vq_route.top_codes_reference(q, T_packed, dim, 3)[0])
    # a narrow book: few distinct scores, so ties everywhere, settled by the lower index
    T_packed = book(300, 5, 13)
    q = queries(3, 5, 14)
    dot = np.empty((3, 12), np.int32)
    idx = vq_route.top_codes(q, T_packed, 5, 12, out_dot=dot)
    ref_idx, ref_dot = vq_route.top_codes_reference(q, T_packed, 5, 12)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_array_equal(dot, ref_dot)


@pytest.mark.cudasim
def test_sim_top_codes_refuses_dims_its_key_cannot_rank():
    words = 2 * (1 << 17) // 32
    T_packed, q = np.zeros((2, words), np.uint32), np.zeros((1, words), np.uint32)
    with pytest.raises(ValueError, match=r"top_codes: dim = 131072: the GPU kernel ranks codes "
                                         r"by a float64 key, exact for dim < 131072"):
        vq_route.top_codes(q, T_packed, 1 << 17, 1)


@pytest.mark.cudasim
@pytest.mark.parametrize("dim", [20, 70])
def test_sim_partition_search_many_queries_a_partition(dim):
    # 40 queries on 2 partitions: pairs in more than one group of 32; dim 20 has one 32-trit
    # group, dim 70 three (the groups past the two kept in registers)
    K, P = 30, 3
    T_packed = book(K, dim, 13)
    offsets, codes = _partitions(K, P, 14)
    q = queries(40, dim, 15)
    probe = np.random.default_rng(16).integers(0, 2, (40, 2)).astype(np.int32)
    ref_idx, ref_dot = vq_route.nearest_code_in_partitions_reference(q, T_packed, dim, offsets, codes,
                                                               probe)
    for method in (["mma", "scan"] if dim <= 64 else ["scan"]):
        dot = np.empty(40, np.int32)
        idx = vq_route.nearest_code_in_partitions(q, T_packed, dim, offsets, codes, probe, out_dot=dot,
                                            method=method)
        np.testing.assert_array_equal(idx, ref_idx, err_msg=method)
        np.testing.assert_array_equal(dot, ref_dot, err_msg=method)


@pytest.mark.cudasim
def test_sim_partition_search_mma_ties_in_list_order():
    # the tensor-core kernel sees a partition's codes in list order (here falling index),
    # split over warps and lanes: equal scores must still go to the lowest index, within one
    # lane (codes 64 apart in the list are 8 steps apart: the same warp and lane) and across
    # them; a partition longer than a staged tile, an empty one, a group of one pair
    dim, K = 24, 600
    T_packed = book(64, dim, 31)[np.arange(K) % 64]
    codes = np.ascontiguousarray(np.arange(K, dtype=np.int32)[::-1])
    offsets = np.array([0, 560, 560, 600], np.int64)
    q = queries(17, dim, 32)
    probe = np.zeros((17, 2), np.int32)
    probe[:, 1] = 2
    probe[16] = 1      # only the empty partition: -1
    dot = np.empty(17, np.int32)
    idx = vq_route.nearest_code_in_partitions(q, T_packed, dim, offsets, codes, probe, out_dot=dot,
                                        method="mma")
    ref_idx, ref_dot = vq_route.nearest_code_in_partitions_reference(q, T_packed, dim, offsets, codes,
                                                               probe)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_array_equal(dot, ref_dot)
    assert idx[16] == -1 and dot[16] == 0


# --------------------------------------------------------------------------------------------
# the CUDA kernels on a GPU (CuPy), against the CPU twins


@pytest.mark.cuda
@pytest.mark.parametrize("dim,K,n", [(64, 200_000, 1000), (64, 3001, 4099), (32, 5000, 77),
                                     (37, 999, 300), (70, 2000, 100), (5, 500, 64)])
def test_cuda_nearest_matches_cpu(dim, K, n):
    T_packed = book(K, dim, K)
    T_packed[K // 2: K // 2 + 50] = T_packed[:50]  # exact duplicates: ties across chunks
    x = np.random.default_rng(n).standard_normal((n, dim)).astype(np.float32)
    q_cpu = vq_search.ternarize_queries(x)
    q_gpu = vq_search.ternarize_queries(cupy.asarray(x))
    np.testing.assert_array_equal(q_gpu.get(), q_cpu)
    q_near = near_book_queries(T_packed, dim, n, 5)
    for q in (q_cpu, q_near):
        dot = np.empty(n, np.int32)
        idx = vq_search.nearest_code(q, T_packed, dim, out_dot=dot)
        for method in (["auto", "mma", "scan"] if dim <= 64 else ["auto"]):
            g_dot = cupy.empty(n, cupy.int32)
            g_idx = vq_search.nearest_code(cupy.asarray(q), cupy.asarray(T_packed), dim, out_dot=g_dot,
                                    method=method)
            np.testing.assert_array_equal(g_idx.get(), idx, err_msg=method)
            np.testing.assert_array_equal(g_dot.get(), dot, err_msg=method)


@pytest.mark.cuda
def test_cuda_nearest_matches_reference_on_a_subset():
    T_packed = book(20_000, 64, 1)
    q = queries(64, 64, 1)
    idx = vq_search.nearest_code(cupy.asarray(q), cupy.asarray(T_packed), 64)
    np.testing.assert_array_equal(idx.get(), vq_search.nearest_code_reference(q, T_packed, 64)[0])


@pytest.mark.cuda
def test_cuda_top_codes_partitions_and_usage():
    dim, K, P = 64, 5000, 64
    T_packed = book(K, dim, 3)
    q = queries(500, dim, 4)
    T_g, q_g = cupy.asarray(T_packed), cupy.asarray(q)
    np.testing.assert_array_equal(vq_route.top_codes(q_g, T_g, dim, 8).get(), vq_route.top_codes(q, T_packed, dim, 8))
    offsets, codes = _partitions(K, P, 5)
    probe = vq_route.top_codes(q, book(P, dim, 6), dim, 4)
    np.testing.assert_array_equal(
        vq_route.nearest_code_in_partitions(q_g, T_g, dim, cupy.asarray(offsets), cupy.asarray(codes),
                                      cupy.asarray(probe)).get(),
        vq_route.nearest_code_in_partitions(q, T_packed, dim, offsets, codes, probe))
    usage = np.random.default_rng(7).integers(32000, 32767, 1001).astype(np.int16)
    indices = np.random.default_rng(8).integers(0, 1001, 100_000).astype(np.int32)
    indices[:5000] = 1000  # one counter, heavily contended
    indices[5000:9000] = 999  # its neighbour in the same 32-bit word
    g_usage = cupy.asarray(usage)
    vq_usage.count_usage(cupy.asarray(indices), g_usage)
    np.testing.assert_array_equal(g_usage.get(), vq_usage.count_usage_reference(indices, usage))


@pytest.mark.cuda
@pytest.mark.parametrize("dim,n,P,k", [(64, 3000, 3162, 48), (20, 7, 5000, 64), (100, 400, 300, 16)])
def test_cuda_routed_search_at_training_shapes(dim, n, P, k):
    # top_codes: the default preset's shape (3 tiles of a slice), few queries (many slices),
    # dim > 64; then the partition search with every pair of those probes
    K = 40 * P
    centroids = book(P, dim, 21)
    centroids[P // 2:P // 2 + 40] = centroids[:40]  # ties across tiles and slices
    q = queries(n, dim, 22)
    dot = np.empty((n, k), np.int32)
    probe = vq_route.top_codes(q, centroids, dim, k, out_dot=dot)
    g_dot = cupy.empty((n, k), cupy.int32)
    g_probe = vq_route.top_codes(cupy.asarray(q), cupy.asarray(centroids), dim, k, out_dot=g_dot)
    np.testing.assert_array_equal(g_probe.get(), probe)
    np.testing.assert_array_equal(g_dot.get(), dot)
    T_packed = book(K, dim, 23)
    T_packed[K // 2:K // 2 + 100] = T_packed[:100]
    offsets, codes = _partitions(K, P, 24)
    dot = np.empty(n, np.int32)
    idx = vq_route.nearest_code_in_partitions(q, T_packed, dim, offsets, codes, probe, out_dot=dot)
    for method in (["auto", "mma", "scan"] if dim <= 64 else ["auto"]):
        g_dot = cupy.empty(n, cupy.int32)
        g_idx = vq_route.nearest_code_in_partitions(cupy.asarray(q), cupy.asarray(T_packed), dim,
                                              cupy.asarray(offsets), cupy.asarray(codes),
                                              g_probe, out_dot=g_dot, method=method)
        np.testing.assert_array_equal(g_idx.get(), idx, err_msg=method)
        np.testing.assert_array_equal(g_dot.get(), dot, err_msg=method)


@pytest.mark.cuda
def test_cuda_partition_search_skewed_probes():
    # most queries probe the same few partitions (hundreds of pairs each: many work items of
    # one partition), near-book queries (few ties) and random ones (many)
    dim, K, P, n = 64, 60_000, 200, 3000
    T_packed = book(K, dim, 41)
    T_packed[K // 2:K // 2 + 500] = T_packed[:500]
    offsets, codes = _partitions(K, P, 42)
    rng = np.random.default_rng(43)
    probe = np.where(rng.random((n, 8)) < 0.7, rng.integers(0, 4, (n, 8)),
                     rng.integers(0, P, (n, 8))).astype(np.int32)
    for q in (queries(n, dim, 44), near_book_queries(T_packed, dim, n, 45)):
        dot = np.empty(n, np.int32)
        idx = vq_route.nearest_code_in_partitions(q, T_packed, dim, offsets, codes, probe, out_dot=dot)
        for method in ("mma", "scan"):
            g_dot = cupy.empty(n, cupy.int32)
            g_idx = vq_route.nearest_code_in_partitions(
                cupy.asarray(q), cupy.asarray(T_packed), dim, cupy.asarray(offsets),
                cupy.asarray(codes), cupy.asarray(probe), out_dot=g_dot, method=method)
            np.testing.assert_array_equal(g_idx.get(), idx, err_msg=method)
            np.testing.assert_array_equal(g_dot.get(), dot, err_msg=method)


@pytest.mark.cuda
def test_cuda_bad_input_raises_before_launch():
    usage = cupy.zeros(10, cupy.int16)
    with pytest.raises(ValueError, match=r"count_usage: indices\[1\] = 10 is out of range"):
        vq_usage.count_usage(cupy.asarray([1, 10]), usage)
    assert int(usage.sum()) == 0
    with pytest.raises(ValueError, match=r"nearest_code: queries has shape \(2, 2\), expected \(n, 4\)"):
        vq_search.nearest_code(cupy.zeros((2, 2), cupy.uint32), cupy.zeros((5, 4), cupy.uint32), 64)
