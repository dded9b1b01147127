"""HDF5 checkpoints: exact round trips, the on-disk layout, atomic saves, and every bad file."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import zlib

import h5py
import numpy as np
import pytest

import tritnet
from tritnet import backend
from tritnet import checkpoint as ck
from tritnet import data
from tritnet import rng as trandom
from tritnet.checkpoint import (Checkpoint, CheckpointError, inspect_checkpoint, load_checkpoint,
                                render_inspection, save_checkpoint)
from tritnet.nn import Module, Sequential, TernaryLinear
from tritnet.nn.tables import TernaryEmbeddingTable, TernaryVQCodebook
from tritnet.optim import TritFlip
from tritnet_kernels import packing

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class TinyLM(Module):
    """Every stateful module kind a checkpoint meets: an embedding table, a Sequential of
    TernaryLinear (widths not multiples of 5 or 32), and a VQ codebook with int16 usage."""

    def __init__(self, device=None, vocab=64):
        super().__init__()
        self.emb = TernaryEmbeddingTable(vocab, 37, device=device)
        self.blocks = Sequential([TernaryLinear(37, 33, device=device),
                                  TernaryLinear(33, 64, device=device)])
        self.vq = TernaryVQCodebook(24, 64, restart_every=2, device=device)

    def forward(self, tokens):
        h = self.blocks(self.emb(tokens))
        out = self.vq(h)
        return (out.quantized * out.quantized).mean() + out.loss


def scramble(model, seed):
    """Fill the integer state with arbitrary values so a round trip has something to keep."""
    rng = np.random.default_rng(seed)
    for name, a in model.state_dict().items():
        if name.endswith("T_packed"):
            continue
        info = np.iinfo(a.dtype)
        lo = 0 if name.endswith("usage") else info.min
        a[...] = backend.to_device(rng.integers(lo, info.max, size=a.shape, endpoint=True,
                                                dtype=a.dtype), backend.array_device(a))


def state(model):
    return {k: backend.to_numpy(v).copy() for k, v in model.state_dict().items()}


def assert_same_state(a, b):
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def sha(path):
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


DATA_RNG = np.random.default_rng(0).bit_generator.state


@pytest.fixture(autouse=True)
def _seed():
    trandom.manual_seed(1234)


@pytest.fixture
def saved(tmp_path):
    """(path, model, optimizer) of a checkpoint with scrambled state."""
    model = TinyLM()
    scramble(model, 0)
    opt = TritFlip(model, seed=5, flip_threshold=33)
    opt.step_count = 7
    path = tmp_path / "run" / "ckpt.h5"
    save_checkpoint(path, model, optimizer=opt, config={"preset": "tiny", "d": 37},
                    train_state={"step": 7, "data": {"rng": DATA_RNG, "batches_drawn": 7}},
                    metrics_summary={"val_bpb": 3.25})
    return path, model, opt


# --------------------------------------------------------------------------------------------
# Round trips.


def test_round_trip_is_bit_exact(device, tmp_path):
    model = TinyLM(device=device)
    scramble(model, 1)
    model.vq.steps_since_restart, model.vq.steps_since_index = 1, 5
    opt = TritFlip(model, seed=9)
    opt.step_count = 41
    data_rng = np.random.default_rng(3)
    data_rng.integers(0, 10, 17)
    train_state = {"step": 41, "data": {"rng": data_rng.bit_generator.state, "batches_drawn": 41},
                   "note": np.int64(5)}
    rng_before = trandom.get_state()
    path = tmp_path / "ckpt.h5"
    save_checkpoint(path, model, optimizer=opt, config={"preset": "tiny", "lr": [1, 2]},
                    train_state=train_state, metrics_summary={"loss": 1.5})

    trandom.manual_seed(999)   # a fresh run: different initial weights and generator state
    fresh = TinyLM(device=device)
    fresh_opt = TritFlip(fresh, seed=9)
    ckpt = load_checkpoint(path, fresh, fresh_opt, restore_rng=True)

    assert_same_state(state(model), state(fresh))
    for k, v in fresh.state_dict().items():
        assert backend.array_device(v) == device, k
    assert fresh_opt.step_count == 41
    assert (fresh.vq.steps_since_restart, fresh.vq.steps_since_index) == (1, 5)
    assert trandom.get_state() == rng_before
    assert isinstance(ckpt, Checkpoint) and ckpt.step == 41
    assert ckpt.config == {"preset": "tiny", "lr": [1, 2]}
    assert ckpt.metrics == {"loss": 1.5}
    assert ckpt.train_state["note"] == 5
    assert ckpt.train_state["optimizer"] == opt.state_dict()
    restored = np.random.default_rng(0)
    restored.bit_generator.state = ckpt.train_state["data"]["rng"]
    np.testing.assert_array_equal(restored.integers(0, 2**40, 8), data_rng.integers(0, 2**40, 8))
    assert ckpt.arrays["blocks.0.T_packed"].dtype == np.uint32


def test_load_without_model_returns_memory_form(saved):
    path, model, _ = saved
    ckpt = load_checkpoint(path)
    assert_same_state(state(model), dict(ckpt.arrays))
    assert ckpt.format_version == 2 and ckpt.tritnet_version == tritnet.__version__


def _train(model, opt, batches, steps):
    losses = []
    for _ in range(steps):
        x, _ = batches.get()
        loss = model(x)
        loss.backward()
        opt.step()
        losses.append(float(loss.numpy()))
    return losses


def test_interrupted_and_resumed_training_is_bit_exact(tmp_path):
    """Resume = load model + optimizer + tritnet RNG + data position: the losses and the final
    state equal those of an uninterrupted run (dead-code restarts included: restart_every=2)."""
    corpus = data.Corpus(np.arange(4000, dtype=np.uint8) * 7 % 64, np.arange(500, dtype=np.uint8),
                         64, "synthetic")

    def run(steps, resume_from=None, save_to=None):
        trandom.manual_seed(77 if resume_from is None else 5)
        model = TinyLM()
        opt = TritFlip(model, seed=3)
        batches = data.Batches(corpus, 4, 8, seed=11)
        if resume_from is not None:
            ckpt = load_checkpoint(resume_from, model, opt, restore_rng=True)
            batches.load_state_dict(ckpt.train_state["data"])
        losses = _train(model, opt, batches, steps)
        if save_to is not None:
            save_checkpoint(save_to, model, optimizer=opt, config={},
                            train_state={"step": opt.step_count, "data": batches.state_dict()})
        return losses, state(model)

    full_losses, full_state = run(6)
    first, _ = run(3, save_to=tmp_path / "mid.h5")
    second, resumed_state = run(3, resume_from=tmp_path / "mid.h5")
    assert first + second == full_losses
    assert_same_state(full_state, resumed_state)


def test_gzip_round_trip_is_smaller_and_exact(tmp_path):
    model = TinyLM(vocab=4000)   # large enough to be compressed (>= 64 KB datasets)
    save_checkpoint(tmp_path / "plain.h5", model, config={}, train_state={})
    save_checkpoint(tmp_path / "gz.h5", model, config={}, train_state={}, compression="gzip")
    assert os.path.getsize(tmp_path / "gz.h5") < os.path.getsize(tmp_path / "plain.h5")
    assert_same_state(state(model), dict(load_checkpoint(tmp_path / "gz.h5").arrays))
    with pytest.raises(CheckpointError, match="compression must be None or 'gzip'"):
        save_checkpoint(tmp_path / "x.h5", model, config={}, train_state={}, compression="lz4")


# --------------------------------------------------------------------------------------------
# What is on disk, readable without tritnet.


def test_layout_mirrors_the_module_tree(saved):
    path, model, _ = saved
    with h5py.File(path, "r") as f:
        assert f.attrs["format"] == "tritnet-checkpoint"
        assert f.attrs["format_version"] == 2
        assert f.attrs["tritnet_version"] == tritnet.__version__
        assert "base3-5" in f.attrs["packing_scheme"] and "bitplane32" in f.attrs["packing_scheme"]
        assert f.attrs["scale_function"] == "s = 2 ** (E / 8), E int8 per row"
        assert json.loads(f.attrs["config"]) == {"preset": "tiny", "d": 37}
        ts = json.loads(f.attrs["train_state"])
        assert ts["step"] == 7 and ts["optimizer"]["step"] == 7 and "tritnet_rng" in ts
        assert json.loads(f.attrs["metrics"]) == {"val_bpb": 3.25}
        assert f["blocks"].attrs["module"] == "Sequential"
        assert f["blocks/1"].attrs["module"] == "TernaryLinear"
        q = f["blocks/1/T_packed"]
        assert q.dtype == np.uint8 and q.shape == (64, 7)   # ceil(33 / 5) bytes per row
        assert q.attrs["packing"] == "base3-5" and (q.attrs["rows"], q.attrs["cols"]) == (64, 33)
        assert f["blocks/1/E"].dtype == np.int8 and f["blocks/1/T_accum"].shape == (64, 33)
        assert f["vq/usage"].dtype == np.int16
        names = []
        f.visit(names.append)
    expected = {k.replace(".", "/") for k in model.state_dict()}
    assert expected <= set(names)


PLAIN_READER = textwrap.dedent("""
    import json, sys
    import h5py, numpy as np
    path, cols_of = sys.argv[1], json.loads(sys.argv[2])
    out = {}
    with h5py.File(path, "r") as f:
        out["config"] = json.loads(f.attrs["config"])
        out["step"] = json.loads(f.attrs["train_state"])["step"]
        for name, cols in cols_of.items():
            ds = f[name]
            assert ds.attrs["packing"] == "base3-5"
            digits = (ds[()].astype(np.int64)[:, :, None] // 3 ** np.arange(5)) % 3
            out[name] = (digits.reshape(ds.shape[0], -1)[:, :cols] - 1).tolist()
    assert not any(m.startswith("tritnet") for m in sys.modules), "tritnet was imported"
    print(json.dumps(out))
""")


def test_readable_with_plain_h5py_without_tritnet(saved):
    path, model, _ = saved
    cols = {"emb/T_packed": 37, "blocks/0/T_packed": 37, "blocks/1/T_packed": 33,
            "vq/T_packed": 64}
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-c", PLAIN_READER, str(path), json.dumps(cols)],
                         capture_output=True, text=True, cwd="/", env=env, timeout=60)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["config"]["preset"] == "tiny" and out["step"] == 7
    np.testing.assert_array_equal(out["emb/T_packed"], model.emb.trits())
    np.testing.assert_array_equal(out["blocks/1/T_packed"], model.blocks[1].trits())
    np.testing.assert_array_equal(out["vq/T_packed"], model.vq.trits())


def test_h5ls_lists_the_tree(saved):
    if shutil.which("h5ls") is None:
        pytest.skip("h5ls (hdf5-tools) is not installed")
    path, _, _ = saved
    out = subprocess.run(["h5ls", "-r", str(path)], capture_output=True, text=True,
                         timeout=60).stdout
    assert "/blocks/1/T_packed" in out and "Dataset {64, 7}" in out and "/vq/usage" in out


def test_inspect_reports_trits_bytes_and_histogram(saved):
    path, model, _ = saved
    info = inspect_checkpoint(path)
    assert info["step"] == 7 and info["config"]["preset"] == "tiny"
    assert info["metrics"] == {"val_bpb": 3.25}
    assert info["modules"]["blocks/1"] == "TernaryLinear"
    t = info["tensors"]["blocks/1/T_packed"]
    trits = model.blocks[1].trits()
    assert t["logical_trits"] == trits.size == 64 * 33
    assert t["shape"] == [64, 7] and t["dtype"] == "uint8"
    assert t["bytes_on_disk"] == 64 * 7
    assert t["bytes_per_trit"] == pytest.approx(7 / 33)
    for value, key in ((-1, "-1"), (0, "0"), (1, "+1")):
        assert t["trit_shares"][key] == pytest.approx((trits == value).mean())
    assert t["invalid_codes"] == 0
    assert info["tensors"]["blocks/1/E"]["dtype"] == "int8"
    assert "logical_trits" not in info["tensors"]["blocks/1/T_accum"]
    total = sum(m.trits().size for m in (model.emb, model.blocks[0], model.blocks[1], model.vq))
    assert info["logical_trits"] == total
    assert 0.2 <= info["bytes_per_trit"] < 0.25
    json.dumps(info)  # `tritnet inspect --json` prints it as is
    text = render_inspection(info)
    assert "blocks/" in text and "T_packed" in text and "B/trit" in text and "step 7" in text


def test_packed_trits_declared_by_ternary_modules():
    assert TernaryLinear(37, 5).packed_trits() == {"T_packed": 37}
    assert TernaryEmbeddingTable(4, 21).packed_trits() == {"T_packed": 21}
    assert TernaryVQCodebook(4, 64).packed_trits() == {"T_packed": 64}


# --------------------------------------------------------------------------------------------
# Atomic saves.


def test_save_replaces_never_writes_in_place(saved):
    path, model, opt = saved
    old_inode, old_hash = os.stat(path).st_ino, sha(path)
    keep = str(path) + ".hardlink"
    os.link(path, keep)  # a reader holding the old file keeps it whole
    scramble(model, 99)
    save_checkpoint(path, model, optimizer=opt, config={}, train_state={"step": 8})
    assert os.stat(path).st_ino != old_inode
    assert sha(keep) == old_hash
    assert load_checkpoint(path).step == 8
    assert [n for n in os.listdir(path.parent) if ".tmp-" in n] == []


def test_failed_save_leaves_previous_checkpoint_and_no_temporary(saved, monkeypatch):
    path, model, opt = saved
    old_hash = sha(path)
    calls = []

    def failing(f, t, host, compression):
        calls.append(t.name)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return original(f, t, host, compression)

    original = ck._write_tensor
    monkeypatch.setattr(ck, "_write_tensor", failing)
    with pytest.raises(CheckpointError, match="previous checkpoint there, if any, is untouched"):
        save_checkpoint(path, model, config={}, train_state={"step": 8})

    def interrupted(f, t, host, compression):
        raise KeyboardInterrupt

    monkeypatch.setattr(ck, "_write_tensor", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, model, config={}, train_state={"step": 8})
    assert sha(path) == old_hash
    assert [n for n in os.listdir(path.parent) if ".tmp-" in n] == []


def test_bad_values_fail_before_any_file_is_written(tmp_path):
    model = TinyLM()
    with pytest.raises(CheckpointError, match="config cannot be written as JSON"):
        save_checkpoint(tmp_path / "a.h5", model, config={"f": object()}, train_state={})
    with pytest.raises(CheckpointError, match="must be dicts"):
        save_checkpoint(tmp_path / "a.h5", model, config=None, train_state={})
    (tmp_path / "dir.h5").mkdir()
    with pytest.raises(CheckpointError, match="is a directory"):
        save_checkpoint(tmp_path / "dir.h5", model, config={}, train_state={})
    assert sorted(os.listdir(tmp_path)) == ["dir.h5"]


KILLED_SAVER = textwrap.dedent("""
    import sys, time
    from tritnet import checkpoint as ck
    from tritnet.nn.tables import TernaryEmbeddingTable

    table = TernaryEmbeddingTable(200_000, 64)   # ~16 MB file: a save takes real time
    original = ck._write_tensor

    def write_then_stall(f, t, host, compression):
        original(f, t, host, compression)
        f.flush()                 # the temporary file now holds real, partial data
        print("mid-write", t.name, flush=True)
        time.sleep(60)            # the parent SIGKILLs us here

    ck._write_tensor = write_then_stall
    ck.save_checkpoint(sys.argv[1], table, config={"run": "new"}, train_state={"step": 2})
""")


def test_sigkill_during_save_leaves_previous_checkpoint_valid(tmp_path):
    path = tmp_path / "ckpt.h5"
    table = TernaryEmbeddingTable(1000, 64)
    save_checkpoint(path, table, config={"run": "old"}, train_state={"step": 1})
    old_hash = sha(path)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    child = subprocess.Popen([sys.executable, "-c", KILLED_SAVER, str(path)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = child.stdout.readline()
        assert line.startswith("mid-write"), child.stderr.read()
        tmp = tmp_path / f".ckpt.h5.tmp-{child.pid}"
        assert tmp.exists() and tmp.stat().st_size > 0
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
        child.stdout.close()
        child.stderr.close()
    assert sha(path) == old_hash
    ckpt = load_checkpoint(path, TernaryEmbeddingTable(1000, 64))
    assert ckpt.config == {"run": "old"} and ckpt.step == 1
    # The next save clears the dead process's temporary.
    save_checkpoint(path, table, config={"run": "next"}, train_state={"step": 3})
    assert not tmp.exists()
    assert load_checkpoint(path).step == 3


# --------------------------------------------------------------------------------------------
# Bad files: each fails with one clear CheckpointError, and leaves the model untouched.


def _load_fails(path, match, model_seed=4, model=TinyLM):
    trandom.manual_seed(model_seed)
    model = model()
    opt = TritFlip(model)
    before = state(model)
    with pytest.raises(CheckpointError, match=match) as err:
        load_checkpoint(path, model, opt)
    assert_same_state(before, state(model))
    assert opt.step_count == 0
    assert "\n" not in str(err.value)
    return str(err.value)


def test_missing_directory_and_empty_files(tmp_path):
    _load_fails(tmp_path / "nope.h5", r"nope.h5 does not exist")
    _load_fails(tmp_path, r"is a directory")
    (tmp_path / "empty.h5").write_bytes(b"")
    _load_fails(tmp_path / "empty.h5", r"is empty \(0 bytes\)")


def test_not_hdf5(tmp_path):
    (tmp_path / "ckpt.h5").write_text("step,loss\n1,2.0\n")
    msg = _load_fails(tmp_path / "ckpt.h5", r"is not an HDF5 file \(first bytes b'step,los'\)")
    assert "ckpt.h5" in msg
    with pytest.raises(CheckpointError, match="not an HDF5 file"):
        inspect_checkpoint(tmp_path / "ckpt.h5")


def test_hdf5_but_not_a_checkpoint(tmp_path):
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = np.zeros(3)
    _load_fails(tmp_path / "other.h5", r"not a tritnet checkpoint \(root attribute format = None")


@pytest.mark.parametrize("keep", [0.5, 0.98])
def test_truncated(saved, tmp_path, keep):
    path, _, _ = saved
    blob = path.read_bytes()
    cut = tmp_path / "cut.h5"
    cut.write_bytes(blob[: int(len(blob) * keep)])
    _load_fails(cut, r"cut.h5 is truncated or corrupted .*use an earlier checkpoint")
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        inspect_checkpoint(cut)


def _tamper(path, fn):
    with h5py.File(path, "r+") as f:
        fn(f)


def _forge_crc(ds):
    ds.attrs["crc32"] = np.uint32(zlib.crc32(np.ascontiguousarray(ds[()]).tobytes()))


def _replace(f, name, array, copy_attrs=True):
    attrs = dict(f[name].attrs) if copy_attrs else {}
    del f[name]
    f[name] = array
    for k, v in attrs.items():
        f[name].attrs[k] = v


def test_newer_format_version(saved):
    path, _, _ = saved
    _tamper(path, lambda f: f.attrs.__setitem__("format_version", 3))
    _load_fails(path, r"written by a newer tritnet\? format 3 > 2 .*upgrade tritnet")


def test_tampered_dtype(saved):
    path, _, _ = saved
    _tamper(path, lambda f: _replace(f, "blocks/1/T_packed",
                                     f["blocks/1/T_packed"][()].astype(np.float32)))
    _load_fails(path, r"dataset `blocks/1/T_packed` has dtype float32, expected uint8")
    with pytest.raises(CheckpointError, match="has dtype float32, expected uint8"):
        load_checkpoint(path)   # checked from the file's own attributes too


def test_tampered_int8_dtype(saved):
    path, _, _ = saved
    _tamper(path, lambda f: _replace(f, "emb/E", f["emb/E"][()].astype(np.int16)))
    _load_fails(path, r"dataset `emb/E` has dtype int16, expected int8")


def test_tampered_shape(saved):
    path, _, _ = saved
    _tamper(path, lambda f: _replace(f, "blocks/0/T_accum", np.zeros((33, 36), np.int8)))
    _load_fails(path, r"dataset `blocks/0/T_accum` has shape \(33, 36\), expected \(33, 37\)")
    _tamper(path, lambda f: _replace(f, "blocks/0/T_accum", np.zeros((33, 37), np.int8)))
    _tamper(path, lambda f: _replace(f, "vq/T_packed", np.zeros((24, 12), np.uint8)))
    _load_fails(path, r"`vq/T_packed` has shape \(24, 12\), expected \(24, 13\)")


def test_missing_and_unexpected_datasets(saved):
    path, _, _ = saved
    _tamper(path, lambda f: f.__delitem__("blocks/0/E_accum"))
    _load_fails(path, r"missing dataset\(s\) blocks/0/E_accum")
    _tamper(path, lambda f: f.__setitem__("blocks/0/E_accum", np.zeros(33, np.int8)))
    _load_fails(path, r"dataset `blocks/0/E_accum` has no crc32")   # a missing crc is damage
    _tamper(path, lambda f: f["blocks/0/E_accum"].attrs.__setitem__(
        "crc32", np.uint32(zlib.crc32(np.zeros(33, np.int8).tobytes()))))
    _tamper(path, lambda f: f.__setitem__("blocks/0/extra", np.zeros(3, np.int8)))
    _load_fails(path, r"unexpected dataset `blocks/0/extra`")


def test_trit_code_out_of_range(saved):
    path, _, _ = saved

    def poke(f):
        ds = f["emb/T_packed"]
        ds[5, 2] = 250
        _forge_crc(ds)   # a forged checksum: the codes themselves are checked
    _tamper(path, poke)
    _load_fails(path, r"`emb/T_packed`: byte \[5, 2\] = 250 is not a trit code .*<= 242")
    with pytest.raises(CheckpointError, match="byte \\[5, 2\\] = 250"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="byte \\[5, 2\\] = 250"):
        inspect_checkpoint(path)
    info = inspect_checkpoint(path, verify=False)   # shows what can be read, marked as such
    assert info["verified"] is False and info["tensors"]["emb/T_packed"]["invalid_codes"] == 1
    assert render_inspection(info).startswith("NOT VERIFIED")


def test_nonzero_padding_trits(saved):
    path, _, _ = saved

    def poke(f):
        ds = f["blocks/1/T_packed"]   # 33 columns: the last byte holds 3 trits + 2 padding
        ds[3, 6] = 0                   # all five digits 0: trits -1, padding -1
        _forge_crc(ds)
    _tamper(path, poke)
    _load_fails(path, r"`blocks/1/T_packed`: byte \[3, 6\] = 0 encodes nonzero padding trits")


def test_flipped_byte_is_caught_by_crc(saved):
    path, _, _ = saved

    def poke(f):
        ds = f["blocks/0/T_accum"]
        ds[2, 3] = np.int8(ds[2, 3] ^ 1)
    _tamper(path, poke)
    _load_fails(path, r"`blocks/0/T_accum` is corrupted: its crc32 is 0x[0-9a-f]{8}, the file "
                      r"says 0x[0-9a-f]{8}")


def _forge(f):
    """Recompute the root's crc32 after an edit: what a forger (or a careless tool) does."""
    attrs = {k: (int(v) if k == "format_version" else v) for k, v in f.attrs.items()
             if k != "crc32"}
    f.attrs["crc32"] = np.uint32(ck.root_crc32(attrs))


def test_root_attributes_carry_a_checksum(saved):
    path, _, _ = saved
    _tamper(path, lambda f: f.attrs.__setitem__(
        "train_state", f.attrs["train_state"].replace('"step": 7', '"step": 9')))
    _load_fails(path, r"its root attributes are corrupted: their crc32 is 0x[0-9a-f]{8}, the "
                      r"file says 0x[0-9a-f]{8}")
    _tamper(path, lambda f: f.attrs.__delitem__("crc32"))
    _load_fails(path, r"root attribute\(s\) crc32 missing")


def test_bad_json_and_missing_attributes(saved):
    path, _, _ = saved
    _tamper(path, lambda f: (f.attrs.__setitem__("config", "{not json"), _forge(f)))
    _load_fails(path, r"root attribute `config` is not valid JSON")
    _tamper(path, lambda f: (f.attrs.__delitem__("config"), _forge(f)))
    _load_fails(path, r"root attribute\(s\) config missing")


def test_deeply_nested_groups(saved):
    path, _, _ = saved

    def nest(f):
        g = f["blocks"]
        for i in range(40):
            g = g.create_group(f"n{i}")
            g.attrs["module"] = "Nested"
    _tamper(path, nest)
    with pytest.raises(CheckpointError, match="groups nest deeper than 32 levels"):
        load_checkpoint(path)   # no model: the file is walked as it declares itself
    _load_fails(path, r"unexpected group `blocks/n0`")


def test_declared_value_range(tmp_path):
    class Signs(Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("edge_attr", np.array([-1, 0, 1, 1], np.int8))

        def value_ranges(self):
            return {"edge_attr": (-1, 1)}

    model = Signs()
    save_checkpoint(tmp_path / "s.h5", model, config={}, train_state={})
    with h5py.File(tmp_path / "s.h5", "r") as f:
        assert list(f["edge_attr"].attrs["valid_range"]) == [-1, 1]
    _tamper(tmp_path / "s.h5", lambda f: (f["edge_attr"].__setitem__(2, 5),
                                          _forge_crc(f["edge_attr"])))
    with pytest.raises(CheckpointError, match=r"`edge_attr` holds 5, outside its range "
                                              r"\[-1, 1\]"):
        load_checkpoint(tmp_path / "s.h5", Signs())


def test_checkpoint_of_another_config(saved):
    path, _, _ = saved

    class Other(Module):
        def __init__(self):
            super().__init__()
            self.emb = TernaryEmbeddingTable(64, 40)

    with pytest.raises(CheckpointError, match="holds a model of class TinyLM, not Other"):
        load_checkpoint(path, Other())
    _load_fails(path, r"dataset `emb/T_packed` has shape \(64, 8\), expected \(32, 8\)",
                model=lambda: TinyLM(vocab=32))


def test_optimizer_state_required_when_asked(tmp_path):
    model = TinyLM()
    save_checkpoint(tmp_path / "a.h5", model, config={}, train_state={})
    with pytest.raises(CheckpointError, match="holds no optimizer state"):
        load_checkpoint(tmp_path / "a.h5", TinyLM(), TritFlip(TinyLM()))


def test_no_pickle_anywhere():
    source = open(ck.__file__).read() + open(data.__file__).read()
    assert "pickle" not in source.replace("no pickle", "").replace("No pickle", "")


def _stall_first_write(monkeypatch):
    """Make the first dataset write wait until the test says go: (started, go) events."""
    import threading
    started, go = threading.Event(), threading.Event()
    original = ck._write_tensor

    def stalled(f, t, host, compression):
        if not started.is_set():
            started.set()
            assert go.wait(30), "the test never let the write go on"
        return original(f, t, host, compression)

    monkeypatch.setattr(ck, "_write_tensor", stalled)
    return started, go


def test_writer_saves_the_state_of_the_moment_save_returned(saved, monkeypatch):
    """CheckpointWriter: the file is written in the background while the model changes; it
    holds the state at save() (packed trits included), as save_checkpoint would have."""
    path, model, opt = saved
    other = path.parent / "sync.h5"
    scramble(model, 3)
    save_checkpoint(other, model, optimizer=opt, config={"a": 1}, train_state={"step": 9})
    want = load_checkpoint(other)
    started, go = _stall_first_write(monkeypatch)
    writer = ck.CheckpointWriter()
    writer.save(path, model, optimizer=opt, config={"a": 1}, train_state={"step": 9})
    assert started.wait(30) and writer.busy
    scramble(model, 4)                      # the run goes on while the file is written
    changed = TinyLM()
    for name, a in model.state_dict().items():
        if name.endswith("T_packed"):
            a[...] = changed.state_dict()[name]
    go.set()
    writer.wait()
    assert not writer.busy
    got = load_checkpoint(path)
    assert got.step == 9 and got.config == {"a": 1}
    assert got.arrays.keys() == want.arrays.keys()
    for name in want.arrays:
        np.testing.assert_array_equal(got.arrays[name], want.arrays[name], err_msg=name)
    assert [n for n in os.listdir(path.parent) if ".tmp-" in n] == []


def test_writer_reports_a_failed_write_and_keeps_the_previous_checkpoint(saved, monkeypatch):
    path, model, opt = saved
    old_hash = sha(path)
    original = ck._write_tensor

    def full_disk(f, t, host, compression):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ck, "_write_tensor", full_disk)
    writer = ck.CheckpointWriter()
    writer.save(path, model, optimizer=opt, config={}, train_state={"step": 8})   # returns
    with pytest.raises(CheckpointError, match=r"cannot write .*ckpt.h5 \(No space left on "
                                              r"device\); the previous checkpoint there, if "
                                              r"any, is untouched"):
        writer.wait()
    assert sha(path) == old_hash
    assert [n for n in os.listdir(path.parent) if ".tmp-" in n] == []
    writer.wait()   # the error is raised once
    # A save after a failed write writes at once, and raises only if that fails too ...
    writer.save(path, model, optimizer=opt, config={}, train_state={"step": 9})
    with pytest.raises(CheckpointError, match="No space left on device") as raised:
        writer.save(path, model, optimizer=opt, config={}, train_state={"step": 10})
    assert isinstance(raised.value.__cause__, CheckpointError)   # the earlier failure
    assert sha(path) == old_hash
    # ... so a disk that frees up loses nothing: the next save is the newest state
    writer.save(path, model, optimizer=opt, config={}, train_state={"step": 11})
    writer.join()                 # that write has failed (its error kept), then space frees
    monkeypatch.setattr(ck, "_write_tensor", original)
    writer.save(path, model, optimizer=opt, config={}, train_state={"step": 12})
    assert not writer.busy and load_checkpoint(path).step == 12   # written in the save
    writer.save(path, model, optimizer=opt, config={}, train_state={"step": 13})
    writer.wait()
    assert load_checkpoint(path).step == 13
    assert [n for n in os.listdir(path.parent) if ".tmp-" in n] == []


def test_writer_checks_values_at_once_and_writes_one_file_at_a_time(saved, monkeypatch):
    path, model, opt = saved
    writer = ck.CheckpointWriter()
    with pytest.raises(CheckpointError, match="config and train_state must be dicts"):
        writer.save(path, model, config="tiny", train_state={"step": 1})
    assert not writer.busy
    started, go = _stall_first_write(monkeypatch)
    writer.save(path, model, optimizer=opt, config={}, train_state={"step": 20})
    assert started.wait(30)
    import threading
    second = threading.Thread(target=writer.save, args=(path, model),
                              kwargs=dict(optimizer=opt, config={}, train_state={"step": 21}))
    second.start()
    second.join(0.5)
    assert second.is_alive()          # waits for the first write
    go.set()
    second.join(30)
    writer.wait()
    assert load_checkpoint(path).step == 21
