"""`tritnet export` and examples/numpy_inference.py: the exported inference state, run by
plain NumPy, gives tritnet's logits; what cannot be exported is one clear error line."""

import importlib.util
import json
import os
import sys

import numpy as np
import pytest
safe_open = pytest.importorskip("safetensors").safe_open   # the test extra installs it

from tests.helpers import REPO, cli, one_error_line
from tritnet import backend
from tritnet import data as tdata
from tritnet import rng as trandom
from tritnet.autograd import no_grad
from tritnet.checkpoint import save_checkpoint
from tritnet.config import preset
from tritnet.train import build

pytestmark = pytest.mark.usefixtures("cpu_only")
# its own corpus, not code_text(): `+ {i % 3}` for `+ 1`, 600 functions
TEXT = "".join(f"def f{i}(x):\n    return x * {i % 7} + {i % 3}\n" for i in range(600))
SMALL = dict(d_model=32, n_layers=2, n_heads=2, context=32, n_experts=3, expert_hidden=32,
             top_k=2, codebook_dim=32, kgvq_dim=32, shared_vq_size=256, kgvq_size=64,
             graph_slots=4, seq_len=32, quiet_memory=True)
CONFIGS = {
    "tiny preset": {},
    # the other branches: memory values, hashed (active) edges, no positions, two experts a
    # token, the n-gram memory, and a model without the code memory
    "values, hashed edges, nope, n-grams": dict(SMALL, memory_values=True, graph_capacity=64,
                                                position="nope", ngram_memory=3,
                                                ngram_rows=512),
    "no code memory": dict(SMALL, use_shared_vq=False),
}


def numpy_inference():
    spec = importlib.util.spec_from_file_location(
        "numpy_inference", os.path.join(REPO, "examples", "numpy_inference.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def trained(config, steps=3):
    """A model after a few training steps: its code graphs hold learned edges."""
    trandom.manual_seed(0)
    model, optimizer = build(config)
    tokens, rng = np.frombuffer(TEXT.encode(), np.uint8), np.random.default_rng(0)
    for _ in range(steps):
        x, y = tdata.get_batch(tokens, 4, config.seq_len, rng)
        loss, _ = model.loss(x, y)
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The tiny preset after three steps, saved once for the tests that only read it."""
    backend.set_device("cpu")
    config = preset("tiny")
    model = trained(config)
    path = tmp_path_factory.mktemp("tiny") / "ckpt.h5"
    save_checkpoint(path, model, config=config.to_dict(), train_state={"step": 3})
    return path


@pytest.mark.parametrize("name", list(CONFIGS))
def test_numpy_gives_tritnets_logits(tmp_path, name):
    config = preset("tiny").override(**CONFIGS[name])
    model = trained(config)
    ckpt, out = tmp_path / "ckpt.h5", tmp_path / "model.safetensors"
    save_checkpoint(ckpt, model, config=config.to_dict(), train_state={"step": 3})
    res = cli("export", ckpt, "-o", out)
    assert res.exit_code == 0, res.output

    exported = numpy_inference().Model(out)
    hops = []   # what each hop along the code graph added
    hop = exported.hop
    exported.hop = lambda *args: hops.append(hop(*args)) or hops[-1]
    tokens = np.frombuffer(TEXT[100:164].encode(), np.uint8).astype(np.int64).reshape(2, 32)
    with no_grad():
        expected = model(tokens)[0].data
    got = exported.logits(tokens)
    assert got.shape == expected.shape == (2, 32, config.vocab_size)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    if config.use_shared_vq and config.use_graph_edges:
        # hops along learned edges are part of what was compared: every block's, the head's
        assert len(hops) == config.n_layers + 1
        assert any(np.abs(h).sum() > 0 for h in hops)
    else:
        assert not hops


def test_the_export_holds_the_inference_state_only(checkpoint, tmp_path):
    out = tmp_path / "tiny.safetensors"
    res = cli("export", checkpoint, "-o", out)
    assert res.exit_code == 0, res.output
    size, full = os.path.getsize(out), os.path.getsize(checkpoint)
    assert res.stdout == (f"wrote {out}: {res.stdout.split(': ')[1].split(' ')[0]} tensors, "
                          f"{size:,} bytes ({size / full:.1%} of the checkpoint's {full:,})\n")
    # no accumulators (8 bits a trit) come along: the packed trits (1.6) and the code graphs'
    # edges (6 bytes a slot) are most of what does
    assert size < full / 3
    with safe_open(out, "np") as f:
        names, meta = list(f.keys()), f.metadata()
        assert f.get_tensor("blocks.0.attn.q.trits").dtype == np.uint8
        assert f.get_tensor("blocks.0.attn.q.E").dtype == np.int8
        assert f.get_tensor("blocks.0.moe.graph.dst").dtype == np.int32
        nbytes = sum(f.get_tensor(n).nbytes for n in f.keys())
    assert size - nbytes < 16384   # the rest is the header: names, shapes, metadata
    assert not [n for n in names if "accum" in n or "usage" in n]
    assert meta["format"] == "tritnet-export" and meta["format_version"] == "1"
    assert json.loads(meta["config"]) == preset("tiny").to_dict()
    assert json.loads(meta["step"]) == 3 and "tokenizer" not in meta
    cols = json.loads(meta["trit_cols"])
    assert cols["blocks.0.attn.q.trits"] == 128 and cols["shared_vq.trits"] == 64


def test_a_subword_models_export_carries_its_tokenizer(tmp_path):
    from tritnet.tokenizer import train_tokenizer
    (tmp_path / "code.txt").write_text(TEXT)
    tok = train_tokenizer(tdata.load_corpus(tmp_path / "code.txt"), 300)
    config = preset("tiny").override(**dict(SMALL, vocab_size=300))
    model = trained(config, steps=0)
    save_checkpoint(tmp_path / "ckpt.h5", model, config=config.to_dict(),
                    train_state={"step": 0}, tokenizer=tok.to_json())
    out = tmp_path / "bpe.safetensors"
    assert cli("export", tmp_path / "ckpt.h5", "-o", out).exit_code == 0
    with safe_open(out, "np") as f:
        assert f.metadata()["tokenizer"] == tok.to_json()


def test_the_example_writes_text(checkpoint, tmp_path):
    import subprocess
    out = tmp_path / "tiny.safetensors"
    assert cli("export", checkpoint, "-o", out).exit_code == 0
    res = subprocess.run([sys.executable, os.path.join(REPO, "examples", "numpy_inference.py"),
                          str(out), "--prompt", "def ", "--tokens", "5", "--temperature", "0"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("def ") and len(res.stdout) > len("def \n")


def test_what_cannot_be_exported_is_one_line(checkpoint, tmp_path):
    one_error_line(cli("export", checkpoint, "-o", tmp_path / "model.h5"), 2,
                   r"Invalid value for -o: .*model.h5: an export is a .safetensors file")
    one_error_line(cli("export", checkpoint), 2, r"Missing option '-o'")
    one_error_line(cli("export", tmp_path / "none.h5", "-o", tmp_path / "m.safetensors"), 1,
                   r"none.h5")
    damaged = tmp_path / "damaged.h5"
    damaged.write_bytes(checkpoint.read_bytes()[:20000])
    one_error_line(cli("export", damaged, "-o", tmp_path / "m.safetensors"), 1,
                   r"checkpoint .*damaged.h5 is truncated or corrupted .*; use an earlier "
                   r"checkpoint")
    one_error_line(cli("export", checkpoint, "-o", tmp_path / "no" / "m.safetensors"), 1,
                   r"cannot write .*m.safetensors: folder .*no does not exist")
    assert not list(tmp_path.glob("*.safetensors")) and not list(tmp_path.glob(".*tmp*"))


def test_without_safetensors_it_says_how_to_install_it(checkpoint, tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "safetensors" or m.startswith("safetensors.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "safetensors", None)   # `import safetensors` fails
    one_error_line(cli("export", checkpoint, "-o", tmp_path / "m.safetensors"), 1,
                   r"tritnet export needs the safetensors library, which is not installed: pip "
                   r"install \"tritnet\[export\]\"")
    assert not (tmp_path / "m.safetensors").exists()
