"""Scaffolding shared by the test files: a model small enough that a training step takes
milliseconds, a synthetic code corpus, the `tritnet` command run in-process (CliRunner) or in
a child process, the one-error-line check, a poisoned loss, and the kernel tests' bitplane32
packing.

Import it as `from tests.helpers import ...` (tests/ is a package; pytest puts the repository
root on sys.path). Each test file states its own run settings (steps, save_every, ...) and its
own corpus size, so what a test checks stays visible where it is written.
"""

import json
import os
import re

import numpy as np
from click.testing import CliRunner

from tritnet import backend

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

cupy = backend.cupy   # None without CuPy: the `cuda` tests then skip (tests/conftest.py)

# The model part of every small test config: every code path of the tiny preset, one layer.
SMALL_MODEL = dict(d_model=32, n_layers=1, n_heads=2, context=32, n_experts=2,
                   expert_hidden=32, top_k=1, codebook_dim=32, shared_vq_size=64, kgvq_size=32,
                   kgvq_dim=32, graph_slots=4, batch_size=2, seq_len=16)


def small_config(**run):
    """SMALL_MODEL with a test's own run settings (steps, eval_every, save_every, ...)."""
    return dict(SMALL_MODEL, **run)


def code_text(n_functions):
    """A synthetic Python corpus: `n_functions` two-line functions."""
    return "".join(f"def f{i}(x):\n    return x * {i % 7} + 1\n" for i in range(n_functions))


def write_run_files(tmp_path, config, text, config_name="small.json"):
    """tmp_path with `config_name` (the config as JSON) and code.txt (the text to train on)."""
    (tmp_path / config_name).write_text(json.dumps(config))
    (tmp_path / "code.txt").write_text(text)
    return tmp_path


def train_args(files, out, *extra, config_name="small.json"):
    """`tritnet train` on the files of write_run_files, into `out`."""
    return ["train", "--config", files / config_name, "--data", files / "code.txt", "--out",
            out, *extra]


def cli(*args):
    """`tritnet ARGS...` run in this process."""
    from cli.main import main   # here: the kernel tests import this module without the CLI
    return CliRunner().invoke(main, [str(a) for a in args])


def child_env():
    """The environment of a child process that runs this checkout's tritnet on the CPU."""
    return dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
                TRITNET_DEVICE="cpu")


def _the_error_line(stderr, match):
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("tritnet: error: "), stderr
    assert re.search(match, lines[0]), lines[0]


def one_error_line(res, code, match):
    """A CliRunner result: exit `code`, exactly one stderr line `tritnet: error: ...` that
    matches `match`, and no traceback."""
    assert res.exit_code == code, res.output
    _the_error_line(res.stderr, match)
    assert "Traceback" not in res.output


def process_error_line(proc, match):
    """A child process's result: exit 1 (a signal would be negative) and exactly one stderr
    line `tritnet: error: ...` that matches `match`."""
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    _the_error_line(proc.stderr, match)


def poison_loss(monkeypatch, call, factor):
    """From now on the `call`-th training-mode CodeMemoryLM.loss (counting from 1) is
    multiplied by `factor` (nan or inf); the others are left alone."""
    from tritnet.models import CodeMemoryLM
    original, calls = CodeMemoryLM.loss, []

    def poisoned(self, tokens, targets):
        loss, ce = original(self, tokens, targets)
        if self.training:
            calls.append(1)
            if len(calls) == call:
                loss = loss * factor
        return loss, ce

    monkeypatch.setattr(CodeMemoryLM, "loss", poisoned)


# --- independent bitplane32 helpers (docs/kernels.md#bitplane32, written out again) ---


def pack(T):
    """Ternary rows (-1/0/+1) to bitplane32 words: plus and minus bits of 32 columns a pair."""
    rows, cols = T.shape
    out = np.zeros((rows, 2 * -(-cols // 32)), dtype=np.uint32)
    for j in range(cols):
        bit = np.uint32(1 << (j % 32))
        out[T[:, j] == 1, 2 * (j // 32)] |= bit
        out[T[:, j] == -1, 2 * (j // 32) + 1] |= bit
    return out
