"""Log files of SYSTEM.md: ``logs/<role>_<timestamp>.log`` (``master``,
``worker<id>``, ``simulate_<mode>``), plus the console."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional

from .outputs import claim_unique

#: ``log.error(..., extra=FILE_ONLY)``: to the log file only, for a message
#: the command line reports itself in one line on stderr.
FILE_ONLY = {"file_only": True}


def setup_logging(
    log_dir: str, role: str, level: str = "INFO", verbose: bool = False, console_level: Optional[str] = None
) -> Path:
    """Send the ``flq`` loggers to a new timestamped file in ``log_dir`` and to stderr.

    Args:
        log_dir: folder for the file (created).
        role: file-name prefix, e.g. ``"master"`` or ``"worker3"``.
        level: file log level; ``verbose`` forces DEBUG everywhere.
        console_level: stderr level (default: the file level).

    Returns:
        The log file's path: ``<role>_<YYYYmmdd_HHMMSS>.log``, or
        ``..._2.log`` and so on when another process started in the same
        second (no two processes share a log).
    """
    stamp = time.strftime("%Y%m%d_%H%M%S")
    path = claim_unique(Path(log_dir) / f"{role}_{stamp}.log")
    file_level = "DEBUG" if verbose else level
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger("flq")
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    fh = logging.FileHandler(path, encoding="utf-8")
    fh.setFormatter(fmt)
    fh.setLevel(file_level)
    ch = logging.StreamHandler()
    ch.addFilter(lambda record: not getattr(record, "file_only", False))
    ch.setFormatter(fmt)
    ch.setLevel("DEBUG" if verbose else (console_level or file_level))
    root.addHandler(fh)
    root.addHandler(ch)
    root.setLevel("DEBUG")
    root.propagate = False
    return path
