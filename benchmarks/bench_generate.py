"""Generation speed: time to first token and tokens/s, presets x batch sizes, on this device.

For each preset and batch size B, a model of the preset (its initial trits: the work per token
does not depend on what was learned) continues a prompt of --prompt-len bytes of Python source
in B streams at once, sampling at temperature 1 with no stop, through CodeMemoryLM.generate
(the KV cache: one prefill, then one step of every layer per token). Reported per run:

    ttft_s              time to first token: the prefill of the prompt and the first draw
                        (generate with max_new_tokens = 1)
    decode_tokens_per_s B x (tokens - 1) new tokens over the time after the first one
    tokens_per_s        B x tokens over the whole call, first token included
    cache_bytes         the KV cache (keys and values of every layer at the run's capacity)
    cuda_graph          on a GPU each batch runs twice: decode steps replayed from a CUDA
                        graph (generate's default there) and eager decode steps
    weight_traffic_bound_tokens_per_s
                        B x the measured memory bandwidth (a device copy) over the bytes a
                        decode step must read: every matrix's packed trits and exponents (an
                        expert's by its routed share of the streams), each code book once per
                        search
    dense_peer_tokens_per_s
                        B over the time of one step's products in a dense model of the same
                        matrix shapes: fp16 through cuBLAS on a GPU, float32 through NumPy on
                        a CPU (the products alone: no attention, no sampling)
    weight_bytes        the packed trits and exponents the decode steps read (T_packed, E)

A warm-up generation per preset compiles the kernels (or loads them from Numba's cache) first.
Peak memory: the process's peak resident set (CPU) or CuPy's pool (GPU) after the preset.

Writes benchmarks/results/generate-<device>.json (or --out DIR) and prints a table.
Run from the repository root:
    PYTHONPATH=. python benchmarks/bench_generate.py [--presets tiny small] [--batches 1 8 64]
"""

import os

# One OpenBLAS thread, as the `tritnet` command sets it (cli/main.py says why).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numba  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tritnet import backend  # noqa: E402
from tritnet import rng as trandom  # noqa: E402
from tritnet.config import preset  # noqa: E402
from tritnet.models import CodeMemoryLM  # noqa: E402
from tritnet.nn.ternary import TernaryLinear, TernaryModule  # noqa: E402


def device_name():
    if backend.device() == "cuda":
        return backend.describe()["gpu"].lower().replace(" ", "-")
    return f"cpu-{os.cpu_count()}core"


def git_commit():
    out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def weight_bytes(model):
    return sum(m.T_packed.nbytes + m.E.nbytes for m in model.modules()
               if isinstance(m, TernaryModule))


def step_matrices(model):
    """(rows, cols, share) of every weight matrix a decode step reads, share the fraction of
    the streams that read it: each TernaryLinear once (an expert's by top_k / n_experts of
    the streams, as routed decoding runs it), and each code book once per search (the shared
    book by every block and the head, the relation book once)."""
    c = model.config
    experts = {id(m) for blk in model.blocks for ex in blk.moe.experts for m in (ex.up, ex.down)}
    out = [(m.out_features, m.in_features, c.top_k / c.n_experts if id(m) in experts else 1.0)
           for m in model.modules() if isinstance(m, TernaryLinear)]
    if c.use_shared_vq:
        out += [(c.shared_vq_size, c.codebook_dim, 1.0)] * (c.n_layers + 1)
        if c.use_kgvq:
            out.append((c.kgvq_size, c.kgvq_dim, 1.0))
    return out


def bandwidth_bytes_per_s(nbytes=1 << 28, repeats=5):
    """Device memory bandwidth, measured: a copy of nbytes reads and writes each byte once."""
    xp = backend.cupy if backend.device() == "cuda" else np
    a = xp.ones(nbytes // 4, np.float32)
    b = xp.empty_like(a)
    best = min(timed(lambda: xp.copyto(b, a))[0] for _ in range(repeats))
    return 2 * nbytes / best


def dense_peer_step_s(matrices, batch, repeats=5):
    """Time of one decode step's products in a dense model of the same matrix shapes: fp16
    through cuBLAS on a GPU (float32 through NumPy on a CPU), batch rows each, every matrix
    read by every stream (routed experts: their share of the streams' rows, at least one)."""
    cuda = backend.device() == "cuda"
    xp, dtype = (backend.cupy, np.float16) if cuda else (np, np.float32)
    products = {}
    for rows, cols, share in matrices:
        key = (rows, cols, max(1, round(batch * share)))
        products[key] = products.get(key, 0) + 1
    operands = [(xp.ones((m, k), dtype), xp.ones((n, k), dtype).T, times)
                for (n, k, m), times in products.items()]

    def step():
        for x, w, times in operands:
            for _ in range(times):
                x @ w

    step()
    return min(timed(step)[0] for _ in range(repeats))


def peak_memory_bytes():
    if backend.device() == "cuda":
        return int(backend.cupy.get_default_memory_pool().total_bytes())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # KiB on Linux


def timed(fn):
    backend.synchronize()
    start = time.perf_counter()
    out = fn()
    backend.synchronize()
    return time.perf_counter() - start, out


def run(model, prompt, batch, tokens, seed=0, cuda_graph=False):
    prompts = [prompt] * batch
    ttft, _ = timed(lambda: model.generate(prompts, 1, temperature=1.0, seed=seed,
                                           cuda_graph=cuda_graph))
    total, outs = timed(lambda: model.generate(prompts, tokens, temperature=1.0, seed=seed,
                                               cuda_graph=cuda_graph))
    assert all(len(o) == tokens for o in outs)
    cache = model.new_cache(batch, min(model.config.context, len(prompt) + tokens))
    return {"batch": batch, "cuda_graph": cuda_graph, "prompt_tokens": len(prompt),
            "new_tokens": tokens,
            "ttft_s": ttft, "total_s": total,
            "decode_tokens_per_s": batch * (tokens - 1) / max(total - ttft, 1e-9),
            "tokens_per_s": batch * tokens / total, "cache_bytes": cache.nbytes()}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["tiny", "small"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8, 64])
    p.add_argument("--tokens", type=int, default=128, help="new tokens per stream")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--device", default=None, help="cpu or cuda (default: the best available)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args()
    backend.set_device(args.device or os.environ.get("TRITNET_DEVICE"))
    source = Path(os.__file__).read_bytes()
    prompt = list(source[1000:1000 + args.prompt_len])
    result = {"benchmark": "generate", "date": datetime.datetime.now(datetime.timezone.utc)
              .isoformat(), "commit": git_commit(), "device": device_name(),
              "backend": backend.describe(), "python": platform.python_version(),
              "numba_threads": numba.get_num_threads(),
              "openblas_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
              "load_average_before": os.getloadavg(), "presets": {}}
    for name in args.presets:
        trandom.manual_seed(0)
        config = preset(name)
        model = CodeMemoryLM(config)
        model.generate(prompt, 4, temperature=1.0)             # compile / load the kernels
        model.generate([prompt] * max(args.batches), 2, temperature=1.0)
        matrices = step_matrices(model)
        step_bytes = sum(r * ((c + 31) // 32) * 8 * share + r for r, c, share in matrices)
        bandwidth = bandwidth_bytes_per_s()
        runs = []
        graphs = [True, False] if backend.device() == "cuda" else [False]
        for batch, cuda_graph in [(b, g) for b in args.batches for g in graphs]:
            r = run(model, prompt, batch, args.tokens, cuda_graph=cuda_graph)
            # beside it: the packed weights' traffic bound and a dense model of the same shapes
            r["weight_traffic_bound_tokens_per_s"] = batch * bandwidth / step_bytes
            r["dense_peer_tokens_per_s"] = batch / dense_peer_step_s(matrices, batch)
            runs.append(r)
            print(f"{name:>6} B={batch:<3} {'graph' if cuda_graph else 'eager'} ttft "
                  f"{r['ttft_s'] * 1000:8.1f} ms   decode "
                  f"{r['decode_tokens_per_s']:9.1f} tok/s   overall {r['tokens_per_s']:9.1f} "
                  f"tok/s   cache {r['cache_bytes'] / 2**20:7.1f} MiB   bound "
                  f"{r['weight_traffic_bound_tokens_per_s']:9.0f}   dense peer "
                  f"{r['dense_peer_tokens_per_s']:9.1f} tok/s", flush=True)
        result["presets"][name] = {"context": config.context, "d_model": config.d_model,
                                   "n_layers": config.n_layers,
                                   "shared_vq_size": config.shared_vq_size,
                                   "weight_bytes": weight_bytes(model),
                                   "decode_step_bytes": step_bytes,
                                   "bandwidth_bytes_per_s": bandwidth,
                                   "peak_memory_bytes": peak_memory_bytes(), "runs": runs}
    result["load_average_after"] = os.getloadavg()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"generate-{result['device']}.json")
    with open(path, "w") as fh:
        json.dump(result, fh, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
