"""The update rule of one trit and one row exponent: the one definition that the dense update
(update.py) and the sparse table update (sparse_rows.py) both run, on every device.

An int8 accumulator beside each value sums its int8 gradients with saturation; the value moves
one step when the accumulator crosses a threshold (tritnet/optim.py states the rule).
"""

from . import _numba_compat  # noqa: F401  (must precede numba.cuda)

import numba
import numpy as np

from ._launch import on_device

# int8 accumulators saturate at ±127, never -128, so that a run of positive and a run of
# negative gradients of the same size are treated the same (no asymmetric extra step).
ACCUM_MAX = 127
E_MIN, E_MAX = -128, 127


@numba.njit(cache=True)
def sat_accum(a):
    if a > ACCUM_MAX:
        return ACCUM_MAX
    if a < -ACCUM_MAX:
        return -ACCUM_MAX
    return a


@numba.njit(cache=True)
def accumulator_step(value, accum, grad, threshold, lowest, highest, decay_shift, carry):
    """The update rule for one trit (lowest=-1, highest=1) or one exponent (-128, 127).

    On a move the accumulator restarts at 0 (carry = 0), or keeps its place as a position
    inside the value's bins of width 2·threshold (carry = 1: a ∓ 2·threshold, the far edge of
    the new bin, as a float latent weight that crosses a rounding boundary). Returns the new
    (value, accum). All arguments are int64.
    """
    a = sat_accum(accum + grad)
    # Positive accumulated gradient: the loss falls as the value falls.
    if a >= threshold and value > lowest:
        return value - 1, a - 2 * threshold if carry else 0
    if a <= -threshold and value < highest:
        return value + 1, a + 2 * threshold if carry else 0
    if decay_shift > 0:
        if a > 0:
            a -= a >> decay_shift
        else:
            a += (-a) >> decay_shift
    return value, a


@numba.njit(cache=True)
def trit_group_step(T_packed, T_accum, grad_q, r, grad_row, g, cols, flip_threshold,
                    flip_decay_shift, flip_carry):
    """The rule for the 32-trit group g of row r, whose gradients are row grad_row of grad_q.

    Rewrites the group's mask words and accumulators; returns how many trits changed.
    """
    plus = np.int64(T_packed[r, 2 * g])
    minus = np.int64(T_packed[r, 2 * g + 1])
    new_plus = 0
    new_minus = 0
    flips = 0
    for b in range(min(32, cols - 32 * g)):
        j = 32 * g + b
        t = ((plus >> b) & 1) - ((minus >> b) & 1)
        t_new, a = accumulator_step(t, np.int64(T_accum[r, j]), np.int64(grad_q[grad_row, j]),
                                    flip_threshold, -1, 1, flip_decay_shift, flip_carry)
        T_accum[r, j] = a
        if t_new != t:
            flips += 1
        if t_new > 0:
            new_plus |= 1 << b
        elif t_new < 0:
            new_minus |= 1 << b
    T_packed[r, 2 * g] = new_plus
    T_packed[r, 2 * g + 1] = new_minus
    return flips


@numba.njit(cache=True)
def exponent_step(E, E_accum, grad_E_q, r, grad_row, scale_threshold, scale_decay_shift):
    """The rule for the exponent of row r (its gradient at grad_row); returns 1 if E[r] moved."""
    e = np.int64(E[r])
    e_new, a = accumulator_step(e, np.int64(E_accum[r]), np.int64(grad_E_q[grad_row]),
                                scale_threshold, E_MIN, E_MAX, scale_decay_shift, 0)
    E[r] = e_new
    E_accum[r] = a
    if e_new != e:
        return 1
    return 0


trit_group_step_dev = on_device(trit_group_step)
exponent_step_dev = on_device(exponent_step)


def rule_reference(value, accum, grad, threshold, lowest, highest, decay_shift, carry=False):
    """Vectorised `accumulator_step` over integer arrays: returns (value, accum)."""
    a = np.clip(accum + grad, -ACCUM_MAX, ACCUM_MAX)
    down = (a >= threshold) & (value > lowest)
    up = ~down & (a <= -threshold) & (value < highest)
    if decay_shift > 0:
        decayed = a - np.sign(a) * (np.abs(a) >> decay_shift)
    else:
        decayed = a
    value = value - down + up
    if carry:
        accum = np.where(down, a - 2 * threshold, np.where(up, a + 2 * threshold, decayed))
    else:
        accum = np.where(down | up, 0, decayed)
    return value, accum

