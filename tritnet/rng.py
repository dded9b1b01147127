"""The framework's seeded randomness: one host generator for initialisation, and a pure
counter-based seed mixer for the kernels' stochastic rounding (same bits on CPU and GPU)."""

from __future__ import annotations

import numpy as np

_generator = np.random.default_rng(0)
_MASK = (1 << 64) - 1


def manual_seed(seed: int) -> None:
    """Seed the generator that initialises modules (trits, scales) and training data order."""
    global _generator
    _generator = np.random.default_rng(seed)


def generator() -> np.random.Generator:
    return _generator


def get_state() -> dict:
    return _generator.bit_generator.state


def set_state(state: dict) -> None:
    _generator.bit_generator.state = state


def splitmix64(x: int) -> int:
    """One splitmix64 round: a well-mixed 64-bit value from any 64-bit counter."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def mix_seed(*parts: int) -> int:
    """A 64-bit seed from several integers (run seed, step, tensor key, ...), order-sensitive."""
    h = 0
    for p in parts:
        h = splitmix64(h ^ (int(p) & _MASK))
    return h
