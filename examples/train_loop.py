"""The training loop through the Python API: the tiny preset on the default corpus.

What `tritnet train` does, without the run folder, progress line and fault handling
(tritnet/train.py has those). Run:  python examples/train_loop.py  [--steps 200] [--out FILE]
The checkpoint goes to --out, or to a new temporary folder (it says where).
"""

import argparse
import os
import tempfile
import time

import tritnet
from tritnet import data, rng as trandom
from tritnet.checkpoint import save_checkpoint
from tritnet.config import preset
from tritnet.models import CodeMemoryLM
from tritnet.optim import TritFlip
from tritnet.train import evaluate


def main(steps=20, eval_every=10, out=None, seed=0):
    out = out or os.path.join(tempfile.mkdtemp(prefix="tritnet-train-loop-"), "train_loop.h5")
    config = preset("tiny").override(steps=steps, seed=seed)
    trandom.manual_seed(config.seed)                       # initial trits come from here
    corpus = data.default_corpus()                         # the stdlib's *.py files, as bytes
    bigram = data.bigram_bpb(corpus.train, corpus.val, corpus.vocab_size)
    held_out = list(data.eval_batches(corpus.val, config.batch_size, config.seq_len, 4))

    model = CodeMemoryLM(config)                           # every weight a trit, int8 state
    opt = TritFlip(model, flip_threshold=config.flip_threshold,
                   scale_threshold=config.scale_threshold, decay_shift=config.decay_shift,
                   grad_rms_units=config.grad_rms_units, seed=config.seed)
    batches = data.Batches(corpus, config.batch_size, config.seq_len, seed=config.seed)

    start = time.perf_counter()
    for step in range(1, steps + 1):
        x, y = batches.get("train")
        loss, ce = model.loss(x, y)        # total (with the VQ losses), cross-entropy in nats
        loss.backward()                    # ternary weights get int8 gradients, no float .grad
        opt.step()                         # accumulate, flip trits across the threshold
        if step % eval_every == 0 or step == steps:
            val = data.bits_per_byte(evaluate(model, held_out))
            print(f"step {step:4d}  train {data.bits_per_byte(ce.item()):.3f} bpb  held-out "
                  f"{val:.3f} bpb  (bigram {bigram:.3f})  {time.perf_counter() - start:.0f}s")

    save_checkpoint(out, model, optimizer=opt, config=config.to_dict(),
                    train_state={"step": steps, "data": batches.state_dict()})
    print(f"saved {out} on {tritnet.backend.device()}: look inside with `tritnet inspect {out}`")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--out", help="the checkpoint to write (default: train_loop.h5 in a new "
                   "temporary folder)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    main(a.steps, a.eval_every, a.out, a.seed)
