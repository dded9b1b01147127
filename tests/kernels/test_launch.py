"""tritnet_kernels._launch: the cheap launch path (cubin loaded by CuPy, Numba's kernel ABI
packed by hand) must give exactly what Numba's own dispatch gives, for every argument kind
the kernels use: arrays of 1-3 dimensions and several dtypes, contiguous or strided, and
scalars of each width."""

import numpy as np
import pytest
from numba import cuda

from tritnet import backend
from tritnet_kernels import _launch

cupy = backend.cupy

pytestmark = pytest.mark.cuda


@cuda.jit
def _abi_probe(out, a2, b1, c3, i64, f32, u32, f64, i16, u8):
    # Touches every field the ABI carries: shapes, strides (c3 is a strided view), data.
    i = cuda.grid(1)
    if i < out.shape[0]:
        r = i % a2.shape[0]
        c = i % a2.shape[1]
        v = a2[r, c] * f32 + b1[i % b1.shape[0]] + c3[i % c3.shape[0], 1, i % c3.shape[2]]
        out[i] = v + i64 + u32 + f64 + i16 + u8 + a2.shape[1] + c3.strides[0]


def test_fast_launch_matches_numba_dispatch():
    rng = np.random.default_rng(0)
    a2 = cupy.asarray(rng.standard_normal((7, 5)).astype(np.float32))
    b1 = cupy.asarray(rng.integers(-100, 100, 13).astype(np.int8))
    c3 = cupy.asarray(rng.integers(0, 255, (4, 3, 12)).astype(np.uint8))[:, :, ::3]
    scalars = (3, np.float32(1.5), np.uint32(7), 2.25, np.int16(-9), np.uint8(200))
    n = 300
    fast = cupy.full(n, np.nan, cupy.float64)
    _launch.launch(_abi_probe, 3, 128, fast, a2, b1, c3, *scalars)
    ref = cupy.full(n, np.nan, cupy.float64)
    stream = cuda.external_stream(cupy.cuda.get_current_stream().ptr)
    _abi_probe[3, 128, stream](ref, a2, b1, c3, *scalars)
    assert _launch.fast_launch_status().get("_abi_probe") == "fast", _launch.fast_launch_status()
    np.testing.assert_array_equal(fast.get(), ref.get())
    assert not np.isnan(fast.get()).any()


def test_unsupported_arguments_fall_back_to_numba():
    @cuda.jit
    def flag_kernel(out, flag):
        if cuda.grid(1) == 0:
            out[0] = 1 if flag else 2

    out = cupy.zeros(1, cupy.int32)
    _launch.launch(flag_kernel, 1, 32, out, True)  # bool: not on the fast path
    assert int(out[0]) == 1
