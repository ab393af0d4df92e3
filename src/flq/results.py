"""Result files of FLQ runs: write and read back.

A federated run produces one *record* (a ``dict``) per communication round.
:func:`write_results` stores the records of one run in an ``.xlsx`` workbook
and :func:`read_results` loads such a workbook back (:mod:`flq.plots` draws
figures from them).

Per-round columns (:data:`CURVE_COLUMNS`, in this order)
--------------------------------------------------------
* ``iter`` (int) -- round number ``k + 1`` (1-based).
* ``loss`` (float) -- mean training loss of the workers this round.
* ``acc`` (float) -- test accuracy of the global model, fraction ``0..1``;
  NaN on rounds that were not evaluated.
* ``entropy`` (float) -- mean test cross-entropy of the global model (nats);
  NaN on rounds that were not evaluated.
* ``selcnt`` (int) -- number of workers selected (uploading) this round.
* ``bits_up_cum`` (int) -- uplink **bits** charged, cumulative over rounds
  ``1..iter``: per upload its data (``b n`` in wire format 1, 8 x the coded
  bytes in format 2; :func:`flq.algorithm.packing.charged_bits`).
* ``bits_down_cum`` (int) -- downlink **bits** charged, cumulative.
* ``cum_bits_total`` (int) -- ``bits_up_cum + bits_down_cum`` (**bits**).
* ``wire_bytes_up`` / ``wire_bytes_down`` (int) -- **bytes** measured on the
  wire this round, uplink / downlink.
* ``wire_bytes_up_cum`` / ``wire_bytes_down_cum`` (int) -- the same,
  cumulative (**bytes**).
* ``round_time_s`` (float) -- wall-clock duration of the round (**seconds**).

Every run also records ``bits_up_nominal_cum`` / ``bits_down_nominal_cum``
(int, **bits**: the same vectors at ``b n``, the original's count) and
``b_up_mean`` (float: mean width of the round's uploads, NaN without one).

Note the units: ``bits_*`` / ``cum_bits_total`` are the algorithm's own bit
accounting (payload bits), ``wire_bytes_*`` are bytes actually measured on the
transport.  Records may carry extra keys; they are written after the columns
above, in order of first appearance.  Excel stores numbers as IEEE doubles, so
integers are exact up to 2**53.

Workbook layout
---------------
* ``curve_<mode>`` -- the records, one row per round.
* ``bin_<mode>`` -- only for a mode whose compressor entry has ``upload_sheet`` (``bin``): the binary upload series,
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
does not exist.

Why one module of this size: it writes and reads the same workbook layout, so
the sheet and column names live in one place for both directions; plotting is
in :mod:`flq.plots`.
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

from .algorithm import compressors
from .outputs import atomic_write

__all__ = [
    "CURVE_COLUMNS",
    "RunResults",
    "write_results",
    "results_workbook",
    "read_results",
    "default_results_path",
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
                f"record {i} (iter={rec.get('iter', '?')}) misses required column(s): {', '.join(missing)}"
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
        raise ValueError(f"`selected` has {len(selected)} rounds but there are {len(iters)} records")
    matrix = np.zeros((len(iters), num_workers), dtype=np.int64)
    for k, ids in enumerate(selected):
        for w in ids:
            w = int(w)
            if not 0 <= w < num_workers:
                raise ValueError(f"selected worker id {w} in round {k + 1} is outside 0..{num_workers - 1}")
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
    scheme = compressors.UPLINK.get(mode)
    if scheme is not None and scheme.upload_sheet:
        sheets[f"{BIN_PREFIX}{mode}"] = _binary_frame([int(v) for v in curve["iter"]], selected, num_workers)
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
        raise ValueError(f"{p}: no '{CURVE_PREFIX}<mode>' sheet (sheets: {', '.join(sheets) or 'none'})")
    curve_name = curve_names[0]
    mode = curve_name[len(CURVE_PREFIX) :]
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
