"""Fixtures shared by the test files (add yours below; do not remove others')."""

import pytest

from tritnet import backend


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request):
    """Each test that takes `device` runs on NumPy ("cpu") and, marked `cuda`, on CuPy.

    `pytest -m cuda` runs only the CuPy variants; they skip on a machine without a usable GPU.
    """
    if request.param == "cuda":
        usable, why = backend.gpu_usable()
        if not usable:
            pytest.skip(f"no usable GPU: {why}")
    return request.param
