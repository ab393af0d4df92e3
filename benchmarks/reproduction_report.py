"""Reproduction report: figures and a results table from the published runs.

Reads the spreadsheets (``flq_results_*.xlsx``, written by ``flq simulate``,
loaded with :func:`flq.results.read_results`) of the four published runs on
Fashion-MNIST -- modes ``fedavg``, ``laq8``, ``bbit``, ``bin``, one
spreadsheet per mode (``benchmarks/reproduce.sh``) -- and writes into
``--out`` (default ``docs/reproduction``):

* ``comparison.png`` -- one 2x2 figure, the modes as one line each: test
  accuracy and test cross-entropy against the round (top), and against the
  cumulative uplink bits charged (``bits_up_cum``, log x; bottom);
* the same four panels as separate figures: ``acc_vs_round.png``,
  ``entropy_vs_round.png``, ``acc_vs_uplink_bits.png``,
  ``entropy_vs_uplink_bits.png`` (drawn by :func:`flq.plots.draw_curves`,
  labelled by :func:`flq.plots.run_labels`);
* ``results.md`` -- a markdown table, one row per mode: bits per element
  (b_up/b_down as sent), rounds, final test accuracy and cross-entropy (at
  the last evaluated round), cumulative uplink bits, mean uploads (workers
  selected) per round, wall time in seconds and the machine; then the
  spreadsheets it came from.

The spreadsheets hold no run wall time (only per-round times) and no host
description, so ``--walls FILE`` gives the wall times, in lines like
``fedavg rc=0 wall=4123`` (seconds; the last line of a mode counts, an
``rc`` other than 0 is shown), and ``--machine TEXT`` the machine; without
them the table shows the sum of the round times (marked ``~``) and the
PyTorch runtime each spreadsheet records (device, threads, version).

The table is deterministic: the same spreadsheets and options give the same
bytes (modes in the order fedavg, laq8, bbit, bin, then others by name; no
dates, no folders), so a test can compare a copy of it (README) with a fresh
one. ``--print`` prints it to stdout, ``--no-write`` writes nothing.

    .venv/bin/python benchmarks/reproduction_report.py docs/reproduction/*.xlsx \\
        [--out docs/reproduction] [--walls walls.txt] [--machine "2-core Xeon, 8 GB"] [--print] [--no-write]

Exit status 2 with one line on stderr for a missing or unreadable
spreadsheet, two spreadsheets of one mode, or an unreadable ``--walls`` file.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from flq.algorithm import compressors
from flq.results import RunResults, read_results

#: The published runs, in the order of the table and the legends.
MODES = ("fedavg", "laq8", "bbit", "bin")
#: The panels of comparison.png, row by row: file stem, x column, y column, x label, y label, title, log x.
PANELS: List[Tuple[str, str, str, str, str, str, bool]] = [
    ("acc_vs_round", "iter", "acc", "round", "test accuracy (fraction)", "Test accuracy per round", False),
    (
        "entropy_vs_round",
        "iter",
        "entropy",
        "round",
        "test cross-entropy (nats)",
        "Test cross-entropy per round",
        False,
    ),
    (
        "acc_vs_uplink_bits",
        "bits_up_cum",
        "acc",
        "cumulative uplink bits (charged)",
        "test accuracy (fraction)",
        "Test accuracy vs uplink bits",
        True,
    ),
    (
        "entropy_vs_uplink_bits",
        "bits_up_cum",
        "entropy",
        "cumulative uplink bits (charged)",
        "test cross-entropy (nats)",
        "Test cross-entropy vs uplink bits",
        True,
    ),
]
COLUMNS = (
    "mode",
    "bits (b_up/b_down)",
    "rounds",
    "final test accuracy",
    "final test cross-entropy",
    "cumulative uplink bits",
    "mean uploads per round",
    "wall time (s)",
    "machine",
)
_WALL_LINE = re.compile(r"^\s*(\S+)\s+(?:.*\s)?wall=(\d+(?:\.\d+)?)\b")
_RC = re.compile(r"\brc=(-?\d+)\b")


class ReportError(Exception):
    """A problem with the input, reported in one line."""


def _lookup(config: Mapping[str, Any], name: str) -> Any:
    """``flq_algorithm.<name>`` (or any ``section.<name>``) from a flat config."""
    if f"flq_algorithm.{name}" in config:
        return config[f"flq_algorithm.{name}"]
    for key, value in config.items():
        if str(key).rsplit(".", 1)[-1] == name:
            return value
    return None


def load_runs(paths: Sequence[Path]) -> List[RunResults]:
    """The spreadsheets, read, in table order; one per mode."""
    runs: List[RunResults] = []
    for path in paths:
        try:
            runs.append(read_results(path))
        except (OSError, ValueError, KeyError) as exc:
            raise ReportError(
                f"cannot read {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
            ) from None
    if not runs:
        raise ReportError("no spreadsheets given")
    by_mode: Dict[str, RunResults] = {}
    for run in runs:
        if run.mode in by_mode:
            raise ReportError(
                f"two spreadsheets of mode {run.mode}: {by_mode[run.mode].path.name} and {run.path.name} "
                "(give one per mode)"
            )
        by_mode[run.mode] = run
    order = [m for m in MODES if m in by_mode] + sorted(m for m in by_mode if m not in MODES)
    return [by_mode[m] for m in order]


def parse_walls(path: Path) -> Dict[str, Tuple[float, Optional[int]]]:
    """``mode -> (wall seconds, rc or None)`` from lines ``<mode> rc=0 wall=4123``
    (other lines are ignored; a mode's last line counts)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ReportError(f"cannot read --walls {path}: {exc.strerror or exc}") from None
    walls: Dict[str, Tuple[float, Optional[int]]] = {}
    for line in text.splitlines():
        match = _WALL_LINE.match(line)
        if match:
            rc = _RC.search(line)
            walls[match.group(1)] = (float(match.group(2)), int(rc.group(1)) if rc else None)
    return walls


def _num(values: pd.Series) -> np.ndarray:
    return pd.to_numeric(values, errors="coerce").to_numpy(dtype=float)


def _bits(run: RunResults) -> str:
    scheme = compressors.UPLINK.get(run.mode)
    up = _lookup(run.config, "b_up")
    down = _lookup(run.config, "b_down")
    if scheme is not None and up is not None:
        up = scheme.bits(up)
    if down == 0:
        down = 32
    text = f"{'?' if up is None else int(up)}/{'?' if down is None else int(down)}"
    if _lookup(run.config, "adaptive_width") is True:
        text += " adaptive"
    coding = _lookup(run.config, "entropy_coding")
    if coding in ("both", "up", "down"):
        text += " coded " + {"both": "up+down"}.get(coding, coding)
    return text


def _runtime(config: Mapping[str, Any]) -> str:
    parts = []
    if config.get("runtime.device") is not None:
        parts.append(str(config["runtime.device"]))
    threads = config.get("runtime.threads")
    if threads is not None:
        parts.append(f"{threads} thread{'' if threads == 1 else 's'}")
    if config.get("runtime.torch") is not None:
        parts.append(f"torch {config['runtime.torch']}")
    return ", ".join(parts)


def summarize(
    run: RunResults, walls: Optional[Mapping[str, Tuple[float, Optional[int]]]] = None, machine: Optional[str] = None
) -> Dict[str, str]:
    """One table row (column name -> cell text) for ``run``."""
    curve = run.curve
    iters = _num(curve["iter"])
    last_round = int(np.nanmax(iters)) if len(iters) else 0
    end = run.config.get("run.end")
    rounds = str(last_round) if end in (None, "completed") else f"{last_round} ({end})"

    def final(column: str) -> str:
        values = _num(curve[column]) if column in curve.columns else np.zeros(0)
        evaluated = np.flatnonzero(np.isfinite(values))
        if not len(evaluated):
            return "n/a"
        i = int(evaluated[-1])
        text = f"{values[i]:.4f}"
        return text if int(iters[i]) == last_round else f"{text} (round {int(iters[i])})"

    up = _num(curve["bits_up_cum"]) if "bits_up_cum" in curve.columns else np.zeros(0)
    up_text = f"{int(up[-1]):,}" if len(up) and math.isfinite(up[-1]) else "n/a"
    selected = _num(curve["selcnt"]) if "selcnt" in curve.columns else np.zeros(0)
    selected = selected[np.isfinite(selected)]
    mean_selected = f"{selected.mean():.2f}" if len(selected) else "n/a"

    if walls is not None and run.mode in walls:
        seconds, rc = walls[run.mode]
        wall = f"{seconds:.0f}" + ("" if rc in (None, 0) else f" (rc={rc})")
    elif "round_time_s" in curve.columns:
        times = _num(curve["round_time_s"])
        wall = f"~{np.nansum(times):.0f} (sum of rounds)"
    else:
        wall = "n/a"
    runtime = _runtime(run.config)
    if machine:
        where = f"{machine} ({runtime})" if runtime else machine
    else:
        where = runtime or "n/a"
    return {
        "mode": run.mode,
        "bits (b_up/b_down)": _bits(run),
        "rounds": rounds,
        "final test accuracy": final("acc"),
        "final test cross-entropy": final("entropy"),
        "cumulative uplink bits": up_text,
        "mean uploads per round": mean_selected,
        "wall time (s)": wall,
        "machine": where,
    }


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def results_table(
    runs: Sequence[RunResults],
    walls: Optional[Mapping[str, Tuple[float, Optional[int]]]] = None,
    machine: Optional[str] = None,
) -> str:
    """The markdown table (ends with a newline), one row per run in the order given."""
    right = {"rounds", "final test accuracy", "final test cross-entropy", "cumulative uplink bits"}
    right |= {"mean uploads per round", "wall time (s)"}
    lines = [
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---:" if c in right else "---" for c in COLUMNS) + "|",
    ]
    for run in runs:
        row = summarize(run, walls, machine)
        lines.append("| " + " | ".join(_cell(row[c]) for c in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def results_markdown(runs: Sequence[RunResults], table: str, figures: Sequence[str]) -> str:
    """The whole ``results.md``: title, the table, what the columns mean, the sources, the figures."""
    dataset = str(runs[0].config.get("dataset.name", "")) if runs else ""
    lines = [
        f"# Reproduction: {', '.join(r.mode for r in runs)}" + (f" on {dataset}" if dataset else ""),
        "",
        "Written by `benchmarks/reproduction_report.py` from the runs' spreadsheets; do not edit by hand.",
        "",
        table.rstrip("\n"),
        "",
        "- bits: bits per element of an upload / of a download as sent (fedavg sends float32).",
        "- final test accuracy / cross-entropy: at the last round the test set was evaluated"
        " (the round is shown when it is not the last).",
        "- cumulative uplink bits: the uplink bits charged over all rounds (`bits_up_cum`).",
        "- mean uploads per round: workers selected per round (`selcnt`), averaged over the rounds.",
        "- wall time: the whole `flq simulate` command (from `--walls`); `~` marks the sum of the"
        " round times when it was not given.",
        "",
        "Spreadsheets:",
        "",
    ]
    lines += [f"- {r.mode}: `{r.path.name}`" for r in runs]
    if figures:
        lines += ["", *[f"![{Path(f).stem}]({Path(f).name})" for f in figures[:1]]]
    return "\n".join(lines) + "\n"


def write_figures(runs: Sequence[RunResults], out: Path) -> List[Path]:
    """``comparison.png`` (2x2) and one PNG per panel in ``out``; returns them."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from flq.plots import draw_curves, run_labels

    labels = run_labels(runs)
    out.mkdir(parents=True, exist_ok=True)
    written: List[Path] = []

    def save(fig: Any, name: str) -> None:
        target = out / f"{name}.png"
        fig.savefig(target, format="png", metadata={"Software": None})
        written.append(target)

    fig = Figure(figsize=(13.0, 9.0), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2)
    for ax, (_, xcol, ycol, xlabel, ylabel, title, logx) in zip(axes.flat, PANELS):
        draw_curves(ax, runs, labels, xcol, ycol, xlabel, ylabel, title, logx=logx, legend=False)
    handles, names = axes.flat[0].get_legend_handles_labels()
    if handles:  # one legend for the four panels, below them
        fig.legend(handles, names, loc="outside lower center", ncol=min(len(handles), 4), fontsize="small")
    dataset = runs[0].config.get("dataset.name", "")
    rounds = max(int(np.nanmax(_num(r.curve["iter"]))) for r in runs)
    fig.suptitle(f"{dataset}: {', '.join(r.mode for r in runs)}, {rounds} rounds".lstrip(": "))
    save(fig, "comparison")
    for name, xcol, ycol, xlabel, ylabel, title, logx in PANELS:
        fig = Figure(figsize=(7.0, 4.5), dpi=100, layout="constrained")
        FigureCanvasAgg(fig)
        draw_curves(fig.add_subplot(1, 1, 1), runs, labels, xcol, ycol, xlabel, ylabel, title, logx=logx)
        save(fig, name)
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description="Figures (PNG) and a markdown results table from the published runs' spreadsheets.",
    )
    parser.add_argument("results", nargs="+", type=Path, help="flq_results_*.xlsx, one per mode")
    parser.add_argument("--out", type=Path, default=Path("docs/reproduction"), help="default docs/reproduction")
    parser.add_argument("--walls", type=Path, default=None, help="wall times: lines '<mode> rc=0 wall=<seconds>'")
    parser.add_argument("--machine", default=None, help="the machine the runs ran on, for the table")
    parser.add_argument("--print", dest="print_table", action="store_true", help="print the table to stdout")
    parser.add_argument("--no-write", action="store_true", help="write no files (with --print: only print)")
    args = parser.parse_args(argv)
    try:
        runs = load_runs(args.results)
        walls = parse_walls(args.walls) if args.walls is not None else None
    except ReportError as exc:
        print(f"reproduction_report: {exc}", file=sys.stderr)
        return 2
    table = results_table(runs, walls, args.machine)
    if args.print_table:
        sys.stdout.write(table if table.endswith("\n") else table + "\n")
    if not args.no_write:
        figures = write_figures(runs, args.out)
        report = args.out / "results.md"
        report.write_text(results_markdown(runs, table, [str(f) for f in figures]), encoding="utf-8")
        for path in [*figures, report]:
            print(f"wrote {path}", file=sys.stderr if args.print_table else sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
