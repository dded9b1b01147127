"""A training step replayed from CUDA graphs (docs/design.md#cuda-graphs): `CapturedStep`.

A step of the small preset launches ~3,600 kernels, copies and fills; issuing them from
Python takes ~130 ms of host time against ~45 ms of GPU work (H200). Captured once as a CUDA
graph (cudaStreamBeginCapture) and then replayed with one launch, the step costs the GPU
time alone. Capture needs a step that never waits on the device and has the same shapes and
the same arrays every time; the framework's step is built that way:

- no host syncs: MoE experts run on a fixed count of row tiles whose owners stay on the
  device (models.expert_tiles, gemm.matmul_gathered), table gradients on rows
  padded to a fixed count (tritnet_kernels.sparse_rows.unique_rows), the VQ search and routing
  without sorts or counts on the host, token ids checked on the host before their copy;
- the per-step numbers, the step (random bits of the stochastic rounding) and the gain
  (schedule), are read on the device from the optimiser's clock (optim.TritFlip.clock),
  which the step advances there;
- every float product goes through tritnet_kernels.float_gemm (CuPy's cuBLAS calls refuse capture);
- constants a step would copy from the host (ALiBi slopes) are copied once and kept.

Two graphs: the forward and backward, then the optimiser's update. Between them the loop reads
the loss (the step's one host sync) and drops a step whose loss is not finite before
anything is applied, as the eager loop does.

A replay runs the step's device work only. The host's part of a step -- the optimiser's step
count, the code books' restart and index clocks -- is advanced by `update()` itself, and so
is a dead-code restart that falls due (random choices made on the host, written into the
books' arrays in place): its queries are the ones the replayed forward wrote, in arrays the
capture kept (the books record every step's queries while a capture runs); a capture never
falls on such a step (its host syncs would break it). Steps that make new arrays run eagerly
instead: a routed-search index (re)build. The graphs are captured again after such a step,
and after the first `warmup` steps, which compile kernels and fill caches.

Memory: the graphs' intermediate arrays come from a memory pool of their own, kept while the
graphs live (graph replays write them; nothing else may get them). It holds one step's
working set. The process never holds two: before a capture fills the graphs' pool, the
default pool's idle blocks (the eager steps' working set) go back to the device; an eager
step later (a restart) drops the graphs and gives their pool's idle blocks back before it
allocates its own working set.

Limits (checked, with a clear error): CuPy on a GPU; one micro-batch per step on one rank;
every batch of one shape. A capture that fails (a code path that syncs with the host, a
library that refuses capture) costs nothing but speed: the host state the half-captured step
changed is put back, that step and every later one run eagerly, and `failed` (and `log`)
says why.
"""

from __future__ import annotations

import numpy as np

from . import backend
from .errors import TritnetError
from .nn.tables import TernaryVQCodebook


class CaptureError(TritnetError, RuntimeError):
    """A training step cannot be captured as a CUDA graph here; the message says why."""


class CapturedStep:
    """The training step of `model` with `optimizer`, replayed from CUDA graphs.

        step = CapturedStep(model, optimizer)
        loss, ce = step.forward_backward(x, y)   # device scalars; x, y host int arrays (B, T)
        if finite(loss): step.update()           # the integer update, as optimizer.step()
        else:            step.drop()             # as optimizer.zero_grad(): nothing applied

    Each call pair is one training step, bit-identical to the eager step (model.loss,
    backward, optimizer.step) on the same state: the same kernels run in the same order.
    `counts` says how many steps ran eagerly, were captured and were replayed.
    """

    def __init__(self, model, optimizer, *, warmup: int = 3, log=None):
        if backend.cupy is None or not backend.is_cupy(optimizer.modules[0].T_packed):
            raise CaptureError("CapturedStep: the model is not on a CUDA device (CUDA graphs "
                               "need CuPy and a GPU); train it eagerly")
        cupy = backend.cupy
        self.model, self.optimizer, self.warmup = model, optimizer, warmup
        self.books = [m for m in model.modules() if isinstance(m, TernaryVQCodebook)]
        self.pool = cupy.cuda.MemoryPool()
        self.stream = cupy.cuda.Stream(non_blocking=True)   # capture needs a stream of its own
        self.graphs = None            # (forward and backward, update) once captured
        self.tokens = self.targets = None   # the graphs' inputs, refilled every step
        self.loss = self.ce = None          # ... and outputs
        self.ticking = []                   # code books whose clocks a step advances
        self.recorded = {}                  # book -> the queries its captured forward writes
        self.mode = None                    # this step's: "eager", "capture" or "replay"
        self.counts = {"eager": 0, "capture": 0, "replay": 0}
        self.failed = None                  # why capture failed (then every step is eager)
        self.log = log

    # --- the two halves of a step ------------------------------------------------------
    def forward_backward(self, x, y):
        """(loss, cross-entropy) device scalars of batch (x, y) after its backward."""
        cupy = backend.cupy
        x, y = np.ascontiguousarray(x), np.ascontiguousarray(y)
        if self.mode in ("eager", "capture", "replay-pending"):
            raise CaptureError("CapturedStep: forward_backward called twice; call update() or "
                               "drop() after each")
        self._check_batch(x, y)
        # (only the books a step uses count: an unused one's restart is never applied)
        if (self.failed or self.counts["eager"] < self.warmup
                or any(b.host_work_due() for b in self.ticking)
                or (self.graphs is None and any(b.restart_due() for b in self.ticking))):
            # (a replay restarts codes after its graphs, but a capture would record the
            # restart's host syncs into the update's graph: such a step captures nothing)
            return self._eager_forward_backward(x, y)
        if self.tokens is None:
            self.tokens = cupy.empty(x.shape, np.int64)
            self.targets = cupy.empty(y.shape, np.int64)
        self.tokens.set(x)
        self.targets.set(y)
        if self.graphs is None:
            def forward_backward():
                loss, ce = self.model.loss(self.tokens, self.targets, check=False)
                loss.backward()
                self.loss, self.ce = loss.data, ce.data

            for book in self.books:
                book.keep_queries = True
            try:
                graph = self._capture(forward_backward)
            finally:
                for book in self.books:
                    book.keep_queries = False
            if graph is None:
                return self._eager_forward_backward(x, y)
            # arrays of the graphs' pool that every replay of the forward writes again
            self.recorded = {book: list(book.restart_queries) for book in self.books
                             if book.restart_queries}
            self.mode, self.graphs = "capture", (graph, None)
        else:
            self.mode = "replay-pending"
        self.graphs[0].launch(cupy.cuda.get_current_stream())
        return self.loss, self.ce

    def update(self):
        """Apply the step's integer update (optimizer.step() of the eager loop)."""
        cupy = backend.cupy
        mode, self.mode = self.mode, None
        if mode in ("eager", "capture"):
            self.ticking = [b for b in self.books if b.observed]
        if mode == "eager":
            self.optimizer.step()
        elif mode == "capture":
            graph = self._capture(self.optimizer.step)
            if graph is None:   # the forward and backward graph ran: apply its gradients
                self.optimizer.step()
                mode = "eager"
            else:
                self.graphs = (self.graphs[0], graph)
                graph.launch(cupy.cuda.get_current_stream())
        elif mode == "replay-pending":
            self.graphs[1].launch(cupy.cuda.get_current_stream())
            self._tick()
            mode = "replay"
        else:
            raise CaptureError("CapturedStep: update() without forward_backward()")
        self.counts[mode] += 1

    def drop(self):
        """Apply nothing of this step (its loss was not finite), as optimizer.zero_grad()."""
        if self.mode == "capture":
            self.graphs, self.recorded = None, {}   # half captured: capture both again
        self.optimizer.zero_grad()
        self.mode = None

    def release(self):
        """Drop the graphs and give their pool's idle blocks back to the device, so that eager
        work (a step with host work, an evaluation) does not hold its working set beside
        theirs. The next step that can be captured captures them again."""
        self.graphs, self.recorded = None, {}
        self.pool.free_all_blocks()

    def _eager_forward_backward(self, x, y):
        if self.graphs is not None:
            self.release()   # host work may move arrays the graphs read: capture again
        self.mode = "eager"
        loss, ce = self.model.loss(x, y)
        loss.backward()
        return loss.data, ce.data

    def _capture(self, work):
        """A graph of work() (None if capture failed: the host state work() changed is put back
        and `failed` says why; nothing ran on the device)."""
        cupy = backend.cupy
        owners = [self.optimizer, *self.model.modules()]
        saved = [o.step_state() for o in owners]   # the host state a step changes
        # The default pool's idle blocks (the eager steps' working set) go back to the device
        # first, or the capture would fill the graphs' pool beside them: two working sets.
        cupy.get_default_memory_pool().free_all_blocks()
        try:
            with cupy.cuda.using_allocator(self.pool.malloc), self.stream:
                self.stream.begin_capture()
                try:
                    work()
                finally:
                    graph = self.stream.end_capture()
            return graph
        except Exception as e:   # whatever refused capture: train on, eagerly
            for owner, state in zip(owners, saved):
                owner.load_step_state(state)
            self.graphs = None
            self.failed = f"{type(e).__name__}: {e}"
            if self.log is not None:
                self.log(f"CUDA graphs off: capturing a step failed ({self.failed}); training "
                         "goes on with eager steps")
            return None

    # --- what a replay leaves to the host ----------------------------------------------
    def _tick(self):
        """The host half of optimizer.step(): the code books' clocks and the restarts that
        fall due, then its step count (the device half, the clock included, was in the graph).
        In the eager step's order: a restart's random choices are seeded by the step count."""
        for book in self.ticking:
            book.tick()
            book.restart_when_due(self.recorded.get(book, []))
        self.optimizer.count_step()

    def _check_batch(self, x, y):
        """Every batch, eager or not: the shape of the graphs' input buffers once they exist,
        and token ids in range, checked here on the host (the graphs read them unchecked)."""
        for name, a, buffer in (("tokens", x, self.tokens), ("targets", y, self.targets)):
            if buffer is not None and a.shape != buffer.shape:
                raise CaptureError(f"CapturedStep: {name} of shape {a.shape}, but the captured "
                                   f"step takes {buffer.shape}: a graph replays one shape")
            if a.dtype.kind not in "iu":
                raise TypeError(f"CapturedStep: {name} have dtype {a.dtype}, expected integers")
            vocab = self.model.config.vocab_size
            if a.size and (a.min() < 0 or a.max() >= vocab):
                bad = a.min() if a.min() < 0 else a.max()
                raise IndexError(f"CapturedStep: {name} hold id {bad}, out of range for the "
                                 f"vocabulary of {vocab}")
