"""What a new user meets first: the examples' messages, compile notices, readable JSON, a
resumed run's times, and why the test suite skips what it skips."""

import json
import os
import pty
import re
import subprocess
import sys

import numba
import pytest

from tests.helpers import (REPO, child_env, cli, code_text, small_config, train_args,
                           write_run_files)
from tritnet import backend
from tritnet import rng as trandom
from tritnet.checkpoint import CheckpointError, save_checkpoint
from tritnet.config import Config
from tritnet.models import CodeMemoryLM

pytestmark = pytest.mark.usefixtures("cpu_only")
TINY = small_config(steps=2, eval_every=2, eval_batches=2, save_every=0)
TEXT = code_text(400)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    backend.set_device("cpu")
    trandom.manual_seed(0)
    config = Config(**TINY).validate()
    path = tmp_path_factory.mktemp("ckpt") / "ckpt.h5"
    save_checkpoint(path, CodeMemoryLM(config), config=config.to_dict(),
                    train_state={"step": 0})
    return path


def test_own_text_speaks_in_one_line_and_resumes(tmp_path):
    """own_text.py: a skipped file is one warning line; a folder that holds a run is one
    error line that says how to go on (no traceback); --resume goes on."""
    notes = tmp_path / "notes"
    notes.mkdir()
    for i in range(24):
        (notes / f"note{i:02d}.txt").write_text(f"Note {i}: the quick brown fox. " * 80)
    (notes / "photo.txt").write_bytes(b"\xff\xd8\xff not text")

    def own_text(*args):
        return subprocess.run([sys.executable, os.path.join(REPO, "examples", "own_text.py"),
                               str(notes), "--out", str(tmp_path / "run"), "--sample", "4",
                               *map(str, args)], capture_output=True, text=True,
                              cwd=tmp_path, env=child_env(), timeout=300)

    first = own_text("--steps", 2)
    assert first.returncode == 0, first.stderr
    assert first.stderr.splitlines() == [
        f"own_text.py: warning: load_corpus: skipped 1 file(s) under {notes} that are not "
        "UTF-8 text (first: photo.txt)"]
    again = own_text("--steps", 2)
    assert again.returncode == 1 and "Traceback" not in again.stderr
    assert re.fullmatch(r"(own_text.py: warning: [^\n]*\n)?own_text.py: error: run folder "
                        r".*run already holds a run \(.*\); continue it with --resume, start "
                        r"over with --overwrite .*\n", again.stderr), again.stderr
    resumed = own_text("--steps", 4, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout and "done: step 4" in resumed.stdout
    assert re.search(r"this run \d+s, run total \d+s", resumed.stdout)


def test_a_resumed_runs_last_line_says_both_times(tmp_path):
    write_run_files(tmp_path, TINY, TEXT, config_name="tiny.json")
    args = train_args(tmp_path, tmp_path / "run", config_name="tiny.json")
    res = cli(*args)
    assert res.exit_code == 0, res.output
    assert re.search(r"done: step 2, .*, run time \d+s, checkpoint ", res.stdout), res.stdout
    res = cli(*args, "--resume", "--steps", 4)
    assert res.exit_code == 0, res.output
    last = res.stdout.splitlines()[-1]
    this, total = re.search(r"this run (\d+)s, run total (\d+)s, checkpoint ", last).groups()
    assert int(total) >= int(this)


def test_inspect_json_is_indented_on_a_terminal_and_one_line_in_a_pipe(checkpoint):
    piped = cli("inspect", checkpoint, "--json")
    assert piped.exit_code == 0 and len(piped.stdout.splitlines()) == 1

    master, terminal = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "inspect", str(checkpoint),
                             "--json"], stdout=terminal, stderr=subprocess.DEVNULL, cwd=REPO,
                            env=child_env())
    os.close(terminal)
    chunks = []
    while True:   # read while it writes: a full terminal buffer would block it
        try:
            chunk = os.read(master, 1 << 16)
        except OSError:   # EIO: the child has closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    assert proc.wait(timeout=120) == 0
    os.close(master)
    shown = b"".join(chunks).decode().replace("\r\n", "\n")
    assert len(shown.splitlines()) > 50 and shown.startswith('{\n  "path": ')
    assert json.loads(shown) == json.loads(piped.stdout)


@pytest.mark.parametrize("command, patched", [
    (["eval", "CKPT"], "tritnet.sample.load_model"),
    (["export", "CKPT", "-o", "model.safetensors"], "tritnet.export.export_checkpoint"),
    (["inspect", "CKPT", "--no-verify"], "tritnet.checkpoint.inspect_checkpoint"),
])
def test_commands_say_when_kernels_compile(checkpoint, monkeypatch, command, patched):
    """A kernel made for the test compiles inside the command: the notice comes first, on
    stderr, then the command goes on (here: to an error of the test's making)."""
    @numba.njit
    def fresh(x):
        return x + 1

    def compile_then_fail(*args, **kwargs):
        fresh(1)
        raise CheckpointError("stopped by the test")

    monkeypatch.setattr(patched, compile_then_fail)
    res = cli(*[checkpoint if a == "CKPT" else a for a in command])
    assert res.exit_code == 1, res.output
    assert res.stderr.splitlines() == [backend.COMPILING, "tritnet: error: stopped by the test"]


def test_pytest_says_once_why_tests_were_skipped():
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          os.path.join(REPO, "tests", "kernels", "test_packing.py")],
                         capture_output=True, text=True, cwd=REPO, env=child_env(),
                         timeout=300)
    assert res.returncode == 0, res.stdout[-3000:]
    lines = [line for line in res.stdout.splitlines() if line.startswith("skipped ")]
    assert len(lines) == 1, res.stdout[-3000:]
    total, parts = re.fullmatch(r"skipped (\d+): (.*)", lines[0]).groups()
    kinds = {re.sub(r"^\d+ ", "", p): int(p.split()[0]) for p in parts.split("; ")}
    sim = "run in the CUDA simulator pass instead (tests/test_cudasim.py starts it in a child " \
          "process)"
    assert kinds.pop(sim) > 0, lines[0]
    if not backend.gpu_usable()[0]:
        why = backend.gpu_usable()[1]
        assert kinds.pop(f"need a usable GPU (no usable GPU: {why})") > 0, lines[0]
    assert not kinds, lines[0]   # nothing else skips in this file
    assert f"{total} skipped" in res.stdout.splitlines()[-1]
