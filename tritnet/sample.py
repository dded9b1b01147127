"""Using a trained checkpoint: rebuild its model, and sample from it autoregressively.

    model, config = load_model("runs/tiny/ckpt.h5")
    text = bytes(sample(model, b"def ", 200, temperature=0.8, top_k=40)).decode(errors="replace")

Generation itself (the KV cache, sampling, stop sequences) is `CodeMemoryLM.generate`.
"""

from __future__ import annotations

import os

from . import backend
from .checkpoint import CheckpointError, read_header, verify_checkpoint
from .config import Config, ConfigError
from .models import CodeMemoryLM


def read_config(path) -> Config:
    """A checkpoint's own Config, read from its header (no weights loaded)."""
    header = read_header(path)
    try:
        return Config().override(**header["config"])
    except ConfigError as e:
        raise CheckpointError(f"checkpoint {os.fspath(path)}: its config cannot be used ({e}); "
                              "was it written by a newer tritnet?") from None


def load_model(path, device=None):
    """(model in eval mode, its Config) from a checkpoint; the config is the file's own. The
    file is verified whole (against the model its config describes, built on the meta device)
    before the model is built."""
    ckpt = verify_checkpoint(path)
    if ckpt.module != "CodeMemoryLM":
        raise CheckpointError(f"checkpoint {os.fspath(path)} holds a {ckpt.module}, not "
                              "tritnet's language model (CodeMemoryLM); load it with "
                              "tritnet.checkpoint.load_checkpoint and your model")
    config = Config().override(**ckpt.config)   # verified: a valid Config
    backend.set_device(device if device is not None else os.environ.get("TRITNET_DEVICE"))
    model = CodeMemoryLM(config)
    ckpt.load_into(model)
    model.eval()
    return model, config


def sample(model, prompt, n_tokens: int, *, temperature: float = 1.0, top_k: int = 0,
           seed: int = 0) -> list:
    """`n_tokens` new tokens after `prompt` (bytes or a list of token ids; empty: a newline):
    model.generate with top_k 0 meaning every token, and top_k ignored at temperature 0."""
    top_k = top_k if temperature and top_k else None
    return model.generate(list(prompt) or [10], n_tokens, temperature=temperature, top_k=top_k,
                          seed=seed)
