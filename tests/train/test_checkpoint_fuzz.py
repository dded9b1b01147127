"""Damaged and forged checkpoints: every reader refuses each one cleanly.

One real checkpoint of a tiny CodeMemoryLM is trained once; each case copies it, damages or
forges it (truncation, flipped bits in every dataset and root attribute, forged checksums
over out-of-range content, links, external storage, renamed, extra and missing nodes,
schema violations), and checks that the loader raises one CheckpointError with a one-line
message, and that `tritnet inspect`, `eval`, `sample` and `train --resume` each print one
`tritnet: error:` line and exit 1: never a traceback, a crash, a hang or a silent load. A
file a case points at from inside the checkpoint is never read (its access time stays 0).
"""

import json
import os
import re
import shutil
import zlib

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from cli.main import main
from tritnet import backend
from tritnet import checkpoint as ck
from tritnet.checkpoint import CheckpointError, load_checkpoint, verify_checkpoint
from tritnet.config import Config
from tritnet.models import CodeMemoryLM
from tritnet.train import train

SMALL = dict(d_model=32, n_layers=1, n_heads=2, context=32, n_experts=2, expert_hidden=32,
             top_k=1, codebook_dim=32, shared_vq_size=64, kgvq_size=32, kgvq_dim=32,
             graph_slots=4, batch_size=2, seq_len=16, steps=2, eval_every=0, eval_batches=1,
             save_every=0)
TEXT = b"".join(b"def f%d(x):\n    return x * %d + 1\n" % (i, i % 7) for i in range(300))
EDGES = "blocks/0/moe/graph/edge_index"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A trained run folder (config.json, metrics.jsonl, ckpt.h5), its data, and a file
    outside it that forged checkpoints point at."""
    backend.set_device("cpu")
    root = tmp_path_factory.mktemp("fuzz")
    (root / "code.txt").write_bytes(TEXT)
    train(Config().override(**SMALL), data=str(root / "code.txt"), out_dir=root / "run",
          log=lambda *_: None, progress=False)
    with h5py.File(root / "outside.h5", "w") as f:   # holds a well-formed embed/E
        f["E"] = np.zeros(256, np.int8)
        f["E"].attrs["crc32"] = np.uint32(zlib.crc32(bytes(256)))
    (root / "outside.bin").write_bytes(bytes(256))
    return root


@pytest.fixture(autouse=True)
def _cpu(monkeypatch):
    monkeypatch.setenv("TRITNET_DEVICE", "cpu")
    backend.set_device("cpu")


# --------------------------------------------------------------------------------------------
# Ways to damage or forge a file.


def edit(fn):
    """A damage made through h5py (fn(f) on the open file)."""
    def damage(path, root):
        with h5py.File(path, "r+") as f:
            fn(f, root)
    return damage


def forge_crc(f, key):
    """Recompute a dataset's crc32 over its bytes: a forger's checksum."""
    f[key].attrs["crc32"] = np.uint32(zlib.crc32(np.ascontiguousarray(f[key][()]).tobytes()))


def forge_root(f):
    attrs = {k: (int(v) if isinstance(v, np.integer) else v) for k, v in f.attrs.items()
             if k != "crc32"}
    f.attrs["crc32"] = np.uint32(ck.root_crc32(attrs))


def poke(key, index, value):
    """Set one element to an out-of-range value, with a valid crc32."""
    def fn(f, root):
        data = f[key][()]
        data[index] = value
        f[key][...] = data
        forge_crc(f, key)
    return edit(fn)


def json_attr(name, change):
    """Edit a JSON root attribute (change(value) returns the new value) and forge the root's
    crc32."""
    def fn(f, root):
        f.attrs[name] = json.dumps(change(json.loads(f.attrs[name])))
        forge_root(f)
    return edit(fn)


def root_attr(name, value, forge=True):
    def fn(f, root):
        if value is None:
            del f.attrs[name]
        else:
            f.attrs[name] = value
        if forge:
            forge_root(f)
    return edit(fn)


def replace(key, make):
    """Delete `key` and put make(f, root) in its place (a link, or a dataset), with the
    original's attributes where it is a dataset."""
    def fn(f, root):
        attrs = dict(f[key].attrs)
        del f[key]
        made = make(f, root, key)
        if made is not None:
            f[key] = made
        if isinstance(f.get(key, getlink=True), h5py.HardLink):
            for k, v in attrs.items():
                f[key].attrs[k] = v
    return edit(fn)


def with_item(key, value):
    def fn(d):
        d[key] = value
        return d
    return fn


def without(key):
    def fn(d):
        d.pop(key)
        return d
    return fn


def nested(path, value):
    def fn(d):
        inner = d
        for k in path[:-1]:
            inner = inner[k]
        inner[path[-1]] = value
        return d
    return fn


def truncate(fraction):
    def damage(path, root):
        blob = path.read_bytes()
        path.write_bytes(blob[: int(len(blob) * fraction)])
    return damage


def flip_dataset_bit(key):
    """Flip one bit of a dataset's bytes in the file itself (its crc32 no longer matches)."""
    def damage(path, root):
        with h5py.File(path, "r") as f:
            offset, size = f[key].id.get_offset(), f[key].id.get_storage_size()
        blob = bytearray(path.read_bytes())
        blob[offset + size // 2] ^= 0x10
        path.write_bytes(bytes(blob))
    return damage


def flip_text_bit(name):
    """Flip one bit inside a root attribute's text, found in the file's bytes."""
    def damage(path, root):
        with h5py.File(path, "r") as f:
            text = f.attrs[name].encode()
        blob = bytearray(path.read_bytes())
        at = blob.find(text)
        assert at >= 0 and blob.count(text) == 1, name
        blob[at + len(text) // 2] ^= 0x01
        path.write_bytes(bytes(blob))
    return damage


def int_attr_flip(name, key=None):
    """Flip a bit of an integer attribute (of the root, or of dataset `key`)."""
    def fn(f, root):
        obj = f if key is None else f[key]
        value = obj.attrs[name]
        obj.attrs[name] = type(value)(int(value) ^ 0x4)
    return edit(fn)


def external_storage(f, root, key):
    f.create_dataset(key, shape=(256,), dtype=np.int8,
                     external=[(str(root / "outside.bin"), 0, 256)])


def virtual(f, root, key):
    layout = h5py.VirtualLayout(shape=(256,), dtype=np.int8)
    layout[:] = h5py.VirtualSource(str(root / "outside.h5"), "E", shape=(256,))
    f.create_virtual_dataset(key, layout)


def hard_duplicate(f, root, key):
    return f["blocks/0/attn/q/E"]


def lzf(f, root, key):
    f.create_dataset(key, data=np.zeros(256, np.int8), compression="lzf")


def rename(old, new):
    def fn(f, root):
        f.move(old, new)
    return edit(fn)


def deep_json(f, root):
    f.attrs["config"] = "[" * 100_000 + "]" * 100_000
    forge_root(f)


def big_int_json(f, root):
    f.attrs["train_state"] = f.attrs["train_state"].replace('"step": 2', '"step": ' + "9" * 5000)
    forge_root(f)


def named_datatype(f, root):
    f["embed/kind"] = np.dtype("int8")


CASES = {
    # truncation and bytes that are not a checkpoint
    **{f"truncated_{n}": (lambda p, r, n=n: p.write_bytes(p.read_bytes()[:n]),
                          r"is empty|not an HDF5 file|truncated or corrupted")
       for n in (1, 7, 8, 9, 64, 100, 512, 2048)},
    **{f"truncated_{int(fr * 1000)}permille": (truncate(fr), r"truncated or corrupted")
       for fr in (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999)},
    "text_file": (lambda p, r: p.write_text("step,loss\n1,2.0\n"), r"not an HDF5 file"),
    # flipped bits in datasets (every kind) and in every root attribute
    **{f"flip_{k.replace('/', '.')}": (flip_dataset_bit(k), rf"`{k}` is corrupted: its crc32")
       for k in ("embed/T_packed", "embed/E", "embed/T_accum", "embed/E_accum",
                 "shared_vq/usage", "kgvq/usage", EDGES, "blocks/0/moe/graph/edge_attr",
                 "blocks/0/moe/graph/edge_score", "head/lm_head/T_packed",
                 "blocks/0/moe/experts/1/down/T_accum")},
    **{f"flip_attr_{k}": (flip_text_bit(k), r"root attributes are corrupted|not a tritnet")
       for k in ("config", "train_state", "module_state", "metrics", "tritnet_version",
                 "packing_scheme", "scale_function", "module")},
    "flip_attr_format": (flip_text_bit("format"), r"not a tritnet checkpoint"),
    "flip_attr_format_version": (int_attr_flip("format_version"),
                                 r"written by a newer tritnet\? format 6 > 2"),
    "flip_attr_crc32": (int_attr_flip("crc32"), r"root attributes are corrupted"),
    "flip_dataset_crc32": (int_attr_flip("crc32", "embed/E"), r"`embed/E` is corrupted"),
    "flip_dataset_cols": (int_attr_flip("cols", "embed/T_packed"),
                          r"`embed/T_packed` declares cols = 36, expected 32"),
    # forged checksums over out-of-range content
    "edge_dst_2^30": (poke(EDGES, (1, 3), 2**30), r"`.*edge_index` holds 1073741824, outside "
                                                  r"its range \[-1, 63\]"),
    "edge_dst_5000": (poke(EDGES, (1, 0), 5000), r"holds 5000, outside its range \[-1, 63\]"),
    "edge_dst_-2": (poke(EDGES, (1, 5), -2), r"holds -2, outside its range \[-1, 63\]"),
    "edge_src_64": (poke(EDGES, (0, 9), 64), r"holds 64, outside its range \[-1, 63\]"),
    "edge_attr_5": (poke("blocks/0/moe/graph/edge_attr", 3, 5), r"holds 5, outside its range"),
    "edge_score_-1": (poke("blocks/0/moe/graph/edge_score", 3, -1), r"holds -1, outside"),
    "usage_negative": (poke("shared_vq/usage", 7, -3), r"`shared_vq/usage` holds -3, outside "
                                                       r"its range \[0, 32767\]"),
    "kgvq_usage_negative": (poke("kgvq/usage", 0, -32768), r"holds -32768, outside"),
    "trit_code_250": (poke("embed/T_packed", (5, 2), 250), r"byte \[5, 2\] = 250 is not a "
                                                           r"trit code"),
    "padding_trits": (poke("embed/T_packed", (0, 6), 0), r"encodes nonzero padding trits"),
    "valid_range_widened": (edit(lambda f, r: f[EDGES].attrs.__setitem__(
        "valid_range", np.array([-1, 2**31 - 1]))),
        r"declares valid_range = \(-1, 2147483647\), expected \[-1, 63\]"),
    # links, external storage, virtual datasets, filters
    "external_link": (replace("embed/E", lambda f, r, k: h5py.ExternalLink(
        str(r / "outside.h5"), "E")), r"`embed/E` is an external link"),
    "external_link_extra": (edit(lambda f, r: f.__setitem__("extra", h5py.ExternalLink(
        str(r / "outside.h5"), "E"))), r"`extra` is an external link"),
    "soft_link": (replace("embed/E", lambda f, r, k: h5py.SoftLink("/head/lm_head/E")),
                  r"`embed/E` is a soft link"),
    "soft_link_dangling": (edit(lambda f, r: f.__setitem__("head/x", h5py.SoftLink("/nope"))),
                           r"`head/x` is a soft link"),
    "external_storage": (replace("embed/E", external_storage), r"`embed/E` keeps its data in "
                                                               r"an external file"),
    "virtual_dataset": (replace("embed/E", virtual), r"`embed/E` is a virtual dataset"),
    "hard_duplicate": (replace("blocks/0/attn/k/E", hard_duplicate),
                       r"is reachable by more than one path"),
    "lzf_filter": (replace("embed/E", lzf), r"`embed/E` uses HDF5 filter 32000"),
    "named_datatype": (edit(lambda f, r: named_datatype(f, r)), r"`embed/kind` is a Datatype"),
    # renamed, extra and missing nodes
    "dotted_name_at_root": (rename("embed/E", "embed.E"), r"unexpected dataset `embed.E`"),
    "renamed_group": (rename("kgvq", "kgvq2"), r"unexpected group `kgvq2`"),
    "extra_dataset": (edit(lambda f, r: f.__setitem__("head/extra", np.zeros(3, np.int8))),
                      r"unexpected dataset `head/extra`"),
    "extra_group": (edit(lambda f, r: f.create_group("blocks/1")), r"unexpected group "
                                                                   r"`blocks/1`"),
    "missing_dataset": (edit(lambda f, r: f.__delitem__("kgvq/usage")),
                        r"missing dataset\(s\) kgvq/usage"),
    "missing_group": (edit(lambda f, r: f.__delitem__("head")), r"missing dataset\(s\) head/"),
    "extra_root_attribute": (root_attr("note", "hi"), r"unexpected root attribute\(s\) note"),
    "extra_dataset_attribute": (edit(lambda f, r: f["embed/E"].attrs.__setitem__("x", 1)),
                                r"dataset `embed/E` has unexpected attribute\(s\) x"),
    "group_class": (edit(lambda f, r: f["head"].attrs.__setitem__("module", "Other")),
                    r"group `head` is a Other, expected CompositeHead"),
    "missing_dataset_crc": (edit(lambda f, r: f["embed/E"].attrs.__delitem__("crc32")),
                            r"dataset `embed/E` has no crc32"),
    "missing_root_crc": (root_attr("crc32", None, forge=False),
                         r"root attribute\(s\) crc32 missing"),
    "dtype_forged": (replace("embed/E", lambda f, r, k: np.zeros(256, np.int16)),
                     r"`embed/E` has dtype int16, expected int8"),
    "big_endian": (replace("kgvq/usage", lambda f, r, k: np.zeros(32, ">i2")),
                   r"`kgvq/usage` has dtype >i2, expected int16"),
    "shape_forged": (replace("embed/E", lambda f, r, k: np.zeros(255, np.int8)),
                     r"`embed/E` has shape \(255,\), expected \(256,\)"),
    # the root attributes' schema (each with a forged root crc32)
    "step_edited": (edit(lambda f, r: f.attrs.__setitem__("train_state", f.attrs[
        "train_state"].replace('"step": 2', '"step": 7'))), r"root attributes are corrupted"),
    "step_negative": (json_attr("train_state", with_item("step", -1)),
                      r"train_state.step = -1, expected an integer >= 0"),
    "step_text": (json_attr("train_state", with_item("step", "30")),
                  r'train_state.step = "30", expected an integer'),
    "step_float": (json_attr("train_state", with_item("step", 1.5)), r"train_state.step = 1.5"),
    "step_bool": (json_attr("train_state", with_item("step", True)), r"train_state.step = true"),
    "step_missing": (json_attr("train_state", without("step")),
                     r"train_state has an optimizer state but no step"),
    "rng_missing": (json_attr("train_state", without("tritnet_rng")),
                    r"train_state has no tritnet_rng"),
    "rng_bad": (json_attr("train_state", nested(["tritnet_rng", "state", "inc"], -5)),
                r"train_state.tritnet_rng.state.inc = -5"),
    "data_position_bad": (json_attr("train_state", nested(["data", "batches_drawn"], "x")),
                          r"train_state.data.batches_drawn"),
    "data_id_bad": (json_attr("train_state", nested(["data_id", "sha256"], "abc")),
                    r"train_state.data_id.sha256 = \"abc\", expected 64 hexadecimal digits"),
    "optimizer_not_object": (json_attr("train_state", with_item("optimizer", [1])),
                             r"train_state.optimizer is a list"),
    "optimizer_step_missing": (json_attr("train_state", nested(["optimizer"], {})),
                               r"train_state.optimizer has no step"),
    "elapsed_nan": (json_attr("train_state", with_item("elapsed", float("nan"))),
                    r"train_state.elapsed = NaN, expected a finite number >= 0"),
    "train_state_list": (json_attr("train_state", lambda d: [d]),
                         r"train_state is a list, expected a JSON object"),
    "config_unknown_field": (json_attr("config", with_item("d_modle", 3)),
                             r"its config cannot be used \(unknown config field\(s\): d_modle"),
    "config_bad_value": (json_attr("config", with_item("n_heads", 5)),
                         r"its config cannot be used .*divisible by n_heads = 5"),
    "config_wrong_type": (json_attr("config", with_item("d_model", "32")),
                          r"config field d_model = '32': expected int"),
    "config_other_shape": (json_attr("config", with_item("shared_vq_size", 65)),
                           r"describes another model|has shape|"
                           r"shared_vq_size = 64 \(checkpoint: 65\)"),
    "config_huge_model": (json_attr("config", lambda d: dict(d, n_layers=1024,
                                                             n_experts=4096)),
                          r"its config describes 1024 blocks of 4096 experts, far more than "
                          r"its \d+ datasets can hold|n_layers = 1 \(checkpoint: 1024\)"),
    "config_not_object": (json_attr("config", lambda d: 7),
                          r"config is a int, expected a JSON object"),
    "module_state_negative": (json_attr("module_state", nested(
        ["shared_vq", "steps_since_restart"], -1)),
        r"module_state.shared_vq.steps_since_restart = -1, expected an integer >= 0"),
    "module_state_missing": (json_attr("module_state", without("kgvq")),
                             r"module_state names modules \['shared_vq'\]"),
    "module_state_extra_field": (json_attr("module_state", nested(["kgvq", "x"], 1)),
                                 r"module_state.kgvq has fields"),
    "metrics_text": (json_attr("metrics", with_item("val_bpb", "low")),
                     r'metrics.val_bpb = "low", expected a finite number'),
    "metrics_infinite": (json_attr("metrics", with_item("loss", float("inf"))),
                         r"metrics.loss = Infinity"),
    "config_not_json": (edit(lambda f, r: (f.attrs.__setitem__("config", "{oops"),
                                           forge_root(f))),
                        r"root attribute `config` is not valid JSON"),
    "config_deep_json": (edit(lambda f, r: deep_json(f, r)),
                         r"root attribute `config` is not valid JSON \(RecursionError"),
    "step_huge_integer": (edit(lambda f, r: big_int_json(f, r)),
                          r"root attribute `train_state` is not valid JSON"),
    "config_as_integer": (root_attr("config", np.int64(3)),
                          r"root attribute `config` has type int64"),
    "module_class": (root_attr("module", "TinyLM"), r"holds a model of class TinyLM, not "
                                                    r"CodeMemoryLM|holds a TinyLM"),
    "format_other": (root_attr("format", "something-else"), r"not a tritnet checkpoint"),
    "format_version_1": (root_attr("format_version", np.int64(1)),
                         r"has format 1, whose root attributes .* carry no checksum"),
    "format_version_text": (root_attr("format_version", "2"),
                            r"root attribute `format_version` has type object"),
}


def damaged(pristine, tmp_path, case):
    run = tmp_path / "run"
    shutil.copytree(pristine / "run", run)
    path = run / "ckpt.h5"
    damage, match = CASES[case]
    damage(path, pristine)
    for name in ("outside.h5", "outside.bin"):   # never read: their access time stays 0
        target = pristine / name
        os.utime(target, (0, os.stat(target).st_mtime))
    return run, path, match


def assert_never_opened(pristine):
    for name in ("outside.h5", "outside.bin"):
        assert os.stat(pristine / name).st_atime == 0, f"{name} was read"


@pytest.mark.parametrize("case", sorted(CASES))
def test_loader_refuses(pristine, tmp_path, case):
    run, path, match = damaged(pristine, tmp_path, case)
    model = CodeMemoryLM(Config().override(**SMALL))
    before = {k: backend.to_numpy(v).copy() for k, v in model.state_dict().items()}
    from tritnet.optim import TritFlip
    for call in (lambda: load_checkpoint(path, model, TritFlip(model)),
                 lambda: verify_checkpoint(path, model)):
        with pytest.raises(CheckpointError) as err:
            call()
        message = str(err.value)
        assert "\n" not in message and re.search(match, message), message
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(backend.to_numpy(v), before[k], err_msg=k)
    assert_never_opened(pristine)


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_command_refuses(pristine, tmp_path, case):
    run, path, match = damaged(pristine, tmp_path, case)
    data = str(pristine / "code.txt")
    before = path.read_bytes()
    for args in (["inspect", path], ["eval", path, "--data", data],
                 ["sample", path, "--tokens", 2],
                 ["train", "--resume", "--out", run, "--data", data, "--steps", 3]):
        res = CliRunner().invoke(main, [str(a) for a in args])
        lines = res.stderr.splitlines()
        assert res.exit_code == 1 and len(lines) == 1, (args[0], res.output)
        assert lines[0].startswith("tritnet: error: ") and "Traceback" not in res.output
        assert re.search(match, lines[0]), (args[0], lines[0])
    assert path.read_bytes() == before   # no command touched the file
    assert sorted(p.name for p in run.iterdir()) == ["ckpt.h5", "config.json", "metrics.jsonl"]
    assert_never_opened(pristine)


def test_the_pristine_checkpoint_passes(pristine, tmp_path):
    """The cases' starting point loads and passes every command (their failures are the
    damage's)."""
    path = pristine / "run" / "ckpt.h5"
    verify_checkpoint(path)
    res = CliRunner().invoke(main, ["inspect", str(path)])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, ["eval", str(path), "--data", str(pristine / "code.txt")])
    assert res.exit_code == 0, res.output


def test_inspect_no_verify_shows_what_it_can_read_marked(pristine, tmp_path):
    run, path, _ = damaged(pristine, tmp_path, "external_link")
    res = CliRunner().invoke(main, ["inspect", str(path), "--no-verify"])
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith("NOT VERIFIED")
    assert "problem: `embed/E` is an external link (not followed)" in res.stdout
    assert "embed/" in res.stdout and "T_packed" in res.stdout
    assert_never_opened(pristine)


def test_active_edge_tables_are_range_checked(tmp_path):
    """A code graph in active mode (graph_capacity > 0) keeps its edges in four flat
    buffers: each is checked against the code book's size."""
    config = Config().override(**dict(SMALL, graph_capacity=16))
    model = CodeMemoryLM(config)
    path = tmp_path / "ckpt.h5"
    ck.save_checkpoint(path, model, config=config.to_dict(), train_state={"step": 0})
    verify_checkpoint(path)
    for key, value in (("active_edge_src", 64), ("active_edge_dst", -2),
                       ("active_edge_attr", 2), ("active_edge_score", -7)):
        bad = tmp_path / f"{key}.h5"
        shutil.copy(path, bad)
        poke(f"blocks/0/moe/graph/{key}", 1, value)(bad, tmp_path)
        with pytest.raises(CheckpointError, match=rf"`blocks/0/moe/graph/{key}` holds {value}, "
                                                  r"outside its range"):
            load_checkpoint(bad, CodeMemoryLM(config))
