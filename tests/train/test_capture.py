"""tritnet.capture.CapturedStep: training steps replayed from CUDA graphs are the eager steps,
bit for bit, including the steps that restart codes and the steps that must run eagerly
(index rebuilds)."""

import gc
import json

import numpy as np
import pytest

from tritnet import backend, data as tdata
from tritnet import rng as trandom
from tritnet.config import preset
from tritnet.capture import CapturedStep, CaptureError
from tritnet.nn.tables import TernaryVQCodebook
from tritnet.train import build, train

def test_a_cpu_model_is_refused_with_the_reason():
    trandom.manual_seed(0)
    model, optimizer = build(preset("tiny").override(d_model=32, n_heads=2, n_layers=1))
    with pytest.raises(CaptureError, match="not on a CUDA device .* train it eagerly"):
        CapturedStep(model, optimizer)


def test_declared_step_state_is_all_a_step_changes_on_the_host():
    """A failed capture puts back `step_state()` of the optimiser and of every module: that
    must be every plain attribute a step's forward, backward and update change on the host
    (the optimiser's count and shared quantizer, int8 gradients, pending table rows, recorded
    observations, use counts, code-book clocks)."""
    backend.set_device("cpu")
    trandom.manual_seed(0)
    model, optimizer = build(preset("tiny").override(
        d_model=32, n_layers=1, n_heads=2, context=16, n_experts=2, expert_hidden=32,
        codebook_dim=32, shared_vq_size=64, kgvq_size=32, kgvq_dim=32, batch_size=2,
        seq_len=8, memory_values=True))
    owners = [optimizer, *model.modules()]
    tokens = np.random.default_rng(0).integers(0, 256, (2, 9))

    def host_state():
        state = [{k: list(v) if isinstance(v, list) else v for k, v in vars(o).items()}
                 for o in owners]
        return state + [dict(vars(optimizer.quantizer))]

    def same(a, b):
        if isinstance(a, list):
            return isinstance(b, list) and len(a) == len(b) and all(map(same, a, b))
        return a is b or (type(a) is type(b) and not hasattr(a, "shape") and a == b)

    def forward_backward():
        loss, _ = model.loss(tokens[:, :-1], tokens[:, 1:])
        loss.backward()

    for work in (forward_backward, optimizer.step):
        if work is optimizer.step:
            forward_backward()
        before, saved = host_state(), [o.step_state() for o in owners]
        work()
        for owner, state in zip(owners, saved):
            owner.load_step_state(state)
        after = host_state()
        changed = [f"{type(owners[i]).__name__ if i < len(owners) else 'quantizer'}.{k}"
                   for i, (a, b) in enumerate(zip(before, after)) for k in a.keys() | b.keys()
                   if not same(a.get(k), b.get(k))]
        assert not changed, f"{work.__name__} changes undeclared host state: {changed}"


def _config(search, ngram=0):
    return preset("tiny").override(d_model=64, n_heads=2, n_layers=2, batch_size=4, seq_len=32,
                                   steps=10, schedule="cosine", vq_search=search,
                                   shared_vq_size=512, kgvq_size=128, ngram_memory=ngram,
                                   ngram_rows=4096)


def _pair(search, ngram=0):
    """Two identical models on the GPU, restarting codes every 4 steps and (routed) rebuilding
    the index every 5: steps that must run eagerly in the captured run."""
    backend.set_device("cuda")
    made = []
    for _ in range(2):
        trandom.manual_seed(0)
        model, optimizer = build(_config(search, ngram))
        for book in model.modules():
            if isinstance(book, TernaryVQCodebook):
                book.restart_every, book.index_refresh = 4, 5
        made.append((model, optimizer))
    return made


def _steps(eager, eager_opt, step, batches, n):
    """n steps of the same batches, eagerly and through `step`: yields the step's number with
    ((loss, ce) eager, (loss, ce) of the CapturedStep) as floats."""
    for i in range(n):
        x, y = batches.get("train")
        loss, ce = eager.loss(x, y)
        loss.backward()
        eager_opt.step()
        got = step.forward_backward(x, y)
        step.update()
        yield i, (float(loss.item()), float(ce.item())), tuple(float(v) for v in got)


def _state(model):
    return {name: backend.to_numpy(b) for name, b in model.named_buffers()}


@pytest.mark.cuda
@pytest.mark.parametrize("search, ngram", [("exact", 0), ("routed", 0), ("exact", 4)])
def test_cuda_captured_steps_are_the_eager_steps_bit_for_bit(search, ngram):
    (eager, eager_opt), (model, optimizer) = _pair(search, ngram)
    step = CapturedStep(model, optimizer, warmup=2)
    restarted = []   # codes restarted by each restart of the captured run

    def watch(book):
        restart = book.restart_dead_codes
        book.restart_dead_codes = lambda *a: restarted.append(restart(*a)) or restarted[-1]

    for book in step.books:
        watch(book)
    corpus = tdata.load_corpus(None)
    batches = tdata.Batches(corpus, 4, 32, seed=3)
    for i, want, got in _steps(eager, eager_opt, step, batches, 12):
        assert got == want, i
        assert optimizer.step_count == eager_opt.step_count == i + 1
        np.testing.assert_array_equal(backend.to_numpy(optimizer.clock),
                                      backend.to_numpy(eager_opt.clock))
    # warm-up (2) runs eagerly, then one capture; restarts (steps 4, 8, 12) replay the graphs
    # and restart codes after them; routed, the steps that rebuild the index run eagerly (after
    # a refresh, and after a restart moved codes) and the graphs are captured again
    if search == "exact":
        assert step.counts == {"eager": 2, "capture": 1, "replay": 9}, step.counts
        # both books restart at steps 4, 8 and 12 (replayed steps: only 1 and 2 ran eagerly),
        # and codes did restart
        assert len(restarted) == 6 and sum(restarted) > 0, restarted
    else:
        assert step.counts["capture"] >= 2 and step.counts["replay"] >= 1, step.counts
    want = _state(eager)
    for name, got in _state(model).items():
        np.testing.assert_array_equal(got, want[name], err_msg=name)
    for a, b in zip(model.modules(), eager.modules()):
        if isinstance(a, TernaryVQCodebook):
            assert (a.steps_since_restart, a.steps_since_index) == \
                (b.steps_since_restart, b.steps_since_index)


@pytest.mark.cuda
def test_cuda_a_capture_never_falls_on_a_restart_step():
    """A step that restarts codes replays, but is never the one captured (the restart's host
    syncs would break the capture and turn the graphs off): with warm-up 3 the first restart
    (step 4) runs eagerly, the graphs are captured at step 5, and step 8's restart replays."""
    (eager, eager_opt), (model, optimizer) = _pair("exact")
    step = CapturedStep(model, optimizer, warmup=3)
    batches = tdata.Batches(tdata.load_corpus(None), 4, 32, seed=3)
    for i, want, got in _steps(eager, eager_opt, step, batches, 8):
        assert got == want, i
    assert step.failed is None
    assert step.counts == {"eager": 4, "capture": 1, "replay": 3}, step.counts
    want = _state(eager)
    for name, got in _state(model).items():
        np.testing.assert_array_equal(got, want[name], err_msg=name)


@pytest.mark.cuda
@pytest.mark.parametrize("half", ["forward_backward", "update"])
def test_cuda_a_failed_capture_falls_back_to_eager_steps(half):
    """A step that syncs with the host cannot be captured: the half-captured step's host state
    is put back, it and every later step run eagerly, and training is still the eager run's,
    bit for bit."""
    (eager, eager_opt), (model, optimizer) = _pair("exact")
    if half == "update":   # the optimiser reads its clock on the host: a sync
        advance = optimizer._advance_clock
        optimizer._advance_clock = lambda: (int(optimizer.clock[0]), advance())
    else:                  # the head asks the host for its input's sum
        head = model.head.forward
        model.head.forward = lambda x, *a: (float(x.data.sum()), head(x, *a))[1]
    logged = []
    step = CapturedStep(model, optimizer, warmup=2, log=logged.append)
    batches = tdata.Batches(tdata.load_corpus(None), 4, 32, seed=3)
    for i, want, got in _steps(eager, eager_opt, step, batches, 6):
        assert got == want, i
    assert step.counts == {"eager": 6, "capture": 0, "replay": 0}, step.counts
    assert "capturing" in step.failed and len(logged) == 1 and "CUDA graphs off" in logged[0]
    assert optimizer.step_count == eager_opt.step_count == 6
    want = _state(eager)
    for name, got in _state(model).items():
        np.testing.assert_array_equal(got, want[name], err_msg=name)


class _CaptureWatch:
    """A CapturedStep's capture stream, watched: the default pool's idle blocks when a capture
    begins (what the capture would fill the graphs' pool beside)."""

    def __init__(self, stream, idle):
        self.stream, self.idle = stream, idle

    def begin_capture(self):
        self.idle.append(_idle(backend.cupy.get_default_memory_pool()))
        return self.stream.begin_capture()

    def __enter__(self):
        return self.stream.__enter__()

    def __exit__(self, *exc):
        return self.stream.__exit__(*exc)

    def __getattr__(self, name):
        return getattr(self.stream, name)


def _idle(pool):
    return pool.total_bytes() - pool.used_bytes()


@pytest.mark.cuda
def test_cuda_the_graphs_and_an_eager_step_never_hold_two_working_sets():
    """Before a capture fills the graphs' pool, the default pool's idle blocks (the eager
    steps' working set) go back to the device; an eager step after captures (a restart)
    gives the graphs' idle blocks back before it allocates its own."""
    (_, _), (model, optimizer) = _pair("routed")   # index rebuilds: eager steps
    # blocks earlier work left pinned (a block in use splits an idle one): not this test's
    default = backend.cupy.get_default_memory_pool()
    gc.collect()
    default.free_all_blocks()
    pinned = _idle(default)
    step = CapturedStep(model, optimizer, warmup=2)
    idle_default, idle_graph, graph_total = [], [], []
    step.stream = _CaptureWatch(step.stream, idle_default)
    loss = model.loss

    def watched_loss(*args, **kw):
        if step.mode == "eager":
            idle_graph.append(_idle(step.pool))
        return loss(*args, **kw)

    model.loss = watched_loss
    batches = tdata.Batches(tdata.load_corpus(None), 4, 32, seed=3)
    for _ in range(10):
        step.forward_backward(*batches.get("train"))
        step.update()
        graph_total.append(step.pool.total_bytes())
    assert step.counts["capture"] >= 2 and step.counts["eager"] >= 3, step.counts
    assert len(idle_default) == 2 * step.counts["capture"]
    assert max(graph_total) > 1 << 20   # a working set is MBs here, an idle scalar 512 bytes
    assert max(idle_default) - pinned < 0.01 * max(graph_total), \
        (pinned, idle_default, graph_total)
    assert max(idle_graph) < 0.01 * max(graph_total), (idle_graph, graph_total)


@pytest.mark.cuda
def test_cuda_a_dropped_step_applies_nothing_and_bad_batches_are_refused():
    (_, _), (model, optimizer) = _pair("exact")
    for book in model.modules():
        if isinstance(book, TernaryVQCodebook):
            book.restart_every = 100   # no eager restart step in this test
    step = CapturedStep(model, optimizer, warmup=1)
    batches = tdata.Batches(tdata.load_corpus(None), 4, 32, seed=3)
    for _ in range(3):   # eager, capture, replay
        step.forward_backward(*batches.get("train"))
        step.update()
    assert step.counts == {"eager": 1, "capture": 1, "replay": 1}
    before, count = _state(model), optimizer.step_count
    step.forward_backward(*batches.get("train"))   # a replay, then the loop drops it
    step.drop()
    for name, got in _state(model).items():
        np.testing.assert_array_equal(got, before[name], err_msg=name)
    assert optimizer.step_count == count
    x, y = batches.get("train")
    with pytest.raises(CaptureError, match=r"tokens of shape \(2, 32\), but the captured step "
                                           r"takes \(4, 32\)"):
        step.forward_backward(x[:2], y[:2])
    bad = x.copy()
    bad[1, 3] = 300
    with pytest.raises(IndexError, match="tokens hold id 300, out of range for the vocabulary "
                                         "of 256"):
        step.forward_backward(bad, y)
    for name, got in _state(model).items():
        np.testing.assert_array_equal(got, before[name], err_msg=name)
    step.forward_backward(x, y)
    with pytest.raises(CaptureError, match="forward_backward called twice"):
        step.forward_backward(x, y)


@pytest.mark.cuda
def test_cuda_train_with_and_without_graphs_is_the_same_run(tmp_path):
    """`tritnet train` on the GPU: cuda_graph (the default) and eager steps log the same
    losses and end on the same held-out number."""
    config = preset("tiny").override(steps=12, eval_every=6, save_every=0, batch_size=8,
                                     seq_len=32)
    runs = {}
    for graphs in (True, False):
        out = tmp_path / str(graphs)
        lines = []
        summary = train(config.override(cuda_graph=graphs), out_dir=str(out), device="cuda",
                        progress=False, log=lines.append)
        assert any("CUDA graphs" in line for line in lines) == graphs
        rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
        runs[graphs] = ([r.get("loss") for r in rows], summary["val_bpb"])
    assert runs[True] == runs[False]
