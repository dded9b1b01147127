"""Packed-trit matmul against cuBLAS fp16 (cupy.matmul) in one process, same shapes.

GPU section: for M in {1, 16, 256, 4096} and (K, N) in {(4096, 4096), (8192, 8192),
(8192, 28672)}, forward y = x·Wᵀ (ternary_matmul) and backward gx = gy·W (ternary_matmul_t),
fp16 activations, against cupy.matmul on an fp16 W of the same shape. Reports per shape:
kernel time (median of CUDA-event intervals between back-to-back calls queued behind a busy
GPU, so host launch cost does not leak in), the ratio to cuBLAS, packed-weight bytes / time
as a fraction of the measured device copy bandwidth, and host time per call (enqueue only,
many calls while the GPU is busy). Inputs and weights rotate over copies that together
exceed L2, so no call is flattered by a cache left warm by the previous one.

CPU section: M = 1, K = N = 4096, the CPU twin against NumPy float32 x @ W.T.

Writes benchmarks/results/matmul-<device>.json (or --out DIR) and prints a table last.
Run from the repository root: PYTHONPATH=. python3 benchmarks/bench_matmul.py [--cpu-only]
"""

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import numba
import numpy as np

from tritnet_kernels import _launch
from tritnet_kernels import matmul as MM
from tritnet_kernels import packing as P

M_VALUES = (1, 16, 256, 4096)
SHAPES = ((4096, 4096), (8192, 8192), (8192, 28672))  # (K = in, N = out)
L2_BYTES = 50 << 20


def git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], capture_output=True,
                             text=True, cwd=Path(__file__).resolve().parent, timeout=10)
        sha = out.stdout.strip()
        # a repository without commits prints nothing useful (or the word HEAD)
        return sha if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", sha) else "unknown"
    except Exception:
        return "unknown"


def versions():
    v = {"python": platform.python_version(), "numpy": np.__version__, "numba": numba.__version__}
    try:
        from importlib.metadata import version
        v["numba-cuda"] = version("numba-cuda")
    except Exception:
        v["numba-cuda"] = "unknown"
    try:
        import cupy
        v["cupy"] = cupy.__version__
    except Exception:
        v["cupy"] = None
    return v


def median_ms(fn, repeat):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


# --------------------------------------------------------------------------------------------


def bench_cpu(repeat=30):
    rng = np.random.default_rng(0)
    K = N = 4096
    trits = rng.integers(-1, 2, (N, K)).astype(np.int8)
    T_packed, E = P.pack_trits(trits), rng.integers(-8, 8, N).astype(np.int8)
    W = MM.scale_reference(E)[:, None] * trits.astype(np.float32)
    x = rng.standard_normal((1, K)).astype(np.float32)
    gy = rng.standard_normal((1, N)).astype(np.float32)
    MM.ternary_matmul(x, T_packed, E, K)
    MM.ternary_matmul_t(gy, T_packed, E, K)  # compile
    res = {
        "threads": numba.get_num_threads(),
        "shape": {"M": 1, "K": K, "N": N},
        "twin_forward_ms": median_ms(lambda: MM.ternary_matmul(x, T_packed, E, K), repeat),
        "numpy_forward_ms": median_ms(lambda: x @ W.T, repeat),
        "twin_backward_ms": median_ms(lambda: MM.ternary_matmul_t(gy, T_packed, E, K), repeat),
        "numpy_backward_ms": median_ms(lambda: gy @ W, repeat),
    }
    res["forward_speedup"] = res["numpy_forward_ms"] / res["twin_forward_ms"]
    res["backward_speedup"] = res["numpy_backward_ms"] / res["twin_backward_ms"]
    return res


# --------------------------------------------------------------------------------------------


def bench_gpu(args):
    import cupy

    dev = cupy.cuda.Device()
    props = cupy.cuda.runtime.getDeviceProperties(dev.id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    out = {"device": name, "compute_capability": dev.compute_capability,
           "sm_count": dev.attributes["MultiProcessorCount"]}

    def events_ms(fn, n):
        """Median ms of fn between events, the calls queued behind ~20 ms of GPU work."""
        busy(20)
        ev = [cupy.cuda.Event() for _ in range(n + 1)]
        ev[0].record()
        for i in range(n):
            fn(i)
            ev[i + 1].record()
        ev[-1].synchronize()
        return float(np.median([cupy.cuda.get_elapsed_time(ev[i], ev[i + 1]) for i in range(n)]))

    spin_a = cupy.ones((4096, 4096), cupy.float16)
    spin_t = {}

    def busy(ms):
        if "per" not in spin_t:
            cupy.matmul(spin_a, spin_a)
            e0, e1 = cupy.cuda.Event(), cupy.cuda.Event()
            e0.record()
            for _ in range(10):
                cupy.matmul(spin_a, spin_a)
            e1.record()
            e1.synchronize()
            spin_t["per"] = cupy.cuda.get_elapsed_time(e0, e1) / 10
        for _ in range(int(ms / spin_t["per"]) + 1):
            cupy.matmul(spin_a, spin_a)

    # Copy bandwidth: a 2 GiB device-to-device copy, bytes read + written.
    src = cupy.ones(1 << 29, cupy.float32)
    dst = cupy.empty_like(src)
    dst[...] = src
    copy_ms = events_ms(lambda i: dst.__setitem__(Ellipsis, src), 10)
    copy_bw = 2 * src.nbytes / (copy_ms * 1e-3)
    out["copy_bandwidth_GBps"] = copy_bw / 1e9
    del src, dst

    rng = np.random.default_rng(0)
    rows = []
    for K, N in SHAPES:
        trits = cupy.asarray(rng.integers(-1, 2, (N, K)).astype(np.int8))
        T0 = P.pack_trits(trits)
        E = cupy.asarray(rng.integers(-8, 8, N).astype(np.int8))
        W0 = cupy.asarray(MM.scale_reference(E.get()))[:, None].astype(cupy.float16) * \
            trits.astype(cupy.float16)
        del trits
        nT = max(2, -(-2 * L2_BYTES // T0.nbytes))   # copies that together exceed L2
        Ts = [T0] + [T0.copy() for _ in range(nT - 1)]
        nW = max(2, -(-2 * L2_BYTES // W0.nbytes))
        Ws = [W0] + [W0.copy() for _ in range(nW - 1)]
        packed_bytes = T0.nbytes
        for M in M_VALUES:
            nx = 4
            xs = [cupy.asarray(rng.standard_normal((M, K)), cupy.float16) for _ in range(nx)]
            gys = [cupy.asarray(rng.standard_normal((M, N)), cupy.float16) for _ in range(nx)]
            ys = [cupy.empty((M, N), cupy.float16) for _ in range(nx)]
            gxs = [cupy.empty((M, K), cupy.float16) for _ in range(nx)]
            reps = 40 if M <= 256 else 12
            if K * N * M > 4096 * 8192 * 8192:
                reps = 8
            # correctness spot check against cuBLAS on the same weights
            y = MM.ternary_matmul(xs[0], Ts[0], E, K)
            yc = cupy.matmul(xs[0], Ws[0].T)
            err = float(cupy.abs(y.astype(cupy.float32) - yc).max() /
                        cupy.abs(yc.astype(cupy.float32)).max())
            for direction in ("forward", "backward"):
                if direction == "forward":
                    ours = lambda i: MM.ternary_matmul(xs[i % nx], Ts[i % nT], E, K, out=ys[i % nx])
                    peer = lambda i: cupy.matmul(xs[i % nx], Ws[i % nW].T, out=ys[i % nx])
                else:
                    ours = lambda i: MM.ternary_matmul_t(gys[i % nx], Ts[i % nT], E, K,
                                                         out=gxs[i % nx])
                    peer = lambda i: cupy.matmul(gys[i % nx], Ws[i % nW], out=gxs[i % nx])
                ours(0), peer(0)
                t_ours = events_ms(ours, reps)
                t_peer = events_ms(peer, reps)
                # host time per call (20 calls queued back to back; the queue stays short)
                cupy.cuda.get_current_stream().synchronize()
                n_host = 20
                t0 = time.perf_counter()
                for i in range(n_host):
                    ours(i)
                host_us = 1e6 * (time.perf_counter() - t0) / n_host
                cupy.cuda.get_current_stream().synchronize()
                rows.append({
                    "direction": direction, "M": M, "K": K, "N": N,
                    "path": "tensor-core GEMV" if M <= MM.MMA_MAX_M else "widen+cuBLAS",
                    "tritnet_us": 1e3 * t_ours, "cublas_fp16_us": 1e3 * t_peer,
                    "speedup_vs_cublas": t_peer / t_ours,
                    "host_us_per_call": host_us,
                    "packed_weight_bytes": packed_bytes,
                    "weight_bw_fraction_of_copy": packed_bytes / (t_ours * 1e-3) / copy_bw,
                    "max_rel_err_vs_cublas_fwd": err,
                })
                print(f"  {direction:8s} M={M:5d} K={K:5d} N={N:5d}: tritnet "
                      f"{1e3 * t_ours:9.1f} us  cuBLAS {1e3 * t_peer:9.1f} us  "
                      f"x{t_peer / t_ours:6.2f}  host {host_us:6.1f} us", flush=True)
            del xs, gys, ys, gxs
        del Ts, Ws, T0, W0
        cupy.get_default_memory_pool().free_all_blocks()
    out["rows"] = rows

    # Host cost of one launch, by path. The kernel must finish faster than the host can
    # launch it, or the launch queue fills and the loop measures the kernel instead (an
    # earlier version of this script did that with a 1024x1024 GEMV: ~20 us per launch was
    # the kernel's own time). Hence the smallest problem: one 16-row tile, one k-block.
    K = N = 32
    T = P.pack_trits(cupy.asarray(rng.integers(-1, 2, (N, K)).astype(np.int8)))
    E = cupy.asarray(rng.integers(-8, 8, N).astype(np.int8))
    x = cupy.asarray(rng.standard_normal((1, K)), cupy.float16)
    y = cupy.empty((1, N), cupy.float16)
    MM.ternary_matmul(x, T, E, K, out=y)
    info = MM._gpu_info()
    kernel = MM._mma_kernel("fwd", True, 1)
    kargs = (x, T.view(cupy.uint64), E, y, info[3], info[2], 1)
    grid, block = (1, 1), 32 * MM._FWD_WARPS
    stream = numba.cuda.external_stream(cupy.cuda.get_current_stream().ptr)
    e0, e1 = cupy.cuda.Event(), cupy.cuda.Event()
    e0.record()
    _launch.launch(kernel, grid, block, *kargs)
    e1.record()
    e1.synchronize()
    out["host_launch_probe_kernel_us"] = 1e3 * cupy.cuda.get_elapsed_time(e0, e1)

    def host_us(fn, n=2000):
        fn()
        cupy.cuda.get_current_stream().synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        dt = 1e6 * (time.perf_counter() - t0) / n
        cupy.cuda.get_current_stream().synchronize()
        return dt

    def numba_dispatch():
        numba.config.CUDA_ARRAY_INTERFACE_SYNC = 0
        kernel[grid, block, stream](*kargs)
        numba.config.CUDA_ARRAY_INTERFACE_SYNC = 1

    out["host_launch_us"] = {  # per launch, 2000 launches back to back
        "fast_launch": host_us(lambda: _launch.launch(kernel, grid, block, *kargs)),
        "numba_dispatch": host_us(numba_dispatch, 300),
        "ternary_matmul_call_M1": host_us(lambda: MM.ternary_matmul(x, T, E, K, out=y)),
        "ternary_matmul_call_M1_alloc_out": host_us(lambda: MM.ternary_matmul(x, T, E, K)),
    }
    K = N = 8192
    T = P.pack_trits(cupy.asarray(rng.integers(-1, 2, (N, K)).astype(np.int8)))
    E = cupy.asarray(rng.integers(-8, 8, N).astype(np.int8))
    # float32 activations at small M (tensor cores with bf16 hi+mid+lo), for reference
    f32 = []
    for M in (1, 16):
        xs = [cupy.asarray(rng.standard_normal((M, K)), cupy.float32) for _ in range(4)]
        ys = [cupy.empty((M, N), cupy.float32) for _ in range(4)]
        Ts = [T] + [T.copy() for _ in range(5)]
        f = lambda i: MM.ternary_matmul(xs[i % 4], Ts[i % 6], E, K, out=ys[i % 4])
        f(0)
        f32.append({"M": M, "K": K, "N": N, "tritnet_fp32_forward_us": 1e3 * events_ms(f, 40)})
    out["fp32_small_M"] = f32
    out["launch_paths"] = _launch.fast_launch_status()
    return out


# --------------------------------------------------------------------------------------------


def table(res):
    lines = []
    if "rows" in res:
        lines.append(f"device: {res['device']}  copy bandwidth "
                     f"{res['copy_bandwidth_GBps']:.0f} GB/s")
        lines.append(f"{'dir':8s} {'M':>5s} {'K':>5s} {'N':>6s} {'tritnet us':>11s} "
                     f"{'cuBLAS us':>10s} {'speedup':>8s} {'BW frac':>8s} {'host us':>8s}")
        for r in res["rows"]:
            lines.append(f"{r['direction']:8s} {r['M']:5d} {r['K']:5d} {r['N']:6d} "
                         f"{r['tritnet_us']:11.1f} {r['cublas_fp16_us']:10.1f} "
                         f"{r['speedup_vs_cublas']:8.2f} {r['weight_bw_fraction_of_copy']:8.2f} "
                         f"{r['host_us_per_call']:8.1f}")
        h = res["host_launch_us"]
        lines.append("host us per launch: fast path %.1f, Numba dispatch %.1f, ternary_matmul "
                     "call %.1f (%.1f allocating out)" % (
                         h["fast_launch"], h["numba_dispatch"], h["ternary_matmul_call_M1"],
                         h["ternary_matmul_call_M1_alloc_out"]))
    c = res["cpu"]
    lines.append(f"CPU ({c['threads']} threads) M=1 K=N=4096: twin fwd "
                 f"{c['twin_forward_ms']:.2f} ms vs NumPy {c['numpy_forward_ms']:.2f} ms (x{c['forward_speedup']:.1f}); bwd "
                 f"{c['twin_backward_ms']:.2f} vs {c['numpy_backward_ms']:.2f} ms "
                 f"(x{c['backward_speedup']:.1f})")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--cpu-only", action="store_true")
    args = ap.parse_args()
    res = {"benchmark": "matmul", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
           "commit": git_commit(), "versions": versions(), "host": platform.node(),
           "cpu_count": os.cpu_count()}
    if not args.cpu_only:
        res.update(bench_gpu(args))
    res["cpu"] = bench_cpu()
    device = res.get("device", "cpu-%dcore" % (os.cpu_count() or 0))
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device).strip("-").lower()
    path = Path(args.out) / f"matmul-{slug}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {path}")
    print(table(res))


if __name__ == "__main__":
    sys.exit(main())
