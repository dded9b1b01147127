"""HDF5 checkpoints (DESIGN §8): one self-describing file per checkpoint, no pickle.

Layout of a file (read it with `tritnet inspect`, plain h5py, or `h5ls -r` / `h5dump -A`):

    /                               attributes: format = "tritnet-checkpoint", format_version,
                                    tritnet_version, packing_scheme, scale_function, module
                                    (the model's class), config, train_state, metrics,
                                    module_state (JSON text)
    /blocks/3/attn/q                a group per module (attribute `module`: its class name),
    /blocks/3/attn/q/T_packed       mirroring state_dict's dotted names
    /blocks/3/attn/q/E ...          datasets keep their dtypes (int8 E, T_accum, E_accum, ...)

- Packed trits (the buffers a module lists in `packed_trits()`, e.g. TernaryLinear.T_packed)
  are stored in the disk form base3-5: uint8 (rows, ceil(cols/5)), 1.6 bits per trit, with
  attributes packing = "base3-5", rows, cols. Loading converts them back to bitplane32.
  Conversion runs in row chunks (tritnet_kernels.packing), so a 10M-row table never needs a
  full-size temporary; a table on the GPU is converted there and only its base3 bytes cross.
- Every dataset carries `crc32` (zlib.crc32 of its on-disk bytes, C order): HDF5 itself does
  not notice a flipped byte inside a dataset, this does. A dataset may also carry
  `valid_range` = [lo, hi], written from the module's optional `value_ranges()`.
- train_state holds what the loop passes (step, data position with its RNG state, ...), plus
  `optimizer` (TritFlip.state_dict()) and `tritnet_rng` (tritnet.random's generator state),
  which this module adds. module_state holds `get_extra_state()` of modules that define it
  (counters outside the buffers that decide future steps, such as dead-code restart timing).

Writes are atomic: the file is written to `.NAME.tmp-PID` beside the target, flushed and
fsynced, renamed onto the target with os.replace, and the directory is fsynced. A save never
writes into an existing checkpoint, so a crash (even SIGKILL) at any moment leaves the previous
checkpoint whole. Loading validates everything (signature, format and version, each dataset's
presence, shape, dtype, trit codes, declared ranges and crc32) before touching the model.
"""

from __future__ import annotations

import json
import os
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import NamedTuple

import h5py
import numpy as np

from . import __version__, backend
from . import random as trandom
from tritnet_kernels import packing as kpacking

FORMAT_NAME = "tritnet-checkpoint"
FORMAT_VERSION = 1
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
_JSON_ATTRS = ("config", "train_state", "metrics", "module_state")


class CheckpointError(Exception):
    """A checkpoint cannot be written or read; the message says what, where, and what to do."""


@dataclass
class Checkpoint:
    """What load_checkpoint read: the header, and the arrays in their in-memory form
    (packed trits as bitplane32 uint32), keyed by state_dict's dotted names."""

    path: str
    format_version: int
    tritnet_version: str
    config: dict
    train_state: dict
    metrics: dict | None
    arrays: "OrderedDict[str, np.ndarray]" = field(repr=False)
    module_state: dict = field(default_factory=dict)

    @property
    def step(self):
        return self.train_state.get("step")

    def restore_random_state(self) -> None:
        """Set tritnet.random's generator to its state at save time (for exact resume)."""
        if "tritnet_rng" in self.train_state:
            trandom.set_state(self.train_state["tritnet_rng"])


class _Tensor(NamedTuple):
    name: str          # dotted, as in state_dict
    array: object      # numpy or cupy array (memory form)
    cols: int | None   # trit columns when the array is a packed trit buffer
    valid_range: tuple | None
    module: str        # class of the owning module


# --------------------------------------------------------------------------------------------
# The model's side: which tensors, how each is stored.


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


def _write_tensor(f, t: _Tensor, compression):
    path = t.name.replace(".", "/")
    parent, _, leaf = path.rpartition("/")
    group = f[parent] if parent else f
    shape, dtype = _disk_shape(t)
    # Small datasets stay contiguous: chunk indexes would cost more than gzip saves.
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    opts = {"compression": compression} if compression and nbytes >= _MIN_COMPRESS_BYTES else {}
    ds = group.create_dataset(leaf, shape=shape, dtype=dtype, **opts)
    crc = 0
    for rows in _row_chunks(shape, dtype.itemsize):
        part = t.array if rows is None else t.array[rows]
        if t.cols is not None:
            part = backend.get_array_module(part).ascontiguousarray(part)
            try:
                # On the array's own device: only the smaller base3 bytes cross to the host.
                part = kpacking.bitplane_to_base3(part, t.cols)
            except (TypeError, ValueError) as e:
                raise CheckpointError(f"save_checkpoint: buffer `{t.name}` (rows {rows.start}.."
                                      f"{rows.stop - 1}) is not a valid bitplane32 trit array: "
                                      f"{e}") from None
        part = np.ascontiguousarray(backend.to_numpy(part))
        if rows is None:
            ds[()] = part
        else:
            ds[rows] = part
        crc = zlib.crc32(part.view(np.uint8).reshape(-1) if part.size else b"", crc)
    ds.attrs["crc32"] = np.uint32(crc)
    if t.cols is not None:
        ds.attrs["packing"] = "base3-5"
        ds.attrs["rows"] = np.int64(shape[0])
        ds.attrs["cols"] = np.int64(t.cols)
    if t.valid_range is not None:
        ds.attrs["valid_range"] = np.array(t.valid_range, dtype=np.int64)


def save_checkpoint(path, model, *, optimizer=None, config: dict, train_state: dict,
                    metrics_summary: dict | None = None, compression: str | None = None) -> str:
    """Write `model` (any tritnet.nn.Module tree) and the training state to `path`, atomically.

    config: the run's configuration (JSON-able). train_state: step, data position, RNG states,
    anything the loop needs to resume; `optimizer` (TritFlip.state_dict()) and `tritnet_rng`
    (tritnet.random's state) are added. metrics_summary: optional, shown by inspect.
    compression: None (default: fastest) or "gzip". Returns the path written.
    """
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
    # Everything that can fail on the caller's values fails here, before any file exists.
    attrs = {
        "format": FORMAT_NAME,
        "format_version": np.int64(FORMAT_VERSION),
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
    tensors = _tensors(model)

    directory = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(path)
    if os.path.isdir(path):
        raise CheckpointError(f"save_checkpoint: {path} is a directory; give a file name such "
                              "as ckpt.h5")
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"save_checkpoint: cannot create directory {directory}: "
                              f"{e.strerror}") from None
    _remove_stale_temporaries(directory, base)
    tmp = os.path.join(directory, f".{base}.tmp-{os.getpid()}")
    try:
        with h5py.File(tmp, "w", track_order=True) as f:
            for k, v in attrs.items():
                f.attrs[k] = v
            holders = {k.rpartition(".")[0] for k in tensors}
            holders |= {h.rsplit(".", i)[0] for h in holders for i in range(1, h.count(".") + 1)}
            for name, module in model.named_modules():
                if name and name in holders:  # a group per module that holds state in its subtree
                    g = f.create_group(name.replace(".", "/"), track_order=True)
                    g.attrs["module"] = type(module).__name__
            for t in tensors.values():
                _write_tensor(f, t, compression)
            f.flush()
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException as e:  # KeyboardInterrupt included: never leave a half file behind
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise CheckpointError(f"save_checkpoint: could not write {path} ({e}); the previous "
                                  "checkpoint there, if any, is untouched. Free disk space or "
                                  "choose another --out") from None
        raise
    try:
        _fsync(directory, directory=True)   # makes the rename itself durable
    except OSError:
        pass  # some filesystems cannot fsync a directory; the file is in place regardless
    return path


# --------------------------------------------------------------------------------------------
# Loading.


def _check_file(path) -> None:
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path} does not exist; check the path (a run folder "
                              "keeps its checkpoints as *.h5)")
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} is a directory; give the .h5 file inside it")
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError as e:
        raise CheckpointError(f"checkpoint {path} cannot be read ({e.strerror}); check its "
                              "permissions") from None
    if not head:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes), probably an interrupted "
                              "copy; use an earlier checkpoint")
    if head != _HDF5_SIGNATURE and not h5py.is_hdf5(path):
        raise CheckpointError(f"checkpoint {path} is not an HDF5 file (first bytes {head!r}); "
                              "expected a file written by tritnet's save_checkpoint")


def _json_attr(path, f, key, required):
    if key not in f.attrs:
        if required:
            raise CheckpointError(f"checkpoint {path}: root attribute `{key}` is missing; the "
                                  "file is damaged or was not written by tritnet")
        return None
    text = f.attrs[key]
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    try:
        return json.loads(text)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: root attribute `{key}` is not valid JSON "
                              f"({e}); the file is damaged, use an earlier checkpoint") from None


def _text_attr(f, key):
    v = f.attrs.get(key)
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else v


def _read_header(path, f) -> dict:
    fmt = _text_attr(f, "format")
    if fmt != FORMAT_NAME:
        raise CheckpointError(f"checkpoint {path} is an HDF5 file but not a tritnet checkpoint "
                              f"(root attribute format = {fmt!r}, expected {FORMAT_NAME!r})")
    version = f.attrs.get("format_version")
    if not isinstance(version, (int, np.integer)) or version < 1:
        raise CheckpointError(f"checkpoint {path}: format_version = {version!r} is not a "
                              "positive integer; the file is damaged")
    version = int(version)
    if version > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} was written by a newer tritnet? format "
                              f"{version} > {FORMAT_VERSION} (this is tritnet {__version__}, "
                              f"written by {_text_attr(f, 'tritnet_version')}); upgrade tritnet "
                              "to load it")
    header = {"format": fmt, "format_version": version,
              "tritnet_version": _text_attr(f, "tritnet_version"),
              "packing_scheme": _text_attr(f, "packing_scheme"),
              "scale_function": _text_attr(f, "scale_function"),
              "module": _text_attr(f, "module")}
    for key in _JSON_ATTRS:
        header[key] = _json_attr(path, f, key, required=key in ("config", "train_state"))
    if not isinstance(header["config"], dict) or not isinstance(header["train_state"], dict):
        raise CheckpointError(f"checkpoint {path}: config and train_state must be JSON objects")
    header["module_state"] = header["module_state"] or {}
    return header


def _datasets(f) -> "OrderedDict[str, h5py.Dataset]":
    """Every dataset by path, in the file's creation order (visititems would sort by name)."""
    found = OrderedDict()

    def walk(group, prefix):
        for name, obj in group.items():
            if isinstance(obj, h5py.Dataset):
                found[prefix + name] = obj
            elif isinstance(obj, h5py.Group):
                walk(obj, prefix + name + "/")

    walk(f, "")
    return found


def _where(path, key):
    return f"checkpoint {path}: dataset `{key}`"


def _expect(path, key, ds, t: _Tensor | None):
    """Check one dataset's structure (no data read); returns (cols, valid_range)."""
    packing = _text_attr(ds, "packing")
    if t is not None:
        shape, dtype = _disk_shape(t)
        cols, valid_range = t.cols, t.valid_range
        what = "base3-5 packed trits" if cols is not None else "the model's"
        if cols is not None and packing != "base3-5":
            raise CheckpointError(f"{_where(path, key)} has packing {packing!r}, expected "
                                  "'base3-5' (packed trits); the file was changed or written by "
                                  "another tool, use another checkpoint")
        if np.dtype(ds.dtype) != dtype:
            raise CheckpointError(f"{_where(path, key)} has dtype {ds.dtype}, expected {dtype} "
                                  f"({what}); the file was changed or written by a different "
                                  "tritnet, use another checkpoint")
        if tuple(ds.shape) != shape:
            raise CheckpointError(f"{_where(path, key)} has shape {tuple(ds.shape)}, expected "
                                  f"{shape} ({what}); is it a checkpoint of another config "
                                  "(--preset, --config)?")
        if cols is not None and (ds.attrs.get("rows") != shape[0] or ds.attrs.get("cols") != cols):
            raise CheckpointError(f"{_where(path, key)} declares rows={ds.attrs.get('rows')}, "
                                  f"cols={ds.attrs.get('cols')}, expected rows={shape[0]}, "
                                  f"cols={cols}; the file is damaged")
        return cols, valid_range
    valid_range = ds.attrs.get("valid_range")
    valid_range = tuple(int(v) for v in valid_range) if valid_range is not None else None
    if packing is None:
        return None, valid_range
    if packing != "base3-5":
        raise CheckpointError(f"{_where(path, key)} has unknown packing {packing!r} (this "
                              "tritnet reads 'base3-5'); upgrade tritnet")
    rows, cols = ds.attrs.get("rows"), ds.attrs.get("cols")
    if not isinstance(rows, (int, np.integer)) or not isinstance(cols, (int, np.integer)) \
            or cols < 1 or rows < 0:
        raise CheckpointError(f"{_where(path, key)}: packed trits need integer attributes rows "
                              f"and cols, found rows={rows!r}, cols={cols!r}; the file is damaged")
    cols = int(cols)
    expected = (int(rows), kpacking.n_base3_bytes(cols))
    if np.dtype(ds.dtype) != np.uint8:
        raise CheckpointError(f"{_where(path, key)} has dtype {ds.dtype}, expected uint8 "
                              "(base3-5 packed trits); the file was changed, use another checkpoint")
    if tuple(ds.shape) != expected:
        raise CheckpointError(f"{_where(path, key)} has shape {tuple(ds.shape)}, expected "
                              f"{expected} for rows={rows}, cols={cols}; the file is damaged")
    return cols, valid_range


def _check_base3_chunk(path, key, chunk, cols, r0):
    """Trit codes of base3 rows r0.. : bytes <= 242, padding digits = 1 (t = 0)."""
    bad = chunk > 242
    if bad.any():
        r, b = divmod(int(bad.argmax()), chunk.shape[1])
        raise CheckpointError(f"{_where(path, key)}: byte [{r0 + r}, {b}] = {int(chunk[r, b])} "
                              f"is not a trit code (base3-5 bytes are <= 242; row {r0 + r}, "
                              f"cols {5 * b}..{5 * b + 4}); the file is corrupted, use an "
                              "earlier checkpoint")
    k = cols - 5 * (chunk.shape[1] - 1)   # real trits in the last byte
    if k < 5 and chunk.shape[0]:
        last = chunk[:, -1]
        bad = last // 3 ** k != (3 ** (5 - k) - 1) // 2
        if bad.any():
            r = int(bad.argmax())
            raise CheckpointError(f"{_where(path, key)}: byte [{r0 + r}, {chunk.shape[1] - 1}] = "
                                  f"{int(last[r])} encodes nonzero padding trits beyond col "
                                  f"{cols - 1}; the file is corrupted, use an earlier checkpoint")


def _read_dataset(path, key, ds, cols, valid_range):
    """Read one dataset into its memory form, checking codes, ranges and crc32 chunk by chunk."""
    shape = tuple(ds.shape)
    if cols is not None:
        out = np.empty((shape[0], 2 * kpacking.n_groups(cols)), dtype=np.uint32)
    else:
        out = np.empty(shape, dtype=ds.dtype)
    crc = 0
    for rows in _row_chunks(shape, np.dtype(ds.dtype).itemsize):
        part = np.ascontiguousarray(ds[()] if rows is None else ds[rows])
        crc = zlib.crc32(part.view(np.uint8).reshape(-1) if part.size else b"", crc)
        if cols is not None:
            _check_base3_chunk(path, key, part, cols, rows.start)
            decoded = kpacking.base3_to_bitplane(part, cols)
            kpacking.validate_packed(decoded, cols, op=f"checkpoint {path}: `{key}`")
            out[rows] = decoded
            continue
        if valid_range is not None and part.size:
            lo, hi = int(part.min()), int(part.max())
            if lo < valid_range[0] or hi > valid_range[1]:
                bad = lo if lo < valid_range[0] else hi
                raise CheckpointError(f"{_where(path, key)} holds {bad}, outside its declared "
                                      f"range [{valid_range[0]}, {valid_range[1]}]; the file "
                                      "is corrupted, use an earlier checkpoint")
        if rows is None:
            out[...] = part
        else:
            out[rows] = part
    stored = ds.attrs.get("crc32")
    if stored is not None and int(stored) != crc:
        raise CheckpointError(f"{_where(path, key)} is corrupted: its crc32 is {crc:#010x}, the "
                              f"file says {int(stored):#010x} (bytes changed after it was "
                              "written); use an earlier checkpoint")
    return out


def read_header(path) -> dict:
    """The validated root attributes (format, versions, config, train_state, metrics) without
    reading any dataset: what a caller needs to build the model before load_checkpoint."""
    path = os.fspath(path)
    _check_file(path)
    try:
        with h5py.File(path, "r") as f:
            return _read_header(path, f)
    except CheckpointError:
        raise
    except (OSError, KeyError, ValueError, RuntimeError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupted ({type(e).__name__}: "
                              f"{e}); use an earlier checkpoint") from None


def load_checkpoint(path, model=None, optimizer=None, *, restore_rng: bool = False) -> Checkpoint:
    """Read and validate a checkpoint; then, if given, load it into `model` and `optimizer`.

    Everything is checked before the model is touched: a bad file raises CheckpointError and
    leaves the model as it was. restore_rng=True also sets tritnet.random's generator to its
    state at save time (what an exact resume needs; the data RNG is the loop's, in
    train_state). Returns a Checkpoint (config, train_state, metrics, arrays).
    """
    path = os.fspath(path)
    _check_file(path)
    expected = _tensors(model) if model is not None else None
    try:
        with h5py.File(path, "r") as f:
            header = _read_header(path, f)
            found = _datasets(f)
            names = OrderedDict((k.replace("/", "."), ds) for k, ds in found.items())
            if expected is not None:
                missing = [k.replace(".", "/") for k in expected if k not in names]
                extra = [k.replace(".", "/") for k in names if k not in expected]
                if missing or extra:
                    parts = ([f"missing dataset(s) {', '.join(missing)}"] if missing else []) + \
                            ([f"unexpected dataset(s) {', '.join(extra)}"] if extra else [])
                    raise CheckpointError(f"checkpoint {path} does not match the model "
                                          f"({type(model).__name__}): {'; '.join(parts)}. Was "
                                          "it written with another config (--preset, --config)?")
            plans = OrderedDict()
            for name, ds in names.items():
                key = name.replace(".", "/")
                plans[name] = _expect(path, key, ds, expected[name] if expected else None)
            arrays = OrderedDict()
            for name, (cols, valid_range) in plans.items():
                arrays[name] = _read_dataset(path, name.replace(".", "/"), names[name], cols,
                                             valid_range)
    except CheckpointError:
        raise
    except (OSError, KeyError, ValueError, RuntimeError, TypeError) as e:
        # h5py reports truncation and damaged metadata as OSError (sometimes KeyError).
        raise CheckpointError(f"checkpoint {path} is truncated or corrupted ({type(e).__name__}: "
                              f"{e}); use an earlier checkpoint") from None

    ckpt = Checkpoint(path, header["format_version"], header["tritnet_version"],
                      header["config"], header["train_state"], header["metrics"], arrays,
                      header["module_state"])
    if optimizer is not None and "optimizer" not in ckpt.train_state:
        raise CheckpointError(f"checkpoint {path} holds no optimizer state (train_state has no "
                              "`optimizer`); load it without an optimizer")
    if model is not None:
        model.load_state_dict(arrays)
        modules = dict(model.named_modules())
        for name, extra in ckpt.module_state.items():
            m = modules.get(name)
            if m is not None and hasattr(m, "set_extra_state"):
                m.set_extra_state(extra)
    if optimizer is not None:
        optimizer.load_state_dict(ckpt.train_state["optimizer"])
    if restore_rng:
        ckpt.restore_random_state()
    return ckpt


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


def inspect_checkpoint(path) -> dict:
    """A JSON-able description: header, config, step, metrics, and per tensor its shape, dtype,
    logical trits, bytes on disk, bytes per trit and trit histogram (−1/0/+1 shares)."""
    path = os.fspath(path)
    _check_file(path)
    try:
        with h5py.File(path, "r") as f:
            header = _read_header(path, f)
            tensors, modules = OrderedDict(), OrderedDict()
            total_trits = trit_bytes = 0
            for key, ds in _datasets(f).items():
                parent = key.rpartition("/")[0]
                parts = key.split("/")[:-1]
                for depth in range(1, len(parts) + 1):
                    group = "/".join(parts[:depth])
                    modules.setdefault(group, _text_attr(f[group], "module"))
                info = {"module": modules[parent] if parent else header["module"],
                        "shape": list(ds.shape), "dtype": str(ds.dtype),
                        "bytes_on_disk": int(ds.id.get_storage_size())}
                cols, _ = _expect(path, key, ds, None)
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
    except CheckpointError:
        raise
    except (OSError, KeyError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupted ({type(e).__name__}: "
                              f"{e}); use an earlier checkpoint") from None
    file_bytes = os.path.getsize(path)
    return {
        "path": path, **{k: header[k] for k in ("format", "format_version", "tritnet_version",
                                                "packing_scheme", "scale_function", "module")},
        "step": header["train_state"].get("step"),
        "config": header["config"],
        "metrics": header["metrics"],
        "file_bytes": file_bytes,
        "logical_trits": total_trits,
        "packed_trit_bytes": trit_bytes,
        "bytes_per_trit": (trit_bytes / total_trits) if total_trits else None,
        "file_bytes_per_trit": (file_bytes / total_trits) if total_trits else None,
        "modules": modules,
        "tensors": tensors,
    }


def _human(n):
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def render_inspection(info: dict) -> str:
    """inspect_checkpoint's dict as the text `tritnet inspect` prints: the module tree with a
    line per tensor, then totals, config and metrics."""
    lines = [f"{info['path']}: {info['format']} v{info['format_version']}, written by tritnet "
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
    return "\n".join(lines)
