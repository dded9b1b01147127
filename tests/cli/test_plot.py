"""`tritnet plot`: a real run's metrics drawn into an image that holds the runs, and one
clear error line for what cannot be drawn."""

import gzip
import json
import os
import sys

import numpy as np
import pytest
# matplotlib's own dependency: the test extra installs both; a GPU machine running only
# `-m cuda` may have neither
Image = pytest.importorskip("PIL.Image")

from tests.helpers import (REPO, cli, code_text, one_error_line, small_config, train_args,
                           write_run_files)
from tritnet import backend

LEARNING = os.path.join(REPO, "benchmarks", "results", "learning", "tiny-cpu")
TINY = small_config(steps=4, eval_every=2, eval_batches=2, save_every=0)
TEXT = code_text(400)
# matplotlib's first two colours: the first and second run
RUN_COLOURS = [(0x1f, 0x77, 0xb4), (0xff, 0x7f, 0x0e)]


def image(path):
    """(width, height, RGB pixels as an int array (h, w, 3))."""
    with Image.open(path) as im:
        return im.size[0], im.size[1], np.asarray(im.convert("RGB"), dtype=np.int64)


def holds_colour(pixels, rgb, tolerance=12):
    return bool((np.abs(pixels - np.array(rgb)).max(axis=-1) <= tolerance).sum() > 200)


def assert_drawn(path, n_runs):
    width, height, pixels = image(path)
    assert (width, height) == (800, 600)
    ink = (pixels < 200).any(axis=-1).mean()          # anything darker than a light grey
    assert ink > 0.02, f"the image is nearly blank ({ink:.1%} of its pixels drawn)"
    for rgb in RUN_COLOURS[:n_runs]:
        assert holds_colour(pixels, rgb), f"no line of colour {rgb}"


def test_plot_of_committed_runs(tmp_path):
    """Two runs of benchmarks/results/learning, overlaid, against tokens and against time."""
    runs = [os.path.join(LEARNING, f"{name}.metrics.jsonl.gz") for name in ("newtiny", "b32nomem")]
    out = tmp_path / "runs.png"
    res = cli("plot", *runs, "-o", out)
    assert res.exit_code == 0, res.output
    assert res.stdout.strip() == f"wrote {out}: 2 run(s) against tokens"
    assert_drawn(out, 2)
    assert cli("plot", *runs, "-o", tmp_path / "time.png", "--x", "time").exit_code == 0
    assert_drawn(tmp_path / "time.png", 2)
    # the pictures differ: the x axis is another one
    assert not np.array_equal(image(out)[2], image(tmp_path / "time.png")[2])


def test_plot_of_a_run_trained_here(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITNET_DEVICE", "cpu")
    backend.set_device("cpu")
    write_run_files(tmp_path, TINY, TEXT, config_name="tiny.json")
    run = tmp_path / "run"
    res = cli(*train_args(tmp_path, run, config_name="tiny.json"))
    assert res.exit_code == 0, res.output
    out = tmp_path / "run.svg"
    res = cli("plot", run, "-o", out)
    assert res.exit_code == 0, res.output
    svg = out.read_text()
    assert svg.startswith("<?xml") and "held-out" in svg and "bigram baseline" in svg
    assert cli("plot", run, "-o", tmp_path / "run.png").exit_code == 0
    assert_drawn(tmp_path / "run.png", 1)


def test_a_line_cut_short_is_skipped_with_a_warning(tmp_path):
    rows = [{"step": 0, "tokens": 0, "elapsed": 0.0, "val_bpb": 8.0, "bigram_bpb": 3.5}]
    rows += [{"step": s, "tokens": 64 * s, "loss": 2.0, "train_bpb": 8.0 - 0.1 * s,
              "tokens_per_s": 1000.0, "elapsed": 0.1 * s,
              **({"val_bpb": 7.0 - 0.1 * s} if s % 10 == 0 else {})} for s in range(1, 41)]
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 41, "tok'
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text(text)
    with pytest.warns(UserWarning, match=r"run/metrics.jsonl: skipped 1 line\(s\) that are "
                                         r"not metrics rows"):
        res = cli("plot", tmp_path / "run", "-o", tmp_path / "p.png")
    assert res.exit_code == 0, res.output
    assert_drawn(tmp_path / "p.png", 1)


def test_what_cannot_be_plotted_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    one_error_line(cli("plot", tmp_path / "nothere", "-o", tmp_path / "p.png"), 1,
                   r"nothere does not exist; give a run folder or a metrics")
    one_error_line(cli("plot", tmp_path / "empty", "-o", tmp_path / "p.png"), 1,
                   r"empty holds no metrics.jsonl")
    (tmp_path / "notes.jsonl").write_text('{"step": 1, "hello": 1}\n')
    one_error_line(cli("plot", tmp_path / "notes.jsonl", "-o", tmp_path / "p.png"), 1,
                   r"notes.jsonl holds no training or evaluation rows")
    with gzip.open(tmp_path / "bad.jsonl.gz", "wb") as fh:
        fh.write(b"\xff\xfe not text")
    one_error_line(cli("plot", tmp_path / "bad.jsonl.gz", "-o", tmp_path / "p.png"), 1,
                   r"cannot read .*bad.jsonl.gz")
    run = os.path.join(LEARNING, "newtiny.metrics.jsonl.gz")
    one_error_line(cli("plot", run, "-o", tmp_path / "p.jpg"), 2,
                   r"Invalid value for -o: .*p.jpg: the image format comes from the name; end "
                   r"it in .png, .svg, .pdf")
    one_error_line(cli("plot", run, "-o", tmp_path / "no" / "p.png"), 1,
                   r"cannot write .*p.png \(No such file or directory\); choose another -o")
    one_error_line(cli("plot", "-o", tmp_path / "p.png"), 2, r"Missing argument 'RUNS...'")
    assert not list(tmp_path.glob("*.png")) and not list(tmp_path.glob(".*tmp*"))


def test_without_matplotlib_it_says_how_to_install_it(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # `import matplotlib` fails
    run = os.path.join(LEARNING, "newtiny.metrics.jsonl.gz")
    one_error_line(cli("plot", run, "-o", tmp_path / "p.png"), 1,
                   r"tritnet plot needs matplotlib, which is not installed: pip install "
                   r"\"tritnet\[plot\]\"")
    assert not (tmp_path / "p.png").exists()
