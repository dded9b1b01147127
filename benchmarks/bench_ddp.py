"""Data-parallel scaling of `tritnet train --gpus N` against one GPU, at the same per-GPU batch.

    python benchmarks/bench_ddp.py --presets small default --gpus 1 2 --steps 30

Each point is a real `tritnet train` run (default corpus, eval off, the one final checkpoint
after the timed steps). tokens/s is the median over the steps after the first `--warmup`
(compilation, index builds), read from the run's metrics.jsonl. Efficiency at N GPUs =
tokens/s(N) / (N · tokens/s(1)) with the global batch N × the preset's batch (weak scaling, the
data-parallel case). Writes benchmarks/results/ddp-<gpu>.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_point(preset, gpus, steps, warmup, batch, work):
    out = os.path.join(work, f"{preset}-{gpus}")
    cmd = [sys.executable, "-m", "cli.main", "train", "--preset", preset, "--steps", str(steps),
           "--eval-every", "0", "--save-every", "0", "--batch-size", str(batch * gpus),
           "--device", "cuda", "--out", out]
    if gpus > 1:
        cmd += ["--gpus", str(gpus)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        return {"preset": preset, "gpus": gpus, "error": (proc.stderr or proc.stdout)[-2000:]}
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    rates = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][warmup:]
    return {"preset": preset, "gpus": gpus, "global_batch": batch * gpus, "steps": steps,
            "timed_steps": len(rates), "tokens_per_s": statistics.median(rates),
            "run_seconds": wall}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["small", "default"])
    parser.add_argument("--gpus", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    sys.path.insert(0, ROOT)
    import cupy
    from tritnet.config import preset as get_preset
    name = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    points = []
    with tempfile.TemporaryDirectory() as work:
        for p in args.presets:
            batch = get_preset(p).batch_size
            steps = args.steps if p != "default" else max(args.warmup + 5, args.steps // 3)
            for n in args.gpus:
                points.append(run_point(p, n, steps, args.warmup, batch, work))
                print(json.dumps(points[-1]), flush=True)
    for pt in points:
        base = next((q for q in points if q["preset"] == pt["preset"] and q["gpus"] == 1
                     and "tokens_per_s" in q), None)
        if base and "tokens_per_s" in pt:
            pt["efficiency"] = pt["tokens_per_s"] / (pt["gpus"] * base["tokens_per_s"])
    result = {"device": name, "gpu_count": cupy.cuda.runtime.getDeviceCount(),
              "date": time.strftime("%Y-%m-%d"), "method": __doc__.strip(), "points": points}
    os.makedirs(os.path.join(ROOT, "benchmarks", "results"), exist_ok=True)
    path = os.path.join(ROOT, "benchmarks", "results",
                        f"ddp-{name.lower().replace(' ', '-')}.json")
    with open(path, "w") as fh:
        json.dump(result, fh, indent=2)
    print(f"{'preset':<8} {'gpus':>4} {'batch':>5} {'tokens/s':>10} {'efficiency':>10}")
    for pt in points:
        if "tokens_per_s" in pt:
            print(f"{pt['preset']:<8} {pt['gpus']:>4} {pt['global_batch']:>5} "
                  f"{pt['tokens_per_s']:>10,.0f} {pt.get('efficiency', float('nan')):>10.2f}")
        else:
            print(f"{pt['preset']:<8} {pt['gpus']:>4} failed: {pt['error'][-300:]}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
