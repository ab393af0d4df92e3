"""Result files of FLQ runs: write, read back and plot.

A federated run produces one *record* (a ``dict``) per communication round.
:func:`write_results` stores the records of one run in an ``.xlsx`` workbook,
:func:`read_results` loads such a workbook back and :func:`plot_results`
draws PNG figures that compare several runs.

Per-round columns (:data:`CURVE_COLUMNS`, in this order)
--------------------------------------------------------
* ``iter`` (int) -- round number ``k + 1`` (1-based).
* ``loss`` (float) -- mean training loss of the workers this round.
* ``acc`` (float) -- test accuracy of the global model, fraction ``0..1``;
  NaN on rounds that were not evaluated.
* ``entropy`` (float) -- mean test cross-entropy of the global model (nats);
  NaN on rounds that were not evaluated.
* ``selcnt`` (int) -- number of workers selected (uploading) this round.
* ``bits_up_cum`` (int) -- uplink **bits** counted by the algorithm,
  cumulative over rounds ``1..iter``.
* ``bits_down_cum`` (int) -- downlink **bits** counted by the algorithm,
  cumulative.
* ``cum_bits_total`` (int) -- ``bits_up_cum + bits_down_cum`` (**bits**).
* ``wire_bytes_up`` / ``wire_bytes_down`` (int) -- **bytes** measured on the
  wire this round, uplink / downlink.
* ``wire_bytes_up_cum`` / ``wire_bytes_down_cum`` (int) -- the same,
  cumulative (**bytes**).
* ``round_time_s`` (float) -- wall-clock duration of the round (**seconds**).

Note the units: ``bits_*`` / ``cum_bits_total`` are the algorithm's own bit
accounting (payload bits), ``wire_bytes_*`` are bytes actually measured on the
transport.  Records may carry extra keys; they are written after the columns
above, in order of first appearance.  Excel stores numbers as IEEE doubles, so
integers are exact up to 2**53.

Workbook layout
---------------
* ``curve_<mode>`` -- the records, one row per round.
* ``bin_<mode>`` -- only when ``mode == "bin"``: the binary upload series,
  columns ``iter, w0, ..., w{M-1}``; cell ``1`` when that worker uploaded in
  that round, ``0`` otherwise.
* ``config`` -- two columns ``key, value``: the run's full configuration with
  nested dicts flattened to ``section.key``; scalars (str, int, float, bool)
  are stored as cells, anything else (lists, dicts, ``None``, NaN/inf) as JSON
  text.

Errors
------
:func:`write_results` raises :class:`ValueError` (one-line message) when a
record misses a required column, when ``mode`` is not usable as a sheet name,
or when a ``bin`` run lacks a valid ``selected``/``num_workers``.
:func:`read_results` raises :class:`ValueError` naming the file when the
workbook has no ``curve_*`` sheet and :class:`FileNotFoundError` when the file
does not exist.  :func:`plot_results` raises :class:`ValueError` when given no
paths.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence, Union

import numpy as np
import pandas as pd

from .outputs import atomic_write

__all__ = [
    "CURVE_COLUMNS",
    "RunResults",
    "write_results",
    "results_workbook",
    "read_results",
    "default_results_path",
    "plot_results",
    "run_label",
]

PathLike = Union[str, "os.PathLike[str]"]

#: Ordered per-round columns every record must provide (see module docstring).
CURVE_COLUMNS: list[str] = [
    "iter",
    "loss",
    "acc",
    "entropy",
    "selcnt",
    "bits_up_cum",
    "bits_down_cum",
    "cum_bits_total",
    "wire_bytes_up",
    "wire_bytes_down",
    "wire_bytes_up_cum",
    "wire_bytes_down_cum",
    "round_time_s",
]

#: Curve columns holding floats (cast back to float when reading).
_FLOAT_COLUMNS = ("loss", "acc", "entropy", "round_time_s")

CURVE_PREFIX = "curve_"
BIN_PREFIX = "bin_"
CONFIG_SHEET = "config"
_MAX_SHEET_NAME = 31  # Excel limit
_BAD_SHEET_CHARS = re.compile(r"[\[\]:*?/\\]")


# --------------------------------------------------------------------------- #
# writing
# --------------------------------------------------------------------------- #
def _check_mode(mode: str) -> None:
    if not isinstance(mode, str) or not mode:
        raise ValueError(f"mode must be a non-empty string, got {mode!r}")
    longest = max(len(CURVE_PREFIX), len(BIN_PREFIX)) + len(mode)
    if longest > _MAX_SHEET_NAME or _BAD_SHEET_CHARS.search(mode):
        raise ValueError(
            f"mode {mode!r} cannot be used in an Excel sheet name "
            f"(max {_MAX_SHEET_NAME - len(CURVE_PREFIX)} chars, none of []:*?/\\)"
        )


def _curve_frame(records: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    extras: list[str] = []
    seen = set(CURVE_COLUMNS)
    for i, rec in enumerate(records):
        if not isinstance(rec, Mapping):
            raise ValueError(f"record {i} is a {type(rec).__name__}, expected a dict")
        missing = [c for c in CURVE_COLUMNS if c not in rec]
        if missing:
            raise ValueError(
                f"record {i} (iter={rec.get('iter', '?')}) misses required "
                f"column(s): {', '.join(missing)}"
            )
        for key in rec:
            if key not in seen:
                seen.add(key)
                extras.append(key)
    columns = CURVE_COLUMNS + extras
    rows = [[_cell_scalar(rec.get(c)) for c in columns] for rec in records]
    frame = pd.DataFrame(rows, columns=columns)
    for col in _FLOAT_COLUMNS:
        frame[col] = pd.to_numeric(frame[col], errors="coerce").astype(float)
    return frame


def _cell_scalar(value: Any) -> Any:
    """numpy scalars -> Python scalars; None stays None (empty cell)."""
    if isinstance(value, np.generic):
        return value.item()
    return value


def _binary_frame(
    iters: Sequence[int],
    selected: Sequence[Iterable[int]] | None,
    num_workers: int | None,
) -> pd.DataFrame:
    if selected is None or num_workers is None:
        raise ValueError("mode 'bin' needs both `selected` and `num_workers`")
    num_workers = int(num_workers)
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    if len(selected) != len(iters):
        raise ValueError(
            f"`selected` has {len(selected)} rounds but there are {len(iters)} records"
        )
    matrix = np.zeros((len(iters), num_workers), dtype=np.int64)
    for k, ids in enumerate(selected):
        for w in ids:
            w = int(w)
            if not 0 <= w < num_workers:
                raise ValueError(
                    f"selected worker id {w} in round {k + 1} is outside 0..{num_workers - 1}"
                )
            matrix[k, w] = 1
    frame = pd.DataFrame(matrix, columns=[f"w{m}" for m in range(num_workers)])
    frame.insert(0, "iter", np.asarray(list(iters), dtype=np.int64))
    return frame


def _flatten_config(config: Mapping[str, Any] | None, prefix: str = "") -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = []
    if config is None:
        return items
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and len(value) > 0:
            items.extend(_flatten_config(value, prefix=f"{name}."))
        else:
            items.append((name, _config_cell(value)))
    return items


def _config_cell(value: Any) -> Any:
    """Value for a config cell: plain scalars as-is, everything else JSON text."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, str):
        # "" would read back as an empty cell, and text that looks like JSON
        # would be parsed on reading: store both JSON-quoted so they round-trip.
        if value == "" or _parse_config_value(value) is not value:
            return json.dumps(value)
        return value
    if isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return json.dumps(value)  # "NaN", "Infinity", "-Infinity"
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (tuple, set, frozenset)):
        value = sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    return json.dumps(value, default=str, sort_keys=False)


def _workbook_bytes(sheets: Mapping[str, pd.DataFrame]) -> bytes:
    """``sheets`` (name -> frame, in order) as an ``.xlsx`` file, built in
    memory with openpyxl, so a failing disk later fails one plain write and
    leaves no half-closed zip behind."""
    buffer = io.BytesIO()
    with pd.ExcelWriter(buffer, engine="openpyxl") as writer:
        for name, frame in sheets.items():
            frame.to_excel(writer, sheet_name=name, index=False)
    return buffer.getvalue()


def write_results(
    path: PathLike,
    mode: str,
    records: Sequence[Mapping[str, Any]],
    config: Mapping[str, Any] | None,
    selected: Sequence[Iterable[int]] | None = None,
    num_workers: int | None = None,
) -> Path:
    """Write one run's results to an ``.xlsx`` workbook, atomically.

    Parameters
    ----------
    path:
        Target file; parent folders are created.  An existing file is
        replaced only once the new workbook is complete (written to a
        temporary file in the same folder, then ``os.replace``).
    mode:
        Run mode (e.g. ``"bin"``, ``"bbit"``); names the sheets.
    records:
        One dict per round with at least the keys of :data:`CURVE_COLUMNS`
        (bits are bit counts, ``wire_bytes_*`` byte counts, ``round_time_s``
        seconds, ``acc``/``entropy`` NaN on rounds not evaluated).  Extra keys
        become extra columns after :data:`CURVE_COLUMNS`.
    config:
        The run's full configuration; nested dicts are flattened to
        ``section.key`` rows in the ``config`` sheet, non-scalar values are
        stored as JSON text.
    selected:
        ``mode == "bin"`` only: for each round (same order as ``records``) the
        ids ``0..num_workers-1`` of the workers that uploaded.
    num_workers:
        ``mode == "bin"`` only: number of workers ``M`` (columns ``w0..w{M-1}``).

    Sheets written: ``curve_<mode>``, ``bin_<mode>`` (only for ``"bin"``),
    ``config``.

    Returns
    -------
    Path
        The path written.

    Raises
    ------
    ValueError
        A record misses a required column (message names the record and the
        columns); ``mode`` is unusable as a sheet name; for ``"bin"``,
        ``selected``/``num_workers`` are missing, of the wrong length, or hold
        an out-of-range worker id.
    """
    target = Path(path)
    workbook = results_workbook(mode, records, config, selected, num_workers)
    atomic_write(target, lambda tmp: tmp.write_bytes(workbook))
    return target


def results_workbook(
    mode: str,
    records: Sequence[Mapping[str, Any]],
    config: Mapping[str, Any] | None,
    selected: Sequence[Iterable[int]] | None = None,
    num_workers: int | None = None,
) -> bytes:
    """The ``.xlsx`` file :func:`write_results` writes, built in memory (same
    arguments and errors, no ``path``), for a caller that stores it itself."""
    _check_mode(mode)
    records = list(records)
    curve = _curve_frame(records)
    sheets: dict[str, pd.DataFrame] = {f"{CURVE_PREFIX}{mode}": curve}
    if mode == "bin":
        sheets[f"{BIN_PREFIX}{mode}"] = _binary_frame(
            [int(v) for v in curve["iter"]], selected, num_workers
        )
    sheets[CONFIG_SHEET] = pd.DataFrame(_flatten_config(config), columns=["key", "value"])
    return _workbook_bytes(sheets)


def default_results_path(
    results_dir: PathLike,
    dataset: str,
    mode: str,
    timestamp: datetime | str | None = None,
) -> Path:
    """Return ``<results_dir>/flq_results_<dataset>_<mode>_<YYYYmmdd_HHMMSS>.xlsx``.

    ``timestamp`` may be a :class:`~datetime.datetime` (formatted as
    ``%Y%m%d_%H%M%S``), a ready string, or ``None`` for the current local time.
    Nothing is created on disk.
    """
    if timestamp is None:
        timestamp = datetime.now()
    if isinstance(timestamp, datetime):
        stamp = timestamp.strftime("%Y%m%d_%H%M%S")
    else:
        stamp = str(timestamp)
    return Path(results_dir) / f"flq_results_{dataset}_{mode}_{stamp}.xlsx"


# --------------------------------------------------------------------------- #
# reading
# --------------------------------------------------------------------------- #
@dataclass
class RunResults:
    """One run loaded by :func:`read_results`.

    Attributes
    ----------
    path:   the workbook read.
    mode:   run mode, from the ``curve_<mode>`` sheet name.
    curve:  per-round frame (:data:`CURVE_COLUMNS` then extra columns);
            ``acc``/``entropy`` NaN on rounds not evaluated.
    binary: ``bin_<mode>`` frame (``iter, w0..w{M-1}``, 0/1) or ``None``.
    config: flattened config, ``"section.key" -> value``; scalars as stored
            (str/int/float/bool; an integral float may come back as int),
            JSON text parsed back to lists/dicts/None/NaN.
    """

    path: Path
    mode: str
    curve: pd.DataFrame
    binary: pd.DataFrame | None = None
    config: dict[str, Any] = field(default_factory=dict)


_JSON_WORDS = {"null", "NaN", "Infinity", "-Infinity", "true", "false"}


def _parse_config_value(value: Any) -> Any:
    if isinstance(value, str):
        text = value.strip()
        if text[:1] in ("[", "{", '"') or text in _JSON_WORDS:
            try:
                return json.loads(text)
            except ValueError:
                return value
    return value


def _read_config(path: Path, sheet_names: Sequence[str]) -> dict[str, Any]:
    if CONFIG_SHEET not in sheet_names:
        return {}
    import openpyxl  # read cells directly: pandas turns 1.0 into 1

    wb = openpyxl.load_workbook(path, read_only=True, data_only=True)
    try:
        rows = wb[CONFIG_SHEET].iter_rows(values_only=True)
        header = next(rows, None)
        if header is None:
            return {}
        header = list(header)
        try:
            ki, vi = header.index("key"), header.index("value")
        except ValueError:
            ki, vi = 0, 1
        config: dict[str, Any] = {}
        for row in rows:
            if row is None or len(row) <= ki or row[ki] is None:
                continue
            value = row[vi] if len(row) > vi else None
            config[str(row[ki])] = _parse_config_value(value)
        return config
    finally:
        wb.close()


def read_results(path: PathLike) -> RunResults:
    """Load a workbook written by :func:`write_results`.

    The curve sheet is the first sheet whose name starts with ``curve_``;
    its suffix is the run's mode.  ``bin_<mode>`` and ``config`` are optional.
    Float columns (``loss``, ``acc``, ``entropy``, ``round_time_s``) are
    returned as floats, empty cells as NaN.

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    ValueError
        The workbook has no ``curve_*`` sheet (message names the file).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"results file not found: {p}")
    sheets = pd.read_excel(p, sheet_name=None, engine="openpyxl")
    curve_names = [n for n in sheets if n.startswith(CURVE_PREFIX)]
    if not curve_names:
        raise ValueError(
            f"{p}: no '{CURVE_PREFIX}<mode>' sheet (sheets: {', '.join(sheets) or 'none'})"
        )
    curve_name = curve_names[0]
    mode = curve_name[len(CURVE_PREFIX):]
    curve = sheets[curve_name]
    for col in _FLOAT_COLUMNS:
        if col in curve.columns:
            curve[col] = pd.to_numeric(curve[col], errors="coerce").astype(float)
    binary = sheets.get(f"{BIN_PREFIX}{mode}")
    return RunResults(
        path=p,
        mode=mode,
        curve=curve,
        binary=binary,
        config=_read_config(p, list(sheets)),
    )


# --------------------------------------------------------------------------- #
# plotting
# --------------------------------------------------------------------------- #
X_BITS_LABEL = "cumulative uplink+downlink bits"
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

    e.g. ``"bbit (b_up 4, b_down 8)"``; ``fedavg`` and ``laq8`` send 32 and 8
    uplink bits whatever ``b_up`` says (``"laq8 (b_up 8, b_down 32)"``).
    """
    forced_up = {"fedavg": 32, "laq8": 8, "bin": 1}.get(run.mode)
    parts = []
    for name in ("b_up", "b_down"):
        value = _config_lookup(run.config, name)
        if name == "b_up" and forced_up is not None and value is not None:
            value = forced_up
        if name == "b_down" and value == 0:
            value = 32
        if value is not None:
            parts.append(f"{name} {_fmt(value)}")
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

    line_plot("entropy_vs_round.png", "iter", "entropy", X_ROUND_LABEL, Y_ENTROPY_LABEL,
              "Test cross-entropy per round")
    line_plot("acc_vs_round.png", "iter", "acc", X_ROUND_LABEL, Y_ACC_LABEL,
              "Test accuracy per round")
    line_plot("entropy_vs_bits.png", "cum_bits_total", "entropy", X_BITS_LABEL,
              Y_ENTROPY_LABEL, "Test cross-entropy vs communicated bits", logx=True)
    line_plot("acc_vs_bits.png", "cum_bits_total", "acc", X_BITS_LABEL, Y_ACC_LABEL,
              "Test accuracy vs communicated bits", logx=True)
    line_plot("selected_per_round.png", "iter", "selcnt", X_ROUND_LABEL, Y_SELECTED_LABEL,
              "Workers selected per round")

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
