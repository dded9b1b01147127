"""`tritnet train / inspect / sample / eval`, and every bad input and fault of the training
product: one clear line on stderr, a non-zero exit, no traceback, no checkpoint lost."""

import builtins
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import zlib

import h5py
import numpy as np
import pytest

from tests.helpers import (REPO, child_env, cli, code_text, one_error_line, poison_loss,
                           small_config, train_args, write_run_files)
from tritnet import backend
from tritnet import data as tdata
from tritnet.checkpoint import load_checkpoint
from tritnet.models import CodeMemoryLM

pytestmark = pytest.mark.usefixtures("cpu_only")
SMALL = small_config(steps=4, eval_every=2, eval_batches=2, save_every=2)
TEXT = code_text(400)


@pytest.fixture
def files(tmp_path):
    """A small config file and a text file to train on."""
    return write_run_files(tmp_path, SMALL, TEXT)


@pytest.fixture
def run(files):
    """A finished small run: its folder holds config.json, metrics.jsonl and ckpt.h5."""
    res = cli(*train_args(files, files / "run"))
    assert res.exit_code == 0, res.output
    return files / "run"


def checkpoints(root):
    """sha256 of every .h5 under root: what no failing command may change or remove."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            if name.endswith(".h5"):
                path = os.path.join(dirpath, name)
                with open(path, "rb") as fh:
                    out[path] = hashlib.sha256(fh.read()).hexdigest()
    return out


def fails(root, args, match, code=1):
    """The command exits `code` with exactly one stderr line `tritnet: error: ...` matching
    `match`, no traceback, and every checkpoint that was under root still there, unchanged."""
    before = checkpoints(root)
    res = cli(*args)
    one_error_line(res, code, match)
    after = checkpoints(root)
    assert {k: after.get(k) for k in before} == before   # new ones may appear (a NaN's save)
    return res.stderr.splitlines()[0]


# --------------------------------------------------------------------------------------------
# The commands.


def test_train_writes_the_run_folder_and_prints_the_baseline(run):
    assert sorted(p.name for p in run.iterdir()) == ["ckpt.h5", "config.json", "metrics.jsonl"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 4 and "val_bpb" in rows[-1] and "bigram_bpb" in rows[-1]
    assert json.loads((run / "config.json").read_text())["d_model"] == 32
    assert load_checkpoint(run / "ckpt.h5").step == 4


def test_train_output(files):
    res = cli(*train_args(files, files / "r", "--steps", "2", "--seed", "3"))
    assert res.exit_code == 0, res.output
    assert "bigram baseline: " in res.stdout
    assert "held-out" in res.stdout and "done: step 2" in res.stdout
    assert res.stderr == ""
    assert json.loads((files / "r" / "config.json").read_text())["seed"] == 3


def test_resume_through_the_cli_is_exact(files):
    straight, split = files / "straight", files / "split"
    # a constant gain: a cosine one is laid over --steps, so a run extended by --resume decays
    # along another curve than one trained straight to its end
    constant = ("--schedule", "constant")
    assert cli(*train_args(files, straight, "--steps", 4, *constant)).exit_code == 0
    assert cli(*train_args(files, split, "--steps", 2, *constant)).exit_code == 0
    # --resume alone continues the run as it was set up (its config.json), to the new --steps.
    res = cli("train", "--data", files / "code.txt", "--out", split, "--resume", "--steps", 4)
    assert res.exit_code == 0, res.output
    assert "resumed from" in res.stdout

    def losses(run):
        return [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl")
                                                      .read_text().splitlines()) if "loss" in r]
    assert losses(split) == losses(straight)


def test_tokens_option(files):
    res = cli(*train_args(files, files / "r", "--tokens", 100, "--eval-every", 0))
    assert res.exit_code == 0, res.output
    assert load_checkpoint(files / "r" / "ckpt.h5").step == 4    # ceil(100 / (2 * 16))


def test_inspect(run):
    res = cli("inspect", run / "ckpt.h5")
    assert res.exit_code == 0, res.output
    assert "step 4" in res.stdout and "T_packed" in res.stdout and "B/trit" in res.stdout
    info = json.loads(cli("inspect", run / "ckpt.h5", "--json").stdout)
    assert info["step"] == 4 and info["config"]["d_model"] == 32
    assert info["tensors"]["embed/T_packed"]["dtype"] == "uint8"


def test_sample(run):
    res = cli("sample", run / "ckpt.h5", "--prompt", "def ", "--tokens", 12, "--seed", 1)
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith("def ") and len(res.stdout.encode()) >= 5
    again = cli("sample", run / "ckpt.h5", "--prompt", "def ", "--tokens", 12, "--seed", 1)
    assert again.stdout == res.stdout
    greedy = cli("sample", run / "ckpt.h5", "--tokens", 5, "--temperature", 0)
    assert greedy.exit_code == 0, greedy.output


def test_sample_streams_stop_and_sampling_options(run):
    """--num-samples N prints N samples, generated as one batch; --stop ends a sample where it
    writes the string (not printed); --top-k, --top-p and --seed shape and repeat sampling."""
    from tritnet.sample import load_model
    res = cli("sample", run / "ckpt.h5", "--prompt", "def ", "--tokens", 8, "--num-samples", 3,
              "--top-p", 0.9, "--seed", 2)
    assert res.exit_code == 0, res.output
    assert [line for line in res.stdout.splitlines() if line.startswith("--- sample")] == \
        [f"--- sample {i} of 3 ---" for i in (1, 2, 3)]
    again = cli("sample", run / "ckpt.h5", "--prompt", "def ", "--tokens", 8, "--num-samples", 3,
                "--top-p", 0.9, "--seed", 2)
    assert again.stdout == res.stdout
    assert cli("sample", run / "ckpt.h5", "--top-k", 0, "--top-p", 1, "--tokens", 4).exit_code == 0
    # greedy text, then the same cut at the first ASCII character it writes
    model, _ = load_model(run / "ckpt.h5")
    greedy = model.generate(b"def ", 12, temperature=0)
    first = next((j for j, t in enumerate(greedy) if 32 <= t < 127), None)
    if first is None:
        pytest.skip("the tiny run writes no ASCII character greedily")
    res = cli("sample", run / "ckpt.h5", "--prompt", "def ", "--tokens", 12, "--temperature", 0,
              "--stop", "\x01", "--stop", chr(greedy[first]))
    assert res.exit_code == 0, res.output
    want = "def " + bytes(greedy[:first]).decode("utf-8", errors="replace")
    assert res.stdout == want + "\n"


@pytest.fixture
def ascii_run(files):
    """A run whose model reads only the 128 ASCII bytes."""
    (files / "ascii.json").write_text(json.dumps(dict(SMALL, vocab_size=128, steps=1)))
    (files / "ascii.bin").write_bytes(TEXT.encode())
    (files / "ascii.bin.json").write_text(json.dumps({"dtype": "uint8", "vocab_size": 128}))
    res = cli("train", "--config", files / "ascii.json", "--data", files / "ascii.bin", "--out",
              files / "ascii")
    assert res.exit_code == 0, res.output
    return files / "ascii"


@pytest.mark.parametrize("args, match", [
    (["--prompt", "x" * 33], r"the prompt has 33 tokens, more than the model's context of 32; "
                             r"give at most its last 32 tokens"),
    (["--prompt", ""], r"the prompt is empty; give at least one token"),
    (["--temperature=-1"], r"temperature = -1.0: expected 0 \(greedy\) or a positive number"),
    (["--temperature", 0, "--top-k", 5], r"temperature 0 decodes greedily .* leave them out"),
    (["--temperature", 0, "--top-p", 0.5], r"temperature 0 decodes greedily"),
    (["--top-p", 0], r"top_p = 0.0: expected a probability in \(0, 1\]"),
    (["--top-p", 1.5], r"top_p = 1.5: expected a probability in \(0, 1\]"),
    (["--top-k=-2"], r"top_k = -2: expected an integer >= 1"),
    (["--stop", ""], r"an empty stop sequence would stop at once"),
])
def test_sample_bad_input_is_one_line(run, files, args, match):
    fails(files, ["sample", run / "ckpt.h5", *args], match)


def test_sample_prompt_outside_the_vocabulary(ascii_run, files):
    fails(files, ["sample", ascii_run / "ckpt.h5", "--prompt", "caf\u00e9"],
          r"the prompt holds token 195, outside the model's vocabulary of 128 tokens \(0 to "
          r"127\)")
    res = cli("sample", ascii_run / "ckpt.h5", "--prompt", "cafe", "--tokens", 4)
    assert res.exit_code == 0, res.output


def test_first_run_says_it_compiles_kernels_and_a_second_run_does_not(run, tmp_path):
    """A fresh Numba cache: `tritnet sample` says on stderr that it compiles kernels, once;
    run again, it loads them from the cache and says nothing."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba"), PYTHONPATH=REPO,
               TRITNET_DEVICE="cpu")
    command = [sys.executable, "-m", "cli.main", "sample", str(run / "ckpt.h5"), "--tokens", "4"]
    first = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    assert first.stderr.splitlines() == [backend.COMPILING]
    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0 and second.stderr == "", second.stderr
    assert second.stdout == first.stdout


def test_train_says_it_compiles_kernels(files, monkeypatch):
    """`tritnet train` says so too, on stdout beside its other lines: here a kernel made
    for the test compiles inside the run."""
    import numba
    import tritnet.train

    @numba.njit
    def fresh(x):
        return x + 1

    monkeypatch.setattr(tritnet.train, "train", lambda *a, **k: fresh(1))
    res = cli(*train_args(files, files / "r"))
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines() == [backend.COMPILING]


def test_eval_matches_the_runs_last_evaluation(run, files):
    res = cli("eval", run / "ckpt.h5", "--data", files / "code.txt")
    assert res.exit_code == 0, res.output
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert f"held-out {last['val_bpb']:.4f} bpb" in res.stdout
    assert f"bigram baseline {last['bigram_bpb']:.4f} bpb" in res.stdout
    assert cli("eval", run / "ckpt.h5", "--data", files / "code.txt", "--batches", 0) \
        .exit_code == 0


# --------------------------------------------------------------------------------------------
# Bad input and faults.


def test_missing_data(run, files):
    fails(files, train_args(files, run, "--resume") + ["--data", files / "nope.txt"],
          r"data path .*nope.txt does not exist")


def test_empty_data(files):
    (files / "empty.txt").write_bytes(b"")
    fails(files, train_args(files, files / "r") + ["--data", files / "empty.txt"],
          r"empty.txt is empty; point --data at a file with text in it")
    (files / "emptydir").mkdir()
    fails(files, train_args(files, files / "r") + ["--data", files / "emptydir"],
          r"no UTF-8 text files found")


def test_unreadable_data(files, monkeypatch):
    path = files / "secret.txt"
    path.write_text(TEXT)
    os.chmod(path, 0)
    if os.geteuid() == 0 or os.access(path, os.R_OK):   # root reads anything: refuse by hand
        real_open = builtins.open

        def guarded(file, *args, **kwargs):
            if os.fspath(file) == str(path):
                raise PermissionError(13, "Permission denied", str(path))
            return real_open(file, *args, **kwargs)
        monkeypatch.setattr(builtins, "open", guarded)
    fails(files, train_args(files, files / "r") + ["--data", path],
          r"cannot read .*secret.txt: Permission denied")


def test_not_utf8_data(files):
    (files / "blob.txt").write_bytes(bytes(range(256)) * 10)
    fails(files, train_args(files, files / "r") + ["--data", files / "blob.txt"],
          r"is not UTF-8 text")


def test_bin_size_not_a_multiple_of_its_dtype(files):
    (files / "tokens.bin").write_bytes(b"\x01\x00\x02\x00\x03")
    fails(files, train_args(files, files / "r") + ["--data", files / "tokens.bin", "--dtype",
                                                   "uint16"],
          r"tokens.bin has 5 bytes, not a multiple of 2 \(uint16 tokens\)")


def test_seq_len_longer_than_the_data(files):
    (files / "short.txt").write_text("x = 1\n" * 60)
    fails(files, train_args(files, files / "r") + ["--data", files / "short.txt", "--seq-len",
                                                   32],
          r"too few for seq_len 32 .*use a smaller --seq-len or more data")


def test_invalid_config_values(files, run):
    fails(files, train_args(files, files / "r", "--batch-size", 0),
          r"config field batch_size = 0 is out of range: expected 1 <= batch_size")
    fails(files, train_args(files, files / "r", "--flip-threshold", 500),
          r"flip_threshold = 500 is out of range")
    (files / "bad.json").write_text(json.dumps({"n_heads": 5}))
    fails(files, ["train", "--config", files / "bad.json", "--out", files / "r"],
          r"config file .*bad.json: config field d_model = 128 must be divisible by n_heads = 5")
    (files / "typo.json").write_text(json.dumps({"d_modle": 64}))
    fails(files, ["train", "--config", files / "typo.json", "--out", files / "r"],
          r"unknown config field\(s\): d_modle")
    fails(files, ["train", "--preset", "huge", "--out", files / "r"], r"unknown preset 'huge'")
    fails(files, train_args(files, run, "--resume", "--seq-len", 64),
          r"seq_len = 64 exceeds context = 32")
    assert not (files / "r").exists()


def test_device_cuda_without_a_gpu(files):
    if backend.gpu_usable()[0]:
        pytest.skip("a GPU is usable here")
    fails(files, train_args(files, files / "r", "--device", "cuda"),
          r"device 'cuda' was asked for but no GPU is usable: .*--device cpu")
    assert not (files / "r").exists()


def test_run_folder_already_holding_a_run(run, files):
    fails(files, train_args(files, run), r"run folder .*run already holds a run \(config.json, "
                                         r"ckpt.h5, metrics.jsonl\); continue it with --resume")
    res = cli(*train_args(files, run, "--resume", "--overwrite"))
    assert res.exit_code == 2 and "give one of them" in res.output
    assert cli(*train_args(files, run, "--steps", 2, "--tokens", 64)).exit_code == 2
    old = checkpoints(run)
    res = cli(*train_args(files, run, "--overwrite", "--steps", 2))
    assert res.exit_code == 0, res.output
    (previous,) = [p for p in run.iterdir() if p.name.startswith("previous-")]
    assert checkpoints(previous) == {str(previous / "ckpt.h5"): old[str(run / "ckpt.h5")]}


def _tamper(path, fn):
    with h5py.File(path, "r+") as f:
        fn(f)


def _replace(f, name, array):
    attrs = dict(f[name].attrs)
    del f[name]
    f[name] = array
    for k, v in attrs.items():
        f[name].attrs[k] = v


def _poke(name, index, value):
    """Set one element, with a forged crc32: the content itself must be refused."""
    def fn(f):
        f[name][index] = value
        f[name].attrs["crc32"] = np.uint32(zlib.crc32(f[name][()].tobytes()))
    return fn


BAD_CHECKPOINTS = {
    "not_hdf5": (lambda p: p.write_text("step,loss\n1,2.0\n"),
                 r"is not an HDF5 file \(first bytes b'step,los'\)"),
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
                  r"is truncated or corrupted .*use an earlier checkpoint"),
    "newer_format": (lambda p: _tamper(p, lambda f: f.attrs.__setitem__("format_version", 3)),
                     r"written by a newer tritnet\? format 3 > 2 .*upgrade tritnet"),
    "tampered_dtype": (lambda p: _tamper(p, lambda f: _replace(
        f, "embed/T_packed", f["embed/T_packed"][()].astype(np.float32))),
        r"dataset `embed/T_packed` has dtype float32, expected uint8"),
    "tampered_shape": (lambda p: _tamper(p, lambda f: _replace(
        f, "blocks/0/attn/q/T_accum", np.zeros((32, 31), np.int8))),
        r"`blocks/0/attn/q/T_accum` has shape \(32, 31\), expected \(32, 32\)"),
    "trit_code_out_of_range": (lambda p: _tamper(p, _poke("embed/T_packed", (5, 2), 250)),
                               r"`embed/T_packed`: byte \[5, 2\] = 250 is not a trit code"),
}


@pytest.mark.parametrize("kind", sorted(BAD_CHECKPOINTS))
def test_bad_checkpoints(run, files, kind):
    damage, match = BAD_CHECKPOINTS[kind]
    damage(run / "ckpt.h5")
    fails(files, train_args(files, run, "--resume", "--steps", 6), match)
    fails(files, ["eval", run / "ckpt.h5", "--data", files / "code.txt"], match)
    fails(files, ["sample", run / "ckpt.h5", "--tokens", 3], match)
    fails(files, ["inspect", run / "ckpt.h5"], match)
    assert [p.name for p in run.iterdir() if p.name.endswith(".h5")] == ["ckpt.h5"]


def test_missing_checkpoint(files):
    fails(files, ["inspect", files / "nope.h5"], r"checkpoint .*nope.h5 does not exist")
    fails(files, train_args(files, files / "r", "--resume"), r"nothing to resume")


def test_nan_loss_stops_with_the_last_good_step(files, monkeypatch):
    poison_loss(monkeypatch, call=3, factor=float("inf"))
    fails(files, train_args(files, files / "r", "--save-every", 0),
          r"step 3: the loss is (inf|nan); stopped and saved the last good step \(2\)")
    assert load_checkpoint(files / "r" / "ckpt.h5").step == 2


def test_debug_shows_the_traceback(files):
    res = cli(*train_args(files, files / "r", "--debug") + ["--data", files / "nope.txt"])
    assert res.exit_code != 0
    assert isinstance(res.exception, tdata.DataError)


def training_child(files, out, stdout):
    """A `tritnet train` process on `out` (many steps, a checkpoint every step), returned once
    its first checkpoint exists."""
    env = child_env()
    child = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "train", "--config", str(files / "small.json"),
         "--data", str(files / "code.txt"), "--out", str(out), "--steps", "100000",
         "--save-every", "1", "--eval-every", "0"],
        stdout=stdout, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while not (out / "ckpt.h5").exists() and time.monotonic() < deadline \
            and child.poll() is None:
        time.sleep(0.05)
    if not (out / "ckpt.h5").exists():
        child.kill()
        raise AssertionError(child.communicate(timeout=30))
    return child


def test_ctrl_c_saves_a_checkpoint_and_exits_130(files):
    """SIGINT to a real `tritnet train` after its first checkpoint: exit 130, a checkpoint of
    a whole step that loads, and metrics up to that step."""
    out = files / "run"
    child = training_child(files, out, subprocess.PIPE)
    try:
        child.send_signal(signal.SIGINT)
        stdout, stderr = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
    assert child.returncode == 130, stderr
    assert "Traceback" not in stderr and "interrupted at step" in stdout
    assert stderr.strip().splitlines()[-1] == "tritnet: interrupted"
    config = json.loads((out / "config.json").read_text())
    from tritnet.config import Config
    model = CodeMemoryLM(Config().override(**config))
    ckpt = load_checkpoint(out / "ckpt.h5", model)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert ckpt.step >= 1 and rows[-1]["step"] == ckpt.step


def test_eval_at_another_window_length(run, files):
    config = json.loads((run / "config.json").read_text())
    res = cli("eval", run / "ckpt.h5", "--data", files / "code.txt", "--seq-len", 8)
    assert res.exit_code == 0, res.output
    windows = config["batch_size"] * config["eval_batches"]
    assert f"on {windows * 8:,} tokens" in res.stdout
    fails(files, ["eval", run / "ckpt.h5", "--data", files / "code.txt", "--seq-len",
                  config["context"] + 1],
          rf"--seq-len {config['context'] + 1} exceeds the model's context = "
          rf"{config['context']}; score windows of at most")


def test_schedule_clip_and_recompute_flags_reach_the_run_config(files):
    out = files / "flags"
    res = cli(*train_args(files, out, "--schedule", "cosine", "--final-grad-rms-units", 2,
                          "--recompute", "--grad-clip-units", 24, "--no-cuda-graph"))
    assert res.exit_code == 0, res.output
    config = json.loads((out / "config.json").read_text())
    assert (config["schedule"], config["final_grad_rms_units"], config["recompute"],
            config["grad_clip_units"], config["cuda_graph"]) == ("cosine", 2.0, True, 24, False)
    fails(files, train_args(files, files / "bad", "--final-grad-rms-units", 9),
          r"config field final_grad_rms_units = 9.0 exceeds grad_rms_units = 8")
    fails(files, train_args(files, files / "bad", "--grad-clip-units", 200),
          r"config field grad_clip_units = 200 is out of range: expected 0 <= grad_clip_units "
          r"<= 127")


# --------------------------------------------------------------------------------------------
# Run folders: one run at a time, the data recognised by what was read, eval on the run's data.


def test_a_run_folder_in_use_is_refused_and_a_dead_runs_lock_does_not_block(files):
    out = files / "run"
    child = training_child(files, out, subprocess.DEVNULL)
    try:
        fails(files, train_args(files, out, "--resume"),
              rf"run folder {out} is in use by another run \(pid {child.pid}\); wait for it to "
              r"end, or choose another --out")
        fails(files, train_args(files, out, "--overwrite"), r"is in use by another run")
        child.kill()   # SIGKILL: its lock file stays behind, unlocked
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
        child.communicate()
    assert (out / ".lock").exists()
    step = load_checkpoint(out / "ckpt.h5").step
    res = cli(*train_args(files, out, "--resume", "--steps", step + 1))
    assert res.exit_code == 0, res.output
    assert not (out / ".lock").exists()


def test_resume_recognises_the_data_by_its_contents(run, files, monkeypatch):
    elsewhere = files / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "renamed.txt").write_text(TEXT)
    monkeypatch.chdir(files)
    res = cli("train", "--out", "run", "--resume", "--steps", 5, "--data", "./code.txt")
    assert res.exit_code == 0, res.output
    res = cli("train", "--out", run, "--resume", "--steps", 6, "--data",
              elsewhere / "renamed.txt")
    assert res.exit_code == 0, res.output
    (elsewhere / "edited.txt").write_text(TEXT.replace("return", "retrun", 1))
    fails(files, ["train", "--out", run, "--resume", "--steps", 8, "--data",
                  elsewhere / "edited.txt"],
          rf"resume: .*ckpt.h5 was trained on other data \({elsewhere}/renamed.txt: 12,\d+ \+ "
          r"\d+ tokens, "
          r"sha256 [0-9a-f]{12}\.\.\.\); pass the run's --data")


def test_eval_scores_the_runs_data_or_says_how(run, files):
    fails(files, ["eval", run / "ckpt.h5"],
          rf"ckpt.h5 was trained on {files}/code.txt, not on the default corpus; score its "
          r"own held-out split with --data")
    (files / "other.txt").write_text(TEXT.upper())
    res = cli("eval", run / "ckpt.h5", "--data", files / "other.txt")
    assert res.exit_code == 0, res.output
    assert f"of {files}/other.txt (not its training data, {files}/code.txt)" in res.stdout
    res = cli("eval", run / "ckpt.h5", "--data", files / "code.txt")
    assert res.exit_code == 0 and "not its training data" not in res.stdout, res.output


def test_eval_refuses_tokens_above_the_vocabulary(run, files):
    (files / "tokens.bin").write_bytes(np.arange(2000, dtype=np.uint16).tobytes())
    fails(files, ["eval", run / "ckpt.h5", "--data", files / "tokens.bin", "--dtype",
                  "uint16"],
          r"tokens.bin has vocabulary 2000, the model 256: it cannot score tokens >= 256")


def test_extending_a_finished_run_evaluates_its_new_last_step(files):
    out = files / "run"
    assert cli(*train_args(files, out, "--eval-every", 0, "--steps", 2)).exit_code == 0
    old = load_checkpoint(out / "ckpt.h5").metrics["val_bpb"]
    res = cli(*train_args(files, out, "--resume", "--eval-every", 0, "--steps", 4))
    assert res.exit_code == 0, res.output
    new = load_checkpoint(out / "ckpt.h5").metrics["val_bpb"]
    assert new != old and f"done: step 4, held-out {new:.4f} bpb" in res.stdout
    score = cli("eval", out / "ckpt.h5", "--data", files / "code.txt")
    assert f"held-out {new:.4f} bpb" in score.stdout, score.output


# --------------------------------------------------------------------------------------------
# Inputs that are not what they should be, and the one rule for errors.


def test_data_that_is_not_a_regular_file(run, files):
    os.mkfifo(files / "pipe")   # reading it would wait for a writer forever
    fails(files, train_args(files, files / "r") + ["--data", files / "pipe"],
          r"data path .*pipe is not a regular file \(a FIFO, socket or device\)")
    fails(files, ["eval", run / "ckpt.h5", "--data", files / "pipe"], r"is not a regular file")
    fails(files, ["eval", run / "ckpt.h5", "--data", "/dev/zero"], r"is not a regular file")


def test_config_files_of_the_wrong_types_or_encoding(files):
    (files / "list.json").write_text(json.dumps({"preset": [1]}))
    fails(files, ["train", "--config", files / "list.json", "--out", files / "r"],
          r"config file .*list.json: unknown preset \[1\]: expected one of tiny, small")
    (files / "latin1.toml").write_bytes("# réglages\nsteps = 3\n".encode("latin-1"))
    fails(files, ["train", "--config", files / "latin1.toml", "--out", files / "r"],
          r"config file .*latin1.toml is not UTF-8 text \(byte 3 is 0xe9\); save it as UTF-8")
    (files / "types.toml").write_text('steps = "many"\n')
    fails(files, ["train", "--config", files / "types.toml", "--out", files / "r"],
          r"config file .*types.toml: config field steps = 'many': expected int")
    os.mkfifo(files / "config.json")
    fails(files, ["train", "--config", files / "config.json", "--out", files / "r"],
          r"config file .*config.json is not a regular file")
    fails(files, ["trace", "--config", files / "list.json"], r"unknown preset \[1\]")
    assert not (files / "r").exists()


@pytest.mark.parametrize("args, match", [
    (["train", "--bogus"], r"No such option '--bogus'.* \(see `\S+ train --help`\)"),
    (["train", "--steps", "many"], r"Invalid value for '--steps': 'many' is not a valid "
                                   r"integer"),
    (["train", "--steps", 2, "--tokens", 64], r"give --steps or --tokens, not both"),
    (["train", "--resume", "--overwrite"], r"give one of them"),
    (["eval"], r"Missing argument 'CHECKPOINT'"),
    (["sample", "x.h5", "--tokens", "many"], r"Invalid value for '--tokens'"),
    (["bogus"], r"No such command 'bogus'"),
])
def test_usage_errors_are_one_line_and_exit_2(files, args, match):
    fails(files, args, match, code=2)


def test_help_and_version_still_exit_0():
    assert cli("--help").exit_code == 0 and "inspect" in cli("--help").stdout
    assert cli("train", "--help").exit_code == 0
    assert cli("--version").exit_code == 0


def _as_format_1(path):
    """What format 1 wrote: no root crc32, no valid_range, a data_id without a hash."""
    with h5py.File(path, "r+") as f:
        del f.attrs["crc32"]
        f.attrs["format_version"] = np.int64(1)
        state = json.loads(f.attrs["train_state"])
        del state["data_id"]["sha256"]
        f.attrs["train_state"] = json.dumps(state)

        def strip(name, obj):
            if "valid_range" in obj.attrs:
                del obj.attrs["valid_range"]
        f.visititems(strip)


def test_a_format_1_checkpoint_is_refused_and_upgraded(run, files):
    original = load_checkpoint(run / "ckpt.h5")
    _as_format_1(run / "ckpt.h5")
    before = checkpoints(files)
    fails(files, ["sample", run / "ckpt.h5"],
          rf"has format 1, whose root attributes .* carry no checksum.*convert it once with "
          rf"`tritnet upgrade {run}/ckpt.h5`")
    res = cli("upgrade", run / "ckpt.h5")
    assert res.exit_code == 0, res.output
    assert f"wrote {run}/ckpt.v2.h5 (format 2)" in res.stdout and "data identity" in res.stdout
    assert checkpoints(files).items() >= before.items()   # the original is unchanged
    copy = load_checkpoint(run / "ckpt.v2.h5")
    assert copy.format_version == 2 and copy.step == original.step
    assert copy.config == original.config and copy.metrics == original.metrics
    for k in original.arrays:
        np.testing.assert_array_equal(copy.arrays[k], original.arrays[k], err_msg=k)
    assert {k: v for k, v in copy.train_state.items() if k != "data_id"} == \
        {k: v for k, v in original.train_state.items() if k != "data_id"}
    fails(files, ["upgrade", run / "ckpt.h5"], r"ckpt.v2.h5 exists; give the copy another path")
    fails(files, ["upgrade", run / "ckpt.v2.h5", "--out", files / "x.h5"],
          r"has format 2, not 1: there is nothing to upgrade")
    os.replace(run / "ckpt.v2.h5", run / "ckpt.h5")   # the run goes on from the copy
    res = cli(*train_args(files, run, "--resume", "--steps", 6))
    assert res.exit_code == 0, res.output


def test_upgrade_checks_what_format_1_holds(run, files):
    _as_format_1(run / "ckpt.h5")
    with h5py.File(run / "ckpt.h5", "r+") as f:
        edges = f["blocks/0/moe/graph/edge_index"]
        edges[1, 0] = 5000
        edges.attrs["crc32"] = np.uint32(zlib.crc32(edges[()].tobytes()))
    fails(files, ["upgrade", run / "ckpt.h5"], r"edge_index` holds 5000, outside its range")
    assert not (run / "ckpt.v2.h5").exists()
