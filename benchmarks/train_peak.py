"""`tritnet train` with its peak device memory recorded: the same run, then OUT/peak.json.

    python benchmarks/train_peak.py --preset small --tokens 5000000 --out runs/x

Every CuPy allocation goes through bench_step's tracker: at each allocation, the allocating
pool's blocks in use plus every block the other pool holds (CuPy's default pool and the CUDA
graphs' own), so the number is the most device memory the run's arrays needed at any moment,
the comparison a PyTorch peer's torch.cuda.max_memory_allocated makes (the CUDA context and
libraries' workspaces are outside both). On the CPU it runs the training and records nothing.
"""

from __future__ import annotations

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


def main(argv):
    peak = None
    try:
        import cupy
        cupy.cuda.runtime.getDeviceCount()
    except Exception:
        cupy = None
    if cupy is not None:
        from bench_step import WatchedPool, track_peak_memory
        from tritnet import capture
        peak = track_peak_memory()
        init = capture.CapturedStep.__init__

        def watched_init(self, *args, **kwargs):
            init(self, *args, **kwargs)
            self.pool = WatchedPool(self.pool, peak)

        capture.CapturedStep.__init__ = watched_init
    from cli.main import main as cli
    out = argv[argv.index("--out") + 1] if "--out" in argv else None
    code = 0
    try:
        cli(["train", *argv], standalone_mode=False)
    except SystemExit as e:
        code = e.code or 0
    finally:
        if peak is not None and out is not None and os.path.isdir(out):
            with open(os.path.join(out, "peak.json"), "w") as fh:
                json.dump({"peak_device_bytes": peak["bytes"],
                           "peak_device_gib": peak["bytes"] / 2**30}, fh)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
