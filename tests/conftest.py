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


# Why tests were skipped, in one line at the end of the run: on a CPU machine most skips are
# the GPU variants and the simulator's tests (run by tests/test_cudasim.py in a child
# process), and pytest alone shows only their count.
_SKIP_KINDS = (
    ("needs NUMBA_ENABLE_CUDASIM", "run in the CUDA simulator pass instead (tests/test_cudasim.py "
     "starts it in a child process)"),
    ("CPU test: run without NUMBA_ENABLE_CUDASIM", "are CPU tests (this is the simulator pass)"),
    ("no usable GPU", "need a usable GPU ({reason})"),
)


def pytest_terminal_summary(terminalreporter):
    skipped = terminalreporter.stats.get("skipped", [])
    if not skipped:
        return
    counts, examples = {}, {}
    for report in skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else \
            str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        kind = next((k for k, _ in _SKIP_KINDS if reason.startswith(k)), None)
        counts[kind] = counts.get(kind, 0) + 1
        examples.setdefault(kind, reason)
    parts = [f"{counts[k]} {text.format(reason=examples[k])}" for k, text in _SKIP_KINDS
             if k in counts]
    if None in counts:
        parts.append(f"{counts[None]} for reasons of their own (-rs lists them)")
    terminalreporter.write_line(f"skipped {len(skipped)}: " + "; ".join(parts))


@pytest.fixture
def cpu_only(monkeypatch):
    """The test runs on NumPy, and so do the tritnet processes it starts (TRITNET_DEVICE=cpu).
    A test file takes it for all its tests with
    `pytestmark = pytest.mark.usefixtures("cpu_only")`."""
    monkeypatch.setenv("TRITNET_DEVICE", "cpu")
    backend.set_device("cpu")
