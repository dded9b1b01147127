"""Reverse-mode autograd over xp arrays: Tensor, Function, the tape and backward().

Define-by-run, in the spirit of micrograd, Chainer and PyTorch. A `Function` subclass writes
`forward(*arrays, **params)` and `backward(*grad_outputs)` over raw NumPy/CuPy arrays and keeps,
as attributes of itself, only what its backward needs. `Function.apply(*tensors, **params)`
runs forward and, when grad mode is on and some input requires grad, records the call as a
node of the tape: the outputs point at the node, the node at its inputs.

`Tensor.backward()` orders the nodes reachable from the root by an iterative depth-first walk
(no recursion, so a 20,000-op chain is fine), then visits them in reverse topological order:
gradients for each node's outputs are summed, hooks run, the node's backward runs, and the
node is released at once (its saved arrays and its links to inputs are dropped), so
intermediates are freed as soon as nothing needs them.

Ternary weights never get a float `.grad`: the op that uses one writes the weight's int8
gradient into the module's state during its backward (docs/design.md#integer-gradients).
Such an op sets `self.updates_state = True` in forward so that its node is recorded even when
no input requires grad (the first layer of a network reads data that needs no gradient).
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager

import numpy as np

from . import backend

_grad_enabled = True


@contextmanager
def no_grad():
    """Run without recording a tape (evaluation, optimiser steps)."""
    global _grad_enabled
    previous, _grad_enabled = _grad_enabled, False
    try:
        yield
    finally:
        _grad_enabled = previous


@contextmanager
def enable_grad():
    global _grad_enabled
    previous, _grad_enabled = _grad_enabled, True
    try:
        yield
    finally:
        _grad_enabled = previous


def is_grad_enabled() -> bool:
    return _grad_enabled


def _describe(t) -> str:
    if isinstance(t, Tensor):
        return f"{tuple(t.shape)} {t.dtype} on {t.device}"
    return type(t).__name__


class Function:
    """One differentiable primitive: `forward` and `backward` side by side.

    forward(*arrays, **params) -> array or tuple of arrays
    backward(*grad_outputs)   -> one gradient (or None) per tensor input, shaped like it

    `self.needs_input_grad[i]` says whether input i wants a gradient, so backward can skip work.
    """

    updates_state = False  # set True in forward by ops that feed a module's integer state

    def forward(self, *arrays, **params):  # pragma: no cover - abstract
        raise NotImplementedError

    def backward(self, *grad_outputs):  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def apply(cls, *inputs, **params):
        op = cls.__name__
        tensors = []
        for x in inputs:
            if not isinstance(x, Tensor):
                raise TypeError(f"{op}: inputs must be Tensors, got {type(x).__name__}; "
                                "wrap arrays with tritnet.tensor(...)")
            tensors.append(x)
        devices = {t.device for t in tensors}
        if len(devices) > 1:
            shapes = ", ".join(_describe(t) for t in tensors)
            raise TypeError(f"{op}: inputs are on different devices ({shapes}); move them to one "
                            "device with .to('cpu') or .to('cuda')")
        ctx = cls()
        ctx.needs_input_grad = tuple(t.requires_grad for t in tensors)
        out = ctx.forward(*(t.data for t in tensors), **params)
        record = _grad_enabled and (any(ctx.needs_input_grad) or ctx.updates_state)
        outs = out if isinstance(out, tuple) else (out,)
        # An integer output (indices beside values) carries no gradient; the float outputs do.
        results = tuple(Tensor(a, requires_grad=record and a.dtype.kind == "f") for a in outs)
        if record:
            ctx.inputs = tensors
            ctx.outputs = [weakref.ref(r) for r in results]
            ctx.output_meta = [(a.shape, a.dtype) for a in outs]
            for i, r in enumerate(results):
                r._node, r._index = ctx, i
        else:
            ctx.__dict__.clear()  # nothing will call backward: keep no saved arrays
        return results if isinstance(out, tuple) else results[0]

    def _release(self):
        """Drop everything this node kept (saved arrays, inputs): backward is done with it."""
        self.__dict__.clear()
        self.released = True


class Tensor:
    """An xp array with autograd bookkeeping: `data`, `requires_grad`, `grad`, the node made it."""

    __slots__ = ("data", "requires_grad", "grad", "_node", "_index", "_hooks", "_retain", "name",
                 "__weakref__")
    __array_priority__ = 1000  # so numpy scalars on the left defer to Tensor operators

    def __init__(self, data, requires_grad: bool = False, name: str | None = None):
        if isinstance(data, Tensor):
            data = data.data
        if not (isinstance(data, np.ndarray) or backend.is_cupy(data)):
            data = np.asarray(data)
        if requires_grad and data.dtype.kind != "f":
            raise TypeError(f"Tensor: only floating-point tensors can require grad, got {data.dtype}")
        self.data = data
        self.requires_grad = bool(requires_grad)
        self.grad = None
        self._node = None
        self._index = 0
        self._hooks = None
        self._retain = False
        self.name = name

    # --- plain properties ---------------------------------------------------------------
    shape = property(lambda self: self.data.shape)
    dtype = property(lambda self: self.data.dtype)
    ndim = property(lambda self: self.data.ndim)
    size = property(lambda self: self.data.size)
    device = property(lambda self: backend.array_device(self.data))
    is_leaf = property(lambda self: self._node is None)

    def __len__(self):
        return len(self.data)

    def __repr__(self):
        grad = ", requires_grad=True" if self.requires_grad else ""
        return f"Tensor(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device}{grad})"

    def numpy(self) -> np.ndarray:
        return backend.to_numpy(self.data)

    def item(self):
        if self.size != 1:
            raise ValueError(f"item: tensor has {self.size} elements (shape {tuple(self.shape)}), "
                             "expected exactly 1")
        return self.data.reshape(()).item()

    def detach(self) -> "Tensor":
        """The same array, cut from the tape."""
        return Tensor(self.data, requires_grad=False)

    def requires_grad_(self, flag: bool = True) -> "Tensor":
        if flag and self.dtype.kind != "f":
            raise TypeError(f"requires_grad_: only floating-point tensors can require grad, got {self.dtype}")
        self.requires_grad = flag
        return self

    def to(self, device: str) -> "Tensor":
        t = Tensor(backend.to_device(self.data, device), requires_grad=self.requires_grad)
        return t

    def astype(self, dtype) -> "Tensor":
        from . import functional as F
        return F.cast(self, dtype)

    def register_hook(self, hook):
        """hook(grad) -> None or a replacement gradient; runs when this tensor's grad is ready."""
        if not self.requires_grad:
            raise RuntimeError("register_hook: tensor does not require grad")
        self._hooks = (self._hooks or []) + [hook]
        return hook

    def retain_grad(self) -> None:
        """Keep `.grad` on a non-leaf tensor after backward (leaves always keep it)."""
        self._retain = True

    def zero_grad(self) -> None:
        self.grad = None

    # --- backward -----------------------------------------------------------------------
    def backward(self, grad=None, retain_graph: bool = False) -> None:
        if not self.requires_grad:
            raise RuntimeError("backward: tensor does not require grad (no input of the "
                               "computation requires grad, or it was made under no_grad)")
        if grad is None:
            if self.size != 1:
                raise RuntimeError(f"backward: called on a non-scalar tensor of shape "
                                   f"{tuple(self.shape)} without a gradient; pass grad= of that "
                                   "shape, or reduce to a scalar (e.g. .sum()) first")
            grad = backend.get_array_module(self.data).ones_like(self.data)
        backward([self], [grad], retain_graph=retain_graph)

    def _run_hooks(self, grad):
        for hook in self._hooks or ():
            new = hook(grad)
            if new is not None:
                grad = new
        return grad

    def _accumulate_leaf(self, grad):
        grad = self._run_hooks(grad)
        # A fresh array, never a view of another tensor's gradient buffer; NumPy reductions to
        # 0-d give scalars, so asarray keeps .grad an array on every device.
        grad = backend.get_array_module(grad).asarray(grad)
        self.grad = grad.copy() if self.grad is None else self.grad + grad

    # --- operators (each is a functional primitive) -------------------------------------
    def _f(self):
        from . import functional
        return functional

    def __add__(self, other): return self._f().add(self, other)
    def __radd__(self, other): return self._f().add(other, self)
    def __sub__(self, other): return self._f().sub(self, other)
    def __rsub__(self, other): return self._f().sub(other, self)
    def __mul__(self, other): return self._f().mul(self, other)
    def __rmul__(self, other): return self._f().mul(other, self)
    def __truediv__(self, other): return self._f().div(self, other)
    def __rtruediv__(self, other): return self._f().div(other, self)
    def __neg__(self): return self._f().neg(self)
    def __pow__(self, exponent): return self._f().pow(self, exponent)
    def __rpow__(self, base): return self._f().pow(base, self)
    def __matmul__(self, other): return self._f().matmul(self, other)
    def __getitem__(self, index): return self._f().getitem(self, index)

    # Comparisons give boolean masks (for `where`); no gradient flows through them. No __eq__:
    # Tensors stay hashable and `a == b` keeps its identity meaning, as for other graph nodes.
    def _compare(self, other, op):
        return Tensor(op(self.data, other.data if isinstance(other, Tensor) else other))

    def __lt__(self, other): return self._compare(other, lambda a, b: a < b)
    def __le__(self, other): return self._compare(other, lambda a, b: a <= b)
    def __gt__(self, other): return self._compare(other, lambda a, b: a > b)
    def __ge__(self, other): return self._compare(other, lambda a, b: a >= b)

    def sum(self, axis=None, keepdims=False): return self._f().sum(self, axis, keepdims)
    def mean(self, axis=None, keepdims=False): return self._f().mean(self, axis, keepdims)
    def max(self, axis=None, keepdims=False): return self._f().max(self, axis, keepdims)
    def reshape(self, *shape): return self._f().reshape(self, *shape)
    def transpose(self, *axes): return self._f().transpose(self, *axes)
    def permute(self, *axes): return self._f().transpose(self, *axes)
    def exp(self): return self._f().exp(self)
    def log(self): return self._f().log(self)
    def sqrt(self): return self._f().sqrt(self)
    def tanh(self): return self._f().tanh(self)
    def sigmoid(self): return self._f().sigmoid(self)
    def relu(self): return self._f().relu(self)

    @property
    def T(self):
        return self._f().transpose(self)


def backward(tensors, grads, retain_graph: bool = False) -> None:
    """Backpropagate from several roots at once: `grads[i]` is d(loss)/d(tensors[i]).

    Nodes reachable from any root are visited once, in reverse topological order: the
    gradients for each node's outputs are summed, hooks run, the node's backward runs, and
    the node is released at once unless `retain_graph`.
    """
    pending = {}     # node -> gradient slot per output
    leaf_grads = {}  # id -> (leaf, summed gradient); hooks see the total, as in PyTorch
    for t, g in zip(tensors, grads):
        if isinstance(g, Tensor):
            g = g.data
        if g is None or not t.requires_grad:
            continue
        if g.shape != t.shape:
            raise ValueError(f"backward: grad has shape {tuple(g.shape)}, expected "
                             f"{tuple(t.shape)} to match the tensor")
        _add_grad(t, g, pending, leaf_grads)
    for node in reversed(_topological_order(list(pending))):
        grads = pending.pop(node, None)
        if grads is None:
            continue
        for i, ref in enumerate(node.outputs):
            out = ref()
            if out is not None and grads[i] is not None:
                grads[i] = out._run_hooks(grads[i])
                if out._retain:
                    out.grad = grads[i] if out.grad is None else out.grad + grads[i]
        if all(g is None for g in grads):
            in_grads = (None,) * len(node.inputs)
        else:
            xp = backend.get_array_module(*(g for g in grads if g is not None))
            grads = [xp.zeros(s, d) if g is None else g
                     for g, (s, d) in zip(grads, node.output_meta)]
            in_grads = node.backward(*grads)
            if not isinstance(in_grads, tuple):
                in_grads = (in_grads,)
        inputs = node.inputs
        if len(in_grads) != len(inputs):
            raise RuntimeError(f"{type(node).__name__}.backward returned {len(in_grads)} "
                               f"gradients for {len(inputs)} inputs")
        for t, g in zip(inputs, in_grads):
            if g is None or not t.requires_grad:
                continue
            if g.shape != t.shape:
                raise RuntimeError(f"{type(node).__name__}.backward: gradient of shape "
                                   f"{tuple(g.shape)} for an input of shape {tuple(t.shape)}")
            _add_grad(t, g, pending, leaf_grads)
        if not retain_graph:
            node._release()
    for leaf, g in leaf_grads.values():
        leaf._accumulate_leaf(g)


def _add_grad(t, g, pending, leaf_grads) -> None:
    if t._node is None:
        prev = leaf_grads.get(id(t))
        leaf_grads[id(t)] = (t, g if prev is None else prev[1] + g)
    else:
        _check_alive(t._node)
        slot = pending.setdefault(t._node, [None] * len(t._node.output_meta))
        prev = slot[t._index]
        slot[t._index] = g if prev is None else prev + g


class Recompute(Function):
    """Activation recomputation: run `fn` without a tape now, again with one in backward.

    Forward keeps only the input arrays; backward re-runs `fn` on them with grad enabled and
    backpropagates the incoming gradients through that fresh tape, which is freed node by
    node as it goes. So a stack of recomputed blocks holds one block's intermediates at a
    time instead of all of them, for the price of a second forward of each block.

    `fn` must compute the same outputs both times (no randomness of its own) and must not
    change state in forward: a training forward here only records observations, and the
    first, tape-less run records none (recording is gated on grad mode), so each is recorded
    once, by the run whose tape backward uses. Ternary layers inside `fn` deliver their int8
    weight gradients during that backward, as they would without recomputation.
    """

    def forward(self, *arrays, fn):
        # The node must be recorded even when no input needs a gradient: the weights inside
        # fn get theirs through it.
        self.updates_state = is_grad_enabled()
        self.fn, self.arrays = fn, arrays
        self.kept = []
        with no_grad(), _keeping(self.kept, replay=False):
            out = fn(*(Tensor(a) for a in arrays))
        self.multiple = isinstance(out, tuple)
        outs = out if self.multiple else (out,)
        return tuple(o.data for o in outs) if self.multiple else outs[0].data

    def backward(self, *grads):
        inputs = [Tensor(a, requires_grad=need)
                  for a, need in zip(self.arrays, self.needs_input_grad)]
        with enable_grad(), _keeping(self.kept, replay=True):
            out = self.fn(*inputs)   # (kept stays for a retain_graph re-run; release drops it)
        outs = out if self.multiple else (out,)
        backward(list(outs), list(grads))
        return tuple(t.grad for t in inputs)


def recompute(fn, *inputs):
    """`fn(*inputs)`, with its intermediates recomputed in backward instead of kept (see
    Recompute). Outside grad mode it is just `fn(*inputs)`."""
    if not is_grad_enabled():
        return fn(*inputs)
    return Recompute.apply(*inputs, fn=fn)


# The runs of recomputed functions in progress: [kept results, replay?, next to replay].
_recompute_runs = []


@contextmanager
def _keeping(kept, replay):
    run = [kept, replay, 0]
    _recompute_runs.append(run)
    try:
        yield
    finally:
        _recompute_runs.pop()
    if replay and run[2] != len(kept):   # (not reached when fn raised: that error wins)
        raise RuntimeError(f"recompute: the backward run of the function asked for {run[2]} "
                           f"kept results, the first run kept {len(kept)}; the function must "
                           "take the same path both times")


def once_per_recompute(compute):
    """`compute()`, run once per training forward even inside a recomputed block.

    For non-differentiable work a block repeats identically when backward re-runs it -- a
    code-book search: the first (tape-less) run keeps the result and the re-run takes it back
    instead of computing it again, in call order.
    Outside recomputation it simply calls `compute()`. The result must depend only on the
    block's inputs and on state that does not change within the step (recompute's contract),
    so training stays bit-identical; the kept results (index arrays) live until the re-run.
    """
    if not _recompute_runs:
        return compute()
    run = _recompute_runs[-1]
    kept, replay, position = run
    if not replay:
        kept.append(compute())
        return kept[-1]
    if position >= len(kept):
        raise RuntimeError(f"recompute: the backward run of the function asked for more than "
                           f"the {len(kept)} results its first run kept; the function must "
                           "take the same path both times")
    run[2] += 1
    return kept[position]


def _topological_order(roots) -> list:
    """Nodes reachable from `roots`, each after all nodes that feed it (iterative DFS)."""
    order, visited = [], set()
    for root in roots:
        if root in visited:
            continue  # already placed, below a root walked before it
        visited.add(root)
        stack = [(root, iter(_parents(root)))]
        while stack:
            node, parents = stack[-1]
            for parent in parents:
                if parent not in visited:
                    visited.add(parent)
                    stack.append((parent, iter(_parents(parent))))
                    break
            else:
                stack.pop()
                order.append(node)
    return order


def _check_alive(node):
    if getattr(node, "released", False):
        raise RuntimeError(f"backward: the graph through {type(node).__name__} was already "
                           "freed by an earlier backward(); pass retain_graph=True to the first "
                           "call to backpropagate twice")


def _parents(node):
    _check_alive(node)
    return [t._node for t in node.inputs if t._node is not None and t.requires_grad]


def tensor(data, dtype=None, requires_grad: bool = False, device: str | None = None) -> Tensor:
    """Make a Tensor on `device` (default: the current one). Python floats become float32."""
    if isinstance(data, Tensor):
        data = data.data
    if isinstance(data, np.ndarray) or backend.is_cupy(data):
        array = data if dtype is None else data.astype(dtype)
    else:
        array = np.asarray(data, dtype=dtype)
        if dtype is None and array.dtype == np.float64:
            array = array.astype(np.float32)  # Python floats and lists: the working precision
    return Tensor(backend.to_device(array, device), requires_grad=requires_grad)
