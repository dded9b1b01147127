"""Where a training step's GPU time and kernel launches go: every kernel, from every library.

    python benchmarks/profile_step.py --preset small --batch-size 32 --seq-len 256
    python benchmarks/profile_step.py --preset default            # batch 4 x 512

bench_step.py counts the Numba launches that go through tritnet_kernels._launch and times
components with synchronisations; it cannot see CuPy's element-wise kernels, CUB's sorts or
cuBLAS's GEMMs, nor how long the GPU itself was busy. This script asks CUPTI, which sees
every kernel in the process. CUPTI is reached through PyTorch's profiler (torch.profiler),
so it needs PyTorch beside tritnet (install it where you profile); tritnet itself does not
depend on it. It reports, per training step:

- GPU busy time: the union of all kernel and copy intervals. With host overhead removed
  (a captured CUDA graph), a step could not be faster than this: tokens / busy is the
  ceiling of tokens/s on this GPU for the current kernels;
- kernels and GPU time by family (tritnet's Numba kernels, CuPy/CUB, cuBLAS, copies and
  fills) and the top kernels;
- launch API calls (kernels, copies, fills, stream synchronisations) attributed to the
  innermost autograd Function (forward or backward), Module call or optimiser step that
  issued them: where the host's launches come from. For this, the profiled steps run with
  Function.apply, every Function's backward and Module.__call__ wrapped in profiler ranges
  (this script's patch, removed nowhere: the process ends).

Wall time per step (the median of --steps) is measured before profiling, without the ranges. Writes
benchmarks/results/profile-<preset>-<batch>-<gpu>.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import Counter, defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

RANGES = ("F:", "M:", "O:")   # this script's profiler ranges: Function, Module, optimiser
LAUNCH_CALLS = ("cuLaunchKernel", "cudaLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC",
                "cudaMemsetAsync", "cudaMemcpyAsync", "cudaStreamSynchronize",
                "cuStreamSynchronize")


def family(kernel_name: str) -> str:
    low = kernel_name.lower()
    if "memcpy" in low or "memset" in low:
        return "copies and fills"
    if "tritnet_kernels" in kernel_name:
        return "tritnet (Numba)"
    if any(k in low for k in ("gemm", "cutlass", "xmma", "cublas")):
        return "cuBLAS"
    if "cupy" in low or "cub::" in low or "thrust" in low:
        return "CuPy / CUB"
    return "other"


def busy_us(intervals) -> float:
    total, end = 0.0, None
    for s, e in sorted(intervals):
        if end is None or s > end:
            total, start, end = total + ((end - start) if end is not None else 0.0), s, e
        else:
            end = max(end, e)
    return total + ((end - start) if end is not None else 0.0)


def wrap_in_ranges(record_function):
    """Profiler ranges around every autograd op (forward and backward) and Module call."""
    from tritnet.autograd import Function
    from tritnet.nn.module import Module

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    apply = Function.apply.__func__

    def ranged_apply(cls, *args, **kwargs):
        with record_function(f"F:{cls.__name__}.fwd"):
            return apply(cls, *args, **kwargs)
    Function.apply = classmethod(ranged_apply)
    for sub in set(subclasses(Function)):
        if "backward" in sub.__dict__:
            def ranged_backward(self, *grads, _backward=sub.__dict__["backward"],
                                _name=f"F:{sub.__name__}.bwd"):
                with record_function(_name):
                    return _backward(self, *grads)
            sub.backward = ranged_backward
    call = Module.__call__

    def ranged_call(self, *args, **kwargs):
        with record_function(f"M:{type(self).__name__}"):
            return call(self, *args, **kwargs)
    Module.__call__ = ranged_call


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--steps", type=int, default=5, help="timed, then profiled steps")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()

    try:
        import torch
        from torch.profiler import ProfilerActivity, profile, record_function
    except ImportError:
        sys.exit("profile_step.py needs PyTorch for its profiler (CUPTI); tritnet does not. "
                 "Run it where PyTorch is installed")
    torch.cuda.init()
    import cupy
    from tritnet import backend, data as tdata
    from tritnet import rng as trandom
    from tritnet.config import preset
    from tritnet.train import build, frozen_heap

    backend.set_device("cuda")
    config = preset(args.preset).override(batch_size=args.batch_size, seq_len=args.seq_len)
    trandom.manual_seed(config.seed)
    batches = tdata.Batches(tdata.load_corpus(None), config.batch_size, config.seq_len, seed=1)
    model, optimizer = build(config)
    tokens = config.batch_size * config.seq_len
    sync = cupy.cuda.get_current_stream().synchronize

    def step():
        x, y = batches.get("train")
        with record_function("M:loss (forward)"):
            loss, _ = model.loss(x, y)
        with record_function("M:backward (the tape walk)"):
            loss.backward()
        with record_function("O:optimizer step"):
            optimizer.step()
        return float(loss.item())

    with frozen_heap():   # as tritnet/train.py's loop runs
        for _ in range(args.warmup):
            step()
        walls = []
        for _ in range(args.steps):
            start = time.perf_counter()
            step()   # ends in the loss's host copy: the step is done
            walls.append(time.perf_counter() - start)
        # the median: a step that meets a new expert size compiles a kernel variant once
        wall = statistics.median(walls)

        wrap_in_ranges(record_function)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                step()
            sync()

    n = args.steps
    families, kernels = defaultdict(lambda: [0, 0.0]), defaultdict(lambda: [0, 0.0])
    intervals, api, by_op, syncs_by_op = [], Counter(), Counter(), Counter()
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and not e.name.startswith(RANGES):
            # (the ranges themselves also appear on the GPU timeline, as annotations)
            us = e.time_range.elapsed_us()
            intervals.append((e.time_range.start, e.time_range.end))
            for table, key in ((families, family(e.name)), (kernels, e.name)):
                table[key][0] += 1
                table[key][1] += us
        elif e.name in LAUNCH_CALLS:
            api[e.name] += 1
            parent = e.cpu_parent
            while parent is not None and not parent.name.startswith(RANGES):
                parent = parent.cpu_parent
            by_op[parent.name if parent else "(outside)"] += 1
            if e.name == "cudaStreamSynchronize":  # the host waits for the GPU to drain
                syncs_by_op[parent.name if parent else "(outside)"] += 1
    busy = busy_us(intervals) / n / 1e6
    name = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    result = {
        "device": name, "date": time.strftime("%Y-%m-%d"), "preset": args.preset,
        "batch": [config.batch_size, config.seq_len], "recompute": config.recompute,
        "matmul_precision": config.matmul_precision, "profiled_steps": n,
        "wall_s_per_step": wall, "tokens_per_s": tokens / wall,
        "gpu_busy_s_per_step": busy, "ceiling_tokens_per_s": tokens / busy,
        "families": {k: {"kernels_per_step": c / n, "gpu_s_per_step": us / n / 1e6}
                     for k, (c, us) in sorted(families.items(), key=lambda kv: -kv[1][1])},
        "top_kernels": [{"kernel": k[:160], "calls_per_step": c / n,
                         "gpu_s_per_step": us / n / 1e6}
                        for k, (c, us) in sorted(kernels.items(),
                                                 key=lambda kv: -kv[1][1])[:args.top]],
        "api_calls_per_step": {k: v / n for k, v in api.most_common()},
        "launch_calls_by_op_per_step": {k: v / n for k, v in by_op.most_common()},
        "syncs_by_op_per_step": {k: v / n for k, v in syncs_by_op.most_common()},
        "method": __doc__.strip(),
    }
    path = os.path.join(os.environ.get("OUT") or os.path.join(ROOT, "benchmarks", "results"),
                        f"profile-{args.preset}-{config.batch_size}x{config.seq_len}-"
                        f"{name.lower().replace(' ', '-')}.json")
    with open(path, "w") as fh:
        json.dump(result, fh, indent=2)
    print(f"{args.preset} {config.batch_size}x{config.seq_len} on {name}: "
          f"{wall * 1e3:.1f} ms/step ({tokens / wall:,.0f} tok/s); GPU busy {busy * 1e3:.1f} "
          f"ms/step (ceiling {tokens / busy:,.0f} tok/s)")
    for k, v in result["families"].items():
        print(f"  {k:<18} {v['kernels_per_step']:7.0f} kernels {v['gpu_s_per_step'] * 1e3:8.2f} ms")
    print(f"  launch API calls per step: {sum(api.values()) / n:,.0f} "
          f"({', '.join(f'{k} {v / n:.0f}' for k, v in api.most_common())})")
    for k, v in by_op.most_common(12):
        print(f"    {v / n:7.0f}  {k}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
