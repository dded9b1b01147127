"""Each example runs as written, in a short mode, in a fresh interpreter."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_example(name, *args, cwd):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TRITNET_DEVICE="cpu")
    res = subprocess.run([sys.executable, os.path.join(REPO, "examples", name), *map(str, args)],
                         capture_output=True, text=True, cwd=cwd, env=env, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


def test_train_loop(tmp_path):
    out = run_example("train_loop.py", "--steps", 2, "--eval-every", 2, cwd=tmp_path)
    assert "held-out" in out and "bigram" in out
    assert not list(tmp_path.iterdir())   # nothing lands where it is run from
    saved = out.split("saved ")[1].split(" on ")[0]
    assert os.path.isfile(saved) and os.path.basename(saved) == "train_loop.h5"
    os.remove(saved)
    os.rmdir(os.path.dirname(saved))


def test_own_text(tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    for i in range(24):   # >= 20 files: whole files are held out
        (notes / f"note{i:02d}.txt").write_text(f"Note {i}: the quick brown fox. " * 80)
    out = run_example("own_text.py", notes, "--steps", 2, "--out", tmp_path / "run",
                      "--sample", 8, cwd=tmp_path)
    assert "held-out" in out and "--- sample ---" in out
    assert (tmp_path / "run" / "ckpt.h5").exists()


def test_digits(tmp_path):
    pytest.importorskip("sklearn")
    out = run_example("digits.py", "--steps", 3, cwd=tmp_path)
    assert "final held-out accuracy" in out
