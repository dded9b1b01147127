"""Train on your own text: a folder of text files (or one file), then sample from the model.

    python examples/own_text.py ~/notes                 # the tiny preset, 150 steps: ~1 min
    python examples/own_text.py ~/notes --steps 1000 --out runs/notes
    python examples/own_text.py ~/notes --resume --steps 2000    # go on where it stopped

Files are read as bytes (UTF-8 text only; others are skipped with a warning), sorted by path;
every 20th file is held out (tritnet/data.py has the rule). The run folder works with the
command line too: `tritnet train --data ~/notes --out runs/notes --resume` continues it,
`tritnet sample runs/notes/ckpt.h5 --prompt "..."` writes more. The default of 150 steps
(about a minute on two CPU cores once the kernels are compiled; the first run compiles them)
shows the loop; the tiny preset's own 1,000 steps learn far more.
"""

import argparse
import sys
import warnings

from tritnet.backend import announce_compilation
from tritnet.config import preset
from tritnet.errors import TritnetError
from tritnet.sample import load_model, sample
from tritnet.train import train


def main(path, steps=150, out="runs/own_text", overwrite=False, resume=False, prompt="The ",
         n_sample=200):
    config = preset("tiny").override(steps=steps, eval_every=max(1, steps // 5),
                                     save_every=max(1, steps // 2))
    result = train(config, data=path, out_dir=out, overwrite=overwrite, resume=resume)
    print(f"held-out {result['val_bpb']:.3f} {result['unit']} "
          f"(bigram baseline {result['bigram_bpb']:.3f})")

    model, _ = load_model(f"{out}/ckpt.h5")
    text = sample(model, prompt.encode(), n_sample, temperature=0.8, top_k=40)
    print("--- sample ---")
    print(prompt + bytes(text).decode("utf-8", errors="replace"))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("path", help="a folder of text files, or one text file")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--out", default="runs/own_text")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--overwrite", action="store_true",
                       help="start over in --out (the earlier run's files move to "
                       "previous-<time>/ inside it)")
    group.add_argument("--resume", action="store_true",
                       help="continue the run in --out (to --steps in all)")
    p.add_argument("--prompt", default="The ")
    p.add_argument("--sample", type=int, default=200, help="bytes to generate")
    a = p.parse_args()
    # warnings (a skipped file, ...) and errors as one line each, as `tritnet` prints them
    warnings.formatwarning = lambda message, *args, **kwargs: f"own_text.py: warning: {message}\n"
    try:
        with announce_compilation(print):   # a first run's minute of compiling, said
            main(a.path, a.steps, a.out, a.overwrite, a.resume, a.prompt, a.sample)
    except TritnetError as e:   # a user's error: its message is the whole story
        sys.exit("own_text.py: error: " + " ".join(str(e).split()))
    except KeyboardInterrupt:   # a run stopped by Ctrl-C has said where it saved
        sys.exit(130)
