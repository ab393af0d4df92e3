"""A folder on a nearly full disk, for tests of what a run does when a write
fails: a tmpfs of a few KiB when this process may mount (root, as in CI),
otherwise a file-size limit (RLIMIT_FSIZE: a write past it fails with
EFBIG, as a write to a full disk fails with ENOSPC) for this process while
inside, and for the processes started with :attr:`Disk.preexec`."""

from __future__ import annotations

import contextlib
import os
import resource
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional


@dataclass
class Disk:
    path: Path
    kib: int
    mounted: bool

    @property
    def preexec(self) -> Optional[Callable[[], None]]:
        """For ``subprocess.Popen(preexec_fn=...)``: the file-size limit, when
        no tmpfs could be mounted (None otherwise)."""
        if self.mounted:
            return None
        limit = self.kib * 1024
        return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))


def _try_mount(path: Path, kib: int) -> bool:
    if os.geteuid() != 0:
        return False
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


@contextlib.contextmanager
def disk(path: Path, kib: int) -> Iterator[Disk]:
    """A folder ``path`` where only about ``kib`` KiB fit (see the module docstring)."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = _try_mount(path, kib)
    try:
        yield Disk(path, kib, mounted)
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


@contextlib.contextmanager
def tiny_disk(path: Path, kib: int) -> Iterator[Path]:
    """:func:`disk` for writes from this very process (the file-size limit, if
    used, applies to this process while inside)."""
    with disk(path, kib) as d:
        if d.mounted:
            yield d.path
            return
        old = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (kib * 1024, old[1]))
        try:
            yield d.path
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, old)
