"""One error root: every error class tritnet defines derives from TritnetError, and the CLI and
the data-parallel launcher treat exactly those as user errors."""

import ast
import pathlib
import queue

import pytest

import tritnet
from tritnet.errors import TritnetError

ROOT = pathlib.Path(tritnet.__file__).parent


def _error_classes():
    """(module, class name) of every public class named *Error, *Divergence or *NotFinite."""
    for path in sorted(ROOT.rglob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_") and \
                    node.name.endswith(("Error", "Divergence", "NotFinite")):
                module = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts)
                yield module, node.name


def test_every_error_class_derives_from_the_root():
    import importlib
    found = list(_error_classes())
    assert len(found) >= 9, found
    for module, name in found:
        cls = getattr(importlib.import_module(module), name)
        assert issubclass(cls, TritnetError), f"{module}.{name}"


def test_errors_keep_the_builtin_bases_callers_catch():
    from tritnet.backend import DeviceError
    from tritnet.config import ConfigError
    from tritnet.data import DataError
    from tritnet.distributed import DistributedError
    from tritnet.models import GenerationError
    for cls in (ConfigError, DataError, GenerationError):
        assert issubclass(cls, ValueError)
    for cls in (DeviceError, DistributedError):
        assert issubclass(cls, RuntimeError)


def test_cli_prints_any_tritnet_error_as_one_line(capsys):
    from cli.main import user_errors_are_one_line

    class Unlisted(TritnetError):
        pass

    @user_errors_are_one_line
    def command():
        raise Unlisted("the thing, the value and the fix")

    with pytest.raises(SystemExit) as exit_:
        command()
    assert exit_.value.code == 1
    assert capsys.readouterr().err == "tritnet: error: the thing, the value and the fix\n"


def test_launcher_returns_a_ranks_error_as_raised(monkeypatch, tmp_path):
    """A rank's TritnetError reaches the launcher as that class, its message whole; any other
    exception is a bug, reported as a DistributedError naming the rank."""
    from tritnet import distributed
    from tritnet.train import LossNotFinite
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(name, "")   # _rank_main sets them: restore them after the test
        monkeypatch.delenv(name)

    def fails(error):
        def train(**_):
            raise error
        return train

    for error, expected in ((LossNotFinite("step 3: the loss is nan"), LossNotFinite),
                            (KeyError("a bug"), distributed.DistributedError)):
        results = queue.Queue()
        with pytest.raises(SystemExit):
            distributed._rank_main(0, 1, 0, fails(error), {}, results)
        rank, kind, raised = results.get_nowait()
        assert (rank, kind, type(raised)) == (0, "error", expected)
        if expected is distributed.DistributedError:
            assert "rank 0 failed: KeyError" in str(raised)
        else:
            assert raised is error
