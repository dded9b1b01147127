"""Fixtures shared by the test files (add yours below; do not remove others')."""

import numba
import pytest

from tritnet import backend


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request):
    """Each test that takes `device` runs on NumPy ("cpu") and, marked `cuda`, on CuPy.

    `pytest -m cuda` runs only the CuPy variants; they skip on a machine without a usable GPU
    (pytest_runtest_setup below).
    """
    return request.param


SIM = bool(numba.config.ENABLE_CUDASIM)


def pytest_runtest_setup(item):
    """Marker rules for every test: `cudasim` tests run only in the simulator pass (they need
    NUMBA_ENABLE_CUDASIM=1 before numba is imported; tests/test_cudasim.py starts that pass),
    and nothing else runs there (the public wrappers would send it through the slow
    simulator); `cuda` tests need a usable GPU."""
    is_sim_test = item.get_closest_marker("cudasim") is not None
    if is_sim_test and not SIM:
        pytest.skip("needs NUMBA_ENABLE_CUDASIM=1 set before numba is imported")
    if SIM and not is_sim_test:
        pytest.skip("CPU test: run without NUMBA_ENABLE_CUDASIM")
    if item.get_closest_marker("cuda") is not None:
        usable, why = backend.gpu_usable()
        if not usable:
            pytest.skip(f"no usable GPU: {why}")


@pytest.fixture(autouse=True)
def _full_precision_products():
    """Building a model sets the process's matmul precision from its config (TF32 by
    default); tests that compare float products on the GPU expect fp32, so each test starts
    and ends there."""
    backend.set_matmul_precision("fp32")
    yield
    backend.set_matmul_precision("fp32")
