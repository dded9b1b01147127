"""Train several variants of a preset side by side on this host's GPUs; tabulate held-out bpb.

    python benchmarks/sweep.py --tokens 5000000 --per-gpu 2 --out /tmp/sweep \\
        base= cosine="--schedule cosine" novq="--config benchmarks/configs/no_shared_vq.json"

Each variant is `name=FLAGS`: extra `tritnet train` flags over `--preset PRESET --tokens N`.
Runs go round-robin onto the GPUs (CUDA_VISIBLE_DEVICES), `--per-gpu` at a time on each: the
training step is host-bound, so two processes share one GPU at little cost each. Every run
keeps its own folder (config.json, metrics.jsonl, ckpt.h5, log); at the end each checkpoint
is scored again by `tritnet eval` at every `--eval-seq-len` (held-out windows of that many
tokens: ALiBi models can be read at longer context than they were trained at).

Writes OUT/sweep.json and prints a table: final held-out bpb (the run's own evaluation),
the bigram baseline, each extra evaluation, wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor


def gpu_count() -> int:
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount()
    except Exception:
        return 0


def last_eval(metrics_path):
    last = None
    with open(metrics_path) as fh:
        for line in fh:
            row = json.loads(line)
            if "val_bpb" in row:
                last = row
    return last


def run_variant(name, flags, gpu, args):
    folder = os.path.join(args.out, name)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    train = ([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                           "train_peak.py")] if args.peak else
             [sys.executable, "-m", "cli.main", "train"])
    cmd = [*train, "--preset", args.preset, "--tokens", str(args.tokens), "--out", folder,
           "--overwrite", *shlex.split(flags)]
    start = time.perf_counter()
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "log"), "w") as log:
        code = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    result = {"name": name, "flags": flags, "gpu": gpu, "exit": code,
              "train_s": time.perf_counter() - start}
    metrics = os.path.join(folder, "metrics.jsonl")
    if os.path.exists(metrics):
        row = last_eval(metrics)
        if row:
            result.update(step=row["step"], tokens=row["tokens"], val_bpb=row["val_bpb"],
                          bigram_bpb=row["bigram_bpb"])
        rates = sorted(json.loads(line).get("tokens_per_s", 0) for line in open(metrics))
        last = json.loads(open(metrics).readlines()[-1])
        result.update(median_step_tokens_per_s=rates[len(rates) // 2],
                      tokens_per_s=last["tokens"] / max(last["elapsed"], 1e-9))
    peak = os.path.join(folder, "peak.json")
    if os.path.exists(peak):
        result.update(json.load(open(peak)))
    ckpt = os.path.join(folder, "ckpt.h5")
    for seq_len in args.eval_seq_len:
        if code or not os.path.exists(ckpt):
            break
        extra = [] if args.eval_batches is None else ["--batches", str(args.eval_batches)]
        out = subprocess.run([sys.executable, "-m", "cli.main", "eval", ckpt, "--seq-len",
                              str(seq_len), *extra], env=env, capture_output=True, text=True)
        found = re.search(r"held-out ([0-9.]+)", out.stdout)
        result[f"eval_bpb_at_{seq_len}"] = float(found.group(1)) if found else out.stderr[-300:]
    print(json.dumps(result), flush=True)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("variants", nargs="+", help="name=FLAGS (FLAGS may be empty)")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--tokens", type=int, default=5_000_000)
    parser.add_argument("--per-gpu", type=int, default=2)
    parser.add_argument("--eval-seq-len", type=int, nargs="*", default=[])
    parser.add_argument("--peak", action="store_true",
                        help="record each run's peak device memory (benchmarks/train_peak.py)")
    parser.add_argument("--eval-batches", type=int, default=None,
                        help="held-out batches of each extra evaluation (0: every window)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    variants = [v.split("=", 1) for v in args.variants]
    gpus = gpu_count()
    slots = [i % gpus for i in range(gpus * args.per_gpu)] if gpus else [None] * args.per_gpu
    with ThreadPoolExecutor(len(slots)) as pool:
        futures = [pool.submit(run_variant, name, flags, slots[i % len(slots)], args)
                   for i, (name, flags) in enumerate(variants)]
        results = [f.result() for f in futures]
    with open(os.path.join(args.out, "sweep.json"), "w") as fh:
        json.dump({"preset": args.preset, "tokens": args.tokens, "runs": results}, fh, indent=2)
    extra = [f"eval_bpb_at_{n}" for n in args.eval_seq_len]
    print(f"{'variant':<16} {'held-out':>9} {'bigram':>7} " +
          " ".join(f"{'@' + str(n):>7}" for n in args.eval_seq_len) + f" {'time':>7} "
          f"{'tok/s':>8} {'peak GiB':>8}")
    for r in results:
        cells = [f"{r[k]:7.4f}" if isinstance(r.get(k), float) else f"{'-':>7}" for k in extra]
        val = f"{r['val_bpb']:9.4f}" if "val_bpb" in r else f"{'exit ' + str(r['exit']):>9}"
        print(f"{r['name']:<16} {val} {r.get('bigram_bpb', float('nan')):7.4f} "
              f"{' '.join(cells)} {r['train_s']:6.0f}s {r.get('tokens_per_s', 0):8.0f} "
              f"{r.get('peak_device_gib', float('nan')):8.3f}")


if __name__ == "__main__":
    main()
