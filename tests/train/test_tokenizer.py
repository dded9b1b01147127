"""Subword tokens: a tiny BPE run end to end on the CPU (tokenizer train, train, sample, eval,
resume), held-out scores in bits per byte of the text, and one error line for each thing that
cannot be used."""

import json
import math
import re
import sys

import numpy as np
import pytest

from tests import helpers
from tests.helpers import cli, one_error_line, small_config, write_run_files
from tritnet import data as tdata
from tritnet.checkpoint import read_header
from tritnet.sample import load_model
from tritnet.tokenizer import (Tokenizer, TokenizerError, load_tokenizer, text_pieces,
                               train_tokenizer)
from tritnet.train import evaluate

pytestmark = pytest.mark.usefixtures("cpu_only")
TINY = small_config(steps=4, eval_every=2, eval_batches=2, save_every=0)
# its own corpus, not code_text(): a non-ASCII comment and a blank line after each function
TEXT = "".join(f"def f{i}(x):\n    return x * {i % 7} + 1  # é{i}\n\n" for i in range(300))


@pytest.fixture
def files(tmp_path):
    return write_run_files(tmp_path, TINY, TEXT, config_name="tiny.json")


def train_args(files, out, *extra):
    return helpers.train_args(files, out, *extra, config_name="tiny.json")


@pytest.fixture
def tok_file(files):
    res = cli("tokenizer", "train", "--data", files / "code.txt", "--vocab-size", 300, "-o",
              files / "tok.json")
    assert res.exit_code == 0, res.output
    assert re.fullmatch(r"wrote .*tok.json: byte-level BPE, 300 tokens, learned from [\d,]+ bytes "
                        r"of .*code.txt; \d\.\d\d bytes a token on its held-out split\n",
                        res.stdout), res.stdout
    return files / "tok.json"


def test_a_bpe_run_end_to_end(files, tok_file):
    tok = load_tokenizer(tok_file)
    run = files / "run"
    res = cli(*train_args(files, run, "--tokenizer", tok_file))
    assert res.exit_code == 0, res.output
    assert "byte-level BPE, 300 tokens" in res.stdout and "held-out" in res.stdout

    # the model's vocabulary follows the tokenizer, and the run keeps the tokenizer twice
    assert json.loads((run / "config.json").read_text())["vocab_size"] == 300
    assert (run / "tokenizer.json").read_text() == tok.to_json()
    assert read_header(run / "ckpt.h5")["tokenizer"] == tok.to_json()
    shown = cli("inspect", run / "ckpt.h5")
    assert shown.exit_code == 0 and "\ntokenizer: BPE, 300 tokens (" in shown.stdout

    # held-out bits are counted against the bytes the scored tokens stand for
    model, config = load_model(run / "ckpt.h5")
    corpus = tok.encode_corpus(tdata.load_corpus(files / "code.txt"))
    windows = list(tdata.eval_batches(corpus.val, config.batch_size, config.seq_len,
                                      config.eval_batches))
    nats = evaluate(model, windows) * sum(y.size for _, y in windows)
    covered = sum(int(tok.byte_counts[y].sum()) for _, y in windows)
    expected = nats / math.log(2) / covered
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["val_bpb"] == pytest.approx(expected, rel=1e-9)
    assert covered > 1.5 * sum(y.size for _, y in windows)   # BPE tokens hold several bytes
    res = cli("eval", run / "ckpt.h5", "--data", files / "code.txt")
    assert res.exit_code == 0, res.output
    assert f"held-out {last['val_bpb']:.4f} bpb" in res.stdout
    assert f"bigram baseline {last['bigram_bpb']:.4f} bpb" in res.stdout

    # sample writes text through the tokenizer: greedy, it is the decoded greedy tokens
    res = cli("sample", run / "ckpt.h5", "--prompt", "def f", "--tokens", 12,
              "--temperature", 0)
    assert res.exit_code == 0, res.output
    ids = model.generate([int(t) for t in tok.encode("def f")], 12, temperature=0)
    assert res.stdout == "def f" + tok.decode(ids) + "\n"

    # resume goes on with the run's own tokenizer; another is refused
    res = cli("train", "--data", files / "code.txt", "--out", run, "--resume", "--steps", 6)
    assert res.exit_code == 0, res.output
    assert re.search(r"done: step 6, .*this run \d+s, run total \d+s", res.stdout), res.stdout
    assert read_header(run / "ckpt.h5")["tokenizer"] == tok.to_json()
    other = train_tokenizer(tdata.load_corpus(files / "code.txt"), 280)
    (files / "other.json").write_text(other.to_json())
    one_error_line(cli("train", "--data", files / "code.txt", "--out", run, "--resume",
                       "--steps", 8, "--tokenizer", files / "other.json"), 1,
                   r"resume: .*ckpt.h5 was trained with another tokenizer than tokenizer file "
                   r".*other.json; drop --tokenizer")


def test_the_pieces_of_a_long_text_give_the_whole_texts_tokens(files):
    import email.message
    import json.decoder
    tok = train_tokenizer(tdata.load_corpus(files / "code.txt"), 300)
    text = b"".join(open(m.__file__, "rb").read() for m in (json.decoder, email.message))
    pieces = list(text_pieces(text, 500))
    assert len(pieces) > 50 and b"".join(pieces) == text
    whole = tok.hf.encode(text.decode(), add_special_tokens=False).ids
    by_pieces = np.concatenate([tok.hf.encode(p.decode(), add_special_tokens=False).ids
                                for p in pieces])
    assert by_pieces.tolist() == whole


def test_bytes_that_are_not_utf8_become_byte_tokens(files):
    tok = train_tokenizer(tdata.load_corpus(files / "code.txt"), 300)
    blob = b"def f(x):\n    return caf\xe9 \xff\xfe\n"
    ids = tok.encode(blob)
    assert b"".join(tok.token_bytes[i] for i in ids) == blob
    assert tok.decode(ids) == blob.decode("utf-8", "replace")


def test_tokens_per_byte_counts_the_bytes_of_the_targets(files):
    tok = train_tokenizer(tdata.load_corpus(files / "code.txt"), 300)
    corpus = tok.encode_corpus(tdata.load_corpus(files / "code.txt"))
    ids = corpus.val[:10]
    assert corpus.tokens_per_byte_of(ids) == 10 / sum(len(tok.token_bytes[i]) for i in ids)
    byte_corpus = tdata.load_corpus(files / "code.txt")
    assert byte_corpus.tokens_per_byte_of(byte_corpus.val[:10]) == 1.0


def test_what_cannot_be_used_is_one_line(files, tok_file):
    data = files / "code.txt"
    one_error_line(cli("tokenizer", "train", "--data", data, "--vocab-size", 300, "-o",
                       tok_file), 1,
                   r"tok.json exists; runs may have been trained with it, so it is not "
                   r"replaced: choose another -o")
    one_error_line(cli("tokenizer", "train", "--data", data, "--vocab-size", 100, "-o",
                       files / "t.json"), 2, r"Invalid value for '--vocab-size': 100 is not in "
                   r"the range 257<=x<=65536")
    one_error_line(cli("tokenizer", "train", "--data", data), 2, r"Missing option '-o'")
    one_error_line(cli(*train_args(files, files / "r", "--tokenizer", files / "none.json")), 1,
                   r"tokenizer file .*none.json does not exist \(or is not a file\); make one "
                   r"with tritnet tokenizer train")
    (files / "bad.json").write_text("{not json")
    one_error_line(cli(*train_args(files, files / "r", "--tokenizer", files / "bad.json")), 1,
                   r"tokenizer file .*bad.json is not a tokenizer: not JSON")
    (files / "cfg.json").write_text('{"d_model": 32}')
    one_error_line(cli(*train_args(files, files / "r", "--tokenizer", files / "cfg.json")), 1,
                   r"cfg.json is not a tokenizer.json \(no model with a vocabulary\)")
    spec = json.loads(tok_file.read_text())
    spec["model"]["type"] = "WordPiece"
    (files / "wp.json").write_text(json.dumps(spec))
    one_error_line(cli(*train_args(files, files / "r", "--tokenizer", files / "wp.json")), 1,
                   r"wp.json holds a WordPiece model; tritnet reads byte-level BPE tokenizers")
    spec = json.loads(tok_file.read_text())
    spec["pre_tokenizer"]["add_prefix_space"] = True   # adds a byte to every piece of text
    (files / "prefix.json").write_text(json.dumps(spec))
    one_error_line(cli(*train_args(files, files / "r", "--tokenizer", files / "prefix.json")),
                   1, r"prefix.json does not keep the text's bytes \(the train split of .*: "
                   r"[\d,]+ bytes, its tokens stand for [\d,]+\); it normalises or adds text")
    np.arange(200, dtype=np.uint8).tofile(files / "tokens.bin")
    one_error_line(cli("train", "--config", files / "tiny.json", "--data", files / "tokens.bin",
                       "--out", files / "r", "--tokenizer", tok_file), 1,
                   r"tokens.bin holds tokens already|tokens.bin.*UTF-8|too few")
    assert not (files / "r").exists()
    # a byte run cannot go on with a tokenizer
    assert cli(*train_args(files, files / "bytes")).exit_code == 0
    one_error_line(cli("train", "--data", data, "--out", files / "bytes", "--resume", "--steps",
                       6, "--tokenizer", tok_file), 1,
                   r"resume: .*ckpt.h5 was trained on bytes, not on subword tokens; drop "
                   r"--tokenizer")


def test_a_bin_of_tokens_is_not_text(files, tok_file):
    np.arange(300, dtype=np.uint16).tofile(files / "ids.u16.bin")
    corpus = tdata.load_corpus(files / "ids.u16.bin")
    with pytest.raises(TokenizerError, match=r"ids.u16.bin holds tokens already \(vocabulary "
                                             r"300\); a tokenizer reads text"):
        load_tokenizer(tok_file).encode_corpus(corpus)


def test_without_the_library_it_says_how_to_install_it(files, tok_file, monkeypatch):
    for name in [m for m in sys.modules if m == "tokenizers" or m.startswith("tokenizers.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "tokenizers", None)   # `import tokenizers` fails
    install = r"need Hugging Face's tokenizers library, which is not installed: pip install " \
              r"\"tritnet\[tokenizers\]\""
    one_error_line(cli("tokenizer", "train", "--data", files / "code.txt", "-o",
                       files / "t.json"), 1, install)
    one_error_line(cli(*train_args(files, files / "r", "--tokenizer", tok_file)), 1, install)
    assert not (files / "t.json").exists() and not (files / "r").exists()


def test_a_tokenizer_survives_a_trip_through_pickle(files, tok_file):
    """Data-parallel ranks get the tokenizer through pickle (a spawned process)."""
    import pickle
    tok = load_tokenizer(tok_file)
    again = pickle.loads(pickle.dumps(tok))
    assert isinstance(again, Tokenizer) and again == tok
    assert again.encode(TEXT[:200]).tolist() == tok.encode(TEXT[:200]).tolist()
