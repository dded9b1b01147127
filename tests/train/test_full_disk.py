"""A full or read-only disk: a failed write prints one `tritnet: error:` line naming the path
and the cause, exits 1, removes what it had started, and leaves the checkpoint and the
metrics as they were.

Real full disks are small tmpfs mounts (skipped where this process may not mount one); the
commands run in a subprocess, so a crash would show as a signal. Other cases inject ENOSPC.
"""

import errno
import hashlib
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import (child_env, cli, code_text, process_error_line, small_config,
                           train_args, write_run_files)
from tritnet import checkpoint as ck
from tritnet import train as ttrain
from tritnet.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from tritnet.nn.tables import TernaryEmbeddingTable

pytestmark = pytest.mark.usefixtures("cpu_only")
# ngram_rows=1024: the n-gram table must fit the 4 MB disks below
SMALL = small_config(steps=2, eval_every=0, eval_batches=1, save_every=2, ngram_rows=1024)
TEXT = code_text(300)
ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture
def files(tmp_path):
    return write_run_files(tmp_path, SMALL, TEXT)


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size) -> a fresh tmpfs of `size` bytes; unmounted after the test."""
    mounted = []

    def mount(size):
        where = tmp_path / f"fs{len(mounted)}"
        where.mkdir()
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                              str(where)], capture_output=True, text=True)
        if res.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip() or res.returncode}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill(where, leave):
    """Take all but `leave` bytes of the filesystem at `where`."""
    st = os.statvfs(where)
    size = max(0, st.f_bavail * st.f_frsize - leave)
    with open(where / "filler", "wb") as fh:
        try:
            fh.write(b"\0" * size)
        except OSError:
            pass


def tritnet(*args):
    """`tritnet ARGS...` in a child process: a crash shows as a signal."""
    return subprocess.run([sys.executable, "-m", "cli.main", *map(str, args)],
                          capture_output=True, text=True, env=child_env(), timeout=300)


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def whole_rows(path):
    text = path.read_text()
    assert text == "" or text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def no_temporaries(run):
    return [p.name for p in run.iterdir() if ".tmp" in p.name or p.name == ".lock"] == []


# --------------------------------------------------------------------------------------------
# Real full and read-only disks.


def test_a_save_on_a_full_disk_keeps_the_previous_checkpoint(files, tmpfs):
    fs = tmpfs(4 << 20)
    run = fs / "run"
    res = tritnet(*train_args(files, run))
    assert res.returncode == 0, res.stderr
    ckpt, rows = sha(run / "ckpt.h5"), whole_rows(run / "metrics.jsonl")
    fill(fs, 64 << 10)   # room for metrics rows, not for another checkpoint
    res = tritnet(*train_args(files, run, "--resume", "--steps", 4))
    process_error_line(res, rf"save_checkpoint: cannot write {run}/ckpt.h5 \(No space left on "
                        r"device\); the previous checkpoint there, if any, is untouched")
    assert sha(run / "ckpt.h5") == ckpt and no_temporaries(run)
    assert whole_rows(run / "metrics.jsonl")[:len(rows)] == rows
    os.unlink(fs / "filler")
    res = tritnet(*train_args(files, run, "--resume", "--steps", 4))
    assert res.returncode == 0, res.stderr
    assert load_checkpoint(run / "ckpt.h5").step == 4
    assert [r["step"] for r in whole_rows(run / "metrics.jsonl")] == [1, 2, 3, 4]


def test_a_run_without_checkpoints_stops_cleanly_when_metrics_fill_the_disk(files, tmpfs):
    fs = tmpfs(1 << 20)
    fill(fs, 12 << 10)   # three pages: the lock, config.json, a few metrics rows
    run = fs / "run"
    res = tritnet(*train_args(files, run, "--steps", 200, "--save-every", 0))
    process_error_line(res, rf"cannot write {run}/metrics.jsonl \(No space left on device\): the "
                        r"run stopped at step \d+, and it had saved no checkpoint yet")
    rows = whole_rows(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1)) and rows
    assert no_temporaries(run) and not (run / "ckpt.h5").exists()


def test_resume_that_must_trim_metrics_on_a_full_then_read_only_disk(files, tmpfs):
    fs = tmpfs(4 << 20)
    run = fs / "run"
    assert tritnet(*train_args(files, run)).returncode == 0
    with open(run / "metrics.jsonl", "a") as fh:   # rows of steps a kill lost, half a line
        fh.write('{"step": 3, "loss": 9.0}\n{"step": 4, "lo')
    ckpt, metrics = sha(run / "ckpt.h5"), sha(run / "metrics.jsonl")
    fill(fs, 0)
    res = tritnet(*train_args(files, run, "--resume", "--steps", 4))
    process_error_line(res, rf"resume: cannot rewrite {run}/metrics.jsonl without the rows after "
                        r"the checkpoint's step 2 \(No space left on device\); it is as it was")
    assert sha(run / "ckpt.h5") == ckpt and sha(run / "metrics.jsonl") == metrics
    assert no_temporaries(run)
    os.unlink(fs / "filler")
    subprocess.run(["mount", "-o", "remount,ro", str(fs)], check=True)
    res = tritnet(*train_args(files, run, "--resume", "--steps", 4))
    process_error_line(res, rf"cannot lock the run folder {run} \(Read-only file system\)")
    assert sha(run / "ckpt.h5") == ckpt and sha(run / "metrics.jsonl") == metrics


# --------------------------------------------------------------------------------------------
# ENOSPC injected where a real disk would give it.


def test_a_failed_reservation_fails_the_save_before_hdf5_writes(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.h5"
    table = TernaryEmbeddingTable(100, 20)
    save_checkpoint(path, table, config={}, train_state={"step": 1})
    before = sha(path)

    def full(fd, offset, length):
        raise ENOSPC
    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(CheckpointError, match=rf"save_checkpoint: cannot write {path} \(No "
                                              r"space left on device\); the previous "
                                              r"checkpoint there, if any, is untouched"):
        save_checkpoint(path, table, config={}, train_state={"step": 2})
    assert sha(path) == before and os.listdir(tmp_path) == ["ckpt.h5"]


def test_the_reservation_covers_the_file(tmp_path, monkeypatch):
    """A save never writes past what it reserved (which would meet a full disk inside HDF5):
    compressed or not, on random and on constant state."""
    calls = []
    original = ck._reserve
    monkeypatch.setattr(ck, "_reserve", lambda fd, offset, length: (
        calls.append((offset, length)), original(fd, offset, length)))
    table = TernaryEmbeddingTable(3000, 40)
    rng = np.random.default_rng(0)
    for compression in (None, "gzip"):
        for fill_value in (None, 5):
            table.T_accum[...] = rng.integers(-128, 128, table.T_accum.shape) \
                if fill_value is None else fill_value
            calls.clear()
            save_checkpoint(tmp_path / "c.h5", table, config={}, train_state={"step": 1},
                            compression=compression)
            assert len(calls) == 1 and calls[0][0] == 0
            assert os.path.getsize(tmp_path / "c.h5") < calls[0][1]


def test_metrics_row_on_a_full_disk(files, monkeypatch):
    """A row that cannot be written whole is not written at all: the file ends with the last
    whole row, and the run stops with one line."""
    real_open = open

    class HalfWrites:
        def __init__(self, fh):
            self.fh = fh

        def write(self, data):
            self.fh.write(data[: len(data) // 2])
            raise ENOSPC

        def __getattr__(self, name):
            return getattr(self.fh, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

    def opener(path, mode="r", *args, **kwargs):
        fh = real_open(path, mode, *args, **kwargs)
        if str(path).endswith("metrics.jsonl") and "a" in mode and opener.rows == 3:
            return HalfWrites(fh)
        opener.rows += str(path).endswith("metrics.jsonl") and "a" in mode
        return fh
    opener.rows = 0
    monkeypatch.setattr(ttrain, "open", opener, raising=False)
    run = files / "run"
    res = cli(*train_args(files, run, "--steps", 6))
    assert res.exit_code == 1 and len(res.stderr.splitlines()) == 1, res.output
    assert re.search(rf"tritnet: error: cannot write {run}/metrics.jsonl \(No space left on "
                     rf"device\): the run stopped at step 4, and the steps since its last "
                     rf"checkpoint \({run}/ckpt.h5\) are lost", res.stderr), res.stderr
    assert [r["step"] for r in whole_rows(run / "metrics.jsonl")] == [1, 2, 3]
    assert load_checkpoint(run / "ckpt.h5").step == 2 and no_temporaries(run)


def test_trimming_metrics_on_a_full_disk(files, monkeypatch):
    run = files / "run"
    assert cli(*train_args(files, run)).exit_code == 0
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 3, "loss": 9.0}\n')
    before = sha(run / "metrics.jsonl")
    real_open = open

    def opener(path, mode="r", *args, **kwargs):
        fh = real_open(path, mode, *args, **kwargs)
        if str(path).endswith(".tmp") and "w" in mode:
            fh.close()   # created, as a full disk does, then refused
            raise ENOSPC
        return fh
    monkeypatch.setattr(ttrain, "open", opener, raising=False)
    res = cli(*train_args(files, run, "--resume", "--steps", 4))
    assert res.exit_code == 1 and len(res.stderr.splitlines()) == 1, res.output
    assert "cannot rewrite" in res.stderr and "(No space left on device)" in res.stderr
    assert sha(run / "metrics.jsonl") == before and no_temporaries(run)
