"""Data for byte-level language modelling: corpora, random batches, and a bigram baseline.

A corpus is two 1-D token arrays, `train` and `val` (held-out), with a vocabulary size. Text
is read as bytes, so the vocabulary is 256 and one token is one byte (bits per token = bits
per byte). Token files (`.bin`, uint8 or uint16) allow larger vocabularies.

Where the data comes from (`load_corpus(path)`; `default_corpus()` when no path is given):

- the default corpus: every `*.py` file of the running interpreter's standard library
  (sysconfig.get_paths()["stdlib"], recursively, skipping site-packages/, dist-packages/ and
  __pycache__/, which are not the standard library), ordered by their relative POSIX paths;
- a text file, or a directory of text files (recursive; hidden files and folders, whose name
  starts with ".", are skipped; a file is text when it decodes as UTF-8: others are skipped
  and counted in a warning);
- a `.bin` file of raw tokens, memory-mapped (np.memmap, nanoGPT style). Its dtype is, in
  order: the `dtype` argument (`--dtype`), else `dtype` in a sidecar JSON file named
  `<file>.json` (e.g. `train.bin.json`: {"dtype": "uint16", "vocab_size": 50257}), else the
  suffix `.u16.bin` (uint16) or `.u8.bin` (uint8), else uint8. vocab_size is the sidecar's,
  else 256 for uint8, else the largest token + 1.

Split rule (fixed, so both splits are deterministic for given data):
- sources of several files (the default corpus, directories): the files are sorted by
  relative path; file i goes to held-out when i % 20 == 0, else to train (about 5% held out,
  whole files, so held-out text is never seen in training). Each split is its files' bytes
  joined with b"\\n". With fewer than 20 files the rule below applies to their concatenation.
- a single file or `.bin`: the last len // 20 tokens (at least 1) are held out.

Batches (`get_batch`, `Batches`) are nanoGPT's: random offsets into a split, x = tokens
[o, o + seq_len), y = tokens [o + 1, o + seq_len + 1). They come only from a numpy Generator,
so its bit-generator state IS the data position: save `Batches.state_dict()` (the RNG state,
plus the batch count for humans) and a resumed run draws exactly the same batches.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sysconfig
import warnings
from dataclasses import dataclass, field

import numpy as np

from .errors import TritnetError

HELD_OUT_EVERY = 20          # file i is held out when i % 20 == 0; single sources: last 1/20
TEXT_VOCAB_SIZE = 256
_BIN_DTYPES = {"uint8": np.uint8, "uint16": np.uint16}
_NOT_STDLIB = {"site-packages", "dist-packages", "__pycache__"}


class DataError(TritnetError, ValueError):
    """Data cannot be used; the message says what, where, and how to fix it."""


@dataclass
class Corpus:
    """Train and held-out token arrays (1-D uint8/uint16 arrays or read-only memmaps)."""

    train: np.ndarray
    val: np.ndarray
    vocab_size: int
    source: str                       # what was read, for logs
    n_files: int = 1
    skipped_files: list = field(default_factory=list)   # non-UTF-8 files left out
    split_rule: str = ""
    tokens_per_byte: float | None = 1.0   # None: tokens are not bytes (bpb unknown)
    token_bytes: np.ndarray | None = None   # subword tokens (tritnet.tokenizer): how many
                                            # bytes each token id stands for

    def split(self, name: str) -> np.ndarray:
        if name not in ("train", "val"):
            raise DataError(f"unknown split {name!r}: expected 'train' or 'val'")
        return self.train if name == "train" else self.val

    def tokens_per_byte_of(self, targets) -> float:
        """Tokens per byte of the text that `targets` (token ids, any shape) stand for. With
        subword tokens it is their count over their bytes, so that bits per token times it is
        bits per byte of exactly that text; otherwise the corpus's fixed ratio (1 for bytes)."""
        if self.token_bytes is None:
            return self.tokens_per_byte or 1.0
        ids = np.asarray(targets).reshape(-1)
        return ids.size / max(int(self.token_bytes[ids].sum()), 1)

    def check_seq_len(self, seq_len: int) -> None:
        """Fail now, not mid-run, when a split is too short for one sequence."""
        for name in ("train", "val"):
            _check_length(name, self.split(name), seq_len, self.source)

    def identity(self) -> dict:
        """What a checkpoint records of the data it was trained on: the source (for messages;
        a path made absolute), the splits' lengths, the vocabulary and a sha256 of the tokens
        read (train, then held-out), so the same data is recognised however it is named."""
        digest = hashlib.sha256()
        for split in (self.train, self.val):
            digest.update(np.dtype(split.dtype).str.encode() + len(split).to_bytes(8, "little"))
            for i in range(0, len(split), 1 << 24):   # a large memmap in pieces
                digest.update(np.ascontiguousarray(split[i:i + (1 << 24)]))
        source = os.path.abspath(self.source) if os.path.exists(self.source) else self.source
        return {"source": source, "train_tokens": len(self.train),
                "val_tokens": len(self.val), "vocab_size": int(self.vocab_size),
                "sha256": digest.hexdigest()}

    def describe(self) -> str:
        skipped = f", {len(self.skipped_files)} non-UTF-8 files skipped" if self.skipped_files else ""
        return (f"{self.source}: {self.n_files} file(s){skipped}, {len(self.train):,} train + "
                f"{len(self.val):,} held-out tokens, vocab {self.vocab_size} ({self.split_rule})")


def same_data(recorded: dict, read: dict) -> bool:
    """Whether two Corpus.identity() describe the same tokens and vocabulary (the source, a
    name, may differ)."""
    return all(recorded.get(k) == read.get(k)
               for k in ("train_tokens", "val_tokens", "vocab_size", "sha256"))


# --------------------------------------------------------------------------------------------
# Building corpora.


def _split_files(blobs, source, n_skipped=0, skipped=()):
    """The split rule over a sorted list of byte strings (one per file)."""
    if len(blobs) >= HELD_OUT_EVERY:
        val = b"\n".join(b for i, b in enumerate(blobs) if i % HELD_OUT_EVERY == 0)
        train = b"\n".join(b for i, b in enumerate(blobs) if i % HELD_OUT_EVERY != 0)
        rule = f"held-out = sorted file index % {HELD_OUT_EVERY} == 0"
        corpus = Corpus(np.frombuffer(train, np.uint8), np.frombuffer(val, np.uint8),
                        TEXT_VOCAB_SIZE, source, len(blobs), list(skipped), rule)
    else:
        corpus = _split_tail(np.frombuffer(b"\n".join(blobs), np.uint8), TEXT_VOCAB_SIZE, source)
        corpus.n_files, corpus.skipped_files = len(blobs), list(skipped)
    for name in ("train", "val"):
        if len(corpus.split(name)) == 0:
            raise DataError(f"{source}: the {name} split is empty (its files hold no bytes); "
                            "point --data at text files that are not empty")
    return corpus


def _split_tail(tokens, vocab_size, source, tokens_per_byte=1.0):
    n = len(tokens)
    if n < 2:
        raise DataError(f"{source}: {n} token(s) is too little data to split into train and "
                        "held-out; give at least a few KB of text")
    n_val = max(1, n // HELD_OUT_EVERY)
    return Corpus(tokens[: n - n_val], tokens[n - n_val:], vocab_size, source, 1, [],
                  f"held-out = last {n_val:,} tokens (1/{HELD_OUT_EVERY})", tokens_per_byte)


def stdlib_files() -> list:
    """(relative POSIX path, absolute path) of the default corpus's files, sorted."""
    root = sysconfig.get_paths()["stdlib"]
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _NOT_STDLIB]
        for name in filenames:
            if name.endswith(".py"):
                full = os.path.join(dirpath, name)
                found.append((os.path.relpath(full, root).replace(os.sep, "/"), full))
    found.sort()
    return found


def default_corpus() -> Corpus:
    """The standard library's *.py files of the running Python, split by the fixed file rule.

    Built fresh each time (no cache): about 1800 files / 31 MB on CPython 3.11, read in well
    under a second.
    """
    root = sysconfig.get_paths()["stdlib"]
    files = stdlib_files()
    if not files:
        raise DataError(f"the default corpus is empty: no *.py files under {root} (a Python "
                        "without its standard library sources?); pass --data PATH")
    blobs = []
    for _, full in files:
        with open(full, "rb") as fh:
            blobs.append(fh.read())
    return _split_files(blobs, f"Python {sysconfig.get_python_version()} standard library "
                               f"({root})")


def _read_file(path) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}; check that it exists and that you "
                        "may read it") from None


def _is_utf8(blob: bytes) -> bool:
    try:
        blob.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def _text_directory(path) -> Corpus:
    entries = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith("."):
                full = os.path.join(dirpath, name)
                entries.append((os.path.relpath(full, path).replace(os.sep, "/"), full))
    entries.sort()
    blobs, skipped = [], []
    for rel, full in entries:
        if not os.path.isfile(full):
            continue  # broken link, socket, ...
        blob = _read_file(full)
        if _is_utf8(blob):
            blobs.append(blob)
        else:
            skipped.append(rel)
    if skipped:
        warnings.warn(f"load_corpus: skipped {len(skipped)} file(s) under {path} that are not "
                      f"UTF-8 text (first: {skipped[0]})", stacklevel=3)
    if not blobs:
        raise DataError(f"{path}: no UTF-8 text files found ({len(entries)} file(s) seen, "
                        f"{len(skipped)} not UTF-8); point --data at text, or a .bin of tokens")
    return _split_files(blobs, f"{path}", skipped=skipped)


def _bin_dtype(path, dtype):
    sidecar = {}
    side = path + ".json"
    if os.path.exists(side):
        try:
            with open(side) as fh:
                sidecar = json.load(fh)
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read the sidecar {side}: {e}; it must be JSON such as "
                            '{"dtype": "uint16", "vocab_size": 50257}') from None
        if not isinstance(sidecar, dict):
            raise DataError(f"{side} must hold a JSON object such as {{\"dtype\": \"uint16\"}}")
    if dtype is None:
        dtype = sidecar.get("dtype")
    if dtype is None:
        dtype = "uint16" if path.endswith(".u16.bin") else "uint8"
    try:
        name = np.dtype(dtype).name
    except TypeError:
        name = str(dtype)
    if name not in _BIN_DTYPES:
        raise DataError(f"{path}: token dtype {name!r} is not supported; use uint8 or uint16")
    return np.dtype(_BIN_DTYPES[name]), sidecar


def _token_file(path, dtype) -> Corpus:
    dtype, sidecar = _bin_dtype(path, dtype)
    size = os.path.getsize(path)
    if size == 0:
        raise DataError(f"{path} is empty (0 bytes); point --data at a file of tokens")
    if size % dtype.itemsize:
        raise DataError(f"{path} has {size} bytes, not a multiple of {dtype.itemsize} ({dtype.name} "
                        "tokens): a truncated file, or the wrong --dtype")
    try:
        tokens = np.memmap(path, dtype=dtype, mode="r")
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}; check its permissions") from None
    vocab = sidecar.get("vocab_size")
    if vocab is None and dtype == np.uint8:
        vocab = TEXT_VOCAB_SIZE   # every byte is a token: no need to scan the file
    else:
        largest = _max_token(tokens)
        if vocab is None:
            vocab = largest + 1
        elif not isinstance(vocab, int) or isinstance(vocab, bool) or largest >= vocab:
            raise DataError(f"{path}: the sidecar says vocab_size={vocab!r} but the file holds "
                            f"token {largest}; fix {path}.json")
    tokens_per_byte = sidecar.get("tokens_per_byte", 1.0 if dtype == np.uint8 else None)
    return _split_tail(tokens, int(vocab), path, tokens_per_byte)


def _max_token(tokens) -> int:
    step = 1 << 24   # read a large memmap in pieces
    return max(int(tokens[i:i + step].max()) for i in range(0, len(tokens), step))


def load_corpus(path=None, *, dtype=None) -> Corpus:
    """A corpus from a text file, a directory of text files, or a `.bin` of tokens (module doc
    has the rules); path None gives `default_corpus()`. dtype: uint8/uint16 for `.bin`."""
    if path is None:
        return default_corpus()
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(f"data path {path} does not exist; give a text file, a folder of text "
                        "files or a .bin of tokens (or leave --data out for the default corpus)")
    if os.path.isdir(path):
        if dtype is not None:
            raise DataError(f"--dtype applies to .bin token files; {path} is a folder of text")
        return _text_directory(path)
    if not os.path.isfile(path):
        raise DataError(f"data path {path} is not a regular file (a FIFO, socket or device); "
                        "give a text file, a folder of text files or a .bin of tokens")
    if path.endswith(".bin"):
        return _token_file(path, dtype)
    if dtype is not None:
        raise DataError(f"--dtype applies to .bin token files; {path} is read as text")
    blob = _read_file(path)
    if not blob:
        raise DataError(f"{path} is empty; point --data at a file with text in it")
    if not _is_utf8(blob):
        raise DataError(f"{path} is not UTF-8 text; convert it to UTF-8, or if it holds tokens "
                        "name it *.bin (uint8) or *.u16.bin (uint16)")
    return _split_tail(np.frombuffer(blob, np.uint8), TEXT_VOCAB_SIZE, path)


# --------------------------------------------------------------------------------------------
# Batches.


def _check_length(name, data, seq_len, source=""):
    if not isinstance(seq_len, (int, np.integer)) or isinstance(seq_len, bool) or seq_len < 1:
        raise DataError(f"seq_len must be a positive integer, got {seq_len!r}")
    if len(data) < seq_len + 1:
        where = f" of {source}" if source else ""
        raise DataError(f"the {name} split{where} has {len(data):,} tokens, too few for "
                        f"seq_len {seq_len} (one sequence needs {seq_len + 1}); use a smaller "
                        "--seq-len or more data")


def get_batch(data, batch_size: int, seq_len: int, rng: np.random.Generator, name="data"):
    """nanoGPT's batch: x, y int64 (batch_size, seq_len), y = x shifted by one token.

    Offsets are rng.integers(0, len - seq_len, batch_size): the same Generator state gives the
    same batch, on any machine.
    """
    if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool) \
            or batch_size < 1:
        raise DataError(f"batch_size must be a positive integer, got {batch_size!r}")
    _check_length(name, data, seq_len)
    offsets = rng.integers(0, len(data) - seq_len, size=batch_size)
    window = np.asarray(data[offsets[:, None] + np.arange(seq_len + 1)], dtype=np.int64)
    return window[:, :-1], window[:, 1:]


def eval_batches(data, batch_size: int, seq_len: int, max_batches: int | None = None):
    """Held-out batches without randomness: non-overlapping windows of the split, evenly spaced
    over it when max_batches limits them. Same windows every evaluation, so successive
    held-out numbers are comparable."""
    _check_length("val", data, seq_len)
    n_windows = (len(data) - 1) // seq_len
    starts = np.arange(n_windows, dtype=np.int64) * seq_len
    if max_batches is not None and n_windows > max_batches * batch_size:
        pick = np.linspace(0, n_windows - 1, max_batches * batch_size).round().astype(np.int64)
        starts = starts[pick]
    for i in range(0, len(starts), batch_size):
        window = np.asarray(data[starts[i:i + batch_size, None] + np.arange(seq_len + 1)],
                            dtype=np.int64)
        yield window[:, :-1], window[:, 1:]


class Batches:
    """Random training/held-out batches from a Corpus, from one seeded Generator.

    position: `state_dict()` (the Generator's bit-generator state and the number of batches
    drawn) restored by `load_state_dict` continues with exactly the batches an uninterrupted
    run would have drawn; the RNG state alone is enough, since offsets come only from it.
    """

    def __init__(self, corpus: Corpus, batch_size: int, seq_len: int, seed: int = 0):
        corpus.check_seq_len(seq_len)
        self.corpus, self.batch_size, self.seq_len = corpus, batch_size, seq_len
        self.rng = np.random.default_rng(seed)
        self.batches_drawn = 0

    def get(self, split: str = "train"):
        x, y = get_batch(self.corpus.split(split), self.batch_size, self.seq_len, self.rng,
                         name=split)
        self.batches_drawn += 1
        return x, y

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "batches_drawn": self.batches_drawn}

    def load_state_dict(self, state: dict) -> None:
        try:
            self.rng.bit_generator.state = state["rng"]
            self.batches_drawn = int(state["batches_drawn"])
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"data position cannot be restored ({type(e).__name__}: {e}); the "
                            "checkpoint's train_state['data'] is damaged") from None


# --------------------------------------------------------------------------------------------
# Baseline and units.


def bits_per_byte(mean_nats_per_token: float, tokens_per_byte: float = 1.0) -> float:
    """Mean cross-entropy in nats per token -> bits per byte (bits/token × tokens/byte)."""
    return float(mean_nats_per_token) / math.log(2) * float(tokens_per_byte)


def _pair_counts_dense(tokens, vocab):
    counts = np.zeros(vocab * vocab, dtype=np.int64)
    step = 1 << 22
    for i in range(0, len(tokens) - 1, step):
        a = np.asarray(tokens[i:i + step + 1], dtype=np.int64)
        counts += np.bincount(a[:-1] * vocab + a[1:], minlength=vocab * vocab)
    return counts.reshape(vocab, vocab)


def bigram_bpb(train, val, vocab: int, tokens_per_byte: float = 1.0) -> float:
    """Bits per byte on `val` of an add-one (Laplace) smoothed bigram model fitted on `train`:
    p(b | a) = (count(a, b) + 1) / (count(a) + vocab), scored over the len(val) - 1 transitions
    of val. The baseline printed beside the model's held-out bpb."""
    if len(train) < 2 or len(val) < 2:
        raise DataError(f"bigram_bpb needs at least 2 tokens per split, got {len(train)} train "
                        f"and {len(val)} held-out")
    if vocab <= 1024:   # vocab² int64 counts <= 8 MB
        counts = _pair_counts_dense(train, vocab)
        row_totals = counts.sum(1)
        v = np.asarray(val, dtype=np.int64)
        pair = counts[v[:-1], v[1:]]
        nats = -np.log((pair + 1) / (row_totals[v[:-1]] + vocab))
        return bits_per_byte(float(nats.mean()), tokens_per_byte)
    # Large vocabularies: count only the pairs that occur (sorted keys), not vocab² cells.
    t = np.asarray(train, dtype=np.int64)
    keys, key_counts = np.unique(t[:-1] * vocab + t[1:], return_counts=True)
    row_totals = np.bincount(t[:-1], minlength=vocab)
    v = np.asarray(val, dtype=np.int64)
    q = v[:-1] * vocab + v[1:]
    at = np.clip(np.searchsorted(keys, q), 0, len(keys) - 1)
    pair = np.where(keys[at] == q, key_counts[at], 0)
    nats = -np.log((pair + 1) / (row_totals[v[:-1]] + vocab))
    return bits_per_byte(float(nats.mean()), tokens_per_byte)
