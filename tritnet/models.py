"""CodeMemoryLM: a byte-level ternary language model with a huge ternary code memory.

In the family of large sparse memory layers (docs/model.md):

    x      = embed[token]                              TernaryEmbeddingTable(vocab, d)
    block: x += Attention(rms_norm(x))                 ternary q, k, v, o; causal, ALiBi
           x += MoEGraph(rms_norm(x), memory)          routed ternary experts + code memory
    m      = motif(rms_norm(x))                        TernaryLinear d -> CODEBOOK_DIM
    q, c   = shared_vq(m)                              nearest of SHARED_VQ_SIZE ternary codes
    r      = kgvq(q_prev, q)                           relation code of consecutive codes
    logits = head(x, q, r, graph(c))                   dense LM head + code/relation/graph reads

Every weight is ternary with int8 state; every component either receives gradient (the
ternary layers and tables, through the int8 path) or has an integer learning rule (the code
graph's edges, from observed code transitions). Attention positions come from ALiBi, a fixed
per-head bias -slope·distance on the scores, computed on the fly: no position table, nothing
learned, no float state (or, with position = "nope", from the causal mask alone).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from . import backend
from . import functional as F
from .autograd import Tensor, is_grad_enabled, no_grad, recompute
from .config import ModelConfig, RunConfig
from .errors import TritnetError
from .nn import Module, ModuleList
from .nn.module import Observer
from .nn.tables import KGVQCodebook, TernaryEmbeddingTable, TernaryVQCodebook
from .nn.ternary import TernaryLinear, TernaryModule, expert_matmul
from tritnet_kernels import code_graph as kgraph
from tritnet_kernels import float_gemm as kgemm
from tritnet_kernels import sparse_rows as ksparse


class Attention(Module):
    """Causal multi-head attention with ternary q, k, v, o. Positions: none ("nope": the
    causal mask alone tells order) or ALiBi ("alibi": a fixed per-head recency bias on the
    scores, computed on the fly; no table, nothing learned)."""

    def __init__(self, d_model: int, n_heads: int, device=None, position: str = "alibi"):
        super().__init__()
        if position not in ("alibi", "nope"):
            raise ValueError(f"Attention: position must be 'alibi' or 'nope', got {position!r}")
        self.n_heads, self.position = n_heads, position
        self.q = TernaryLinear(d_model, d_model, device)
        self.k = TernaryLinear(d_model, d_model, device)
        self.v = TernaryLinear(d_model, d_model, device)
        self.o = TernaryLinear(d_model, d_model, device)

    def forward(self, x: Tensor) -> Tensor:
        B, T, d = x.shape
        h = self.n_heads

        def heads(t):
            return t.reshape(B, T, h, d // h).transpose(0, 2, 1, 3)

        slopes = F.alibi_slopes(h) if self.position == "alibi" else None
        y = F.scaled_dot_product_attention(heads(self.q(x)), heads(self.k(x)), heads(self.v(x)),
                                           causal=True, alibi_slopes=slopes)
        return self.o(y.transpose(0, 2, 1, 3).reshape(B, T, d))

    def decode(self, x: Tensor, keys, values, start: int) -> Tensor:
        """forward's output for x (B, T, d), the tokens at positions start … start+T-1 of a
        stream whose earlier keys and values are in keys / values[:, :, :start] (B, h, capacity,
        d/h arrays, a KVCache's): this call writes its own there and attends to all of them.
        The mask and the ALiBi bias are bottom-right aligned (scaled_dot_product_attention), so
        query i sits at position start + i, as it does in forward over the whole window."""
        B, T, d = x.shape
        h = self.n_heads

        def heads(t):
            return t.reshape(B, T, h, d // h).transpose(0, 2, 1, 3)

        end = start + T
        keys[:, :, start:end] = heads(self.k(x)).data
        values[:, :, start:end] = heads(self.v(x)).data
        slopes = F.alibi_slopes(h) if self.position == "alibi" else None
        y = F.scaled_dot_product_attention(heads(self.q(x)), Tensor(keys[:, :, :end]),
                                           Tensor(values[:, :, :end]), causal=True,
                                           alibi_slopes=slopes)
        return self.o(y.transpose(0, 2, 1, 3).reshape(B, T, d))

    def decode_at(self, x: Tensor, keys, values, position) -> Tensor:
        """decode's output for one token per stream, x (B, 1, d), at the position a device
        array holds (int64 (1,): the tokens before it): its key and value are written there
        and it attends to every cached position, the later ones masked. The arrays touched
        and their shapes are the same at every position, and nothing is read on the host, so
        the step can be captured as a CUDA graph and replayed token after token."""
        B, T, d = x.shape
        h = self.n_heads
        xp = backend.get_array_module(x.data)

        def heads(t):
            return t.data.reshape(B, T, h, d // h).transpose(0, 2, 1, 3)

        keys[:, :, position] = heads(self.k(x))
        values[:, :, position] = heads(self.v(x))
        q = xp.ascontiguousarray(heads(self.q(x)))
        scores = kgemm.matmul(q, xp.swapaxes(keys, -1, -2)) * (1.0 / math.sqrt(d // h))
        behind = position - xp.arange(keys.shape[2])          # (capacity,): pos - j
        if self.position == "alibi":
            slopes = F.device_slopes(xp, F.alibi_slopes(h), (h,), scores.dtype)
            scores = scores - slopes[:, None, None] * behind.astype(scores.dtype)
        scores = xp.where(behind >= 0, scores, -xp.inf)
        scores = xp.exp(scores - scores.max(axis=-1, keepdims=True))
        y = kgemm.matmul(scores / scores.sum(axis=-1, keepdims=True), values)
        return self.o(Tensor(y.transpose(0, 2, 1, 3).reshape(B, T, d)))


class Expert(Module):
    """A ternary feed-forward expert: down(silu(up(x)))."""

    def __init__(self, d_model: int, hidden: int, device=None):
        super().__init__()
        self.up = TernaryLinear(d_model, hidden, device)
        self.down = TernaryLinear(hidden, d_model, device)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.silu(self.up(x)))


class CodeGraph(Module, Observer):
    """Edges between codes of the shared memory, learned online from code transitions.

    Small books keep dense edges: every code owns `slots` out-edges, exposed as `edge_index`
    (int32 (2, K·slots)) and `edge_score` / `edge_attr` (int8). Large books (capacity > 0)
    keep a bounded active edge set in a hashed table of `capacity` slots — `active_edge_src`,
    `active_edge_dst` (int32), `active_edge_attr` (int8 ternary sign), `active_edge_score`
    (int8 residual score) — and an empty `edge_index` of shape (2, 0). The admission and
    eviction rule, and the hash, are in tritnet_kernels/code_graph.py; no float state either way.

    A training forward only `record`s its transitions; the optimiser's step applies them
    (`apply_observations`, in the order recorded), so a forward never reads edges learned
    from its own batch — the transition t -> t+1 would tell position t its next token.
    """

    step_attributes = ("observed",)

    def __init__(self, codebook_size: int, slots: int, capacity: int = 0, device=None):
        super().__init__()
        self.codebook_size, self.slots = codebook_size, slots
        self.dense = capacity == 0
        self.n_buckets = codebook_size if self.dense else capacity // slots
        n = self.n_buckets * slots
        src = backend.zeros(n, np.int32, device)
        dst = backend.empty(n, np.int32, device)
        if not backend.is_meta(dst):
            dst.fill(-1)  # -1: an empty slot
        attr, score = backend.zeros(n, np.int8, device), backend.zeros(n, np.int8, device)
        if self.dense:
            index = backend.empty((2, n), np.int32, device)
            if not backend.is_meta(index):
                index[0], index[1] = src, dst
            self.register_buffer("edge_index", index)
            self.register_buffer("edge_attr", attr)
            self.register_buffer("edge_score", score)
        else:
            self.register_buffer("edge_index", backend.zeros((2, 0), np.int32, device))
            self.register_buffer("active_edge_src", src)
            self.register_buffer("active_edge_dst", dst)
            self.register_buffer("active_edge_attr", attr)
            self.register_buffer("active_edge_score", score)
        self.observed = []   # this step's (src codes, dst codes, signs), in order

    def value_ranges(self) -> dict:
        """The values each edge buffer may hold (a checkpoint's loader checks them): codes
        within the code book or -1 (an empty slot), ternary signs, scores 0..SCORE_MAX."""
        codes, signs, scores = (-1, self.codebook_size - 1), (-1, 1), (0, kgraph.SCORE_MAX)
        if self.dense:
            return {"edge_index": codes, "edge_attr": signs, "edge_score": scores}
        return {"edge_index": codes, "active_edge_src": codes, "active_edge_dst": codes,
                "active_edge_attr": signs, "active_edge_score": scores}

    def edges(self):
        """(src, dst, attr, score) arrays of the edge table, in either mode."""
        if self.dense:
            return self.edge_index[0], self.edge_index[1], self.edge_attr, self.edge_score
        return (self.active_edge_src, self.active_edge_dst, self.active_edge_attr,
                self.active_edge_score)

    def neighbors(self, codes, *, check=True):
        """(dst int32 (n, slots), weight float32 (n, slots)) of each code's out-edges.
        check=False skips the range check of codes (a host sync on the GPU): for codes the
        code book's own search returned."""
        src, dst, attr, score = self.edges()
        return kgraph.edge_neighbors(src, dst, attr, score, codes, self.n_buckets, self.slots,
                                     self.codebook_size, check=check)

    def observe(self, codes, signs) -> None:
        """Learn now from transitions codes[:, t] -> codes[:, t+1] with ternary signs (B, T-1)."""
        self._learn(*self._transitions(codes, signs))

    def record(self, codes, signs, *, check=True) -> None:
        """Keep the transitions for the step's `apply_observations` (training forwards).
        check=False: codes from the code book's search and signs from xp.sign, trusted, so
        applying them skips observe_edges' range checks (three host syncs on the GPU)."""
        self.observed.append(self._transitions(codes, signs) + (check,))

    def apply_observations(self) -> None:
        if self.observed:
            parts = list(zip(*self.observed))
            self._learn(*(backend.concatenate(p) for p in parts[:3]), check=any(parts[3]))
            self.observed = []

    def clear_observations(self) -> None:
        self.observed = []

    def observation_columns(self) -> list:
        """Transitions: source codes, destination codes, signs."""
        return [[(np.int32, ()), (np.int32, ()), (np.int8, ())]]

    def take_observations(self) -> list:
        xp = backend.get_array_module(self.edges()[0])
        if self.observed:
            return [tuple(xp.concatenate(parts) for parts in list(zip(*self.observed))[:3])]
        return [(xp.zeros(0, np.int32), xp.zeros(0, np.int32), xp.zeros(0, np.int8))]

    def put_observations(self, groups: list) -> None:
        # every rank records through the same code, so this rank's check flag (see record)
        # holds for every rank's transitions too
        check = any(o[3] for o in self.observed)
        (a, b, s), = groups
        self.observed = [(a, b, s, check)] if a.shape[0] else []

    @staticmethod
    def _transitions(codes, signs):
        xp = backend.get_array_module(codes)
        return (xp.ascontiguousarray(codes[:, :-1].reshape(-1)),
                xp.ascontiguousarray(codes[:, 1:].reshape(-1)),
                xp.ascontiguousarray(signs.reshape(-1)).astype(np.int8))

    def _learn(self, a, b, signs, check=True) -> None:
        src, dst, attr, score = self.edges()
        kgraph.observe_edges(src, dst, attr, score, a, b, signs, self.n_buckets, self.slots,
                             self.codebook_size, check=check)


class MoEGraph(Module):
    """Routed ternary experts over a ternary code memory, with one hop along code edges.

    Each token is routed by its similarity to the ternary routing centroids (a
    TernaryEmbeddingTable of n_experts rows) to its top_k experts, weighted by the softmax of
    the routing scores renormalised over the chosen k; a load-balancing term
    n_experts · Σ_e f_e · P_e (f_e: share of tokens whose first choice is e, P_e: mean routing
    probability of e) keeps the experts used evenly. The token also reads the code memory:
    its projection to the code width picks the nearest code (straight-through), whose
    out-edges in the code graph add their codes weighted by sign · score / 127 (one hop);
    the sum returns to the model width through a ternary readout.
    """

    def __init__(self, d_model: int, codebook_size: int, *, n_experts: int, expert_hidden: int,
                 top_k: int, code_dim: int, slots: int, capacity: int = 0,
                 expert_capacity: float = 0.0, device=None):
        super().__init__()
        self.n_experts, self.top_k, self.expert_capacity = n_experts, top_k, expert_capacity
        self.router = TernaryEmbeddingTable(n_experts, d_model, device)
        self.experts = ModuleList([Expert(d_model, expert_hidden, device)
                                   for _ in range(n_experts)])
        self.code_in = TernaryLinear(d_model, code_dim, device)
        self.code_out = TernaryLinear(code_dim, d_model, device)
        self.graph = CodeGraph(codebook_size, slots, capacity, device)
        self.use_edges = True

    def route(self, h: Tensor):
        """(expert ids (N, k) int, gates Tensor (N, k), load-balancing loss)."""
        xp = backend.get_array_module(h.data)
        centroids = self.router(xp.arange(self.n_experts), check=False, increasing=True)
        probs = F.softmax(h @ centroids.T * (1.0 / math.sqrt(h.shape[-1])), axis=-1)
        choice = top_k(probs.data, self.top_k)  # on the data: no gradient through the choice
        N, E = probs.shape
        # the chosen probabilities, by flat indices in range by construction (no host sync)
        chosen = F.take(probs.reshape(-1), (xp.arange(N)[:, None] * E + choice).reshape(-1),
                        check=False).reshape(N, self.top_k)
        gates = chosen / chosen.sum(axis=-1, keepdims=True)
        first = (choice[:, :1] == xp.arange(self.n_experts)).sum(axis=0).astype(probs.dtype)
        share = Tensor(first / h.shape[0])
        balance = (share * probs.mean(axis=0)).sum() * float(self.n_experts)
        return choice, gates, balance

    def experts_forward(self, h: Tensor, choice, gates: Tensor) -> Tensor:
        """Run each expert once on the tokens routed to it; combine with the gates.

        The routed entries are laid out expert by expert on tiles of EXPERT_TILE rows
        (`expert_tiles`), and each tile goes through its own expert's weights in one grouped
        product (`nn.ternary.expert_matmul`). The tile count is fixed by the shapes, whatever
        the routing: no host sync, and a step a CUDA graph can capture. Rows of a tile past
        its expert's last entry are padding that reads token 0 and whose outputs nobody
        reads, so they get no gradient. By default every entry runs; with expert_capacity
        c > 0 an expert takes C = min(N, ceil(c · N·top_k / n_experts)) entries and the rest,
        in token order, are dropped: their term of the sum is 0.
        """
        N, k = choice.shape
        E = self.n_experts
        C = N if not self.expert_capacity else min(N, math.ceil(
            self.expert_capacity * N * k / E))
        row, row_token, tile_expert = expert_tiles(choice.reshape(-1), E, k, EXPERT_TILE, C)
        hidden = expert_matmul(h, [ex.up for ex in self.experts], tile_expert, EXPERT_TILE,
                               rows=row_token)
        outs = expert_matmul(F.silu(hidden), [ex.down for ex in self.experts], tile_expert,
                             EXPERT_TILE)
        if C < N:   # dropped entries read a zero row after the tiles' rows
            zero = backend.get_array_module(h.data).zeros((1, h.shape[-1]), h.dtype)
            outs = F.concat([outs, Tensor(zero)], axis=0)
        ys = F.take(outs, row, check=False).reshape(N, k, h.shape[-1])
        return (ys * gates.reshape(N, k, 1)).sum(axis=1)

    def forward(self, x: Tensor, memory: TernaryVQCodebook | None, values=None):
        B, T, d = x.shape
        h = x.reshape(B * T, d)
        choice, gates, aux = self.route(h)
        out = self.experts_forward(h, choice, gates)
        if memory is not None:
            added, read = self.read_memory(h, memory, values)
            aux = aux + read.loss
            if self.use_edges and self.training and is_grad_enabled():
                self.learn_edges(read.quantized, read.indices, B, T)
            out = out + added
        return out.reshape(B, T, d), aux

    def read_memory(self, h: Tensor, memory: TernaryVQCodebook, values=None):
        """(what the code memory adds to h (N, d), the VQ read): the chosen code, plus its
        value row when the model has memory values, plus one hop along its edges, back to the
        model width through code_out."""
        read = memory(self.code_in(h))
        g = read.quantized
        if values is not None:   # what the chosen code has learned to add
            g = g + values(read.indices, check=False)
        if self.use_edges:
            g = g + self.expand(values if values is not None else memory, read.indices,
                                check=False)
        return self.code_out(g), read

    def decode(self, x: Tensor, memory: TernaryVQCodebook | None, values=None, *,
               dense_experts: bool = False) -> Tensor:
        """forward's output for inference (eval, no gradient): the same routing, code-memory
        read and hop, with each expert run on its routed rows through the packed product
        (routed_experts) instead of on fixed tiles of widened weights; with dense_experts,
        every expert on every row, the routing never read on the host. Every routed entry runs
        (no expert capacity: dropping depends on the other tokens of a batch, which a token
        decoded alone does not have), and no edges are recorded."""
        B, T, d = x.shape
        h = x.reshape(B * T, d)
        choice, gates, _ = self.route(h)
        experts = self.dense_experts if dense_experts else self.routed_experts
        out = experts(h, choice, gates)
        if memory is not None:
            out = out + self.read_memory(h, memory, values)[0]
        return out.reshape(B, T, d)

    def routed_experts(self, h: Tensor, choice, gates: Tensor) -> Tensor:
        """Σ over each token's chosen experts of gate · expert(h_t), one packed product
        (ternary_matmul: lookup tables for a few rows on the CPU, the tensor-core GEMV up to
        16 rows on the GPU) per expert on the rows routed to it. Inference only (no
        gradient). The routing is read on the host: one device-to-host copy per call."""
        xp = backend.get_array_module(h.data)
        chosen = backend.to_numpy(choice)
        out = xp.zeros(h.shape, h.dtype)
        for e, expert in enumerate(self.experts):
            rows, slot = np.nonzero(chosen == e)   # a token picks an expert at most once
            if rows.size:
                rows, slot = xp.asarray(rows), xp.asarray(slot)
                y = expert(Tensor(h.data[rows])).data
                out[rows] += gates.data[rows, slot, None] * y
        return Tensor(out)

    def dense_experts(self, h: Tensor, choice, gates: Tensor) -> Tensor:
        """routed_experts' sum with every expert run on every row through the packed product,
        its gate 0 where the row did not choose it: the routing is never read on the host
        (a decode step captured as a CUDA graph), for n_experts / top_k times the products.
        Inference only (no gradient)."""
        xp = backend.get_array_module(h.data)
        out = xp.zeros(h.shape, h.dtype)
        for e, expert in enumerate(self.experts):
            gate = (gates.data * (choice == e)).sum(axis=1, keepdims=True)
            out += gate * expert(h).data
        return Tensor(out)

    def expand(self, memory: TernaryEmbeddingTable, codes, *, check=True) -> Tensor:
        """One hop: Σ over each code's out-edges of weight · code(dst), per token (check=False:
        codes from the code book's search, see CodeGraph.neighbors)."""
        xp = backend.get_array_module(codes)
        dst, weight = self.graph.neighbors(codes.reshape(-1), check=check)
        # dst: codes of the graph's own edges, in range (no check, no host sync); -1 (an
        # empty slot, weight 0) reads row 0
        rows = TernaryEmbeddingTable.forward(memory, xp.maximum(dst, 0), check=False)
        return (rows * Tensor(weight[..., None])).sum(axis=1)

    def learn_edges(self, quantized: Tensor, codes, B: int, T: int) -> None:
        """Transitions between consecutive tokens' codes; the sign is that of their codes'
        dot product (aligned codes reinforce, opposed codes inhibit)."""
        xp = backend.get_array_module(codes)
        q = quantized.data.reshape(B, T, -1)
        signs = xp.sign((q[:, :-1] * q[:, 1:]).sum(-1)).astype(np.int8)
        self.graph.record(codes.reshape(B, T), signs, check=False)


def top_k(probs, k: int):
    """Indices (N, k) of each row's k largest entries of probs (N, E), largest first, ties to
    the lower index: the order of a stable sort of -probs, found without a sort (CuPy's sorts
    end with a host sync). Each entry's rank counts the entries that come before it."""
    xp = backend.get_array_module(probs)
    E = probs.shape[-1]
    mine, other = probs[:, :, None], probs[:, None, :]
    lower = xp.arange(E)[None, :] < xp.arange(E)[:, None]  # [e, e']: e' has the lower index
    rank = ((other > mine) | ((other == mine) & lower)).sum(axis=-1)
    return xp.stack([(rank == r).argmax(axis=-1) for r in range(k)], axis=-1)


VALUE_EXPONENT = -24   # memory values start at scale 2**(-24/8) = 1/8
QUIET_STEPS = 24       # quiet_memory: readouts start 24 exponent steps (x 1/8) below unit scale


def quieten(layer: TernaryLinear, steps: int) -> None:
    """Lower every row scale of a fresh layer by `steps` exponent steps (2**(-steps/8))."""
    if not backend.is_meta(layer.E):
        xp = backend.get_array_module(layer.E)
        layer.E[...] = xp.maximum(layer.E.astype(np.int16) - steps, -128).astype(np.int8)

EXPERT_TILE = 128   # rows of an expert tile: the grouped product's unit of work


def expert_tiles(experts, n_experts: int, k: int, tile: int, capacity: int | None = None):
    """Where each routed entry runs: (row, row_token, tile_expert) for expert ids `experts`
    (N·k,), the flattened (N, k) choices of N tokens, on tiles of `tile` rows, with at most
    C = capacity entries an expert (default N: all of them; no token picks an expert twice).

    Expert e's kept entries -- its first C in token order -- fill consecutive rows from the
    first row of its first tile on, in token order; its tiles follow expert e-1's. There are
    n_tiles = min(ceil(N·k / tile) + n_experts, n_experts · ceil(C / tile)) tiles whatever
    the routing (enough for any), so shapes stay fixed. row int64 (N·k,) is an entry's row,
    n_tiles·tile (past every tile) for an entry dropped by the capacity; row_token int64
    (n_tiles·tile,) the token of each row, 0 for padding rows; tile_expert int64 (n_tiles,)
    each tile's expert, 0 for tiles past the last expert's (all padding). No sort and no
    host sync: ranks are running counts of the expert-major one-hot.
    """
    xp = backend.get_array_module(experts)
    n = experts.shape[0]
    C = n // k if capacity is None else capacity
    running = xp.cumsum(experts[None, :] == xp.arange(n_experts)[:, None], axis=1,
                        dtype=np.int64)                                   # (E, n)
    rank = running[experts, xp.arange(n)] - 1
    tiles = (xp.minimum(running[:, -1], C) + tile - 1) // tile            # each expert's
    ends = xp.cumsum(tiles)
    n_tiles = min(-(-n // tile) + n_experts, n_experts * -(-C // tile))
    rows = n_tiles * tile
    row = xp.where(rank < C, (ends - tiles)[experts] * tile + rank, rows)
    row_token = xp.zeros(rows + 1, np.int64)   # + the dropped entries' sink
    row_token[row] = xp.arange(n) // k
    owner = (xp.arange(n_tiles)[:, None] >= ends[None, :]).sum(axis=1)   # experts before
    return row, row_token[:-1], xp.where(owner < n_experts, owner, 0)


class Block(Module):
    """x += Attention(rms_norm(x)); x += MoEGraph(rms_norm(x), memory).

    With `recompute` (set by the model, from the run's field of that name), a training
    forward keeps only the block's input and runs the block again in backward
    (autograd.recompute): the model then holds one block's intermediates at a time, not
    n_layers of them, for a second forward per block.
    """

    def __init__(self, config: ModelConfig, device=None):
        super().__init__()
        c = config
        self.recompute = False
        self.attn = Attention(c.d_model, c.n_heads, device, position=c.position)
        self.moe = MoEGraph(c.d_model, c.shared_vq_size, n_experts=c.n_experts,
                            expert_hidden=c.expert_hidden, top_k=c.top_k,
                            code_dim=c.codebook_dim, slots=c.graph_slots,
                            capacity=c.graph_capacity, expert_capacity=c.expert_capacity,
                            device=device)
        self.moe.use_edges = c.use_graph_edges

    def forward(self, x: Tensor, memory, values=None):
        def block(x):
            x = x + self.attn(F.rms_norm(x))
            y, aux = self.moe(F.rms_norm(x), memory, values)
            return x + y, aux

        if self.recompute and self.training:
            return recompute(block, x)
        return block(x)

    def decode(self, x: Tensor, memory, keys, values, start: int,
               memory_values=None) -> Tensor:
        """forward's output for the tokens at positions start … of a cached stream
        (Attention.decode, MoEGraph.decode)."""
        x = x + self.attn.decode(F.rms_norm(x), keys, values, start)
        return x + self.moe.decode(F.rms_norm(x), memory, memory_values)

    def decode_at(self, x: Tensor, memory, keys, values, position,
                  memory_values=None) -> Tensor:
        """decode for one token per stream at a device-held position, without host syncs
        (Attention.decode_at; every expert runs, MoEGraph.decode's dense_experts)."""
        x = x + self.attn.decode_at(F.rms_norm(x), keys, values, position)
        return x + self.moe.decode(F.rms_norm(x), memory, memory_values, dense_experts=True)


class CompositeHead(Module):
    """Dense ternary LM head over the residual stream plus ternary readouts of the chosen
    code, the relation code and the code's graph neighbourhood: one sum, one norm, one head."""

    def __init__(self, d_model: int, vocab_size: int, code_dim: int, device=None):
        super().__init__()
        self.code_read = TernaryLinear(code_dim, d_model, device)
        self.relation_read = TernaryLinear(code_dim, d_model, device)
        self.graph_read = TernaryLinear(code_dim, d_model, device)
        self.lm_head = TernaryLinear(d_model, vocab_size, device)
        self.composite = True

    def forward(self, x: Tensor, code=None, relation=None, graph=None) -> Tensor:
        h = x
        if self.composite:
            for read, v in ((self.code_read, code), (self.relation_read, relation),
                            (self.graph_read, graph)):
                if v is not None:
                    h = h + read(v)
        return self.lm_head(F.rms_norm(h))


class NgramMemory(Module):
    """Hashed n-gram embeddings: a ternary table read by the recent tokens themselves.

    Each position adds, to its token's embedding, one row per n = 2 … `orders`, the row a hash
    of the n-gram ending there picks (`tritnet_kernels.sparse_rows.ngram_rows`). The table is
    a sparse ternary table (trained like the embedding: a step reads and updates only the rows
    it used), so it can be far larger than the dense model for the cost of a gather: a memory
    of which contexts predict what, that the blocks no longer have to build from single
    bytes. Rows start at 1/8 of unit scale (the quiet start of the code memory's readouts).
    With ngram_gate_layer the rows are added again at that block (gate_into)."""

    def __init__(self, rows: int, dim: int, orders: int, pad: int, device=None):
        super().__init__()
        self.orders, self.pad = orders, pad
        self.table = TernaryEmbeddingTable(rows, dim, device, exponent=VALUE_EXPONENT)

    def history(self, batch: int, xp):
        """The `previous` of a stream with no tokens yet: all padding."""
        return xp.full((batch, self.orders - 1), self.pad, np.int64)

    def forward(self, tokens, previous=None) -> Tensor:
        xp = backend.get_array_module(tokens)
        if previous is None:
            previous = self.history(tokens.shape[0], xp)
        ids = ksparse.ngram_rows(tokens, previous, self.orders, self.table.rows)
        return self.table(ids, check=False).sum(axis=2)

    @staticmethod
    def gate_into(x: Tensor, e: Tensor) -> Tensor:
        """x + g·e, g = sigmoid(⟨rms_norm(x), rms_norm(e)⟩ / √d) per position: the rows added
        again deeper in the model, where the stream has context to judge them by. A row that
        agrees with what the context says passes; one that does not (a hash collision, an
        n-gram whose continuation this context contradicts) is damped. No weights: the gate
        learns through the rows and the stream."""
        agree = (F.rms_norm(x) * F.rms_norm(e)).sum(axis=-1, keepdims=True)
        return x + F.sigmoid(agree * (1.0 / math.sqrt(x.shape[-1]))) * e


class CodeMemoryLM(Module):
    """The assembled model; `forward(tokens)` -> (logits, auxiliary loss).

    `config`: a ModelConfig, or a Config (its model fields are taken). `recompute` and
    `recompute_keep` are the run's choice of how activations are kept (RunConfig's fields of
    those names; by default a Config's own, else off): with recompute, every block but the
    last `recompute_keep` runs again in backward instead of keeping its activations."""

    def __init__(self, config: ModelConfig, device=None, *, recompute: bool | None = None,
                 recompute_keep: int | None = None):
        super().__init__()
        run = config if isinstance(config, RunConfig) else RunConfig()
        recompute = run.recompute if recompute is None else recompute
        recompute_keep = run.recompute_keep if recompute_keep is None else recompute_keep
        c = ModelConfig.of(config).validate()
        if not 0 <= recompute_keep <= c.n_layers:
            raise ValueError(f"CodeMemoryLM: recompute_keep = {recompute_keep} is outside 0.."
                             f"{c.n_layers} (n_layers)")
        if c.kgvq_dim != c.codebook_dim:
            raise ValueError(f"config: kgvq_dim = {c.kgvq_dim} must equal codebook_dim = "
                             f"{c.codebook_dim} (the relation composes two shared codes)")
        self.config = c
        self.embed = TernaryEmbeddingTable(c.vocab_size, c.d_model, device)
        self.blocks = ModuleList([Block(c, device) for _ in range(c.n_layers)])
        for i, block in enumerate(self.blocks):   # the last recompute_keep keep activations
            block.recompute = recompute and i < c.n_layers - recompute_keep
        self.motif = TernaryLinear(c.d_model, c.codebook_dim, device)
        self.shared_vq = TernaryVQCodebook(c.shared_vq_size, c.codebook_dim, beta=c.vq_beta,
                                           search=c.vq_search, device=device)
        self.kgvq = KGVQCodebook(c.kgvq_size, c.kgvq_dim, beta=c.vq_beta, search=c.vq_search,
                                 device=device)
        self.head = CompositeHead(c.d_model, c.vocab_size, c.codebook_dim, device)
        self.head.composite = c.use_composite_head
        if c.quiet_memory:
            for layer in [blk.moe.code_out for blk in self.blocks] + [
                    self.head.code_read, self.head.relation_read, self.head.graph_read]:
                quieten(layer, QUIET_STEPS)
        if c.memory_values:
            # one value row per code, starting small (scale 2**-3) so that the untrained
            # values add little noise to what the code itself reads
            self.memory_values = TernaryEmbeddingTable(c.shared_vq_size, c.codebook_dim, device,
                                                       exponent=VALUE_EXPONENT)
        if c.ngram_memory:
            self.ngram = NgramMemory(c.ngram_rows, c.d_model, c.ngram_memory, c.vocab_size,
                                     device)

    def components(self) -> dict:
        """Named groups of modules, for the trace and per-component reports."""
        group = ModuleList
        b = list(self.blocks)
        return {
            "embedding": self.embed,
            "attention": group([blk.attn for blk in b]),
            "moe_experts": group([blk.moe.experts for blk in b]),
            "moe_router": group([blk.moe.router for blk in b]),
            "moe_code_io": group([m for blk in b for m in (blk.moe.code_in, blk.moe.code_out)]),
            "moe_graph": group([blk.moe.graph for blk in b]),
            "motif": self.motif,
            "shared_vq": self.shared_vq,
            "kgvq": self.kgvq,
            "head": self.head,
            **({"memory_values": self.memory_values} if self.config.memory_values else {}),
            **({"ngram_memory": self.ngram} if self.config.ngram_memory else {}),
        }

    def forward(self, tokens, *, check=True):
        """(logits, auxiliary loss) of tokens (B, T). Token ids are range-checked: free for
        host arrays, a host sync for device ones, which check=False skips (ids checked where
        they were made, as a captured step's are)."""
        c = self.config
        if isinstance(tokens, Tensor):
            tokens = tokens.data
        B, T = tokens.shape
        if T > c.context:
            raise ValueError(f"CodeMemoryLM: sequence of {T} tokens exceeds context = {c.context}")
        memory = self.shared_vq if c.use_shared_vq else None
        values = self.memory_values if c.use_shared_vq and c.memory_values else None
        x = self.embed(tokens, check=check)
        if c.ngram_memory:
            rows = self.ngram(backend.get_array_module(self.embed.T_packed).asarray(tokens))
            x = x + rows
        aux = None
        for i, block in enumerate(self.blocks):
            if c.ngram_memory and c.ngram_gate_layer and i == c.ngram_gate_layer:
                x = NgramMemory.gate_into(x, rows)
            x, a = block(x, memory, values)
            aux = a if aux is None else aux + a
        code = relation = graph = None
        if c.use_shared_vq:
            code, relation, graph, loss = self.code_reads(x, values)
            aux = aux + loss
        return self.head(x, code, relation, graph), aux

    def code_reads(self, x: Tensor, values=None, first_previous=None):
        """What the head reads of the code memory for x (B, T, d): (code, relation code,
        graph hop, their VQ losses). The code of position t is the nearest shared code to
        motif(x_t) (plus its value row with memory values); the relation composes it with
        position t-1's code, which for the first position is `first_previous` (B, 1, dim)
        (a decode's cached code), else zero."""
        c = self.config
        B, T = x.shape[:2]
        vq = self.shared_vq(self.motif(F.rms_norm(x)))
        loss, code, relation, graph = vq.loss, vq.quantized, None, None
        if values is not None:
            code = code + values(vq.indices, check=False)
        if c.use_graph_edges:
            graph = self.blocks[-1].moe.expand(values if values is not None else self.shared_vq,
                                               vq.indices, check=False).reshape(
                B, T, c.codebook_dim)
        if c.use_kgvq:
            first = code[:, :1] * 0.0 if first_previous is None else Tensor(first_previous)
            rel = self.kgvq(F.concat([first, code[:, :-1]], axis=1), code)
            loss, relation = loss + rel.loss, rel.quantized
        return code, relation, graph, loss

    def loss(self, tokens, targets, *, check=True):
        """(total loss, cross-entropy in nats per token) for next-token prediction (check:
        as in forward, for tokens and targets)."""
        logits, aux = self(tokens, check=check)
        if isinstance(targets, Tensor):
            targets = targets.data
        if not backend.is_cupy(targets):
            targets = np.asarray(targets)   # host targets are checked on the host (no sync)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                             check=check)
        return ce + aux * self.config.aux_loss_weight, ce

    # --- generation ---------------------------------------------------------------------
    def new_cache(self, batch: int, capacity: int | None = None) -> "KVCache":
        """An empty KVCache for `batch` streams of up to `capacity` tokens (default: the
        context), on the model's device."""
        c = self.config
        capacity = c.context if capacity is None else capacity
        if not 1 <= capacity <= c.context:
            raise GenerationError(f"cache capacity {capacity} is out of range: expected 1 to the "
                                  f"model's context = {c.context}")
        xp = backend.get_array_module(self.embed.T_packed)
        return KVCache(c.n_layers, batch, c.n_heads, capacity, c.d_model // c.n_heads, xp,
                       code_dim=c.codebook_dim if c.use_shared_vq else 0,
                       recent=c.ngram_memory - 1 if c.ngram_memory else 0, pad=c.vocab_size)

    def decode(self, tokens, cache: "KVCache") -> Tensor:
        """Logits (B, T, vocab) of tokens (B, T): the next T tokens of the cache's B streams,
        which they are appended to. Each layer runs once on these tokens, attending to the
        cached keys and values; the first token's relation code composes its shared code with
        the cache's (the previous token's; zero at a stream's start, as in forward). The
        logits equal forward's at these positions over the whole window, within float
        rounding (the products' summation order differs). Inference only: call it in eval
        mode without gradients (generate does); it records no code transitions and no code
        usage. Token ids are not range-checked here: generate checks them on the host."""
        if isinstance(tokens, Tensor):
            tokens = tokens.data
        B, T = tokens.shape
        start = cache.length
        if B != cache.batch or start + T > cache.capacity:
            raise GenerationError(f"decode: {B} streams of {T} tokens do not fit a cache of "
                                  f"{cache.batch} streams holding {start} of {cache.capacity} "
                                  "tokens")
        xp = backend.get_array_module(self.embed.T_packed)
        logits = self._decode(xp.asarray(tokens), cache, start)
        cache.length = start + T
        cache.position.fill(start + T)
        return logits

    def decode_at(self, tokens, cache: "KVCache") -> Tensor:
        """decode of one token per stream, tokens (B, 1) on the model's device, at the
        position cache.position holds on the device, which it advances there: the same logits
        (within float rounding: attention sums over the masked whole cache, every expert
        runs), with nothing read on the host and the same arrays at every position, so that
        the step is captured once as a CUDA graph and replayed for every token
        (CapturedDecode). The host's cache.length is left to the caller."""
        logits = self._decode(tokens, cache, None)
        cache.position += 1
        return logits

    def _decode(self, tokens, cache: "KVCache", start) -> Tensor:
        """decode's layers at host position `start`, or decode_at's at the cache's device
        position (start None: Block.decode_at); the n-gram history and the last code are
        written into the cache's own arrays, in place."""
        c = self.config
        memory = self.shared_vq if c.use_shared_vq else None
        memory_values = self.memory_values if c.use_shared_vq and c.memory_values else None
        x = self.embed(tokens, check=False)
        if c.ngram_memory:
            rows = self.ngram(tokens, cache.recent)
            x = x + rows
            xp = backend.get_array_module(tokens)
            cache.recent[...] = xp.concatenate([cache.recent, tokens.astype(np.int64)],
                                               axis=1)[:, -(c.ngram_memory - 1):]
        for i, (block, keys, values) in enumerate(zip(self.blocks, cache.keys, cache.values)):
            if c.ngram_memory and c.ngram_gate_layer and i == c.ngram_gate_layer:
                x = NgramMemory.gate_into(x, rows)
            if start is None:
                x = block.decode_at(x, memory, keys, values, cache.position, memory_values)
            else:
                x = block.decode(x, memory, keys, values, start, memory_values)
        code = relation = graph = None
        if c.use_shared_vq:
            code, relation, graph, _ = self.code_reads(x, memory_values, cache.code)
            cache.code[...] = code.data[:, -1:]
        return self.head(x, code, relation, graph)

    def generate(self, prompt_ids, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 stop=None, cuda_graph: bool = True):
        """New tokens after prompt_ids: a list of ints for a 1-D prompt (bytes, a list or an
        array), a list of B such lists for a (B, T) prompt (B streams, decoded as one batch).

        The prompt runs through the model once (the prefill, filling a KVCache); then every new
        token costs one step of every layer (decode). Sampling: temperature 0 decodes greedily
        (the most likely token; top_k and top_p are then refused, they only shape sampling);
        above 0 the logits are divided by it, top_k keeps the k most likely tokens, top_p the
        most likely ones whose probabilities reach p (nucleus sampling), both if both are
        given; seed makes it repeatable (each stream's draw at each step is its own, whatever
        the other streams do). stop: token sequences (bytes, str as UTF-8, or lists of ids);
        a stream ends when its new tokens end with one of them, which is dropped from its
        output. Generation ends after max_new_tokens or when every stream has stopped.

        The window is the model's context. A prompt longer than it is refused. When a stream
        reaches it, the window slides: the cache is refilled from the last context // 2
        tokens (one prefill) and decoding goes on, so each token sees between context // 2
        and context tokens, and its logits are forward's over exactly those.

        On a GPU (with cuda_graph) the decode step is captured once as a CUDA graph and
        replayed for every token (CapturedDecode: decode_at, every expert run
        on every stream); elsewhere each token runs decode, its experts on their routed rows.

        The model is left as it was: generation runs in eval mode without gradients, records
        no code transitions and no code usage (it restores the mode, and the routed search's
        refresh clock should the search build its index). Bad arguments raise GenerationError.
        """
        c = self.config
        prompts, single, stops = generation_request(c, prompt_ids, max_new_tokens, temperature,
                                                    top_k, top_p, stop)
        B, T = prompts.shape
        rng = np.random.default_rng(seed)
        history = [list(row) for row in prompts.tolist()]   # each stream's tokens so far
        new = [[] for _ in range(B)]
        alive = np.arange(B)                                # the streams still generating
        clocks = [(vq, vq.steps_since_index) for vq in (self.shared_vq, self.kgvq)]
        was_training = self.training
        self.eval()
        try:
            with no_grad():
                cache = self.new_cache(B, min(c.context, T + max_new_tokens))
                captured = CapturedDecode(self, cache) if cuda_graph and \
                    backend.is_cupy(cache.keys[0]) else None
                logits = self.decode(prompts, cache).data if max_new_tokens else None
                for step in range(max_new_tokens):
                    # one draw per stream and step, used or not: a stream's draws do not
                    # depend on when the others stop
                    draws = rng.random(B)
                    last = backend.to_numpy(logits[:, -1]).astype(np.float64)
                    picked = next_tokens(last, temperature, top_k, top_p, draws[alive])
                    going = []
                    for j, s in enumerate(alive):
                        new[s].append(int(picked[j]))
                        history[s].append(int(picked[j]))
                        ended = [t for t in stops if new[s][-len(t):] == t]
                        if ended:
                            del new[s][-len(ended[0]):]
                        else:
                            going.append(j)
                    if not going or step == max_new_tokens - 1:
                        break
                    if len(going) < len(alive):
                        cache.select(going)
                        alive, picked = alive[going], picked[going]
                    if cache.length == cache.capacity:   # the window is full: slide it
                        cache.reset()
                        window = np.array([history[s][-(c.context // 2):] for s in alive])
                        logits = self.decode(window, cache).data
                    elif captured is not None:
                        logits = captured(picked)
                    else:
                        logits = self.decode(np.asarray(picked, np.int64)[:, None], cache).data
        finally:
            self.train(was_training)
            for vq, clock in clocks:
                vq.steps_since_index = clock
        return new[0] if single else new


class KVCache:
    """What generation keeps of B streams between decode steps, so a new token costs one step
    of every layer: each layer's attention keys and values (B, heads, capacity, head dim,
    float32), the number of tokens they hold, and the shared-VQ code of each stream's last
    token (B, 1, code dim), the previous code of the next token's relation code. The rest of
    the code memory needs nothing carried: routing, code reads and graph hops are per token."""

    def __init__(self, n_layers: int, batch: int, n_heads: int, capacity: int, head_dim: int,
                 xp=np, dtype=np.float32, *, code_dim: int = 0, recent: int = 0, pad: int = 0):
        shape = (batch, n_heads, capacity, head_dim)
        self.keys = [xp.zeros(shape, dtype) for _ in range(n_layers)]
        self.values = [xp.zeros(shape, dtype) for _ in range(n_layers)]
        self.batch, self.capacity, self.pad = batch, capacity, pad
        self.length = 0
        self.position = xp.zeros(1, np.int64)   # the length, on the device (decode_at)
        # the last token's shared code (zero at a stream's start, as forward's first
        # relation reads), and the n-gram memory's history (each stream's last tokens,
        # padding at its start); written in place, so a captured decode step keeps them
        self.code = xp.zeros((batch, 1, code_dim), dtype) if code_dim else None
        self.recent = xp.full((batch, recent), pad, np.int64) if recent else None

    def arrays(self) -> list:
        """Every array a decode step reads or writes (a captured step holds their addresses)."""
        return [a for a in (*self.keys, *self.values, self.position, self.code, self.recent)
                if a is not None]

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.keys + self.values)

    def select(self, streams) -> None:
        """Keep only the listed streams (indices into the batch), in that order."""
        xp = backend.get_array_module(self.keys[0])
        index = xp.asarray(np.asarray(streams, np.int64))
        self.keys = [k[index] for k in self.keys]
        self.values = [v[index] for v in self.values]
        if self.code is not None:
            self.code = self.code[index]
        if self.recent is not None:
            self.recent = self.recent[index]
        self.batch = len(streams)

    def reset(self) -> None:
        """Empty every stream (the arrays are kept and overwritten)."""
        self.length = 0
        self.position.fill(0)
        if self.code is not None:
            self.code.fill(0)
        if self.recent is not None:
            self.recent.fill(self.pad)


class CapturedDecode:
    """CodeMemoryLM.decode_at of one token per stream, replayed from a CUDA graph.

        step = CapturedDecode(model, cache)
        logits = step(picked)   # picked: the B streams' new tokens (host ints); logits
                                # (B, 1, vocab) on the device, valid until the next call

    A decode step of the small preset launches a few hundred kernels, whose host-side
    issuing would cost more than their GPU work; replayed from a graph it costs one launch.
    decode_at keeps every array and shape fixed and reads nothing on the host: the tokens
    come from an input buffer refilled before each replay, the position from the cache's
    device counter, which the graph advances. The first call runs eagerly (it compiles the
    kernels and copies the constants a capture cannot), the second is captured, every later
    one replays. The cache's arrays must stay the ones captured: after KVCache.select (streams
    that stopped) the step is captured again; a reset and a prefill write the same arrays
    and keep it. A capture that fails costs speed only: every later call runs decode_at
    eagerly and `failed` says why.
    """

    def __init__(self, model, cache, *, warmup: int = 1):
        if backend.cupy is None or not backend.is_cupy(cache.keys[0]):
            raise GenerationError("CapturedDecode: the cache is not on a CUDA device (CUDA graphs "
                                  "need CuPy and a GPU); decode eagerly")
        cupy = backend.cupy
        self.model, self.cache, self.warmup = model, cache, warmup
        self.pool = cupy.cuda.MemoryPool()
        self.stream = cupy.cuda.Stream(non_blocking=True)
        self.graph = self.held = self.tokens = self.logits = None
        self.fresh = False   # the graph was captured by this call: its launch is its first run
        self.counts = {"eager": 0, "capture": 0, "replay": 0}
        self.failed = None

    def __call__(self, picked):
        cupy = backend.cupy
        cache = self.cache
        picked = np.asarray(picked, np.int64).reshape(-1, 1)
        if picked.shape[0] != cache.batch or cache.length >= cache.capacity:
            raise GenerationError(f"CapturedDecode: {picked.shape[0]} tokens for a cache of "
                                  f"{cache.batch} streams holding {cache.length} of "
                                  f"{cache.capacity} tokens")
        if self.tokens is None or self.tokens.shape != picked.shape:
            self.tokens, self.graph = cupy.empty(picked.shape, np.int64), None
        self.tokens.set(picked)
        held = [a.data.ptr for a in cache.arrays()] + [self.tokens.data.ptr]
        if self.graph is not None and held != self.held:
            self.graph = None   # the cache's arrays moved: capture again
        if self.graph is None and not self.failed and self.counts["eager"] >= self.warmup:
            self._capture(held)
        if self.graph is not None:
            self.graph.launch(cupy.cuda.get_current_stream())
            mode, self.fresh = ("capture" if self.fresh else "replay"), False
        else:
            self.logits = self.model.decode_at(self.tokens, cache).data
            mode = "eager"
        self.counts[mode] += 1
        cache.length += 1
        return self.logits

    def _capture(self, held):
        cupy = backend.cupy
        try:
            with cupy.cuda.using_allocator(self.pool.malloc), self.stream:
                self.stream.begin_capture()
                try:
                    logits = self.model.decode_at(self.tokens, self.cache)
                finally:
                    graph = self.stream.end_capture()
        except Exception as e:   # whatever refused capture: decode on, eagerly
            self.failed = f"{type(e).__name__}: {e}"
            return
        self.graph, self.held, self.logits, self.fresh = graph, held, logits.data, True


class GenerationError(TritnetError, ValueError):
    """A generation request the model cannot serve: the prompt or a sampling option."""


def generation_request(config: ModelConfig, prompt_ids, max_new_tokens, temperature, top_k,
                       top_p, stop):
    """Check a generate() request against the model's config: (prompts int64 (B, T) on the
    host, whether the prompt was 1-D, the stop sequences as lists of ids). Raises
    GenerationError naming the bad value and what to give instead."""
    V, context = config.vocab_size, config.context
    if isinstance(prompt_ids, (bytes, bytearray)):
        prompt_ids = list(prompt_ids)
    try:
        prompts = np.asarray(backend.to_numpy(prompt_ids) if backend.is_cupy(prompt_ids)
                             else prompt_ids)
    except ValueError:
        raise GenerationError("the prompts have different lengths; give B prompts of one "
                              "length (or generate them one at a time)") from None
    single = prompts.ndim == 1
    if single:
        prompts = prompts[None]
    if prompts.ndim != 2 or (prompts.size and prompts.dtype.kind not in "iu"):
        raise GenerationError(f"prompt_ids of shape {prompts.shape} and dtype {prompts.dtype}: "
                              "expected token ids, (T,) or (B, T) integers")
    B, T = prompts.shape
    if B == 0 or T == 0:
        raise GenerationError("the prompt is empty; give at least one token to continue "
                              "(a newline, say)")
    if T > context:
        raise GenerationError(f"the prompt has {T} tokens, more than the model's context of "
                              f"{context}; give at most its last {context} tokens")
    lo, hi = int(prompts.min()), int(prompts.max())
    if lo < 0 or hi >= V:
        raise GenerationError(f"the prompt holds token {lo if lo < 0 else hi}, outside the "
                              f"model's vocabulary of {V} tokens (0 to {V - 1}); use a prompt "
                              "made of tokens the model was trained on")
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
        raise GenerationError(f"max_new_tokens = {max_new_tokens!r}: expected an integer >= 0")
    if not isinstance(temperature, (int, float, np.number)) or not temperature >= 0 \
            or not math.isfinite(temperature):
        raise GenerationError(f"temperature = {temperature!r}: expected 0 (greedy) or a "
                              "positive number (sampling)")
    if temperature == 0 and (top_k is not None or top_p is not None):
        raise GenerationError("temperature 0 decodes greedily (the most likely token); top_k "
                              "and top_p only shape sampling: leave them out, or give a "
                              "temperature > 0")
    if top_k is not None and (not isinstance(top_k, (int, np.integer)) or top_k < 1):
        raise GenerationError(f"top_k = {top_k!r}: expected an integer >= 1 (or none: every "
                              "token)")
    if top_p is not None and not (isinstance(top_p, (int, float, np.number)) and 0 < top_p <= 1):
        raise GenerationError(f"top_p = {top_p!r}: expected a probability in (0, 1] (1: every "
                              "token)")
    stops = []
    for s in stop or ():
        ids = list(s.encode("utf-8") if isinstance(s, str) else s)
        if not ids:
            raise GenerationError("an empty stop sequence would stop at once: give at least one "
                                  "token (a character) for each stop")
        stops.append([int(t) for t in ids])
    return prompts.astype(np.int64), single, stops


def next_tokens(logits, temperature: float, top_k: int | None, top_p: float | None, draws):
    """The next token of each row of logits (n, vocab), float64 on the host: the argmax at
    temperature 0, else a draw from softmax(logits / temperature) restricted to the top_k
    most likely tokens and to the smallest set of most likely ones whose probability reaches
    top_p, taken by inverse CDF with the uniform draws (n,) in [0, 1). Ties keep the lower
    token id first."""
    if temperature == 0:
        return logits.argmax(axis=-1)
    order = np.argsort(-logits, axis=-1, kind="stable")          # most likely first
    z = np.take_along_axis(logits, order, axis=-1) / temperature
    p = np.exp(z - z[:, :1])
    if top_k is not None:
        p[:, top_k:] = 0.0
    p /= p.sum(axis=-1, keepdims=True)
    if top_p is not None and top_p < 1:
        # drop a token when the more likely ones already reach top_p (the first always stays)
        p[np.cumsum(p, axis=-1) - p >= top_p] = 0.0
    cdf = np.cumsum(p, axis=-1)
    pick = (cdf < (draws * cdf[:, -1])[:, None]).sum(axis=-1)
    pick = np.minimum(pick, logits.shape[-1] - 1)
    return order[np.arange(len(order)), pick]


# --------------------------------------------------------------------------------------------
# The trace: a config's trits per component, counted on a model built with shapes only.


@dataclass
class TraceReport:
    """Logical ternary counts per component of a model built with shapes only."""
    components: dict = field(default_factory=dict)   # component -> logical trits
    state_bytes: dict = field(default_factory=dict)  # component -> bytes of integer state
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.components.values())

    def format(self) -> str:
        width = max(len(k) for k in self.components) if self.components else 10
        lines = [f"{'component':<{width}}  {'logical trits':>16}  {'share':>6}  "
                 f"{'state bytes/trit':>16}"]
        for name, n in self.components.items():
            per = self.state_bytes[name] / n if n else 0.0
            lines.append(f"{name:<{width}}  {n:>16,}  {n / self.total:>6.1%}  {per:>16.3f}")
        lines.append(f"{'total':<{width}}  {self.total:>16,}  {1:>6.0%}  "
                     f"{sum(self.state_bytes.values()) / max(self.total, 1):>16.3f}")
        lines.append(f"(traced in {self.seconds * 1000:.0f} ms, nothing allocated)")
        return "\n".join(lines)


def trace(config: ModelConfig) -> TraceReport:
    """Build the model on the "meta" device and count logical trits per component."""
    start = time.perf_counter()
    model = CodeMemoryLM(config, device="meta")
    report = TraceReport()
    for component, module in model.components().items():
        trits = state = 0
        for m in module.modules():
            if isinstance(m, TernaryModule):
                trits += m.logical_trits()
            state += sum(b.nbytes for b in m._buffers.values() if b is not None)
        report.components[component] = trits
        report.state_bytes[component] = state
    report.seconds = time.perf_counter() - start
    return report
