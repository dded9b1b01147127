"""Data-parallel training: one global batch, cut into shards, combined exactly in integers.

    tritnet train --gpus 2 --preset small        # one process per GPU of this host (NCCL)

    # under a launcher, one process per GPU, on one host or several:
    RANK=0 WORLD_SIZE=8 LOCAL_RANK=0 MASTER_ADDR=node0 MASTER_PORT=29500 tritnet train ...
    mpirun -np 8 -x MASTER_ADDR=node0 -x MASTER_PORT=29500 tritnet train ...   # OMPI_COMM_WORLD_*

The rule, the same whether the shards run one after another on one device (the config's
`micro_batches`) or at once on several GPUs:

- a step's global batch (`batch_size` sequences) is cut into `micro_batches` equal shards;
  rank r of N runs shards r·k … r·k + k − 1, k = micro_batches / N;
- each shard's backward quantises its own gradients to int8, with random bits of its own
  (`TritFlip.begin_shard`);
- dense weights: q = round_stochastic(Σ_shards q_s / micro_batches); the sum is exact in
  int32 (an NCCL all-reduce across ranks);
- table rows: the union of the rows the shards touched, each row's Σ q_s over shards and
  uses, / micro_batches, rounded the same way (an all-gather of the touched rows);
- observations (VQ choices and restart queries, code-graph transitions): concatenated in
  shard order (an all-gather), then applied by the optimiser's step as on one device.

Every rank therefore applies the same integers to the same state: trits, scales,
accumulators, VQ usage and graph edges stay identical without ever sending a weight, and one
device with the same `micro_batches` computes the same trits. `check_replicas` compares a
digest of every buffer across ranks (the loop calls it at each checkpoint) and raises
ReplicaDivergence naming the first buffer that differs. Rank 0 alone writes checkpoints; they
are ordinary checkpoints, resumable on any number of GPUs or on the CPU.

NCCL is the transport (CuPy's bindings); the only thing sent outside it is NCCL's unique id,
from rank 0 to the others over one TCP connection each (MASTER_ADDR:MASTER_PORT).
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import socket
import struct
import sys
import time
import traceback
import zlib

import numpy as np

from . import backend
from . import rng as trandom
from .errors import TritnetError
from .nn.module import Observer
from .nn.ternary import TernaryModule
from tritnet_kernels import sparse_rows as ksparse
from tritnet_kernels import update as kupdate

COMBINE_STREAM = 0x434F4D42  # mixed into the seeds of the shard-mean rounding
DENSE_BUCKET = 1 << 26       # int32 elements all-reduced in one NCCL group (256 MiB)


class DistributedError(TritnetError, RuntimeError):
    """Ranks cannot be started or cannot talk; the message says what to fix."""


class ReplicaDivergence(DistributedError):
    """The ranks' model states differ: data-parallel training broke its own invariant."""


# --------------------------------------------------------------------------------------------
# Groups: who the ranks are and the two collectives the step needs.


class SingleGroup:
    """One process: every collective is the identity."""

    rank, size = 0, 1

    def all_reduce_sum(self, arrays):
        return arrays

    def all_gather(self, arrays):
        return [a[None] for a in arrays]

    def barrier(self):
        pass


class NcclGroup:
    """Ranks joined by an NCCL communicator, one GPU per process, on CuPy's current stream.

    all_reduce_sum(arrays) sums each array over the ranks in place; all_gather(arrays) returns,
    for each array (the same shape on every rank), a new array (size, *shape) in rank order.
    Each call is one NCCL group: one launch for all its arrays."""

    _SUM_TYPES = {"int32": "NCCL_INT32", "int64": "NCCL_INT64", "float32": "NCCL_FLOAT32",
                  "float64": "NCCL_FLOAT64"}

    def __init__(self, rank: int, size: int, unique_id):
        from cupy.cuda import nccl
        self.nccl, self.rank, self.size = nccl, rank, size
        self.comm = nccl.NcclCommunicator(size, unique_id, rank)

    def _stream(self):
        import cupy
        return cupy.cuda.get_current_stream().ptr

    def all_reduce_sum(self, arrays):
        nccl, stream = self.nccl, self._stream()
        nccl.groupStart()
        for a in arrays:
            kind = self._SUM_TYPES.get(a.dtype.name)
            if kind is None or not a.flags.c_contiguous:
                nccl.groupEnd()
                raise TypeError(f"all_reduce_sum: cannot sum a {a.dtype} array (contiguous "
                                f"{', '.join(self._SUM_TYPES)} only)")
            self.comm.allReduce(a.data.ptr, a.data.ptr, a.size, getattr(nccl, kind),
                                nccl.NCCL_SUM, stream)
        nccl.groupEnd()
        return arrays

    def all_gather(self, arrays):
        import cupy
        nccl, stream = self.nccl, self._stream()
        # Contiguous copies are made, and kept alive, before the group: NCCL reads them only at
        # groupEnd, so a temporary made inside the loop could be freed and reused by then.
        arrays = [cupy.ascontiguousarray(a) for a in arrays]
        out = [cupy.empty((self.size,) + a.shape, a.dtype) for a in arrays]
        nccl.groupStart()
        for a, o in zip(arrays, out):
            self.comm.allGather(a.data.ptr, o.data.ptr, a.nbytes, nccl.NCCL_UINT8, stream)
        nccl.groupEnd()
        return out

    def barrier(self):
        import cupy
        self.all_reduce_sum([cupy.zeros(1, np.int32)])
        cupy.cuda.get_current_stream().synchronize()


def _env_int(env, *names):
    for name in names:
        if env.get(name, "") != "":
            try:
                return int(env[name])
            except ValueError:
                raise DistributedError(f"{name} = {env[name]!r} is not an integer") from None
    return None


def group_from_env_size(env=None) -> int:
    """WORLD_SIZE (or Open MPI's) of this process's environment; 1 when unset."""
    env = os.environ if env is None else env
    return _env_int(env, "WORLD_SIZE", "OMPI_COMM_WORLD_SIZE") or 1


def group_from_env(env=None):
    """The rank group the environment describes, or SingleGroup when WORLD_SIZE is unset or 1.

    Reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT (the usual convention), or
    Open MPI's OMPI_COMM_WORLD_RANK / _SIZE / _LOCAL_RANK under mpirun. Selects GPU LOCAL_RANK
    (default: RANK modulo the GPUs of this host) before anything touches the GPU."""
    env = os.environ if env is None else env
    size = _env_int(env, "WORLD_SIZE", "OMPI_COMM_WORLD_SIZE")
    if size is None or size == 1:
        return SingleGroup()
    rank = _env_int(env, "RANK", "OMPI_COMM_WORLD_RANK")
    if rank is None or not 0 <= rank < size or size < 1:
        raise DistributedError(f"WORLD_SIZE = {size} needs RANK in [0, {size}) (got {rank}); "
                               "set RANK for each process, or start with tritnet train --gpus N")
    addr, port = env.get("MASTER_ADDR"), _env_int(env, "MASTER_PORT")
    if not addr or port is None:
        raise DistributedError("WORLD_SIZE > 1 needs MASTER_ADDR and MASTER_PORT (where rank 0 "
                               "listens to hand out the NCCL id), e.g. MASTER_ADDR=node0 "
                               "MASTER_PORT=29500")
    ok, why = backend.gpu_usable()
    if not ok:
        raise DistributedError(f"data-parallel training runs on GPUs through NCCL, but {why}")
    import cupy
    local = _env_int(env, "LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK")
    n_gpus = cupy.cuda.runtime.getDeviceCount()
    local = rank % n_gpus if local is None else local
    if not 0 <= local < n_gpus:
        raise DistributedError(f"LOCAL_RANK = {local} but this host has {n_gpus} GPU(s)")
    cupy.cuda.Device(local).use()
    from cupy.cuda import nccl
    uid = rendezvous(rank, size, addr, port, nccl.get_unique_id if rank == 0 else None)
    return NcclGroup(rank, size, uid)


def rendezvous(rank, size, addr, port, make_id=None, timeout=300.0):
    """Rank 0 makes the NCCL unique id and sends it to every other rank over TCP."""
    if rank == 0:
        uid = make_id()
        payload = bytes(uid)   # NCCL's unique id: 128 opaque bytes
        with socket.create_server((addr, port), reuse_port=False) as server:
            server.settimeout(timeout)
            for _ in range(size - 1):
                try:
                    conn, _ = server.accept()
                except socket.timeout:
                    raise DistributedError(f"rank 0: not all {size} ranks connected to "
                                           f"{addr}:{port} within {timeout:.0f} s") from None
                with conn:
                    conn.sendall(struct.pack("!I", len(payload)) + payload)
        return uid
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((addr, port), timeout=timeout) as conn:
                head = _receive(conn, 4)
                return _receive(conn, struct.unpack("!I", head)[0])
        except (ConnectionRefusedError, OSError) as e:
            if time.monotonic() > deadline:
                raise DistributedError(f"rank {rank}: cannot reach rank 0 at {addr}:{port} "
                                       f"({e}); is MASTER_ADDR right and rank 0 started?") \
                    from None
            time.sleep(0.2)


def _receive(conn, n):
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise ConnectionResetError("rank 0 closed the connection")
        data += chunk
    return data


# --------------------------------------------------------------------------------------------
# Starting one process per GPU of this host.


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank, size, port, run, kwargs, results):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        results.put((rank, "ok", run(**kwargs)))
    except KeyboardInterrupt:
        results.put((rank, "KeyboardInterrupt", ""))
        sys.exit(130)
    except TritnetError as e:
        results.put((rank, "error", e))   # the launcher raises it as it was raised here
        sys.exit(1)
    except Exception as e:
        traceback.print_exc()   # a bug, not a user error: show where
        results.put((rank, "error", DistributedError(f"rank {rank} failed: "
                                                     f"{type(e).__name__}: {e}")))
        sys.exit(1)


def launch(gpus: int, run, kwargs: dict) -> dict:
    """Run run(**kwargs) in one process per GPU (ranks 0..gpus-1 on GPUs 0..gpus-1, "spawn"ed,
    rendezvous on a free local port); returns rank 0's result. `run` is a module-level function
    (spawned processes import it by name): tritnet.train.train, which finds its rank in the
    environment.

    A rank that fails stops the others; its error is raised here as it was raised there. A
    Ctrl-C reaches every rank (they agree on the step to stop at and rank 0 saves), and this
    process waits for that, then raises KeyboardInterrupt; a second Ctrl-C stops them at once.
    """
    ok, why = backend.gpu_usable()
    if not ok:
        raise DistributedError(f"--gpus {gpus}: {why}")
    import cupy
    have = cupy.cuda.runtime.getDeviceCount()
    if gpus > have:
        raise DistributedError(f"--gpus {gpus} but this host has {have} GPU(s); use --gpus "
                               f"{have} or fewer")
    ctx = multiprocessing.get_context("spawn")   # CUDA does not survive fork
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, gpus, port, run, kwargs, results),
                         name=f"tritnet-rank-{r}") for r in range(gpus)]
    for p in procs:
        p.start()
    outcome, interrupted, failed_at = {}, False, None
    try:
        while len(outcome) < gpus:
            try:
                rank, kind, value = results.get(timeout=0.5)
                outcome[rank] = (kind, value)
                if kind not in ("ok", "KeyboardInterrupt") and failed_at is None:
                    failed_at = time.monotonic()
            except queue.Empty:
                pass
            except KeyboardInterrupt:
                if interrupted:
                    raise
                interrupted = True   # the ranks save and stop on their own; wait for them
            dead = [p for p in procs if p.exitcode is not None and p.exitcode != 0
                    and int(p.name.rsplit("-", 1)[1]) not in outcome]
            if dead and failed_at is None:
                failed_at = time.monotonic()
                rank = int(dead[0].name.rsplit("-", 1)[1])
                outcome[rank] = ("error", DistributedError(
                    f"rank {rank} failed: exited with code {dead[0].exitcode}"))
            # ranks blocked in a collective with a failed peer never return: stop them
            if failed_at is not None and time.monotonic() - failed_at > 10:
                break
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join()
    errors = sorted((r, e) for r, (kind, e) in outcome.items() if kind == "error")
    if errors:
        raise errors[0][1]
    if interrupted or any(kind == "KeyboardInterrupt" for kind, _ in outcome.values()):
        raise KeyboardInterrupt
    return outcome[0][1]


# --------------------------------------------------------------------------------------------
# The step's reduction.


def _round_mean(total, shards, seed):
    """int8 round_stochastic(total / shards); total holds exact integer sums."""
    xp = backend.get_array_module(total)
    out = xp.zeros(total.shape, np.int8)
    kupdate.quantize_grad(xp.ascontiguousarray(total, dtype=np.float32), 1.0 / shards, seed, out)
    return out


def _records(columns, n):
    """Rows of several arrays side by side as one uint8 (n, bytes) array (one collective)."""
    xp = backend.get_array_module(columns[0])
    return xp.concatenate([xp.ascontiguousarray(c).reshape(n, -1).view(np.uint8)
                           for c in columns], axis=1) if n else None


def _split_records(rec, like):
    """Inverse of _records for columns shaped like `like` ((dtype, shape of one row), ...)."""
    out, start = [], 0
    for dtype, shape in like:
        width = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        part = backend.get_array_module(rec).ascontiguousarray(rec[:, start:start + width])
        out.append(part.view(dtype).reshape((rec.shape[0],) + tuple(shape)))
        start += width
    return out


class StepReducer:
    """Collects each local shard's integer contributions and combines them over all shards.

    loop, per step:  for each local shard s: optimizer.begin_shard(s); forward; backward;
                     reducer.collect()
                     reducer.reduce()          # now every rank holds the same contributions
                     optimizer.step()
    With more than one local shard, dense gradients are summed in int32 buffers (4 bytes per
    dense trit while the step runs); with one, each is widened only for its own all-reduce.
    """

    def __init__(self, model, group, shards: int):
        if shards % group.size:
            raise ValueError(f"micro_batches = {shards} is not a multiple of the {group.size} "
                             "ranks")
        self.group, self.shards = group, shards
        self.local_shards = shards // group.size
        modules = list(model.modules())
        ternary = [m for m in modules if isinstance(m, TernaryModule)]
        self.dense = [m for m in ternary if not m.sparse]     # their grad_q, grad_E_q
        self.tables = [m for m in ternary if m.sparse]        # their pending rows
        self.observers = [m for m in modules if isinstance(m, Observer)]
        self.clear()

    def clear(self):
        self.dense_sums = {}            # module -> (int32 sum of grad_q, of grad_E_q)
        self.table_rows = {m: [] for m in self.tables}

    def collect(self) -> None:
        """After a shard's backward: move its contributions out of the modules."""
        for m in self.tables:
            self.table_rows[m] += m.pending
            m.pending = []
        if self.local_shards == 1:
            return  # reduce() reads grad_q directly
        for m in self.dense:
            if m.grad_q is None:
                continue
            if m not in self.dense_sums:
                xp = backend.get_array_module(m.grad_q)
                self.dense_sums[m] = (xp.zeros(m.grad_q.shape, np.int32),
                                      xp.zeros(m.grad_E_q.shape, np.int32))
            sq, sE = self.dense_sums[m]
            sq += m.grad_q
            sE += m.grad_E_q
            m.grad_q = m.grad_E_q = None

    def reduce(self) -> None:
        """Combine all shards' contributions (the rule in the module doc) into each module."""
        self._reduce_dense()
        self._reduce_tables()
        self._gather_observations()
        self.clear()

    def _dense_totals(self, m):
        """(sum of grad_q, sum of grad_E_q) of this rank's shards, or None if m had none."""
        if m in self.dense_sums:
            return self.dense_sums.pop(m)
        return None if m.grad_q is None else (m.grad_q, m.grad_E_q)

    def _reduce_dense(self):
        """Dense sums travel in flat int32 buckets: one all-reduce and one rounding a bucket,
        whatever the number of layers; each module's int8 result is a view of the bucket's."""
        buckets, current, filled = [], [], 0
        for m in self.dense:
            current.append(m)
            filled += m.logical_trits() + m.trit_shape[0]
            if filled >= DENSE_BUCKET:
                buckets.append(current)
                current, filled = [], 0
        if current:
            buckets.append(current)
        for number, modules in enumerate(buckets):
            sizes = [(m.logical_trits(), m.trit_shape[0]) for m in modules]
            xp = backend.get_array_module(modules[0].T_packed)
            flat = xp.zeros(sum(nq + nE for nq, nE in sizes), np.int32)
            at = 0
            for m, (nq, nE) in zip(modules, sizes):
                totals = self._dense_totals(m)
                if totals is not None:
                    flat[at:at + nq] = totals[0].reshape(-1)
                    flat[at + nq:at + nq + nE] = totals[1]
                at += nq + nE
            self.group.all_reduce_sum([flat])
            seed = trandom.mix_seed(modules[0].grad_seed, modules[0].quantizer.step,
                                    COMBINE_STREAM, number)
            mean = _round_mean(flat, self.shards, seed)
            at = 0
            for m, (nq, nE) in zip(modules, sizes):
                m.grad_q = mean[at:at + nq].reshape(m.trit_shape)
                m.grad_E_q = mean[at + nq:at + nq + nE]
                at += nq + nE

    def _reduce_tables(self):
        locals_ = []
        for m in self.tables:
            entries = self.table_rows[m]
            xp = backend.get_array_module(m.T_packed)
            if entries:
                rows = xp.concatenate([r for r, _, _ in entries]).astype(np.int64)
                gq = xp.concatenate([q for _, q, _ in entries])
                gE = xp.concatenate([e for _, _, e in entries])
            else:
                rows = xp.zeros(0, np.int64)
                gq, gE = xp.zeros((0, m.dim), np.int8), xp.zeros(0, np.int8)
            locals_.append((rows, gq, gE))
        like = [[(np.int64, ()), (np.int8, (m.dim,)), (np.int8, ())] for m in self.tables]
        gathered = self._gather([(rows, gq, gE) for rows, gq, gE in locals_], like)
        for m, (rows, gq, gE) in zip(self.tables, gathered):
            if rows.shape[0] == 0:
                m.pending = []
                continue
            # the entries' padding rows (-1, zero gradients) sort last, as one row kept at -1
            keys = xp.where(rows < 0, np.iinfo(np.int64).max, rows)
            unique, inverse, order, offsets, _ = ksparse.unique_rows(keys)
            unique = xp.where(unique == np.iinfo(np.int64).max, -1, unique)
            u = unique.shape[0]
            G = ksparse.segment_sum_rows(gq.astype(np.float32), inverse, u,
                                         segments=(order, offsets), check=False)
            GE = ksparse.segment_sum_rows(gE.astype(np.float32).reshape(-1, 1), inverse, u,
                                          segments=(order, offsets), check=False).reshape(-1)
            seed = trandom.mix_seed(m.grad_seed, m.quantizer.step, COMBINE_STREAM)
            m.pending = [(unique, _round_mean(G, self.shards, trandom.mix_seed(seed, 0)),
                          _round_mean(GE, self.shards, trandom.mix_seed(seed, 1)))]

    def _gather_observations(self):
        if self.group.size == 1:
            return  # one rank's lists already hold every local shard, in order
        items, like = [], []
        for m in self.observers:
            items += m.take_observations()
            like += m.observation_columns()
        gathered = iter(self._gather(items, like))
        for m in self.observers:
            m.put_observations([next(gathered) for _ in m.observation_columns()])

    def _gather(self, items, like):
        """All-gather variable-length row sets: items[i] = columns with equal first dimension;
        returns, per item, the columns of all ranks concatenated in rank order."""
        if self.group.size == 1:
            return items
        xp = backend.get_array_module(items[0][0])
        counts = xp.asarray([cols[0].shape[0] for cols in items], dtype=np.int64)
        all_counts = backend.to_numpy(self.group.all_gather([counts])[0])  # (size, items)
        sends, widths = [], []
        for cols, n, shapes in zip(items, all_counts.max(0), like):
            width = sum(int(np.prod(s, dtype=np.int64)) * np.dtype(d).itemsize
                        for d, s in shapes)
            buf = xp.zeros((max(int(n), 1), width), np.uint8)
            rec = _records(cols, cols[0].shape[0])
            if rec is not None:
                buf[:rec.shape[0]] = rec
            sends.append(buf)
            widths.append(width)
        received = self.group.all_gather(sends)
        out = []
        for i, (recv, shapes) in enumerate(zip(received, like)):
            rows = xp.concatenate([recv[r, :int(all_counts[r, i])]
                                   for r in range(self.group.size)])
            out.append(_split_records(rows, shapes))
        return out


# --------------------------------------------------------------------------------------------
# Replica check.


def state_digest(model) -> dict:
    """{buffer name: crc32 of its bytes}: equal on every rank while the replicas agree."""
    return {name: zlib.crc32(np.ascontiguousarray(backend.to_numpy(b)).tobytes())
            for name, b in model.named_buffers()}


def check_replicas(group, model, step: int) -> None:
    """Raise ReplicaDivergence on every rank if any rank's buffers differ from rank 0's."""
    if group.size == 1:
        return
    digest = state_digest(model)
    names = list(digest)
    mine = np.asarray([digest[n] for n in names], dtype=np.int64)
    xp = backend.get_array_module(next(iter(model.named_buffers()))[1])
    table = backend.to_numpy(group.all_gather([xp.asarray(mine)])[0])   # (size, buffers)
    differ = np.nonzero((table != table[0]).any(0))[0]
    if differ.size:
        ranks = sorted({int(r) for r in np.nonzero((table != table[0]).any(1))[0]})
        raise ReplicaDivergence(
            f"step {step}: the model differs between ranks (ranks {ranks} against rank 0) in "
            f"{differ.size} buffer(s), first {names[differ[0]]}; the ranks must run the same "
            "code, config and data. The last checkpoint written before this step is intact")
