"""Subword tokens: byte-level BPE through Hugging Face's `tokenizers` (an optional extra).

    tritnet tokenizer train --data ~/notes --vocab-size 4096 -o tok.json
    tritnet train --data ~/notes --tokenizer tok.json       # vocab_size follows: 4096

A byte-level BPE starts from the 256 bytes (written as 256 printable characters, GPT-2's
alphabet) and merges frequent pairs, so any text encodes, nothing is unknown, and every token
stands for a fixed string of bytes. That is what keeps scores in bits per byte: a window's
bits are divided by the bytes its tokens stand for (Corpus.tokens_per_byte_of), so byte and
BPE runs compare directly. A tokenizer here must keep every byte of the text (no normaliser,
no prefix space): encoding checks that the tokens' bytes add up to the text's. Bytes that are
not UTF-8 (a Latin-1 file of the standard library, say) cannot go through the library, which
takes text: each becomes its own single-byte token, and the text around it is encoded as
usual.

A run keeps its tokenizer twice: `tokenizer.json` in the run folder and the checkpoint's root
attribute `tokenizer` (the same JSON), so sample, eval, export and --resume read and write
text with it.

The library is imported only when a tokenizer is made or read: byte-level runs need nothing.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np

from .data import Corpus
from .errors import TritnetError

MAX_VOCAB = 65536               # tokens are stored as uint16, and Config.vocab_size's limit
PIECE_BYTES = 1 << 20           # text is encoded in pieces of about this size ...
PIECES_AT_ONCE = 8              # ... this many at a time (bounded memory, several threads)
# Where text may be cut into pieces: between a printable ASCII character and a newline. The
# ByteLevel pre-tokenizer splits there whatever surrounds it (no word, number or punctuation
# run takes a newline, and the whitespace run that starts at it is the same in both), so the
# pieces' tokens are the whole text's.
_CUT = re.compile(rb"[!-~](?=\n)")
_ESCAPED_RUN = re.compile("[\udc80-\udcff]+|[^\udc80-\udcff]+")


class TokenizerError(TritnetError, ValueError):
    """A tokenizer that cannot be made, read or used; the message says what to do."""


def _library():
    try:
        import tokenizers
    except ImportError:
        raise TokenizerError("subword tokenizers need Hugging Face's tokenizers library, which "
                             "is not installed: pip install \"tritnet[tokenizers]\" (or pip "
                             "install tokenizers)") from None
    return tokenizers


def byte_alphabet() -> dict:
    """GPT-2's byte-level alphabet as {character: byte}: printable bytes stand for themselves,
    the others (controls, space, ...) for the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class Tokenizer:
    """A byte-level BPE tokenizer: ids <-> text, and the bytes each id stands for."""

    def __init__(self, text: str, source: str = "the tokenizer"):
        """From the tokenizer's JSON text (a `tokenizer.json`); `source` names it in
        messages. Raises TokenizerError for anything tritnet cannot train on."""
        try:
            spec = json.loads(text)
        except ValueError as e:
            raise TokenizerError(f"{source} is not a tokenizer: not JSON ({e}); give a "
                                 "tokenizer.json from tritnet tokenizer train") from None
        model = spec.get("model") if isinstance(spec, dict) else None
        if not isinstance(model, dict) or not isinstance(model.get("vocab"), dict):
            raise TokenizerError(f"{source} is not a tokenizer.json (no model with a "
                                 "vocabulary); give one from tritnet tokenizer train")
        if model.get("type") != "BPE":
            raise TokenizerError(f"{source} holds a {model.get('type')} model; tritnet reads "
                                 "byte-level BPE tokenizers (tritnet tokenizer train makes one)")
        try:
            self.hf = _library().Tokenizer.from_str(text)
        except TokenizerError:
            raise
        except Exception as e:   # the library's own parse errors have no common class
            raise TokenizerError(f"{source}: the tokenizers library cannot read it ({e})") \
                from None
        self.source = source
        vocab = self.hf.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1
        if not 256 < self.vocab_size <= MAX_VOCAB:
            raise TokenizerError(f"{source} has {self.vocab_size} tokens; tritnet takes more "
                                 f"than 256 (the bytes) and at most {MAX_VOCAB}")
        alphabet = byte_alphabet()
        added = {t.content for t in self.hf.get_added_tokens_decoder().values()}
        self.token_bytes = [b""] * self.vocab_size
        for token, i in vocab.items():
            if token in added:   # a special token stands for its own text
                self.token_bytes[i] = token.encode("utf-8")
            elif all(c in alphabet for c in token):
                self.token_bytes[i] = bytes(alphabet[c] for c in token)
            else:
                raise TokenizerError(f"{source}: token {i} ({token!r}) is not written in the "
                                     "byte-level alphabet; tritnet reads byte-level BPE "
                                     "tokenizers (tritnet tokenizer train makes one)")
        self.byte_counts = np.array([len(b) for b in self.token_bytes], dtype=np.int64)
        # the single-byte token of each byte (-1: none), for bytes that are not UTF-8
        self.byte_ids = np.full(256, -1, np.int64)
        for char, b in alphabet.items():
            self.byte_ids[b] = vocab.get(char, -1)

    def to_json(self) -> str:
        return self.hf.to_str()

    def __reduce__(self):   # rebuilt from its JSON in another process (data-parallel ranks)
        return Tokenizer, (self.to_json(), self.source)

    def __eq__(self, other):
        return isinstance(other, Tokenizer) and self.to_json() == other.to_json()

    def describe(self) -> str:
        return f"byte-level BPE, {self.vocab_size:,} tokens"

    # --- text <-> ids -------------------------------------------------------------------
    def encode(self, text) -> np.ndarray:
        """Token ids (uint16) of text (str, or bytes of UTF-8)."""
        blob = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return self._encode_pieces(blob)

    def decode(self, ids) -> str:
        """The text ids stand for; bytes that are not UTF-8 (a token that ends mid-character)
        become U+FFFD."""
        return b"".join(self.token_bytes[int(i)] for i in ids).decode("utf-8", "replace")

    def _encode_pieces(self, blob: bytes, where: str = "the text") -> np.ndarray:
        texts, parts = [], []   # parts: token arrays, or the index of a text to encode
        for piece in text_pieces(blob):
            for text, raw in utf8_runs(piece):
                if raw is None:
                    parts.append(len(texts))
                    texts.append(text)
                else:
                    ids = self.byte_ids[np.frombuffer(raw, np.uint8)]
                    if (ids < 0).any():
                        raise TokenizerError(f"{self.source} has no token for byte "
                                             f"{raw[int(np.argmin(ids))]:#04x} ({where} holds it, "
                                             "outside UTF-8 text)")
                    parts.append(ids.astype(np.uint16))
        encode = getattr(self.hf, "encode_batch_fast", self.hf.encode_batch)   # no offsets
        encoded = []
        for i in range(0, len(texts), PIECES_AT_ONCE):
            encoded += [np.asarray(e.ids, dtype=np.uint16)
                        for e in encode(texts[i:i + PIECES_AT_ONCE], add_special_tokens=False)]
        ids = np.concatenate([encoded[p] if isinstance(p, int) else p for p in parts]) \
            if parts else np.zeros(0, np.uint16)
        covered = int(self.byte_counts[ids].sum())
        if covered != len(blob):
            raise TokenizerError(f"{self.source} does not keep the text's bytes ({where}: "
                                 f"{len(blob):,} bytes, its tokens stand for {covered:,}); it "
                                 "normalises or adds text (a prefix space?): tritnet needs a "
                                 "byte-level BPE without either (tritnet tokenizer train)")
        return ids

    def encode_corpus(self, corpus: Corpus) -> Corpus:
        """The corpus's text (bytes, already split into train and held-out) as this
        tokenizer's tokens, split alike; bits per byte stay countable (token_bytes)."""
        if corpus.token_bytes is not None or corpus.vocab_size != 256 or \
                np.dtype(corpus.train.dtype) != np.uint8:
            raise TokenizerError(f"{corpus.source} holds tokens already (vocabulary "
                                 f"{corpus.vocab_size}); a tokenizer reads text: point --data "
                                 "at text files")
        splits = [self._encode_pieces(np.asarray(split).tobytes(), f"{name} of {corpus.source}")
                  for name, split in (("the train split", corpus.train),
                                      ("the held-out split", corpus.val))]
        rule = (f"{corpus.split_rule}, as bytes; {self.describe()}, "
                f"{len(corpus.val) / max(len(splits[1]), 1):.2f} bytes a held-out token")
        return Corpus(splits[0], splits[1], self.vocab_size, corpus.source, corpus.n_files,
                      corpus.skipped_files, rule, len(splits[1]) / max(len(corpus.val), 1),
                      self.byte_counts)


def text_pieces(blob: bytes, size: int = PIECE_BYTES):
    """blob cut into pieces of about `size` bytes at places where the pre-tokenizer splits
    anyway (_CUT), so that encoding the pieces one by one gives the whole text's tokens."""
    start = 0
    while len(blob) - start > size:
        cut = _CUT.search(blob, start + size)
        if cut is None:
            break
        yield blob[start:cut.end()]
        start = cut.end()
    yield blob[start:]


def utf8_runs(blob: bytes):
    """(text, None) for each run of UTF-8 text in blob and (None, bytes) for each run of bytes
    that are not, in order."""
    if blob.isascii():
        yield blob.decode("ascii"), None
        return
    escaped = blob.decode("utf-8", "surrogateescape")   # a stray byte b -> U+DC00 + b
    for run in _ESCAPED_RUN.finditer(escaped):
        part = run.group()
        if "\udc80" <= part[0] <= "\udcff":
            yield None, part.encode("utf-8", "surrogateescape")
        else:
            yield part, None


def load_tokenizer(path) -> Tokenizer:
    """A tokenizer.json file, checked (TokenizerError names what is wrong)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise TokenizerError(f"tokenizer file {path} does not exist (or is not a file); make "
                             "one with tritnet tokenizer train")
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerError(f"cannot read the tokenizer file {path} "
                             f"({getattr(e, 'strerror', None) or e})") from None
    return Tokenizer(text, source=f"tokenizer file {path}")


def checkpoint_tokenizer(path) -> Tokenizer | None:
    """The tokenizer a checkpoint's model reads (None: it reads bytes)."""
    from .checkpoint import read_header
    text = read_header(path)["tokenizer"]
    return None if text is None else Tokenizer(text, source=f"the tokenizer of {os.fspath(path)}")


def train_tokenizer(corpus: Corpus, vocab_size: int) -> Tokenizer:
    """A byte-level BPE of at most `vocab_size` tokens learned from the corpus's train split
    only (its held-out text stays unseen). Small data may give fewer tokens than asked."""
    if not isinstance(vocab_size, int) or not 256 < vocab_size <= MAX_VOCAB:
        raise TokenizerError(f"vocab size {vocab_size!r}: a byte-level BPE holds the 256 bytes "
                             f"and its merges; give more than 256 and at most {MAX_VOCAB}")
    if corpus.vocab_size != 256 or np.dtype(corpus.train.dtype) != np.uint8:
        raise TokenizerError(f"{corpus.source} holds tokens already (vocabulary "
                             f"{corpus.vocab_size}); train a tokenizer on text files")
    lib = _library()
    from tokenizers import decoders, models, pre_tokenizers, trainers
    blob = np.asarray(corpus.train).tobytes()
    text = [t for piece in text_pieces(blob) for t, _ in utf8_runs(piece) if t is not None]
    hf = lib.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(text, trainer, length=len(text))
    return Tokenizer(hf.to_str(), source=f"the tokenizer learned from {corpus.source}")


def save_tokenizer(tokenizer: Tokenizer, path) -> None:
    """Write the tokenizer's JSON to path atomically (a temporary file renamed onto it)."""
    path = os.fspath(path)
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)),
                       f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(tokenizer.to_json())
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise TokenizerError(f"cannot write {path} ({e.strerror or e}); free disk space or "
                             "choose another path") from None
