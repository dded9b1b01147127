"""Train on your own text: a folder of text files (or one file), then sample from the model.

    python examples/own_text.py ~/notes                 # the tiny preset, 300 steps
    python examples/own_text.py ~/notes --steps 1000 --out runs/notes

Files are read as bytes (UTF-8 text only; others are skipped with a warning), sorted by path;
every 20th file is held out (tritnet/data.py has the rule). The run folder works with the
command line too: `tritnet train --data ~/notes --out runs/notes --resume` continues it,
`tritnet sample runs/notes/ckpt.h5 --prompt "..."` writes more.
"""

import argparse

from tritnet.config import preset
from tritnet.sample import load_model, sample
from tritnet.train import train


def main(path, steps=300, out="runs/own_text", overwrite=False, prompt="The ", n_sample=200):
    config = preset("tiny").override(steps=steps, eval_every=max(1, steps // 5),
                                     save_every=max(1, steps // 2))
    result = train(config, data=path, out_dir=out, overwrite=overwrite)
    print(f"held-out {result['val_bpb']:.3f} {result['unit']} "
          f"(bigram baseline {result['bigram_bpb']:.3f})")

    model, _ = load_model(f"{out}/ckpt.h5")
    text = sample(model, prompt.encode(), n_sample, temperature=0.8, top_k=40)
    print("--- sample ---")
    print(prompt + bytes(text).decode("utf-8", errors="replace"))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("path", help="a folder of text files, or one text file")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--out", default="runs/own_text")
    p.add_argument("--overwrite", action="store_true", help="start over in --out")
    p.add_argument("--prompt", default="The ")
    p.add_argument("--sample", type=int, default=200, help="bytes to generate")
    a = p.parse_args()
    main(a.path, a.steps, a.out, a.overwrite, a.prompt, a.sample)
