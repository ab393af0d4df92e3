"""Figures comparing FLQ runs, from their result workbooks.

:func:`plot_results` reads runs written by :func:`flq.results.write_results`
(or takes :class:`~flq.results.RunResults` already loaded) and draws PNG
figures with one line per run, labelled by :func:`run_label`: test
cross-entropy and accuracy per round and against the cumulative bits sent,
workers selected per round, and for ``bin`` runs which workers uploaded in
each round. matplotlib is imported only when a figure is drawn.

:func:`plot_results` raises :class:`ValueError` when given no paths, and
:class:`FileNotFoundError` / :class:`ValueError` from
:func:`~flq.results.read_results` for a missing or invalid workbook.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence, Union

import numpy as np
import pandas as pd

from .algorithm import compressors
from .results import RunResults, read_results

__all__ = ["plot_results", "run_label"]

PathLike = Union[str, "os.PathLike[str]"]

X_BITS_LABEL = "cumulative uplink+downlink bits"
X_UP_BITS_LABEL = "cumulative uplink bits (charged)"
X_ROUND_LABEL = "round"
Y_ENTROPY_LABEL = "test cross-entropy (nats)"
Y_ACC_LABEL = "test accuracy (fraction)"
Y_SELECTED_LABEL = "workers selected per round"


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
    return str(value)


def run_label(run: RunResults) -> str:
    """Legend label: mode plus the bits it really uses, from its config.

    e.g. ``"bbit (b_up 4, b_down 8)"``; a mode with a fixed width (the
    compressor table's ``fixed_bits``) shows it whatever ``b_up`` says
    (``"laq8 (b_up 8, b_down 32)"``). Adaptive width shows as ``b_up 2..8``
    and entropy coding as ``coded up+down`` (``coded up``, ``coded down``).
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


def _safe_filename(label: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_.")
    return safe or "run"


def _unique(labels: Sequence[str]) -> list[str]:
    out: list[str] = []
    counts: dict[str, int] = {}
    for label in labels:
        counts[label] = counts.get(label, 0) + 1
        out.append(label if counts[label] == 1 else f"{label} #{counts[label]}")
    return out


def plot_results(paths: Iterable[PathLike | RunResults], out_dir: PathLike) -> list[Path]:
    """Draw PNG figures comparing several runs (one line per run).

    ``paths`` are result workbooks (or already loaded :class:`RunResults`).
    Lines are labelled with :func:`run_label` (duplicates get ``#2``, ...).
    Rounds whose ``acc``/``entropy`` is NaN (not evaluated) are dropped.

    Files written to ``out_dir`` (created if needed), in this order:

    * ``entropy_vs_round.png`` -- test cross-entropy vs round
    * ``acc_vs_round.png`` -- test accuracy (0..1) vs round
    * ``entropy_vs_bits.png`` -- test cross-entropy vs ``cum_bits_total``
      (cumulative uplink+downlink **bits**, log-scale x; points <= 0 dropped)
    * ``acc_vs_bits.png`` -- test accuracy vs ``cum_bits_total`` (log x)
    * ``acc_vs_uplink_bits.png`` -- test accuracy vs ``bits_up_cum``, the
      uplink bits charged (log x): what the budget spends
    * ``selected_per_round.png`` -- ``selcnt`` vs round
    * ``binary_uploads_<label>.png`` -- for each run with a ``bin_<mode>``
      sheet: raster of workers (y) by rounds (x), dark = uploaded; ``<label>``
      is the run label reduced to ``[A-Za-z0-9._-]``.

    Uses matplotlib's object API with the Agg canvas (works headless; the
    global backend is not changed).

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
    labels = _unique([run_label(r) for r in runs])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def new_axes():
        fig = Figure(figsize=(7.0, 4.5), dpi=100)
        FigureCanvasAgg(fig)
        return fig, fig.add_subplot(1, 1, 1)

    def save(fig, name: str) -> None:
        target = out / name
        fig.tight_layout()
        fig.savefig(target, format="png")
        written.append(target)

    def line_plot(name, xcol, ycol, xlabel, ylabel, title, logx=False):
        fig, ax = new_axes()
        any_line = False
        any_positive_x = False
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
            any_positive_x |= bool(len(x))
            ax.plot(x, y, marker="o" if len(x) <= 30 else None, markersize=3, label=label)
            any_line = True
        if logx and any_positive_x:
            ax.set_xscale("log")
        if xcol == "iter":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ycol == "selcnt":
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        if any_line:
            ax.legend(loc="best", fontsize="small")
        save(fig, name)

    line_plot("entropy_vs_round.png", "iter", "entropy", X_ROUND_LABEL, Y_ENTROPY_LABEL, "Test cross-entropy per round")
    line_plot("acc_vs_round.png", "iter", "acc", X_ROUND_LABEL, Y_ACC_LABEL, "Test accuracy per round")
    line_plot(
        "entropy_vs_bits.png",
        "cum_bits_total",
        "entropy",
        X_BITS_LABEL,
        Y_ENTROPY_LABEL,
        "Test cross-entropy vs communicated bits",
        logx=True,
    )
    line_plot(
        "acc_vs_bits.png",
        "cum_bits_total",
        "acc",
        X_BITS_LABEL,
        Y_ACC_LABEL,
        "Test accuracy vs communicated bits",
        logx=True,
    )
    line_plot(
        "acc_vs_uplink_bits.png",
        "bits_up_cum",
        "acc",
        X_UP_BITS_LABEL,
        Y_ACC_LABEL,
        "Test accuracy vs uplink bits",
        logx=True,
    )
    line_plot("selected_per_round.png", "iter", "selcnt", X_ROUND_LABEL, Y_SELECTED_LABEL, "Workers selected per round")

    used_names: set[str] = set()
    for run, label in zip(runs, labels):
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
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(X_ROUND_LABEL)
        ax.set_ylabel("worker id")
        ax.set_title(f"Uploads per round: {label}")
        base = f"binary_uploads_{_safe_filename(label)}"
        name, n = f"{base}.png", 2
        while name in used_names:
            name, n = f"{base}_{n}.png", n + 1
        used_names.add(name)
        save(fig, name)
    return written
