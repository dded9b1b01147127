"""Proof that a refactor changed no behaviour: fixed tiny training runs on the CPU, whose
checkpoint arrays, integer training state and metrics must equal committed hashes bit for bit.

The configs are explicit (no preset), so a preset's tuning never moves these numbers. Each run
covers a different path through the step: the plain eager step, and a step of two
micro-batches combined by the reducer with the optimiser's other rules and the memory's
options. A change that alters a single trit, accumulator, RNG draw or loss digit changes a
hash here. If a change is *meant* to alter training, regenerate with

    TRITNET_GOLDEN_PRINT=1 python -m pytest -q tests/train/test_golden.py -s

and commit the printed values with the change that explains them.
"""

import hashlib
import json
import os

import numpy as np
import pytest

from tritnet import backend, data
from tritnet.checkpoint import load_checkpoint
from tritnet.config import Config
from tritnet.train import train

TEXT = b"".join(b"def f%d(x):\n    return x * %d + 1\n" % (i, i % 7) for i in range(400))

MODEL = dict(d_model=32, n_layers=2, n_heads=2, context=32, n_experts=2, expert_hidden=32,
             top_k=1, codebook_dim=32, shared_vq_size=64, kgvq_size=32, kgvq_dim=32,
             graph_slots=4, batch_size=4, seq_len=16, eval_every=10, eval_batches=2,
             save_every=0, seed=3)
RUNS = {
    "eager": dict(MODEL, steps=30, position="alibi", quiet_memory=True),
    "micro_batches": dict(MODEL, steps=24, micro_batches=2, memory_values=True,
                          graph_capacity=16, flip_carry=True, accum_init="spread",
                          grad_norm="factored", schedule="cosine", final_grad_rms_units=2.0,
                          decay_shift=1, expert_capacity=1.0),
}

# Wall-clock fields of a metrics row: the only ones that may differ between two runs.
TIMING = ("tokens_per_s", "elapsed")

GOLDEN = {
    "eager": {
        "arrays": "f31193d10c017a91c8d1d974f3ae7361abbd6800bc7cea27dd98c9d7b2e829e0",
        "train_state": "6e81bbf24e7d35825b1d1e1c03aeb4b0db86fb1f2495ecfa07e037260abbcb20",
        "metrics": "ac118fbaf222740ba29f6aabef3ead93cd79685c2d691a41f0779e870e6be0f0",
    },
    "micro_batches": {
        "arrays": "b69c47ec3df0a250aadc172818caf76ca42977ed085119c1e83a25b1ae55cb33",
        "train_state": "a72408730c0e796dfac32da112ae932d2e98b1190306d70ee5ba182429b49955",
        "metrics": "637a6bcb419e5289988618bad52ecd018260d4ebcee5539617a732e8c00eb865",
    },
}


def _sha(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def _digest(run_dir) -> dict:
    ckpt = load_checkpoint(os.path.join(run_dir, "ckpt.h5"))
    h = hashlib.sha256()
    for name, array in ckpt.arrays.items():
        a = np.ascontiguousarray(array)
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    state = {k: v for k, v in ckpt.train_state.items() if k != "elapsed"}
    state["module_state"] = ckpt.module_state
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        rows = [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in fh]
    # the stored config stays one flat table of fields (older tritnets read it)
    assert all(not isinstance(v, (dict, list)) for v in ckpt.config.values())
    return {"arrays": h.hexdigest(),
            "train_state": _sha(json.dumps(state, sort_keys=True).encode()),
            "metrics": _sha(json.dumps(rows, sort_keys=True).encode())}


@pytest.mark.parametrize("name", sorted(RUNS))
def test_training_is_unchanged(tmp_path, name):
    backend.set_device("cpu")
    corpus = data._split_tail(np.frombuffer(TEXT, np.uint8), 256, "synthetic code")
    train(Config().override(**RUNS[name]), data=corpus, out_dir=tmp_path / name,
          log=lambda *_: None, progress=False)
    got = _digest(tmp_path / name)
    stored = load_checkpoint(tmp_path / name / "ckpt.h5").config
    assert {k: stored[k] for k in RUNS[name]} == RUNS[name]
    if os.environ.get("TRITNET_GOLDEN_PRINT"):
        print(f'\n    "{name}": {json.dumps(got)},')
    assert got == GOLDEN[name]
