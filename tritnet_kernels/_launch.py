"""Where a kernel runs, and how it is launched.

Every kernel job in this package exists twice: a Numba CUDA kernel and a Numba CPU twin with
the same signature. `target(*arrays)` says which one a call takes:

- "cuda":    the arrays are CuPy arrays; the CUDA kernel runs on CuPy's current stream;
- "cudasim": the arrays are NumPy arrays and Numba's CUDA simulator is on
             (NUMBA_ENABLE_CUDASIM=1 before numba is imported): the CUDA kernel runs in the
             simulator. Tests only, tiny shapes;
- "cpu":     NumPy arrays: the njit twin runs.

Mixing NumPy and CuPy arrays in one call is an error, named before anything launches.

Cheap launches (docs/kernels.md#launching). Numba's own dispatch with CuPy arguments costs
42-96 µs of host time per launch, which would dominate a ~10 µs GEMV. `launch` therefore
compiles the kernel once per (kernel, device, argument types) with Numba, loads the linked
cubin into the current context through CuPy's driver bindings, and then launches it with one
cuLaunchKernel from a parameter buffer it packs itself. That needs Numba's kernel ABI, which
this module mirrors: each array argument is passed as its flattened struct fields

    meminfo (ptr), parent (ptr), nitems (int64), itemsize (int64), data (ptr),
    shape[ndim] (int64 each), strides[ndim] (int64 each, bytes)

and each scalar by value (see numba-cuda's `_Kernel._prepare_args`, which builds the same
list). The entry point is the kernel's mangled LLVM name (the `.entry` of its PTX). Anything
this path does not cover (simulator, booleans, records, tuples, cooperative or debug kernels,
a failed compile/load) falls back to Numba's dispatch, which stays correct, only slower;
`fast_launch_status()` says which kernels took which path and why.
Set TRITNET_FAST_LAUNCH=0 to force Numba's dispatch everywhere.

Measured on an H100 80GB HBM3 (2026-11-25, benchmarks/results/matmul-*.json): Numba's
dispatch with CuPy arguments 168-260 us per launch; this path at most 13.5 us per launch,
measured in a loop whose kernel itself took ~15-20 us, so an upper bound, not the host cost
alone (benchmarks/bench_matmul.py probes that with a one-tile kernel).
"""

from . import _numba_compat  # noqa: F401  (must precede numba.cuda)
from . import _disk_cache

import ctypes
import os
import struct
import threading

import numba
import numpy as np
from numba import cuda
from numba.cuda.core import config as _cuda_config  # numba.config itself when Numba is installed

# Tiny grids are deliberate: a kernel on a tiny tensor (a row of exponents, a test shape) needs
# a block or two, and every kernel here strides its grid. Numba's dispatch (the fallback path
# below) would print NumbaPerformanceWarning "Grid size N will likely result in GPU
# under-utilization" for each such launch. A user's NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS wins.
if "NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS" not in os.environ:
    _cuda_config.CUDA_LOW_OCCUPANCY_WARNINGS = 0

try:  # CuPy is optional: CPU machines run without it.
    import cupy
except Exception:  # pragma: no cover - depends on the machine
    cupy = None


def is_cupy(a) -> bool:
    return cupy is not None and isinstance(a, cupy.ndarray)


def simulator() -> bool:
    return bool(numba.config.ENABLE_CUDASIM)


def target(*arrays, op: str = "kernel") -> str:
    on_gpu = [is_cupy(a) for a in arrays if a is not None]
    if any(on_gpu) and not all(on_gpu):
        kinds = ", ".join("cupy" if is_cupy(a) else type(a).__name__ for a in arrays if a is not None)
        raise TypeError(f"{op}: arrays are on different devices ({kinds}); move all of them to one "
                        "device first (all NumPy for cpu, all CuPy for cuda)")
    if on_gpu and all(on_gpu):
        return "cuda"
    return "cudasim" if simulator() else "cpu"


def xp_of(a):
    return cupy if is_cupy(a) else np


def on_device(njit_fn):
    """The njit rule a CUDA kernel calls: numba-cuda compiles the njit function into the
    kernel; the simulator passes its fake arrays to the plain Python function instead."""
    return njit_fn.py_func if simulator() else njit_fn


def launch(kernel, griddim, blockdim, *args):
    """Launch a Numba CUDA kernel on CuPy's current stream (or in the simulator)."""
    if simulator():
        kernel[griddim, blockdim](*args)
        return
    if _FAST:
        try:
            key = (kernel, cupy.cuda.runtime.getDevice()) + tuple(map(_arg_key, args))
        except _Unsupported:
            key = None
        if key is not None:
            fast = _launchers.get(key, _MISSING)
            if fast is _MISSING:
                fast = _launchers[key] = _FastLauncher.build(kernel, args)
            if fast is not None:
                fast(griddim, blockdim, args)
                return
    stream = cuda.external_stream(cupy.cuda.get_current_stream().ptr)
    # Numba's dispatch synchronizes on the stream named in each CuPy argument's
    # __cuda_array_interface__ (a consumer on another stream would need that). We launch on
    # that very stream, so the wait only stalls the host and leaves the GPU idle per launch.
    sync = numba.config.CUDA_ARRAY_INTERFACE_SYNC
    numba.config.CUDA_ARRAY_INTERFACE_SYNC = 0
    try:
        kernel[griddim, blockdim, stream](*args)
    finally:
        numba.config.CUDA_ARRAY_INTERFACE_SYNC = sync


# --------------------------------------------------------------------------------------------
# The fast path.

_FAST = os.environ.get("TRITNET_FAST_LAUNCH", "1") != "0"
_MISSING = object()
_launchers = {}      # (kernel, device, arg keys...) -> _FastLauncher, or None for "use Numba"
_fallbacks = {}      # kernel name -> why the fast path was not used


class _Unsupported(Exception):
    pass


_SCALAR_KEYS = {int: "int", float: "float"}


def _arg_key(a):
    if is_cupy(a):
        return (a.dtype.char, a.ndim, a._c_contiguous, a._f_contiguous)
    kind = _SCALAR_KEYS.get(type(a))
    if kind is not None:
        return kind
    if isinstance(a, np.generic) and a.dtype.kind in "iuf":
        return a.dtype.char
    raise _Unsupported  # bool, tuples, NumPy arrays...: Numba's dispatch handles them


# struct codes of Numba scalar argument types (PTX params: each aligned to its own size).
_SCALAR_FORMATS = {"int8": "b", "uint8": "B", "int16": "h", "uint16": "H", "int32": "i",
                   "uint32": "I", "int64": "q", "uint64": "Q", "float32": "f", "float64": "d"}


class _FastLauncher:
    """One compiled kernel for one argument signature, launched with a packed param buffer."""

    def __init__(self, func, layout):
        self.func = func
        self.layout = layout  # per argument: ndim for arrays, ("scalar", struct code) else
        fmt, offsets, off = "=", [], 0
        for kind in layout:
            codes = "q" * (5 + 2 * kind) if isinstance(kind, int) else kind[1]
            for code in codes:
                size = struct.calcsize("=" + code)
                pad = -off % size
                fmt += "x" * pad + code
                off += pad
                offsets.append(off)
                off += size
        self.packer = struct.Struct(fmt)
        self.buf = ctypes.create_string_buffer(max(off, 1))
        base = ctypes.addressof(self.buf)
        self.params = (ctypes.c_void_p * len(offsets))(*[base + o for o in offsets])
        self.params_ptr = ctypes.addressof(self.params)
        self.lock = threading.Lock()
        self.cu_launch = cupy.cuda.driver.launchKernel

    @classmethod
    def build(cls, kernel, args):
        name = getattr(kernel, "__name__", repr(kernel))
        try:
            argtypes = tuple(kernel.typeof_pyval(a) for a in args)
            layout = []
            for ty in argtypes:
                if isinstance(ty, numba.types.Array):
                    layout.append(ty.ndim)
                elif str(ty) in _SCALAR_FORMATS:
                    layout.append(("scalar", _SCALAR_FORMATS[str(ty)]))
                else:
                    raise _Unsupported(f"argument type {ty}")
            if getattr(kernel, "extensions", None):
                raise _Unsupported("extension kernel")
            cc = cupy.cuda.Device().compute_capability
            cc = (int(cc[:-1]), int(cc[-1]))

            def compile_image():
                compiled = kernel.compile(argtypes)
                if getattr(compiled, "cooperative", False) or getattr(compiled, "debug", False):
                    raise _Unsupported("cooperative or debug kernel")
                image = compiled._codelibrary.get_cubin(cc=cc)
                image = getattr(image, "code", image)  # numba-cuda 0.2x wraps it in an ObjectCode
                if isinstance(image, (str, os.PathLike)):
                    with open(image, "rb") as f:
                        image = f.read()
                return bytes(image), compiled.entry_name

            image, entry = _disk_cache.cubin(name, _cubin_key(kernel, argtypes, cc),
                                             compile_image)
            module = cupy.cuda.driver.moduleLoadData(image)
            func = cupy.cuda.driver.moduleGetFunction(module, entry)
            return cls(func, layout)
        except Exception as exc:  # any surprise: stay correct through Numba's dispatch
            _fallbacks[name] = f"{type(exc).__name__}: {exc}"
            return None

    def __call__(self, griddim, blockdim, args):
        vals = []
        for a, kind in zip(args, self.layout):
            if kind.__class__ is int:
                vals += (0, 0, a.size, a.itemsize, a.data.ptr, *a.shape, *a.strides)
            else:
                vals.append(a)
        g = (griddim, 1, 1) if griddim.__class__ is int else (*griddim, 1, 1)
        b = (blockdim, 1, 1) if blockdim.__class__ is int else (*blockdim, 1, 1)
        stream = cupy.cuda.get_current_stream().ptr
        with self.lock:  # the buffer is reused; cuLaunchKernel copies it before returning
            self.packer.pack_into(self.buf, 0, *vals)
            self.cu_launch(self.func, g[0], g[1], g[2], b[0], b[1], b[2], 0, stream,
                           self.params_ptr, 0)


def _cubin_key(kernel, argtypes, cc):
    """What a kernel's linked image depends on besides the package's sources: the kernel, its
    compile options, its argument types, the GPU architecture and the compiler's versions."""
    from importlib.metadata import version
    func = kernel.py_func
    options = sorted((k, repr(v)) for k, v in kernel.targetoptions.items())
    return (func.__module__, func.__qualname__, tuple(options), tuple(map(str, argtypes)), cc,
            numba.__version__, version("numba-cuda"), cupy.cuda.runtime.runtimeGetVersion(),
            cupy.cuda.runtime.driverGetVersion())


def fast_launch_status():
    """{kernel name: "fast" | reason it fell back to Numba's dispatch} for kernels seen so far."""
    status = {getattr(k[0], "__name__", repr(k[0])): "fast" for k, v in _launchers.items() if v}
    status.update(_fallbacks)
    return status
