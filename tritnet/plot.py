"""Pictures of runs: bits per byte against tokens (or wall time), tokens/s below.

    tritnet plot runs/tiny                        # plot.png
    tritnet plot runs/tiny runs/notes -o runs.png --x time

A run is a run folder (its metrics.jsonl, as tritnet/train.py writes it) or a metrics file
itself (`.jsonl`, or `.jsonl.gz` as benchmarks/results/learning/ keeps them). The top panel
draws each run's held-out bpb (points joined by a line), its training bpb (a running mean,
pale) and the bigram baseline (dashed); the bottom panel its tokens/s (a running mean).
Several runs are overlaid, one colour each, under their names.

matplotlib is an optional extra (`pip install "tritnet[plot]"`), imported only to draw.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import warnings
from dataclasses import dataclass

import numpy as np

from .errors import TritnetError

FORMATS = (".png", ".svg", ".pdf")
X_AXES = ("tokens", "time")


class PlotError(TritnetError, ValueError):
    """Runs that cannot be plotted, or no matplotlib; the message says what to do."""


@dataclass
class RunMetrics:
    """The columns of one run's metrics.jsonl that a plot draws."""

    name: str
    tokens: np.ndarray          # training rows: tokens seen after the step
    elapsed: np.ndarray         # seconds since the run started (resumed runs: in total)
    train_bpb: np.ndarray
    tokens_per_s: np.ndarray
    eval_tokens: np.ndarray     # evaluation rows
    eval_elapsed: np.ndarray
    val_bpb: np.ndarray
    bigram_bpb: float | None


def _metrics_file(path) -> str:
    path = os.fspath(path)
    if os.path.isdir(path):
        inner = os.path.join(path, "metrics.jsonl")
        if not os.path.isfile(inner):
            raise PlotError(f"{path} holds no metrics.jsonl: give a run folder (what tritnet "
                            "train --out writes) or a metrics file")
        return inner
    if not os.path.isfile(path):
        raise PlotError(f"{path} does not exist; give a run folder or a metrics .jsonl file")
    return path


def run_name(path) -> str:
    """What the legend calls a run: its folder's name, or a metrics file's name without
    `.metrics.jsonl(.gz)`."""
    path = os.path.normpath(os.path.abspath(os.fspath(path)))
    base = os.path.basename(path)
    if os.path.isdir(path) or base in ("metrics.jsonl", "metrics.jsonl.gz"):
        return os.path.basename(path if os.path.isdir(path) else os.path.dirname(path))
    for suffix in (".gz", ".jsonl", ".metrics"):
        base = base[:-len(suffix)] if base.endswith(suffix) else base
    return base


def read_metrics(path, name: str | None = None) -> RunMetrics:
    """A run's training and evaluation rows. Lines that are not JSON objects with a step (a
    line cut short by a kill) are skipped, with a warning that counts them."""
    source = _metrics_file(path)
    opener = gzip.open if source.endswith(".gz") else open
    rows, bad = [], 0
    try:
        with opener(source, "rt", encoding="utf-8") as fh:
            for line in fh:
                try:
                    row = json.loads(line)
                except ValueError:
                    bad += 1
                    continue
                if isinstance(row, dict) and isinstance(row.get("step"), int):
                    rows.append(row)
                else:
                    bad += 1
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise PlotError(f"cannot read {source} ({getattr(e, 'strerror', None) or e}); give a "
                        "metrics.jsonl as tritnet train writes it") from None
    if bad:
        warnings.warn(f"{source}: skipped {bad} line(s) that are not metrics rows")
    train = [r for r in rows if _number(r.get("train_bpb"))]
    evals = [r for r in rows if _number(r.get("val_bpb"))]
    if not train and not evals:
        raise PlotError(f"{source} holds no training or evaluation rows (train_bpb, val_bpb); "
                        "is it a tritnet metrics.jsonl?")
    bigrams = [r["bigram_bpb"] for r in rows if _number(r.get("bigram_bpb"))]

    def column(rs, key):
        return np.array([float(r[key]) if _number(r.get(key)) else np.nan for r in rs])

    return RunMetrics(name or run_name(path), column(train, "tokens"), column(train, "elapsed"),
                      column(train, "train_bpb"), column(train, "tokens_per_s"),
                      column(evals, "tokens"), column(evals, "elapsed"),
                      column(evals, "val_bpb"), bigrams[-1] if bigrams else None)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)


def running_mean(values: np.ndarray, window: int) -> np.ndarray:
    """The mean of each value and the window - 1 before it (fewer at the start)."""
    sums = np.cumsum(np.insert(values, 0, 0.0))
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(ends - window, 0)
    return (sums[ends] - sums[starts]) / (ends - starts)


def _time_axis(seconds_max: float):
    """(divisor, label) so wall time reads in seconds, minutes or hours."""
    if seconds_max > 2 * 3600:
        return 3600.0, "wall time (hours)"
    if seconds_max > 120:
        return 60.0, "wall time (minutes)"
    return 1.0, "wall time (seconds)"


def plot_runs(runs: list, out, x: str = "tokens") -> str:
    """Draw `runs` (RunMetrics) into the image file `out` (.png, .svg or .pdf, written whole
    or not at all); x is "tokens" or "time". Returns out."""
    if x not in X_AXES:
        raise PlotError(f"x = {x!r}: expected one of {', '.join(X_AXES)}")
    if not runs:
        raise PlotError("no runs to plot: give at least one run folder or metrics file")
    out = os.fspath(out)
    if os.path.splitext(out)[1].lower() not in FORMATS:
        raise PlotError(f"{out}: the image format comes from the name; end it in "
                        f"{', '.join(FORMATS)}")
    try:
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
        from matplotlib.ticker import EngFormatter
    except ImportError:
        raise PlotError("tritnet plot needs matplotlib, which is not installed: pip install "
                        "\"tritnet[plot]\" (or pip install matplotlib)") from None

    fig = Figure(figsize=(8, 6), dpi=100, layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    colours = [f"C{i % 10}" for i in range(len(runs))]
    if x == "time":
        longest = max([np.nanmax(r.elapsed, initial=0) for r in runs] +
                      [np.nanmax(r.eval_elapsed, initial=0) for r in runs])
        divisor, xlabel = _time_axis(longest)
    else:
        divisor, xlabel = 1.0, "tokens"
        bottom.xaxis.set_major_formatter(EngFormatter(sep=""))

    shown = []   # the bpb values on screen, for the y range
    for run, colour in zip(runs, colours):
        train_x = (run.elapsed if x == "time" else run.tokens) / divisor
        eval_x = (run.eval_elapsed if x == "time" else run.eval_tokens) / divisor
        window = max(1, len(run.train_bpb) // 50)   # ~50 independent means over the run
        if len(run.train_bpb):
            train = running_mean(run.train_bpb, window)
            top.plot(train_x, train, color=colour, alpha=0.35, linewidth=1)
            shown.append(train)
            bottom.plot(train_x, running_mean(run.tokens_per_s, window), color=colour,
                        linewidth=1.2)
        if len(run.val_bpb):
            top.plot(eval_x, run.val_bpb, color=colour, marker="o", markersize=3, linewidth=1.6)
            shown.append(run.val_bpb)
    bigrams = [r.bigram_bpb for r in runs if r.bigram_bpb is not None]
    shared = bool(bigrams) and np.ptp(bigrams) < 1e-9   # one baseline: the runs share data
    for run, colour in zip(runs, colours):
        if run.bigram_bpb is not None:
            top.axhline(run.bigram_bpb, color="0.4" if shared else colour, linestyle="--",
                        linewidth=1)
    # the legend: a colour per run, then what each line style means
    grey = dict(color="0.3")
    key = [Line2D([], [], color=c, linewidth=3, label=r.name) for r, c in zip(runs, colours)]
    key += [Line2D([], [], marker="o", markersize=3, linewidth=1.6, label="held-out", **grey),
            Line2D([], [], alpha=0.35, linewidth=1, label="train (running mean)", **grey)]
    if bigrams:
        key.append(Line2D([], [], linestyle="--", linewidth=1, **grey, label=(
            f"bigram baseline {bigrams[0]:.3f}" if shared else "bigram baseline")))
    top.set_ylim(*_bpb_range(runs, shown, bigrams))
    top.set_ylabel("bits per byte")
    top.set_title("held-out and training bits per byte", fontsize=11)
    top.grid(alpha=0.3)
    top.legend(handles=key, fontsize=8, loc="upper right")
    bottom.set_ylabel("tokens/s")
    bottom.set_xlabel(xlabel)
    bottom.yaxis.set_major_formatter(EngFormatter(sep=""))
    bottom.grid(alpha=0.3)
    bottom.set_ylim(bottom=0)

    tmp = os.path.join(os.path.dirname(os.path.abspath(out)),
                       f".{os.path.basename(out)}.tmp-{os.getpid()}")
    try:
        fig.savefig(tmp, format=os.path.splitext(out)[1][1:].lower())
        os.replace(tmp, out)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise PlotError(f"cannot write {out} ({e.strerror or e}); choose another -o") from None
    return out


def _bpb_range(runs, shown, bigrams):
    """The y range: down to the best value, up to a quarter above the baseline, so the first
    steps (an untrained model's ~8 bpb) do not flatten the part worth seeing, but never below
    where a run ends (a short run that is still far above the baseline stays in view)."""
    values = np.concatenate([v[np.isfinite(v)] for v in shown]) if shown else np.array([])
    if not values.size:
        return (0.0, 1.0)
    lows = [values.min()] + bigrams
    ends = [v[np.isfinite(v)][-1] for v in shown if np.isfinite(v).any()]
    high = max([1.25 * b for b in bigrams] + [1.05 * e for e in ends]) if bigrams \
        else values.max()
    low = 0.97 * min(lows)
    return (low, max(high, low + 0.1))
