"""Sweep the launch shape of the tensor-core GEMV kernels (warps per block, K/row splits) on
a GPU, to choose matmul._FWD_WARPS/_BWD_WARPS and check the split heuristic.

    PYTHONPATH=. python3 benchmarks/tune_matmul.py            # sweep, prints a table
    PYTHONPATH=. python3 benchmarks/tune_matmul.py --profile  # a few launches, for ncu
"""

import argparse
import json

import cupy
import numpy as np

from tritnet_kernels import matmul as MM
from tritnet_kernels import packing as P


def setup(M, K, N, dtype, copies):
    rng = np.random.default_rng(0)
    T = P.pack_trits(cupy.asarray(rng.integers(-1, 2, (N, K)).astype(np.int8)))
    Ts = [T] + [T.copy() for _ in range(copies - 1)]
    E = cupy.asarray(rng.integers(-8, 8, N).astype(np.int8))
    x = cupy.asarray(rng.standard_normal((M, K)), dtype)
    gy = cupy.asarray(rng.standard_normal((M, N)), dtype)
    return Ts, E, x, gy


def timed(fn, n=30):
    a = cupy.ones((4096, 4096), cupy.float16)
    for _ in range(60):  # ~10 ms of queued work: the timed launches queue up behind it
        cupy.matmul(a, a)
    ev = [cupy.cuda.Event() for _ in range(n + 1)]
    ev[0].record()
    for i in range(n):
        fn(i)
        ev[i + 1].record()
    ev[-1].synchronize()
    return 1e3 * float(np.median([cupy.cuda.get_elapsed_time(ev[i], ev[i + 1]) for i in range(n)]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    K = N = 8192
    if args.profile:
        Ts, E, x, gy = setup(1, K, N, cupy.float16, 1)
        for _ in range(2):
            MM.ternary_matmul(x, Ts[0], E, K)
            MM.ternary_matmul_t(gy, Ts[0], E, K)
        cupy.cuda.get_current_stream().synchronize()
        return
    rows = []
    for M in (1, 16):
        Ts, E, x, gy = setup(M, K, N, cupy.float16, 6)
        y = cupy.empty((M, N), cupy.float16)
        gx = cupy.empty((M, K), cupy.float16)
        for warps in (4, 8, 16):
            for nsplit in (1, 2, 4, 8, 16, 32):
                f = lambda i: MM._forward_mma(x, Ts[i % 6], E, y, cupy, warps, nsplit)
                b = lambda i: MM._backward_mma(gy, Ts[i % 6], E, gx, cupy, warps, nsplit)
                f(0), b(0)
                rows.append({"M": M, "warps": warps, "nsplit": nsplit,
                             "fwd_us": timed(f), "bwd_us": timed(b)})
                print(json.dumps(rows[-1]), flush=True)
        ref = MM.ternary_matmul_reference(x.get().astype(np.float32), Ts[0].get(), E.get(), K)
        MM._forward_mma(x, Ts[0], E, y, cupy, 8, 4)
        print("check fwd", float(np.abs(y.get() - ref).max() / np.abs(ref).max()))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(rows, fh, indent=1)
    best = {}
    for r in rows:
        for d in ("fwd_us", "bwd_us"):
            k = (r["M"], d)
            if k not in best or r[d] < best[k][0]:
                best[k] = (r[d], r["warps"], r["nsplit"])
    for k, v in sorted(best.items()):
        print(f"best M={k[0]} {k[1]}: {v[0]:.1f} us with warps={v[1]} nsplit={v[2]}")


if __name__ == "__main__":
    main()
