"""Which tensors flip before a loss spike: a `tritnet train` run with every step's flips traced.

    python benchmarks/spikes.py --out /tmp/run -- --preset small --tokens 5000000 --schedule cosine

Everything after `--` is `tritnet train`'s options. The run is the ordinary training loop
(tritnet.train.train), so it reproduces a run made with the same options exactly; the only
addition is a wrapper around TritFlip.step that reads, after every step, how many trits and
how many row exponents each ternary module changed (one host sync per step).

A spike is a step whose train bpb exceeds the median of the five steps before it by more than
`--jump`. For each spike at step s it prints the modules whose flips in the update that made
step s's weights (update s-1) stood out most against their own median, and writes
OUT/flips.jsonl (per step: {module: [trits, exponents]}) and OUT/spikes.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="the run folder")
    parser.add_argument("--jump", type=float, default=0.4)
    parser.add_argument("--top", type=int, default=6)
    args, train_args = parser.parse_known_args()
    train_args = [a for a in train_args if a != "--"]

    from tritnet.optim import TritFlip
    from cli.main import main as cli_main

    trace = []
    original = TritFlip.step

    def traced_step(self):
        counts = original(self)
        row = {}
        for name, c in zip(self._owner_names, counts):
            if c is not None:
                t, e = (int(v) for v in c.tolist())
                if t or e:
                    row[name] = [t, e]
        trace.append(row)
        return counts

    TritFlip.step = traced_step

    # Module names: TritFlip keeps its modules in model.modules() order; name them once built.
    from tritnet import train as ttrain
    build = ttrain.build

    def named_build(config, device=None):
        model, optimizer = build(config, device)
        names = {id(m): n or "model" for n, m in model.named_modules()}
        optimizer._owner_names = [names[id(m)] for m in optimizer.modules]
        return model, optimizer

    ttrain.build = named_build
    try:
        cli_main(["train", "--out", args.out, "--overwrite", *train_args],
                 standalone_mode=False)
    finally:
        TritFlip.step = original
        ttrain.build = build

    with open(os.path.join(args.out, "flips.jsonl"), "w") as fh:
        for step, row in enumerate(trace):
            fh.write(json.dumps({"update": step, "flips": row}) + "\n")
    with open(os.path.join(args.out, "metrics.jsonl")) as fh:
        rows = [json.loads(line) for line in fh]
    train_bpb = [(r["step"], r["train_bpb"]) for r in rows if "train_bpb" in r]
    spikes = []
    for i in range(5, len(train_bpb)):
        step, bpb = train_bpb[i]
        before = statistics.median(b for _, b in train_bpb[i - 5:i])
        if bpb - before > args.jump and step >= 2 and step - 2 < len(trace):
            update = trace[step - 2]   # step s (1-based) ran on the weights of update s-1
            scores = []
            for name, (t, e) in update.items():
                history = [trace[j].get(name, [0, 0]) for j in range(max(0, step - 22),
                                                                     step - 2)]
                med_t = statistics.median(h[0] for h in history) if history else 0
                med_e = statistics.median(h[1] for h in history) if history else 0
                scores.append(((t + 1) / (med_t + 1), (e + 1) / (med_e + 1), name, t, e))
            top_t = sorted(scores, reverse=True)[:args.top]
            top_e = sorted(scores, key=lambda s: s[1], reverse=True)[:args.top]
            spikes.append({"step": step, "train_bpb": bpb, "median_before": before,
                           "trits_vs_median": [(n, t, round(r, 1)) for r, _, n, t, _ in top_t],
                           "exponents_vs_median": [(n, e, round(r, 1))
                                                   for _, r, n, _, e in top_e]})
    with open(os.path.join(args.out, "spikes.json"), "w") as fh:
        json.dump(spikes, fh, indent=1)
    for s in spikes:
        print(f"step {s['step']}: train {s['train_bpb']:.2f} bpb (median before "
              f"{s['median_before']:.2f})")
        print("   trits:     " + ", ".join(f"{n} {t} ({r}x)" for n, t, r in s["trits_vs_median"]))
        print("   exponents: " + ", ".join(f"{n} {e} ({r}x)" for n, e, r in
                                          s["exponents_vs_median"]))


if __name__ == "__main__":
    main()
