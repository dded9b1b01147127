"""HDF5 checkpoints: one self-describing file per checkpoint, no pickle
(docs/checkpoint-format.md).

Layout of a file (read it with `tritnet inspect`, plain h5py, or `h5ls -r` / `h5dump -A`):

    /                               attributes: format = "tritnet-checkpoint", format_version,
                                    tritnet_version, packing_scheme, scale_function, module
                                    (the model's class), config, train_state, module_state,
                                    metrics (JSON text; metrics optional), tokenizer (only for
                                    subword tokens: the tokenizer's JSON), crc32
    /blocks/3/attn/q                a group per module (attribute `module`: its class name),
    /blocks/3/attn/q/T_packed       mirroring state_dict's dotted names
    /blocks/3/attn/q/E ...          datasets keep their dtypes (int8 E, T_accum, E_accum, ...)

- Packed trits (the buffers a module lists in `packed_trits()`, e.g. TernaryLinear.T_packed)
  are stored in the disk form base3-5: uint8 (rows, ceil(cols/5)), 1.6 bits per trit, with
  attributes packing = "base3-5", rows, cols. Loading converts them back to bitplane32.
  Conversion runs in row chunks (tritnet_kernels.packing), so a 10M-row table never needs a
  full-size temporary; a table on the GPU is converted there and only its base3 bytes cross.
- Every dataset carries `crc32` (zlib.crc32 of its on-disk bytes, C order): HDF5 itself does
  not notice a flipped byte inside a dataset, this does. A dataset whose module declares a
  range for it (`value_ranges()`: code-graph indices, VQ usage counts, ...) carries it as
  `valid_range` = [lo, hi].
- The root's `crc32` covers every other root attribute: zlib.crc32 of
  json.dumps(attributes, sort_keys=True) in UTF-8, the attributes as a dict of name -> value
  (format_version an integer, the others text).
- train_state holds what the loop passes (step, data position with its RNG state, ...), plus
  `optimizer` (TritFlip.state_dict()) and `tritnet_rng` (tritnet.rng's generator state),
  which this module adds. module_state holds `get_extra_state()` of modules that define it
  (counters outside the buffers that decide future steps, such as dead-code restart timing).

Writes are atomic: the file is written to `.NAME.tmp-PID` beside the target, flushed and
fsynced, renamed onto the target with os.replace, and the directory is fsynced. A save never
writes into an existing checkpoint, so a crash (even SIGKILL) at any moment leaves the previous
checkpoint whole. The space a save needs is reserved (posix_fallocate) before HDF5 writes a
byte: a full disk fails the save there, with its temporary file removed.

Reading trusts nothing in the file: `verify_checkpoint` checks all of it against the model
before anything is loaded (the guarantees are listed on it), and load_checkpoint, read_header
and inspect_checkpoint go through it.
"""

from __future__ import annotations

import errno
import json
import math
import os
import stat
import threading
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import NamedTuple

import h5py
import numpy as np

from . import __version__, backend
from .errors import TritnetError
from . import rng as trandom
from tritnet_kernels import packing as kpacking

FORMAT_NAME = "tritnet-checkpoint"
FORMAT_VERSION = 2
PACKING_SCHEME = (
    "trits on disk: base3-5, uint8 (rows, ceil(cols/5)), byte k of a row = "
    "sum_{i<5} (t[5k+i] + 1) * 3**i, padding trits t = 0, bytes > 242 invalid (1.6 bits/trit); "
    "in memory: bitplane32, uint32 (rows, 2*ceil(cols/32)), words 2g and 2g+1 are the PLUS and "
    "MINUS masks of columns 32g..32g+31")
SCALE_FUNCTION = "s = 2 ** (E / 8), E int8 per row"

_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
# Rows per chunk when converting/copying: temporaries near 16 MB whatever the table's size.
_CHUNK_BYTES = 1 << 24
_MIN_COMPRESS_BYTES = 1 << 16
_TEXT_ATTRS = ("format", "tritnet_version", "packing_scheme", "scale_function", "module",
               "config", "train_state", "module_state", "metrics", "tokenizer")
_OPTIONAL_ATTRS = ("metrics", "tokenizer")
_JSON_ATTRS = ("config", "train_state", "module_state", "metrics")
_ROOT_ATTRS = _TEXT_ATTRS + ("format_version", "crc32")


class CheckpointError(TritnetError):
    """A checkpoint cannot be written or read; the message says what, where, and what to do."""


@dataclass
class Checkpoint:
    """What verify_checkpoint read: the header, and the arrays in their in-memory form
    (packed trits as bitplane32 uint32), keyed by state_dict's dotted names."""

    path: str
    format_version: int
    tritnet_version: str
    config: dict
    train_state: dict
    metrics: dict | None
    arrays: "OrderedDict[str, np.ndarray]" = field(repr=False)
    module_state: dict = field(default_factory=dict)
    module: str = ""

    @property
    def step(self):
        return self.train_state.get("step")

    def restore_random_state(self) -> None:
        """Set tritnet.rng's generator to its state at save time (for exact resume)."""
        if "tritnet_rng" in self.train_state:
            trandom.set_state(self.train_state["tritnet_rng"])

    def load_into(self, model=None, optimizer=None, *, restore_rng: bool = False) -> None:
        """Copy the verified state into `model` (and `optimizer`): what load_checkpoint does
        after verify_checkpoint. Everything is checked before anything changes."""
        if optimizer is not None:
            missing = [k for k in ("step", "optimizer") if k not in self.train_state]
            if missing:
                raise CheckpointError(f"checkpoint {self.path} holds no optimizer state "
                                      f"(train_state has no {', '.join(missing)}); load it "
                                      "without an optimizer")
        if model is not None:
            modules = dict(model.named_modules())
            if type(model).__name__ != self.module or set(self.module_state) - set(modules):
                raise CheckpointError(f"checkpoint {self.path} holds a model of class "
                                      f"{self.module}, not {type(model).__name__}")
            try:
                model.load_state_dict(self.arrays)
            except ValueError as e:
                raise CheckpointError(f"checkpoint {self.path} does not fit the model ({e})") \
                    from None
            for name, extra in self.module_state.items():
                if hasattr(modules[name], "set_extra_state"):
                    modules[name].set_extra_state(extra)
        if optimizer is not None:
            optimizer.load_state_dict(self.train_state["optimizer"])
        if restore_rng:
            self.restore_random_state()


class _Tensor(NamedTuple):
    name: str          # dotted, as in state_dict
    array: object      # numpy, cupy or meta array (memory form)
    cols: int | None   # trit columns when the array is a packed trit buffer
    valid_range: tuple | None
    module: str        # class of the owning module


# --------------------------------------------------------------------------------------------
# The model's side: which groups and tensors, how each is stored.


def _tensors(model) -> "OrderedDict[str, _Tensor]":
    modules = dict(model.named_modules())
    out = OrderedDict()
    for name, array in model.state_dict().items():
        owner_name, _, leaf = name.rpartition(".")
        owner = modules[owner_name]
        packed = owner.packed_trits() if hasattr(owner, "packed_trits") else {}
        ranges = owner.value_ranges() if hasattr(owner, "value_ranges") else {}
        r = ranges.get(leaf)
        out[name] = _Tensor(name, array, packed.get(leaf), tuple(int(v) for v in r) if r else None,
                            type(owner).__name__)
    return out


def _groups(model, tensors) -> "OrderedDict[str, str]":
    """Group path -> module class: a group per module that holds state in its subtree."""
    holders = {k.rpartition(".")[0] for k in tensors}
    holders |= {h.rsplit(".", i)[0] for h in holders for i in range(1, h.count(".") + 1)}
    return OrderedDict((name.replace(".", "/"), type(module).__name__)
                       for name, module in model.named_modules() if name and name in holders)


def _row_step(shape, itemsize) -> int:
    row_bytes = itemsize * int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else itemsize
    return max(1, _CHUNK_BYTES // max(1, row_bytes))


def _row_chunks(shape, itemsize):
    if len(shape) == 0:
        yield None
        return
    step = _row_step(shape, itemsize)
    for r0 in range(0, shape[0], step):
        yield slice(r0, min(shape[0], r0 + step))


def _disk_shape(t: _Tensor):
    if t.cols is not None:
        return (int(t.array.shape[0]), kpacking.n_base3_bytes(t.cols)), np.dtype(np.uint8)
    return tuple(int(s) for s in t.array.shape), np.dtype(t.array.dtype)


def _disk_attrs(t: _Tensor) -> dict:
    """A dataset's attributes other than crc32."""
    attrs = {}
    if t.cols is not None:
        attrs.update(packing="base3-5", rows=int(t.array.shape[0]), cols=int(t.cols))
    if t.valid_range is not None:
        attrs["valid_range"] = list(t.valid_range)
    return attrs


def root_crc32(attrs: dict) -> int:
    """The root attribute `crc32`: over every other root attribute (a dict name -> value,
    format_version an int, the others str)."""
    return zlib.crc32(json.dumps(attrs, sort_keys=True).encode("utf-8"))


# --------------------------------------------------------------------------------------------
# Saving.


def _json_default(value):
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def _to_json(what, value) -> str:
    try:
        return json.dumps(value, default=_json_default, sort_keys=False)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"save_checkpoint: {what} cannot be written as JSON ({e}); pass "
                              "only dicts, lists, strings, numbers and booleans") from None


def _fsync(path, directory=False):
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_stale_temporaries(directory, base):
    """Delete `.base.tmp-PID` files of saves whose process is gone (killed mid-save)."""
    prefix = f".{base}.tmp-"
    for entry in os.listdir(directory):
        if not entry.startswith(prefix) or not entry[len(prefix):].isdigit():
            continue
        pid = int(entry[len(prefix):])
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
            continue          # still running: maybe another process saving right now
        except ProcessLookupError:
            pass
        except PermissionError:
            continue          # alive, someone else's
        try:
            os.unlink(os.path.join(directory, entry))
        except OSError:
            pass


def _size_bound(tensors, groups, attrs, compression) -> int:
    """More bytes than the file will take: the datasets' bytes, the attributes' text twice,
    and 4 KB per group or dataset for HDF5's object headers, indexes and heaps (measured:
    under 1 KB), plus 64 KB."""
    data = 0
    for t in tensors.values():
        shape, dtype = _disk_shape(t)
        data += int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if compression:
        data += data // 64   # chunk indexes, and deflate's worst case on random bytes
    text = sum(len(str(v).encode()) for v in attrs.values())
    return data + 2 * text + 4096 * (len(tensors) + len(groups)) + (1 << 16)


class _ReservedFile:
    """The temporary file as HDF5 sees it (h5py's file-object driver): its space is reserved
    before HDF5 writes anything, so that HDF5 never meets a full disk (its error path on a
    failed write can crash the process). Writes past the reservation, which the bound
    should never let happen, reserve more first."""

    def __init__(self, fd, reserved):
        self.fd, self.reserved, self.pos, self.size = fd, reserved, 0, 0

    def seek(self, offset, whence=0):
        self.pos = (offset, self.pos + offset, self.size + offset)[whence]
        return self.pos

    def tell(self):
        return self.pos

    def readinto(self, buffer):
        view = memoryview(buffer).cast("B")
        n = os.preadv(self.fd, [view], self.pos) if self.pos < self.reserved else 0
        view[n:] = bytes(len(view) - n)   # past the end reads as zeros, as HDF5 expects
        self.pos += len(view)
        return len(view)

    def read(self, n):
        out = bytearray(n)
        self.readinto(out)
        return bytes(out)

    def write(self, data):
        view = memoryview(data).cast("B")
        end = self.pos + len(view)
        if end > self.reserved:
            _reserve(self.fd, self.reserved, end - self.reserved + (1 << 20))
            self.reserved = end + (1 << 20)
        done = 0
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], self.pos + done)
        self.pos = end
        self.size = max(self.size, end)
        return len(view)

    def truncate(self, size):
        self.size = size   # the file is cut to this size once HDF5 has closed it
        return size

    def flush(self):
        pass


def _reserve(fd, offset, length):
    """posix_fallocate, where the filesystem has it (some, such as ZFS, do not)."""
    try:
        os.posix_fallocate(fd, offset, length)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise


def _host_copy(t: _Tensor) -> np.ndarray:
    """The tensor's disk form, as a host array of its own (later changes to the model's
    buffer do not reach it). Packed trits are converted to base3 in row chunks on the array's
    own device, so only the smaller base3 bytes cross to the host."""
    shape, dtype = _disk_shape(t)
    if t.cols is None and not backend.is_cupy(t.array):
        return np.array(t.array, dtype=dtype, copy=True, order="C")
    out = np.empty(shape, dtype)
    for rows in _row_chunks(shape, dtype.itemsize):
        part = t.array if rows is None else t.array[rows]
        if t.cols is not None:
            part = backend.get_array_module(part).ascontiguousarray(part)
            try:
                part = kpacking.bitplane_to_base3(part, t.cols)
            except (TypeError, ValueError) as e:
                raise CheckpointError(f"save_checkpoint: buffer `{t.name}` (rows {rows.start}.."
                                      f"{rows.stop - 1}) is not a valid bitplane32 trit array: "
                                      f"{e}") from None
        if rows is None:
            out[()] = backend.to_numpy(part)
        else:
            out[rows] = backend.to_numpy(part)
    return out


def _write_tensor(f, t: _Tensor, host: np.ndarray, compression):
    path = t.name.replace(".", "/")
    parent, _, leaf = path.rpartition("/")
    group = f[parent] if parent else f
    # Small datasets stay contiguous: chunk indexes would cost more than gzip saves.
    opts = ({"compression": compression}
            if compression and host.nbytes >= _MIN_COMPRESS_BYTES else {})
    ds = group.create_dataset(leaf, shape=host.shape, dtype=host.dtype, **opts)
    crc = 0
    for rows in _row_chunks(host.shape, host.dtype.itemsize):
        part = host if rows is None else host[rows]
        if rows is None:
            ds[()] = part
        else:
            ds[rows] = part
        crc = zlib.crc32(part.view(np.uint8).reshape(-1) if part.size else b"", crc)
    ds.attrs["crc32"] = np.uint32(crc)
    for k, v in _disk_attrs(t).items():
        ds.attrs[k] = v if isinstance(v, str) else np.asarray(v, dtype=np.int64)


class _Snapshot(NamedTuple):
    """Everything a checkpoint file holds, taken at one moment: written later (_write)."""
    path: str
    attrs: dict
    crc: int
    tensors: "OrderedDict[str, _Tensor]"
    hosts: "OrderedDict[str, np.ndarray]"   # each tensor's disk form, host copies
    groups: "OrderedDict[str, str]"
    compression: str | None


def save_checkpoint(path, model, *, optimizer=None, config: dict, train_state: dict,
                    metrics_summary: dict | None = None, compression: str | None = None,
                    tokenizer: str | None = None) -> str:
    """Write `model` (any tritnet.nn.Module tree) and the training state to `path`, atomically.

    config: the run's configuration (JSON-able). train_state: step, data position, RNG states,
    anything the loop needs to resume; `optimizer` (TritFlip.state_dict()) and `tritnet_rng`
    (tritnet.rng's state) are added. metrics_summary: optional, shown by inspect.
    compression: None (default: fastest) or "gzip". tokenizer: the JSON text of the subword
    tokenizer the model reads (tritnet.tokenizer), None for bytes. Returns the path written.

    A failure (a full or read-only disk, ...) raises CheckpointError naming the path and the
    cause; the temporary file is removed and the previous checkpoint at `path` is untouched.
    `CheckpointWriter` does the same with the file written in the background.
    """
    return _write(_snapshot(path, model, optimizer=optimizer, config=config,
                            train_state=train_state, metrics_summary=metrics_summary,
                            compression=compression, tokenizer=tokenizer))


class CheckpointWriter:
    """save_checkpoint with the file written in a background thread, so that training goes on
    while a checkpoint reaches the disk:

        writer = CheckpointWriter()
        writer.save(path, model, optimizer=..., config=..., train_state=...)  # returns soon
        ...                      # training changes the model: the checkpoint does not change
        writer.wait()            # the file is in place (or its CheckpointError is raised)

    `save` takes everything the file will hold at once (host copies of every array, so the
    host holds a second copy of the model's state meanwhile; the caller's values are checked
    there, as save_checkpoint checks them), then returns. One write runs at a time: `save`
    first waits for the one before. A write that failed is raised by `wait`; a `save` after
    it writes its own snapshot at once, in the caller's thread, and raises the earlier
    failure only if that write fails too (so a full disk that frees up loses nothing). As with
    save_checkpoint, a failed write leaves the previous checkpoint at the path untouched.
    Call `wait` before the process ends."""

    def __init__(self):
        self._thread = None
        self._error = None

    def save(self, path, model, **kwargs) -> None:
        self.join()
        snapshot = _snapshot(path, model, **kwargs)
        earlier, self._error = self._error, None
        if earlier is not None:
            try:
                _write(snapshot)
            except BaseException as e:
                raise e from earlier
            return
        self._thread = threading.Thread(target=self._write, args=(snapshot,),
                                        name="tritnet-checkpoint-writer")
        self._thread.start()

    def _write(self, snapshot):
        try:
            _write(snapshot)
        except BaseException as e:   # raised in the caller's thread by wait()
            self._error = e

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def join(self) -> None:
        """Block until the write in flight, if any, has ended (its error is kept for `wait`)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def wait(self) -> None:
        """Block until the last save's file is in place; raise its error if it failed."""
        self.join()
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def _snapshot(path, model, *, optimizer=None, config: dict, train_state: dict,
              metrics_summary: dict | None = None, compression: str | None = None,
              tokenizer: str | None = None) -> _Snapshot:
    """Check the caller's values and take host copies of everything the file will hold:
    what can fail on the caller's values fails here, before any file exists."""
    path = os.fspath(path)
    if compression not in (None, "gzip"):
        raise CheckpointError(f"save_checkpoint: compression must be None or 'gzip', "
                              f"got {compression!r}")
    if not isinstance(config, dict) or not isinstance(train_state, dict):
        raise CheckpointError("save_checkpoint: config and train_state must be dicts")
    state = dict(train_state)
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    state["tritnet_rng"] = trandom.get_state()
    module_state = {name: m.get_extra_state() for name, m in model.named_modules()
                    if hasattr(m, "get_extra_state")}
    attrs = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "tritnet_version": __version__,
        "packing_scheme": PACKING_SCHEME,
        "scale_function": SCALE_FUNCTION,
        "module": type(model).__name__,
        "config": _to_json("config", config),
        "train_state": _to_json("train_state", state),
        "module_state": _to_json("module state (get_extra_state)", module_state),
    }
    if metrics_summary is not None:
        attrs["metrics"] = _to_json("metrics_summary", metrics_summary)
    if tokenizer is not None:
        if not isinstance(tokenizer, str):
            raise CheckpointError(f"save_checkpoint: tokenizer must be JSON text, got a "
                                  f"{type(tokenizer).__name__}")
        attrs["tokenizer"] = tokenizer
    for key in _JSON_ATTRS:   # what the loader would refuse is never written
        if key in attrs:
            try:
                _check_schema(key, json.loads(attrs[key]), _SCHEMAS[key])
            except _SchemaError as e:
                raise CheckpointError(f"save_checkpoint: {e}; a checkpoint with it could not "
                                      "be loaded") from None
    if os.path.isdir(path):
        raise CheckpointError(f"save_checkpoint: {path} is a directory; give a file name such "
                              "as ckpt.h5")
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
        _remove_stale_temporaries(directory, os.path.basename(path))
    except OSError as e:
        raise CheckpointError(f"save_checkpoint: cannot write in {directory} ({e.strerror}); "
                              "choose another --out") from None
    tensors = _tensors(model)
    hosts = OrderedDict((name, _host_copy(t)) for name, t in tensors.items())
    return _Snapshot(path, attrs, root_crc32(attrs), tensors, hosts, _groups(model, tensors),
                     compression)


def _write(snap: _Snapshot) -> str:
    """The file of a snapshot: written beside the target, fsynced, renamed onto it."""
    path, attrs, tensors = snap.path, snap.attrs, snap.tensors
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    fd = None
    try:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        reserved = _size_bound(tensors, snap.groups, attrs, snap.compression)
        _reserve(fd, 0, reserved)
        reserved_file = _ReservedFile(fd, reserved)
        with h5py.File(reserved_file, "w", track_order=True) as f:
            for k, v in attrs.items():
                f.attrs[k] = np.int64(v) if k == "format_version" else v
            f.attrs["crc32"] = np.uint32(snap.crc)
            for name, cls in snap.groups.items():
                f.create_group(name, track_order=True).attrs["module"] = cls
            for name, t in tensors.items():
                _write_tensor(f, t, snap.hosts[name], snap.compression)
        os.ftruncate(fd, reserved_file.size)   # gives back what the reservation did not use
        os.fsync(fd)
        os.close(fd)
        fd = None
        os.replace(tmp, path)
    except BaseException as e:  # KeyboardInterrupt included: never leave a half file behind
        if fd is not None:
            os.close(fd)
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            cause = e.strerror or str(e).splitlines()[0]
            raise CheckpointError(f"save_checkpoint: cannot write {path} ({cause}); the "
                                  "previous checkpoint there, if any, is untouched. Free disk "
                                  "space or choose another --out") from None
        raise
    try:
        _fsync(directory, directory=True)   # makes the rename itself durable
    except OSError:
        pass  # some filesystems cannot fsync a directory; the file is in place regardless
    return path


# --------------------------------------------------------------------------------------------
# Loading: one check of the whole file (verify_checkpoint), which every reader goes through.


def _damaged(path, what) -> CheckpointError:
    return CheckpointError(f"checkpoint {path}: {what}; the file is damaged or was not written "
                           "by tritnet, use an earlier checkpoint")


def _check_file(path) -> None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist; check the path (a run folder "
                              "keeps its checkpoint as ckpt.h5)") from None
    except OSError as e:
        raise CheckpointError(f"checkpoint {path} cannot be read ({e.strerror})") from None
    if stat.S_ISDIR(st.st_mode):
        raise CheckpointError(f"checkpoint {path} is a directory; give the .h5 file inside it")
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"checkpoint {path} is not a regular file (a FIFO, socket or "
                              "device); give the .h5 file a save wrote")
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError as e:
        raise CheckpointError(f"checkpoint {path} cannot be read ({e.strerror}); check its "
                              "permissions") from None
    if not head:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes), probably an interrupted "
                              "copy; use an earlier checkpoint")
    if head != _HDF5_SIGNATURE:
        raise CheckpointError(f"checkpoint {path} is not an HDF5 file (first bytes {head!r}); "
                              "expected a file written by tritnet's save_checkpoint")


def _opened(path, read):
    """Run read(f) on the open file; HDF5's own errors (truncation, damaged metadata) become
    one CheckpointError."""
    path = os.fspath(path)
    _check_file(path)
    try:
        with h5py.File(path, "r") as f:
            return read(path, f)
    except CheckpointError:
        raise
    except (OSError, KeyError, ValueError, RuntimeError, TypeError) as e:
        # h5py reports truncation and damaged metadata as OSError (sometimes KeyError).
        cause = " ".join(str(e).split())[:300]
        raise CheckpointError(f"checkpoint {path} is truncated or corrupted ({type(e).__name__}: "
                              f"{cause}); use an earlier checkpoint") from None


# --- attributes -------------------------------------------------------------------------------


_ATTR_KINDS = {"text": "text", "int": "an integer", "uint32": "a uint32",
               "range": "two int64"}


def _attr(path, obj, name, where, kind):
    """One attribute, read only after its type is checked: kind "text" (a scalar string),
    "int" (a scalar integer), "uint32" (crc32) or "range" (two int64)."""
    aid = obj.attrs.get_id(name)
    dt, shape = aid.dtype, aid.shape
    if kind == "text":
        ok = h5py.check_string_dtype(dt) is not None and shape == ()
    elif kind == "int":
        ok = dt.kind in "iu" and shape == ()
    elif kind == "uint32":
        ok = dt == np.uint32 and shape == ()
    else:
        ok = dt == np.int64 and shape == (2,)
    if not ok:
        raise _damaged(path, f"{where} attribute `{name}` has type {dt} and shape {shape}, "
                             f"expected {_ATTR_KINDS[kind]}")
    value = obj.attrs[name]
    if kind == "text":
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError:
                raise _damaged(path, f"{where} attribute `{name}` is not UTF-8 text") from None
        return value
    if kind == "range":
        return tuple(int(v) for v in value)
    return int(value)


def _root_attrs(path, f, format1=False) -> dict:
    """The root attributes, as text (format_version an int). format1: of a format-1 file,
    which has no root crc32 (for upgrade_checkpoint)."""
    names = set(f.attrs.keys())
    fmt = _attr(path, f, "format", "root", "text") if "format" in names else None
    if fmt != FORMAT_NAME:
        raise CheckpointError(f"checkpoint {path} is an HDF5 file but not a tritnet checkpoint "
                              f"(root attribute format = {fmt!r}, expected {FORMAT_NAME!r})")
    if "format_version" not in names:
        raise _damaged(path, "root attribute `format_version` is missing")
    version = _attr(path, f, "format_version", "root", "int")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} was written by a newer tritnet? format "
                              f"{version} > {FORMAT_VERSION} (this is tritnet {__version__}); "
                              "upgrade tritnet to load it")
    if format1 and version != 1:
        raise CheckpointError(f"checkpoint {path} has format {version}, not 1: there is nothing "
                              "to upgrade")
    if version < FORMAT_VERSION and not format1:
        raise CheckpointError(
            f"checkpoint {path} has format {version}, whose root attributes (config, "
            f"train_state, ...) carry no checksum, so this tritnet (format {FORMAT_VERSION}) "
            f"cannot tell whether they were changed; convert it once with `tritnet upgrade "
            f"{path}` (it checks everything else and writes a format-{FORMAT_VERSION} copy "
            "beside it)")
    known = [k for k in _ROOT_ATTRS if k != "crc32" or not format1]
    unknown = sorted(names - set(known))
    if unknown:
        raise _damaged(path, f"unexpected root attribute(s) {', '.join(unknown)}")
    missing = [k for k in known if k not in names and k not in _OPTIONAL_ATTRS]
    if missing:
        raise _damaged(path, f"root attribute(s) {', '.join(missing)} missing")
    attrs = {k: _attr(path, f, k, "root", "text") for k in _TEXT_ATTRS if k in names}
    attrs["format_version"] = version
    if format1:
        return attrs
    stored, crc = _attr(path, f, "crc32", "root", "uint32"), root_crc32(attrs)
    if stored != crc:
        raise CheckpointError(f"checkpoint {path}: its root attributes are corrupted: their "
                              f"crc32 is {crc:#010x}, the file says {stored:#010x} (config, "
                              "train_state, ... changed after it was written); use an earlier "
                              "checkpoint")
    return attrs


# --- the JSON attributes' schema ----------------------------------------------------------------
# A spec is a _Value (a test and what it expects) or an _Object (known fields with their specs,
# the required ones, and the spec of other fields: None refuses them).


class _Value(NamedTuple):
    test: object
    expected: str


class _Object(NamedTuple):
    fields: dict
    required: tuple = ()
    others: object = None


def _is_int(v, lo=0, hi=2**63 - 1):
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _is_number(v, lo=-math.inf):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) \
        and v >= lo


_ANY = _Value(lambda v: True, "anything")
_COUNT = _Value(_is_int, "an integer >= 0")
_SECONDS = _Value(lambda v: _is_number(v, 0), "a finite number >= 0")
_NUMBER = _Value(_is_number, "a finite number")
_TEXT = _Value(lambda v: isinstance(v, str), "text")
_SCALAR = _Value(lambda v: v is None or isinstance(v, (str, bool)) or _is_number(v),
                 "a string, number, boolean or null")
_PCG64 = _Object({"bit_generator": _Value(lambda v: v == "PCG64", '"PCG64"'),
                  "state": _Object({"state": _Value(lambda v: _is_int(v, 0, 2**128 - 1),
                                                    "an integer in [0, 2**128)"),
                                    "inc": _Value(lambda v: _is_int(v, 0, 2**128 - 1),
                                                  "an integer in [0, 2**128)")},
                                   ("state", "inc")),
                  "has_uint32": _Value(lambda v: _is_int(v, 0, 1), "0 or 1"),
                  "uinteger": _Value(lambda v: _is_int(v, 0, 2**32 - 1),
                                     "an integer in [0, 2**32)")},
                 ("bit_generator", "state", "has_uint32", "uinteger"))
_DATA_ID = _Object({"source": _TEXT, "train_tokens": _COUNT, "val_tokens": _COUNT,
                    "vocab_size": _Value(lambda v: _is_int(v, 1, 2**31), "an integer >= 1"),
                    "sha256": _Value(lambda v: isinstance(v, str) and len(v) == 64 and
                                     all(c in "0123456789abcdef" for c in v),
                                     "64 hexadecimal digits")},
                   ("source", "train_tokens", "val_tokens", "vocab_size", "sha256"))
# Fields tritnet reads; a caller's own train_state fields are kept as they are.
_TRAIN_STATE = _Object({"step": _COUNT, "tokens": _COUNT, "elapsed": _SECONDS,
                        "data": _Object({"rng": _PCG64, "batches_drawn": _COUNT},
                                        ("rng", "batches_drawn")),
                        "data_id": _DATA_ID,
                        "optimizer": _Object({"step": _COUNT}, ("step",), _SCALAR),
                        "tritnet_rng": _PCG64},
                       ("tritnet_rng",), _ANY)
_METRICS = _Object({"step": _COUNT, "tokens": _COUNT, "elapsed": _SECONDS}, (), _NUMBER)


class _SchemaError(ValueError):
    """A JSON attribute's field that its schema refuses (the message says which, and why)."""


def _check_schema(where, value, spec):
    if isinstance(spec, _Value):
        if not spec.test(value):
            shown = json.dumps(value)
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            raise _SchemaError(f"{where} = {shown}, expected {spec.expected}")
        return
    if not isinstance(value, dict):
        raise _SchemaError(f"{where} is a {type(value).__name__}, expected a JSON object")
    missing = [k for k in spec.required if k not in value]
    if missing:
        raise _SchemaError(f"{where} has no {', '.join(missing)}")
    for k, v in value.items():
        inner = spec.fields.get(k, spec.others)
        if inner is None:
            raise _SchemaError(f"{where} has an unexpected field {k!r}")
        _check_schema(f"{where}.{k}", v, inner)


_SCHEMAS = {"config": _Object({}, (), _ANY), "train_state": _TRAIN_STATE,
            "module_state": _Object({}, (), _Object({}, (), _SCALAR)), "metrics": _METRICS}


def _header(path, f, format1=False) -> dict:
    """The root attributes, checked: exact set, types, format, version, crc32, JSON, schema.
    format1: of a format-1 file (no crc32; a data_id without sha256 is dropped, and listed
    under "dropped")."""
    attrs = _root_attrs(path, f, format1)
    header = {k: attrs[k] for k in ("format", "format_version", "tritnet_version",
                                    "packing_scheme", "scale_function", "module")}
    header["tokenizer"] = attrs.get("tokenizer")   # text, parsed where it is used
    for key in _JSON_ATTRS:
        if key not in attrs:
            header[key] = None
            continue
        try:
            header[key] = json.loads(attrs[key])
        except (ValueError, RecursionError) as e:
            raise _damaged(path, f"root attribute `{key}` is not valid JSON "
                                 f"({type(e).__name__}: {str(e)[:80]})") from None
        if format1 and key == "train_state" and isinstance(header[key], dict) and \
                isinstance(header[key].get("data_id"), dict) and \
                "sha256" not in header[key]["data_id"]:
            del header[key]["data_id"]   # format 1 named the data without a hash of it
            header["dropped"] = ["data_id"]
        try:
            _check_schema(key, header[key], _SCHEMAS[key])
        except _SchemaError as e:
            raise _damaged(path, str(e)) from None
    if "optimizer" in header["train_state"] and "step" not in header["train_state"]:
        raise _damaged(path, "train_state has an optimizer state but no step")
    if header["module"] == "CodeMemoryLM":
        _config_of(path, header)
    return header


def _config_of(path, header):
    """The file's config as a tritnet Config (for tritnet's own model), validated."""
    from .config import Config, ConfigError
    try:
        return Config().override(**header["config"])
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path}: its config cannot be used ({e}); the file "
                              "is damaged or was written by a newer tritnet") from None


def _model_for(path, header, f):
    """The model a checkpoint of tritnet's own model class (CodeMemoryLM) describes, built on
    the meta device (shapes and dtypes, nothing allocated); None for other classes."""
    if header["module"] != "CodeMemoryLM":
        return None
    from .models import CodeMemoryLM
    config = _config_of(path, header)
    # Building costs time with the number of modules: a forged config (1024 blocks of 4096
    # experts) must not stall the check. Each expert alone holds 8 datasets.
    datasets = _count_datasets(f)
    if 8 * config.n_layers * config.n_experts > 2 * datasets + 1024:
        raise CheckpointError(f"checkpoint {path}: its config describes {config.n_layers} "
                              f"blocks of {config.n_experts} experts, far more than its "
                              f"{datasets} datasets can hold; the file is damaged or forged, "
                              "use an earlier checkpoint")
    rng = trandom.get_state()   # building draws seeds; a check must not move the generator
    try:
        return CodeMemoryLM(config, device=backend.META)
    except ValueError as e:
        raise CheckpointError(f"checkpoint {path}: its config cannot be used ({e})") from None
    finally:
        trandom.set_state(rng)


def _count_datasets(f) -> int:
    """Datasets reachable by hard links (H5Ovisit follows no other link)."""
    count = [0]

    def visit(name, info):
        count[0] += info.type == h5py.h5o.TYPE_DATASET
    h5py.h5o.visit(f.id, visit, info=True)
    return count[0]


def _check_model_state(path, header, model, f):
    """The header against the model: its class, its config, its modules' extra state."""
    if header["module"] != type(model).__name__:
        raise CheckpointError(f"checkpoint {path} holds a model of class {header['module']}, not "
                              f"{type(model).__name__}; load it into the model it was saved from")
    from .config import ModelConfig
    if isinstance(getattr(model, "config", None), ModelConfig):   # the file's config must fit
        described = _model_for(path, header, f)
        ours = _signature(model)
        theirs = _signature(described) if described is not None else {}
        if ours != theirs:
            key = next((k for k in ours if ours[k] != theirs.get(k)),
                       next(iter(set(theirs) - set(ours)), None))
            raise CheckpointError(f"checkpoint {path}: its config describes another model "
                                  f"than {type(model).__name__}'s (`{key}`: "
                                  f"{_shown(theirs.get(key))} in the file's config, "
                                  f"{_shown(ours.get(key))} in the model); the file is "
                                  "damaged, or load it into the model of its own config")
    expected = {name: m.get_extra_state() for name, m in model.named_modules()
                if hasattr(m, "get_extra_state")}
    found = header["module_state"]
    if set(found) != set(expected):
        raise _damaged(path, f"module_state names modules {sorted(found)}, the model's are "
                             f"{sorted(expected)}")
    for name, state in expected.items():
        if set(found[name]) != set(state):
            raise _damaged(path, f"module_state.{name} has fields {sorted(found[name])}, "
                                 f"expected {sorted(state)}")
        for k, v in state.items():
            if _is_int(v) and not _is_int(found[name][k]):
                raise _damaged(path, f"module_state.{name}.{k} = {found[name][k]!r}, expected "
                                     "an integer >= 0 (a counter)")
            if type(found[name][k]) is not type(v):
                raise _damaged(path, f"module_state.{name}.{k} = {found[name][k]!r}, expected "
                                     f"a {type(v).__name__}")


def _signature(model) -> dict:
    """Dataset path -> (disk shape, dtype, packed columns, range) of a model's checkpoint."""
    return {k.replace(".", "/"): (*_disk_shape(t), t.cols, t.valid_range)
            for k, t in _tensors(model).items()}


def _shown(entry):
    if entry is None:
        return "absent"
    shape, dtype, cols, valid_range = entry
    return f"{shape} {dtype}" + (f" ({cols} trit columns)" if cols else "") + \
        (f" in {list(valid_range)}" if valid_range else "")


# --- the tree -----------------------------------------------------------------------------------


class _Plan(NamedTuple):
    ds: object               # h5py.Dataset
    cols: int | None         # packed trit columns
    valid_range: tuple | None


def _where(path, key):
    return f"checkpoint {path}: dataset `{key}`"


def _walk(path, f, groups, tensors, format1=False) -> "OrderedDict[str, _Plan]":
    """Every node of the file, checked against the expected groups (path -> class) and
    tensors (slash path -> _Tensor), or, where those are None, against the file's own
    declarations. Links are listed, never followed; nothing but hard links to groups and
    datasets, each reachable by one path only, passes."""
    plans = OrderedDict()
    if h5py.h5o.get_info(f.id).rc != 1:
        raise _damaged(path, "the root group is linked from inside the file")

    def visit(group, prefix):
        if prefix.count("/") > 32:
            raise _damaged(path, f"groups nest deeper than 32 levels (`{prefix}`)")
        for name in group.keys():
            key = prefix + name
            link = group.get(name, getlink=True)
            if not isinstance(link, h5py.HardLink):
                raise _damaged(path, f"`{key}` is {_link_kind(link)} (a checkpoint holds no "
                                     "links; tritnet never follows one)")
            obj = group[name]
            if h5py.h5o.get_info(obj.id).rc != 1:
                raise _damaged(path, f"`{key}` is reachable by more than one path (hard links)")
            if isinstance(obj, h5py.Group):
                if groups is not None and key not in groups:
                    raise _damaged(path, f"unexpected group `{key}`" + _hint(key, tensors))
                _check_attr_names(path, obj, f"group `{key}`", {"module"})
                cls = _attr(path, obj, "module", f"group `{key}`", "text")
                if groups is not None and cls != groups[key]:
                    raise _damaged(path, f"group `{key}` is a {cls}, expected {groups[key]}")
                visit(obj, key + "/")
            elif isinstance(obj, h5py.Dataset):
                if tensors is not None and key not in tensors:
                    raise _damaged(path, f"unexpected dataset `{key}`" + _hint(key, tensors))
                plans[key] = _plan(path, key, obj, tensors[key] if tensors is not None else None,
                                   format1)
            else:
                raise _damaged(path, f"`{key}` is a {type(obj).__name__}, not a group or dataset")

    visit(f, "")
    if tensors is not None:
        missing = [k for k in tensors if k not in plans]
        if missing:
            raise CheckpointError(f"checkpoint {path} does not match the model: missing "
                                  f"dataset(s) {', '.join(missing[:5])}"
                                  f"{' ...' if len(missing) > 5 else ''}. Was it written with "
                                  "another config (--preset, --config)?")
    return plans


def _link_kind(link):
    return {h5py.SoftLink: "a soft link", h5py.ExternalLink: "an external link"}.get(
        type(link), "a link")


def _hint(key, tensors):
    return "; was it written with another config (--preset, --config)?" if tensors else ""


def _check_attr_names(path, obj, where, expected):
    names = set(obj.attrs.keys())
    if names != set(expected):
        extra, missing = sorted(names - set(expected)), sorted(set(expected) - names)
        raise _damaged(path, f"{where} has " + "; ".join(
            ([f"unexpected attribute(s) {', '.join(extra)}"] if extra else []) +
            ([f"no {', '.join(missing)}"] if missing else [])))


def _check_storage(path, key, ds):
    """Plain storage inside this file: no external file, no virtual dataset, no filter but
    deflate (another filter would make HDF5 look for a plugin library)."""
    dcpl = ds.id.get_create_plist()
    if dcpl.get_layout() == h5py.h5d.VIRTUAL:
        raise _damaged(path, f"`{key}` is a virtual dataset (it would read other files)")
    if dcpl.get_external_count():
        raise _damaged(path, f"`{key}` keeps its data in an external file")
    for i in range(dcpl.get_nfilters()):
        if dcpl.get_filter(i)[0] != h5py.h5z.FILTER_DEFLATE:
            raise _damaged(path, f"`{key}` uses HDF5 filter {dcpl.get_filter(i)[0]} (checkpoints "
                                 "use gzip only)")
    if dcpl.get_layout() == h5py.h5d.CONTIGUOUS and ds.size and \
            ds.id.get_storage_size() != ds.size * ds.dtype.itemsize:
        raise _damaged(path, f"`{key}` stores {ds.id.get_storage_size()} bytes for "
                             f"{ds.size * ds.dtype.itemsize}")


def _plan(path, key, ds, t: _Tensor | None, format1=False) -> _Plan:
    """Check one dataset's structure (no data read): storage, dtype, shape, attributes (in
    format 1, valid_range may be absent)."""
    _check_storage(path, key, ds)
    if t is not None:
        shape, dtype = _disk_shape(t)
        what = "base3-5 packed trits" if t.cols is not None else "the model's"
        if np.dtype(ds.dtype) != dtype:
            raise CheckpointError(f"{_where(path, key)} has dtype {ds.dtype}, expected {dtype} "
                                  f"({what}); the file was changed or written by a different "
                                  "tritnet, use another checkpoint")
        if tuple(ds.shape) != shape:
            raise CheckpointError(f"{_where(path, key)} has shape {tuple(ds.shape)}, expected "
                                  f"{shape} ({what}); is it a checkpoint of another config "
                                  "(--preset, --config)?")
        expected = _disk_attrs(t)
        if format1 and "valid_range" not in ds.attrs:
            expected.pop("valid_range", None)
        _check_attr_names(path, ds, f"dataset `{key}`", {"crc32", *expected})
        for name, value in expected.items():
            kind = "text" if isinstance(value, str) else "int" if name != "valid_range" else "range"
            found = _attr(path, ds, name, f"dataset `{key}`", kind)
            if found != (tuple(value) if kind == "range" else value):
                raise _damaged(path, f"dataset `{key}` declares {name} = {found!r}, expected "
                                     f"{value!r}")
        _attr(path, ds, "crc32", f"dataset `{key}`", "uint32")
        return _Plan(ds, t.cols, t.valid_range)
    # No model: the file's own declarations, checked for consistency.
    names = set(ds.attrs.keys())
    allowed = {"crc32", "packing", "rows", "cols", "valid_range"}
    _check_attr_names(path, ds, f"dataset `{key}`", (names & allowed) | {"crc32"})
    _attr(path, ds, "crc32", f"dataset `{key}`", "uint32")
    valid_range = _attr(path, ds, "valid_range", f"dataset `{key}`", "range") \
        if "valid_range" in names else None
    if "packing" not in names:
        if names & {"rows", "cols"}:
            raise _damaged(path, f"dataset `{key}` has rows/cols but no packing")
        return _Plan(ds, None, valid_range)
    packing = _attr(path, ds, "packing", f"dataset `{key}`", "text")
    if packing != "base3-5":
        raise CheckpointError(f"{_where(path, key)} has unknown packing {packing!r} (this "
                              "tritnet reads 'base3-5'); upgrade tritnet")
    if not names >= {"rows", "cols"}:
        raise _damaged(path, f"dataset `{key}`: packed trits need attributes rows and cols")
    rows, cols = (_attr(path, ds, k, f"dataset `{key}`", "int") for k in ("rows", "cols"))
    if cols < 1 or rows < 0:
        raise _damaged(path, f"dataset `{key}` declares rows={rows}, cols={cols}")
    expected = (rows, kpacking.n_base3_bytes(cols))
    if np.dtype(ds.dtype) != np.uint8:
        raise CheckpointError(f"{_where(path, key)} has dtype {ds.dtype}, expected uint8 "
                              "(base3-5 packed trits); the file was changed, use another checkpoint")
    if tuple(ds.shape) != expected:
        raise CheckpointError(f"{_where(path, key)} has shape {tuple(ds.shape)}, expected "
                              f"{expected} for rows={rows}, cols={cols}; the file is damaged")
    return _Plan(ds, cols, valid_range)


# --- the data -----------------------------------------------------------------------------------


def _base3_problem(path, key, chunk, cols, r0):
    """What is wrong with the trit codes of base3 rows r0.. (bytes <= 242, padding digits 1,
    i.e. t = 0), or None."""
    bad = chunk > 242
    if bad.any():
        r, b = divmod(int(bad.argmax()), chunk.shape[1])
        return (f"{_where(path, key)}: byte [{r0 + r}, {b}] = {int(chunk[r, b])} is not a trit "
                f"code (base3-5 bytes are <= 242; row {r0 + r}, cols {5 * b}..{5 * b + 4}); "
                "the file is corrupted or forged, use an earlier checkpoint")
    k = cols - 5 * (chunk.shape[1] - 1)   # real trits in the last byte
    if k < 5 and chunk.shape[0]:
        last = chunk[:, -1]
        bad = last // 3 ** k != (3 ** (5 - k) - 1) // 2
        if bad.any():
            r = int(bad.argmax())
            return (f"{_where(path, key)}: byte [{r0 + r}, {chunk.shape[1] - 1}] = "
                    f"{int(last[r])} encodes nonzero padding trits beyond col {cols - 1}; the "
                    "file is corrupted or forged, use an earlier checkpoint")
    return None


def _range_problem(path, key, chunk, valid_range):
    lo, hi = int(chunk.min()), int(chunk.max())
    if lo < valid_range[0] or hi > valid_range[1]:
        bad = lo if lo < valid_range[0] else hi
        return (f"{_where(path, key)} holds {bad}, outside its range [{valid_range[0]}, "
                f"{valid_range[1]}]; the file is corrupted or forged, use an earlier checkpoint")
    return None


def _read_dataset(path, key, plan: _Plan, keep: bool):
    """Read one dataset chunk by chunk, checking its crc32, then its trit codes or range (a
    flipped bit is reported as such); returns its memory form (keep) or None."""
    ds, cols, valid_range = plan
    shape = tuple(ds.shape)
    out = None
    if keep:
        out = np.empty((shape[0], 2 * kpacking.n_groups(cols)), dtype=np.uint32) \
            if cols is not None else np.empty(shape, dtype=ds.dtype)
    crc, problem = 0, None
    for rows in _row_chunks(shape, np.dtype(ds.dtype).itemsize):
        part = np.ascontiguousarray(ds[()] if rows is None else ds[rows])
        crc = zlib.crc32(part.view(np.uint8).reshape(-1) if part.size else b"", crc)
        if problem is not None:
            continue
        if cols is not None:
            problem = _base3_problem(path, key, part, cols, rows.start)
            if keep and problem is None:
                decoded = kpacking.base3_to_bitplane(part, cols)
                kpacking.validate_packed(decoded, cols, op=f"checkpoint {path}: `{key}`")
                out[rows] = decoded
            continue
        if valid_range is not None and part.size:
            problem = _range_problem(path, key, part, valid_range)
        if keep:
            if rows is None:
                out[...] = part
            else:
                out[rows] = part
    stored = int(ds.attrs["crc32"])
    if stored != crc:
        raise CheckpointError(f"{_where(path, key)} is corrupted: its crc32 is {crc:#010x}, the "
                              f"file says {stored:#010x} (bytes changed after it was "
                              "written); use an earlier checkpoint")
    if problem is not None:
        raise CheckpointError(problem)
    return out


def _verify(path, f, model, keep, format1=False):
    """(header, plans, arrays) of the open file, all checked; arrays empty unless keep."""
    header = _header(path, f, format1)
    if model is None:
        model = _model_for(path, header, f)
    groups = tensors = None
    if model is not None:
        _check_model_state(path, header, model, f)
        expected = _tensors(model)
        groups = _groups(model, expected)
        tensors = OrderedDict((k.replace(".", "/"), t) for k, t in expected.items())
    plans = _walk(path, f, groups, tensors, format1)
    arrays = OrderedDict()
    for key in (tensors or plans):   # the model's order where there is one
        array = _read_dataset(path, key, plans[key], keep)
        if keep:
            arrays[key.replace("/", ".")] = array
    return header, plans, arrays


def verify_checkpoint(path, model=None) -> Checkpoint:
    """Read the whole checkpoint at `path` and check all of it; returns its Checkpoint.

    Checked, before anything is loaded anywhere (a failure raises one CheckpointError that
    says what and where):
    - the file: a regular file, HDF5, not truncated; `format` and `format_version`;
    - the root attributes: exactly the known ones, each of its type, their crc32, the JSON
      ones parsed and checked against their schema (types and ranges of every field tritnet
      reads; the config as a Config for tritnet's own model);
    - the tree: exactly the model's groups (with their module classes) and datasets, nothing
      missing or extra; only hard links, each object reachable by one path; no soft or
      external links, external storage, virtual datasets or filters but gzip, so nothing in
      the file makes HDF5 open another file;
    - each dataset: dtype, shape, attributes, crc32, trit codes (base3-5 bytes and padding),
      and the range its module declares (code-graph indices within the code book, VQ usage
      counts >= 0, ...);
    - the modules' extra state: the model's modules, fields and types.

    `model` is what the file must match (a meta-device model will do). Without one, a
    checkpoint of CodeMemoryLM is checked against the model its config describes; of another
    class, against its own declarations (shapes from rows/cols, ranges from valid_range).
    """
    def read(path, f):
        header, _, arrays = _verify(path, f, model, keep=True)
        return Checkpoint(path, header["format_version"], header["tritnet_version"],
                          header["config"], header["train_state"], header["metrics"], arrays,
                          header["module_state"], header["module"])

    return _opened(path, read)


def read_header(path) -> dict:
    """The checked root attributes (format, versions, module, config, train_state, metrics,
    module_state) without reading any dataset: what a caller needs to build the model before
    load_checkpoint (which checks the rest)."""
    return _opened(path, _header)


def load_checkpoint(path, model=None, optimizer=None, *, restore_rng: bool = False) -> Checkpoint:
    """Read and verify a checkpoint (verify_checkpoint); then, if given, load it into `model`
    and `optimizer`.

    A bad file raises CheckpointError and leaves the model and optimizer as they were.
    restore_rng=True also sets tritnet.rng's generator to its state at save time (what an
    exact resume needs; the data RNG is the loop's, in train_state). With an optimizer the
    file must hold a training state (step, optimizer). Returns a Checkpoint (config,
    train_state, metrics, arrays).
    """
    ckpt = verify_checkpoint(path, model)
    ckpt.load_into(model, optimizer, restore_rng=restore_rng)
    return ckpt


def upgrade_checkpoint(path, out=None) -> tuple:
    """Convert a format-1 checkpoint of CodeMemoryLM into format 2; returns (the path
    written, what could not be carried over).

    Everything format 1 holds is checked as verify_checkpoint checks it, except the root
    attributes' checksum, which format 1 lacks (so edits to them cannot be detected: upgrade
    only files you trust). The copy is written to `out` (default: NAME.v2.h5 beside the
    file) and verified; the original is never changed. Format 1's data identity had no hash
    of the data: it is dropped, and a resume of the copy cannot check its --data.
    """
    path = os.fspath(path)
    out = os.fspath(out) if out is not None else os.path.splitext(path)[0] + ".v2.h5"
    if os.path.exists(out):
        raise CheckpointError(f"upgrade_checkpoint: {out} exists; give the copy another path "
                              "(--out)")

    def read(path, f):
        header = _header(path, f, format1=True)
        if header["module"] != "CodeMemoryLM":
            raise CheckpointError(f"checkpoint {path} holds a {header['module']}; upgrade "
                                  "knows CodeMemoryLM checkpoints")
        _, _, arrays = _verify(path, f, None, keep=True, format1=True)
        return header, arrays, header.get("dropped", [])

    header, arrays, lost = _opened(path, read)
    from .models import CodeMemoryLM
    state = dict(header["train_state"])
    rng = trandom.get_state()   # building draws seeds; the save writes the generator's state
    try:
        model = CodeMemoryLM(_config_of(path, header), device="cpu")
        Checkpoint(path, 1, header["tritnet_version"], header["config"], state,
                   header["metrics"], arrays, header["module_state"],
                   header["module"]).load_into(model)
        trandom.set_state(state.pop("tritnet_rng"))
        save_checkpoint(out, model, config=header["config"], train_state=state,
                        metrics_summary=header["metrics"])
    finally:
        trandom.set_state(rng)
    verify_checkpoint(out)
    return out, lost


# --------------------------------------------------------------------------------------------
# Inspecting.


def _digit_counts_table(digits):
    """(256, 3): for each byte value, how many of its first `digits` base-3 digits are 0, 1, 2
    (trits -1, 0, +1). Bytes > 242 count nothing (they are reported as invalid)."""
    table = np.zeros((256, 3), dtype=np.int64)
    for v in range(243):
        for i in range(digits):
            table[v, (v // 3 ** i) % 3] += 1
    return table


def _trit_histogram(ds, cols):
    nb = kpacking.n_base3_bytes(cols)
    full, tail = _digit_counts_table(5), _digit_counts_table(cols - 5 * (nb - 1))
    counts = np.zeros(3, dtype=np.int64)
    invalid = 0
    for rows in _row_chunks(tuple(ds.shape), 1):
        part = ds[rows]
        hist_full = np.bincount(part[:, :-1].reshape(-1), minlength=256)
        hist_tail = np.bincount(part[:, -1], minlength=256)
        counts += hist_full @ full + hist_tail @ tail
        invalid += int(hist_full[243:].sum() + hist_tail[243:].sum())
    return counts, invalid


def _unverified(path, f):
    """What can be read without checks (inspect --no-verify): the header's attributes that
    have the right type, and every dataset and group reachable by hard links; links are
    listed, never followed, and only plain datasets are read. `problems` lists what could not
    be read."""
    problems, header = [], {}
    kinds = dict.fromkeys(_TEXT_ATTRS, "text")
    kinds["format_version"] = "int"
    for k, kind in kinds.items():
        header[k] = None
        if k in f.attrs:
            try:
                header[k] = _attr(path, f, k, "root", kind)
                if k in _JSON_ATTRS:
                    header[k] = json.loads(header[k])
            except (CheckpointError, ValueError, RecursionError, OSError) as e:
                header[k] = None
                problems.append(f"root attribute `{k}`: {str(e)[:100]}")
    plans, modules = OrderedDict(), OrderedDict()

    def visit(group, prefix):
        if prefix.count("/") > 32:
            problems.append(f"groups nest deeper than 32 levels (`{prefix}`): not shown")
            return
        for name in group.keys():
            key = prefix + name
            try:
                link = group.get(name, getlink=True)
                if not isinstance(link, h5py.HardLink):
                    problems.append(f"`{key}` is {_link_kind(link)} (not followed)")
                    continue
                obj = group[name]
                if isinstance(obj, h5py.Group):
                    modules[key] = _attr(path, obj, "module", f"group `{key}`", "text") \
                        if "module" in obj.attrs else None
                    visit(obj, key + "/")
                elif isinstance(obj, h5py.Dataset):
                    plans[key] = _plan(path, key, obj, None)
                else:
                    problems.append(f"`{key}` is a {type(obj).__name__}")
            except (CheckpointError, OSError, KeyError, ValueError, RuntimeError) as e:
                problems.append(" ".join(str(e).split())[:200])

    visit(f, "")
    return header, plans, modules, problems


def inspect_checkpoint(path, *, verify: bool = True) -> dict:
    """A JSON-able description: header, config, step, metrics, and per tensor its shape, dtype,
    logical trits, bytes on disk, bytes per trit and trit histogram (−1/0/+1 shares).

    The file is verified first (verify_checkpoint: any damage raises CheckpointError).
    verify=False shows what can be read without checks instead: `verified` is then False
    and `problems` lists what could not be read; nothing in it is to be trusted."""
    def read(path, f):
        if verify:
            header, plans, _ = _verify(path, f, None, keep=False)
            modules = OrderedDict((k, _attr(path, f[k], "module", "group", "text"))
                                  for k in _group_paths(plans))
            problems = []
        else:
            header, plans, modules, problems = _unverified(path, f)
        tensors = OrderedDict()
        total_trits = trit_bytes = 0
        for key, plan in plans.items():
            ds, cols = plan.ds, plan.cols
            parent = key.rpartition("/")[0]
            info = {"module": modules.get(parent) if parent else header["module"],
                    "shape": list(ds.shape), "dtype": str(ds.dtype),
                    "bytes_on_disk": int(ds.id.get_storage_size())}
            if cols is not None:
                rows = int(ds.shape[0])
                counts, invalid = _trit_histogram(ds, cols)
                n = rows * cols
                info.update(packing="base3-5", rows=rows, cols=cols, logical_trits=n,
                            bytes_per_trit=info["bytes_on_disk"] / n if n else None,
                            trit_shares={t: (float(c) / n if n else 0.0)
                                         for t, c in zip(("-1", "0", "+1"), counts)},
                            invalid_codes=invalid)
                total_trits += n
                trit_bytes += info["bytes_on_disk"]
            tensors[key] = info
        return header, modules, tensors, total_trits, trit_bytes, problems

    header, modules, tensors, total_trits, trit_bytes, problems = _opened(path, read)
    file_bytes = os.path.getsize(path)
    train_state = header["train_state"] if isinstance(header["train_state"], dict) else {}
    info = {
        "path": os.fspath(path), "verified": verify,
        **{k: header[k] for k in ("format", "format_version", "tritnet_version",
                                  "packing_scheme", "scale_function", "module")},
        "step": train_state.get("step"),
        "config": header["config"],
        "metrics": header["metrics"],
        "tokenizer": _tokenizer_summary(header.get("tokenizer")),
        "file_bytes": file_bytes,
        "logical_trits": total_trits,
        "packed_trit_bytes": trit_bytes,
        "bytes_per_trit": (trit_bytes / total_trits) if total_trits else None,
        "file_bytes_per_trit": (file_bytes / total_trits) if total_trits else None,
        "modules": modules,
        "tensors": tensors,
    }
    if not verify:
        info["problems"] = problems
    return info


def _tokenizer_summary(text):
    """What inspect shows of a subword tokenizer: its kind and size (its JSON is long)."""
    if text is None:
        return None
    try:
        spec = json.loads(text)
        size = len(spec["model"]["vocab"]) + len(spec.get("added_tokens") or [])
        return {"type": str(spec["model"]["type"]), "vocab_size": size, "json_bytes": len(text)}
    except (ValueError, KeyError, TypeError):
        return {"type": "unreadable", "vocab_size": None, "json_bytes": len(text)}


def _group_paths(plans):
    seen = OrderedDict()
    for key in plans:
        parts = key.split("/")[:-1]
        for depth in range(1, len(parts) + 1):
            seen["/".join(parts[:depth])] = None
    return list(seen)


def _human(n):
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def render_inspection(info: dict) -> str:
    """inspect_checkpoint's dict as the text `tritnet inspect` prints: the module tree with a
    line per tensor, then totals, config and metrics."""
    lines = []
    if not info.get("verified", True):
        lines.append("NOT VERIFIED (--no-verify): what follows was read without checks and may "
                     "be damaged or forged")
        lines += [f"  problem: {p}" for p in info.get("problems", [])]
    lines += [f"{info['path']}: {info['format']} v{info['format_version']}, written by tritnet "
              f"{info['tritnet_version']}, {_human(info['file_bytes'])}, step {info['step']}",
              f"model {info['module']}"]
    shown = set()
    for key, t in info["tensors"].items():
        parts = key.split("/")
        for depth in range(1, len(parts)):
            group = "/".join(parts[:depth])
            if group not in shown:
                shown.add(group)
                cls = info["modules"].get(group)
                lines.append(f"{'  ' * depth}{parts[depth - 1]}/" + (f"  {cls}" if cls else ""))
        pad = "  " * len(parts)
        line = f"{pad}{parts[-1]:<10} {str(tuple(t['shape'])):<16} {t['dtype']:<7} " \
               f"{_human(t['bytes_on_disk']):>9}"
        if "logical_trits" in t:
            s = t["trit_shares"]
            line += (f"  base3-5 {t['rows']}x{t['cols']} = {t['logical_trits']:,} trits, "
                     f"{t['bytes_per_trit']:.3f} B/trit, -1/0/+1 = "
                     f"{s['-1']:.3f}/{s['0']:.3f}/{s['+1']:.3f}")
            if t["invalid_codes"]:
                line += f"  ({t['invalid_codes']} INVALID bytes)"
        lines.append(line)
    if info["logical_trits"]:
        lines.append(f"total: {info['logical_trits']:,} logical trits in "
                     f"{_human(info['packed_trit_bytes'])} ({info['bytes_per_trit']:.3f} B/trit; "
                     f"whole file {info['file_bytes_per_trit']:.3f} B/trit)")
    lines.append(f"scale: {info['scale_function']}")
    lines.append("config: " + json.dumps(info["config"], sort_keys=True))
    if info["metrics"] is not None:
        lines.append("metrics: " + json.dumps(info["metrics"], sort_keys=True))
    if info.get("tokenizer") is not None:
        t = info["tokenizer"]
        lines.append(f"tokenizer: {t['type']}, {t['vocab_size']} tokens ({_human(t['json_bytes'])}"
                     " of JSON)")
    return "\n".join(lines)
