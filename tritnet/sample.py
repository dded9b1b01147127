"""Using a trained checkpoint: rebuild its model, and sample from it autoregressively.

    model, config = load_model("runs/tiny/ckpt.h5")
    text = bytes(sample(model, b"def ", 200, temperature=0.8, top_k=40)).decode(errors="replace")
"""

from __future__ import annotations

import os

import numpy as np

from . import backend
from .autograd import no_grad
from .checkpoint import CheckpointError, verify_checkpoint
from .config import Config
from .data import DataError
from .models import CodeMemoryLM


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
    """`n_tokens` new tokens after `prompt` (bytes or a list of token ids; empty: a newline).

    temperature 0 picks the most likely token; top_k > 0 samples among the k most likely only.
    The model sees at most the last `seq_len` tokens, the length it was trained on (attention
    has no positional encoding, and longer windows than it learned on read worse); there is no
    cache: each new token reruns the window.
    """
    vocab, window_len = model.config.vocab_size, min(model.config.seq_len, model.config.context)
    tokens = list(prompt) or [10]
    if max(tokens) >= vocab or min(tokens) < 0:
        raise DataError(f"the prompt holds token {max(tokens)}, outside the model's vocabulary "
                        f"of {vocab}; use a prompt the model was trained on")
    rng = np.random.default_rng(seed)
    xp = backend.xp()
    was_training = model.training
    model.eval()
    with no_grad():
        for _ in range(n_tokens):
            window = xp.asarray(np.asarray([tokens[-window_len:]], dtype=np.int64))
            logits, _ = model(window)
            last = backend.to_numpy(logits.data[0, -1]).astype(np.float64)
            if temperature == 0:
                tokens.append(int(last.argmax()))
                continue
            last = last / temperature
            if 0 < top_k < len(last):
                last[last < np.partition(last, -top_k)[-top_k]] = -np.inf
            p = np.exp(last - last.max())
            tokens.append(int(rng.choice(len(p), p=p / p.sum())))
    model.train(was_training)
    return tokens[len(tokens) - n_tokens:]
