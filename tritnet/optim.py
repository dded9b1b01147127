"""TritFlip: the integer optimiser of ternary weights (docs/update-rule.md).

In the family of latent-free binary optimisers (Bop): the only memory is an int8 accumulator
per trit (and per row scale), not a float latent weight. One step, for each ternary tensor:

    a  = sat8(T_accum + grad_q)                          grad_q: this step's int8 gradient
    a ≥ +flip_threshold and t > -1  →  t -= 1, a = 0     (gradient says: decrease)
    a ≤ -flip_threshold and t < +1  →  t += 1, a = 0
    otherwise, if decay_shift > 0   →  a -= sign(a)·(|a| >> decay_shift)

and the same for each row's scale exponent E from E_accum, grad_E_q and `scale_threshold`
(E clamped to the int8 range). grad_q is q = stochastic_round(G · grad_rms_units / rms(G)),
clipped to ±grad_clip_units when that is set.

The hyperparameters are this scheme's learning rate:
- grad_rms_units (default 8): int8 units a gradient entry of one RMS adds to its accumulator;
- flip_threshold (default 64): accumulated units that move a trit one step. A consistent
  one-RMS gradient flips a trit in flip_threshold / grad_rms_units = 8 steps; noise (random
  sign) needs about (flip_threshold / grad_rms_units)² = 64 steps;
- flip_thresholds: per-module overrides of flip_threshold ({module: threshold}). A sparse
  table's row takes a gradient only on the steps that read it, so a row read rarely never
  gathers flip_threshold units at the default: the n-gram memory's table learns at a lower
  threshold (config `ngram_flip_threshold`);
- scale_threshold (default 64): the same for the row scale E (one step = ×2^(±1/8));
- grad_clip_units (default 8, one RMS at the default gain; 0 = off): the most units one
  backward adds to one accumulator. Below flip_threshold, no single step's gradient can flip
  a trit from a fresh accumulator: a flip needs agreement over several steps. Unclipped, a
  gradient concentrated on a few entries (normalised by the tensor's RMS, those entries read
  as many RMS) flips them at once, and the next step's gradient flips them back: the loss
  spikes. Measured (benchmarks/results/train-small-5m-h100/): clipping at 8 took the small
  preset from 2.24–2.51 to 2.08–2.10 held-out bpb, and the tiny one from 2.79–2.83 to
  2.75–2.76;
- decay_shift (default 0 = off): each step without a flip leaks |a| >> decay_shift, a memory of
  about 2**decay_shift steps: larger = longer memory; it filters gradient noise.
- schedule ("constant" or "cosine") and final_grad_rms_units: the gain's schedule, this
  scheme's learning-rate decay. With "cosine" the units a one-RMS gradient adds fall from
  grad_rms_units at step 0 to final_grad_rms_units at `total_steps`, along a half cosine
  (stochastic rounding keeps a fractional gain unbiased). Late in training, noise then rarely
  reaches the threshold, so trits stop flipping back and forth and settle.

Three options change the rule (each a config field; the defaults are the rule above):
- flip_carry: a flip keeps the accumulator's place instead of zeroing it, a ∓= 2·threshold
  (the accumulator is then a position inside the trit's bin, as a float latent weight is);
- accum_init = "spread": a new optimiser starts every trit accumulator at a uniform integer
  in ±(flip_threshold - 1), as float latent weights start spread inside their bins, so some
  trits move at the first consistent gradient;
- grad_norm = "row" or "factored": G is rescaled per row, or per row × per column, before it
  is quantised (tritnet.nn.ternary.normalized_grad), so rows and columns with small but
  consistent gradients move as fast as loud ones (Adam's per-weight scaling, without state).

After the weight updates, a step applies what the step's training forwards observed:
modules with integer learning rules that are not gradients (VQ usage counts and dead-code
restarts, code-graph edges) implement `apply_observations()`.

What a step did is kept on the device, per module, in `stats` ([trits flipped, exponents
stepped, accumulators at ±127]); `observe()` turns it into shares per group of modules (the
training loop logs it in every metrics row).

Deterministic for a given seed: the stochastic rounding draws counter-based random bits from
(seed, tensor key, step, use), identical on CPU and GPU. Each tensor's update is one kernel
launch for its trits and one for its row scales.

The step and the gain reach the kernels through `clock`, an int64 [step, gain in units of
2**-32] array on the model's device that `step()` advances there (the gain from a table of
the schedule, made on the host): a training step captured as a CUDA graph
(tritnet/capture.py) replays with the right step's random bits and gain, without a
host-to-device copy. (Integers: no float state on any module, docs/design.md#integer-dtypes.)
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from . import backend
from . import rng as trandom
from .nn.module import Module, Observer
from .nn.ternary import GRAD_NORMS, GradQuantizer, TernaryModule
from tritnet_kernels import update as kupdate

ACCUM_INITS = ("zero", "spread")
SPREAD_STREAM = 0x5350   # mixed into the seed of the accumulators' starting spread


def _check_int(name, value, lo, hi):
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ValueError(f"TritFlip: {name} must be an integer in [{lo}, {hi}], got {value!r}")


class TritFlip:
    """Accumulate int8 gradients and flip trits / step scales across thresholds."""

    def __init__(self, modules, *, flip_threshold: int = 64, scale_threshold: int = 64,
                 decay_shift: int = 0, grad_rms_units: int = 8, grad_clip_units: int = 8,
                 seed: int = 0, schedule: str = "constant", final_grad_rms_units: float = 1.0,
                 total_steps: int = 0, flip_carry: bool = False, accum_init: str = "zero",
                 grad_norm: str = "tensor", flip_thresholds: dict | None = None):
        _check_int("flip_threshold", flip_threshold, 1, 127)
        _check_int("scale_threshold", scale_threshold, 1, 127)
        _check_int("decay_shift", decay_shift, 0, 7)
        _check_int("grad_rms_units", grad_rms_units, 1, 127)
        _check_int("grad_clip_units", grad_clip_units, 0, 127)
        _check_int("seed", seed, 0, 2**63 - 1)
        _check_int("total_steps", total_steps, 0, 2**63 - 1)
        if schedule not in ("constant", "cosine"):
            raise ValueError(f"TritFlip: schedule must be 'constant' or 'cosine', got {schedule!r}")
        if schedule == "cosine" and not total_steps:
            raise ValueError("TritFlip: schedule 'cosine' needs total_steps > 0 (the step at "
                             "which the gain reaches final_grad_rms_units)")
        if not (isinstance(final_grad_rms_units, (int, float)) and
                0 < final_grad_rms_units <= grad_rms_units):
            raise ValueError(f"TritFlip: final_grad_rms_units must be in (0, grad_rms_units = "
                             f"{grad_rms_units}], got {final_grad_rms_units!r}")
        if accum_init not in ACCUM_INITS:
            raise ValueError(f"TritFlip: accum_init must be one of {ACCUM_INITS}, got "
                             f"{accum_init!r}")
        if grad_norm not in GRAD_NORMS:
            raise ValueError(f"TritFlip: grad_norm must be one of {GRAD_NORMS}, got "
                             f"{grad_norm!r}")
        self.flip_carry, self.accum_init, self.grad_norm = bool(flip_carry), accum_init, grad_norm
        self.schedule, self.total_steps = schedule, total_steps
        self.final_grad_rms_units = float(final_grad_rms_units)
        if isinstance(modules, Module):
            modules = modules.modules()
        modules = list(modules)
        self.modules = [m for m in modules if isinstance(m, TernaryModule)]
        self.observers = [m for m in modules if isinstance(m, Observer)]
        if not self.modules:
            raise ValueError("TritFlip: no ternary modules to optimise (pass a model or a list "
                             "of modules that contains TernaryLinear or other ternary layers)")
        self.flip_threshold, self.scale_threshold = flip_threshold, scale_threshold
        self.thresholds = self._flip_thresholds(flip_thresholds or {})
        self.decay_shift, self.grad_rms_units, self.seed = decay_shift, grad_rms_units, seed
        self.grad_clip_units = grad_clip_units
        self.step_count = 0
        self._groups = {"all": list(range(len(self.modules)))}
        # how every module quantises its gradients: one object, shared, advanced by the steps
        self.quantizer = GradQuantizer(clip_units=grad_clip_units, norm=grad_norm)
        for key, m in enumerate(self.modules):
            m.grad_seed = trandom.mix_seed(seed, key)
            m.quantizer = self.quantizer
            if accum_init == "spread" and not backend.is_meta(m.T_accum):
                kupdate.spread_accumulators(m.T_accum, trandom.mix_seed(seed, key, SPREAD_STREAM),
                                            self.thresholds[key] - 1)
        like = self.modules[0].T_packed
        self.clock = self._gains = self.stats = None
        if not backend.is_meta(like):
            # per module, what the last step did: [trits flipped, exponents stepped,
            # accumulators at ±127 (dense layers)] (observe() reads it)
            self.stats = backend.get_array_module(like).zeros((len(self.modules), 3), np.int64)
            xp = backend.get_array_module(like)
            # the gain of every step, from the host's formula: the device looks it up
            steps = self.total_steps + 1 if self.schedule == "cosine" else 1
            self._gains = xp.asarray([round(self.gain(s) / kupdate.CLOCK_GAIN_UNIT)
                                      for s in range(steps)], dtype=np.int64)
            self.clock = xp.zeros(2, np.int64)
            self._write_clock()
        self.quantizer.clock = self.clock
        self._begin()

    def gain(self, step: int | None = None) -> float:
        """Accumulator units a one-RMS gradient adds at `step` (default: the current one)."""
        step = self.step_count if step is None else step
        if self.schedule == "constant":
            return float(self.grad_rms_units)
        progress = min(step / self.total_steps, 1.0)
        start, end = float(self.grad_rms_units), self.final_grad_rms_units
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def _begin(self, shard: int = 0):
        """The quantizer's host view of the step and shard (the device's is `clock`)."""
        self.quantizer.advance(self.step_count, shard, self.gain(), self.grad_clip_units)

    def _write_clock(self):
        """clock = [step_count, its gain], copied from the host (at construction and load)."""
        if self.clock is not None:
            index = min(self.step_count, self._gains.shape[0] - 1)
            self.clock[0] = self.step_count
            self.clock[1:2] = self._gains[index:index + 1]

    def _advance_clock(self):
        """clock = [step + 1, its gain], on the device (a captured step replays this too)."""
        xp = backend.get_array_module(self.clock)
        self.clock[0:1] += 1
        self.clock[1:2] = self._gains[xp.minimum(self.clock[0:1], self._gains.shape[0] - 1)]

    def begin_shard(self, shard: int) -> None:
        """The next backward belongs to micro-batch `shard` of this step's global batch: its
        quantisation draws the random bits of that shard (tritnet/distributed.py)."""
        self._begin(shard)

    def step(self) -> list:
        """Apply every pending int8 gradient, then the step's observations; returns
        per-module flip counts (device scalars)."""
        if self.stats is not None:
            self.stats.fill(0)
        flips = []
        for i, m in enumerate(self.modules):
            counts = None if self.stats is None else self.stats[i, :2]
            flips.append(m.apply_update(self.thresholds[i], self.scale_threshold,
                                        self.decay_shift, self.flip_carry, counts))
            if self.stats is not None and not m.sparse:   # a table's step stays sparse
                kupdate.count_saturated(m.T_accum, self.stats[i], 2)
        for m in self.observers:
            m.apply_observations()
        self._advance_clock()
        self.count_step()
        return flips

    def _flip_thresholds(self, overrides: dict) -> list:
        """Each module's flip threshold: `flip_threshold`, or the one `overrides` gives its
        owner ({module or tuple of modules: threshold}; every ternary module inside an owner
        takes the owner's)."""
        thresholds = [self.flip_threshold] * len(self.modules)
        for owner, threshold in overrides.items():
            _check_int("flip_thresholds' threshold", threshold, 1, 127)
            found = self._indices(owner)
            if not found:
                raise ValueError(f"TritFlip: flip_thresholds names {type(owner).__name__}, "
                                 "which holds none of the optimised ternary modules")
            for i in found:
                thresholds[i] = threshold
        return thresholds

    def observe(self, stats=None) -> dict:
        """The optimiser's view of its last step, per group of modules: the share of trits
        flipped (`flip`), of accumulators at saturation (`sat`, counted on dense layers only:
        counting a table's would read all its rows, and a table's step reads only those it
        touched) and of row exponents stepped (`scale`). Groups are `groups` ({name: modules}, e.g. a model's components());
        without them, one group "all". `stats`: a host copy of `self.stats` read earlier
        (so the caller chooses when to sync), else it is read now."""
        if self.stats is None:
            return {}
        stats = backend.to_numpy(self.stats) if stats is None else np.asarray(stats)
        view = {}
        for name, indices in self._groups.items():
            trits = sum(self.modules[i].logical_trits() for i in indices)
            dense = sum(self.modules[i].logical_trits() for i in indices
                        if not self.modules[i].sparse)
            rows = sum(self.modules[i].trit_shape[0] for i in indices)
            flips, steps, saturated = stats[indices].sum(axis=0).tolist()
            shares = [("flip", flips / trits), ("scale", steps / rows)]
            if dense:
                shares.insert(1, ("sat", saturated / dense))
            view[name] = {k: float(f"{v:.4g}") for k, v in shares}
        return view

    def set_groups(self, groups: dict) -> None:
        """Name groups of modules for `observe` ({name: module or modules}); ternary modules
        in no group are left out of the view."""
        self._groups = {}
        for name, owner in groups.items():
            found = self._indices(owner)
            if found:
                self._groups[name] = found

    def _indices(self, owner) -> list:
        """Sorted indices in `modules` of the ternary modules inside `owner` (a module or
        several)."""
        index = {id(m): i for i, m in enumerate(self.modules)}
        members = owner.modules() if isinstance(owner, Module) else owner
        return sorted({index[id(m)] for m in members if id(m) in index})

    def count_step(self) -> None:
        """The host's half of a step: its count, and the quantizer's view of it (the device's
        half advanced the clock). A replayed CUDA graph of step() leaves this to the host
        (tritnet/capture.py)."""
        self.step_count += 1
        self._begin()

    def step_state(self) -> dict:
        """The host state a step changes (tritnet/capture.py puts it back after a failed
        capture): the step count and the quantizer's fields."""
        return {"step_count": self.step_count, "quantizer": dataclasses.replace(self.quantizer)}

    def load_step_state(self, state: dict) -> None:
        self.step_count = state["step_count"]
        vars(self.quantizer).update(vars(state["quantizer"]))   # the modules share this one

    def zero_grad(self) -> None:
        """Drop the step's pending gradients and observations (nothing is applied)."""
        for m in self.modules:
            m.zero_grad()
        for m in self.observers:
            m.clear_observations()

    def state_dict(self) -> dict:
        return {"step": self.step_count, "seed": self.seed, "flip_threshold": self.flip_threshold,
                "scale_threshold": self.scale_threshold, "decay_shift": self.decay_shift,
                "grad_rms_units": self.grad_rms_units, "grad_clip_units": self.grad_clip_units,
                "schedule": self.schedule,
                "final_grad_rms_units": self.final_grad_rms_units,
                "total_steps": self.total_steps, "flip_carry": self.flip_carry,
                "accum_init": self.accum_init, "grad_norm": self.grad_norm}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step"])
        self._write_clock()
        self._begin()
