"""Data-parallel training (tritnet/distributed.py): the exact integer combination of shards.

On the CPU: the combination rule itself (world size 1), and ranks simulated as processes that
exchange arrays through pipes (PipeGroup below: a stand-in for NCCL with the same two
collectives), whose checkpoint must equal a one-process run with the same micro_batches.
On GPUs (marked cuda): a one-rank NCCL communicator, and with two GPUs `tritnet train
--gpus 2` against a one-GPU run of the same global batch.
"""

import multiprocessing
import os
import subprocess
import sys
import threading

import h5py
import numpy as np
import pytest

import tritnet
from tritnet import backend, distributed
from tritnet.config import preset
from tritnet.nn import ModuleList
from tritnet.nn.tables import TernaryEmbeddingTable
from tritnet.nn.ternary import TernaryLinear
from tritnet.optim import TritFlip

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def small_config(**overrides):
    values = dict(d_model=32, n_layers=1, n_heads=2, n_experts=2, expert_hidden=32,
                  shared_vq_size=128, kgvq_size=64, batch_size=8, seq_len=16, steps=6,
                  eval_every=0, eval_batches=1, save_every=3)
    values.update(overrides)
    return preset("tiny").override(**values)


class PipeGroup:
    """Ranks as processes joined by pipes (CPU arrays): all_gather and all_reduce_sum with the
    semantics of distributed.NcclGroup. For tests only; real runs use NCCL."""

    def __init__(self, rank, conns):
        self.rank, self.size, self.conns = rank, len(conns), conns

    def all_gather(self, arrays):
        out = []
        for a in arrays:
            a = np.ascontiguousarray(a)
            senders = [threading.Thread(target=c.send, args=(a,))
                       for q, c in enumerate(self.conns) if q != self.rank]
            for t in senders:
                t.start()
            parts = [a if q == self.rank else c.recv() for q, c in enumerate(self.conns)]
            for t in senders:
                t.join()
            out.append(np.stack(parts))
        return out

    def all_reduce_sum(self, arrays):
        for a, parts in zip(arrays, self.all_gather(arrays)):
            a[...] = parts.sum(0, dtype=a.dtype)
        return arrays

    def barrier(self):
        self.all_gather([np.zeros(1)])


def _rank(rank, conns, config, out_dir, results):
    os.environ["TRITNET_DEVICE"] = "cpu"
    from tritnet.train import train
    try:
        train(config, data=os.path.join(os.path.dirname(out_dir), "text.txt"), out_dir=out_dir,
              device="cpu", progress=False, log=distributed_log,
              group=PipeGroup(rank, conns))
        results.put((rank, "ok", ""))
    except Exception as e:  # reported to the test
        results.put((rank, type(e).__name__, str(e)))


def distributed_log(*_):
    pass


def run_ranks(configs, out_dir):
    """Train configs[r] as rank r of len(configs) processes; returns {rank: (kind, message)}."""
    ctx = multiprocessing.get_context("spawn")
    n = len(configs)
    pipes = {}
    for a in range(n):
        for b in range(a + 1, n):
            pipes[a, b], pipes[b, a] = ctx.Pipe()
    results = ctx.Queue()
    procs = []
    for r in range(n):
        conns = [None if q == r else pipes[r, q] for q in range(n)]
        procs.append(ctx.Process(target=_rank, args=(r, conns, configs[r], out_dir, results)))
    for p in procs:
        p.start()
    outcome = {}
    for _ in range(n):
        rank, kind, msg = results.get(timeout=600)
        outcome[rank] = (kind, msg)
    for p in procs:
        p.join(timeout=60)
    return outcome


def write_text(folder):
    rng = np.random.default_rng(0)
    words = [bytes(rng.integers(97, 123, rng.integers(2, 7)).astype(np.uint8)) for _ in range(50)]
    text = b" ".join(words[i] for i in rng.integers(0, 50, 12_000))
    path = os.path.join(folder, "text.txt")
    with open(path, "wb") as fh:
        fh.write(text)
    return path


def model_datasets(path):
    """{name: array} of every dataset of a checkpoint's model state (not run metadata)."""
    found = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: found.__setitem__(name, obj[()])
                     if isinstance(obj, h5py.Dataset) else None)
    return found


# --------------------------------------------------------------------------------------------
# The rule, on one process.


def test_dense_shards_combine_as_the_rounded_mean_of_their_int8_sums():
    layer = TernaryLinear(48, 16)
    model = ModuleList([layer])
    opt = TritFlip(model, seed=3)
    reducer = distributed.StepReducer(model, distributed.SingleGroup(), shards=2)
    rng = np.random.default_rng(0)
    parts = []
    for shard in range(2):
        opt.begin_shard(shard)
        x = tritnet.tensor(rng.standard_normal((5, 48)).astype(np.float32))
        layer(x).sum().backward()
        parts.append((layer.grad_q.astype(np.int32), layer.grad_E_q.astype(np.int32)))
        reducer.collect()
        assert layer.grad_q is None   # moved into the int32 sum
    reducer.reduce()
    total = parts[0][0] + parts[1][0]
    # exact where the sum is even, one of the two neighbours where it is odd
    even = total % 2 == 0
    np.testing.assert_array_equal(layer.grad_q[even], total[even] // 2)
    odd = layer.grad_q[~even].astype(np.int32)
    assert np.all((odd == total[~even] // 2) | (odd == total[~even] // 2 + 1))
    assert 0.3 < np.mean(odd == total[~even] // 2) < 0.7   # stochastic, unbiased rounding
    assert layer.grad_E_q.dtype == np.int8 and layer.grad_E_q.shape == (16,)


def test_table_shards_combine_over_the_union_of_their_rows():
    table = TernaryEmbeddingTable(100, 8)
    model = ModuleList([table])
    opt = TritFlip(model, seed=1)
    reducer = distributed.StepReducer(model, distributed.SingleGroup(), shards=2)
    contributions = {}
    for shard, rows in enumerate(([3, 7, 7, 50], [7, 99])):
        opt.begin_shard(shard)
        out = table(np.asarray(rows))
        (out * out).sum().backward()
        for r, q, _ in table.pending:
            for row, values in zip(r.tolist(), q.astype(np.int32)):
                contributions[row] = contributions.get(row, 0) + values
        reducer.collect()
    reducer.reduce()
    (rows, q, qE), = table.pending
    # the union of the rows, then padding: shard 0's (one row per read: 4 reads, 3 rows) and
    # the union's (6 entries, 4 rows)
    assert rows.tolist() == [3, 7, 50, 99, -1, -1]
    for row, values in zip(rows.tolist()[:4], q.astype(np.int32)):
        assert np.all(np.abs(values - contributions[row] / 2) <= 0.5), row
    assert not q[4:].any() and not qE[4:].any()


def test_group_from_env_explains_a_missing_rendezvous():
    assert distributed.group_from_env({}).size == 1
    assert distributed.group_from_env({"WORLD_SIZE": "1"}).size == 1
    with pytest.raises(distributed.DistributedError, match="MASTER_ADDR and MASTER_PORT"):
        distributed.group_from_env({"WORLD_SIZE": "2", "RANK": "0"})
    with pytest.raises(distributed.DistributedError, match="RANK in"):
        distributed.group_from_env({"WORLD_SIZE": "2", "RANK": "5", "MASTER_ADDR": "x",
                                    "MASTER_PORT": "1"})
    with pytest.raises(distributed.DistributedError, match="not an integer"):
        distributed.group_from_env({"WORLD_SIZE": "two"})


def test_rendezvous_hands_rank_zeros_nccl_id_to_the_others():
    port, uid, got = distributed._free_port(), bytes(range(128)), {}
    others = [threading.Thread(target=lambda r=r: got.__setitem__(
        r, distributed.rendezvous(r, 3, "127.0.0.1", port, timeout=30))) for r in (1, 2)]
    for t in others:
        t.start()
    got[0] = distributed.rendezvous(0, 3, "127.0.0.1", port, lambda: uid, timeout=30)
    for t in others:
        t.join()
    assert got == {0: uid, 1: uid, 2: uid}


def test_micro_batches_must_divide_the_batch():
    with pytest.raises(tritnet.config.ConfigError, match="micro_batches"):
        small_config(micro_batches=3)


# --------------------------------------------------------------------------------------------
# Ranks simulated as processes on the CPU.


@pytest.mark.slow
def test_two_cpu_ranks_equal_one_process_with_two_micro_batches(tmp_path):
    from tritnet.train import train
    write_text(tmp_path)
    config = small_config(micro_batches=2)
    ranks = tmp_path / "ranks"
    outcome = run_ranks([config, config], str(ranks))
    assert outcome == {0: ("ok", ""), 1: ("ok", "")}, outcome
    # every save checked that both ranks hold identical buffers; rank 0 wrote the checkpoint
    single = tmp_path / "single"
    train(config, data=str(tmp_path / "text.txt"), out_dir=str(single), device="cpu",
          progress=False, log=distributed_log)
    a, b = model_datasets(ranks / "ckpt.h5"), model_datasets(single / "ckpt.h5")
    assert a.keys() == b.keys()
    trit_sets = [k for k in a if k.endswith("T_packed")]
    assert len(trit_sets) > 10
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # and the shards matter: one undivided batch learns other trits
    whole = tmp_path / "whole"
    train(config.override(micro_batches=1), data=str(tmp_path / "text.txt"), out_dir=str(whole),
          device="cpu", progress=False, log=distributed_log)
    c = model_datasets(whole / "ckpt.h5")
    assert any(not np.array_equal(a[k], c[k]) for k in trit_sets)


@pytest.mark.slow
def test_diverged_ranks_fail_loudly_and_write_nothing(tmp_path):
    write_text(tmp_path)
    config = small_config(micro_batches=2, steps=3)
    other = config.override(flip_threshold=1)   # rank 1 updates by another rule
    outcome = run_ranks([config, other], str(tmp_path / "ranks"))
    for rank in (0, 1):
        kind, message = outcome[rank]
        assert kind == "ReplicaDivergence", outcome
        assert "differs between ranks" in message and "first " in message
    assert not (tmp_path / "ranks" / "ckpt.h5").exists()


def test_gpus_without_a_gpu_is_one_clear_line(tmp_path):
    if backend.gpu_usable()[0]:
        pytest.skip("this machine has a GPU")
    env = dict(os.environ, TRITNET_DEVICE="cpu")
    out = subprocess.run([sys.executable, "-m", "cli.main", "train", "--gpus", "2", "--steps",
                          "1", "--out", str(tmp_path / "run")], capture_output=True, text=True,
                         cwd=ROOT, env=env, timeout=300)
    assert out.returncode == 1, out.stderr
    assert out.stderr.startswith("tritnet: error: --gpus 2:") and "Traceback" not in out.stderr
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------------
# NCCL on real GPUs.


@pytest.mark.cuda
def test_one_rank_nccl_communicator_reduces_and_gathers():
    import cupy
    from cupy.cuda import nccl
    group = distributed.NcclGroup(0, 1, nccl.get_unique_id())
    a = cupy.arange(10, dtype=cupy.int32)
    b = cupy.full((3, 2), 1.5, dtype=cupy.float64)
    group.all_reduce_sum([a, b])
    np.testing.assert_array_equal(a.get(), np.arange(10))
    (g,) = group.all_gather([cupy.asarray([[1, 2], [3, 4]], dtype=cupy.int8)])
    assert g.shape == (1, 2, 2) and g.dtype == cupy.int8
    np.testing.assert_array_equal(g.get()[0], [[1, 2], [3, 4]])
    with pytest.raises(TypeError, match="cannot sum"):
        group.all_reduce_sum([cupy.zeros(3, cupy.int8)])
    # the step's reduction through NCCL equals the one-process rule
    layer = TernaryLinear(64, 32, device="cuda")
    model = ModuleList([layer])
    opt = TritFlip(model, seed=0)
    reducer = distributed.StepReducer(model, group, shards=1)
    opt.begin_shard(0)
    layer(tritnet.tensor(cupy.ones((4, 64), cupy.float32), device="cuda")).sum().backward()
    before = layer.grad_q.copy()
    reducer.reduce()
    np.testing.assert_array_equal(layer.grad_q.get(), before.get())   # mean of one shard


@pytest.mark.cuda
def test_two_gpus_train_the_trits_of_one_gpu_with_the_same_global_batch(tmp_path):
    import cupy
    if cupy.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs two GPUs")
    text = write_text(tmp_path)
    args = ["--preset", "tiny", "--data", text, "--steps", "6", "--save-every", "3",
            "--batch-size", "8", "--seq-len", "32", "--eval-every", "0", "--device", "cuda"]
    env = dict(os.environ)
    two = subprocess.run([sys.executable, "-m", "cli.main", "train", *args, "--gpus", "2",
                          "--out", str(tmp_path / "two")], capture_output=True, text=True,
                         cwd=ROOT, env=env, timeout=600)
    assert two.returncode == 0, two.stdout + two.stderr
    one = subprocess.run([sys.executable, "-m", "cli.main", "train", *args, "--micro-batches",
                          "2", "--out", str(tmp_path / "one")], capture_output=True, text=True,
                         cwd=ROOT, env=env, timeout=600)
    assert one.returncode == 0, one.stdout + one.stderr
    a, b = model_datasets(tmp_path / "two" / "ckpt.h5"), model_datasets(tmp_path / "one" /
                                                                         "ckpt.h5")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # resume the two-GPU run on one GPU: a different number of GPUs, the same rule
    more = subprocess.run([sys.executable, "-m", "cli.main", "train", "--resume", "--steps", "8",
                           "--out", str(tmp_path / "two"), "--data", text, "--device", "cuda"],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert more.returncode == 0, more.stdout + more.stderr
