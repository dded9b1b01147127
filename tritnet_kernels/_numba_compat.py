"""Compatibility guard that must run before `numba.cuda` is imported.

numba-cuda 0.30.x still calls `np.row_stack`, which NumPy 2.5 removed; the first CUDA kernel
compile then dies with AttributeError. Its maintainers do not plan a fix (maintenance mode),
and GPU images ship NumPy 2.5 beside numba-cuda 0.30 (NumPy 2.5.2 and numba-cuda 0.30.4 on
the H100 and H200 machines of benchmarks/results/), so we alias the removed name to its
documented replacement (docs/kernels.md#numpy-25-guard). pyproject pins numpy<2.5 for fresh
installs; this guard only matters where 2.5 is already present. Drop it when numba-cuda stops
using row_stack.
"""

import numpy as np

if not hasattr(np, "row_stack"):
    np.row_stack = np.vstack

# Numba's CPU kernels run on its OpenMP thread pool, and NumPy's matmul on OpenBLAS's own
# pool. Both spin while idle by default, so alternating them on a small machine makes each
# wait for the other's spinning threads: on two cores, 200 steps of examples/digits.py took
# 5.4 s with the default and 0.2 s with OpenMP threads that sleep when idle (measured
# 2026-11-25). libgomp reads this when Numba first starts its pool, which is after this line.
# A user's own setting wins.
import os  # noqa: E402

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Kernels compiled by an earlier run are loaded from disk, and recompiled when any source file
# of this package changed (_disk_cache.py).
from ._disk_cache import install_locators  # noqa: E402

install_locators()
