"""One whole training step on the GPU: tokens/s, peak device memory, launches, time by component.

    python benchmarks/bench_step.py --preset small --batch-size 32 --seq-len 256   # 1 GB budget
    python benchmarks/bench_step.py --preset default          # batch 4 x 512, ≈3.0B trits

Two phases on the same model:
1. `--steps` plain training steps (forward, backward, the loss read, integer update; the loop
   of tritnet/train.py without its logging) after `--warmup` steps: median tokens/s and host
   time per step (issuing the work, not waiting for the loss), Numba kernel launches per step
   (CuPy's own element-wise kernels are not counted), and the peak of device memory the CuPy
   pools needed, from the model's construction on (at every allocation: the allocating pool's
   blocks in use and all the blocks of the other pool). With CUDA graphs (the default, as in
   `tritnet train`; --no-cuda-graph for eager steps) the timed steps are replays: host time
   and launches are then those of two graph launches (a launch of a long graph returns only
   when the GPU's launch queue has room: host time then includes waiting on the GPU), and
   the graphs' own memory pool counts whole in the peak.
2. `--profile-steps` steps with a stream synchronisation at every component boundary, to split
   a step's wall time by component: forward of embedding, attention, MoEGraph (its code-memory
   reads of the shared VQ counted under shared_vq), motif, shared_vq, kgvq, head; then
   backward as a whole, and the optimiser's update. The synchronisations slow the step; the
   shares, not the sum, are the point. These steps run eagerly, after the graphs' pool is
   given back (CapturedStep.release); their peak is reported apart (profile_steps_peak_bytes).

Peer numbers (BitNet-b1.58-style PyTorch, fp32 latents + AdamW, on an H100): 3.2B
parameters at 4 x 512: 62.5 GiB, 7,900 tokens/s; 27.7M at 32 x 256: 2.3 GiB, 180,000 tokens/s.
Writes benchmarks/results/step-<preset>-<batch>[-recompute[-keepN]][-fp32][-graph][-capC]-<gpu>.json
and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PEER = {"default": {"tokens_per_s": 7900, "peak_gib": 62.5},
        "small": {"tokens_per_s": 180_000, "peak_gib": 2.3}}


def track_peak_memory():
    """Route CuPy allocations through the default pool, and those of a CUDA graph's pool once
    `watch_graph_pool` wraps it, recording the most device memory the step needs at any
    allocation: the allocating pool's blocks in use, plus every block the other pool holds
    (a pool gives back its own idle blocks when the device runs out, never the other's).
    In peak["bytes"] while peak["phase"] is "steps", in peak["profile_bytes"] after."""
    import cupy
    default = cupy.get_default_memory_pool()
    peak = {"bytes": 0, "profile_bytes": 0, "phase": "steps", "graph_pool": None}

    def record(used, other_total):
        key = "bytes" if peak["phase"] == "steps" else "profile_bytes"
        peak[key] = max(peak[key], used + other_total)

    def malloc(size):
        mem = default.malloc(size)
        graph = peak["graph_pool"]
        record(default.used_bytes(), graph.total_bytes() if graph is not None else 0)
        return mem

    cupy.cuda.set_allocator(malloc)
    peak["record"] = record
    return peak


class WatchedPool:
    """A CapturedStep's memory pool, its allocations recorded by track_peak_memory."""

    def __init__(self, pool, peak):
        import cupy
        self.pool, self.peak, self.default = pool, peak, cupy.get_default_memory_pool()
        peak["graph_pool"] = pool

    def malloc(self, size):
        mem = self.pool.malloc(size)
        self.peak["record"](self.pool.used_bytes(), self.default.total_bytes())
        return mem

    def __getattr__(self, name):   # total_bytes, free_all_blocks, ...
        return getattr(self.pool, name)


def count_launches():
    """Count calls of tritnet_kernels._launch.launch (each kernel module imported it by name)."""
    import importlib
    from tritnet_kernels import _launch
    counter = {"n": 0}
    original = _launch.launch

    def counted(*args, **kwargs):
        counter["n"] += 1
        return original(*args, **kwargs)

    for name in ("attention", "code_graph", "matmul", "packing", "sparse_rows", "update",
                 "vq_route", "vq_search", "vq_usage"):
        importlib.import_module(f"tritnet_kernels.{name}").launch = counted
    return counter


def time_components(model, sync, times):
    """Patch component forwards to add their exclusive wall time (synchronised) to `times`."""
    stack = []

    def wrap(name, module):
        forward = module.forward

        def timed(*args, **kwargs):
            sync()
            start = time.perf_counter()
            stack.append(0.0)
            try:
                return forward(*args, **kwargs)
            finally:
                sync()
                spent = time.perf_counter() - start
                inner = stack.pop()
                times[name] += spent - inner
                if stack:
                    stack[-1] += spent

        module.forward = timed

    wrap("embedding", model.embed)
    for block in model.blocks:
        wrap("attention", block.attn)
        wrap("moe_graph", block.moe)
    wrap("motif", model.motif)
    wrap("shared_vq", model.shared_vq)
    wrap("kgvq", model.kgvq)
    wrap("head", model.head)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--profile-steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--recompute", action=argparse.BooleanOptionalAction, default=None,
                        help="recompute each block in backward (default: the preset's)")
    parser.add_argument("--recompute-keep", type=int,
                        help="with recompute, the last N blocks keep their activations "
                        "(default: the preset's)")
    parser.add_argument("--matmul-precision", choices=("fp32", "tf32"),
                        help="float32 products on the GPU (default: the preset's, tf32)")
    parser.add_argument("--expert-capacity", type=float,
                        help="MoE expert capacity in fair shares (default: the preset's, 0: "
                        "every entry runs)")
    parser.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                        help="replay the timed steps from CUDA graphs, as `tritnet train` does "
                        "(default: the config's, on); phase 2 always runs eagerly")
    args = parser.parse_args()

    import cupy
    peak = track_peak_memory()
    launches = count_launches()
    from tritnet import backend, data as tdata
    from tritnet import rng as trandom
    from tritnet.config import preset
    from tritnet.nn.ternary import TernaryModule
    from tritnet.capture import CapturedStep
    from tritnet.train import build, frozen_heap

    backend.set_device("cuda")
    config = preset(args.preset).override(batch_size=args.batch_size, seq_len=args.seq_len,
                                          recompute=args.recompute,
                                          recompute_keep=args.recompute_keep,
                                          matmul_precision=args.matmul_precision,
                                          cuda_graph=args.cuda_graph,
                                          expert_capacity=args.expert_capacity)
    trandom.manual_seed(config.seed)
    corpus = tdata.load_corpus(None)
    batches = tdata.Batches(corpus, config.batch_size, config.seq_len, seed=1)
    t0 = time.perf_counter()
    model, optimizer = build(config)
    cupy.cuda.get_current_stream().synchronize()
    build_s = time.perf_counter() - t0
    trits = sum(m.logical_trits() for m in model.modules() if isinstance(m, TernaryModule))
    state = sum(b.nbytes for _, b in model.named_buffers())
    tokens = config.batch_size * config.seq_len

    # as tritnet/train.py's loop runs: a step's loss is read (its one host sync) between the
    # backward and the update
    captured = CapturedStep(model, optimizer) if config.cuda_graph else None
    if captured is not None:
        captured.pool = WatchedPool(captured.pool, peak)
    if captured is not None and args.warmup <= captured.warmup:
        parser.error(f"--warmup {args.warmup}: with CUDA graphs, more than {captured.warmup} "
                     "(the eager steps before the capture)")

    def step():
        """One step; returns the host's seconds issuing it (not waiting for the loss)."""
        start = time.perf_counter()
        x, y = batches.get("train")
        if captured is not None:
            loss, _ = captured.forward_backward(x, y)
        else:
            loss, _ = model.loss(x, y)
            loss.backward()
            loss = loss.data
        issued = time.perf_counter() - start
        float(loss)
        start = time.perf_counter()
        if captured is not None:
            captured.update()
        else:
            optimizer.step()
        return issued + time.perf_counter() - start

    with frozen_heap():
        rates, host, per_step_launches = [], [], []
        for i in range(args.warmup + args.steps):
            before = launches["n"]
            start = time.perf_counter()
            issued = step()
            cupy.cuda.get_current_stream().synchronize()
            wall = time.perf_counter() - start
            if i >= args.warmup:
                rates.append(tokens / wall)
                host.append(issued)
                per_step_launches.append(launches["n"] - before)

        # replays: what the process holds, the default pool's blocks (state; its cached eager
        # blocks were given back at the capture) and the graphs' pool, whole
        graph_pool = captured.pool.total_bytes() if captured is not None else 0
        if captured is not None:
            peak["bytes"] = max(peak["bytes"], cupy.get_default_memory_pool().total_bytes() +
                                graph_pool)

        # The profile steps below run eagerly, with a sync after each component: a diagnostic,
        # not a training step; their peak is reported apart. As an eager training step would,
        # they run after the graphs' pool is given back.
        if captured is not None:
            captured.release()
        peak["phase"] = "profile"
        sync = cupy.cuda.get_current_stream().synchronize
        times = defaultdict(float)
        time_components(model, sync, times)
        components = ("embedding", "attention", "moe_graph", "motif", "shared_vq", "kgvq", "head")
        for _ in range(args.profile_steps):
            sync()
            inside_before = sum(times[c] for c in components)
            start = time.perf_counter()
            x, y = batches.get("train")
            loss, _ = model.loss(x, y)
            sync()
            forward_total = time.perf_counter() - start
            # the loss, norms and residual adds between the components
            times["forward (rest)"] += forward_total - (sum(times[c] for c in components) -
                                                        inside_before)
            mark = time.perf_counter()
            loss.backward()
            sync()
            times["backward"] += time.perf_counter() - mark
            mark = time.perf_counter()
            optimizer.step()
            sync()
            times["update"] += time.perf_counter() - mark
    component_s = {k: v / args.profile_steps for k, v in times.items()}
    total = sum(component_s.values())
    name = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    result = {
        "device": name, "date": time.strftime("%Y-%m-%d"), "preset": args.preset,
        "batch": [config.batch_size, config.seq_len], "recompute": config.recompute,
        "recompute_keep": config.recompute_keep,
        "matmul_precision": config.matmul_precision,
        "logical_trits": trits,
        "state_bytes": state, "state_bytes_per_trit": state / trits, "build_s": build_s,
        "tokens_per_s": statistics.median(rates), "host_s_per_step": statistics.median(host),
        "launches_per_step": statistics.median(per_step_launches),
        "cuda_graph": captured is not None,
        "step_modes": captured.counts if captured is not None else None,
        "graph_pool_bytes": graph_pool,
        "peak_device_bytes": peak["bytes"],
        "peak_device_gib": peak["bytes"] / 2**30,
        "profile_steps_peak_bytes": peak["profile_bytes"],
        "peer": PEER.get(args.preset), "component_s_per_step": component_s,
        "method": __doc__.strip(),
    }
    tag = f"{args.preset}-{config.batch_size}x{config.seq_len}" + \
        ("-recompute" if config.recompute else "") + \
        (f"-keep{config.recompute_keep}" if config.recompute and config.recompute_keep else "") + \
        ("-fp32" if config.matmul_precision == "fp32" else "") + \
        ("-graph" if captured is not None else "") + \
        (f"-cap{config.expert_capacity:g}" if config.expert_capacity else "")
    path = os.path.join(os.environ.get("OUT") or os.path.join(ROOT, "benchmarks", "results"),
                        f"step-{tag}-{name.lower().replace(' ', '-')}.json")
    with open(path, "w") as fh:
        json.dump(result, fh, indent=2)
    print(f"{tag}: {trits:,} trits, state {state / trits:.3f} B/trit, "
          f"{result['tokens_per_s']:,.0f} tok/s, peak {result['peak_device_gib']:.2f} GiB, "
          f"{result['launches_per_step']:.0f} Numba launches/step, host "
          f"{result['host_s_per_step'] * 1e3:.0f} ms/step, build {build_s:.1f} s" +
          (f", steps {captured.counts}" if captured is not None else ""))
    if args.preset in PEER:
        peer = PEER[args.preset]
        print(f"  peer (fp32-latent AdamW): {peer['tokens_per_s']:,} tok/s, "
              f"{peer['peak_gib']} GiB")
    for k, v in sorted(component_s.items(), key=lambda kv: -kv[1]):
        print(f"  {k:<16} {v * 1e3:9.1f} ms  {v / total:6.1%}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
