"""Corpora, batches and the bigram baseline: the split rule, determinism, and every bad input."""

import json
import math
import os
import sysconfig
import time

import numpy as np
import pytest

from tritnet import data
from tritnet.data import Batches, Corpus, DataError, bigram_bpb, bits_per_byte, get_batch


@pytest.fixture(scope="module")
def stdlib():
    t0 = time.perf_counter()
    corpus = data.default_corpus()
    return corpus, time.perf_counter() - t0


# --------------------------------------------------------------------------------------------
# The default corpus.


def test_default_corpus_is_the_stdlib_split_by_file_index(stdlib):
    corpus, seconds = stdlib
    files = data.stdlib_files()
    assert len(files) > 100
    assert [rel for rel, _ in files] == sorted(rel for rel, _ in files)
    assert not any("site-packages" in rel or "__pycache__" in rel for rel, _ in files)
    assert all(full.startswith(sysconfig.get_paths()["stdlib"]) for _, full in files)
    blobs = [open(full, "rb").read() for _, full in files]
    val = b"\n".join(b for i, b in enumerate(blobs) if i % 20 == 0)
    train = b"\n".join(b for i, b in enumerate(blobs) if i % 20 != 0)
    assert corpus.val.tobytes() == val and corpus.train.tobytes() == train
    assert corpus.vocab_size == 256 and corpus.train.dtype == np.uint8
    assert corpus.n_files == len(files) and corpus.tokens_per_byte == 1.0
    assert 0.02 < len(corpus.val) / (len(corpus.train) + len(corpus.val)) < 0.10
    assert "% 20 == 0" in corpus.split_rule and "standard library" in corpus.describe()
    assert seconds < 10, f"building the default corpus took {seconds:.1f} s"


def test_default_corpus_is_deterministic(stdlib):
    again = data.default_corpus()
    np.testing.assert_array_equal(again.train, stdlib[0].train)
    np.testing.assert_array_equal(again.val, stdlib[0].val)
    assert data.load_corpus(None).val.tobytes() == stdlib[0].val.tobytes()


# --------------------------------------------------------------------------------------------
# load_corpus: text files, folders, token files.


def test_single_text_file_holds_out_its_tail(tmp_path):
    text = ("def f(x):\n    return x + 1\n" * 50).encode()
    (tmp_path / "a.txt").write_bytes(text)
    c = data.load_corpus(tmp_path / "a.txt")
    n_val = len(text) // 20
    assert c.val.tobytes() == text[-n_val:] and c.train.tobytes() == text[:-n_val]
    assert c.vocab_size == 256 and "last" in c.split_rule


def _write_files(root, n, prefix="f"):
    for i in range(n):
        sub = root / ("sub" if i % 3 == 0 else "")
        sub.mkdir(exist_ok=True)
        (sub / f"{prefix}{i:02d}.txt").write_text(f"file {i} héllo\n" * 3)


def test_text_folder_split_rule_sorted_and_filtered(tmp_path):
    _write_files(tmp_path, 25)
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00")
    (tmp_path / ".hidden.txt").write_text("secret\n")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_text("ref: main\n")
    with pytest.warns(UserWarning, match=r"skipped 1 file\(s\) .* not UTF-8 text \(first: image.png"):
        c = data.load_corpus(tmp_path)
    rels = sorted(os.path.relpath(p, tmp_path).replace(os.sep, "/")
                  for p in map(str, tmp_path.rglob("*.txt")) if "/." not in p and
                  not os.path.basename(p).startswith("."))
    blobs = [(tmp_path / r).read_bytes() for r in rels]
    assert len(blobs) == 25 and c.n_files == 25
    assert c.val.tobytes() == b"\n".join(blobs[i] for i in range(25) if i % 20 == 0)
    assert c.train.tobytes() == b"\n".join(blobs[i] for i in range(25) if i % 20 != 0)
    assert c.skipped_files == ["image.png"]
    assert b"secret" not in c.train.tobytes() + c.val.tobytes()


def test_small_text_folder_uses_the_tail_rule(tmp_path):
    _write_files(tmp_path, 3)
    c = data.load_corpus(tmp_path)
    assert c.n_files == 3 and "last" in c.split_rule
    assert len(c.val) == (len(c.train) + len(c.val)) // 20


def test_bin_files_dtype_rules(tmp_path):
    tokens = np.arange(1000, dtype=np.uint16) * 3
    tokens.tofile(tmp_path / "t.u16.bin")
    c = data.load_corpus(tmp_path / "t.u16.bin")
    assert isinstance(c.train, np.memmap) and c.train.dtype == np.uint16
    np.testing.assert_array_equal(np.concatenate([c.train, c.val]), tokens)
    assert len(c.val) == 50 and c.vocab_size == 2998   # largest token + 1
    assert c.tokens_per_byte is None

    tokens.tofile(tmp_path / "nano.bin")   # nanoGPT's uint16 files: say so with --dtype ...
    assert data.load_corpus(tmp_path / "nano.bin", dtype="uint16").vocab_size == 2998
    (tmp_path / "side.bin").write_bytes(tokens.tobytes())   # ... or with a sidecar
    (tmp_path / "side.bin.json").write_text(json.dumps({"dtype": "uint16", "vocab_size": 4096}))
    c = data.load_corpus(tmp_path / "side.bin")
    assert c.vocab_size == 4096 and c.train.dtype == np.uint16

    c = data.load_corpus(tmp_path / "nano.bin")           # default: uint8 bytes
    assert c.train.dtype == np.uint8 and c.vocab_size == 256 and len(c.train) + len(c.val) == 2000
    assert c.tokens_per_byte == 1.0


# --------------------------------------------------------------------------------------------
# Bad input: one clear DataError each.


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match=r"data path .*nope does not exist"):
        data.load_corpus(tmp_path / "nope")


def test_empty_inputs(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(DataError, match="empty.txt is empty"):
        data.load_corpus(tmp_path / "empty.txt")
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(DataError, match=r"empty.bin is empty \(0 bytes\)"):
        data.load_corpus(tmp_path / "empty.bin")
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match="no UTF-8 text files found"):
        data.load_corpus(tmp_path / "folder")
    (tmp_path / "folder" / "blob").write_bytes(b"\xff\xfe\xfd")
    with pytest.raises(DataError, match=r"no UTF-8 text files found \(1 file\(s\) seen, 1 not"):
        with pytest.warns(UserWarning):
            data.load_corpus(tmp_path / "folder")
    (tmp_path / "one.txt").write_bytes(b"x")
    with pytest.raises(DataError, match="too little data"):
        data.load_corpus(tmp_path / "one.txt")


def test_empty_held_out_files(tmp_path):
    for i in range(20):
        (tmp_path / f"{i:02d}.txt").write_text("" if i == 0 else "text\n")
    with pytest.raises(DataError, match="the val split is empty"):
        data.load_corpus(tmp_path)


def test_unreadable_file(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text("hello\n" * 10)

    def denied(path, mode="r", *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(data, "open", denied, raising=False)  # root ignores chmod 000
    with pytest.raises(DataError, match=r"cannot read .*a.txt: Permission denied"):
        data.load_corpus(tmp_path / "a.txt")
    with pytest.raises(DataError, match="cannot read .*a.txt: Permission denied"):
        data.load_corpus(tmp_path)


def test_non_utf8_text_file(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("café\n".encode("latin-1") * 20)
    with pytest.raises(DataError, match=r"latin1.txt is not UTF-8 text; .*\*.bin"):
        data.load_corpus(tmp_path / "latin1.txt")


def test_bin_size_not_a_multiple_of_dtype(tmp_path):
    (tmp_path / "t.u16.bin").write_bytes(b"\x01\x00\x02")
    with pytest.raises(DataError, match=r"t.u16.bin has 3 bytes, not a multiple of 2 \(uint16"):
        data.load_corpus(tmp_path / "t.u16.bin")


def test_bad_dtype_and_sidecar(tmp_path):
    np.arange(100, dtype=np.uint16).tofile(tmp_path / "t.bin")
    with pytest.raises(DataError, match="token dtype 'int32' is not supported"):
        data.load_corpus(tmp_path / "t.bin", dtype="int32")
    with pytest.raises(DataError, match="--dtype applies to .bin token files"):
        (tmp_path / "x.txt").write_text("hello\n" * 10)
        data.load_corpus(tmp_path / "x.txt", dtype="uint16")
    (tmp_path / "t.bin.json").write_text("{dtype: uint16")
    with pytest.raises(DataError, match="cannot read the sidecar .*t.bin.json"):
        data.load_corpus(tmp_path / "t.bin")
    (tmp_path / "t.bin.json").write_text(json.dumps({"dtype": "uint16", "vocab_size": 50}))
    with pytest.raises(DataError, match="vocab_size=50 but the file holds token 99"):
        data.load_corpus(tmp_path / "t.bin")


def test_sequence_longer_than_the_data(tmp_path):
    (tmp_path / "a.txt").write_text("abcdefghij" * 10)   # 100 bytes: 95 train, 5 held out
    c = data.load_corpus(tmp_path / "a.txt")
    c.check_seq_len(4)
    with pytest.raises(DataError, match=r"the val split of .*a.txt has 5 tokens, too few for "
                                        r"seq_len 5 \(one sequence needs 6\); use a smaller"):
        c.check_seq_len(5)
    with pytest.raises(DataError, match="the train split .* too few for seq_len 200"):
        Batches(c, 2, 200)
    with pytest.raises(DataError, match="too few for seq_len 95"):
        get_batch(c.train, 1, 95, np.random.default_rng(0))
    get_batch(c.train, 1, 94, np.random.default_rng(0))
    with pytest.raises(DataError, match="seq_len must be a positive integer"):
        get_batch(c.train, 1, 0, np.random.default_rng(0))
    with pytest.raises(DataError, match="batch_size must be a positive integer"):
        get_batch(c.train, 0, 4, np.random.default_rng(0))
    with pytest.raises(DataError, match="unknown split 'test'"):
        c.split("test")


# --------------------------------------------------------------------------------------------
# Batches.


def _corpus(n=5000, vocab=256, dtype=np.uint8):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab, n).astype(dtype)
    return Corpus(tokens[: n - n // 10], tokens[n - n // 10:], vocab, "random")


def test_get_batch_shapes_shift_and_determinism():
    c = _corpus()
    x, y = get_batch(c.train, 8, 16, np.random.default_rng(5))
    assert x.shape == y.shape == (8, 16) and x.dtype == np.int64
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
    text = c.train.tobytes()
    for row_x, row_y in zip(x, y):
        at = text.find(row_x.astype(np.uint8).tobytes())
        assert at >= 0 and text[at + 1: at + 17] == row_y.astype(np.uint8).tobytes()
    x2, y2 = get_batch(c.train, 8, 16, np.random.default_rng(5))
    np.testing.assert_array_equal(x, x2)
    x3, _ = get_batch(c.train, 8, 16, np.random.default_rng(6))
    assert not np.array_equal(x, x3)


def test_get_batch_reaches_the_last_token():
    data_ = np.arange(10, dtype=np.uint8)
    seen = set()
    rng = np.random.default_rng(0)
    for _ in range(50):
        x, y = get_batch(data_, 4, 3, rng)
        seen.update(y[:, -1].tolist())
    assert max(seen) == 9


def test_batches_position_round_trips_through_json():
    c = _corpus()
    a = Batches(c, 4, 8, seed=3)
    for _ in range(3):
        a.get()
    saved = json.loads(json.dumps(a.state_dict()))   # as it travels in a checkpoint
    expected = [a.get("train") for _ in range(4)] + [a.get("val")]
    b = Batches(c, 4, 8, seed=999)
    b.load_state_dict(saved)
    assert b.batches_drawn == 3
    got = [b.get("train") for _ in range(4)] + [b.get("val")]
    for (x1, y1), (x2, y2) in zip(expected, got):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
    with pytest.raises(DataError, match="data position cannot be restored"):
        b.load_state_dict({"rng": "garbage"})


def test_batches_from_a_memmap(tmp_path):
    np.arange(3000, dtype=np.uint16).tofile(tmp_path / "t.u16.bin")
    c = data.load_corpus(tmp_path / "t.u16.bin")
    x, y = Batches(c, 2, 5, seed=0).get()
    np.testing.assert_array_equal(y, x + 1)


def test_eval_batches_are_fixed_windows():
    val = np.arange(101, dtype=np.uint8)
    all_ = list(data.eval_batches(val, 3, 10))
    xs = np.concatenate([x for x, _ in all_])
    np.testing.assert_array_equal(xs[:, 0], np.arange(10) * 10)   # 10 windows, no overlap
    np.testing.assert_array_equal(np.concatenate([y for _, y in all_]), xs + 1)
    few = list(data.eval_batches(val, 2, 10, max_batches=2))
    starts = np.concatenate([x for x, _ in few])[:, 0]
    assert len(starts) == 4 and starts[0] == 0 and starts[-1] == 90   # spread over the split
    again = list(data.eval_batches(val, 2, 10, max_batches=2))
    np.testing.assert_array_equal(np.concatenate([x for x, _ in again])[:, 0], starts)


# --------------------------------------------------------------------------------------------
# The bigram baseline and units.


def test_bits_per_byte():
    assert bits_per_byte(math.log(2)) == pytest.approx(1.0)
    assert bits_per_byte(2 * math.log(2), tokens_per_byte=0.25) == pytest.approx(0.5)


def _bigram_by_hand(train, val, vocab):
    counts = {}
    for a, b in zip(train[:-1], train[1:]):
        counts[(a, b)] = counts.get((a, b), 0) + 1
    totals = {}
    for a in train[:-1]:
        totals[a] = totals.get(a, 0) + 1
    bits = [-math.log2((counts.get((a, b), 0) + 1) / (totals.get(a, 0) + vocab))
            for a, b in zip(val[:-1], val[1:])]
    return sum(bits) / len(bits)


def test_bigram_matches_a_hand_count():
    train = [int(v) for v in b"abracadabra abracadabra"]
    val = [int(v) for v in b"cadabra!"]
    got = bigram_bpb(np.array(train, np.uint8), np.array(val, np.uint8), 256)
    assert got == pytest.approx(_bigram_by_hand(train, val, 256), rel=1e-12)


def test_bigram_sparse_path_for_large_vocabularies():
    rng = np.random.default_rng(1)
    train = rng.integers(0, 3000, 400).astype(np.uint16)
    val = np.concatenate([train[:50], rng.integers(0, 3000, 30)]).astype(np.uint16)
    got = bigram_bpb(train, val, 3000)
    assert got == pytest.approx(_bigram_by_hand(train.tolist(), val.tolist(), 3000), rel=1e-12)


def test_bigram_on_uniform_bytes_is_about_8_bits_and_below_on_text(stdlib):
    c = _corpus(20000)
    assert 7.9 < bigram_bpb(c.train, c.val, 256) < 8.3
    corpus, _ = stdlib
    bpb = bigram_bpb(corpus.train, corpus.val, 256)
    assert 2.5 < bpb < 4.5   # Python source: well below 8 bits per byte
    with pytest.raises(DataError, match="at least 2 tokens per split"):
        bigram_bpb(c.train, c.val[:1], 256)
