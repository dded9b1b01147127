"""Module, Parameter, ModuleList, Sequential: the habits PyTorch users already have.

A Module registers what is assigned to it by type: a `Parameter` (a float Tensor trained by
gradient) goes to its parameters, a `Module` to its children; arrays registered with
`register_buffer` are its buffers. Ternary modules keep all their state as integer buffers
(packed trits, int8 scales and accumulators) and no Parameters at all
(docs/design.md#integer-dtypes).
`state_dict()` maps dotted names to the underlying arrays; `load_state_dict` checks names,
shapes and dtypes before copying anything, so a bad dict changes nothing.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from .. import backend
from ..autograd import Tensor


class Parameter(Tensor):
    """A float Tensor that a Module trains by gradient (requires_grad=True)."""

    __slots__ = ()

    def __init__(self, data, requires_grad: bool = True):
        super().__init__(data, requires_grad=requires_grad)


class Module:
    training: bool

    def __init__(self):
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_buffers", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "training", True)

    # --- registration by attribute ------------------------------------------------------
    def __setattr__(self, name, value):
        if "_parameters" not in self.__dict__:
            raise AttributeError(f"{type(self).__name__}: call Module.__init__() before assigning "
                                 f"attribute {name!r}")
        if isinstance(value, (Parameter, Module)):
            self._forget(name)
            store = self._parameters if isinstance(value, Parameter) else self._modules
            store[name] = value
        elif name in self._buffers:
            self._buffers[name] = value
        elif name in self._parameters or name in self._modules:
            raise TypeError(f"{type(self).__name__}.{name} is a "
                            f"{'parameter' if name in self._parameters else 'submodule'}; cannot "
                            f"assign a {type(value).__name__} to it (delete it first)")
        else:
            object.__setattr__(self, name, value)

    def _forget(self, name):
        for store in (self._parameters, self._buffers, self._modules):
            store.pop(name, None)
        self.__dict__.pop(name, None)

    def __getattr__(self, name):
        # Only called when normal lookup fails: look in the registries.
        for store in ("_parameters", "_buffers", "_modules"):
            d = self.__dict__.get(store)
            if d is not None and name in d:
                return d[name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __delattr__(self, name):
        for store in (self._parameters, self._buffers, self._modules):
            if name in store:
                del store[name]
                return
        object.__delattr__(self, name)

    def register_buffer(self, name: str, array) -> None:
        """Keep `array` (an xp array) as named state: saved in state_dict, moved by `to`."""
        if name in self._parameters or name in self._modules:
            raise KeyError(f"{type(self).__name__}.register_buffer: {name!r} is already a "
                           "parameter or submodule")
        self.__dict__.pop(name, None)
        self._buffers[name] = array

    # --- walking the tree ---------------------------------------------------------------
    def named_children(self):
        return iter(self._modules.items())

    def children(self):
        return iter(self._modules.values())

    def named_modules(self, prefix: str = ""):
        """(dotted name, module) for this module and every descendant, depth first."""
        stack = [(prefix, self)]
        seen = set()
        while stack:
            name, module = stack.pop()
            if id(module) in seen:
                continue
            seen.add(id(module))
            yield name, module
            children = [(f"{name}.{n}" if name else n, m) for n, m in module._modules.items()]
            stack.extend(reversed(children))

    def modules(self):
        return (m for _, m in self.named_modules())

    def named_parameters(self, prefix: str = ""):
        for mname, module in self.named_modules(prefix):
            for n, p in module._parameters.items():
                yield (f"{mname}.{n}" if mname else n), p

    def parameters(self):
        return (p for _, p in self.named_parameters())

    def named_buffers(self, prefix: str = ""):
        for mname, module in self.named_modules(prefix):
            for n, b in module._buffers.items():
                if b is not None:
                    yield (f"{mname}.{n}" if mname else n), b

    def buffers(self):
        return (b for _, b in self.named_buffers())

    def held_arrays(self):
        """(dotted name, array) for every array this tree holds: parameters, buffers, and
        arrays or Tensors kept as plain attributes (such as a pending int8 gradient). The
        invariant tests walk this to prove no float state survives on ternary modules."""
        for mname, module in self.named_modules():
            prefix = f"{mname}." if mname else ""
            for n, p in module._parameters.items():
                yield prefix + n, p.data
                if p.grad is not None:
                    yield prefix + n + ".grad", p.grad
            for n, b in module._buffers.items():
                if b is not None:
                    yield prefix + n, b
            for n, v in module.__dict__.items():
                if isinstance(v, Tensor):
                    v = v.data
                if isinstance(v, np.ndarray) or backend.is_cupy(v):
                    yield prefix + n, v

    # --- state --------------------------------------------------------------------------
    def state_dict(self) -> "OrderedDict[str, object]":
        """Dotted name -> array (parameters' data and buffers), in registration order."""
        state = OrderedDict()
        for name, p in self.named_parameters():
            state[name] = p.data
        for name, b in self.named_buffers():
            state[name] = b
        return state

    def load_state_dict(self, state, strict: bool = True) -> None:
        """Copy arrays into this module's parameters and buffers; check everything first."""
        own = self.state_dict()
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        problems = []
        if strict and missing:
            problems.append(f"missing keys: {', '.join(missing)}")
        if strict and unexpected:
            problems.append(f"unexpected keys: {', '.join(unexpected)}")
        for name, target in own.items():
            if name not in state:
                continue
            value = state[name]
            value = value.data if isinstance(value, Tensor) else value
            if tuple(value.shape) != tuple(target.shape):
                problems.append(f"{name}: shape {tuple(value.shape)}, expected {tuple(target.shape)}")
            elif np.dtype(value.dtype) != np.dtype(target.dtype):
                problems.append(f"{name}: dtype {value.dtype}, expected {target.dtype}")
        if problems:
            raise ValueError(f"{type(self).__name__}.load_state_dict: " + "; ".join(problems))
        for name, target in own.items():
            if name in state:
                value = state[name]
                value = value.data if isinstance(value, Tensor) else value
                target[...] = backend.to_device(value, backend.array_device(target))

    def train(self, mode: bool = True) -> "Module":
        for m in self.modules():
            object.__setattr__(m, "training", mode)
        return self

    def eval(self) -> "Module":
        return self.train(False)

    def to(self, device: str) -> "Module":
        """Move every parameter and buffer to `device` ("cpu" or "cuda")."""
        for m in self.modules():
            for n, p in m._parameters.items():
                p.data = backend.to_device(p.data, device)
                p.grad = None
            for n, b in m._buffers.items():
                if b is not None:
                    m._buffers[n] = backend.to_device(b, device)
        return self

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    # --- a training step's host state ---------------------------------------------------
    # The plain attributes a training step changes on the host, between its forward and the
    # optimiser's step: int8 gradients waiting to be applied, recorded observations, step
    # counters. Each class lists its own (with its base's); a captured CUDA graph step saves
    # them and puts them back when its capture fails (tritnet/capture.py).
    step_attributes: tuple = ()

    def step_state(self) -> dict:
        """{name: value} of `step_attributes` (lists copied: a forward appends in place)."""
        state = {}
        for name in self.step_attributes:
            value = getattr(self, name)
            state[name] = list(value) if isinstance(value, list) else value
        return state

    def load_step_state(self, state: dict) -> None:
        for name, value in state.items():
            setattr(self, name, value)

    # --- calling and printing -----------------------------------------------------------
    def forward(self, *args, **kwargs):  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__}.forward is not defined")

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def extra_repr(self) -> str:
        return ""

    def __repr__(self):
        lines = [f"{type(self).__name__}({self.extra_repr()}"]
        for name, child in self._modules.items():
            body = repr(child).replace("\n", "\n  ")
            lines.append(f"  ({name}): {body}")
        return "\n".join(lines) + (")" if len(lines) == 1 else "\n)")


class Observer:
    """A module that learns by an integer rule that is not a gradient (VQ usage and dead-code
    restarts, code-graph edges). Its training forwards record observations in `observed`;
    the optimiser's step applies them (`apply_observations`) or drops them
    (`clear_observations`); a data-parallel step gathers them from every rank first, as rows
    of the columns `observation_columns()` declares (tritnet/distributed.py)."""

    def apply_observations(self) -> None:
        raise NotImplementedError

    def clear_observations(self) -> None:
        raise NotImplementedError

    def observation_columns(self) -> list:
        """Per group of observations, its columns as (dtype, shape of one row)."""
        raise NotImplementedError

    def take_observations(self) -> list:
        """Per group, this process's observations as arrays of equal length, one a column."""
        raise NotImplementedError

    def put_observations(self, groups: list) -> None:
        """Replace the observations with `groups` (take_observations' form, every rank's)."""
        raise NotImplementedError


class ModuleList(Module):
    """A list of modules, registered as children named "0", "1", ..."""

    def __init__(self, modules=()):
        super().__init__()
        for m in modules:
            self.append(m)

    def append(self, module: Module) -> "ModuleList":
        self._modules[str(len(self._modules))] = module
        return self

    def __getitem__(self, i: int) -> Module:
        return list(self._modules.values())[i]

    def __len__(self):
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())


class Sequential(ModuleList):
    """Modules applied in order."""

    def forward(self, x):
        for m in self:
            x = m(x)
        return x
