"""The n-gram memory: hashed rows of the recent tokens, causal, continued across decode calls,
sparse in training, and a config that refuses what it cannot mean."""

import numpy as np
import pytest

from tritnet import backend
from tritnet import rng as trandom
from tritnet.autograd import Tensor
from tritnet.gradcheck import check_backward
from tritnet.config import Config, ConfigError
from tritnet.models import CodeMemoryLM, NgramMemory
from tritnet_kernels.sparse_rows import ngram_rows
from tritnet.train import build


@pytest.fixture(autouse=True)
def _cpu():
    backend.set_device("cpu")


def reference_rows(tokens, orders, rows, pad):
    """The hash written out token by token with Python integers."""
    mask = (1 << 64) - 1

    def mix(z):
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    B, T = tokens.shape
    out = np.empty((B, T, orders - 1), np.int64)
    for b in range(B):
        for t in range(T):
            h = 0
            for back in range(orders):
                tok = int(tokens[b, t - back]) if t - back >= 0 else pad
                h = ((h ^ (tok + 1)) * 0x100000001B3) & mask
                if back:
                    n = back + 1
                    out[b, t, back - 1] = mix(h ^ ((n * 0x9E3779B97F4A7C15) & mask)) % rows
    return out


def test_rows_equal_the_reference_hash_and_stay_in_range():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, (3, 9))
    ids = ngram_rows(tokens, np.full((3, 3), 256, np.int64), 4, 1000)
    assert ids.dtype == np.int64 and ids.shape == (3, 9, 3)
    assert ids.min() >= 0 and ids.max() < 1000
    np.testing.assert_array_equal(ids, reference_rows(tokens, 4, 1000, 256))


def test_a_row_depends_on_its_n_gram_only():
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 256, (1, 12))
    ids = ngram_rows(tokens, np.full((1, 3), 256, np.int64), 4, 1 << 20)
    changed = tokens.copy()
    changed[0, 5] = (changed[0, 5] + 1) % 256
    new = ngram_rows(changed, np.full((1, 3), 256, np.int64), 4, 1 << 20)
    # positions before 5 never see it (causal); order n at t sees it iff t - n < 5 <= t
    for t in range(12):
        for k, n in enumerate((2, 3, 4)):
            sees = t - n < 5 <= t
            assert (ids[0, t, k] != new[0, t, k]) == sees, (t, n)
    # the same n-gram anywhere is the same row; different orders hash apart
    same = ngram_rows(np.array([[7, 8, 7, 8]]), np.full((1, 1), 256, np.int64), 2, 1 << 20)
    assert same[0, 1, 0] == same[0, 3, 0] and same[0, 1, 0] != same[0, 2, 0]


def test_a_window_continues_from_its_history():
    """Rows of a window split in two, the second half given the first's last tokens, equal
    the rows of the whole window (what decode relies on)."""
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, 256, (2, 10))
    pad = np.full((2, 3), 256, np.int64)
    whole = ngram_rows(tokens, pad, 4, 4099)
    first = ngram_rows(tokens[:, :6], pad, 4, 4099)
    second = ngram_rows(tokens[:, 6:], tokens[:, 3:6].astype(np.int64), 4, 4099)
    np.testing.assert_array_equal(np.concatenate([first, second], axis=1), whole)


def test_training_updates_only_the_rows_it_read():
    trandom.manual_seed(0)
    config = Config(ngram_memory=3, ngram_rows=5000, batch_size=2, seq_len=8)
    model, opt = build(config)
    before = model.ngram.table.T_packed.copy()
    tokens = np.random.default_rng(3).integers(0, 256, (2, 9))
    read = np.unique(ngram_rows(tokens[:, :-1], np.full((2, 2), 256, np.int64), 3, 5000))
    for _ in range(20):
        loss, _ = model.loss(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        opt.step()
    moved = np.nonzero((model.ngram.table.T_packed != before).any(axis=1))[0]
    assert moved.size > 0                      # it learns
    assert set(moved.tolist()) <= set(read.tolist())   # and only where it read


def test_the_memory_is_integer_state_and_counted():
    model = CodeMemoryLM(Config(ngram_memory=4, ngram_rows=1000), device="meta")
    table = model.ngram.table
    assert table.T_packed.dtype == np.uint32 and table.E.dtype == np.int8
    assert table.T_accum.dtype == np.int8 and table.E_accum.dtype == np.int8
    assert "ngram_memory" in model.components()
    assert table.logical_trits() == 1000 * Config().d_model


def test_the_n_gram_memory_learns_what_follows_a_context():
    """Bytes whose successor is set by the two before them (a third-order source): with the
    memory the tiny model's loss falls further in the same steps than without it."""
    rng = np.random.default_rng(4)
    table = rng.integers(0, 16, (16, 16))
    seq = [1, 2]
    for _ in range(6000):
        seq.append(int(table[seq[-2], seq[-1]]) if rng.random() < 0.9 else int(rng.integers(16)))
    data = np.array(seq)

    def final_loss(memory):
        trandom.manual_seed(0)
        config = Config(d_model=32, n_layers=1, n_heads=2, n_experts=2, expert_hidden=32,
                        shared_vq_size=64, kgvq_size=32, batch_size=16, seq_len=16,
                        use_shared_vq=False, use_kgvq=False, use_graph_edges=False,
                        use_composite_head=False, ngram_memory=3 if memory else 0,
                        ngram_rows=4096)
        model, opt = build(config)
        batches = np.random.default_rng(5)
        losses = []
        for step in range(150):
            starts = batches.integers(0, len(data) - 17, 16)
            window = np.stack([data[s:s + 17] for s in starts])
            loss, ce = model.loss(window[:, :-1], window[:, 1:])
            loss.backward()
            opt.step()
            losses.append(float(ce.data))
        return np.mean(losses[-30:])

    with_memory, without = final_loss(True), final_loss(False)
    assert with_memory < without - 0.1, (with_memory, without)


def test_config_refuses_an_order_of_one():
    with pytest.raises(ConfigError, match="ngram_memory = 1"):
        Config(ngram_memory=1).validate()
    with pytest.raises(ConfigError, match="ngram_rows"):
        Config(ngram_memory=2, ngram_rows=0).validate()


def test_module_pads_a_stream_without_history():
    memory = NgramMemory(50, 8, 3, 256)
    tokens = np.array([[5, 6, 7]])
    out = memory(tokens)
    assert out.shape == (1, 3, 8)
    np.testing.assert_allclose(out.data, memory(tokens, memory.history(1, np)).data)


@pytest.mark.cuda
def test_cuda_rows_equal_the_host_rows():
    cupy = pytest.importorskip("cupy")
    rng = np.random.default_rng(6)
    tokens = rng.integers(0, 256, (4, 33))
    previous = rng.integers(0, 257, (4, 5)).astype(np.int64)
    want = ngram_rows(tokens, previous, 6, 524288)
    got = ngram_rows(cupy.asarray(tokens), cupy.asarray(previous), 6, 524288)
    np.testing.assert_array_equal(cupy.asnumpy(got), want)


def test_the_table_flips_at_its_own_threshold_when_asked():
    """ngram_flip_threshold sets the n-gram table's flip threshold alone (0: flip_threshold)."""
    config = Config().override(d_model=32, n_heads=2, n_layers=1, n_experts=2, expert_hidden=16,
                               shared_vq_size=64, kgvq_size=32, ngram_memory=3, ngram_rows=512)
    for asked, want in ((16, 16), (0, 64)):
        model, opt = build(config.override(ngram_flip_threshold=asked))
        table = opt.modules.index(model.ngram.table)
        assert opt.thresholds[table] == want
        assert [t for i, t in enumerate(opt.thresholds) if i != table] == \
            [64] * (len(opt.modules) - 1)
    with pytest.raises(ConfigError, match="ngram_flip_threshold"):
        config.override(ngram_flip_threshold=128)


def test_the_gate_passes_rows_that_agree_with_the_stream():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 3, 16))
    agree = NgramMemory.gate_into(Tensor(x), Tensor(x)).data - x
    oppose = NgramMemory.gate_into(Tensor(x), Tensor(-x)).data - x
    # gate = sigmoid(√d) for a row equal to the stream, sigmoid(-√d) for its opposite (up to
    # rms_norm's epsilon)
    np.testing.assert_allclose(agree / x, 1 / (1 + np.exp(-4.0)), rtol=1e-4)
    np.testing.assert_allclose(oppose / x, -1 / (1 + np.exp(4.0)), rtol=1e-4)


def test_the_gate_gradient_matches_finite_differences():
    rng = np.random.default_rng(8)
    x = Tensor(rng.standard_normal((2, 3, 8)), requires_grad=True)
    e = Tensor(rng.standard_normal((2, 3, 8)), requires_grad=True)
    check_backward(NgramMemory.gate_into, [x, e])


def test_the_gated_rows_enter_at_their_block_only():
    """ngram_gate_layer = k adds the rows again before block k: with the same weights, the
    blocks before it see the same stream as without the gate, block k a different one."""
    config = Config().override(d_model=32, n_heads=2, n_layers=3, n_experts=2,
                               expert_hidden=16, shared_vq_size=64, kgvq_size=32,
                               ngram_memory=3, ngram_rows=512)
    tokens = np.random.default_rng(9).integers(0, 256, (2, 10))
    seen = {}
    for layer in (0, 2):
        trandom.manual_seed(0)
        model, _ = build(config.override(ngram_gate_layer=layer))
        inputs = []
        for block in model.blocks:
            block.forward = (lambda f, keep: lambda x, *a: (keep.append(x.data.copy()),
                                                            f(x, *a))[1])(block.forward, inputs)
        model.eval()
        model(tokens)
        seen[layer] = inputs
    np.testing.assert_array_equal(seen[0][0], seen[2][0])
    np.testing.assert_array_equal(seen[0][1], seen[2][1])
    assert np.abs(seen[0][2] - seen[2][2]).max() > 1e-3


def test_a_gate_layer_without_its_block_or_memory_adds_nothing():
    """A preset's gate layer stays valid when a config drops the n-gram memory or blocks:
    then there is no gated copy, and the model equals one built without the field."""
    base = Config().override(d_model=32, n_heads=2, n_layers=2, n_experts=2,
                             expert_hidden=16, shared_vq_size=64, kgvq_size=32,
                             ngram_memory=3, ngram_rows=512)
    tokens = np.random.default_rng(10).integers(0, 256, (2, 8))
    for inert in ({"n_layers": 1}, {"ngram_memory": 0}):
        outs = []
        for layer in (0, 1):
            trandom.manual_seed(0)
            model, _ = build(base.override(**inert, ngram_gate_layer=layer))
            model.eval()
            outs.append(model(tokens)[0].data)
        np.testing.assert_array_equal(outs[0], outs[1])
    with pytest.raises(ConfigError, match="ngram_gate_layer"):
        base.override(ngram_gate_layer=-1)
