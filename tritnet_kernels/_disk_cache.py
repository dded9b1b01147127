"""Compiled kernels kept on disk, keyed so that a changed kernel is compiled again.

Two caches keep a second run of a command from compiling what the first one did
(docs/kernels.md#compiled-kernels-on-disk):

- Numba's own cache (`cache=True`): each function's machine code beside its source file, in
  `__pycache__` (or NUMBA_CACHE_DIR, or the user-wide folder where `__pycache__` is read-only).
  Numba decides whether an entry is fresh by the function's own source file alone, so a
  cached kernel that calls a rule from another file (update.py's kernels call
  _update_rules.py) would keep running the old rule after that file changed.
  `install_locators()` gives every function of this package the package's stamp instead: a
  hash of all its source files, so a change to any of them recompiles every kernel once.
- The cubin cache of the fast launch path (_launch.py): the linked GPU image of each kernel
  for one argument signature and one GPU architecture, in `kernel_cache_dir()`, under the
  package's stamp. A hit loads the image with one driver call instead of running Numba's
  compiler (NVVM and the linker: most of the seconds a first run spends before its first
  step or token).

Neither cache is needed for correctness: a missing, unreadable or damaged entry is compiled
again and rewritten.
"""

import hashlib
import os
import tempfile
import time
from pathlib import Path

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _package_stamp() -> str:
    """sha256 over the name and contents of every source file of this package."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(PACKAGE_DIR)):
        if name.endswith(".py"):
            h.update(name.encode() + b"\0")
            with open(os.path.join(PACKAGE_DIR, name), "rb") as f:
                h.update(f.read() + b"\0")
    return h.hexdigest()


SOURCE_STAMP = _package_stamp()


class _PackageStamp:
    """Mixed into Numba's source-file cache locators: for functions of this package, an entry
    is fresh while the whole package's sources are unchanged (not only the function's file);
    other functions are left to Numba's own locators."""

    @classmethod
    def from_function(cls, py_func, py_file):
        if os.path.dirname(os.path.abspath(py_file)) != PACKAGE_DIR:
            return None
        return super().from_function(py_func, py_file)

    def get_source_stamp(self):
        return SOURCE_STAMP


def _install(caching) -> None:
    """Put package-stamped twins of `caching`'s locators in front of its CacheImpl's own."""
    impl = caching.CacheImpl
    if any(issubclass(c, _PackageStamp) for c in impl._locator_classes):
        return
    names = ("UserProvidedCacheLocator", "InTreeCacheLocator", "UserWideCacheLocator")
    twins = []
    for name in names:
        base = getattr(caching, name, None) or getattr(caching, "_" + name, None)
        if base is not None:
            twins.append(type("Package" + name, (_PackageStamp, base), {}))
    impl._locator_classes = twins + list(impl._locator_classes)


def install_locators() -> None:
    """Package-stamped cache locators for Numba's CPU functions and numba-cuda's kernels."""
    from numba.core import caching
    _install(caching)
    try:
        from numba.cuda.core import caching as cuda_caching
    except ImportError:   # a numba-cuda that shares Numba's caching module
        return
    if cuda_caching is not caching:
        _install(cuda_caching)


# --- the cubin cache ----------------------------------------------------------------------

stats = {"hits": 0, "misses": 0, "writes": 0}   # this process's cubin cache lookups
_STALE_S = 7 * 24 * 3600   # other stamps' folders unused this long are removed


def kernel_cache_dir() -> Path | None:
    """Where compiled GPU images are kept: TRITNET_KERNEL_CACHE (empty or "0": nowhere), else
    $XDG_CACHE_HOME/tritnet/kernels, else ~/.cache/tritnet/kernels; one folder per package
    stamp inside it."""
    root = os.environ.get("TRITNET_KERNEL_CACHE")
    if root is not None:
        if root in ("", "0"):
            return None
        root = Path(root)
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tritnet" / \
            "kernels"
    return root / SOURCE_STAMP[:16]


def _entry_path(name: str, key) -> Path | None:
    folder = kernel_cache_dir()
    if folder is None:
        return None
    digest = hashlib.sha256(repr((SOURCE_STAMP, key)).encode()).hexdigest()[:24]
    safe = "".join(ch if ch.isalnum() or ch in "_-" else "_" for ch in name)[:80]
    return folder / f"{safe}-{digest}.cubin"


def _read(path: Path):
    """(image, entry name) from a cache file, or None if it is missing or damaged."""
    try:
        blob = path.read_bytes()
    except OSError:
        return None
    header, sep, image = blob.partition(b"\n")
    parts = header.split(b" ")
    if not sep or len(parts) != 3 or parts[0] != b"tritnet-cubin-1":
        return None
    entry, digest = parts[1].decode(errors="replace"), parts[2].decode(errors="replace")
    if hashlib.sha256(image).hexdigest() != digest or not entry:
        return None
    return image, entry


def _write(path: Path, image: bytes, entry: str) -> bool:
    """Write atomically (a reader sees the old file or the whole new one); False if the folder
    cannot be written, which only costs a later run its compile."""
    header = f"tritnet-cubin-1 {entry} {hashlib.sha256(image).hexdigest()}\n".encode()
    try:
        fresh = not path.parent.exists()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            f.write(header + image)
        os.replace(tmp, path)
    except OSError:
        return False
    if fresh:
        _prune(path.parent)
    return True


def _prune(keep: Path) -> None:
    """Remove other stamps' folders not used for a week (kernels of older sources)."""
    now = time.time()
    for folder in keep.parent.iterdir():
        if folder == keep or not folder.is_dir():
            continue
        try:
            if now - folder.stat().st_mtime > _STALE_S:
                for f in folder.iterdir():
                    f.unlink()
                folder.rmdir()
        except OSError:
            pass


def cubin(name: str, key, compile_image):
    """(image bytes, entry name) of a kernel: from the cache when an entry for `key` (a tuple
    naming the kernel, its options, argument types, architecture and tool versions; the
    package stamp is added here) exists and is whole, else compile_image() -> (image,
    entry), which is then written for later runs."""
    path = _entry_path(name, key)
    found = _read(path) if path is not None else None
    if found is not None:
        stats["hits"] += 1
        try:
            os.utime(path.parent)   # the folder is in use: _prune keeps it
        except OSError:
            pass
        return found
    stats["misses"] += 1
    image, entry = compile_image()
    if path is not None and _write(path, bytes(image), entry):
        stats["writes"] += 1
    return bytes(image), entry
