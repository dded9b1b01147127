"""One config object: the model's shape and the training run, with presets and validation.

`Config` is a flat dataclass (nanoGPT-style: every knob in one place, readable top to
bottom) made of two parts: `ModelConfig`, the model's fields (what a checkpoint's arrays are
made for: a resumed run keeps them), and `RunConfig`, how a run trains it (free to change on
resume). The model reads only its part (`config.model`). Presets are named overrides of
the defaults; a JSON or TOML file and CLI flags override further. Every field is checked by
`validate()`, which names the field, the value and the allowed range.
(`tritnet.models.trace(config)` counts a config's trits without building it.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from dataclasses import dataclass, fields
from pathlib import Path

from .errors import TritnetError


class ConfigError(TritnetError, ValueError):
    """A config value is out of range, of the wrong type, or unknown."""


@dataclass
class ModelConfig:
    """The model: a byte-level decoder with a ternary code memory (docs/model.md). A checkpoint's
    arrays are made for these fields, so a resumed run keeps every one; CodeMemoryLM and its
    blocks read nothing else."""

    vocab_size: int = 256          # bytes
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    context: int = 256             # longest sequence the model is built for
    position: str = "nope"         # attention positions: "nope" (none: the causal mask alone),
                                   # or "alibi" (a fixed per-head recency bias); the presets
                                   # choose; a config that does not name it gets "nope"
    n_experts: int = 4             # MoEGraph partitions: routing centroids and ternary experts
    expert_hidden: int = 256
    top_k: int = 2                 # experts per token
    expert_capacity: float = 0.0   # the most entries an expert takes, in fair shares (tokens
                                   # · top_k / n_experts); entries past it, in token order,
                                   # are dropped (Switch Transformer's capacity factor).
                                   # 0: every entry runs
    codebook_dim: int = 64         # CODEBOOK_DIM
    shared_vq_size: int = 4096     # SHARED_VQ_SIZE
    kgvq_size: int = 1024          # KGVQ_CODEBOOK_SIZE
    kgvq_dim: int = 64             # KGVQ_CODEBOOK_DIM
    graph_slots: int = 8           # out-edges kept per code (dense) or per bucket (active)
    graph_capacity: int = 0        # active-edge capacity; 0: dense edges (one bucket per code)
    vq_search: str = "exact"       # "exact" or "routed"
    vq_beta: float = 0.25          # commitment weight
    aux_loss_weight: float = 0.01  # weight of VQ and load-balancing losses in the total
    use_shared_vq: bool = True     # ablation switches (benchmarks/ablation.py)
    use_kgvq: bool = True
    use_graph_edges: bool = True
    use_composite_head: bool = True
    memory_values: bool = False    # the code memory reads a value table (rows trained by the
                                   # loss, one per code) beside the code itself
    quiet_memory: bool = False     # the code memory's readouts start at 1/8 of unit scale, so
                                   # the untrained memory adds little noise to the stream
    ngram_memory: int = 0          # the longest n-gram the n-gram memory reads (0: none): each
                                   # token's embedding gains one table row per n = 2 … this,
                                   # chosen by a hash of the token and the n - 1 before it
    ngram_rows: int = 65536        # rows of the n-gram memory's table (all orders share it)
    ngram_gate_layer: int = 0      # with the n-gram memory: its rows are added again at the
                                   # input of this block, gated by how well they agree with
                                   # the stream there (0: only at the embedding; nothing
                                   # without the n-gram memory or past the last block)

    @classmethod
    def of(cls, config) -> "ModelConfig":
        """The model's fields of `config` (a Config, or a ModelConfig itself)."""
        return cls(**{f.name: getattr(config, f.name) for f in fields(cls)})

    def validate(self) -> "ModelConfig":
        return _validate(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class RunConfig:
    """How a run trains the model: activations, products, the optimiser, the run's length
    and its logging. Any of these may change when a run is resumed."""

    # --- how the step runs -------------------------------------------------------------------
    recompute: bool = False        # keep one block's activations, recompute each in backward:
                                   # bit-identical training, far less memory, a second forward
    recompute_keep: int = 0        # with recompute: the last this-many blocks keep their
                                   # activations instead (no second forward for them): the
                                   # memory a budget leaves, spent on speed
    matmul_precision: str = "tf32" # float32 products on the GPU: "tf32" (tensor cores) or
                                   # "fp32" (backend.set_matmul_precision); the CPU is fp32
    cuda_graph: bool = True        # on a GPU, replay each training step from CUDA graphs
                                   # (tritnet/capture.py) when the run allows (one rank, one
                                   # micro-batch); else, and on the CPU, steps run eagerly
    # --- optimiser: TritFlip (tritnet/optim.py explains each) --------------------------------
    flip_threshold: int = 64
    ngram_flip_threshold: int = 0  # the n-gram memory table's flip threshold (0: flip_threshold;
                                   # nothing without the n-gram memory): its rows gather
                                   # gradient only on the steps that read them
    scale_threshold: int = 64
    decay_shift: int = 0
    grad_rms_units: int = 8
    grad_clip_units: int = 8       # the most one step's gradient adds to an accumulator; 0: off
    schedule: str = "constant"     # the gain's decay over `steps`: "constant" or "cosine" (to
    final_grad_rms_units: float = 1.0  # final_grad_rms_units at the last step; optim.py)
    flip_carry: bool = False       # a flip keeps the accumulator's place (a ∓ 2·threshold)
                                   # instead of zeroing it
    accum_init: str = "zero"       # a new run's accumulators: "zero" or "spread" (uniform in
                                   # ±(flip_threshold - 1))
    grad_norm: str = "tensor"      # G's normalisation before quantisation: "tensor" (one RMS),
                                   # "row" or "factored" (per row × per column)
    # --- training run -----------------------------------------------------------------------
    batch_size: int = 16
    seq_len: int = 128
    micro_batches: int = 1         # shards of a step's batch, combined exactly (distributed.py);
                                   # with N GPUs a multiple of N (1 means: one per GPU)
    steps: int = 1000
    eval_every: int = 100
    eval_batches: int = 8
    save_every: int = 500
    seed: int = 0

    def validate(self) -> "RunConfig":
        return _validate(self)


@dataclass
class Config(RunConfig, ModelConfig):
    """A run as users write it: the model's fields, then the run's, in one flat table (one
    JSON or TOML file, one CLI flag per field; a checkpoint stores it as it is)."""

    def validate(self) -> "Config":
        return _validate(self)

    @property
    def model(self) -> ModelConfig:
        return ModelConfig.of(self)

    # --- files and overrides ----------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def save(self, path) -> None:
        """Write JSON (.json) or TOML (.toml), chosen by the suffix; atomically (a temporary
        file renamed onto `path`), so a failed write leaves the file there as it was."""
        path = Path(path)
        if path.suffix == ".toml":
            text = "\n".join(f"{k} = {_toml_value(v)}" for k, v in self.to_dict().items())
        else:
            text = self.to_json()
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            tmp.write_text(text + "\n")
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise

    def override(self, **values) -> "Config":
        """A validated copy with `values` replacing fields (None values are ignored)."""
        values = {k: v for k, v in values.items() if v is not None}
        unknown = sorted(set(values) - set(_FIELD_TYPES))
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(unknown)}; known fields: "
                              f"{', '.join(_FIELD_TYPES)}")
        return dataclasses.replace(self, **values).validate()


def _validate(config):
    """Check the fields `config` has (a Config, or its model's or run's part), and the rules
    between them; returns config. Floats given as ints become floats."""
    has = {f.name for f in fields(config)}

    def rule(*names):
        return has.issuperset(names)

    for f in fields(config):
        value = getattr(config, f.name)
        kind = _FIELD_TYPES[f.name]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
            setattr(config, f.name, value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ConfigError(f"config field {f.name} = {value!r}: expected "
                              f"{kind.__name__}")
    for name, (lo, hi) in _RANGES.items():
        if name not in has:
            continue
        value = getattr(config, name)
        if not lo <= value <= hi:
            raise ConfigError(f"config field {name} = {value!r} is out of range: "
                              f"expected {lo} <= {name} <= {hi}")
    for name, allowed in _CHOICES.items():
        if name in has and getattr(config, name) not in allowed:
            quoted = [repr(a) for a in allowed]
            raise ConfigError(f"config field {name} = {getattr(config, name)!r}: expected "
                              f"{', '.join(quoted[:-1])} or {quoted[-1]}")
    if rule("final_grad_rms_units", "grad_rms_units") and \
            config.final_grad_rms_units > config.grad_rms_units:
        raise ConfigError(f"config field final_grad_rms_units = {config.final_grad_rms_units} "
                          f"exceeds grad_rms_units = {config.grad_rms_units} (the schedule "
                          "decays the gain)")
    if rule("d_model", "n_heads") and config.d_model % config.n_heads:
        raise ConfigError(f"config field d_model = {config.d_model} must be divisible by "
                          f"n_heads = {config.n_heads}")
    if rule("expert_capacity") and 0 < config.expert_capacity < 1:
        raise ConfigError(f"config field expert_capacity = {config.expert_capacity} is below "
                          "one fair share: expected 0 (no dropping) or at least 1")
    if rule("ngram_memory") and config.ngram_memory == 1:
        raise ConfigError("config field ngram_memory = 1: the token's own row is the "
                          "embedding; expected 0 (off) or the longest n-gram, 2 or more")
    if rule("recompute_keep", "n_layers") and config.recompute_keep > config.n_layers:
        raise ConfigError(f"config field recompute_keep = {config.recompute_keep} exceeds "
                          f"n_layers = {config.n_layers}")
    if rule("top_k", "n_experts") and config.top_k > config.n_experts:
        raise ConfigError(f"config field top_k = {config.top_k} exceeds n_experts = "
                          f"{config.n_experts}")
    if rule("seq_len", "context") and config.seq_len > config.context:
        raise ConfigError(f"config field seq_len = {config.seq_len} exceeds context = "
                          f"{config.context}")
    if rule("batch_size", "micro_batches") and config.batch_size % config.micro_batches:
        raise ConfigError(f"config field batch_size = {config.batch_size} must be divisible by "
                          f"micro_batches = {config.micro_batches} (equal shards)")
    if rule("graph_capacity", "graph_slots") and config.graph_capacity and \
            config.graph_capacity % config.graph_slots:
        raise ConfigError(f"config field graph_capacity = {config.graph_capacity} must be a "
                          f"multiple of graph_slots = {config.graph_slots}")
    return config


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    return repr(v)


_FIELD_TYPES = {f.name: {"int": int, "float": float, "bool": bool, "str": str}[f.type]
                for f in fields(Config)}

_CHOICES = {   # fields that take one of a few names
    "position": ("alibi", "nope"), "schedule": ("constant", "cosine"),
    "accum_init": ("zero", "spread"), "grad_norm": ("tensor", "row", "factored"),
    "matmul_precision": ("fp32", "tf32"), "vq_search": ("exact", "routed"),
}

_RANGES = {
    "vocab_size": (2, 65536), "d_model": (8, 65536), "n_layers": (1, 1024),
    "n_heads": (1, 1024), "context": (2, 1 << 20), "n_experts": (1, 4096),
    "expert_hidden": (1, 1 << 20), "top_k": (1, 64), "codebook_dim": (1, 4096),
    "shared_vq_size": (1, 1 << 31), "kgvq_size": (1, 1 << 31), "kgvq_dim": (1, 4096),
    "graph_slots": (1, 64), "ngram_memory": (0, 16), "ngram_rows": (1, 1 << 31),
    "ngram_gate_layer": (0, 1023),
    "graph_capacity": (0, 1 << 31), "vq_beta": (0.0, 100.0),
    "expert_capacity": (0.0, 4096.0), "recompute_keep": (0, 1024),
    "aux_loss_weight": (0.0, 100.0), "flip_threshold": (1, 127), "scale_threshold": (1, 127),
    "ngram_flip_threshold": (0, 127), "decay_shift": (0, 7), "grad_rms_units": (1, 127),
    "grad_clip_units": (0, 127),
    "final_grad_rms_units": (0.001, 127.0), "batch_size": (1, 1 << 20),
    "micro_batches": (1, 1 << 16),
    "seq_len": (1, 1 << 20), "steps": (0, 1 << 40), "eval_every": (0, 1 << 40),
    "eval_batches": (1, 1 << 20), "save_every": (0, 1 << 40), "seed": (0, 2**63 - 1),
}

# Presets: named overrides of the defaults above (the `tiny` model).
PRESETS = {
    # trains on a two-core CPU: `tritnet train` with no options, about 4 minutes. 1,000 steps
    # of 32 x 32 tokens learn far better than 500 of 64 x 32 (the same tokens): 2.68 against
    # 2.76 held-out bpb on Python 3.11's library (every held-out window); with the quiet
    # memory 2.59, with the n-gram memory (n up to 6, 65,536 rows) 2.13, and with that table
    # flipping at 8 accumulated units instead of 64 2.03. Its rows added again, gated, at the
    # second block, from 262,144 rows: 2.00; with the gain's cosine decay from 8 to 2 units,
    # 1.92 (two seeds each; benchmarks/results/learning/).
    "tiny": dict(batch_size=32, seq_len=32, steps=1000, eval_every=200, save_every=200,
                 eval_batches=16, position="alibi", quiet_memory=True, ngram_memory=6,
                 ngram_rows=262_144, ngram_flip_threshold=8, ngram_gate_layer=1,
                 schedule="cosine", final_grad_rms_units=2.0),
    # The comparison preset: 18.3M logical trits outside the memory tables. 5M tokens of the
    # default corpus learn best at 128 x 32 tokens a step with the cosine gain (32 x 32 was
    # 0.006 bpb better at 5M tokens and ~30% slower). The code memory starts quiet and reads
    # a value per code (quiet_memory, memory_values): at 32 x 32 both together were 0.06 bpb
    # ahead of the plain memory after 4M tokens. The n-gram memory (n up to 6, 524,288 rows)
    # took 5M tokens from 2.01 to 1.91 held-out bpb (three seeds) and 20M tokens from 1.81 to
    # 1.79 (benchmarks/results/learning/). Blocks are recomputed in backward: a step at
    # 128 x 32 peaks at 0.87 GiB.
    "small": dict(d_model=384, n_layers=6, n_heads=6, context=512, n_experts=4,
                  expert_hidden=768, shared_vq_size=131_072, kgvq_size=16_384,
                  graph_capacity=1 << 16, batch_size=128, seq_len=32, position="alibi",
                  schedule="cosine", recompute=True, quiet_memory=True, memory_values=True,
                  ngram_memory=6, ngram_rows=524_288),
    # ≈ 3.0B logical trits: CODEBOOK_DIM 64, SHARED_VQ_SIZE 10M, KGVQ 5M × 64. The first 3
    # blocks are recomputed in backward: a step at 4 x 512 fits in 16 GB (14.62
    # GiB = 15.70 GB keeping 21 blocks, 14.11 GiB keeping 20, 15.85 GiB = 17.0 GB without
    # recomputation, 7.32 GiB keeping none; each kept block ~0.5 GiB and ~0.8% tokens/s)
    "default": dict(d_model=2560, n_layers=24, n_heads=20, context=1024, n_experts=8,
                    expert_hidden=1424, shared_vq_size=10_000_000, kgvq_size=5_000_000,
                    graph_slots=8, graph_capacity=1 << 18, vq_search="routed",
                    batch_size=4, seq_len=512, position="alibi", recompute=True,
                    recompute_keep=21),
}


def preset(name: str) -> Config:
    if not isinstance(name, str) or name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}: expected one of {', '.join(PRESETS)}")
    return Config(**PRESETS[name]).validate()


def load_config(path, base: Config | None = None) -> Config:
    """Fields from a JSON or TOML file over `base` (default: the dataclass defaults, Config();
    the CLI lays a file over its --preset), validated."""
    path = Path(path)
    try:
        if not path.is_file() and path.exists():
            raise ConfigError(f"config file {path} is not a regular file; give a .json or "
                              ".toml file")
        blob = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"config file {path}: cannot be read ({e.strerror})") from None
    try:
        text = blob.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {e.start} is "
                          f"{blob[e.start]:#04x}); save it as UTF-8") from None
    try:
        if path.suffix == ".toml":
            import tomllib  # Python ≥ 3.11
            values = tomllib.loads(text)
        else:
            values = json.loads(text)
    except ImportError:
        raise ConfigError(f"config file {path}: TOML needs Python 3.11 or newer; use JSON") \
            from None
    except Exception as e:
        raise ConfigError(f"config file {path}: not valid {path.suffix.lstrip('.') or 'JSON'}"
                          f" ({e})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path}: expected a table of field = value")
    try:
        if "preset" in values:
            base = preset(values.pop("preset"))
        return (base or Config()).override(**values)
    except ConfigError as e:
        raise ConfigError(f"config file {path}: {e}") from None
