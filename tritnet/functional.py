"""Differentiable primitives: one short Function per op, forward and backward side by side.

Every class works on raw xp arrays (NumPy or CuPy, found with `backend.get_array_module`), so
the same lines run on both devices; the one device-specific call, a scatter-add that sums
repeated indices, lives in `backend`. Each primitive has a plain function wrapper (`add`,
`matmul`, `cross_entropy`, ...) that takes Tensors, checks its arguments and calls `apply`;
Tensor's operators call these wrappers.

We are eager (no fusing compiler), so matmul, softmax, cross-entropy, RMSNorm and attention are
primitives of their own with a fused backward instead of compositions of tiny ops, each of
which would cost a kernel launch and a saved intermediate on the GPU.

Bad input is rejected before anything is computed, with the op, the shapes/dtypes involved and
what was expected. Constants inside forward/backward are Python floats on purpose: NumPy ≥ 2
treats them as "weak", so float32 stays float32 (a NumPy float64 scalar would promote).
"""

from __future__ import annotations

import builtins
import math

import numpy as np

from . import backend
from .autograd import Function, Tensor
from tritnet_kernels import attention as kattention
from tritnet_kernels import float_gemm as kgemm

_xp = backend.get_array_module
_SCALARS = (bool, int, float, np.generic)


# --- helpers shared by the primitives ------------------------------------------------------

def unbroadcast(grad, shape):
    """Sum `grad` down to `shape`: the adjoint of NumPy broadcasting."""
    shape = tuple(shape)
    if grad.shape == shape:
        return grad
    lead = grad.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(lead + i for i, n in enumerate(shape)
                                      if n == 1 and grad.shape[lead + i] != 1)
    return grad.sum(axis=axes, keepdims=True).reshape(shape)


def _operands(op, *xs):
    """Tensors of one dtype for an elementwise op.

    Scalars become 0-d arrays of the tensors' dtype (so float32 stays float32), made with
    `full` so that CuPy fills them on the device instead of copying from the host. Integer or
    bool tensors (masks) take the float operand's dtype. Two different float dtypes are an
    error rather than a silent promotion to float64.
    """
    for x in xs:
        if not isinstance(x, (Tensor,) + _SCALARS):
            raise TypeError(f"{op}: expected Tensors or Python/NumPy scalars, got "
                            f"{type(x).__name__}; wrap arrays with tritnet.tensor(...)")
    tensors = [x for x in xs if isinstance(x, Tensor)]
    if not tensors:
        raise TypeError(f"{op}: expected at least one Tensor, got only scalars")
    floats = {t.dtype for t in tensors if t.dtype.kind == "f"}
    if len(floats) > 1:
        raise TypeError(f"{op}: operands have different float dtypes ("
                        + ", ".join(f"{tuple(t.shape)} {t.dtype}" for t in tensors)
                        + "); expected one dtype: cast one with .astype(...)")
    if floats:
        dtype = floats.pop()
    elif any(isinstance(x, (float, np.floating)) for x in xs):
        dtype = np.dtype(np.float32)  # integer tensor times 0.5: the working precision
    else:
        dtype = np.result_type(*(t.dtype for t in tensors))
    xp = _xp(tensors[0].data)
    return [Tensor(xp.full((), x, dtype=dtype)) if not isinstance(x, Tensor)
            else x if x.dtype == dtype else Tensor(x.data.astype(dtype))  # no grad: not float
            for x in xs]


def _broadcast(op, *shapes):
    try:
        return np.broadcast_shapes(*shapes)
    except ValueError:
        raise ValueError(f"{op}: shapes {' and '.join(str(tuple(s)) for s in shapes)} do not "
                         "broadcast; expected each trailing dimension to be equal or 1") from None


def _binary(cls, op, a, b):
    a, b = _operands(op, a, b)
    _broadcast(op, a.shape, b.shape)
    return cls.apply(a, b)


def _axes(op, axis, shape):
    """`axis` (None, int or tuple) as a sorted tuple of non-negative axes of `shape`."""
    ndim = len(shape)
    if axis is None:
        return tuple(range(ndim))
    axes = tuple(axis) if isinstance(axis, (tuple, list)) else (axis,)
    for a in axes:
        if not isinstance(a, (int, np.integer)) or isinstance(a, bool) or not -ndim <= a < ndim:
            raise ValueError(f"{op}: axis {axis!r} is out of range for shape {tuple(shape)}; "
                             f"expected integers in [{-ndim}, {ndim})")
    axes = tuple(sorted(int(a) % ndim for a in axes))
    if len(set(axes)) != len(axes):
        raise ValueError(f"{op}: axis {axis!r} names an axis twice (shape {tuple(shape)})")
    return axes


def _array_on(op, name, value, like):
    """A non-differentiable argument (index, mask, targets) as an array on `like`'s device.

    Host data (lists, NumPy arrays) is copied to the GPU when `like` lives there: targets and
    indices usually come from a NumPy data loader. A Tensor must already be on the device.
    """
    if isinstance(value, Tensor):
        if value.device != like.device:
            raise TypeError(f"{op}: {name} is a Tensor on {value.device} but the input "
                            f"{tuple(like.shape)} is on {like.device}; move it with .to(...)")
        return value.data
    if backend.is_cupy(value) and like.device != "cuda":
        raise TypeError(f"{op}: {name} is a CuPy (cuda) array but the input {tuple(like.shape)} "
                        "is on cpu; move it with tritnet.backend.to_numpy(...)")
    return _xp(like.data).asarray(value)


def _require_float(op, t, name="input"):
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")
    if t.dtype.kind != "f":
        raise TypeError(f"{op}: {name} has dtype {t.dtype} (shape {tuple(t.shape)}); "
                        "expected a floating-point tensor")


def _sigmoid(xp, x):
    # The tanh form never overflows, unlike 1 / (1 + exp(-x)) for large negative x.
    return 0.5 * xp.tanh(0.5 * x) + 0.5


def _logsumexp(xp, x, axis):
    m = x.max(axis=axis, keepdims=True)
    return m + xp.log(xp.exp(x - m).sum(axis=axis, keepdims=True))


# --- elementwise binary ops (broadcasting) -------------------------------------------------

class Add(Function):
    def forward(self, a, b):
        self.shapes = a.shape, b.shape
        return a + b

    def backward(self, g):
        na, nb = self.needs_input_grad
        return (unbroadcast(g, self.shapes[0]) if na else None,
                unbroadcast(g, self.shapes[1]) if nb else None)


class Sub(Function):
    def forward(self, a, b):
        self.shapes = a.shape, b.shape
        return a - b

    def backward(self, g):
        na, nb = self.needs_input_grad
        return (unbroadcast(g, self.shapes[0]) if na else None,
                unbroadcast(-g, self.shapes[1]) if nb else None)


class Mul(Function):
    def forward(self, a, b):
        self.a, self.b = a, b
        return a * b

    def backward(self, g):
        na, nb = self.needs_input_grad
        return (unbroadcast(g * self.b, self.a.shape) if na else None,
                unbroadcast(g * self.a, self.b.shape) if nb else None)


class Div(Function):
    def forward(self, a, b):
        self.a, self.b = a, b
        return a / b

    def backward(self, g):
        na, nb = self.needs_input_grad
        return (unbroadcast(g / self.b, self.a.shape) if na else None,
                unbroadcast(-g * self.a / (self.b * self.b), self.b.shape) if nb else None)


class Pow(Function):
    def forward(self, x, e):
        self.x, self.e = x, e
        return x ** e

    def backward(self, g):
        xp = _xp(g)
        nx, ne = self.needs_input_grad
        x, e = self.x, self.e
        dx = de = None
        if nx:
            # e · x**(e-1); where e = 0, x**0 is constant: 0 (also at x = 0, not 0 · inf)
            live = e != 0
            e1 = xp.where(live, e, xp.ones_like(e))
            dx = unbroadcast(g * (e1 * x ** (e1 - 1)) * live, x.shape)
        if ne:
            # x**e · log x, only when the exponent wants a gradient; at x = 0 with e >= 0 it is
            # 0 (x**e there is 0, or 1 at e = 0, from the right), not 0 · -inf
            at0 = (x == 0) & (e >= 0)
            safe = xp.where(at0, xp.ones_like(x), x)
            de = unbroadcast(g * (safe ** e * xp.log(safe)), e.shape)
        return dx, de


def add(a, b): return _binary(Add, "add", a, b)
def sub(a, b): return _binary(Sub, "sub", a, b)
def mul(a, b): return _binary(Mul, "mul", a, b)
def div(a, b): return _binary(Div, "div", a, b)


def pow(x, exponent):  # noqa: A001 - the name Tensor.__pow__ calls
    """x ** exponent; either may be a Tensor or a scalar (a Tensor exponent gets a gradient)."""
    return _binary(Pow, "pow", x, exponent)


# --- elementwise unary ops -----------------------------------------------------------------

class Neg(Function):
    def forward(self, x): return -x
    def backward(self, g): return -g


class Exp(Function):
    def forward(self, x):
        self.out = _xp(x).exp(x)
        return self.out

    def backward(self, g): return g * self.out


class Log(Function):
    def forward(self, x):
        self.x = x
        return _xp(x).log(x)

    def backward(self, g): return g / self.x


class Sqrt(Function):
    def forward(self, x):
        self.out = _xp(x).sqrt(x)
        return self.out

    def backward(self, g): return g * 0.5 / self.out


class Tanh(Function):
    def forward(self, x):
        self.out = _xp(x).tanh(x)
        return self.out

    def backward(self, g): return g * (1 - self.out * self.out)


class Sigmoid(Function):
    def forward(self, x):
        self.out = _sigmoid(_xp(x), x)
        return self.out

    def backward(self, g): return g * self.out * (1 - self.out)


class Relu(Function):
    def forward(self, x):
        self.positive = x > 0
        return x * self.positive

    def backward(self, g): return g * self.positive


_GELU_C = math.sqrt(2.0 / math.pi)


class Gelu(Function):
    """GELU, tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) (as GPT-2)."""

    def forward(self, x):
        self.x = x
        return 0.5 * x * (1 + _xp(x).tanh(_GELU_C * (x + 0.044715 * x * x * x)))

    def backward(self, g):
        x = self.x
        t = _xp(x).tanh(_GELU_C * (x + 0.044715 * x * x * x))
        return g * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * _GELU_C * (1 + 3 * 0.044715 * x * x))


class Silu(Function):
    """x · sigmoid(x). The experts' activation: on the GPU one fused launch each way (the same
    float arithmetic as the array ops of the CPU path) instead of five forward, nine backward."""

    def forward(self, x):
        self.x = x
        if _xp(x) is not np:
            return _gpu_kernel("silu", "elementwise", "T x", "T y",
                               "T s = (T)0.5 * tanh((T)0.5 * x) + (T)0.5; y = x * s")(x)
        return x * _sigmoid(np, x)

    def backward(self, g):
        if _xp(g) is not np:
            return _gpu_kernel(
                "silu_grad", "elementwise", "T g, T x", "T gx",
                "T s = (T)0.5 * tanh((T)0.5 * x) + (T)0.5; gx = g * s * ((T)1 + x * ((T)1 - s))")(
                    g, self.x)
        s = _sigmoid(np, self.x)
        return g * s * (1 + self.x * (1 - s))


_GPU_KERNELS = {}


def _gpu_kernel(name, kind, *spec, **options):
    """A CuPy kernel, built once per name: the fused GPU twin of a few array ops, one launch
    instead of one per op. kind "elementwise": cupy.ElementwiseKernel(*spec); "reduction":
    cupy.ReductionKernel(*spec, **options)."""
    kernel = _GPU_KERNELS.get(name)
    if kernel is None:
        import cupy
        make = cupy.ElementwiseKernel if kind == "elementwise" else cupy.ReductionKernel
        kernel = _GPU_KERNELS[name] = make(*spec, name=f"tritnet_{name}", **options)
    return kernel


def _unary(cls, op, x):
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: expected a Tensor, got {type(x).__name__}")
    return cls.apply(x)


def neg(x): return _unary(Neg, "neg", x)
def exp(x): return _unary(Exp, "exp", x)
def log(x): return _unary(Log, "log", x)
def sqrt(x): return _unary(Sqrt, "sqrt", x)
def tanh(x): return _unary(Tanh, "tanh", x)
def sigmoid(x): return _unary(Sigmoid, "sigmoid", x)
def relu(x): return _unary(Relu, "relu", x)
def gelu(x): return _unary(Gelu, "gelu", x)
def silu(x): return _unary(Silu, "silu", x)


# --- reductions ----------------------------------------------------------------------------

class Sum(Function):
    def forward(self, x, axes, keepdims):
        self.shape, self.axes, self.keepdims = x.shape, axes, keepdims
        return x.sum(axis=axes, keepdims=keepdims)

    def backward(self, g):
        xp = _xp(g)
        g = g if self.keepdims else xp.expand_dims(g, self.axes)
        return xp.broadcast_to(g, self.shape)


class Mean(Function):
    def forward(self, x, axes, keepdims):
        self.shape, self.axes, self.keepdims = x.shape, axes, keepdims
        self.count = math.prod(x.shape[a] for a in axes)
        return x.mean(axis=axes, keepdims=keepdims)

    def backward(self, g):
        xp = _xp(g)
        g = g if self.keepdims else xp.expand_dims(g, self.axes)
        return xp.broadcast_to(g / self.count, self.shape)


class Max(Function):
    """Maximum over axes; ties share the gradient equally (each of k tied maxima gets g/k)."""

    def forward(self, x, axes, keepdims):
        self.x, self.axes, self.keepdims = x, axes, keepdims
        self.out = x.max(axis=axes, keepdims=True)
        return self.out if keepdims else _xp(x).squeeze(self.out, axis=axes)

    def backward(self, g):
        xp = _xp(g)
        g = g if self.keepdims else xp.expand_dims(g, self.axes)
        winners = self.x == self.out
        return winners * (g / winners.sum(axis=self.axes, keepdims=True, dtype=g.dtype))


def _reduce(cls, op, x, axis, keepdims):
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: expected a Tensor, got {type(x).__name__}")
    return cls.apply(x, axes=_axes(op, axis, x.shape), keepdims=bool(keepdims))


def sum(x, axis=None, keepdims=False):  # noqa: A001 - the name Tensor.sum calls
    return _reduce(Sum, "sum", x, axis, keepdims)


def mean(x, axis=None, keepdims=False):
    return _reduce(Mean, "mean", x, axis, keepdims)


def max(x, axis=None, keepdims=False):  # noqa: A001 - the name Tensor.max calls
    """Maximum over `axis`; tied maxima split the gradient equally."""
    if isinstance(x, Tensor) and any(x.shape[a] == 0 for a in _axes("max", axis, x.shape)):
        raise ValueError(f"max: cannot reduce an empty axis (shape {tuple(x.shape)}, axis {axis!r})")
    return _reduce(Max, "max", x, axis, keepdims)


# --- shape and indexing --------------------------------------------------------------------

class Reshape(Function):
    def forward(self, x, shape):
        self.shape = x.shape
        return x.reshape(shape)

    def backward(self, g): return g.reshape(self.shape)


class Transpose(Function):
    def forward(self, x, axes):
        self.inverse = tuple(int(i) for i in np.argsort(axes))
        return x.transpose(axes)

    def backward(self, g): return g.transpose(self.inverse)


class GetItem(Function):
    def forward(self, x, index):
        self.shape, self.index = x.shape, index
        return x[index]

    def backward(self, g):
        gx = _xp(g).zeros(self.shape, g.dtype)
        backend.scatter_add(gx, self.index, g)  # a row gathered twice receives both gradients
        return gx


class Concat(Function):
    def forward(self, *arrays, axis):
        self.axis = axis
        self.bounds = np.cumsum([a.shape[axis] for a in arrays])[:-1].tolist()
        return backend.concatenate(arrays, axis=axis)

    def backward(self, g): return tuple(_xp(g).split(g, self.bounds, axis=self.axis))


class Split(Function):
    def forward(self, x, *, bounds, axis):
        self.axis = axis
        return tuple(_xp(x).split(x, bounds, axis=axis))

    # one join of the parts' gradients: not a zero-filled full-size gradient per part, summed
    def backward(self, *grads): return backend.concatenate(grads, axis=self.axis)


class Stack(Function):
    def forward(self, *arrays, axis):
        self.axis, self.count = axis, len(arrays)
        return backend.stack(arrays, axis=axis)

    def backward(self, g):
        lead = (slice(None),) * self.axis
        return tuple(g[lead + (i,)] for i in range(self.count))


class Where(Function):
    def forward(self, a, b, cond):
        self.cond, self.shapes = cond, (a.shape, b.shape)
        return _xp(a, b).where(cond, a, b)

    def backward(self, g):
        xp = _xp(g)
        na, nb = self.needs_input_grad
        return (unbroadcast(xp.where(self.cond, g, 0), self.shapes[0]) if na else None,
                unbroadcast(xp.where(self.cond, 0, g), self.shapes[1]) if nb else None)


class Cast(Function):
    def forward(self, x, dtype):
        self.dtype = x.dtype
        return x.astype(dtype)

    def backward(self, g): return g.astype(self.dtype)


def reshape(x, *shape):
    """reshape(x, 2, 3) or reshape(x, (2, 3)); one dimension may be -1."""
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    if not all(isinstance(n, (int, np.integer)) and n >= -1 for n in shape) or shape.count(-1) > 1:
        raise ValueError(f"reshape: invalid target shape {shape}; expected non-negative integers "
                         "and at most one -1")
    shape = tuple(int(n) for n in shape)
    known = math.prod(n for n in shape if n != -1)
    fits = known == x.size if -1 not in shape else known > 0 and x.size % known == 0
    if not fits:
        raise ValueError(f"reshape: cannot reshape a tensor of shape {tuple(x.shape)} "
                         f"({x.size} elements) into {shape}")
    return Reshape.apply(x, shape=shape)


def transpose(x, *axes):
    """Permute axes; with no axes, reverse them (x.T)."""
    if len(axes) == 1 and isinstance(axes[0], (tuple, list)):
        axes = tuple(axes[0])
    if not axes:
        axes = tuple(reversed(range(x.ndim)))
    if len(axes) != x.ndim:
        raise ValueError(f"transpose: axes {axes} do not match shape {tuple(x.shape)}; expected "
                         f"a permutation of {x.ndim} axes")
    normal = _axes("transpose", axes, x.shape)  # validates range and repeats, returns sorted
    if normal != tuple(range(x.ndim)):
        raise ValueError(f"transpose: axes {axes} are not a permutation of range({x.ndim})")
    return Transpose.apply(x, axes=tuple(int(a) % x.ndim for a in axes))


def _is_array(p):
    return isinstance(p, np.ndarray) or backend.is_cupy(p)


def _index(op, x, index):
    """`index` with its arrays on x's device, checked against x's shape before use.

    CuPy wraps out-of-range integer indices around silently, so the range check is ours on
    both devices (it costs one small device-to-host copy per index array).
    """
    xp = _xp(x.data)
    parts = index if isinstance(index, tuple) else (index,)
    parts = tuple(_array_on(op, "index", p, x) if isinstance(p, (Tensor, list)) or _is_array(p)
                  else p for p in parts)
    shape = tuple(x.shape)
    if builtins.sum(p is Ellipsis for p in parts) > 1:
        raise IndexError(f"{op}: an index can only have a single ellipsis (...)")
    used = builtins.sum(p.ndim if _is_array(p) and p.dtype == bool else 0 if p is None or p is Ellipsis
                        else 1 for p in parts)
    if used > len(shape):
        raise IndexError(f"{op}: too many indices ({used}) for a tensor of shape {shape}")
    axis = 0
    for p in parts:
        if p is None:
            continue
        if p is Ellipsis:
            axis += len(shape) - used
            continue
        if _is_array(p) and p.dtype == bool:
            if tuple(p.shape) != shape[axis:axis + p.ndim]:
                raise IndexError(f"{op}: boolean mask of shape {tuple(p.shape)} does not match "
                                 f"dimensions {shape[axis:axis + p.ndim]} of tensor shape {shape}")
            axis += p.ndim
            continue
        if _is_array(p):
            if p.dtype.kind not in "iu":
                raise IndexError(f"{op}: index array has dtype {p.dtype}; expected integer "
                                 "(gather) or bool (mask)")
            bounds = backend.to_numpy(xp.stack([p.min(), p.max()])) if p.size else ()
        elif isinstance(p, (int, np.integer)) and not isinstance(p, (bool, np.bool_)):
            bounds = (p,)
        elif isinstance(p, slice):
            axis += 1
            continue
        else:
            raise IndexError(f"{op}: unsupported index {p!r} of type {type(p).__name__}; "
                             "expected int, slice, None, ..., or an integer/bool array")
        size = shape[axis]
        for i in bounds:
            if not -size <= int(i) < size:
                raise IndexError(f"{op}: index {int(i)} is out of range for axis {axis} of size "
                                 f"{size} (tensor shape {shape}); expected [{-size}, {size})")
        axis += 1
    return parts


def getitem(x, index):
    """x[index] for ints, slices, None, ..., integer arrays (gather; repeats sum in backward)
    and boolean masks."""
    return GetItem.apply(x, index=_index("getitem", x, index))


def take(x, indices, axis=0, *, check=True):
    """Gather entries (rows, for axis=0) of `x` by an integer array; repeated indices are fine.

    check=False skips the range check of `indices` (a host sync on the GPU) for indices that
    are in range by construction, such as a permutation the caller computed: an index out of
    range then wraps around on the GPU (CuPy) instead of raising."""
    indices = _array_on("take", "indices", indices, x)
    if indices.dtype.kind not in "iu":
        raise TypeError(f"take: indices have dtype {indices.dtype}; expected an integer array")
    (axis,) = _axes("take", axis, x.shape)
    index = (slice(None),) * axis + (indices,)
    return GetItem.apply(x, index=_index("take", x, index) if check else index)


def _same_kind(op, tensors):
    tensors = list(tensors)
    if not tensors or not all(isinstance(t, Tensor) for t in tensors):
        raise TypeError(f"{op}: expected a non-empty sequence of Tensors, got "
                        f"[{', '.join(type(t).__name__ for t in tensors)}]")
    first = tensors[0]
    for i, t in enumerate(tensors):
        if t.dtype != first.dtype or t.ndim != first.ndim:
            raise ValueError(f"{op}: tensor {i} is {tuple(t.shape)} {t.dtype} but tensor 0 is "
                             f"{tuple(first.shape)} {first.dtype}; expected one dtype and rank")
    return tensors


def concat(tensors, axis=0):
    """Join tensors along an existing axis; all other dimensions must match."""
    tensors = _same_kind("concat", tensors)
    if tensors[0].ndim == 0:
        raise ValueError("concat: cannot concatenate 0-d tensors; use stack")
    (axis,) = _axes("concat", axis, tensors[0].shape)
    other = lambda t: t.shape[:axis] + t.shape[axis + 1:]  # noqa: E731
    if any(other(t) != other(tensors[0]) for t in tensors):
        raise ValueError(f"concat: shapes {[tuple(t.shape) for t in tensors]} differ outside "
                         f"axis {axis}; expected equal sizes there")
    return Concat.apply(*tensors, axis=axis)


def split(x, sections, axis=0):
    """Consecutive parts of x along `axis`, as views: `sections` an int (that many equal
    parts) or the rising indices where parts start, as np.split. The inverse of concat; its
    backward joins the parts' gradients once (slicing x part by part would give each slice
    a zero-filled gradient of x's full shape, to be summed)."""
    (axis,) = _axes("split", axis, x.shape)
    n = x.shape[axis]
    if isinstance(sections, (int, np.integer)) and not isinstance(sections, bool):
        if sections < 1 or n % sections:
            raise ValueError(f"split: {n} entries along axis {axis} (shape {tuple(x.shape)}) "
                             f"do not split into {sections} equal parts")
        bounds = [n // sections * i for i in range(1, sections)]
    else:
        bounds = [int(b) for b in sections]
        if any(not 0 <= a <= b <= n for a, b in zip([0] + bounds, bounds + [n])):
            raise ValueError(f"split: bounds {bounds} must rise within [0, {n}] (axis {axis} of "
                             f"shape {tuple(x.shape)})")
    parts = Split.apply(x, bounds=bounds, axis=axis)
    return parts if isinstance(parts, tuple) else (parts,)


def stack(tensors, axis=0):
    """Join equal-shape tensors along a new axis."""
    tensors = _same_kind("stack", tensors)
    if any(t.shape != tensors[0].shape for t in tensors):
        raise ValueError(f"stack: shapes {[tuple(t.shape) for t in tensors]} differ; "
                         "expected all equal")
    (axis,) = _axes("stack", axis, tensors[0].shape + (1,))
    return Stack.apply(*tensors, axis=axis)


def where(cond, a, b):
    """Elementwise `a if cond else b` with broadcasting; `cond` (bool) gets no gradient."""
    a, b = _operands("where", a, b)
    cond = _array_on("where", "cond", cond, a)
    if cond.dtype != bool:
        raise TypeError(f"where: cond has dtype {cond.dtype}; expected bool (e.g. x.data > 0)")
    _broadcast("where", cond.shape, a.shape, b.shape)
    return Where.apply(a, b, cond=cond)


def cast(x, dtype):
    """x as `dtype`; the gradient is cast back. A non-float result leaves the tape (no grad)."""
    dtype = np.dtype(dtype)
    if dtype.kind != "f":
        return Tensor(x.data.astype(dtype))
    return Cast.apply(x, dtype=dtype)


# --- matmul --------------------------------------------------------------------------------

class MatMul(Function):
    """Batched a @ b with broadcasting batch dimensions (both operands at least 2-D here)."""

    def forward(self, a, b):
        self.a, self.b = a, b
        return kgemm.matmul(a, b)

    def backward(self, g):
        xp = _xp(g)
        a, b = self.a, self.b
        na, nb = self.needs_input_grad
        ga = unbroadcast(kgemm.matmul(g, xp.swapaxes(b, -1, -2)), a.shape) if na else None
        if nb and b.ndim == 2:
            # x @ W with batched x: fold the batch into the contraction instead of building one
            # (K, N) product per batch element and summing them afterwards.
            gb = kgemm.matmul(a.reshape(-1, a.shape[-1]).T, g.reshape(-1, g.shape[-1]))
        else:
            gb = unbroadcast(kgemm.matmul(xp.swapaxes(a, -1, -2), g), b.shape) if nb else None
        return ga, gb


def matmul(a, b):
    """a @ b as NumPy: batch dimensions broadcast; a 1-D operand is a row (a) or column (b)
    vector whose dimension is removed from the result."""
    a, b = _operands("matmul", a, b)
    if a.ndim == 0 or b.ndim == 0:
        raise ValueError(f"matmul: shapes {tuple(a.shape)} and {tuple(b.shape)}: 0-d operands "
                         "are not matrices; use mul")
    k_b = b.shape[-2] if b.ndim > 1 else b.shape[0]
    if a.shape[-1] != k_b:
        raise ValueError(f"matmul: shapes {tuple(a.shape)} and {tuple(b.shape)} do not match: "
                         f"a's last dimension ({a.shape[-1]}) must equal b's "
                         f"{'second-to-last' if b.ndim > 1 else 'only'} dimension ({k_b})")
    _broadcast("matmul (batch dimensions)", a.shape[:-2], b.shape[:-2])
    drop = []
    if a.ndim == 1:
        a, drop = reshape(a, 1, a.shape[0]), drop + [-2]
    if b.ndim == 1:
        b, drop = reshape(b, b.shape[0], 1), drop + [-1]
    out = MatMul.apply(a, b)
    if drop:
        keep = [n for i, n in enumerate(out.shape) if i - out.ndim not in drop]
        out = reshape(out, *keep)
    return out


# --- softmax family ------------------------------------------------------------------------

class Softmax(Function):
    def forward(self, x, axis):
        xp = _xp(x)
        e = xp.exp(x - x.max(axis=axis, keepdims=True))
        e /= e.sum(axis=axis, keepdims=True)
        self.out, self.axis = e, axis
        return e

    def backward(self, g):
        out = self.out
        return out * (g - (g * out).sum(axis=self.axis, keepdims=True))


class LogSoftmax(Function):
    def forward(self, x, axis):
        self.out, self.axis = x - _logsumexp(_xp(x), x, axis), axis
        return self.out

    def backward(self, g):
        return g - _xp(g).exp(self.out) * g.sum(axis=self.axis, keepdims=True)


def softmax(x, axis=-1):
    _require_float("softmax", x)
    (axis,) = _axes("softmax", axis, x.shape)
    return Softmax.apply(x, axis=axis)


def log_softmax(x, axis=-1):
    _require_float("log_softmax", x)
    (axis,) = _axes("log_softmax", axis, x.shape)
    return LogSoftmax.apply(x, axis=axis)


class CrossEntropy(Function):
    """Fused log-softmax + negative log-likelihood over the last axis with integer targets.

    Forward keeps the per-row logsumexp (stable: max-shifted) instead of the probabilities;
    backward rebuilds softmax - onehot from it in one pass.
    """

    def forward(self, logits, targets, reduction, ignore_index):
        xp = _xp(logits)
        x = logits.reshape(-1, logits.shape[-1])
        valid = targets.reshape(-1) != ignore_index
        t = xp.where(valid, targets.reshape(-1), 0)
        rows = xp.arange(x.shape[0])
        lse = _logsumexp(xp, x, -1)[:, 0]
        losses = (lse - x[rows, t]) * valid
        # Mean over the targets that count; an all-ignored batch gives 0 (not NaN) and no gradient.
        count = xp.maximum(valid.sum(), 1).astype(x.dtype)
        self.x, self.t, self.valid, self.lse, self.count = x, t, valid, lse, count
        self.shape, self.reduction = logits.shape, reduction
        if reduction == "none":
            return losses.reshape(targets.shape)
        return losses.sum() if reduction == "sum" else losses.sum() / count

    def backward(self, g):
        xp = _xp(g)
        grad = xp.exp(self.x - self.lse[:, None])
        grad[xp.arange(grad.shape[0]), self.t] -= 1
        weight = g.reshape(-1) if self.reduction == "none" else g if self.reduction == "sum" \
            else g / self.count
        grad *= (weight * self.valid)[..., None]
        return grad.reshape(self.shape)


def cross_entropy(logits, targets, reduction="mean", ignore_index=-100, *, check=True):
    """Softmax cross-entropy of `logits` (..., C) against integer class `targets` (...).

    reduction "mean" (over targets != ignore_index), "sum" or "none" (shape of targets).
    Targets are range-checked: free for host arrays, a host sync for device ones, which
    check=False skips (targets checked where they were made; a wrong one then reads garbage).
    """
    op = "cross_entropy"
    _require_float(op, logits, "logits")
    if logits.ndim < 1:
        raise ValueError(f"{op}: logits must have a class axis, got shape {tuple(logits.shape)}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"{op}: reduction {reduction!r}; expected 'mean', 'sum' or 'none'")
    if not isinstance(targets, Tensor) and not backend.is_cupy(targets):
        targets = np.asarray(targets)   # host data: checked on the host, then copied over
    t = targets.data if isinstance(targets, Tensor) else targets
    C = logits.shape[-1]
    if t.dtype.kind not in "iu":
        raise TypeError(f"{op}: targets have dtype {t.dtype} (shape {tuple(t.shape)}); "
                        f"expected integer class indices in [0, {C})")
    if tuple(t.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"{op}: targets have shape {tuple(t.shape)} but logits "
                         f"{tuple(logits.shape)}; expected targets of shape {tuple(logits.shape[:-1])}")
    bad = (t != ignore_index) & ((t < 0) | (t >= C)) if check else None
    # free for host targets; device targets cost one small device-to-host copy (a host
    # sync): an out-of-range target is a data bug worth it
    if check and bool(bad.any()):
        value = int(t[bad].reshape(-1)[0])
        raise ValueError(f"{op}: target {value} is out of range for {C} classes (logits "
                         f"{tuple(logits.shape)}); expected [0, {C}) or ignore_index={ignore_index}")
    targets = _array_on(op, "targets", targets, logits)
    return CrossEntropy.apply(logits, targets=targets, reduction=reduction,
                              ignore_index=ignore_index)


# --- normalisation -------------------------------------------------------------------------

class RMSNorm(Function):
    """y = x / sqrt(mean(x², last axis) + eps), without a weight; keeps x and 1/rms only.
    On the GPU each way is a fused row reduction and a fused element-wise kernel."""

    def forward(self, x, eps):
        xp = _xp(x)
        self.x = x
        if xp is not np:  # two launches instead of seven; sums in float64
            self.inv_rms = _gpu_kernel(
                "rms_inv", "reduction", "T x, float64 eps", "T inv_rms", "x * x", "a + b",
                "inv_rms = (T)(1.0 / sqrt(a / (_in_ind.size() / _out_ind.size()) + eps))", "0",
                reduce_type="double")(x, eps, axis=-1, keepdims=True)
            return _gpu_kernel("rms_scale", "elementwise", "T x, T inv_rms", "T y",
                               "y = x * inv_rms")(x, self.inv_rms)
        self.inv_rms = 1 / xp.sqrt((x * x).mean(axis=-1, keepdims=True) + eps)
        return x * self.inv_rms

    def backward(self, g):
        if _xp(g) is not np:
            # mean(g·y) = inv_rms · mean(g·x); gx = inv_rms · (g − x · inv_rms² · mean(g·x))
            mean_gx = _gpu_kernel(
                "rms_mean_gx", "reduction", "T g, T x", "T m", "g * x", "a + b",
                "m = (T)(a / (_in_ind.size() / _out_ind.size()))", "0",
                reduce_type="double")(g, self.x, axis=-1, keepdims=True)
            return _gpu_kernel(
                "rms_grad", "elementwise", "T g, T x, T inv_rms, T mean_gx", "T gx",
                "gx = inv_rms * (g - x * inv_rms * inv_rms * mean_gx)")(
                    g, self.x, self.inv_rms, mean_gx)
        y = self.x * self.inv_rms
        return self.inv_rms * (g - y * (g * y).mean(axis=-1, keepdims=True))


def rms_norm(x, eps=1e-6):
    _require_float("rms_norm", x)
    if x.ndim < 1:
        raise ValueError("rms_norm: expected at least 1 dimension (normalised over the last), "
                         "got a 0-d tensor")
    return RMSNorm.apply(x, eps=float(eps))


# --- attention -----------------------------------------------------------------------------

class ScaledDotProductAttention(Function):
    """softmax(q kᵀ · scale + bias + causal mask) v over (..., T, D), a block of query rows at a time.

    For each block of query rows: the scores against the keys the block can see (q·kᵀ, one
    GEMM), one fused row kernel for scale, ALiBi bias, mask and softmax
    (tritnet_kernels.attention), and the output rows (p·v, one GEMM). Each row's softmax is
    complete within its block, so nothing is rescaled between blocks. Forward keeps q, k, v,
    the output and each query row's logsumexp; backward recomputes a block's probabilities
    from that logsumexp, as FlashAttention does (Dao, 2023). No T×T tensor outlives the call;
    the largest transients are a block's (..., rows, keys) score tile (two of them in
    backward). By default a block holds as many rows as fit TILE_ELEMENTS scores -- the whole
    sequence at training sizes -- so forward is three launches and backward eight, whatever T
    is: on the GPU, launches, not FLOPs, decide this op's time at these sizes
    (docs/design.md#launch-cost).

    The causal mask is aligned to the bottom right, as in FlashAttention-2: query i sees keys
    j <= i + (Tk - Tq), so queries at the end of a longer key sequence (decoding with a cache)
    see their whole past. alibi_slopes (ALiBi, Press et al. 2022): per head h, the constant
    -slope_h · |i - j| is added to the scaled scores (i, j aligned as the mask is).
    """

    TILE_ELEMENTS = 1 << 25  # 128 MiB of float32 scores per tile

    def forward(self, q, k, v, causal, scale, block_size, alibi_slopes):
        xp = _xp(q, k, v)
        batch, (Tq, Tk) = q.shape[:-2], q.shape[-2:-1] + k.shape[-2:-1]
        n_batch = math.prod(batch)
        self.causal, self.scale = causal, scale
        self.block_size = block_size or builtins.max(1, self.TILE_ELEMENTS // builtins.max(
            1, n_batch * Tk))
        self.slopes = device_slopes(xp, alibi_slopes, batch, q.dtype)
        outs, lses = [], []
        # Query row i sits at key position i + offset: the causal mask and ALiBi's distances
        # use it. Without either it does not matter, and it is 0 (the kernels take offsets
        # >= 0; with more queries than keys, Tk - Tq is negative).
        self.offset = Tk - Tq if causal or alibi_slopes is not None else 0
        for q0, q1, ke in self._blocks(Tq, Tk):
            s = _scores(xp, q[..., q0:q1, :], k[..., :ke, :])
            lse = xp.empty(batch + (q1 - q0,), q.dtype)
            kattention.attention_softmax(s.reshape(-1, ke), lse.reshape(-1), self.slopes,
                                         scale, q0 + self.offset, causal)  # s now holds p
            outs.append(kgemm.matmul(s, v[..., :ke, :]))
            lses.append(lse)
        out = _join(xp, outs, -2, q.shape[:-1] + v.shape[-1:], q.dtype)
        self.q, self.k, self.v, self.out = q, k, v, out
        self.lse = _join(xp, lses, -1, q.shape[:-1], q.dtype)
        return out

    def backward(self, g):
        xp = _xp(g)
        q, k, v = self.q, self.k, self.v
        Tq, Tk = q.shape[-2], k.shape[-2]
        g = xp.ascontiguousarray(g)
        dq, dk, dv = [], None, None
        # Last block first: it sees every key (ke = Tk), so its dk, dv start the sums.
        for q0, q1, ke in reversed(list(self._blocks(Tq, Tk))):
            q_rows, g_rows = q[..., q0:q1, :], g[..., q0:q1, :]
            s = _scores(xp, q_rows, k[..., :ke, :])
            dp = _scores(xp, g_rows, v[..., :ke, :])
            kattention.attention_softmax_grad(
                s.reshape(-1, ke), dp.reshape(-1, ke),
                xp.ascontiguousarray(self.lse[..., q0:q1]).reshape(-1),
                xp.ascontiguousarray(g_rows).reshape(-1, g.shape[-1]),
                xp.ascontiguousarray(self.out[..., q0:q1, :]).reshape(-1, g.shape[-1]),
                self.slopes, self.scale, q0 + self.offset, self.causal)  # s: p, dp: d(q·kᵀ)
            dq.append(kgemm.matmul(dp, k[..., :ke, :]))
            dk_rows = kgemm.matmul(xp.swapaxes(dp, -1, -2), q_rows)
            dv_rows = kgemm.matmul(xp.swapaxes(s, -1, -2), g_rows)
            if dk is None:
                dk, dv = dk_rows, dv_rows
            else:
                dk[..., :ke, :] += dk_rows
                dv[..., :ke, :] += dv_rows
        if dk is None:  # no query rows: nothing flows back
            return xp.zeros_like(q), xp.zeros_like(k), xp.zeros_like(v)
        return _join(xp, dq[::-1], -2, q.shape, q.dtype), dk, dv

    def _blocks(self, Tq, Tk):
        """(q0, q1, ke) per block: query rows q0:q1 and the keys :ke they can see."""
        for q0 in range(0, Tq, self.block_size):
            q1 = builtins.min(q0 + self.block_size, Tq)
            yield q0, q1, (builtins.min(Tk, q1 + Tk - Tq) if self.causal else Tk)


def _scores(xp, a, b):
    """a·bᵀ over the last two axes, C-contiguous: the row kernels write it in place through a
    (rows, keys) view (NumPy's matmul keeps an F-ordered input's order)."""
    return xp.ascontiguousarray(kgemm.matmul(a, xp.swapaxes(b, -1, -2)))


def _join(xp, parts, axis, shape, dtype):
    """The blocks' parts as one array (the part itself when there is one: no copy)."""
    if len(parts) == 1:
        return parts[0]
    return backend.concatenate(parts, axis=axis) if parts else xp.zeros(shape, dtype)


_slopes_on_device = {}   # (slopes, batch, dtype, device) -> the per-batch-row slopes array


def device_slopes(xp, alibi_slopes, batch, dtype):
    """One slope per batch row ((n_batch,), zeros without ALiBi) on xp's device, copied there
    once and kept: a copy per call would be a host-to-device transfer per attention layer,
    which a captured CUDA graph cannot hold."""
    slopes = (np.zeros(math.prod(batch)) if alibi_slopes is None else
              np.broadcast_to(np.asarray(alibi_slopes, np.float64), batch))
    device = xp.cuda.runtime.getDevice() if xp is not np else "cpu"
    key = (slopes.tobytes(), batch, np.dtype(dtype).str, device)
    cached = _slopes_on_device.get(key)
    if cached is None:
        cached = _slopes_on_device[key] = xp.asarray(
            np.ascontiguousarray(slopes, dtype).reshape(-1))
    return cached


def alibi_slopes(n_heads: int):
    """ALiBi's head slopes 2**(-8h/n), h = 1..n (float64 (n,)): a fixed recency bias per head,
    the steepest looking at the last few tokens, the flattest at the whole context."""
    return 2.0 ** (-8.0 * np.arange(1, n_heads + 1) / n_heads)


def scaled_dot_product_attention(q, k, v, causal=True, scale=None, block_size=None,
                                 alibi_slopes=None):
    """Attention over (..., T, D) tensors: q (..., Tq, D), k (..., Tk, D), v (..., Tk, Dv).

    scale defaults to 1/sqrt(D). causal=True masks future keys (bottom-right aligned, needs
    Tq <= Tk). block_size: query rows per block, memory (a (..., rows, Tk) score tile) against
    launches per block; None (the default) takes as many rows as fit
    ScaledDotProductAttention.TILE_ELEMENTS scores. alibi_slopes: None, or slopes
    broadcastable to the batch dims q.shape[:-2] (e.g. (H,) for (B, H, T, D)) that add
    -slope · |i - j| to the scores (i, j aligned as the mask is; needs Tq <= Tk too).
    """
    op = "scaled_dot_product_attention"
    for name, t in (("q", q), ("k", k), ("v", v)):
        _require_float(op, t, name)
        if t.ndim < 2:
            raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}; expected (..., T, D)")
    shapes = f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"{op}: dtypes differ (q {q.dtype}, k {k.dtype}, v {v.dtype}); "
                        "expected one dtype")
    if not q.shape[:-2] == k.shape[:-2] == v.shape[:-2]:
        raise ValueError(f"{op}: batch dimensions differ ({shapes}); expected equal leading dims")
    if q.shape[-1] != k.shape[-1] or k.shape[-2] != v.shape[-2]:
        raise ValueError(f"{op}: shapes {shapes} do not fit; expected q (..., Tq, D), "
                         "k (..., Tk, D), v (..., Tk, Dv)")
    if causal and q.shape[-2] > k.shape[-2]:
        raise ValueError(f"{op}: causal attention with more queries than keys ({shapes}); "
                         "expected Tq <= Tk (the mask is bottom-right aligned)")
    if alibi_slopes is not None and q.shape[-2] > k.shape[-2]:
        raise ValueError(f"{op}: ALiBi with more queries than keys ({shapes}) would place the "
                         "first queries before the first key; expected Tq <= Tk")
    if q.shape[-2] and not k.shape[-2]:
        raise ValueError(f"{op}: no keys to attend to ({shapes}); expected Tk >= 1")
    if block_size is not None and (not isinstance(block_size, (int, np.integer))
                                   or isinstance(block_size, (bool, np.bool_)) or block_size < 1):
        raise ValueError(f"{op}: block_size={block_size!r}; expected None or a positive integer")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if alibi_slopes is not None:
        slopes = np.asarray(backend.to_numpy(alibi_slopes), dtype=np.float64)
        batch = tuple(q.shape[:-2])
        try:
            fits = np.broadcast_shapes(slopes.shape, batch) == batch
        except ValueError:
            fits = False
        if not fits:
            raise ValueError(f"{op}: alibi_slopes of shape {slopes.shape} do not broadcast to "
                             f"the batch dimensions {batch} of {shapes}")
        alibi_slopes = slopes
    return ScaledDotProductAttention.apply(q, k, v, causal=bool(causal), scale=scale,
                                           block_size=None if block_size is None else int(block_size),
                                           alibi_slopes=alibi_slopes)
