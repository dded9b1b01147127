"""Ablation: what each part of CodeMemoryLM earns in held-out loss.

Trains the full model and, in turn, the model with the shared VQ, the KG VQ, the MoEGraph edges
and the composite head switched off — same data, same seed, same steps — and reports held-out
bits per byte for each. CPU for the tiny preset, GPU for small:

    python benchmarks/ablation.py --preset tiny --steps 150            # CPU, minutes
    python benchmarks/ablation.py --preset small --steps 600 --device cuda

Writes benchmarks/results/ablation-<preset>-<device>.json. No threshold: it tells us what each
part earns on this data at this budget.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import time
from pathlib import Path

import numpy as np

import tritnet
from tritnet import backend
from tritnet import rng as trandom
from tritnet.config import preset
from tritnet.data import Batches, bigram_bpb, bits_per_byte, default_corpus, eval_batches
from tritnet.models import CodeMemoryLM
from tritnet.optim import TritFlip

VARIANTS = {
    "full": {},
    "no_shared_vq": {"use_shared_vq": False},
    "no_kgvq": {"use_kgvq": False},
    "no_graph_edges": {"use_graph_edges": False},
    "no_composite_head": {"use_composite_head": False},
}


def held_out_bpb(model, corpus, config, batches):
    model.eval()
    losses = []
    with tritnet.no_grad():
        for x, y in eval_batches(corpus.val, config.batch_size, config.seq_len, batches):
            losses.append(model.loss(x, y)[1].item())
    model.train()
    return bits_per_byte(float(np.mean(losses)))


def run(config, corpus, steps, eval_count):
    trandom.manual_seed(config.seed)
    model = CodeMemoryLM(config)
    opt = TritFlip(model, flip_threshold=config.flip_threshold,
                   scale_threshold=config.scale_threshold, decay_shift=config.decay_shift,
                   grad_rms_units=config.grad_rms_units, seed=config.seed)
    data = Batches(corpus, config.batch_size, config.seq_len, seed=config.seed)
    start = time.perf_counter()
    for _ in range(steps):
        x, y = data.get("train")
        loss, _ = model.loss(x, y)
        loss.backward()
        opt.step()
    backend.synchronize()
    seconds = time.perf_counter() - start
    return {"held_out_bpb": held_out_bpb(model, corpus, config, eval_count),
            "train_seconds": seconds,
            "tokens_per_s": steps * config.batch_size * config.seq_len / seconds}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args()
    device = backend.set_device(a.device)
    base = preset(a.preset).override(batch_size=a.batch_size, seq_len=a.seq_len)
    corpus = default_corpus()
    results = {}
    for name, switches in VARIANTS.items():
        results[name] = run(base.override(**switches), corpus, a.steps, a.eval_batches)
        print(f"{name:>18}: held-out {results[name]['held_out_bpb']:.3f} bpb  "
              f"({results[name]['tokens_per_s']:,.0f} tok/s)", flush=True)
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True,
                                text=True).stdout.strip() or "unknown"
    except OSError:
        commit = "unknown"
    record = {
        "benchmark": "ablation", "preset": a.preset, "steps": a.steps,
        "batch_size": base.batch_size, "seq_len": base.seq_len, "device": device,
        "device_name": backend.describe().get("gpu") if device == "cuda" else platform.processor(),
        "versions": {k: v for k, v in backend.describe().items() if k != "gpu"},
        "commit": commit, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "bigram_bpb": bigram_bpb(corpus.train, corpus.val, corpus.vocab_size),
        "results": results,
        "delta_vs_full_bpb": {k: v["held_out_bpb"] - results["full"]["held_out_bpb"]
                              for k, v in results.items()},
    }
    out = Path(a.out) / f"ablation-{a.preset}-{device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"bigram baseline {record['bigram_bpb']:.3f} bpb; wrote {out}")


if __name__ == "__main__":
    main()
