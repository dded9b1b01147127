"""Device choice: one place that knows whether arrays are CuPy or NumPy.

Devices (docs/design.md#backend):
- "cuda":    CuPy arrays, Numba CUDA kernels on CuPy's current stream; chosen automatically
             when a GPU is usable.
- "cpu":     NumPy arrays, Numba njit twins. Chosen when no GPU is usable.
- "cudasim": NumPy arrays run through the CUDA kernels under Numba's simulator; tests only.
             It needs NUMBA_ENABLE_CUDASIM=1 in the environment before numba is imported.

`TRITNET_DEVICE=cpu|cuda|cudasim` overrides the automatic choice. Everything else in tritnet asks
this module (`device()`, `xp()`, `get_array_module()`), so device differences stay here and in
tritnet_kernels, never scattered through ops.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np

from .errors import TritnetError
from tritnet_kernels import float_gemm as kgemm

try:  # CuPy is an optional extra ([cuda12] / [cuda13]); without it we run on the CPU.
    import cupy
except Exception:  # pragma: no cover - depends on the machine
    cupy = None

DEVICES = ("cuda", "cpu", "cudasim")
META = "meta"  # construction only: modules built with shapes and dtypes, no memory (the trace)
_device: str | None = None


class DeviceError(TritnetError, RuntimeError):
    """The requested device cannot be used on this machine."""


def gpu_usable() -> tuple[bool, str]:
    """(usable, reason): whether CuPy can see and use a CUDA device."""
    if cupy is None:
        return False, "CuPy is not installed (pip install -e .[cuda12] or .[cuda13])"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # no driver, no device, broken install
        return False, f"CuPy cannot reach a CUDA driver ({type(e).__name__}: {e})"
    if n < 1:
        return False, "no CUDA device is visible"
    try:
        cupy.zeros(1).sum().item()
    except Exception as e:
        return False, f"a CUDA device is visible but unusable ({type(e).__name__}: {e})"
    return True, ""


def _resolve(name: str | None) -> str:
    if name is None or name == "" or name == "auto":
        return "cuda" if gpu_usable()[0] else "cpu"
    if name not in DEVICES:
        raise DeviceError(f"unknown device {name!r}: expected one of cpu, cuda, cudasim (or auto)")
    if name == "cuda":
        ok, why = gpu_usable()
        if not ok:
            raise DeviceError(f"device 'cuda' was asked for but no GPU is usable: {why}. "
                              "Use TRITNET_DEVICE=cpu (or --device cpu) to run on the CPU.")
    if name == "cudasim" and os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
        raise DeviceError("device 'cudasim' needs NUMBA_ENABLE_CUDASIM=1 set before Python starts")
    return name


def device() -> str:
    """The current device, resolved once from TRITNET_DEVICE or what the machine has."""
    global _device
    if _device is None:
        _device = _resolve(os.environ.get("TRITNET_DEVICE"))
    return _device


def set_device(name: str | None) -> str:
    """Choose the device for arrays created from now on ("auto" or None: best available)."""
    global _device
    _device = _resolve(name)
    return _device


def xp():
    """The array module of the current device: cupy for cuda, numpy otherwise."""
    return cupy if device() == "cuda" else np


def is_cupy(a) -> bool:
    return cupy is not None and isinstance(a, cupy.ndarray)


def get_array_module(*arrays):
    """cupy if any array is a CuPy array, else numpy (Chainer's get_array_module)."""
    return cupy if any(is_cupy(a) for a in arrays) else np


class MetaArray:
    """What a buffer would be — shape and dtype — allocated nowhere (device "meta").

    Modules built on the meta device hold these instead of arrays, so the constructor trace
    (tritnet.models.trace) sizes a 3B-trit model in well under a second and a few MB."""

    __slots__ = ("shape", "dtype")

    def __init__(self, shape, dtype):
        self.shape = tuple(int(n) for n in (shape if isinstance(shape, tuple) else (shape,)))
        self.dtype = np.dtype(dtype)

    size = property(lambda self: int(np.prod(self.shape, dtype=np.int64)))
    ndim = property(lambda self: len(self.shape))
    nbytes = property(lambda self: self.size * self.dtype.itemsize)

    def __repr__(self):
        return f"MetaArray(shape={self.shape}, dtype={self.dtype})"


def is_meta(a) -> bool:
    return isinstance(a, MetaArray)


def zeros(shape, dtype, device: str | None = None):
    """A zero-filled array on `device` (default: the current one); a MetaArray on "meta"."""
    device = device or globals()["device"]()
    if device == META:
        return MetaArray(shape, dtype)
    return (cupy if device == "cuda" else np).zeros(shape, dtype=dtype)


def empty(shape, dtype, device: str | None = None):
    device = device or globals()["device"]()
    if device == META:
        return MetaArray(shape, dtype)
    return (cupy if device == "cuda" else np).empty(shape, dtype=dtype)


def concatenate(arrays, axis=0):
    """xp.concatenate(arrays, axis), that a captured CUDA graph can hold: CuPy joins more than
    8 small arrays in one kernel that reads their addresses from a table it copies from the
    host (a transfer capture refuses), so those are copied slice by slice instead."""
    xp = get_array_module(arrays[0])
    if xp is np or len(arrays) <= 8:
        return xp.concatenate(arrays, axis=axis)
    axis = axis % arrays[0].ndim
    shape = list(arrays[0].shape)
    shape[axis] = sum(a.shape[axis] for a in arrays)
    out = xp.empty(shape, np.result_type(*arrays))
    at, where = 0, [slice(None)] * len(shape)
    for a in arrays:
        where[axis] = slice(at, at + a.shape[axis])
        out[tuple(where)] = a
        at += a.shape[axis]
    return out


def stack(arrays, axis=0):
    """xp.stack(arrays, axis), through `concatenate` (the same reason)."""
    axis = axis % (arrays[0].ndim + 1)
    return concatenate([a.reshape(a.shape[:axis] + (1,) + a.shape[axis:]) for a in arrays],
                       axis=axis)


def to_numpy(a) -> np.ndarray:
    return a.get() if is_cupy(a) else np.asarray(a)


def to_device(a, name: str | None = None):
    """Move an array to `name` (default: the current device) as that device's array type."""
    name = device() if name is None else name
    if name == "cuda":
        return a if is_cupy(a) else cupy.asarray(a)
    return to_numpy(a)


def array_device(a) -> str:
    return "cuda" if is_cupy(a) else "cpu"


MATMUL_PRECISIONS = ("fp32", "tf32")
_matmul_precision = "fp32"


def set_matmul_precision(mode: str) -> str:
    """How CuPy's float32 matrix products run on the GPU, process-wide (like PyTorch's
    torch.set_float32_matmul_precision); returns the previous mode.

    - "fp32": full float32 products (cuBLAS's default, FFMA on the CUDA cores);
    - "tf32": tensor cores on TF32 inputs (10-bit mantissa, float32 range and accumulation).

    The float products of a training step -- attention, the widened ternary products at large
    M, the weight gradient G = gyᵀ·x -- take ~30% of the default preset's GPU time in fp32.
    TF32 rounds their inputs to 2**-11 relative, far finer than anything training keeps:
    G is stochastically rounded to int8 right after, and the float-latent peer runs bf16.
    NumPy (the CPU) always computes in float32; the mode only matters on the GPU.
    """
    global _matmul_precision
    if mode not in MATMUL_PRECISIONS:
        raise ValueError(f"matmul precision {mode!r}: expected one of {', '.join(MATMUL_PRECISIONS)}")
    previous = _matmul_precision
    if cupy is not None:
        # CuPy's switch for the cuBLAS compute type of float32 products (what the CUPY_TF32
        # environment variable sets at the first product), changed at run time
        from cupy._core import _routines_linalg as linalg
        kind = linalg.COMPUTE_TYPE_TF32 if mode == "tf32" else linalg.COMPUTE_TYPE_DEFAULT
        linalg.set_compute_type(np.float32, kind)
    kgemm.set_precision(mode)   # tritnet's own (capturable) cuBLAS products
    _matmul_precision = mode
    return previous


def matmul_precision() -> str:
    return _matmul_precision


def synchronize() -> None:
    if cupy is not None and device() == "cuda":
        cupy.cuda.get_current_stream().synchronize()


def describe() -> dict:
    """Backend, device and library versions, for `tritnet info` and benchmark records."""
    import numba

    info = {"backend": device(), "numpy": np.__version__, "numba": numba.__version__}
    try:
        from importlib.metadata import version
        info["numba-cuda"] = version("numba-cuda")
    except Exception:
        info["numba-cuda"] = "not installed"
    info["cupy"] = cupy.__version__ if cupy is not None else "not installed"
    ok, why = gpu_usable()
    if ok:
        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        name = props["name"]
        info["gpu"] = name.decode() if isinstance(name, bytes) else str(name)
        info["gpu_memory_gib"] = round(props["totalGlobalMem"] / 2**30, 1)
    else:
        info["gpu"] = f"none ({why})"
    return info


def scatter_add(target, indices, values) -> None:
    """target[indices] += values with repeated indices summed (np.add.at / cupyx.scatter_add)."""
    if is_cupy(target):
        import cupyx
        cupyx.scatter_add(target, indices, values)
    else:
        np.add.at(target, indices, values)


COMPILING = "compiling kernels, once (Numba keeps them on disk for later runs) ..."


@contextlib.contextmanager
def announce_compilation(say):
    """Within the block, call say(COMPILING) when the first Numba kernel starts compiling,
    and never again: the first run of a command compiles each kernel it uses (seconds to
    minutes, silent otherwise), later runs load them from Numba's on-disk cache (a kernel
    whose source changed is compiled again) and say nothing. Numba reports a CPU kernel's
    compilation as the event "numba:compile"; numba-cuda reports none for CUDA kernels, but
    each of their compiler passes ("numba-cuda:run_pass"), which only compilation runs."""
    from numba.core import event
    sources = [(event, "numba:compile")]
    try:
        from numba.cuda.core import event as cuda_event
        sources.append((cuda_event, "numba-cuda:run_pass"))
    except ImportError:   # a numba-cuda without its own events
        pass
    said = []

    def on_start(_listener, _event):
        if not said:
            said.append(True)
            say(COMPILING)

    with contextlib.ExitStack() as stack:
        for module, kind in sources:
            listener = type("CompileNotice", (module.Listener,), {
                "on_start": on_start, "on_end": lambda _listener, _event: None})()
            stack.enter_context(module.install_listener(kind, listener))
        yield
