"""Figures comparing FLQ runs, from their result workbooks.

:func:`plot_results` reads runs written by :func:`flq.results.write_results`
(or takes :class:`~flq.results.RunResults` already loaded) and draws PNG
figures with one line per run: test cross-entropy and accuracy per round and
against the cumulative bits sent, workers selected per round, and for ``bin``
runs which workers uploaded in each round. :func:`draw_curves` draws one such
panel onto an axes of the caller's own figure (``benchmarks/
reproduction_report.py`` uses it). matplotlib is imported only when a figure
is drawn.

File names
----------
Each figure is ``<name>_<figure>.png`` (e.g. ``<name>_acc_vs_round.png``),
where ``<name>`` says what the set plots, so that runs plotted one after the
other into one folder never replace each other's figures.
:func:`plot_name` gives the default name: for one run its workbook's stem
(``flq_results_fashion_mnist_bbit_20261130_234411``, itself unique: see
:func:`flq.outputs.publish_unique`), for several runs ``compare_<modes>_<h>``
with ``<h>`` eight hex digits of a hash of the workbooks' resolved paths (the
same workbooks always get the same name, another set another name). This is
what ``flq simulate --plot`` and ``flq plot`` use; ``flq plot --name``
chooses another. :func:`plot_results` called with ``name=None`` keeps the
bare figure names (``acc_vs_round.png`` ...): the caller then owns the folder.

Labels
------
:func:`run_labels` labels each line with :func:`run_label` (mode and bits)
plus the config keys that differ between the runs plotted (``seed 1``,
``dir_alpha 0.5``); only runs whose configs are the same are told apart by
their workbook's time stamp (``run 20261130_234411``), else its stem.

Axes of counts (round, workers selected) get integer ticks only, also when
the series is constant.

:func:`plot_results` raises :class:`ValueError` when given no paths, and
:class:`FileNotFoundError` / :class:`ValueError` from
:func:`~flq.results.read_results` for a missing or invalid workbook.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import pandas as pd

from .algorithm import compressors
from .results import RunResults, read_results

__all__ = ["draw_curves", "plot_name", "plot_results", "run_label", "run_labels"]

PathLike = Union[str, "os.PathLike[str]"]

X_BITS_LABEL = "cumulative uplink+downlink bits"
X_UP_BITS_LABEL = "cumulative uplink bits (charged)"
X_ROUND_LABEL = "round"
Y_ENTROPY_LABEL = "test cross-entropy (nats)"
Y_ACC_LABEL = "test accuracy (fraction)"
Y_SELECTED_LABEL = "workers selected per round"

#: Curve columns that count things: their axes get integer ticks.
INTEGER_COLUMNS = frozenset({"iter", "selcnt"})

#: Config keys (last part) :func:`run_label` already shows.
_SHOWN_KEYS = frozenset({"mode", "b_up", "b_down", "entropy_coding", "adaptive_width"})
#: Config keys that do not change what a run computes (where files go, how it
#: logs, how a cluster is reached, how the run ended in words): not compared.
_IGNORED_KEYS = frozenset(
    {"run.detail", "auth_token", "credentials", "status_requires_token", "master_host", "master_port"}
)
_IGNORED_SECTIONS = ("logging.",)
_STAMP = re.compile(r"^flq_results_.+_(\d{8}_\d{6}(?:_\d+)?)$")


def _config_lookup(config: Mapping[str, Any], name: str) -> Any:
    """Value of ``name`` or of any ``section.name`` key (first match), else None."""
    if name in config:
        return config[name]
    for key, value in config.items():
        if str(key).rsplit(".", 1)[-1] == name:
            return value
    return None


def _fmt(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def run_label(run: RunResults) -> str:
    """Legend label: mode plus the bits it really uses, from its config.

    e.g. ``"bbit (b_up 4, b_down 8)"``; a mode with a fixed width (the
    compressor table's ``fixed_bits``) shows it whatever ``b_up`` says
    (``"laq8 (b_up 8, b_down 32)"``). Adaptive width shows as ``b_up 2..8``
    and entropy coding as ``coded up+down`` (``coded up``, ``coded down``).
    :func:`run_labels` adds what tells several runs apart.
    """
    scheme = compressors.UPLINK.get(run.mode)
    parts = []
    for name in ("b_up", "b_down"):
        value = _config_lookup(run.config, name)
        if name == "b_up" and scheme is not None and value is not None:
            value = scheme.bits(value)
        if name == "b_down" and value == 0:
            value = 32
        if name == "b_up" and value is not None and _config_lookup(run.config, "adaptive_width") is True:
            value = f"{scheme.min_bits if scheme else 2}..{_fmt(value)}"
        if value is not None:
            parts.append(f"{name} {_fmt(value)}")
    coding = _config_lookup(run.config, "entropy_coding")
    if coding in ("both", "up", "down"):
        parts.append("coded " + {"both": "up+down"}.get(coding, coding))
    return f"{run.mode} ({', '.join(parts)})" if parts else run.mode


def _compared(key: str) -> bool:
    short = key.rsplit(".", 1)[-1]
    if short in _SHOWN_KEYS or key in _IGNORED_KEYS or short in _IGNORED_KEYS:
        return False
    return not (short.endswith("_dir") or key.startswith(_IGNORED_SECTIONS))


def _differing_keys(configs: Sequence[Mapping[str, Any]]) -> list[str]:
    """Compared keys whose value is not the same in every config, in the
    order they first appear."""
    keys: list[str] = []
    seen: set[str] = set()
    for config in configs:
        for key in config:
            if key not in seen:
                seen.add(key)
                keys.append(key)
    out = []
    for key in keys:
        if not _compared(key):
            continue
        values = [_fmt(c[key]) if key in c else None for c in configs]
        if len(set(values)) > 1:
            out.append(key)
    return out


def _run_stamp(run: RunResults) -> str:
    """The run's time stamp from its workbook's default name, else its stem."""
    stem = Path(run.path).stem
    match = _STAMP.match(stem)
    return f"run {match.group(1)}" if match else stem


def _unique(labels: Sequence[str]) -> list[str]:
    out: list[str] = []
    counts: dict[str, int] = {}
    for label in labels:
        counts[label] = counts.get(label, 0) + 1
        out.append(label if counts[label] == 1 else f"{label} #{counts[label]}")
    return out


def run_labels(runs: Sequence[RunResults]) -> list[str]:
    """Legend labels that tell ``runs`` apart by what differs between them.

    Each is :func:`run_label` followed by the config keys whose values differ
    between the runs (``"bbit (b_up 4, b_down 8), seed 1, lr 0.01"``), by
    their last part unless two differing keys share it. Not compared: the keys
    :func:`run_label` shows, paths (``*_dir``), ``logging.*``, ``run.detail``
    and how a cluster is reached (host, port, token). Runs whose labels are
    still equal (the same config) get their workbook's time stamp
    (``run 20261130_234411``, else the workbook's stem), and ``#2``, ``#3``
    ... if even that is the same.
    """
    runs = list(runs)
    base = [run_label(r) for r in runs]
    keys = _differing_keys([r.config for r in runs]) if len(runs) > 1 else []
    shorts = [k.rsplit(".", 1)[-1] for k in keys]
    names = [s if shorts.count(s) == 1 else k for k, s in zip(keys, shorts)]
    labels = []
    for run, label in zip(runs, base):
        extra = [f"{name} {_fmt(run.config[key])}" for key, name in zip(keys, names) if key in run.config]
        labels.append(", ".join([label, *extra]))
    counts = Counter(labels)
    labels = [f"{label}, {_run_stamp(run)}" if counts[label] > 1 else label for label, run in zip(labels, runs)]
    return _unique(labels)


def _safe_filename(label: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_.")
    return safe or "run"


def plot_name(paths: Sequence[PathLike | RunResults]) -> str:
    """Default name of a set of figures (see the module docstring): one
    workbook's stem, or ``compare_<modes>_<8 hex digits>`` for several (the
    modes in the order given, each once; a workbook given by path is read
    for its mode; the digits hash the resolved paths, in order).

    Raises :class:`ValueError` for no paths, and what :func:`read_results`
    raises for a workbook it reads."""
    items = [Path(p.path) if isinstance(p, RunResults) else Path(p) for p in paths]
    if not items:
        raise ValueError("plot_name: no result files given")
    if len(items) == 1:
        return _safe_filename(items[0].stem)
    modes: list[str] = []
    for p, item in zip(paths, items):
        mode = p.mode if isinstance(p, RunResults) else read_results(item).mode
        if mode not in modes:
            modes.append(mode)
    digest = hashlib.sha1("\n".join(str(i.resolve()) for i in items).encode()).hexdigest()[:8]
    return _safe_filename(f"compare_{'-'.join(modes)}_{digest}")


def _integer_axis(axis: Any, values: np.ndarray, set_lim: Any) -> None:
    """Integer ticks on ``axis`` (also when fewer than two integers are in
    view); a constant series gets the view ``v-1 .. v+1``."""
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    if len(values):
        lo, hi = float(np.min(values)), float(np.max(values))
        if hi - lo < 1:
            set_lim(lo - 1 if lo >= 1 else lo - 0.5, hi + 1 if lo >= 1 else hi + 1.5)


def draw_curves(
    ax: Any,
    runs: Sequence[RunResults],
    labels: Sequence[str],
    xcol: str,
    ycol: str,
    xlabel: str,
    ylabel: str,
    title: Optional[str] = None,
    logx: bool = False,
    legend: bool = True,
) -> bool:
    """Draw ``ycol`` against ``xcol`` of each run's curve onto ``ax`` (a
    matplotlib Axes), one line per run labelled ``labels[i]``.

    Rows where either is NaN (rounds not evaluated) are dropped, and with
    ``logx`` (log-scale x) those with ``x <= 0``. Columns of
    :data:`INTEGER_COLUMNS` get integer ticks. Returns whether any line was
    drawn (a run without the columns is skipped).
    """
    any_line = False
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    for run, label in zip(runs, labels):
        curve = run.curve
        if xcol not in curve.columns or ycol not in curve.columns:
            continue
        x = pd.to_numeric(curve[xcol], errors="coerce").to_numpy(dtype=float)
        y = pd.to_numeric(curve[ycol], errors="coerce").to_numpy(dtype=float)
        keep = np.isfinite(x) & np.isfinite(y)
        if logx:
            keep &= x > 0
        x, y = x[keep], y[keep]
        xs.append(x)
        ys.append(y)
        ax.plot(x, y, marker="o" if len(x) <= 30 else None, markersize=3, label=label)
        any_line = True
    all_x = np.concatenate(xs) if xs else np.zeros(0)
    all_y = np.concatenate(ys) if ys else np.zeros(0)
    if logx and len(all_x):
        ax.set_xscale("log")
    if xcol in INTEGER_COLUMNS:
        _integer_axis(ax.xaxis, all_x, ax.set_xlim)
    if ycol in INTEGER_COLUMNS:
        _integer_axis(ax.yaxis, all_y, ax.set_ylim)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if any_line and legend:
        ax.legend(loc="best", fontsize="small")
    return any_line


#: The line figures of :func:`plot_results`: file suffix, x, y, x label, y label, title, log x.
LINE_FIGURES: list[tuple[str, str, str, str, str, str, bool]] = [
    ("entropy_vs_round", "iter", "entropy", X_ROUND_LABEL, Y_ENTROPY_LABEL, "Test cross-entropy per round", False),
    ("acc_vs_round", "iter", "acc", X_ROUND_LABEL, Y_ACC_LABEL, "Test accuracy per round", False),
    (
        "entropy_vs_bits",
        "cum_bits_total",
        "entropy",
        X_BITS_LABEL,
        Y_ENTROPY_LABEL,
        "Test cross-entropy vs communicated bits",
        True,
    ),
    ("acc_vs_bits", "cum_bits_total", "acc", X_BITS_LABEL, Y_ACC_LABEL, "Test accuracy vs communicated bits", True),
    ("acc_vs_uplink_bits", "bits_up_cum", "acc", X_UP_BITS_LABEL, Y_ACC_LABEL, "Test accuracy vs uplink bits", True),
    ("selected_per_round", "iter", "selcnt", X_ROUND_LABEL, Y_SELECTED_LABEL, "Workers selected per round", False),
]


def plot_results(paths: Iterable[PathLike | RunResults], out_dir: PathLike, name: Optional[str] = None) -> list[Path]:
    """Draw PNG figures comparing several runs (one line per run).

    ``paths`` are result workbooks (or already loaded :class:`RunResults`).
    Lines are labelled with :func:`run_labels`.
    Rounds whose ``acc``/``entropy`` is NaN (not evaluated) are dropped.

    Files written to ``out_dir`` (created if needed), in this order, each
    prefixed ``<name>_`` when ``name`` is given (:func:`plot_name` gives the
    default the command line uses; ``None`` writes the bare names below):

    * ``entropy_vs_round.png`` -- test cross-entropy vs round
    * ``acc_vs_round.png`` -- test accuracy (0..1) vs round
    * ``entropy_vs_bits.png`` -- test cross-entropy vs ``cum_bits_total``
      (cumulative uplink+downlink **bits**, log-scale x; points <= 0 dropped)
    * ``acc_vs_bits.png`` -- test accuracy vs ``cum_bits_total`` (log x)
    * ``acc_vs_uplink_bits.png`` -- test accuracy vs ``bits_up_cum``, the
      uplink bits charged (log x): what the budget spends
    * ``selected_per_round.png`` -- ``selcnt`` vs round (integer ticks)
    * ``binary_uploads_<label>.png`` -- for each run with a ``bin_<mode>``
      sheet: raster of workers (y) by rounds (x), dark = uploaded; ``<label>``
      is the run's :func:`run_label` (mode and bits) reduced to
      ``[A-Za-z0-9._-]``, with ``_2``, ``_3`` ... for a repeat (the title
      has its full :func:`run_labels` label).

    Uses matplotlib's object API with the Agg canvas (works headless; the
    global backend is not changed). An existing file of the same name is
    replaced.

    Returns
    -------
    list[Path]
        The files written, in the order above.

    Raises
    ------
    ValueError
        ``paths`` is empty.
    FileNotFoundError, ValueError
        From :func:`read_results` for a missing or invalid workbook.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    runs = [p if isinstance(p, RunResults) else read_results(p) for p in paths]
    if not runs:
        raise ValueError("plot_results: no result files given")
    labels = run_labels(runs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prefix = f"{_safe_filename(name)}_" if name else ""
    written: list[Path] = []

    def new_axes():
        fig = Figure(figsize=(7.0, 4.5), dpi=100)
        FigureCanvasAgg(fig)
        return fig, fig.add_subplot(1, 1, 1)

    def save(fig, figure: str) -> None:
        target = out / f"{prefix}{figure}.png"
        fig.tight_layout()
        fig.savefig(target, format="png")
        written.append(target)

    for figure, xcol, ycol, xlabel, ylabel, title, logx in LINE_FIGURES:
        fig, ax = new_axes()
        draw_curves(ax, runs, labels, xcol, ycol, xlabel, ylabel, title, logx=logx)
        save(fig, figure)

    used_names: set[str] = set()
    for run, label, short in zip(runs, labels, [run_label(r) for r in runs]):
        if run.binary is None or run.binary.empty:
            continue
        binary = run.binary
        wcols = [c for c in binary.columns if re.fullmatch(r"w\d+", str(c))]
        wcols.sort(key=lambda c: int(str(c)[1:]))
        if not wcols:
            continue
        matrix = binary[wcols].to_numpy(dtype=float).T  # workers x rounds
        if "iter" in binary.columns:
            iters = pd.to_numeric(binary["iter"], errors="coerce").to_numpy(dtype=float)
        else:
            iters = np.arange(1, matrix.shape[1] + 1, dtype=float)
        first, last = (float(iters[0]), float(iters[-1])) if len(iters) else (1.0, 1.0)
        fig, ax = new_axes()
        image = ax.imshow(
            matrix,
            aspect="auto",
            interpolation="nearest",
            origin="lower",
            cmap="Greys",
            vmin=0,
            vmax=1,
            extent=(first - 0.5, last + 0.5, -0.5, len(wcols) - 0.5),
        )
        cbar = fig.colorbar(image, ax=ax, ticks=[0, 1])
        cbar.ax.set_yticklabels(["skipped", "uploaded"])
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.set_xlabel(X_ROUND_LABEL)
        ax.set_ylabel("worker id")
        ax.set_title(f"Uploads per round: {label}")
        base = f"binary_uploads_{_safe_filename(short)}"
        figure, n = base, 2
        while figure in used_names:
            figure, n = f"{base}_{n}", n + 1
        used_names.add(figure)
        save(fig, figure)
    return written
