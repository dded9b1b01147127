"""VQ search, gather/scatter and sparse-update benchmark on a GPU (docs/contributing.md#benchmarks).

    PYTHONPATH=. python3 benchmarks/bench_vq.py [--rows 10000000] [--queries 4096] [--out DIR]

Runs, in one process on the same inputs:
- exact nearest-code search of `--queries` ternarised queries over a rows x 64 ternary book
  (tritnet_kernels.vq_search.nearest_code: int8 tensor cores, and the popcount scan for reference);
- the natural peer: cuBLAS fp16 score GEMM (cupy.matmul) + argmax over the same codes widened
  to fp16 (each code scaled by 1/sqrt(nn), the same cosine score), 1M codes per chunk, the
  widened book built once outside the timing (the peer's best case: a float book kept in
  memory, 8x the bytes of the packed one);
- agreement of the argmins with the NumPy reference on a subset of queries, and with the CPU
  twin on more;
- routed search (top-nprobe of 4096 ternary centroids, then exact search inside the probed
  partitions) on queries near book codes, with recall@1 against exact;
- gather / segment-sum (scatter) of 64K rows against the measured device copy bandwidth;
- the sparse optimiser step for the rows touched by 64K lookups;
- device memory of the book with its training state, in bytes per trit.

Floors (H100 SXM, 132 SMs, ~1.75-1.98 GHz):
- popcount search: 4096 x 10M pairs x 2 groups x 2 popcounts = 1.6e11 popcounts; POPC issues
  16 per clock per SM -> 132 * 16 * 1.98e9 = 4.2e12/s -> 39 ms, i.e. <= 105k queries/s before
  any other instruction. That is why the search runs on the tensor cores instead:
- int8 mma: 4096 x 10M x 64 = 2.6e12 MACs; at the ~1000 dense int8 TOPS that mma.sync reaches
  on an H100 (half of wgmma's 1979) -> 5 ms; the epilogue needs >= 2 instructions per pair
  (filter compare + branch): 8.2e10 thread-instr / (132 * 128 * 1.75e9 /s) = 2.8 ms. Floor
  ~5-8 ms -> 500-800k queries/s.
- gather / scatter / update of 64K x 64: 16-32 MB each, tens of microseconds at 3 TB/s; launch
  cost (Numba dispatch 20-100 us, docs/kernels.md#launching) decides these.

Writes <out>/vq-<device>.json (device, versions, commit, date, all numbers) and prints a short
table last.
"""

import argparse
import datetime as _dt
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import cupy  # noqa: E402
from numba.cuda.core import config as numba_cuda_config  # noqa: E402

from tritnet_kernels import packing as kpacking  # noqa: E402
from tritnet_kernels import sparse_rows as tb  # noqa: E402
from tritnet_kernels import update as U  # noqa: E402
from tritnet_kernels import _vq_rules  # noqa: E402
from tritnet_kernels import vq_route  # noqa: E402
from tritnet_kernels import vq_search  # noqa: E402
from tritnet_kernels import vq_usage  # noqa: E402


def timed(fn, reps=5, warmup=1):
    """Median device time in ms (CUDA events) and median host wall time in ms per call."""
    for _ in range(warmup):
        fn()
    cupy.cuda.Device().synchronize()
    dev, wall = [], []
    for _ in range(reps):
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        t0 = time.perf_counter()
        start.record()
        fn()
        end.record()
        end.synchronize()
        wall.append((time.perf_counter() - t0) * 1e3)
        dev.append(cupy.cuda.get_elapsed_time(start, end))
    return float(np.median(dev)), float(np.median(wall))


def graph_time(fn, reps=50):
    """Device time per call from a captured CUDA graph (launch cost removed), or None."""
    stream = cupy.cuda.Stream(non_blocking=True)
    try:
        with stream:
            fn()  # warm (compile outside the capture)
            stream.synchronize()
            stream.begin_capture()
            fn()
            graph = stream.end_capture()
            graph.launch(stream)
            stream.synchronize()
            start, end = cupy.cuda.Event(), cupy.cuda.Event()
            start.record(stream)
            for _ in range(reps):
                graph.launch(stream)
            end.record(stream)
            end.synchronize()
        return cupy.cuda.get_elapsed_time(start, end) / reps
    except Exception as e:  # capture is best effort: report why it failed
        try:
            stream.end_capture()
        except Exception:
            pass
        return f"capture failed: {type(e).__name__}: {str(e)[:120]}"


class Sections:
    """Run each benchmark section even if an earlier one failed; save after each."""

    def __init__(self, res, path):
        self.res, self.path = res, path

    def run(self, name, fn):
        t0 = time.perf_counter()
        try:
            fn()
        except Exception as e:  # record and go on: one broken section must not cost the run
            import traceback

            self.res.setdefault("errors", {})[name] = traceback.format_exc()[-2000:]
            print(f"[{name}] FAILED: {type(e).__name__}: {e}", flush=True)
        self.res.setdefault("section_seconds", {})[name] = round(time.perf_counter() - t0, 2)
        self.path.write_text(json.dumps(self.res, indent=2, default=str) + "\n")


def device_slug(name):
    for key in ("H200", "H100", "A100", "L40", "A10", "T4"):
        if key in name:
            return key.lower()
    return name.lower().replace(" ", "-")[:20]


def widen_fp16(T_packed, dim, c0, c1):
    """Codes c0..c1 as fp16 rows T / sqrt(nn): the peer's float copy of the book."""
    words = T_packed[c0:c1]
    bits = cupy.arange(32, dtype=cupy.uint32)
    plus = (words[:, 0::2, None] >> bits) & 1
    minus = (words[:, 1::2, None] >> bits) & 1
    T = (plus.astype(cupy.float32) - minus.astype(cupy.float32)).reshape(c1 - c0, -1)[:, :dim]
    nn = cupy.maximum(cupy.count_nonzero(T, axis=1), 1).astype(cupy.float32)
    return (T / cupy.sqrt(nn)[:, None]).astype(cupy.float16)


def reference_subset(q_host, T_host, dim, chunk=1 << 20):
    """NumPy reference argmins of a few queries over the whole book, a chunk at a time."""
    best_score = np.full(len(q_host), -np.inf)
    best_idx = np.full(len(q_host), -1, dtype=np.int64)
    for c0 in range(0, len(T_host), chunk):
        _, score = vq_search.code_scores_reference(q_host, T_host[c0:c0 + chunk], dim)
        i = np.argmax(score, axis=1)
        s = score[np.arange(len(i)), i]
        better = s > best_score  # strict: an equal score in a later chunk has a larger index
        best_score[better] = s[better]
        best_idx[better] = c0 + i[better]
    return best_idx


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--queries", type=int, default=4096)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--lookups", type=int, default=65536)
    ap.add_argument("--partitions", type=int, default=4096)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    K, n, dim, L, P = args.rows, args.queries, args.dim, args.lookups, args.partitions
    G2 = 2 * -(-dim // 32)
    props = cupy.cuda.runtime.getDeviceProperties(0)
    device = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    res = dict(device=device, sm_count=props["multiProcessorCount"], rows=K, queries=n, dim=dim,
               lookups=L, date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    try:
        git = subprocess.run(["git", "rev-parse", "--verify", "HEAD"], cwd=ROOT,
                             capture_output=True, text=True)
        res["commit"] = git.stdout.strip() if git.returncode == 0 else "uncommitted"
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True,
                               text=True).stdout.strip()
        res["working_tree_clean"] = not dirty
    except Exception:
        res["commit"] = "unknown"
    import importlib.metadata as md

    res["versions"] = {p: md.version(p) for p in ("numpy", "numba", "numba-cuda", "cupy-cuda13x",
                                                  "cupy-cuda12x") if _has(md, p)}
    res["versions"]["python"] = platform.python_version()
    res["versions"]["cuda_runtime"] = cupy.cuda.runtime.runtimeGetVersion()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"vq-{device_slug(device)}.json"
    sections = Sections(res, path)
    print(f"device {device}, book {K} x {dim}, {n} queries", flush=True)
    c = {}  # state shared by the sections

    def copy_bandwidth():
        buf = cupy.empty(1 << 30, dtype=cupy.uint8)
        buf2 = cupy.empty_like(buf)
        ms, _ = timed(lambda: buf2.__setitem__(Ellipsis, buf), reps=10)
        c["copy_bw"] = 2 * buf.nbytes / (ms * 1e-3)
        res["copy_bandwidth_GBps"] = c["copy_bw"] / 1e9

    def build_book():
        pool = cupy.get_default_memory_pool()
        pool.free_all_blocks()
        used0 = pool.used_bytes()
        T_packed = cupy.empty((K, G2), dtype=cupy.uint32)
        E = cupy.empty(K, dtype=cupy.int8)
        t0 = time.perf_counter()
        tb.random_table(T_packed, dim, 2026, E=E, exponent=-16)
        cupy.cuda.Device().synchronize()
        res["random_table_s_with_compile"] = time.perf_counter() - t0
        ms, _ = timed(lambda: tb.random_table(T_packed, dim, 2026), reps=3)
        res["random_table_ms"] = ms
        E[...] = cupy.random.default_rng(1).integers(-40, 8, K).astype(cupy.int8)
        T_accum = cupy.zeros((K, dim), dtype=cupy.int8)
        E_accum = cupy.zeros(K, dtype=cupy.int8)
        usage = cupy.zeros(K, dtype=cupy.int16)
        state = pool.used_bytes() - used0
        res["memory"] = dict(
            book_and_state_bytes=int(state), bytes_per_trit=state / (K * dim),
            bytes_per_trit_without_usage=(state - usage.nbytes) / (K * dim),
            parts=dict(T_packed=T_packed.nbytes, E=E.nbytes, T_accum=T_accum.nbytes,
                       E_accum=E_accum.nbytes, usage=usage.nbytes),
            fp16_book_bytes=K * dim * 2,
            kg_book_5M_bytes=int(state * (K // 2) / K))  # same layout, half the rows
        c.update(T_packed=T_packed, E=E, T_accum=T_accum, E_accum=E_accum, usage=usage)

    def exact_search():
        T_packed = c["T_packed"]
        x = cupy.random.default_rng(3).standard_normal((n, dim), dtype=cupy.float32)
        q = vq_search.ternarize_queries(x)
        idx = cupy.empty(n, dtype=cupy.int32)
        dot = cupy.empty(n, dtype=cupy.int32)
        t0 = time.perf_counter()
        vq_search.nearest_code(q, T_packed, dim, idx, dot)
        cupy.cuda.Device().synchronize()
        res["search_first_call_s"] = time.perf_counter() - t0
        ms, wall = timed(lambda: vq_search.nearest_code(q, T_packed, dim, idx, dot), reps=5)
        res["search_mma"] = dict(ms=ms, wall_ms=wall, queries_per_s=n / (ms * 1e-3))
        print(f"exact search (tensor cores): {ms:.2f} ms, {n / ms * 1e3:,.0f} q/s", flush=True)
        c.update(q=q, idx=idx, idx_host=idx.get(), q_host=q.get())

    def scan_search():
        idx_scan = cupy.empty(n, dtype=cupy.int32)
        ms, _ = timed(lambda: vq_search.nearest_code(c["q"], c["T_packed"], dim, idx_scan,
                                              method="scan"), reps=1, warmup=1)
        res["search_scan"] = dict(ms=ms, queries_per_s=n / (ms * 1e-3),
                                  identical_to_mma=bool((idx_scan.get() == c["idx_host"]).all()))
        print(f"exact search (popcount scan): {ms:.1f} ms", flush=True)

    def agreement():
        q_host, idx_host = c["q_host"], c["idx_host"]
        T_host = c["T_packed"].get()
        c["T_host"] = T_host
        n_twin = min(n, 512)
        t0 = time.perf_counter()
        twin = vq_search.nearest_code(q_host[:n_twin], T_host, dim)
        res["cpu_twin"] = dict(queries=n_twin, seconds=time.perf_counter() - t0,
                               identical=bool((twin == idx_host[:n_twin]).all()))
        n_ref = min(n, 32)
        t0 = time.perf_counter()
        c["ref"] = reference_subset(q_host[:n_ref], T_host, dim)
        res["reference"] = dict(queries=n_ref, seconds=time.perf_counter() - t0,
                                identical=bool((c["ref"] == idx_host[:n_ref]).all()))
        print(f"agreement: cpu twin {res['cpu_twin']}, reference {res['reference']}", flush=True)

    def peer():
        T_packed, q_host, idx_host = c["T_packed"], c["q_host"], c["idx_host"]
        chunk = 1 << 20
        W16 = cupy.empty((K, dim), dtype=cupy.float16)
        for c0 in range(0, K, chunk):
            W16[c0:c0 + chunk] = widen_fp16(T_packed, dim, c0, min(K, c0 + chunk))
        Q16 = cupy.asarray(_vq_rules.unpack_bits(q_host, dim).astype(np.float16))
        rows_n = cupy.arange(n)

        def search():
            best_v = cupy.full(n, -cupy.inf, dtype=cupy.float32)
            best_i = cupy.zeros(n, dtype=cupy.int64)
            for c0 in range(0, K, chunk):
                S = cupy.matmul(Q16, W16[c0:c0 + chunk].T)
                i = S.argmax(axis=1)
                v = S[rows_n, i].astype(cupy.float32)
                better = v > best_v
                best_v = cupy.where(better, v, best_v)
                best_i = cupy.where(better, i + c0, best_i)
            return best_i

        ms, _ = timed(search, reps=3)
        peer_idx = search().get()
        ref = c.get("ref")
        res["peer_fp16_gemm_argmax"] = dict(
            ms=ms, queries_per_s=n / (ms * 1e-3), chunk=chunk,
            agreement_with_tritnet=float((peer_idx == idx_host).mean()),
            agreement_with_reference_subset=(float((peer_idx[:len(ref)] == ref).mean())
                                             if ref is not None else None))
        res["speedup_vs_peer"] = ms / res["search_mma"]["ms"]
        print(f"peer fp16 GEMM + argmax: {ms:.1f} ms, {n / ms * 1e3:,.0f} q/s", flush=True)

    def routed():
        T_packed = c["T_packed"]
        T_host = c.get("T_host")
        if T_host is None:
            T_host = c["T_host"] = T_packed.get()
        rng = np.random.default_rng(5)
        centroids = T_packed[cupy.asarray(np.sort(rng.choice(K, P, replace=False)))]
        t0 = time.perf_counter()
        assign = vq_search.nearest_code(T_packed, centroids, dim)  # each code to its nearest centroid
        codes = cupy.argsort(assign).astype(cupy.int32)
        offsets = cupy.zeros(P + 1, dtype=cupy.int64)
        offsets[1:] = cupy.cumsum(cupy.bincount(assign, minlength=P))
        cupy.cuda.Device().synchronize()
        out = dict(partitions=P, build_s=time.perf_counter() - t0,
                   queries="book codes with 8 of 64 trits redrawn (held out: not in the book)")
        src = rng.integers(0, K, n)
        T_src = _vq_rules.unpack_bits(T_host[src], dim).astype(np.int64)
        for row in T_src:
            j = rng.choice(dim, 8, replace=False)
            row[j] = rng.integers(-1, 2, 8)
        qn = cupy.asarray(kpacking.pack_trits(T_src.astype(np.int8)))
        exact_host = vq_search.nearest_code(qn, T_packed, dim).get()
        out_r = cupy.empty(n, dtype=cupy.int32)
        out_p = cupy.empty(n, dtype=cupy.int32)
        T_perm = T_packed[codes]  # a module may keep its book sorted by partition
        identity = cupy.arange(K, dtype=cupy.int32)
        for nprobe in (1, 4, 16, 64):
            probe = cupy.empty((n, nprobe), dtype=cupy.int32)

            def search():
                vq_route.top_codes(qn, centroids, dim, nprobe, out_index=probe)
                vq_route.nearest_code_in_partitions(qn, T_packed, dim, offsets, codes, probe, out_r,
                                              check=False)

            ms, wall = timed(search, reps=5)
            ms_top, _ = timed(lambda: vq_route.top_codes(qn, centroids, dim, nprobe, out_index=probe),
                              reps=3)
            recall = float((out_r.get() == exact_host).mean())

            def search_contiguous():  # the book stored in partition order: no gather
                vq_route.top_codes(qn, centroids, dim, nprobe, out_index=probe)
                vq_route.nearest_code_in_partitions(qn, T_perm, dim, offsets, identity, probe, out_p,
                                              check=False)

            ms_c, _ = timed(search_contiguous, reps=5)
            recall_c = float((codes[out_p].get() == exact_host).mean())
            out[f"nprobe_{nprobe}"] = dict(ms=ms, wall_ms=wall, top_codes_ms=ms_top,
                                           queries_per_s=n / (ms * 1e-3), recall_at_1=recall,
                                           book_in_partition_order_ms=ms_c,
                                           book_in_partition_order_queries_per_s=n / (ms_c * 1e-3),
                                           book_in_partition_order_recall_at_1=recall_c)
            print(f"routed nprobe={nprobe}: {ms:.2f} ms ({ms_c:.2f} ms with the book in "
                  f"partition order), recall@1 {recall:.3f}", flush=True)
        res["routed"] = out

    r = res.setdefault("rows_64k", {})

    def gather():
        T_packed, E = c["T_packed"], c["E"]
        look = cupy.random.default_rng(7).integers(0, K, L).astype(cupy.int32)
        c["look"] = look
        out32 = cupy.empty((L, dim), dtype=cupy.float32)
        out16 = cupy.empty((L, dim), dtype=cupy.float16)
        gather_bytes = L * (dim * 4 + G2 * 4 + 1 + 4)
        for sync in (1, 0):
            numba_cuda_config.CUDA_ARRAY_INTERFACE_SYNC = sync
            key = "cai_sync_on" if sync else "cai_sync_off"
            ms, wall = timed(lambda: tb.gather_rows(T_packed, E, look, dim, out=out32,
                                                    check=False), reps=20)
            r[f"gather_fp32_{key}"] = dict(ms=ms, wall_ms=wall)
        g = graph_time(lambda: tb.gather_rows(T_packed, E, look, dim, out=out32, check=False))
        r["gather_fp32_graph_ms"] = g
        r["gather_fp16_ms"], _ = timed(lambda: tb.gather_rows(
            T_packed, E, look, dim, out=out16, dtype=np.float16, check=False), reps=20)
        best = g if isinstance(g, float) else r["gather_fp32_cai_sync_off"]["ms"]
        r["gather_bytes"] = gather_bytes
        r["gather_fp32_fraction_of_copy_bw"] = gather_bytes / (best * 1e-3) / c["copy_bw"]
        ms, wall = timed(lambda: tb.gather_rows(T_packed, E, look, dim, out=out32), reps=10)
        r["gather_fp32_checked"] = dict(ms=ms, wall_ms=wall)

    def scatter():
        look = c["look"]
        numba_cuda_config.CUDA_ARRAY_INTERFACE_SYNC = 0
        grad = cupy.random.default_rng(8).standard_normal((L, dim), dtype=cupy.float32)
        t0 = time.perf_counter()
        rows_u, inverse, order, offs = tb.unique_rows(look)
        u = len(rows_u)
        r["unique_rows_first_s"] = time.perf_counter() - t0
        r["unique_rows_ms"], r["unique_rows_wall_ms"] = timed(lambda: tb.unique_rows(look), reps=10)
        r["cupy_unique_inverse_ms"], _ = timed(lambda: cupy.unique(look, return_inverse=True),
                                               reps=10)
        G_u = cupy.empty((u, dim), dtype=cupy.float32)
        scatter_bytes = L * dim * 4 + u * dim * 4 + L * 8
        r["scatter_bytes"] = scatter_bytes
        for name, seg in (("scatter_atomic", None), ("scatter_sorted", (order, offs))):
            fn = (lambda seg=seg: tb.segment_sum_rows(grad, inverse, u, segments=seg, out=G_u,
                                                      check=False))
            ms, wall = timed(fn, reps=20)
            g = graph_time(fn)
            best = g if isinstance(g, float) else ms
            r[name] = dict(ms=ms, wall_ms=wall, graph_ms=g,
                           fraction_of_copy_bw=scatter_bytes / (best * 1e-3) / c["copy_bw"])
        det = tb.segment_sum_rows(grad, inverse, u, segments=(order, offs)).get()
        atomic = tb.segment_sum_rows(grad, inverse, u).get()
        r["scatter_atomic_max_abs_diff_vs_sorted"] = float(np.abs(atomic - det).max())
        c.update(grad=grad, rows_u=rows_u, u=u)

    def sparse_update():
        T_packed, T_accum, E, E_accum = c["T_packed"], c["T_accum"], c["E"], c["E_accum"]
        rows_u, u, look, grad = c["rows_u"], c["u"], c["look"], c["grad"]
        gq = cupy.random.default_rng(9).integers(-60, 61, (u, dim)).astype(cupy.int8)
        gE = cupy.random.default_rng(10).integers(-60, 61, u).astype(cupy.int8)
        counts = cupy.zeros(2, dtype=cupy.int64)
        hyper = dict(flip_threshold=64, flip_decay_shift=0, scale_threshold=64,
                     scale_decay_shift=0)

        def update(check=False):
            tb.sparse_ternary_update(T_packed, T_accum, E, E_accum, rows_u, gq, gE,
                                     counts=counts, check=check, **hyper)

        for sync in (1, 0):
            numba_cuda_config.CUDA_ARRAY_INTERFACE_SYNC = sync
            key = "cai_sync_on" if sync else "cai_sync_off"
            ms, wall = timed(update, reps=20)
            r[f"sparse_update_{key}"] = dict(ms=ms, wall_ms=wall)
            ms, wall = timed(lambda: update(check=True), reps=20)
            r[f"sparse_update_checked_{key}"] = dict(ms=ms, wall_ms=wall)
        r["sparse_update_graph_ms"] = graph_time(update)
        r["unique_rows_touched"] = u
        grad_q = cupy.zeros((u, dim), dtype=cupy.int8)

        def step():  # the whole sparse backward + step: unique, segment sum, quantise, update
            rows_s, inv_s, order_s, offs_s = tb.unique_rows(look)
            Gs = tb.segment_sum_rows(grad, inv_s, len(rows_s), segments=(order_s, offs_s),
                                     check=False)
            inv_scales, grad_E = U.exponent_grad_and_scales(Gs, T_packed[rows_s], E[rows_s], dim,
                                                            8.0)
            U.quantize_grad(Gs, inv_scales[:1], 11, grad_q)
            U.quantize_grad(grad_E, inv_scales[1:], 12, gE)
            tb.sparse_ternary_update(T_packed, T_accum, E, E_accum, rows_s, grad_q, gE,
                                     counts=counts, check=False, **hyper)

        ms, wall = timed(step, reps=10)
        r["sparse_step_total"] = dict(ms=ms, wall_ms=wall)
        numba_cuda_config.CUDA_ARRAY_INTERFACE_SYNC = 1

    def usage_counts():
        ms, wall = timed(lambda: vq_usage.count_usage(c["idx"], c["usage"], check=False), reps=10)
        r["count_usage_4096"] = dict(ms=ms, wall_ms=wall)

    for name, fn in (("copy_bandwidth", copy_bandwidth), ("build_book", build_book),
                     ("exact_search", exact_search), ("scan_search", scan_search),
                     ("agreement", agreement), ("peer", peer), ("gather", gather),
                     ("scatter", scatter), ("sparse_update", sparse_update),
                     ("usage_counts", usage_counts), ("routed", routed)):
        sections.run(name, fn)
        numba_cuda_config.CUDA_ARRAY_INTERFACE_SYNC = 1
        cupy.get_default_memory_pool().free_all_blocks()

    print(summary(res, path))


def summary(res, path):
    def g(*keys, fmt="{:,.3f}"):
        v = res
        for k in keys:
            if not isinstance(v, dict) or k not in v:
                return "n/a"
            v = v[k]
        return fmt.format(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)

    K, n, dim = res["rows"], res["queries"], res["dim"]
    lines = [
        f"device: {res['device']}   book {K:,} x {dim}   queries {n}   ({path})",
        f"exact search, int8 tensor cores  {g('search_mma', 'ms', fmt='{:9.2f}')} ms "
        f"{g('search_mma', 'queries_per_s', fmt='{:>12,.0f}')} q/s   (target >= 100,000)",
        f"exact search, popcount scan      {g('search_scan', 'ms', fmt='{:9.2f}')} ms "
        f"{g('search_scan', 'queries_per_s', fmt='{:>12,.0f}')} q/s",
        f"peer: cuBLAS fp16 GEMM + argmax  {g('peer_fp16_gemm_argmax', 'ms', fmt='{:9.2f}')} ms "
        f"{g('peer_fp16_gemm_argmax', 'queries_per_s', fmt='{:>12,.0f}')} q/s   "
        f"(tritnet {g('speedup_vs_peer', fmt='{:.1f}')}x)",
        f"argmins identical: NumPy reference ({g('reference', 'queries')} q) "
        f"{g('reference', 'identical')}, CPU twin ({g('cpu_twin', 'queries')} q) "
        f"{g('cpu_twin', 'identical')}, scan {g('search_scan', 'identical_to_mma')}; "
        f"peer agrees with tritnet on {g('peer_fp16_gemm_argmax', 'agreement_with_tritnet')}",
    ]
    for nprobe in (1, 4, 16, 64):
        k = f"nprobe_{nprobe}"
        lines.append(f"routed nprobe={nprobe:<3d}                {g('routed', k, 'ms', fmt='{:9.2f}')} ms "
                     f"{g('routed', k, 'queries_per_s', fmt='{:>12,.0f}')} q/s   recall@1 "
                     f"{g('routed', k, 'recall_at_1', fmt='{:.3f}')}   book in partition order "
                     f"{g('routed', k, 'book_in_partition_order_queries_per_s', fmt='{:,.0f}')} q/s")
    lines += [
        f"copy bandwidth {g('copy_bandwidth_GBps', fmt='{:,.0f}')} GB/s (read + write)",
        f"gather 64K x {dim} fp32: {g('rows_64k', 'gather_fp32_cai_sync_off', 'ms')} ms, graph "
        f"{g('rows_64k', 'gather_fp32_graph_ms')} ms = "
        f"{g('rows_64k', 'gather_fp32_fraction_of_copy_bw', fmt='{:.2f}')} of copy bandwidth",
        f"scatter (segment sum) atomic {g('rows_64k', 'scatter_atomic', 'ms')} ms "
        f"({g('rows_64k', 'scatter_atomic', 'fraction_of_copy_bw', fmt='{:.2f}')} of copy bw), "
        f"sorted {g('rows_64k', 'scatter_sorted', 'ms')} ms "
        f"({g('rows_64k', 'scatter_sorted', 'fraction_of_copy_bw', fmt='{:.2f}')})",
        f"sparse update of {g('rows_64k', 'unique_rows_touched', fmt='{:,}')} rows: device "
        f"{g('rows_64k', 'sparse_update_cai_sync_off', 'ms')} ms, wall "
        f"{g('rows_64k', 'sparse_update_cai_sync_off', 'wall_ms')} ms, graph "
        f"{g('rows_64k', 'sparse_update_graph_ms')} ms   (target <= 0.45 ms); whole sparse "
        f"step {g('rows_64k', 'sparse_step_total', 'ms')} ms",
        f"memory: {g('memory', 'book_and_state_bytes', fmt='{:,}')} B for the book with state = "
        f"{g('memory', 'bytes_per_trit')} B/trit ({g('memory', 'bytes_per_trit_without_usage')}"
        f" without usage counts)",
    ]
    if res.get("errors"):
        lines.append(f"FAILED sections: {', '.join(res['errors'])}")
    return "\n".join(lines)


def _has(md, name):
    try:
        md.version(name)
        return True
    except md.PackageNotFoundError:
        return False


if __name__ == "__main__":
    main()
