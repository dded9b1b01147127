"""Million-row ternary tables: TernaryEmbeddingTable, TernaryVQCodebook, KGVQCodebook.

A table row is a ternary vector with its own scale, exactly like a TernaryLinear row:
row r = 2 ** (E[r] / 8) · T[r], T packed in bitplane32 words. Tables are read sparsely:

- construction is packed-first: random trits are written straight into the packed words by
  a kernel, and the int8 accumulators start as calloc'd zeros, so no array of the table's
  trit shape exists other than its final integer state (docs/design.md#packed-first);
- forward gathers the rows it needs, widened to float only for those rows;
- backward sums the gradient of repeated indices (deterministically), quantises it to int8
  for the touched rows only, and the optimiser updates only those rows: a step costs
  O(batch · dim) whatever the table's size. The touched rows are padded to one per index
  read (tritnet_kernels.sparse_rows.unique_rows), so backward needs no host sync and has the same
  shapes every step.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from .. import backend
from .. import rng as trandom
from ..autograd import Function, Tensor, is_grad_enabled, once_per_recompute
from .module import Observer
from .ternary import SCALE_EXPONENT_STEP, TernaryModule
from tritnet_kernels import packing as kpacking
from tritnet_kernels import sparse_rows as ksparse
from tritnet_kernels import vq_route as kvq_route
from tritnet_kernels import vq_search as kvq_search
from tritnet_kernels import vq_usage as kvq_usage

# Rows of uniform random trits (2/3 nonzero) at scale 2**(2/8) ≈ 1.19 ≈ sqrt(3/2) have unit RMS.
UNIT_RMS_EXPONENT = 2
RESTART_STREAM = 0x5245  # mixed into the seed of dead-code restarts' random choices


def _index_array(op, indices, rows, like, check=True):
    """Indices as a flat int32/int64 array on `like`'s device, checked before any kernel runs
    (check=False skips the range check, a host sync on the GPU, for indices the caller made)."""
    if isinstance(indices, Tensor):
        indices = indices.data
    xp = backend.get_array_module(like)
    if not (isinstance(indices, np.ndarray) or backend.is_cupy(indices)):
        indices = np.asarray(indices)
    if indices.dtype not in (np.int32, np.int64):
        raise TypeError(f"{op}: indices have dtype {indices.dtype}, expected int32 or int64")
    if backend.is_cupy(indices) and not backend.is_cupy(like):
        raise TypeError(f"{op}: indices are on cuda but the table is on cpu")
    # checked where they are: free on the host (a data loader's tokens), one reduction and a
    # host sync on the GPU
    if check and indices.size:
        ixp = backend.get_array_module(indices)
        lo, hi = (int(v) for v in ixp.stack([indices.min(), indices.max()]).tolist())
        if lo < 0 or hi >= rows:
            bad = lo if lo < 0 else hi
            raise IndexError(f"{op}: index {bad} is out of range for a table of {rows} rows "
                             f"(expected indices in [0, {rows}))")
    flat = xp.ascontiguousarray(xp.asarray(indices).reshape(-1))
    return indices.shape, flat


class RowGather(Function):
    """out[i] = row indices[i] of a ternary table; its gradient goes to the table's int8 state."""

    def forward(self, *, table, indices, increasing=False):
        self.table, self.indices, self.increasing = table, indices, increasing
        self.updates_state = table.training and is_grad_enabled()
        return ksparse.gather_rows(table.T_packed, table.E, indices, table.dim, check=False)

    def backward(self, grad):
        self.table.accumulate_row_grad(self.indices, grad, increasing=self.increasing)
        return ()


class TernaryEmbeddingTable(TernaryModule):
    """A (rows, dim) table of ternary rows with int8 scales, read and trained sparsely.

    Buffers: T_packed uint32 (rows, 2·ceil(dim/32)) bitplane32; E int8 (rows,), s = 2**(E/8);
    T_accum int8 (rows, dim); E_accum int8 (rows,). Initial rows are uniform random trits at
    scale 2**(2/8), about unit RMS. After backward, `pending` lists, per use in the step, the
    touched rows (sorted, unique, then -1 padding) with their int8 gradients; the optimiser
    applies and drops them.
    """

    sparse = True   # a step reads and writes only the rows it touched
    step_attributes = TernaryModule.step_attributes + ("pending",)

    def __init__(self, rows: int, dim: int, device: str | None = None,
                 exponent: int = UNIT_RMS_EXPONENT):
        super().__init__()
        name = type(self).__name__
        for label, v in (("rows", rows), ("dim", dim)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}: {label} must be a positive integer, got {v!r}")
        if not -128 <= exponent <= 127:
            raise ValueError(f"{name}: exponent must be in [-128, 127], got {exponent}")
        self.rows, self.dim = int(rows), int(dim)
        self._init_ternary_state(self.rows, self.dim, exponent, device)
        self.pending = []

    def extra_repr(self) -> str:
        return f"rows={self.rows}, dim={self.dim}"

    def forward(self, indices, *, check=True, increasing=False) -> Tensor:
        """Rows `indices` (any integer shape) as float32 (*indices.shape, dim).

        For indices valid by construction, such as an arange of the rows: check=False skips
        the range check (a host sync on the GPU; a wrong index then reads out of bounds), and
        increasing=True (indices strictly increasing, so no row repeats) lets backward skip
        grouping the repeats (a sort and a host sync on the GPU; repeats would then update a
        row twice at once)."""
        shape, flat = _index_array(type(self).__name__, indices, self.rows, self.T_packed, check)
        out = RowGather.apply(table=self, indices=flat, increasing=increasing)
        return out.reshape(*shape, self.dim)

    def trits(self, rows=None):
        """T (or the listed rows of T) as int8: a decoded copy for inspection and tests."""
        packed = self.T_packed if rows is None else self.T_packed[rows]
        return kpacking.unpack_trits(packed, self.dim)

    # --- the sparse integer gradient path ---------------------------------------------------
    def accumulate_row_grad(self, indices, grad, *, increasing=False) -> None:
        """Sum grad over repeated indices, quantise it to int8 for the touched rows only.
        increasing=True: the indices are strictly increasing, so each row's gradient is its
        own (what grouping would give, bit for bit, without its sort and host sync)."""
        xp = backend.get_array_module(grad)
        grad = xp.ascontiguousarray(grad.reshape(-1, self.dim), dtype=np.float32)
        if increasing:
            rows, G, count = indices.astype(np.int64, copy=False), grad, None
        else:
            rows, inverse, order, offsets, count = ksparse.unique_rows(indices)
            G = ksparse.segment_sum_rows(grad, inverse, rows.shape[0],
                                         segments=(order, offsets), check=False)
        # padding rows (-1) read the last row: their G is 0, so their gradients are 0 too
        grad_q, grad_E_q = self.quantize_grads(G, self.T_packed[rows], self.E[rows], rows=count)
        self.pending.append((rows, grad_q, grad_E_q))

    def apply_update(self, flip_threshold: int, scale_threshold: int, decay_shift: int,
                     flip_carry: bool = False, counts=None):
        for rows, grad_q, grad_E_q in self.pending:
            counts = ksparse.sparse_ternary_update(
                self.T_packed, self.T_accum, self.E, self.E_accum, rows, grad_q, grad_E_q,
                flip_threshold=flip_threshold, flip_decay_shift=decay_shift,
                scale_threshold=scale_threshold, scale_decay_shift=decay_shift,
                flip_carry=flip_carry, counts=counts,
                check=False)  # rows come from unique_rows of checked indices
        self.pending = []
        return counts

    def zero_grad(self) -> None:
        self.pending = []


class VQOutput(NamedTuple):
    quantized: Tensor   # straight-through: forward value = the code, gradient = identity to x
    indices: object     # int32 xp array (*x.shape[:-1]) of chosen codes
    loss: Tensor        # codebook loss + beta · commitment loss, a float scalar


class TernaryVQCodebook(TernaryEmbeddingTable, Observer):
    """Vector quantisation onto `size` ternary codewords of width `dim`.

    Distance: queries are ternarised (sign of the entries above half the row's mean |x|) and
    the nearest code maximises the signed squared cosine d·|d| / nnz(c), d the popcount dot
    product of the ternary query and code (tritnet_kernels/vq_search.py states it exactly); ties
    go to the lowest index. The code's scale does not enter the search: the search picks a
    direction, the gathered code supplies its learned length.

    Forward returns the straight-through quantised vectors, the code indices and
    loss = ‖code − sg(x)‖² + beta·‖x − sg(code)‖² (means over elements): the first term trains
    the codewords (sparse, int8, only the chosen rows), the second commits the encoder.

    Search: "exact" scans the whole book; "routed" ternary-k-means the codes into
    `n_partitions` partitions (coarse centroids, default √size), routes each query to its
    `nprobe` best partitions (default 48) and searches exactly inside them. The index is rebuilt every
    `index_refresh` training steps, as codes move. `routed_recall()` measures recall@1 of the
    routed search against exact on given queries.

    Dead codes (docs/model.md#dead-codes): `usage` (int16, saturating) counts how often each
    code was chosen.
    Every `restart_every` training steps, each code with usage 0 is restarted from a random
    row of the step's queries (its ternarised pattern, with the least-squares scale for it),
    its accumulators cleared; then all counts are halved, so a code must keep being chosen to
    stay alive.

    Forward never changes this state: a training forward records its choices (and, on a step
    that restarts codes, its queries) in `observed`; the optimiser's step applies them
    (`apply_observations`), after the weight update. So every use of the book within a step
    sees the same codes, a failed step (a NaN loss) leaves no trace, and data-parallel ranks
    can gather each other's observations and apply the same ones (tritnet/distributed.py).
    """

    step_attributes = TernaryEmbeddingTable.step_attributes + (
        "observed", "restart_queries", "steps_since_restart", "steps_since_index", "index")

    def __init__(self, size: int, dim: int = 64, *, beta: float = 0.25, search: str = "exact",
                 n_partitions: int | None = None, nprobe: int | None = None, index_refresh: int = 1000,
                 restart_every: int = 100, device: str | None = None):
        super().__init__(size, dim, device=device)
        name = type(self).__name__
        if search not in ("exact", "routed"):
            raise ValueError(f"{name}: search must be 'exact' or 'routed', got {search!r}")
        if not 0 <= beta:
            raise ValueError(f"{name}: beta must be >= 0, got {beta}")
        self.size, self.beta, self.search_mode = self.rows, float(beta), search
        self.n_partitions = n_partitions or max(1, min(size, int(round(math.sqrt(size)))))
        # 48 of sqrt(K) partitions measured recall@1 0.98 on a 1M book (tests/nn/test_tables.py)
        nprobe = min(48, self.n_partitions) if nprobe is None else nprobe
        if not 1 <= nprobe <= min(64, self.n_partitions):
            raise ValueError(f"{name}: nprobe must be in [1, {min(64, self.n_partitions)}], "
                             f"got {nprobe}")
        self.nprobe, self.index_refresh, self.restart_every = nprobe, index_refresh, restart_every
        self.register_buffer("usage", backend.zeros(self.rows, np.int16, device))
        self.index = None          # (centroids, partition_offsets, partition_codes), integer
        self.steps_since_index = 0
        self.steps_since_restart = 0
        self.observed = []         # this step's chosen codes, one int32 array per use
        self.restart_queries = []  # (float queries, ternarised queries) per use, restart steps only
        # set while a CUDA graph of a step is captured (tritnet/capture.py): every step's
        # queries are then recorded, so that a replayed step can restart codes from them
        self.keep_queries = False

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}, search={self.search_mode!r}"

    # --- checkpoint hooks: counters outside the buffers that decide future steps ----------
    def value_ranges(self) -> dict:
        """`usage` counts (saturating int16) are never negative; a checkpoint's loader checks."""
        return {"usage": (0, np.iinfo(np.int16).max)}

    def get_extra_state(self) -> dict:
        """Counters that time dead-code restarts and index refreshes, so a resumed run restarts
        codes on the same steps. The routed index itself is not saved: it is rebuilt from the
        codes at the first search after loading (so routed-search runs resume exactly only
        from a step where the index was fresh)."""
        return {"steps_since_restart": self.steps_since_restart,
                "steps_since_index": self.steps_since_index}

    def set_extra_state(self, state: dict) -> None:
        self.steps_since_restart = int(state["steps_since_restart"])
        self.steps_since_index = int(state["steps_since_index"])
        self.index = None

    # --- search -------------------------------------------------------------------------
    def build_index(self, iterations: int = 2) -> None:
        """Partition the codes by ternary k-means: centroids start as evenly spaced codes; each
        round assigns every code to its nearest centroid and re-ternarises each centroid from
        the mean of its codes' trits (gathered in chunks, never the whole book as float)."""
        xp = backend.get_array_module(self.T_packed)
        P, K = self.n_partitions, self.rows
        picks = xp.asarray(np.linspace(0, K - 1, P).astype(np.int64))
        centroids = xp.ascontiguousarray(self.T_packed[picks])
        for it in range(iterations + 1):
            assign = kvq_search.nearest_code(self.T_packed, centroids, self.dim)
            if it == iterations:
                break
            sums = xp.zeros((P, self.dim), dtype=np.float32)
            chunk = 1 << 18
            for start in range(0, K, chunk):
                idx = xp.arange(start, min(K, start + chunk), dtype=np.int64)
                trits = kpacking.unpack_trits(self.T_packed[idx], self.dim).astype(np.float32)
                sums += ksparse.segment_sum_rows(trits, assign[start:start + chunk], P,
                                                 check=False)
            empty = xp.abs(sums).sum(1) == 0  # keep the old centroid of an empty partition
            fresh = kvq_search.ternarize_queries(xp.ascontiguousarray(sums))
            centroids = xp.where(empty[:, None], centroids, fresh)
        order = xp.argsort(assign, kind="stable").astype(np.int32)
        counts = xp.bincount(assign, minlength=P)
        offsets = xp.zeros(P + 1, dtype=np.int64)
        offsets[1:] = xp.cumsum(counts)
        self.index = (xp.ascontiguousarray(centroids), offsets, xp.ascontiguousarray(order))
        self.steps_since_index = 0

    def search(self, queries, mode: str | None = None):
        """Nearest code (int32 (n,)) of each ternarised query (bitplanes (n, 2G))."""
        mode = mode or self.search_mode
        if mode == "exact":
            return kvq_search.nearest_code(queries, self.T_packed, self.dim)
        if self.index is None:
            self.build_index()
        centroids, offsets, codes = self.index
        probe = kvq_route.top_codes(queries, centroids, self.dim, self.nprobe)
        return kvq_route.nearest_code_in_partitions(queries, self.T_packed, self.dim, offsets, codes,
                                              probe, check=False)

    def routed_recall(self, x) -> float:
        """recall@1 of the routed search against exact on float queries x (n, dim)."""
        q = kvq_search.ternarize_queries(self._queries(x))
        exact, routed = self.search(q, "exact"), self.search(q, "routed")
        return float((exact == routed).mean())

    def _queries(self, x):
        data = x.data if isinstance(x, Tensor) else x
        if data.shape[-1] != self.dim:
            raise ValueError(f"{type(self).__name__}({self.size}, {self.dim}): queries have "
                             f"shape {tuple(data.shape)}, expected (..., {self.dim})")
        xp = backend.get_array_module(data)
        return xp.ascontiguousarray(data.reshape(-1, self.dim), dtype=np.float32)

    # --- forward ------------------------------------------------------------------------
    def forward(self, x: Tensor) -> VQOutput:
        flat = self._queries(x)
        if backend.is_cupy(flat) != backend.is_cupy(self.T_packed):
            raise TypeError(f"{type(self).__name__}: queries are on {x.device} but the "
                            f"codebook is on {backend.array_device(self.T_packed)}")
        queries = kvq_search.ternarize_queries(flat)
        indices = once_per_recompute(lambda: self.search(queries))  # one search a step
        codes = RowGather.apply(table=self, indices=indices).reshape(*x.shape)
        if codes.dtype != x.dtype:
            codes = codes.astype(x.dtype)
        if self.training and is_grad_enabled():
            self.observed.append(indices)
            if self.restart_due() or self.keep_queries:
                self.restart_queries.append((flat, queries))
        diff = codes - x.detach()
        loss = (diff * diff).mean()
        if self.beta:
            commit = x - codes.detach()
            loss = loss + self.beta * (commit * commit).mean()
        # the code itself, exactly (x - x is 0), with x's gradient: x + (code - x) would be
        # the code up to rounding that depends on x, and the relation of two equal
        # consecutive codes (KGVQCodebook: code - previous) would be that rounding noise,
        # ternarised into an arbitrary relation code
        quantized = codes.detach() + (x - x.detach())
        return VQOutput(quantized, indices.reshape(x.shape[:-1]), loss)

    def restart_due(self) -> bool:
        """Whether this step's observations end with a dead-code restart."""
        return bool(self.restart_every) and self.steps_since_restart + 1 >= self.restart_every

    def apply_observations(self) -> None:
        """Apply the step's recorded choices: usage counts, then (on restart steps) the
        dead-code restart from the step's queries, then the routed index's refresh clock."""
        if not self.observed:
            return
        kvq_usage.count_usage(backend.concatenate(self.observed), self.usage, check=False)
        self.tick()
        self.restart_when_due(self.restart_queries)
        if self.search_mode == "routed" and self.steps_since_index >= self.index_refresh:
            self.index = None  # rebuilt lazily by the next search
        self.clear_observations()

    def tick(self) -> None:
        """The host's count of one more training step (restart and index-refresh clocks):
        what apply_observations counts, and all a replayed CUDA graph of a step leaves to
        the host (tritnet/capture.py), with a dead-code restart when one is due
        (`restart_when_due`)."""
        self.steps_since_restart += 1
        self.steps_since_index += 1

    def restart_when_due(self, recorded) -> None:
        """The step's dead-code restart, if one is due (after `tick`), from `recorded`: the
        step's (float, ternarised) query pairs, one per use of the book; the eager step's
        own, or those a replayed step's graph wrote (tritnet/capture.py)."""
        if not (self.restart_every and self.steps_since_restart >= self.restart_every):
            return
        xp = backend.get_array_module(self.T_packed)
        if recorded:
            flat = xp.concatenate([f for f, _ in recorded])
            queries = xp.concatenate([q for _, q in recorded])
        else:  # restart_every was lowered mid-step: no queries kept, only halve the counts
            flat = xp.zeros((0, self.dim), np.float32)
            queries = xp.zeros((0, 2 * kpacking.n_groups(self.dim)), np.uint32)
        self.restart_dead_codes(flat, queries)

    def host_work_due(self) -> bool:
        """Whether the next training step makes new arrays: a routed index (re)build. A
        captured CUDA graph reads the arrays it was captured with, so it cannot replay such a
        step. (A dead-code restart writes the book's arrays in place: a replayed step does it
        after its graphs, tritnet/capture.py.)"""
        return self.search_mode == "routed" and (
            self.index is None or self.steps_since_index + 1 >= self.index_refresh)

    def clear_observations(self) -> None:
        self.observed, self.restart_queries = [], []

    def observation_columns(self) -> list:
        """Chosen codes; and the restart step's float and ternarised queries."""
        return [[(np.int32, ())],
                [(np.float32, (self.dim,)), (np.uint32, (2 * kpacking.n_groups(self.dim),))]]

    def take_observations(self) -> list:
        xp = backend.get_array_module(self.T_packed)
        idx = xp.concatenate(self.observed) if self.observed else xp.zeros(0, np.int32)
        if self.restart_queries:
            flat = xp.concatenate([f for f, _ in self.restart_queries])
            q = xp.concatenate([q for _, q in self.restart_queries])
        else:
            flat = xp.zeros((0, self.dim), np.float32)
            q = xp.zeros((0, 2 * kpacking.n_groups(self.dim)), np.uint32)
        return [(idx,), (flat, q)]

    def put_observations(self, groups: list) -> None:
        (idx,), (flat, q) = groups
        self.observed = [idx] if idx.shape[0] else []
        self.restart_queries = [(flat, q)] if flat.shape[0] else []

    def restart_dead_codes(self, flat, queries=None) -> int:
        """Restart unused codes from rows of `flat` (float queries (n, dim)), the rule in the
        class doc; returns the number restarted."""
        xp = backend.get_array_module(self.T_packed)
        if queries is None:
            queries = kvq_search.ternarize_queries(flat)
        dead = xp.nonzero(self.usage == 0)[0]
        n = min(int(dead.shape[0]), flat.shape[0])
        if n:
            # counter-based: the same draws on every rank, and after a resume
            rng = np.random.default_rng(trandom.mix_seed(self.grad_seed, self.quantizer.step,
                                                         RESTART_STREAM))
            dead = dead[xp.asarray(rng.choice(int(dead.shape[0]), n, replace=False))]
            src = xp.asarray(rng.choice(flat.shape[0], n, replace=False))
            self.T_packed[dead] = queries[src]
            trits = kpacking.unpack_trits(xp.ascontiguousarray(queries[src]), self.dim)
            # least-squares scale for a fixed ternary pattern: mean |x| over its nonzero trits
            kept = xp.abs(flat[src]) * (trits != 0)
            nnz = xp.maximum((trits != 0).sum(1), 1)
            s = xp.maximum(kept.sum(1) / nnz, 1e-30)
            E = xp.clip(xp.rint(xp.log2(s) / SCALE_EXPONENT_STEP), -128, 127).astype(np.int8)
            self.E[dead] = E
            self.T_accum[dead] = 0
            self.E_accum[dead] = 0
            self.usage[dead] = 1
        self.usage >>= 1
        self.steps_since_restart = 0
        if n and self.index is not None:
            self.index = None
        return n

    def perplexity(self, indices) -> float:
        """exp(entropy) of the code distribution of `indices`: the number of codes in use."""
        counts = np.bincount(backend.to_numpy(indices).reshape(-1), minlength=1)
        p = counts[counts > 0] / counts.sum()
        return float(np.exp(-(p * np.log(p)).sum()))


class KGVQCodebook(TernaryVQCodebook):
    """The knowledge-graph (relation) codebook: a thin wrapper around TernaryVQCodebook with
    no state of its own. It quantises the relation between two consecutive code vectors,
    compose(a, b) = b − a (a translation, as in TransE), so that a code pair's relation is
    itself a ternary code."""

    def compose(self, previous: Tensor, current: Tensor) -> Tensor:
        return current - previous

    def forward(self, previous: Tensor, current: Tensor | None = None) -> VQOutput:
        x = previous if current is None else self.compose(previous, current)
        return super().forward(x)
