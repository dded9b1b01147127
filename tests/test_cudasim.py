"""Run every `cudasim`-marked test in a child process with Numba's CUDA simulator on.

NUMBA_ENABLE_CUDASIM must be set before numba is first imported, so the simulator pass cannot
share this process; running it from here keeps the README's single test command complete.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import numba
import pytest


def test_cuda_kernels_under_the_simulator():
    if numba.config.ENABLE_CUDASIM:
        pytest.skip("this process is the simulator run itself")
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    env.pop("TRITNET_DEVICE", None)
    tests = Path(__file__).parent
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-m", "cudasim", "-p", "no:cacheprovider", str(tests)],
        env=env, capture_output=True, text=True, timeout=1200, cwd=tests.parent)
    tail = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, f"simulator run failed:\n{tail}"
    passed = re.search(r"(\d+) passed", proc.stdout)
    assert passed and int(passed.group(1)) >= 3, f"simulator run ran too few tests:\n{tail}"
