"""Check an op's analytic backward against float64 central differences (Chainer's habit).

The scalar checked is L = sum(fn(*inputs) * w) for a fixed random projection w: one backward
pass with grad=w gives dL/dx for every input, and every output element takes part, so a wrong
gradient in any position shows up. Works on NumPy and CuPy arrays alike (slow on purpose:
one forward pass per perturbed element, so keep shapes small).
"""

from __future__ import annotations

import numpy as np

from . import backend
from .autograd import Tensor, no_grad


def check_backward(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-4, seed=0):
    """Assert that the backward of `fn` matches central differences for every input that
    requires grad; return {input index: (max abs error, max rel error)}.

    `fn(*inputs)` must return one Tensor. Inputs that require grad must be float64 (float32
    central differences are dominated by rounding). They are perturbed in place, so a
    non-contiguous view stays a non-contiguous view, and restored afterwards.
    """
    inputs = list(inputs)
    checked = [i for i, x in enumerate(inputs) if isinstance(x, Tensor) and x.requires_grad]
    if not checked:
        raise ValueError("check_backward: no input requires grad; nothing to check")
    for i in checked:
        if inputs[i].dtype != np.float64:
            raise TypeError(f"check_backward: input {i} has dtype {inputs[i].dtype}; central "
                            "differences need float64 inputs")
        inputs[i].grad = None

    out = fn(*inputs)
    if not isinstance(out, Tensor):
        raise TypeError(f"check_backward: fn returned {type(out).__name__}; expected one Tensor")
    xp = backend.get_array_module(out.data)
    w = xp.asarray(np.random.default_rng(seed).standard_normal(out.shape).astype(out.dtype))
    out.backward(w)

    def projected():
        with no_grad():
            return float((fn(*inputs).data * w).sum())

    report = {}
    for i in checked:
        x = inputs[i]
        if x.grad is None:
            raise AssertionError(f"check_backward: input {i} of shape {tuple(x.shape)} requires "
                                 "grad but backward gave it no gradient")
        analytic = backend.to_numpy(x.grad).astype(np.float64)
        numeric = np.empty(x.shape)
        for idx in np.ndindex(*x.shape):
            old = float(x.data[idx])
            x.data[idx] = old + eps
            plus = projected()
            x.data[idx] = old - eps
            minus = projected()
            x.data[idx] = old
            numeric[idx] = (plus - minus) / (2 * eps)
        abs_err = np.abs(analytic - numeric)
        rel_err = abs_err / np.maximum(np.abs(numeric), atol)
        report[i] = (float(abs_err.max(initial=0.0)), float(rel_err.max(initial=0.0)))
        bad = abs_err > atol + rtol * np.abs(numeric)
        if bad.any() or not np.isfinite(analytic).all():
            at = np.unravel_index(int(np.argmax(np.where(np.isfinite(abs_err), abs_err, np.inf))),
                                  x.shape) if x.ndim else ()
            raise AssertionError(
                f"check_backward: input {i} of shape {tuple(x.shape)}: analytic and numeric "
                f"gradients differ at {int(bad.sum())} of {x.size} elements; max abs error "
                f"{report[i][0]:.3g} at index {tuple(int(j) for j in at)} (analytic "
                f"{analytic[at]:.6g}, numeric {numeric[at]:.6g}), max rel error "
                f"{report[i][1]:.3g}; allowed |analytic - numeric| <= {atol:g} + {rtol:g}·|numeric|")
    return report
