"""Ternary layers: weights are packed trits with int8 scales, trained through int8 state.

A ternary weight (rows, cols) is W = diag(s) · T with T in {-1, 0, +1} and

    s = f(E) = 2 ** (E / 8),    E an int8 per row,

so one step of E changes a row's scale by 2**(1/8) ≈ 9%, and the int8 range covers
2**-16 … 2**15.9. Neither W nor s is ever stored as float: kernels compute s from E on the fly.

Training state beside the weight: `T_accum` (int8, one per trit) and `E_accum` (int8, one per
row). The op that uses the weight computes the input gradient as usual and hands the weight
gradient straight to integer state (docs/design.md#integer-gradients): G = gyᵀ·x exists only
as a transient inside backward, where it is quantised to int8 (`grad_q`, weight-shaped) and the
scale gradient to int8 (`grad_E_q`, one per row). The optimiser (`tritnet.optim.TritFlip`) consumes
and frees both.

Gradient quantisation: q = stochastic_round(G · grad_rms_units / rms(G)), clipped to
±grad_clip_units when that is set, saturated to ±127. Normalising by the tensor's RMS makes the
update scale-free (like a sign method that keeps magnitudes): a typical entry contributes
`grad_rms_units` to its accumulator per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .. import backend
from .. import rng as trandom
from ..autograd import Function, is_grad_enabled
from .module import Module
from tritnet_kernels import matmul as kmatmul
from tritnet_kernels import float_gemm as kgemm
from tritnet_kernels import packing as kpacking
from tritnet_kernels import sparse_rows as ksparse
from tritnet_kernels import update as kupdate

SCALE_EXPONENT_STEP = 0.125  # s = 2 ** (E * SCALE_EXPONENT_STEP)
DEFAULT_GRAD_RMS_UNITS = 8
DEFAULT_GRAD_CLIP_UNITS = 8   # TritFlip's defaults


def scale_from_exponent(E, dtype=np.float32):
    """s = f(E) = 2 ** (E / 8), as a transient float array (never kept on a module)."""
    xp = backend.get_array_module(E)
    return xp.exp2(E.astype(dtype) * dtype(SCALE_EXPONENT_STEP))


def initial_exponent(fan_in: int, density: float = 2.0 / 3.0) -> int:
    """E that gives unit output RMS for unit-RMS inputs: s² · density · fan_in = 1."""
    e = round(math.log2(1.0 / math.sqrt(density * fan_in)) / SCALE_EXPONENT_STEP)
    return int(min(max(e, -128), 127))


def _reference_product(fn, a, layer):
    """float64 is the gradient checks' precision: the NumPy reference (a transient widened
    weight inside this call) gives exact float64 products. Never a hot path."""
    host = [backend.to_numpy(v) for v in (a, layer.T_packed, layer.E)]
    return backend.get_array_module(a).asarray(fn(*host, layer.in_features))


def _forward_product(x, layer):
    if x.dtype == np.float64:
        return _reference_product(kmatmul.ternary_matmul_reference, x, layer)
    return kmatmul.ternary_matmul(x, layer.T_packed, layer.E, layer.in_features)


def _backward_product(gy, layer):
    if gy.dtype == np.float64:
        return _reference_product(kmatmul.ternary_matmul_t_reference, gy, layer)
    return kmatmul.ternary_matmul_t(gy, layer.T_packed, layer.E, layer.in_features)


class TernaryMatmul(Function):
    """y = x · (diag(s)·T)ᵀ over the last axis of x; the weight's gradient goes to int8 state."""

    def forward(self, x, *, layer):
        cols = layer.in_features
        if x.shape[-1] != cols:
            raise ValueError(f"TernaryLinear({layer.in_features}, {layer.out_features}): input has "
                             f"shape {tuple(x.shape)}, expected (..., {cols})")
        xp = backend.get_array_module(x)
        self.layer, self.x_shape = layer, x.shape
        x2 = xp.ascontiguousarray(x.reshape(-1, cols))
        y = _forward_product(x2, layer)
        self.updates_state = layer.training and is_grad_enabled()
        if self.updates_state:
            self.x2 = x2  # the activation lives on the tape (freed after backward), not on the layer
        return y.reshape(*x.shape[:-1], layer.out_features)

    def backward(self, gy):
        layer = self.layer
        xp = backend.get_array_module(gy)
        gy2 = xp.ascontiguousarray(gy.reshape(-1, layer.out_features))
        gx = None
        if self.needs_input_grad[0]:
            gx = _backward_product(gy2, layer)
            gx = gx.reshape(self.x_shape)
        if self.updates_state:
            layer.accumulate_weight_grad(gy2, self.x2)
        return gx


class ExpertMatmul(Function):
    """Each tile of rows times its own expert's weight: row i of the tiled input is x[rows[i]]
    (or x[i] without `rows`), and rows t·T … t·T + T - 1 go through layer tile_expert[t] of
    `layers` (E TernaryLinear of one shape): y_t = x_t · W_eᵀ, y (n_tiles·T, out).
    tile_expert (n_tiles,) and rows stay on the device: the routing that made them is never
    read by the host (a grouped product, `gemm.matmul_gathered`), so the step keeps its shapes
    and captures as a CUDA graph. With `rows` the op keeps x itself for backward, not the
    tiled copy (x is the normalised residual stream that the router keeps anyway), and
    gathers again there; x's gradient sums the rows' gradients.

    Forward and backward widen the E weights into one transient (E, out, in) stack. A layer's
    weight gradient G_e = Σ over e's tiles of gy_tᵀ·x_t is each tile's product (a transient,
    at most 8·E tiles at a time) summed by a product with the tiles' one-hot experts, then
    goes to the layer's int8 state as in TernaryMatmul. Padding rows (a tile's rows past its
    expert's last entry) must get zero output gradient: then they add nothing to G.
    """

    def forward(self, x, *, layers, tile_expert, tile, rows=None):
        first = layers[0]
        out_f, in_f = first.out_features, first.in_features
        if any((m.out_features, m.in_features) != (out_f, in_f) for m in layers):
            raise ValueError("ExpertMatmul: layers of different shapes "
                             f"{sorted({(m.in_features, m.out_features) for m in layers})}; "
                             "expected one (in, out) for all")
        n_tiles = tile_expert.shape[0]
        n_rows = n_tiles * tile
        if x.ndim != 2 or x.shape[1] != in_f or (rows is None and x.shape[0] != n_rows):
            raise ValueError(f"ExpertMatmul: input has shape {tuple(x.shape)}, expected "
                             f"({n_rows if rows is None else 'N'}, {in_f}): {n_tiles} tiles of "
                             f"{tile} rows")
        if rows is not None and rows.shape != (n_rows,):
            raise ValueError(f"ExpertMatmul: rows has shape {tuple(rows.shape)}, expected "
                             f"({n_rows},): one input row for each of {n_tiles} tiles of {tile}")
        xp = backend.get_array_module(x)
        self.layers, self.tile_expert, self.tile, self.rows = layers, tile_expert, tile, rows
        self.x_rows = x.shape[0]
        self.tiles = xp.arange(n_tiles)
        x = xp.ascontiguousarray(x)
        W = self._weights(x.dtype, xp)
        y = kgemm.matmul_gathered(self._tiled(x), W.transpose(0, 2, 1), self.tiles, tile_expert)
        del W  # the widened weights live only inside this call (docs/design.md#no-float-weights)
        self.updates_state = first.training and is_grad_enabled()
        if self.updates_state:
            self.x = x
        return y.reshape(n_rows, out_f)

    def backward(self, gy):
        layers, tile = self.layers, self.tile
        E, out_f, in_f = len(layers), layers[0].out_features, layers[0].in_features
        xp = backend.get_array_module(gy)
        n_tiles = self.tiles.shape[0]
        gy3 = xp.ascontiguousarray(gy).reshape(n_tiles, tile, out_f)
        gx = None
        if self.needs_input_grad[0]:
            W = self._weights(gy.dtype, xp)
            gx = kgemm.matmul_gathered(gy3, W, self.tiles, self.tile_expert)
            del W
            gx = gx.reshape(n_tiles * tile, in_f)
            if self.rows is not None:
                tiled, gx = gx, xp.zeros((self.x_rows, in_f), gy.dtype)
                backend.scatter_add(gx, self.rows, tiled)
        if self.updates_state:
            x3 = self._tiled(self.x)
            owner = (self.tile_expert[None, :] == xp.arange(E)[:, None]).astype(gy.dtype)
            G = xp.empty((E, out_f * in_f), gy.dtype)
            # chunks of at most 8·E tiles: the per-tile products stay a bounded transient, and
            # adding each chunk into G costs at most a quarter of reading the products
            step = 8 * E
            for t0 in range(0, n_tiles, step):
                t = self.tiles[t0:t0 + step]
                per_tile = kgemm.matmul_gathered(gy3.transpose(0, 2, 1), x3, t, t)
                kgemm.matmul(owner[:, t0:t0 + step], per_tile.reshape(t.shape[0], -1), out=G,
                             accumulate=t0 > 0)
                del per_tile
            G = G.reshape(E, out_f, in_f)
            for e, layer in enumerate(layers):
                layer.accumulate_grad(G[e])
        return gx

    def _tiled(self, x):
        """The (n_tiles, T, in) tiled input: x itself, or its rows gathered."""
        if self.rows is not None:
            x = x[self.rows]
        return x.reshape(self.tiles.shape[0], self.tile, x.shape[-1])

    def _weights(self, dtype, xp):
        first = self.layers[0]
        W = xp.empty((len(self.layers), first.out_features, first.in_features), dtype)
        for layer, w in zip(self.layers, W):
            kmatmul.widen(layer.T_packed, layer.E, layer.in_features, w)
        return W


def expert_matmul(x, layers, tile_expert, tile: int, rows=None):
    """y (R, out), R = len(tile_expert)·tile: each tile of `tile` rows times its expert's
    weight (ExpertMatmul). The tiled input is x (R, in), or x[rows] for an int array `rows`
    (R,) (then x is (N, in) and keeps its own shape in backward); both index arrays on x's
    device."""
    return ExpertMatmul.apply(x, layers=list(layers), tile_expert=tile_expert, tile=tile,
                              rows=rows)


GRAD_NORMS = ("tensor", "row", "factored")
_NORM_FLOOR = np.float32(1e-3)   # a row or column's mean square counts as at least this share
                                 # of the mean: quiet rows are raised at most ~32x


def normalized_grad(G, mode: str):
    """G (rows, cols) rescaled so every entry has unit expected square under a per-row
    ("row") or a per-row-times-per-column ("factored", as Adafactor factors Adam's second
    moment) model of its magnitude: G_ij / sqrt(R_i / cols), or G_ij · sqrt(S / (R_i C_j)),
    with R, C the row and column sums of squares and S their total. A transient float
    array, made and dropped inside backward; the rows and columns that carry small but
    consistent gradients then move their trits as fast as the loud ones (Adam's behaviour,
    without its state). All-zero rows (a table's padding) stay zero."""
    xp = backend.get_array_module(G)
    sq = G * G
    R = sq.sum(axis=1, keepdims=True)
    if mode == "row":
        mean = R.mean()
        R = xp.maximum(R, _NORM_FLOOR * mean)
        return G * (xp.sqrt(np.float32(G.shape[1])) / xp.sqrt(xp.maximum(R, np.float32(1e-30))))
    C = sq.sum(axis=0, keepdims=True)
    del sq
    total = R.sum()
    R = xp.maximum(R, _NORM_FLOOR * R.mean())
    C = xp.maximum(C, _NORM_FLOOR * C.mean())
    scale = xp.sqrt(xp.maximum(total, np.float32(1e-30)))
    return G * (scale / xp.sqrt(xp.maximum(R, np.float32(1e-30)))) / xp.sqrt(
        xp.maximum(C, np.float32(1e-30)))


@dataclass
class GradQuantizer:
    """How this step's weight gradients become int8: one object that an optimiser (TritFlip)
    owns, advances and shares with every ternary module it drives; a module on its own has
    one of its own, with the defaults.

    `epoch` moves whenever `step` or `shard` does: a module counts its quantisations within
    one epoch (TernaryModule.grad_uses), so that each draws fresh random bits.
    """

    rms_units: float = DEFAULT_GRAD_RMS_UNITS   # int8 units a one-RMS entry adds (the gain)
    clip_units: int = DEFAULT_GRAD_CLIP_UNITS   # the most one quantisation adds; 0: no clip
    norm: str = "tensor"   # how G is normalised before quantisation (GRAD_NORMS)
    step: int = 0          # the optimiser's step
    shard: int = 0         # the micro-batch of the step's global batch (distributed.py)
    clock: object = None   # the optimiser's int64 [step, gain] on the device (TritFlip.clock)
    epoch: int = 0

    def advance(self, step: int, shard: int, rms_units: float, clip_units: int) -> None:
        self.step, self.shard, self.rms_units, self.clip_units = step, shard, rms_units, \
            clip_units
        self.epoch += 1


class TernaryModule(Module):
    """Base of modules with ternary weights: the surface the optimiser, the distributed
    reducer and the CUDA graph capture use.

    A subclass holds one ternary matrix made by `_init_ternary_state` — buffers T_packed
    (uint32 bitplanes), E, T_accum, E_accum — and implements `apply_update(flip_threshold,
    scale_threshold, decay_shift)` and `zero_grad()`. Its backward leaves the step's int8
    gradients on the module: a dense module (`sparse = False`) in `grad_q` (weight-shaped) and
    `grad_E_q` (one per row), a table (`sparse = True`) in `pending`, a list of (rows, grad_q,
    grad_E_q) per use. `quantizer` says how gradients are quantised (shared with the
    optimiser); `grad_seed` is this module's own random stream.
    """

    sparse = False   # a step updates every row (tables: only the rows a step touched)
    step_attributes = ("grad_uses", "grad_epoch")

    def __init__(self):
        super().__init__()
        self.quantizer = GradQuantizer()
        self.grad_seed = int(trandom.generator().integers(0, 2**63))
        self.grad_uses = 0    # quantisations in the quantizer's epoch `grad_epoch`
        self.grad_epoch = 0

    def _init_ternary_state(self, rows: int, cols: int, exponent: int, device: str | None):
        """Packed-first initial state: uniform random trits (2/3 nonzero) written straight
        into the packed words by a kernel, E = exponent, zero accumulators
        (docs/design.md#packed-first).
        On the "meta" device only shapes and dtypes are recorded (the constructor trace)."""
        self.trit_shape = (rows, cols)
        T_packed = backend.empty((rows, 2 * kpacking.n_groups(cols)), np.uint32, device)
        E = backend.empty(rows, np.int8, device)
        if not backend.is_meta(T_packed):
            seed = int(trandom.generator().integers(0, 2**63))
            ksparse.random_table(T_packed, cols, seed, E=E, exponent=exponent)
        self.register_buffer("T_packed", T_packed)
        self.register_buffer("E", E)
        # zeros() maps zero pages lazily (calloc): building never holds a second copy.
        self.register_buffer("T_accum", backend.zeros((rows, cols), np.int8, device))
        self.register_buffer("E_accum", backend.zeros(rows, np.int8, device))

    def logical_trits(self) -> int:
        """The number of trits this module's ternary matrix holds (rows × cols)."""
        rows, cols = self.trit_shape
        return rows * cols

    def packed_trits(self) -> dict:
        """{buffer name: cols} of each bitplane32 trit buffer. Checkpoints store these as
        base3-5 (1.6 bits per trit) and check every trit code when loading."""
        return {"T_packed": self.trit_shape[1]}

    def _uses(self) -> int:
        """Quantisations so far in the quantizer's epoch (none after it moved on)."""
        return self.grad_uses if self.grad_epoch == self.quantizer.epoch else 0

    def next_grad_seed(self, which: int) -> int:
        """The seed of the next quantisation's random bits. With an optimiser's clock the step
        is not in it: the kernels mix in the clock's step on the device."""
        q = self.quantizer
        if q.clock is not None:
            return trandom.mix_seed(self.grad_seed, q.shard, self._uses(), which)
        return trandom.mix_seed(self.grad_seed, q.step, q.shard, self._uses(), which)

    def quantize_grads(self, G, T_packed, E, grad_q=None, grad_E_q=None, rows=None):
        """The int8 gradients of trits and row exponents from G = dL/dW (float32, rows of
        T_packed / E): added into grad_q / grad_E_q (allocated when None) and returned.

        Each is stochastic_round(g · rms_units / rms(g)), clipped to ±clip_units (quantizer)
        (0: not clipped); with `rows` (int64 (1,) on the device: u), the rms is over G's first
        u rows, the rest being zero padding (a table's touched rows, padded to a fixed
        count). The scale stays on G's device (no host sync). A gradient that is all
        zero or holds NaN/inf gets scale 0 and so changes nothing; the training loop stops on
        a non-finite loss first.
        """
        xp = backend.get_array_module(G)
        q = self.quantizer
        clip, clock = q.clip_units or 128, q.clock
        # dL/dE_r = dL/ds_r · ds_r/dE_r = (Σ_j G_rj T_rj) · s_r · ln2/8, and both scales, in
        # one pass over G
        inv_scales, grad_E = kupdate.exponent_grad_and_scales(
            G, T_packed, E, self.trit_shape[1], q.rms_units, rows=rows, clock=clock)
        if q.norm != "tensor":
            G, inv_scales = normalized_grad(G, q.norm), inv_scales.copy()
            inv_scales[:1] = self._gain(xp)

        def quantize(g, inv_scale, out, which):
            first = out is None  # a fresh buffer is written, not added to: no zero fill
            if first:
                out = xp.empty(g.shape, dtype=np.int8)
            return kupdate.quantize_grad(g, inv_scale, self.next_grad_seed(which), out,
                                         clip=clip, accumulate=not first, clock=clock)

        grad_q = quantize(G, inv_scales[:1], grad_q, 0)
        grad_E_q = quantize(grad_E, inv_scales[1:], grad_E_q, 1)
        self.grad_uses, self.grad_epoch = self._uses() + 1, q.epoch
        return grad_q, grad_E_q

    def _gain(self, xp):
        """The gain as a float32 (1,) array on the device: the clock's, else the host's."""
        q = self.quantizer
        if q.clock is not None:
            return q.clock[1:2].astype(np.float32) * np.float32(kupdate.CLOCK_GAIN_UNIT)
        return xp.full(1, q.rms_units, np.float32)

    def apply_update(self, flip_threshold: int, scale_threshold: int, decay_shift: int,
                     flip_carry: bool = False, counts=None):
        raise NotImplementedError


class TernaryLinear(TernaryModule):
    """y = x · Wᵀ with W = diag(2 ** (E / 8)) · T, T in {-1, 0, +1}; no bias.

    Buffers: T_packed uint32 (out_features, 2·ceil(in_features/32)) — the bitplane32 layout of
    tritnet_kernels.packing; E int8 (out_features,); T_accum int8 (out_features, in_features);
    E_accum int8 (out_features,). After backward, `grad_q` int8 (out, in) and `grad_E_q` int8
    (out,) hold this step's quantised gradients until the optimiser consumes them.

    Initialisation: uniform random trits (2/3 nonzero) and E = round(8·log2(1/√(2/3·in))), so a
    unit-RMS input gives a unit-RMS output, like Kaiming/Xavier scaling — without any float
    array on the module. Ternary layers carry no bias: a bias would be a float parameter, and
    the RMS-normalised networks we build do not need one.
    """

    step_attributes = TernaryModule.step_attributes + ("grad_q", "grad_E_q")

    def __init__(self, in_features: int, out_features: int, device: str | None = None):
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"TernaryLinear: {name} must be a positive integer, got {v!r}")
        self.in_features, self.out_features = int(in_features), int(out_features)
        self._init_ternary_state(self.out_features, self.in_features,
                                 initial_exponent(self.in_features), device)
        self.grad_q = None
        self.grad_E_q = None

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"

    def forward(self, x):
        return TernaryMatmul.apply(x, layer=self)

    def trits(self):
        """T as int8 (out, in): a decoded copy for inspection and tests."""
        return kpacking.unpack_trits(self.T_packed, self.in_features)

    def weight(self, dtype=np.float32):
        """diag(s)·T as a transient float array: for inspection and tests only, never stored."""
        return scale_from_exponent(self.E, dtype)[:, None] * self.trits().astype(dtype)

    # --- the integer gradient path --------------------------------------------------------
    def accumulate_weight_grad(self, gy, x) -> None:
        """Quantise G = gyᵀ·x (transient float) into grad_q, and dL/dE into grad_E_q."""
        self.accumulate_grad(kgemm.matmul(gy.T, x))

    def accumulate_grad(self, G) -> None:
        """Quantise the weight's gradient G = dL/dW (out, in; a transient float) into grad_q,
        and dL/dE into grad_E_q."""
        xp = backend.get_array_module(G)
        if G.dtype != np.float32:  # the kernels' working precision; float64 only in checks
            G = G.astype(np.float32)
        G = xp.ascontiguousarray(G)
        self.grad_q, self.grad_E_q = self.quantize_grads(G, self.T_packed, self.E, self.grad_q,
                                                         self.grad_E_q)

    def apply_update(self, flip_threshold: int, scale_threshold: int, decay_shift: int,
                     flip_carry: bool = False, counts=None):
        """Consume grad_q / grad_E_q: accumulate, flip trits and step E across thresholds.
        Returns int64 (2,) [trits flipped, exponents stepped], added into `counts` when given
        (None when there was no gradient and no `counts`)."""
        if self.grad_q is None:
            return counts
        counts = kupdate.ternary_update(
            self.T_packed, self.T_accum, self.grad_q, self.E, self.E_accum, self.grad_E_q,
            self.in_features, flip_threshold=flip_threshold, flip_decay_shift=decay_shift,
            scale_threshold=scale_threshold, scale_decay_shift=decay_shift,
            flip_carry=flip_carry, zero_grad=False, counts=counts)  # the buffers are dropped right after: no need to clear them
        self.grad_q = self.grad_E_q = None
        return counts

    def zero_grad(self) -> None:
        self.grad_q = self.grad_E_q = None
