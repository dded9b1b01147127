"""MoEGraph, CompositeHead, CodeMemoryLM, the config presets and the no-allocation trace."""

import json
import subprocess
import sys
import time
import tracemalloc

import numpy as np
import pytest
from click.testing import CliRunner

import tritnet
from tritnet import backend
from tritnet import rng as trandom
from tritnet.config import Config, ConfigError, load_config, preset
from tritnet.autograd import Tensor
from tritnet.models import CodeMemoryLM, MoEGraph, expert_tiles, top_k, trace
from tritnet.nn.tables import TernaryVQCodebook
from tritnet.optim import TritFlip
from tritnet.train import build
from tritnet_kernels import code_graph as kgraph


@pytest.fixture(autouse=True)
def _seed():
    trandom.manual_seed(5)


def float_state(module):
    """Every float parameter or buffer in the tree (MetaArrays included, by dtype)."""
    found = [(n, a.dtype) for n, a in module.held_arrays() if np.dtype(a.dtype).kind in "fc"]
    found += [(n, b.dtype) for n, b in module.named_buffers() if np.dtype(b.dtype).kind in "fc"]
    return found


def test_large_active_graph_is_bounded_and_integer():
    moe = MoEGraph(32, 10_000_000, n_experts=2, expert_hidden=16, top_k=1, code_dim=64,
                   slots=8, capacity=4096 * 8)
    g = moe.graph
    assert g.edge_index.shape == (2, 0)
    dtypes = {n: (b.dtype, b.shape) for n, b in g.named_buffers()}
    assert dtypes["active_edge_src"] == (np.int32, (32768,))
    assert dtypes["active_edge_dst"] == (np.int32, (32768,))
    assert dtypes["active_edge_attr"] == (np.int8, (32768,))
    assert dtypes["active_edge_score"] == (np.int8, (32768,))
    assert float_state(moe) == []
    rng = np.random.default_rng(0)
    buffers = {n: b for n, b in g.named_buffers()}
    for _ in range(20):  # 20 × 20,000 transitions over 10M codes
        codes = rng.integers(0, 10_000_000, (4, 5001)).astype(np.int32)
        signs = rng.integers(-1, 2, (4, 5000)).astype(np.int8)
        g.observe(codes, signs)
    after = {n: b for n, b in g.named_buffers()}
    assert all(after[n] is buffers[n] and after[n].shape == buffers[n].shape for n in after)
    assert (g.active_edge_dst >= 0).sum() == 32768  # full, and never more than capacity


def test_code_graph_checks_codes_from_callers_and_trusts_its_own(monkeypatch):
    """The graph's public entry points range-check codes (a host sync each on the GPU); the
    training step, whose codes come from the code book's own search, skips those checks."""
    from tritnet.models import CodeGraph
    g = CodeGraph(64, 4, 0)
    bad = np.array([[1, 64, 2]], np.int32)
    signs = np.ones((1, 2), np.int8)
    before = [b.copy() for _, b in g.named_buffers()]
    with pytest.raises(ValueError, match=r"observe_edges: obs_src\[1\] = 64 is out of range"):
        g.observe(bad, signs)
    g.record(bad, signs)
    with pytest.raises(ValueError, match=r"observe_edges: obs_src\[1\] = 64 is out of range"):
        g.apply_observations()
    with pytest.raises(ValueError, match=r"edge_neighbors: codes\[1\] = 64 is out of range"):
        g.neighbors(bad.reshape(-1))
    assert all((a == b).all() for a, (_, b) in zip(before, g.named_buffers()))  # untouched

    checked = []
    check_indices = kgraph.check_indices
    monkeypatch.setattr(kgraph, "check_indices", lambda *a, **k: checked.append(a[4])
                        or check_indices(*a, **k))
    trandom.manual_seed(0)
    model, opt = build(preset("tiny").override(batch_size=2, seq_len=8, n_layers=1))
    tokens = np.random.default_rng(0).integers(0, 256, (2, 9))
    loss, _ = model.loss(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    opt.step()
    assert checked and not any(checked)   # the graph ran, with no host-syncing checks


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_routing_without_a_sort_is_a_stable_sort(device):
    """top_k gives what a stable argsort gives -- ties to the lower index -- and expert_tiles
    lays each expert's entries out in their original order on its own tiles, with no sort
    (CuPy's sorts and bincount end in host syncs), on rows full of ties and on random ones."""
    rng = np.random.default_rng(0)
    probs = rng.integers(0, 3, (500, 6)).astype(np.float32) / 4   # many ties
    probs[:50] = rng.random((50, 6))
    probs[50] = 0.25                                               # a row of equal entries
    xp = backend.cupy if device == "cuda" else np
    for k in (1, 2, 6):
        got = backend.to_numpy(top_k(xp.asarray(probs), k))
        np.testing.assert_array_equal(got, np.argsort(-probs, axis=1, kind="stable")[:, :k])

    def tiles_of(experts, k, tile, capacity=None):
        got = expert_tiles(xp.asarray(experts), 6, k, tile, capacity)
        return (backend.to_numpy(a) for a in got)

    N = 500
    for k in (1, 2, 6):
        experts = np.argsort(-probs, axis=1, kind="stable")[:, :k].reshape(-1)
        for tile in (1, 7, 64):
            row, row_token, tile_expert = tiles_of(experts, k, tile)
            n_tiles = min(-(-N * k // tile) + 6, 6 * -(-N // tile))
            assert row.shape == (N * k,) and row_token.shape == (n_tiles * tile,)
            assert tile_expert.shape == (n_tiles,)
            assert len(np.unique(row)) == N * k                        # one row an entry
            np.testing.assert_array_equal(tile_expert[row // tile], experts)  # its expert's tile
            for e in range(6):   # an expert's entries on consecutive rows from a tile's first
                mine = np.flatnonzero(experts == e)
                if mine.size:
                    np.testing.assert_array_equal(row[mine], row[mine[0]] + np.arange(mine.size))
                    assert row[mine[0]] % tile == 0
            used = sum(-(-(experts == e).sum() // tile) for e in range(6))
            assert (np.diff(tile_expert[:used]) >= 0).all() and (tile_expert[used:] == 0).all()
            np.testing.assert_array_equal(row_token[row], np.arange(N * k) // k)
            unused = np.setdiff1d(np.arange(n_tiles * tile), row)
            assert (row_token[unused] == 0).all()
    # a capacity of C entries an expert: its first C entries in token order run, the rest go
    # to the sink row past every tile
    experts = np.argsort(-probs, axis=1, kind="stable")[:, :2].reshape(-1)
    C, tile = 120, 16
    row, row_token, tile_expert = tiles_of(experts, 2, tile, C)
    sink = min(-(-N * 2 // tile) + 6, 6 * -(-C // tile)) * tile
    assert row_token.shape == (sink,)
    for e in range(6):
        mine = np.flatnonzero(experts == e)
        kept = mine[:C]
        np.testing.assert_array_equal(row[kept], row[kept[0]] + np.arange(kept.size))
        assert (tile_expert[row[kept] // tile] == e).all()
        np.testing.assert_array_equal(row_token[row[kept]], kept // 2)
        assert (row[mine[C:]] == sink).all()
    assert (row == sink).sum() == sum(max(0, (experts == e).sum() - C) for e in range(6)) > 0


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_experts_run_each_token_on_its_chosen_experts(device):
    """The expert tiles compute the routed mixture: token t gets the sum over its k
    choices of gate · expert(h_t), and the gradient reaches h through the chosen experts only
    (float64 central differences, routing held fixed); with an expert capacity, the entries
    past it add nothing."""
    from tritnet.autograd import no_grad
    from tritnet.gradcheck import check_backward
    trandom.manual_seed(5)
    moe = MoEGraph(16, 64, n_experts=4, expert_hidden=8, top_k=2, code_dim=64, slots=4,
                   device=device)
    xp = backend.cupy if device == "cuda" else np
    h = tritnet.tensor(xp.asarray(np.random.default_rng(6).standard_normal((10, 16))),
                       requires_grad=True, device=device)
    choice, gates, _ = moe.route(h.astype(np.float32))   # the router's table is float32
    fixed_gates = Tensor(gates.data.astype(np.float64))
    out = moe.experts_forward(h, choice, fixed_gates)
    with no_grad():
        every = np.stack([backend.to_numpy(e(h).data) for e in moe.experts])   # (E, N, d)
    c, g = backend.to_numpy(choice), backend.to_numpy(gates.data)
    want = sum(g[:, j, None] * every[c[:, j], np.arange(10)] for j in range(2))
    np.testing.assert_allclose(backend.to_numpy(out.data), want, rtol=1e-10, atol=1e-12)
    assert len(set(c[:, 0].tolist())) > 1   # several experts in use
    check_backward(lambda h: moe.experts_forward(h, choice, fixed_gates), [h])
    # with a capacity of one fair share (5 rows an expert here), entries past it drop out
    moe.expert_capacity = 1.0
    C = 5
    dropped = np.zeros(c.shape, bool)
    for e in range(4):
        mine = np.flatnonzero(c.reshape(-1) == e)
        dropped.reshape(-1)[mine[C:]] = True
    assert dropped.any() and not dropped.all()
    out = moe.experts_forward(h, choice, fixed_gates)
    want = sum(np.where(dropped[:, j, None], 0.0, g[:, j, None] * every[c[:, j], np.arange(10)])
               for j in range(2))
    np.testing.assert_allclose(backend.to_numpy(out.data), want, rtol=1e-10, atol=1e-12)
    check_backward(lambda h: moe.experts_forward(h, choice, fixed_gates), [h])


def test_moe_forward_and_backward_ask_the_host_nothing(monkeypatch):
    """A MoEGraph forward and backward needs no answer from the device: experts run on a
    fixed count of tiles (not on the tokens they got, which the host would have to be
    told), and router, top-k, tiles and gathers take no range checks, sorts or bincounts. On the GPU each of
    those ends in a host sync (the GPU drains, then idles while the host catches up; 536 of
    them a default step before they went), and none may happen in a captured CUDA graph."""
    from tritnet_kernels import sparse_rows as ktables
    moe = MoEGraph(32, 64, n_experts=4, expert_hidden=16, top_k=2, code_dim=64, slots=4)
    x = tritnet.tensor(np.random.default_rng(2).standard_normal((2, 6, 32)).astype(np.float32),
                       requires_grad=True)
    # device-to-host copies (index range checks make one each) and row grouping (a sort)
    calls = {"to_numpy": 0, "unique_rows": 0}
    for owner, name in ((backend, "to_numpy"), (ktables, "unique_rows")):
        original = getattr(owner, name)
        monkeypatch.setattr(owner, name, lambda *a, _o=original, _n=name, **k:
                            calls.__setitem__(_n, calls[_n] + 1) or _o(*a, **k))
    out, aux = moe(x, None)
    (out.sum() + aux).backward()
    assert calls == {"to_numpy": 0, "unique_rows": 0}
    assert np.isfinite(x.grad).all()


def test_increasing_rows_skip_the_grouping_and_give_the_same_int8_gradients(monkeypatch):
    """The router reads its whole table (an arange): increasing=True skips unique_rows (a sort
    and a host sync on the GPU) and leaves the same pending rows and int8 gradients."""
    from tritnet.nn.tables import TernaryEmbeddingTable
    from tritnet_kernels import sparse_rows as ktables
    table = TernaryEmbeddingTable(8, 40)
    g = np.random.default_rng(4).standard_normal((8, 40)).astype(np.float32)
    results = []
    for increasing in (False, True):
        table.grad_uses, table.pending = 0, []
        calls = []
        unique = ktables.unique_rows
        monkeypatch.setattr(ktables, "unique_rows", lambda i: calls.append(1) or unique(i))
        table(np.arange(8), check=False, increasing=increasing).backward(g)
        assert len(calls) == (0 if increasing else 1)
        results.append(table.pending[0])
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


def test_embedding_table_checks_indices_unless_told_they_are_valid():
    from tritnet.nn.tables import TernaryEmbeddingTable
    table = TernaryEmbeddingTable(8, 32)
    with pytest.raises(IndexError, match=r"TernaryEmbeddingTable: index 8 is out of range for "
                                         r"a table of 8 rows"):
        table(np.array([1, 8]))
    np.testing.assert_array_equal(table(np.arange(8), check=False).numpy(),
                                  table(np.arange(8)).numpy())


def test_small_graph_forward_backward_and_edges_matter():
    memory = TernaryVQCodebook(64, 64)
    moe = MoEGraph(32, 64, n_experts=4, expert_hidden=16, top_k=2, code_dim=64, slots=4)
    assert moe.graph.edge_index.shape == (2, 64 * 4) and moe.graph.edge_score.dtype == np.int8
    x = tritnet.tensor(np.random.default_rng(1).standard_normal((2, 6, 32)).astype(np.float32),
                       requires_grad=True)
    moe.eval()
    memory.eval()
    out, aux = moe(x, memory)
    (out.sum() + aux).backward()
    assert np.isfinite(out.numpy()).all() and np.isfinite(x.grad).all()
    # give every code an edge to code 0 with full score: the one-hop read must change
    src, dst, attr, score = moe.graph.edges()
    dst[::4], attr[::4], score[::4] = 0, 1, 127
    src[::4] = np.arange(64)
    out2, _ = moe(x, memory)
    assert not np.allclose(out.numpy(), out2.numpy())


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_real_presets_hold_no_float_state(name):
    model = CodeMemoryLM(preset(name))
    assert float_state(model) == []


def test_default_preset_traces_to_three_billion_trits_without_allocating():
    tracemalloc.start()
    start = time.perf_counter()
    report = trace(preset("default"))
    seconds = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert seconds < 2 and peak < 100 * 2**20, (seconds, peak)
    assert abs(report.total - 3.0e9) <= 0.01 * 3.0e9, report.total
    assert sum(report.components.values()) == report.total
    assert report.components["shared_vq"] == 10_000_000 * 64
    assert report.components["kgvq"] == 5_000_000 * 64
    model = CodeMemoryLM(preset("default"), device="meta")
    assert float_state(model) == []
    c = preset("default")
    assert (c.codebook_dim, c.shared_vq_size, c.kgvq_size, c.kgvq_dim) == (64, 10_000_000,
                                                                           5_000_000, 64)


def test_small_preset_is_the_comparison_size():
    """The float-latent peer it is measured against has 28.1M weights: the small preset's
    trits outside the code memory's tables stay below that; the tables may add more."""
    components = trace(preset("small")).components
    tables = ("shared_vq", "kgvq", "moe_graph", "memory_values", "ngram_memory")
    assert "memory_values" in components
    assert 15e6 <= sum(n for k, n in components.items() if k not in tables) <= 28.1e6


def test_tiny_model_learns_a_fixed_batch():
    config = preset("tiny")
    model = CodeMemoryLM(config)
    opt = TritFlip(model, seed=0)
    data = np.random.default_rng(2).integers(0, 256, (8, 65))
    losses = []
    for _ in range(50):
        loss, ce = model.loss(data[:, :-1], data[:, 1:])
        loss.backward()
        opt.step()
        losses.append(ce.item())
    assert np.isfinite(losses).all()
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses


def test_alibi_positions_make_attention_see_order():
    """With ALiBi the same tokens in another order give other outputs at the last position;
    NoPE attention alone is order-blind for a set of keys (the causal mask is its only cue)."""
    from tritnet.models import Attention
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 6, 32)).astype(np.float32)
    swapped = x[:, [1, 0, 2, 3, 4, 5]]   # same keys seen by the last query, order changed
    outputs = {}
    for position in ("alibi", "nope"):
        tritnet.rng.manual_seed(0)
        attn = Attention(32, 4, position=position)
        with tritnet.no_grad():
            a, b = (attn(tritnet.tensor(v)).numpy()[0, -1] for v in (x, swapped))
        outputs[position] = np.abs(a - b).max()
    assert outputs["nope"] < 1e-5 and outputs["alibi"] > 1e-3, outputs
    with pytest.raises(ValueError, match="position must be 'alibi' or 'nope'"):
        Attention(32, 4, position="rope")
    with pytest.raises(ConfigError, match="position = 'rope'"):
        preset("tiny").override(position="rope")
    # configs written before the field existed meant NoPE; every preset uses ALiBi
    assert Config().position == "nope"


def test_config_validation_names_field_value_and_range():
    with pytest.raises(ConfigError, match=r"flip_threshold = 300 is out of range: expected "
                                          r"1 <= flip_threshold <= 127"):
        preset("tiny").override(flip_threshold=300)
    with pytest.raises(ConfigError, match=r"d_model = 130 must be divisible by n_heads = 4"):
        Config(d_model=130).validate()
    with pytest.raises(ConfigError, match=r"d_model = 'big': expected int"):
        Config(d_model="big").validate()
    with pytest.raises(ConfigError, match="unknown config field"):
        preset("tiny").override(learning_rate=3)
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        preset("huge")
    with pytest.raises(ConfigError, match=r"expert_capacity = 0.5 is below one fair share: "
                                          r"expected 0 \(no dropping\) or at least 1"):
        preset("tiny").override(expert_capacity=0.5)
    assert preset("tiny").override(expert_capacity=1.25).expert_capacity == 1.25
    with pytest.raises(ConfigError, match=r"recompute_keep = 3 exceeds n_layers = 2"):
        preset("tiny").override(recompute_keep=3)


@pytest.mark.parametrize("suffix", [".json", ".toml"])
def test_config_round_trips_through_files(tmp_path, suffix):
    if suffix == ".toml" and sys.version_info < (3, 11):
        pytest.skip("TOML reading needs Python 3.11")
    c = preset("small").override(steps=7, vq_search="routed", use_kgvq=False)
    path = tmp_path / f"run{suffix}"
    c.save(path)
    assert load_config(path) == c


def test_bad_config_file_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"top_k": 9, "n_experts": 4}))
    with pytest.raises(ConfigError, match=r"bad.json: config field top_k = 9 exceeds n_experts"):
        load_config(path)


def test_trace_command():
    from cli.main import main
    result = CliRunner().invoke(main, ["trace", "--preset", "default", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert abs(data["total"] - 3.0e9) <= 0.03e9 and data["seconds"] < 2


def test_default_preset_persistent_state_fits_the_memory_plan():
    """The memory plan (docs/design.md#state-bytes): persistent training state <= 1.3 bytes
    per logical trit
    (2-bit packed trits + int8 accumulators + small per-row and graph state)."""
    report = trace(preset("default"))
    assert sum(report.state_bytes.values()) <= 1.3 * report.total, report.format()


# --- recomputation (config.recompute) --------------------------------------------------------

def _recompute_pair_config(recompute, keep=0):
    return preset("tiny").override(batch_size=8, seq_len=16, d_model=64, n_heads=4, n_layers=3,
                                   shared_vq_size=512, kgvq_size=128, recompute=recompute,
                                   recompute_keep=keep)


def _one_backward(recompute, keep=0):
    from tritnet.nn.tables import TernaryEmbeddingTable
    from tritnet.nn.ternary import TernaryLinear
    trandom.manual_seed(0)
    model = CodeMemoryLM(_recompute_pair_config(recompute, keep), recompute=recompute,
                         recompute_keep=keep)
    assert [b.recompute for b in model.blocks] == [recompute and i < 3 - keep for i in range(3)]
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, 256, (8, 17))
    loss, _ = model.loss(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    grads = {}
    for name, m in model.named_modules():
        if isinstance(m, TernaryLinear):
            grads[name] = (m.grad_q.copy(), m.grad_E_q.copy())
        elif isinstance(m, TernaryEmbeddingTable) and len(m.pending) == 1:
            rows, q, qE = m.pending[0]
            grads[name] = (rows.copy(), q.copy(), qE.copy())
    return loss.item(), grads


def test_recompute_gives_the_same_loss_and_int8_gradients():
    """Recomputing the blocks in backward changes nothing a step computes for any layer and any
    table read once: the same loss, the same int8 gradients. (The shared VQ, read by every
    block, quantises each read with the seed of its place in backward's order, which
    recomputation changes: its gradients are equally valid, not identical.)"""
    plain_loss, plain = _one_backward(False)
    for keep in (0, 2):   # every block recomputed; the last two keeping their activations
        again_loss, again = _one_backward(True, keep)
        assert plain_loss == again_loss
        assert plain.keys() == again.keys() and len(plain) > 40
        for name in plain:
            for a, b in zip(plain[name], again[name]):
                np.testing.assert_array_equal(a, b, err_msg=f"{name}, keep {keep}")


def test_recompute_searches_the_code_book_once_per_step(monkeypatch):
    """The backward re-run of a recomputed block takes the first run's code-book search back
    (autograd.once_per_recompute) instead of repeating it: as many
    searches a step as without recomputation (the default preset's routed search was ~30% of
    its GPU time, half of it the repeat)."""
    from tritnet.nn.tables import TernaryVQCodebook
    searches, search = {}, TernaryVQCodebook.search
    for recompute in (False, True):
        calls = []
        monkeypatch.setattr(TernaryVQCodebook, "search",
                            lambda self, *a, **k: calls.append(1) or search(self, *a, **k))
        trandom.manual_seed(0)
        model = CodeMemoryLM(_recompute_pair_config(recompute), recompute=recompute)
        tokens = np.random.default_rng(3).integers(0, 256, (8, 17))
        loss, _ = model.loss(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        searches[recompute] = len(calls)
    # a read per block (3), the motif read of the shared VQ, the KG VQ read
    assert searches[True] == searches[False] == 3 + 1 + 1


def test_recompute_keeps_a_fraction_of_the_activations():
    """The memory plan: with recompute, a training forward keeps one input per block
    instead of every block's intermediates, and recompute_keep = 2 of 4 blocks keeps about
    half of them (traced on the CPU: NumPy reports its allocations to tracemalloc)."""
    kept = {}
    for recompute, keep in ((False, 0), (True, 0), (True, 2)):
        config = preset("tiny").override(batch_size=8, seq_len=64, n_layers=4,
                                         recompute=recompute, recompute_keep=keep)
        trandom.manual_seed(0)
        model = CodeMemoryLM(config)
        tokens = np.random.default_rng(0).integers(0, 256, (8, 65))
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            loss, _ = model.loss(tokens[:, :-1], tokens[:, 1:])
            kept[recompute, keep] = tracemalloc.get_traced_memory()[0] - base
            tracemalloc.reset_peak()
            loss.backward()
            peak = tracemalloc.get_traced_memory()[1] - base
        finally:
            tracemalloc.stop()
        if recompute and not keep:
            assert peak < 0.5 * kept[False, 0], (peak, kept)
    assert kept[True, 0] < 0.25 * kept[False, 0], kept
    assert 0.35 * kept[False, 0] < kept[True, 2] < 0.7 * kept[False, 0], kept


def test_presets_recompute_their_blocks_for_issue_7s_budgets():
    """The memory budgets hold only with recomputation: the default preset at 4 x 512 needs
    17.0 GB without, 15.70 GB recomputing 3 of its 24 blocks (16 GB budget); the small at
    32 x 256 2.96 GB without, 0.86 GB recomputing all (1 GB budget); H100 and H200,
    benchmarks/results/step-*.json."""
    default, small = preset("default"), preset("small")
    assert default.recompute and default.recompute_keep == 21 < default.n_layers
    assert small.recompute and small.recompute_keep == 0
    assert not Config().recompute
