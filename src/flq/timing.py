"""Wall-clock accounting of where a round's time goes (seconds)."""

from __future__ import annotations

import contextlib
import os
import time
from typing import Dict, Iterator, Optional


class Stopwatch:
    """Accumulates seconds per named section: ``with sw.section("compute"): ...``."""

    def __init__(self) -> None:
        self.totals: Dict[str, float] = {}

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - t0

    def add(self, seconds: Dict[str, float]) -> None:
        """Add seconds per section measured elsewhere (another process's :meth:`take`)."""
        for name, sec in seconds.items():
            self.totals[name] = self.totals.get(name, 0.0) + sec

    def take(self) -> Dict[str, float]:
        """Return the totals so far and start again from zero."""
        out, self.totals = self.totals, {}
        return out


#: A stopwatch that records nothing, for callers that do not measure.
class NullStopwatch(Stopwatch):
    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        yield


def process_age_s() -> Optional[float]:
    """Seconds since this process started (its exec, interpreter start-up
    and imports included), from Linux's ``/proc``; None elsewhere."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
