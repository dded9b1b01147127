"""The training loop behind `tritnet train`, nanoGPT-plain: read it top to bottom.

    train(config, out_dir="runs/tiny")    # the tiny preset on the default corpus

A run folder (`out_dir`) holds one run:

    config.json        the run's Config, written when the run starts (and on resume)
    tokenizer.json     the subword tokenizer of a run on BPE tokens (also in every checkpoint)
    metrics.jsonl      one JSON object per step: step, tokens, loss, train_bpb, tokens_per_s,
                       elapsed; at evaluation points also val_bpb and bigram_bpb
    ckpt.h5            the latest checkpoint (tritnet/checkpoint.py: atomic, HDF5), written
                       every `save_every` steps, at the end, on Ctrl-C and on a non-finite loss
    previous-<time>/   an earlier run's files, moved aside (never deleted) by overwrite=True
    .lock              held (flock) while a run uses the folder: a second run is refused

A folder that already holds a run is refused unless `resume` (continue it from ckpt.h5) or
`overwrite` (move its files to previous-<time>/ once the new run is ready to start, so no
checkpoint is ever deleted). Resume is bit-exact: the checkpoint restores the integer model
state, the optimiser's step, tritnet's RNG and the data position, so the losses of an
interrupted-and-resumed run equal those of an uninterrupted one.

Faults: a NaN or inf loss is caught before the optimiser's step, so the weights, the
optimiser, the integer statistics (VQ usage, code-graph edges: applied at the step too) and the
data position are still those of the last good step; that state is saved and LossNotFinite is
raised. Ctrl-C is taken at the next step boundary, never mid-update: the run saves ckpt.h5 and
raises KeyboardInterrupt (the CLI exits 130). A second Ctrl-C stops at once, without saving.

Data-parallel (tritnet/distributed.py): `gpus=N` starts one process per GPU; each rank draws
the same global batch and runs its shards of it; the step's loss, its finiteness and a Ctrl-C
are agreed through one all-reduce, so all ranks stop on the same step. Rank 0 alone logs,
evaluates and writes the run folder; every checkpoint is preceded by a check that all ranks
hold identical state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import gc
import json
import math
import os
import signal
import sys
import time

import numpy as np

from . import backend, data as tdata, distributed
from . import rng as trandom
from .autograd import no_grad
from .checkpoint import CheckpointWriter, load_checkpoint, read_header
from .config import Config, ConfigError
from .errors import TritnetError
from .capture import CapturedStep
from .models import CodeMemoryLM
from .nn.ternary import TernaryModule
from .optim import TritFlip

RUN_FILES = ("config.json", "ckpt.h5", "metrics.jsonl", "tokenizer.json")


class TrainError(TritnetError):
    """The run cannot start or go on; the message says what and how to fix it."""


class LossNotFinite(TrainError):
    """The loss became NaN or inf; the last good step was saved."""


# --------------------------------------------------------------------------------------------
# Pieces the loop uses (also used by `tritnet eval`).


def _silent(*_):
    """The log of ranks other than 0."""


def steps_for_tokens(tokens: int, batch_size: int, seq_len: int) -> int:
    """Steps that train on at least `tokens` tokens: ceil(tokens / (batch_size * seq_len))."""
    return math.ceil(tokens / (batch_size * seq_len))


def evaluate(model, batches) -> float:
    """Mean cross-entropy (nats/token) of `model` over fixed held-out batches, in eval mode."""
    was_training = model.training
    model.eval()
    ces, sizes = [], []
    with no_grad():
        for x, y in batches:
            _, ce = model.loss(x, y)
            ces.append(ce.data.reshape(1))   # stays on the device: one host sync at the end
            sizes.append(x.size)
    model.train(was_training)
    if not ces:
        raise ValueError("evaluate: no held-out batches to score; give at least one")
    values = backend.to_numpy(backend.get_array_module(ces[0]).concatenate(ces)).tolist()
    total = 0.0
    for value, size in zip(values, sizes):
        total += value * size
    return total / sum(sizes)


def evaluate_checkpoint(checkpoint, *, data=None, dtype=None, batches=None, seq_len=None,
                        device=None) -> dict:
    """The held-out score of a checkpoint's model beside the bigram baseline (`tritnet eval`).

    data: a Corpus, or a path for load_corpus (with `dtype` for a .bin); without it the
    default corpus, which a checkpoint trained on other data refuses (the message names that
    data). A checkpoint with a tokenizer scores its tokens of the text, per byte. batches:
    held-out batches to score (default: the config's eval_batches; 0: all). seq_len: tokens
    per scored window, each scored from its own first token (default: the training seq_len;
    at most the model's context).

    Returns {"val": held-out score, "bigram": the baseline's, "unit": "bpb" or "bits/token",
    "tokens": tokens scored, "source": the data's name, "trained_on": the name of the data
    the model was trained on when that is other data, else None}.
    """
    from .sample import load_model
    from .tokenizer import checkpoint_tokenizer
    model, config = load_model(checkpoint, device=device)
    tokenizer = checkpoint_tokenizer(checkpoint)
    trained_on = read_header(checkpoint)["train_state"].get("data_id")
    seq_len = config.seq_len if seq_len is None else seq_len
    if seq_len > config.context:
        raise ConfigError(f"--seq-len {seq_len} exceeds the model's context = {config.context}; "
                          f"score windows of at most {config.context} tokens")
    corpus = data if isinstance(data, tdata.Corpus) else tdata.load_corpus(data, dtype=dtype)
    if tokenizer is not None:   # the text as the model's tokens; scores stay per byte
        corpus = tokenizer.encode_corpus(corpus)
    if corpus.vocab_size > config.vocab_size:
        raise tdata.DataError(f"{corpus.source} has vocabulary {corpus.vocab_size}, the model "
                              f"{config.vocab_size}: it cannot score tokens >= "
                              f"{config.vocab_size}; pass data of the model's vocabulary")
    own = trained_on is None or tdata.same_data(trained_on, corpus.identity())
    if not own and data is None:
        raise tdata.DataError(f"{checkpoint} was trained on {trained_on['source']}, not on the "
                              "default corpus; score its own held-out split with --data "
                              "pointing at that data, or other data with --data PATH")
    corpus.check_seq_len(seq_len)
    limit = config.eval_batches if batches is None else (batches or None)
    windows = list(tdata.eval_batches(corpus.val, config.batch_size, seq_len, limit))
    per_byte = corpus.tokens_per_byte_of(np.concatenate([y for _, y in windows]))
    return {"val": tdata.bits_per_byte(evaluate(model, windows), per_byte),
            "bigram": tdata.bigram_bpb(corpus.train, corpus.val, corpus.vocab_size,
                                       corpus.tokens_per_byte_of(corpus.val[1:])),
            "unit": "bpb" if corpus.tokens_per_byte is not None else "bits/token",
            "tokens": sum(x.size for x, _ in windows), "source": corpus.source,
            "trained_on": None if own else trained_on["source"]}


def build(config: Config, device=None):
    """(model, optimizer) from the config's fields; sets the process's matmul precision."""
    backend.set_matmul_precision(config.matmul_precision)
    try:
        model = CodeMemoryLM(config.model, device=device, recompute=config.recompute,
                             recompute_keep=config.recompute_keep)
    except ValueError as e:   # a combination of fields the model cannot be built with
        raise ConfigError(str(e)) from None
    optimizer = TritFlip(model, flip_threshold=config.flip_threshold,
                         scale_threshold=config.scale_threshold, decay_shift=config.decay_shift,
                         grad_rms_units=config.grad_rms_units,
                         grad_clip_units=config.grad_clip_units, seed=config.seed,
                         schedule=config.schedule,
                         final_grad_rms_units=config.final_grad_rms_units,
                         total_steps=config.steps, flip_carry=config.flip_carry,
                         accum_init=config.accum_init, grad_norm=config.grad_norm,
                         flip_thresholds={model.ngram.table: config.ngram_flip_threshold}
                         if config.ngram_memory and config.ngram_flip_threshold else None)
    optimizer.set_groups(model.components())
    return model, optimizer


@contextlib.contextmanager
def frozen_heap():
    """Freeze what is alive (gc.freeze) for a training loop, unfreeze it after.

    What exists when a loop starts -- the model, imported libraries, compiled kernels: ~500k
    objects -- outlives the loop. Frozen, it leaves the cyclic collector's generations, so
    the collector's full passes stop rescanning it every few steps: unfrozen, they cost 16 ms
    a step on the small preset and 42 ms on the default (H200); frozen, 10 ms on the small.
    Garbage cycles from before are collected first, not frozen, and a process that goes on after the
    loop (a notebook, a sweep) gets the usual collector back.
    """
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _check_vocab(corpus, config):
    if corpus.vocab_size > config.vocab_size:
        raise TrainError(f"the data has vocabulary {corpus.vocab_size} but the model's "
                         f"vocab_size is {config.vocab_size}; set vocab_size = "
                         f"{corpus.vocab_size} in a --config file")


def _existing_run(out_dir):
    return [n for n in RUN_FILES if os.path.exists(os.path.join(out_dir, n))]


def _move_aside(out_dir, names) -> str:
    """Move an earlier run's files into out_dir/previous-<time>/ (same filesystem: renames)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target, n = os.path.join(out_dir, f"previous-{stamp}"), 1
    while os.path.exists(target):
        n += 1
        target = os.path.join(out_dir, f"previous-{stamp}-{n}")
    os.makedirs(target)
    for name in names:
        os.replace(os.path.join(out_dir, name), os.path.join(target, name))
    return target


def _trim_metrics(path, last_step):
    """Drop metrics of steps after the checkpoint we resume from (they will be redone), and a
    line cut short by a kill."""
    if not os.path.exists(path):
        return

    def kept(line):
        try:
            return json.loads(line)["step"] <= last_step
        except (ValueError, KeyError, TypeError):
            return False

    tmp = path + ".tmp"
    try:
        with open(path) as fh:
            lines = fh.readlines()
        keep = [line for line in lines if kept(line)]
        if len(keep) != len(lines):
            with open(tmp, "w") as fh:
                fh.writelines(keep)
            os.replace(tmp, path)
    except (OSError, UnicodeDecodeError) as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise TrainError(f"resume: cannot rewrite {path} without the rows after the "
                         f"checkpoint's step {last_step} ({getattr(e, 'strerror', None) or e}); "
                         "it is as it was. Free disk space (or make the folder writable), then "
                         "--resume again") from None


def _append_metrics(path, row, ckpt_path, writer=None):
    """Add one row to metrics.jsonl, whole or not at all (`writer`: the run's
    CheckpointWriter, whose write in flight is waited for before the error says what was
    saved)."""
    line, end = (json.dumps(row) + "\n").encode(), None
    try:
        with open(path, "ab", buffering=0) as fh:
            end = fh.seek(0, os.SEEK_END)
            done = 0
            while done < len(line):
                done += fh.write(line[done:])
    except OSError as e:
        if end is not None:
            with contextlib.suppress(OSError):
                os.truncate(path, end)
        if writer is not None:
            writer.join()   # a checkpoint still being written counts once it is in place
        kept = (f"the steps since its last checkpoint ({ckpt_path}) are lost; free disk "
                "space, then --resume") if os.path.exists(ckpt_path) else \
            "it had saved no checkpoint yet; free disk space and start it again (--overwrite)"
        raise TrainError(f"cannot write {path} ({e.strerror}): the run stopped at step "
                         f"{row['step']}, and {kept}") from None


class _RunLock:
    """The lock of a run folder: `.lock` in it, held (flock) while a run uses the folder.

    The kernel drops the lock when its process ends, however it ends, so the file a killed run
    leaves behind never blocks the next one; it holds the holder's pid, for the message. A
    folder the lock created is removed again if the run leaves nothing else in it."""

    def __init__(self, out_dir):
        self.out_dir, self.path = out_dir, os.path.join(out_dir, ".lock")

    def __enter__(self):
        self.created = not os.path.isdir(self.out_dir)
        try:
            os.makedirs(self.out_dir, exist_ok=True)
            while True:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
                    os.close(fd)
                    raise TrainError(f"run folder {self.out_dir} is in use by another run (pid "
                                     f"{holder}); wait for it to end, or choose another "
                                     "--out") from None
                try:   # the holder that just let go may have removed the file: lock the new one
                    if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                        break
                except FileNotFoundError:
                    pass
                os.close(fd)
        except OSError as e:
            raise TrainError(f"cannot lock the run folder {self.out_dir} ({e.strerror}); "
                             "choose another --out") from None
        with contextlib.suppress(OSError):   # only for the message; a full disk may refuse it
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def __exit__(self, *exc):
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        os.close(self.fd)
        if self.created:
            with contextlib.suppress(OSError):
                os.rmdir(self.out_dir)   # only if empty: a run that failed at its start
        return False


def _duration(seconds) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class _Progress:
    """One status line rewritten in place (a TTY), or nothing: log lines clear it first."""

    def __init__(self, enabled, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.shown = False

    def update(self, text):
        if self.enabled:
            self.stream.write("\r" + text + "\x1b[K")
            self.stream.flush()
            self.shown = True

    def clear(self):
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.shown = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.clear()   # an error message must not land on the end of a status line
        return False


class _StopOnSigint:
    """Turn the first Ctrl-C into a flag the loop checks between steps (a save mid-update
    would keep half a step); a second Ctrl-C raises at once."""

    def __init__(self):
        self.requested = False
        self.previous = None

    def __enter__(self):
        try:
            self.previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:   # not the main thread: leave Ctrl-C as it is
            self.previous = None
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        sys.stderr.write("\ntritnet: stopping after this step to save a checkpoint (Ctrl-C "
                         "again: stop now, without saving)\n")

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
        return False


# --------------------------------------------------------------------------------------------
# The loop.


def train(config: Config, *, data=None, out_dir, resume=False, overwrite=False, device=None,
          tokens=None, log=print, progress=True, dtype=None, gpus=None, group=None,
          tokenizer=None) -> dict:
    """Train `config` on `data` (a Corpus, a path for load_corpus with `dtype` for a .bin, or
    None for the default corpus), keeping the run in `out_dir`; `tokens` sets the steps.
    `tokenizer` (tritnet.tokenizer.Tokenizer): train on its subword tokens of the text, with
    config.vocab_size its size; a resumed run takes its checkpoint's.

    `gpus=N` (N > 1) trains data-parallel on N GPUs of this host, one process each; a process
    started by a launcher finds its rank in the environment (tritnet/distributed.py); `group`
    passes a rank group directly.

    Returns the final metrics (step, tokens, loss, val_bpb, bigram_bpb, elapsed, unit).
    Raises TrainError, DataError, CheckpointError, ConfigError, DeviceError or
    DistributedError with a message that says how to fix the problem, and KeyboardInterrupt
    after saving on Ctrl-C.
    """
    out_dir = os.fspath(out_dir)
    config = config.validate()
    if gpus is not None and (not isinstance(gpus, int) or isinstance(gpus, bool) or gpus < 1):
        raise ConfigError(f"gpus = {gpus!r}: expected a positive integer")
    if gpus and gpus > 1 and group is None:   # one process per GPU, each running train()
        if distributed.group_from_env_size() > 1:
            raise TrainError("--gpus starts its own ranks, but this process was started as a "
                             "rank (WORLD_SIZE is set): drop --gpus under a launcher")
        return distributed.launch(gpus, train, dict(
            config=config, data=data, out_dir=out_dir, resume=resume, overwrite=overwrite,
            device=device, tokens=tokens, progress=progress, dtype=dtype, tokenizer=tokenizer))
    with contextlib.ExitStack() as held:   # the run folder's lock, however the run ends
        # the folder, the data, the model and optimiser, and where the run starts
        run = _Run(config, data=data, out_dir=out_dir, resume=resume, overwrite=overwrite,
                   device=device, tokens=tokens, log=log, progress=progress, dtype=dtype,
                   group=group, held=held, tokenizer=tokenizer)
        step = run.training_step()   # chosen once: replayed from CUDA graphs, or eager
        run.begin()
        with _StopOnSigint() as stop, run.bar, frozen_heap():
            while run.step < run.config.steps and not run.stopping:
                run.train_one_step(step, stop)   # a step, its metrics row, a checkpoint
            run.finish()
        return run.result()


class EagerStep:
    """A training step run op by op: each of this rank's shards of the global batch runs its
    forward and backward (the optimiser draws that shard's random bits), the shards'
    contributions are combined over all shards (distributed.StepReducer), then the
    optimiser's update. The interface of CapturedStep, which replays the same step from CUDA
    graphs where it can: forward_backward, then update, or drop for a step not to apply."""

    def __init__(self, model, optimizer, group, shards: int):
        self.model, self.optimizer, self.group = model, optimizer, group
        self.local_shards = shards // group.size
        self.reducer = distributed.StepReducer(model, group, shards) if shards > 1 else None
        self.shards = shards

    def forward_backward(self, x, y):
        """(loss, cross-entropy) of batch (x, y), summed over this rank's shards, as (1,)
        device arrays, after each shard's backward."""
        rows_per_shard = x.shape[0] // self.shards
        losses, ces = [], []
        for j in range(self.local_shards):
            shard = self.group.rank * self.local_shards + j
            rows = slice(shard * rows_per_shard, (shard + 1) * rows_per_shard)
            self.optimizer.begin_shard(shard)
            loss, ce = self.model.loss(x[rows], y[rows])
            loss.backward()
            if self.reducer is not None:
                self.reducer.collect()
            losses.append(loss.data.reshape(1))
            ces.append(ce.data.reshape(1))
        xp = backend.get_array_module(losses[0])
        return xp.stack(losses).sum(0), xp.stack(ces).sum(0)

    def update(self):
        if self.reducer is not None:
            self.reducer.reduce()
        self.optimizer.step()

    def drop(self):
        """Apply nothing of this step (its loss was not finite)."""
        self.optimizer.zero_grad()
        if self.reducer is not None:
            self.reducer.clear()


class _Replayed:
    """CapturedStep with EagerStep's results: (loss, cross-entropy) as (1,) arrays."""

    def __init__(self, captured):
        self.captured, self.update, self.drop = captured, captured.update, captured.drop

    def forward_backward(self, x, y):
        loss, ce = self.captured.forward_backward(x, y)
        return loss.reshape(1), ce.reshape(1)


class _Run:
    """One training run: its folder, data, model and optimiser, where it stands, and what it
    writes (metrics rows, checkpoints, log lines). Made ready by __init__ (folder checked and
    locked, data loaded, model built or resumed); the loop in `train` drives it."""

    def __init__(self, config, *, data, out_dir, resume, overwrite, device, tokens, log,
                 progress, dtype, group, held, tokenizer):
        group = group if group is not None else distributed.group_from_env()
        self.group, self.is_main, self.out_dir = group, group.rank == 0, out_dir
        self.log = log if self.is_main else _silent
        config, device = self._fit_to_ranks(config, group, device)
        if tokens is not None:
            if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 1:
                raise ConfigError(f"tokens = {tokens!r}: expected a positive integer")
            config = config.override(steps=steps_for_tokens(tokens, config.batch_size,
                                                            config.seq_len))
        self.config = config
        existing, self.tokenizer = self._claim_folder(resume, overwrite, held, tokenizer)
        # Checkpoints between the first step and the last are written in the background while
        # training goes on; however the run ends, the write in flight finishes first (before
        # the folder's lock is let go).
        self.writer = CheckpointWriter()
        held.push(self._end_writes)
        group.barrier()   # every rank has looked at the folder before rank 0 changes it

        # Device and seeds first: the model's initial trits come from tritnet.rng.
        backend.set_device(device if device is not None else os.environ.get("TRITNET_DEVICE"))
        trandom.manual_seed(config.seed)
        self._load_data(data, dtype)
        # Model and optimiser, then the run's starting point.
        self.model, self.optimizer = build(config)
        trits = sum(m.logical_trits() for m in self.model.modules()
                    if isinstance(m, TernaryModule))
        self.log(f"model: CodeMemoryLM, d_model {config.d_model}, n_layers {config.n_layers}, "
                 f"{trits:,} logical trits, on {backend.device()}")
        self.step, self.elapsed_before, self.summary = 0, 0.0, {}
        if resume:
            self._resume()
        elif existing and self.is_main:
            moved = _move_aside(out_dir, existing)
            self.log(f"overwrite: the earlier run's files moved to {moved}")
        if self.is_main:
            try:
                os.makedirs(out_dir, exist_ok=True)
                config.save(os.path.join(out_dir, "config.json"))
            except OSError as e:
                raise TrainError(f"cannot write {os.path.join(out_dir, 'config.json')} "
                                 f"({e.strerror}); free disk space or choose another --out") \
                    from None
            if self.tokenizer is not None:
                from .tokenizer import save_tokenizer
                save_tokenizer(self.tokenizer, os.path.join(out_dir, "tokenizer.json"))
        self.resumed, self.bar = resume, _Progress(progress and self.is_main)

    # --- preparing the run --------------------------------------------------------------------
    @staticmethod
    def _fit_to_ranks(config, group, device):
        """(config, device) for the ranks: micro_batches a multiple of them (one shard each by
        default), and NCCL's ranks on GPUs."""
        if group.size > 1:
            if isinstance(group, distributed.NcclGroup):
                if device not in (None, "cuda"):
                    raise TrainError(f"data-parallel training runs on GPUs (NCCL); drop "
                                     f"--device {device} or use --device cuda")
                device = "cuda"
            if config.micro_batches == 1:
                config = config.override(micro_batches=group.size)
            if config.micro_batches % group.size:
                raise ConfigError(f"config field micro_batches = {config.micro_batches} must "
                                  f"be a multiple of the {group.size} ranks")
        return config, device

    def _claim_folder(self, resume, overwrite, held, tokenizer):
        """Check and lock the run folder; returns the earlier run's files found there, and the
        tokenizer the run goes on with."""
        out_dir = self.out_dir
        if resume and overwrite:
            raise TrainError("resume and overwrite exclude each other: --resume continues the "
                             f"run in {out_dir}, --overwrite starts a new one there")
        if os.path.exists(out_dir) and not os.path.isdir(out_dir):
            raise TrainError(f"--out {out_dir} is a file, not a folder; choose another --out")
        if self.is_main:
            held.enter_context(_RunLock(out_dir))
        existing = _existing_run(out_dir)
        self.ckpt_path = os.path.join(out_dir, "ckpt.h5")
        self.metrics_path = os.path.join(out_dir, "metrics.jsonl")
        if resume and not os.path.exists(self.ckpt_path):
            raise TrainError(f"nothing to resume: {self.ckpt_path} does not exist; drop --resume "
                             "to start a run" + (", or --overwrite to start over" if existing
                                                 else ""))
        if existing and not resume and not overwrite:
            raise TrainError(f"run folder {out_dir} already holds a run ({', '.join(existing)}); "
                             "continue it with --resume, start over with --overwrite (its "
                             "files move to previous-<time>/), or choose another --out")
        if resume:
            header = read_header(self.ckpt_path)
            tokenizer = _resumed_tokenizer(header["tokenizer"], tokenizer, self.ckpt_path)
            _check_resumable(header["config"], self.config, self.ckpt_path)
        config = self.config
        if tokenizer is not None and tokenizer.vocab_size != config.vocab_size:
            raise ConfigError(f"config field vocab_size = {config.vocab_size}, but the "
                              f"tokenizer has {tokenizer.vocab_size} tokens; the model's "
                              "vocabulary follows the tokenizer: set vocab_size = "
                              f"{tokenizer.vocab_size}")
        return existing, tokenizer

    def _load_data(self, data, dtype):
        """The corpus, its batches, fixed held-out windows and the bigram baseline."""
        config = self.config
        if data is None or isinstance(data, (str, os.PathLike)):
            corpus = tdata.load_corpus(data, dtype=dtype)
        else:
            corpus = data
        if self.tokenizer is not None:
            corpus = self.tokenizer.encode_corpus(corpus)
        corpus.check_seq_len(config.seq_len)
        _check_vocab(corpus, config)
        self.corpus = corpus
        self.unit = "bpb" if corpus.tokens_per_byte is not None else "bits/token"
        self.log(f"data: {corpus.describe()}")
        self.bigram = tdata.bigram_bpb(corpus.train, corpus.val, corpus.vocab_size,
                                       corpus.tokens_per_byte_of(corpus.val[1:]))
        self.log(f"bigram baseline: {self.bigram:.4f} held-out {self.unit} (add-one bigram "
                 "fitted on train)")
        self.batches = tdata.Batches(corpus, config.batch_size, config.seq_len,
                                     seed=trandom.mix_seed(config.seed, 1))
        # Fixed held-out windows: every evaluation scores the same text, so numbers compare.
        self.val_batches = list(tdata.eval_batches(corpus.val, config.batch_size,
                                                   config.seq_len, config.eval_batches))
        self.val_tokens_per_byte = corpus.tokens_per_byte_of(
            np.concatenate([y for _, y in self.val_batches]))
        self.data_id = corpus.identity()

    def _resume(self):
        ckpt_path = self.ckpt_path
        ckpt = load_checkpoint(ckpt_path, self.model, self.optimizer, restore_rng=True)
        saved_id = ckpt.train_state.get("data_id")
        if saved_id is not None and not tdata.same_data(saved_id, self.data_id):
            raise TrainError(f"resume: {ckpt_path} was trained on other data "
                             f"({saved_id['source']}: {saved_id['train_tokens']:,} + "
                             f"{saved_id['val_tokens']:,} tokens, sha256 "
                             f"{saved_id['sha256'][:12]}...); pass the run's --data")
        self.batches.load_state_dict(ckpt.train_state["data"])
        self.step = int(ckpt.step)
        self.elapsed_before = float(ckpt.train_state.get("elapsed", 0.0))
        # its held-out score is the old step's: the run evaluates again before it reports one
        self.summary = {k: v for k, v in (ckpt.metrics or {}).items() if k != "val_bpb"}
        if self.is_main:
            _trim_metrics(self.metrics_path, self.step)
        self.log(f"resumed from {ckpt_path} at step {self.step}")

    def training_step(self):
        """The step this run takes, chosen once: replayed from CUDA graphs where the run
        allows (a GPU, one micro-batch), else eager."""
        config, shards = self.config, self.config.micro_batches
        if self.group.size > 1:
            self.log(f"data-parallel: {self.group.size} ranks, {shards} shards of "
                     f"{config.batch_size // shards} x {config.seq_len} tokens a step")
        if config.cuda_graph and backend.device() == "cuda" and shards == 1:
            self.log("steps replay from CUDA graphs after 3 eager ones (cuda_graph; eager "
                     "again on steps that rebuild a routed index)")
            return _Replayed(CapturedStep(self.model, self.optimizer, log=self.log))
        return EagerStep(self.model, self.optimizer, self.group, shards)

    def begin(self):
        """Start the clock; score step 0 of a new run; say what the run will do."""
        config = self.config
        self.tokens_per_step = config.batch_size * config.seq_len
        self.summary.update(step=self.step, tokens=self.step * self.tokens_per_step,
                            bigram_bpb=self.bigram)
        self.start = time.perf_counter()
        # A step's row is written once its update's statistics are known: they come back
        # with the next step's loss (one host sync a step), or are read at once before
        # anything else is written (a checkpoint, the end, a stop).
        self.pending = None
        self.step_time, self.stopping = None, False
        if self.step == 0 and config.eval_every and not self.resumed:
            self.record({"step": 0, "tokens": 0, "elapsed": 0.0, "val_bpb": self.estimate_loss(),
                         "bigram_bpb": self.bigram})
        self.log(f"training {config.steps - self.step} steps of {config.batch_size} x "
                 f"{config.seq_len} tokens (to step {config.steps}), checkpoints in "
                 f"{self.ckpt_path}")

    # --- one step -----------------------------------------------------------------------------
    def train_one_step(self, step, stop):
        config, batches = self.config, self.batches
        t0 = time.perf_counter()
        data_before, rng_before = batches.state_dict(), trandom.get_state()
        x, y = batches.get("train")
        loss, ce = step.forward_backward(x, y)
        loss_value, ce_value, stops = self._agree(loss, ce, stop.requested)
        if not math.isfinite(loss_value):
            # Nothing has been applied by this step: drop it and save the last good one.
            step.drop()
            batches.load_state_dict(data_before)
            trandom.set_state(rng_before)
            self.save()
            raise LossNotFinite(
                f"step {self.step + 1}: the loss is {loss_value}; stopped and saved the last "
                f"good step ({self.step}) in {self.ckpt_path}. Try a larger --flip-threshold or "
                "a smaller --grad-rms-units, then --resume")
        step.update()
        self.step += 1
        self.stopping = stops > 0
        self._report(time.perf_counter() - t0, loss_value, ce_value, y)
        if config.save_every and self.step % config.save_every == 0 and \
                self.step < config.steps:
            self.flush()
            self.save(wait=False)

    def _agree(self, loss, ce, stop_requested):
        """(loss, cross-entropy, stop requests) of the step over every shard and rank: one
        all-reduce and one host sync. The last update's statistics ride along (identical on
        every rank: one update) and complete its pending metrics row."""
        xp = backend.get_array_module(loss)
        totals = xp.concatenate([loss, ce, xp.full(1, float(stop_requested))]).astype(np.float64)
        if self.pending is not None and self.optimizer.stats is not None:
            totals = xp.concatenate([totals, self.optimizer.stats.reshape(-1)])
        reduced = self.group.all_reduce_sum([totals])[0]
        loss_sum, ce_sum, stops = reduced[:3].tolist()
        if self.pending is not None:
            self.flush(backend.to_numpy(reduced[3:]).reshape(-1, 3) / self.group.size)
        shards = self.config.micro_batches
        return loss_sum / shards, ce_sum / shards, stops

    def _report(self, dt, loss_value, ce_value, targets):
        """The step's status line, its metrics row (pending its update's statistics) and, at
        evaluation points, the held-out score."""
        config, step, per_step = self.config, self.step, self.tokens_per_step
        self.step_time = dt if self.step_time is None else 0.9 * self.step_time + 0.1 * dt
        row = {"step": step, "tokens": step * per_step, "loss": loss_value,
               "train_bpb": tdata.bits_per_byte(ce_value,
                                                self.corpus.tokens_per_byte_of(targets)),
               "tokens_per_s": per_step / dt, "elapsed": self.elapsed()}
        self.summary.update(step=step, tokens=row["tokens"], loss=loss_value,
                            elapsed=row["elapsed"])
        status = (f" | loss {loss_value:.4f} | {per_step / self.step_time:,.0f} tok/s | "
                  f"ETA {_duration((config.steps - step) * self.step_time)}")
        self.bar.update(f"step {step}/{config.steps}{status}")
        if config.eval_every and (step % config.eval_every == 0 or step == config.steps):
            row.update(val_bpb=self.estimate_loss(status), bigram_bpb=self.bigram)
        self.pending = row

    # --- what the run writes --------------------------------------------------------------------
    def elapsed(self):
        return self.elapsed_before + time.perf_counter() - self.start

    def save(self, wait=True):
        """Checkpoint the run as it stands; `wait=False`: the file is written in the background
        (CheckpointWriter: a failed write is tried again by the next save)."""
        distributed.check_replicas(self.group, self.model, self.step)
        if not self.is_main:
            return
        state = {"step": self.step, "data": self.batches.state_dict(), "data_id": self.data_id,
                 "tokens": self.step * self.tokens_per_step, "elapsed": self.elapsed()}
        self.writer.save(self.ckpt_path, self.model, optimizer=self.optimizer,
                         config=self.config.to_dict(), train_state=state,
                         metrics_summary=self.summary,
                         tokenizer=None if self.tokenizer is None else self.tokenizer.to_json())
        if wait:
            self.writer.wait()

    def _end_writes(self, exc_type, exc, tb):
        """The run's exit: the checkpoint write in flight finishes; its failure is raised, or
        said beside the error that is ending the run."""
        try:
            self.writer.wait()
        except Exception as e:
            if exc_type is None:
                raise
            self.log(f"also: {e}")   # the error ending the run stays the one raised
        return False

    def say(self, text):
        self.bar.clear()
        self.log(text)

    def record(self, row):
        if self.is_main:
            _append_metrics(self.metrics_path, row, self.ckpt_path, self.writer)

    def flush(self, stats=None):
        """Write the pending row, with its update's statistics (`stats`: read earlier)."""
        if self.pending is not None:
            self.pending["opt"] = self.optimizer.observe(stats)
            self.record(self.pending)
            self.pending = None

    def estimate_loss(self, status=""):
        if not self.is_main:   # rank 0 evaluates; evaluation changes no state
            return None
        val = tdata.bits_per_byte(evaluate(self.model, self.val_batches),
                                  self.val_tokens_per_byte)
        self.summary["val_bpb"] = val
        self.say(f"step {self.step}/{self.config.steps}{status} | held-out {val:.4f} "
                 f"{self.unit} | bigram baseline {self.bigram:.4f} {self.unit}")
        return val

    # --- the end ------------------------------------------------------------------------------
    def finish(self):
        """After the last step, or the step a Ctrl-C stopped at: the last row, a held-out
        score if the run has none yet, and the checkpoint."""
        self.flush()
        if self.stopping:
            self.save()
            self.say(f"interrupted at step {self.step}: saved {self.ckpt_path}; continue with "
                     "--resume")
            raise KeyboardInterrupt
        if "val_bpb" not in self.summary:   # eval_every = 0, or resumed at the end
            self.estimate_loss()
        self.save()

    def result(self) -> dict:
        if self.is_main:
            val, bigram, unit = self.summary["val_bpb"], self.bigram, self.unit
            this_run = _duration(time.perf_counter() - self.start)
            took = (f"this run {this_run}, run total {_duration(self.elapsed())}"
                    if self.resumed else f"run time {this_run}")
            self.log(f"done: step {self.step}, held-out {val:.4f} {unit} vs bigram "
                     f"{bigram:.4f} {unit} ({'below' if val < bigram else 'NOT below'} the "
                     f"baseline), {took}, checkpoint {self.ckpt_path}")
        return dict(self.summary, unit=self.unit, out_dir=self.out_dir)


def _resumed_tokenizer(saved, given, path):
    """The tokenizer a resumed run goes on with: its checkpoint's; a --tokenizer must be it."""
    from .tokenizer import Tokenizer
    if given is None:
        return None if saved is None else Tokenizer(saved, source=f"the tokenizer of {path}")
    if saved is None:
        raise TrainError(f"resume: {path} was trained on bytes, not on subword tokens; drop "
                         "--tokenizer to go on with bytes")
    if given.to_json() != saved:
        raise TrainError(f"resume: {path} was trained with another tokenizer than "
                         f"{given.source}; drop --tokenizer to go on with the run's own "
                         "(tokenizer.json in its folder)")
    return given


def _check_resumable(saved: dict, config: Config, path):
    try:
        saved_config = Config().override(**saved)
    except ConfigError as e:
        raise TrainError(f"resume: the config in {path} cannot be used ({e})") from None
    # the model's fields must match; the run's (RunConfig) may change
    changed = [f"{k} = {getattr(config, k)!r} (checkpoint: {v!r})"
               for k, v in dataclasses.asdict(saved_config.model).items()
               if getattr(config, k) != v]
    if changed:
        raise TrainError(f"resume: {path} is a model with other settings: "
                         f"{'; '.join(changed)}; resume with the run's own config (its "
                         "config.json), or start a new run with another --out")
