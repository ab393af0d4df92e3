"""The ``flq`` command: ``simulate``, ``plot`` (and the cluster commands).

Every config key is also a flag (``--mode``, ``--b_up``, ``--total_workers``
...), with the short aliases ``--rounds`` and ``--workers``; flags override
the config file. Errors in the config or the data stop the program with one
line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from .config import ConfigError, field_specs, load_config

log = logging.getLogger("flq.cli")

DEFAULT_CONFIG = "flq_config.json"


def _bool(text: str) -> bool:
    t = text.lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def add_config_flags(p: argparse.ArgumentParser) -> None:
    """``--config`` plus one flag per config key (string values are validated later)."""
    p.add_argument("--config", default=None,
                   help=f"JSON config file (default: ./{DEFAULT_CONFIG} when it exists)")
    g = p.add_argument_group("config overrides (each is also a key of flq_config.json)")
    for name, default, kind, help_text in field_specs():
        flags = [f"--{name}"]
        if name == "max_rounds":
            flags += ["--rounds", "--iters"]
        if name == "total_workers":
            flags += ["--workers"]
        g.add_argument(*flags, dest=f"cfg_{name}", default=None, metavar=kind.upper(),
                       help=help_text)


def overrides_from(args: argparse.Namespace) -> Dict[str, Any]:
    return {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg_") and v is not None}


def config_from(args: argparse.Namespace):
    path = args.config
    if path is None and Path(DEFAULT_CONFIG).is_file():
        path = DEFAULT_CONFIG
    return load_config(path, overrides_from(args))


def cmd_simulate(args: argparse.Namespace) -> int:
    from .logs import setup_logging
    from .simulate import simulate

    cfg = config_from(args)
    logfile = setup_logging(cfg.log_dir, f"simulate_{cfg.mode}", cfg.log_level, args.verbose,
                            console_level="WARNING")
    result = simulate(cfg, write=True, progress=not args.no_progress)
    last = next((r for r in reversed(result.records) if r["acc"] == r["acc"]), None)
    if last is not None:
        print(f"final: round {last['iter']} test accuracy {last['acc']:.4f} "
              f"cross-entropy {last['entropy']:.4f} cumulative bits {last['cum_bits_total']:.4g}")
    if result.results_path is not None:
        print(f"results: {result.results_path}")
    print(f"log: {logfile}")
    if args.plot and result.results_path is not None:
        from .results import plot_results

        out = Path(args.plot_dir or Path(cfg.results_dir) / "plots")
        for p in plot_results([result.results_path], out):
            print(f"plot: {p}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from .results import plot_results

    paths = [Path(p) for p in args.results]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ConfigError(f"no such results file: {', '.join(missing)}")
    for p in plot_results(paths, Path(args.out)):
        print(p)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flq", description="FLQ-Fed: federated learning with low-bit, "
                                     "lazy, budgeted communication")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("simulate", help="run all workers in one process")
    add_config_flags(p)
    p.add_argument("--verbose", action="store_true", help="debug logging")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--plot", action="store_true", help="also write the figures of this run")
    p.add_argument("--plot-dir", default=None, help="where --plot writes (default RESULTS_DIR/plots)")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("plot", help="figures comparing runs from their spreadsheets")
    p.add_argument("results", nargs="+", help="flq_results_*.xlsx files")
    p.add_argument("--out", default="results/plots", help="output folder (default results/plots)")
    p.set_defaults(func=cmd_plot)

    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"flq: config error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("flq: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one line for expected failures (missing data, bad device)
        from .data import DatasetError

        if isinstance(exc, (DatasetError, RuntimeError, OSError)):
            print(f"flq: error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    raise SystemExit(main())
