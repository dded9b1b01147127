"""Compiled kernels on disk (tritnet_kernels/_disk_cache.py): a later run loads what an
earlier one compiled, and a changed source file of the package, any of them, is compiled
again."""

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from tritnet_kernels import _disk_cache

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PROBE = """
import tritnet_kernels._probe_user as u
print(u.read(), u.read.stats.cache_hits.get(u.read.signatures[0], 0))
"""


def _run(path, code, **env):
    out = subprocess.run([sys.executable, "-c", code], cwd=path, capture_output=True,
                         text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(path), **env})
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_a_cached_kernel_is_recompiled_when_a_rule_it_calls_changes(tmp_path):
    """Numba alone would keep the caller's cached code (its own file is unchanged) and go on
    returning the old rule's value."""
    package = tmp_path / "tritnet_kernels"
    shutil.copytree(os.path.join(ROOT, "tritnet_kernels"), package,
                    ignore=shutil.ignore_patterns("__pycache__"))
    rule = package / "_probe_dep.py"
    rule.write_text("import numba\n\n@numba.njit(cache=True)\ndef value():\n    return 1\n")
    (package / "_probe_user.py").write_text(textwrap.dedent("""
        import numba
        from ._probe_dep import value

        @numba.njit(cache=True)
        def read():
            return value()
    """))
    env = {"NUMBA_CACHE_DIR": ""}
    assert _run(tmp_path, PROBE, **env) == ["1", "0"]      # compiled, then written
    assert _run(tmp_path, PROBE, **env) == ["1", "1"]      # loaded from the cache
    assert any(f.suffix == ".nbi" for f in (package / "__pycache__").iterdir())
    rule.write_text(rule.read_text().replace("return 1", "return 2"))
    assert _run(tmp_path, PROBE, **env) == ["2", "0"]      # the rule's change is seen
    assert _run(tmp_path, PROBE, **env) == ["2", "1"]


def test_the_package_stamp_covers_every_source_file(tmp_path, monkeypatch):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "a.py").write_text("x = 1\n")
    (package / "b.py").write_text("y = 1\n")
    monkeypatch.setattr(_disk_cache, "PACKAGE_DIR", str(package))
    first = _disk_cache._package_stamp()
    assert _disk_cache._package_stamp() == first
    (package / "b.py").write_text("y = 2\n")
    assert _disk_cache._package_stamp() != first
    (package / "b.py").write_text("y = 1\n")
    assert _disk_cache._package_stamp() == first
    (package / "c.py").write_text("")
    assert _disk_cache._package_stamp() != first


class _Compiler:
    def __init__(self, image=b"\x7fELF image", entry="_Z6kernel"):
        self.calls, self.image, self.entry = 0, image, entry

    def __call__(self):
        self.calls += 1
        return self.image, self.entry


def test_cubin_cache_compiles_once_then_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITNET_KERNEL_CACHE", str(tmp_path))
    compile_image = _Compiler()
    key = ("module", "kernel", (), ("array(float32, 2d, C)",), (9, 0))
    assert _disk_cache.cubin("kernel", key, compile_image) == (b"\x7fELF image", "_Z6kernel")
    assert _disk_cache.cubin("kernel", key, compile_image) == (b"\x7fELF image", "_Z6kernel")
    assert compile_image.calls == 1
    files = list((tmp_path / _disk_cache.SOURCE_STAMP[:16]).iterdir())
    assert [f.suffix for f in files] == [".cubin"]
    # another argument signature or architecture is another image
    _disk_cache.cubin("kernel", key[:-1] + ((8, 0),), compile_image)
    assert compile_image.calls == 2


@pytest.mark.parametrize("damage", ["truncate", "flip", "header", "empty"])
def test_a_damaged_cubin_entry_is_compiled_again_and_rewritten(tmp_path, monkeypatch, damage):
    monkeypatch.setenv("TRITNET_KERNEL_CACHE", str(tmp_path))
    compile_image = _Compiler()
    key = ("module", "kernel")
    _disk_cache.cubin("kernel", key, compile_image)
    (path,) = (tmp_path / _disk_cache.SOURCE_STAMP[:16]).iterdir()
    blob = path.read_bytes()
    path.write_bytes({"truncate": blob[:-3], "flip": blob[:-1] + bytes([blob[-1] ^ 1]),
                      "header": b"something else\n" + blob, "empty": b""}[damage])
    assert _disk_cache.cubin("kernel", key, compile_image) == (b"\x7fELF image", "_Z6kernel")
    assert compile_image.calls == 2
    assert path.read_bytes() == blob
    assert _disk_cache.cubin("kernel", key, compile_image)[1] == "_Z6kernel"
    assert compile_image.calls == 2


def test_cubin_cache_off_or_unwritable_still_compiles(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITNET_KERNEL_CACHE", "0")
    compile_image = _Compiler()
    for _ in range(2):
        assert _disk_cache.cubin("kernel", ("k",), compile_image)[1] == "_Z6kernel"
    assert compile_image.calls == 2
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("TRITNET_KERNEL_CACHE", str(blocked))
    assert _disk_cache.cubin("kernel", ("k",), compile_image)[1] == "_Z6kernel"
    assert compile_image.calls == 3


def test_cubin_cache_removes_other_stamps_unused_for_a_week(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITNET_KERNEL_CACHE", str(tmp_path))
    old, recent = tmp_path / ("0" * 16), tmp_path / ("1" * 16)
    for folder in (old, recent):
        folder.mkdir()
        (folder / "k.cubin").write_bytes(b"x")
    week = 8 * 24 * 3600
    os.utime(old, (os.path.getmtime(old) - week,) * 2)
    _disk_cache.cubin("kernel", ("k",), _Compiler())
    assert not old.exists() and recent.exists()
    assert (tmp_path / _disk_cache.SOURCE_STAMP[:16]).is_dir()


@pytest.mark.cuda
def test_cuda_a_second_process_loads_its_kernels_from_disk(tmp_path):
    """The first process compiles and writes each fast-path kernel's image; the second loads
    every one of them (no compile) and computes the same product."""
    code = textwrap.dedent("""
        import cupy, numpy as np
        from tritnet_kernels import _disk_cache, matmul, packing
        rng = np.random.default_rng(0)
        T = rng.integers(-1, 2, (96, 128)).astype(np.int8)
        E = np.zeros(96, np.int8)
        x = rng.standard_normal((3, 128)).astype(np.float32)
        y = matmul.ternary_matmul(cupy.asarray(x), cupy.asarray(packing.pack_trits(T)),
                                  cupy.asarray(E), 128)
        print(float(cupy.asnumpy(y).sum()), _disk_cache.stats["hits"],
              _disk_cache.stats["misses"], _disk_cache.stats["writes"])
    """)
    env = {"TRITNET_KERNEL_CACHE": str(tmp_path)}
    first = _run(ROOT, code, **env)
    second = _run(ROOT, code, **env)
    assert int(first[2]) > 0 and int(first[3]) == int(first[2])
    assert second[0] == first[0]
    assert int(second[1]) == int(first[2]) and int(second[2]) == 0
