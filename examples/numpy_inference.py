"""Run a tritnet export with NumPy alone: the model's forward pass, and text from it.

    tritnet export runs/tiny/ckpt.h5 -o tiny.safetensors
    python examples/numpy_inference.py tiny.safetensors --prompt "def " --tokens 100

No tritnet, no safetensors library: the file is read by hand (an 8-byte header length, a JSON
header, raw little-endian arrays). The logits equal tritnet's within float rounding
(tests/test_export.py). tritnet/models.py is the model this mirrors; each part below names
the class it follows. Every ternary matrix is widened once to float32, w = 2**(E/8) * trits:
simple, and fine for the tiny and small presets. A subword model (its export carries a
tokenizer) needs Hugging Face's tokenizers library to read and write text.
"""

import argparse
import json

import numpy as np

DTYPES = {"U8": np.uint8, "I8": np.int8, "I16": np.int16, "I32": np.int32, "F32": np.float32}


def read_safetensors(path):
    """(arrays by name, metadata) of a .safetensors file."""
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
        data = fh.read()
    meta = header.pop("__metadata__", {})
    arrays = {name: np.frombuffer(data[t["data_offsets"][0]:t["data_offsets"][1]],
                                  DTYPES[t["dtype"]]).reshape(t["shape"])
              for name, t in header.items()}
    return arrays, meta


def unpack_trits(packed, cols):
    """base3-5 bytes (rows, ceil(cols/5)) -> trits int8 (rows, cols): five digits a byte."""
    digits = (packed[..., None] // 3 ** np.arange(5, dtype=np.uint8)) % 3
    return digits.reshape(len(packed), -1)[:, :cols].astype(np.int8) - 1


def rms_norm(x):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + np.float32(1e-6))


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


NGRAM_PRIME = np.uint64(0x100000001B3)      # the n-gram hash: FNV-1a's prime, and a constant
NGRAM_ORDER = np.uint64(0x9E3779B97F4A7C15)  # that separates the orders (tritnet/models.py)


def mix64(z):
    """splitmix64's finaliser: the bucket hash of a large code graph and the n-gram memory's
    row hash (tritnet_kernels/code_graph.py, tritnet/models.py)."""
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


class Model:
    def __init__(self, path):
        arrays, meta = read_safetensors(path)
        self.c = json.loads(meta["config"])
        self.tokenizer = meta.get("tokenizer")
        self.trits, self.w, self.graphs = {}, {}, {}
        for name, cols in json.loads(meta["trit_cols"]).items():
            module = name[:-len(".trits")]
            self.trits[module] = unpack_trits(arrays[name], cols)
            scale = np.exp2(arrays[module + ".E"].astype(np.float32) / np.float32(8))
            self.w[module] = scale[:, None] * self.trits[module].astype(np.float32)
        for name in arrays:
            if name.endswith(".dst"):   # a dense graph has no src: slot i is code i // slots
                g = name[:-len(".dst")]
                self.graphs[g] = [arrays.get(f"{g}.{p}") for p in ("src", "dst", "attr", "score")]

    def linear(self, name, x):                            # TernaryLinear
        return x @ self.w[name].T

    def nearest(self, book, x):                           # TernaryVQCodebook's search
        """Ternarise each query (sign of the entries above half its mean |x|, the mean added
        column by column as the kernels do), then the code maximising d*|d| / nnz(code)."""
        acc = np.zeros(len(x), np.float32)
        for j in range(x.shape[1]):
            acc = acc + np.abs(x[:, j])
        q = np.where(np.abs(x) * np.float32(2 * x.shape[1]) > acc[:, None], np.sign(x), 0)
        T = self.trits[book]
        d = (q.astype(np.float32) @ T.T.astype(np.float32)).astype(np.int64)
        score = d * np.abs(d) / np.maximum(np.count_nonzero(T, axis=1), 1)
        return score.argmax(axis=1)                       # ties: the lowest code

    def hop(self, graph, table, codes):                   # MoEGraph.expand, CodeGraph
        src, dst, attr, score = self.graphs[graph]
        slots, K = self.c["graph_slots"], self.c["shared_vq_size"]
        buckets = len(dst) // slots
        bucket = codes if buckets == K else mix64(codes.astype(np.uint64)) % np.uint64(buckets)
        cells = bucket.astype(np.int64)[:, None] * slots + np.arange(slots)
        own = dst[cells] != -1
        if src is not None:   # codes share the buckets: keep the code's own edges
            own &= src[cells] == codes[:, None]
        weight = np.where(own, attr[cells].astype(np.int64) * score[cells], 0)
        weight = weight.astype(np.float32) / np.float32(127)
        rows = self.w[table][np.where(own, dst[cells], 0)]
        return (rows * weight[..., None]).sum(axis=1)

    def attention(self, p, x):                            # Attention (causal, ALiBi or none)
        B, T, d = x.shape
        h = self.c["n_heads"]
        q, k, v = (self.linear(f"{p}.{n}", x).reshape(B, T, h, d // h).transpose(0, 2, 1, 3)
                   for n in "qkv")
        s = q @ k.transpose(0, 1, 3, 2) * np.float32(1 / np.sqrt(d // h))
        dist = np.arange(T)[:, None] - np.arange(T)[None, :]
        if self.c["position"] == "alibi":
            slopes = 2.0 ** (-8.0 * np.arange(1, h + 1) / h)
            s = s - (slopes[:, None, None] * dist).astype(np.float32)
        y = softmax(np.where(dist >= 0, s, -np.inf)) @ v
        return self.linear(f"{p}.o", y.transpose(0, 2, 1, 3).reshape(B, T, d))

    def memory_read(self, codes, graph):
        """The chosen code's row, plus its value row, plus one hop along `graph`'s edges."""
        c = self.c
        table = "memory_values" if c["memory_values"] else "shared_vq"
        g = self.w["shared_vq"][codes]
        if c["memory_values"]:
            g = g + self.w["memory_values"][codes]
        if c["use_graph_edges"]:
            g = g + self.hop(graph, table, codes)
        return g

    def moe(self, p, x):                                  # MoEGraph
        B, T, d = x.shape
        h = x.reshape(B * T, d)
        probs = softmax(h @ self.w[f"{p}.router"].T * np.float32(1 / np.sqrt(d)))
        choice = np.argsort(-probs, axis=1, kind="stable")[:, :self.c["top_k"]]
        gates = np.take_along_axis(probs, choice, axis=1)
        gates = gates / gates.sum(axis=1, keepdims=True)
        out = np.zeros_like(h)
        for e in range(self.c["n_experts"]):              # Expert: down(silu(up(x)))
            rows, slot = np.nonzero(choice == e)
            up = self.linear(f"{p}.experts.{e}.up", h[rows])
            silu = up * (np.float32(0.5) * np.tanh(np.float32(0.5) * up) + np.float32(0.5))
            out[rows] += gates[rows, slot, None] * self.linear(f"{p}.experts.{e}.down", silu)
        if self.c["use_shared_vq"]:
            codes = self.nearest("shared_vq", self.linear(f"{p}.code_in", h))
            out = out + self.linear(f"{p}.code_out", self.memory_read(codes, f"{p}.graph"))
        return out.reshape(B, T, d)

    def ngram(self, tokens, previous):                    # NgramMemory
        """One table row per n = 2 … ngram_memory, picked by a hash of the n-gram ending at
        each token; `previous` (B, n - 1) are the tokens before the window (vocab_size: none)."""
        orders, T = self.c["ngram_memory"], tokens.shape[1]
        seq = np.concatenate([previous, tokens], axis=1).astype(np.uint64) + np.uint64(1)
        h, rows = np.zeros(tokens.shape, np.uint64), []
        with np.errstate(over="ignore"):
            for back in range(orders):                    # the token `back` places before
                h = (h ^ seq[:, orders - 1 - back:orders - 1 - back + T]) * NGRAM_PRIME
                if back:
                    row = mix64(h ^ (np.uint64(back + 1) * NGRAM_ORDER))
                    rows.append((row % np.uint64(self.c["ngram_rows"])).astype(np.int64))
        return self.w["ngram.table"][np.stack(rows, axis=2)].sum(axis=2)

    def logits(self, tokens, previous=None):              # CodeMemoryLM.forward
        """Logits (B, T, vocab) of tokens (B, T); `previous`: the n-gram memory's tokens
        before them (default: none, the start of a stream)."""
        c = self.c
        x = self.w["embed"][tokens]
        if c.get("ngram_memory"):
            if previous is None:
                previous = np.full((len(tokens), c["ngram_memory"] - 1), c["vocab_size"])
            rows = self.ngram(tokens, previous)
            x = x + rows
        for i in range(c["n_layers"]):
            gate = c.get("ngram_gate_layer", 0) if c.get("ngram_memory") else 0
            if gate and i == gate:                        # NgramMemory.gate_into
                agree = (rms_norm(x) * rms_norm(rows)).sum(axis=-1, keepdims=True)
                x = x + rows / (1 + np.exp(-agree / np.sqrt(x.shape[-1])))
            x = x + self.attention(f"blocks.{i}.attn", rms_norm(x))
            x = x + self.moe(f"blocks.{i}.moe", rms_norm(x))
        h = x
        if c["use_shared_vq"] and c["use_composite_head"]:   # CompositeHead's reads
            B, T, d = x.shape
            codes = self.nearest("shared_vq", self.linear("motif", rms_norm(x).reshape(B * T, d)))
            code = self.w["shared_vq"][codes]
            if c["memory_values"]:
                code = code + self.w["memory_values"][codes]
            h = h + self.linear("head.code_read", code).reshape(B, T, d)
            if c["use_kgvq"]:   # the relation code of this code and the previous one
                code = code.reshape(B, T, -1)
                previous = np.concatenate([np.zeros_like(code[:, :1]), code[:, :-1]], axis=1)
                rel = self.nearest("kgvq", (code - previous).reshape(B * T, -1))
                h = h + self.linear("head.relation_read", self.w["kgvq"][rel]).reshape(B, T, d)
            if c["use_graph_edges"]:   # one hop along the last block's edges
                table = "memory_values" if c["memory_values"] else "shared_vq"
                graph = self.hop(f"blocks.{c['n_layers'] - 1}.moe.graph", table, codes)
                h = h + self.linear("head.graph_read", graph).reshape(B, T, d)
        return self.linear("head.lm_head", rms_norm(h))


def generate(model, ids, n, temperature=0.8, seed=0):
    """n new tokens after ids, each from the logits of the last `context` tokens (and, for
    the n-gram memory, the tokens just before them)."""
    rng, ids, context = np.random.default_rng(seed), list(ids), model.c["context"]
    before = max(model.c.get("ngram_memory", 0) - 1, 0)
    for _ in range(n):
        start = max(len(ids) - context, 0)
        previous = [model.c["vocab_size"]] * before + ids[:start]
        previous = np.array([previous[len(previous) - before:]]) if before else None
        last = model.logits(np.array([ids[start:]]), previous)[0, -1].astype(np.float64)
        if temperature == 0:
            ids.append(int(last.argmax()))
        else:
            ids.append(int(rng.choice(len(last), p=softmax(last / temperature))))
    return ids


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("export", help="a .safetensors file written by tritnet export")
    p.add_argument("--prompt", default="def ")
    p.add_argument("--tokens", type=int, default=100, help="new tokens to generate")
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    a = p.parse_args()
    model = Model(a.export)
    if model.tokenizer is None:                           # bytes
        encode, decode = (lambda s: list(s.encode())), (lambda ids: bytes(ids).decode(
            "utf-8", "replace"))
    else:
        from tokenizers import Tokenizer
        tok = Tokenizer.from_str(model.tokenizer)
        encode, decode = (lambda s: tok.encode(s).ids), tok.decode
    ids = encode(a.prompt)
    print(a.prompt + decode(generate(model, ids, a.tokens, a.temperature)[len(ids):]))


if __name__ == "__main__":
    main()
