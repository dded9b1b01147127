"""CodeMemoryLM: a byte-level ternary language model with a huge ternary code memory.

One reading of the seed (DESIGN §6b), in the family of large sparse memory layers:

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

import numpy as np

from . import backend
from . import functional as F
from .autograd import Tensor, is_grad_enabled, recompute
from .config import Config
from .nn import Module, ModuleList
from .nn.tables import KGVQCodebook, TernaryEmbeddingTable, TernaryVQCodebook
from .nn.ternary import TernaryLinear, expert_matmul
from tritnet_kernels import graph as kgraph


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


class Expert(Module):
    """A ternary feed-forward expert: down(silu(up(x)))."""

    def __init__(self, d_model: int, hidden: int, device=None):
        super().__init__()
        self.up = TernaryLinear(d_model, hidden, device)
        self.down = TernaryLinear(hidden, d_model, device)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.silu(self.up(x)))


class CodeGraph(Module):
    """Edges between codes of the shared memory, learned online from code transitions.

    Small books keep dense edges: every code owns `slots` out-edges, exposed as `edge_index`
    (int32 (2, K·slots)) and `edge_score` / `edge_attr` (int8). Large books (capacity > 0)
    keep a bounded active edge set in a hashed table of `capacity` slots — `active_edge_src`,
    `active_edge_dst` (int32), `active_edge_attr` (int8 ternary sign), `active_edge_score`
    (int8 residual score) — and an empty `edge_index` of shape (2, 0). The admission and
    eviction rule, and the hash, are in tritnet_kernels/graph.py; no float state either way.

    A training forward only `record`s its transitions; the optimiser's step applies them
    (`apply_observations`, in the order recorded), so a forward never reads edges learned
    from its own batch — the transition t -> t+1 would tell position t its next token.
    """

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

    def forward(self, x: Tensor, memory: TernaryVQCodebook | None):
        B, T, d = x.shape
        h = x.reshape(B * T, d)
        choice, gates, aux = self.route(h)
        out = self.experts_forward(h, choice, gates)
        if memory is not None:
            read = memory(self.code_in(h))
            aux = aux + read.loss
            g = read.quantized
            if self.use_edges:
                g = g + self.expand(memory, read.indices, check=False)
                if self.training and is_grad_enabled():
                    self.learn_edges(read.quantized, read.indices, B, T)
            out = out + self.code_out(g)
        return out.reshape(B, T, d), aux

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

    With `recompute` (config field of that name), a training forward keeps only the block's
    input and runs the block again in backward (autograd.recompute): the model then holds
    one block's intermediates at a time, not n_layers of them, for a second forward per block.
    """

    def __init__(self, config: Config, device=None):
        super().__init__()
        c = config
        self.recompute = c.recompute
        self.attn = Attention(c.d_model, c.n_heads, device, position=c.position)
        self.moe = MoEGraph(c.d_model, c.shared_vq_size, n_experts=c.n_experts,
                            expert_hidden=c.expert_hidden, top_k=c.top_k,
                            code_dim=c.codebook_dim, slots=c.graph_slots,
                            capacity=c.graph_capacity, expert_capacity=c.expert_capacity,
                            device=device)
        self.moe.use_edges = c.use_graph_edges

    def forward(self, x: Tensor, memory):
        def block(x):
            x = x + self.attn(F.rms_norm(x))
            y, aux = self.moe(F.rms_norm(x), memory)
            return x + y, aux

        if self.recompute and self.training:
            return recompute(block, x)
        return block(x)


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


class CodeMemoryLM(Module):
    """The assembled model; `forward(tokens)` -> (logits, auxiliary loss)."""

    def __init__(self, config: Config, device=None):
        super().__init__()
        c = config.validate()
        if c.kgvq_dim != c.codebook_dim:
            raise ValueError(f"config: kgvq_dim = {c.kgvq_dim} must equal codebook_dim = "
                             f"{c.codebook_dim} (the relation composes two shared codes)")
        self.config = c
        self.embed = TernaryEmbeddingTable(c.vocab_size, c.d_model, device)
        self.blocks = ModuleList([Block(c, device) for _ in range(c.n_layers)])
        for i, block in enumerate(self.blocks):   # the last recompute_keep keep activations
            block.recompute = c.recompute and i < c.n_layers - c.recompute_keep
        self.motif = TernaryLinear(c.d_model, c.codebook_dim, device)
        self.shared_vq = TernaryVQCodebook(c.shared_vq_size, c.codebook_dim, beta=c.vq_beta,
                                           search=c.vq_search, device=device)
        self.kgvq = KGVQCodebook(c.kgvq_size, c.kgvq_dim, beta=c.vq_beta, search=c.vq_search,
                                 device=device)
        self.head = CompositeHead(c.d_model, c.vocab_size, c.codebook_dim, device)
        self.head.composite = c.use_composite_head

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
        x = self.embed(tokens, check=check)
        aux = None
        for block in self.blocks:
            x, a = block(x, memory)
            aux = a if aux is None else aux + a
        code = relation = graph = None
        if c.use_shared_vq:
            vq = self.shared_vq(self.motif(F.rms_norm(x)))
            aux = aux + vq.loss
            code = vq.quantized
            if c.use_graph_edges:
                graph = self.blocks[-1].moe.expand(self.shared_vq, vq.indices, check=False).reshape(
                    B, T, c.codebook_dim)
            if c.use_kgvq:
                previous = F.concat([code[:, :1] * 0.0, code[:, :-1]], axis=1)
                rel = self.kgvq(previous, code)
                aux = aux + rel.loss
                relation = rel.quantized
        return self.head(x, code, relation, graph), aux

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
