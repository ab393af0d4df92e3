"""What a run leaves on disk, written so that no two runs share a file and no
crash leaves half a file behind.

- :func:`claim_unique`: a file name no other run holds (``name.ext``, else
  ``name_2.ext``, ``name_3.ext`` ...), claimed by creating it exclusively, so
  two runs started in the same second get two logs; :func:`publish_unique`
  does the same for a finished file (a spreadsheet), which appears under its
  name complete or not at all.
- :func:`atomic_write`: write to ``.NAME.<pid>.tmp`` in the same folder,
  fsync, then rename over the target; on any failure the temporary is
  removed and the target is untouched.
- :func:`remove_stale_temporaries`: temporaries whose writer process no
  longer exists (it was SIGKILLed mid-write) are deleted at the next start.
- :class:`FileLock`: an advisory ``flock`` held for a process's lifetime (a
  master's checkpoint), so a second process can tell the file is in use.
- :func:`save_run`: a run's spreadsheet and final model, with a one-line
  reason when they cannot be written (a full disk).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

log = logging.getLogger(__name__)

_TMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.tmp$")


def _numbered(path: Path, n: int) -> Path:
    """``path`` for n = 1, else ``stem_n.suffix`` beside it."""
    return path if n == 1 else path.with_name(f"{path.stem}_{n}{path.suffix}")


def claim_unique(path: Path) -> Path:
    """Create ``path`` exclusively (empty), or the first free ``stem_N.suffix``
    (N = 2, 3, ...) beside it; return the path claimed. Parent folders are
    created.

    Raises:
        OSError: the folder cannot be created or written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 1
    while True:
        try:
            fd = os.open(_numbered(path, n), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            n += 1
            continue
        os.close(fd)
        return _numbered(path, n)


def temporary_for(path: Path) -> Path:
    """The temporary file this process fills before it becomes ``path``."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _filled_temporary(path: Path, write: Callable[[Path], None], mode: int) -> Path:
    """``write(tmp)`` into :func:`temporary_for` ``path`` (folder created), fsync
    and chmod it; on any failure remove it and raise."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_for(path)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
    except BaseException:
        _remove(tmp)
        raise
    return tmp


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def publish_unique(path: Path, write: Callable[[Path], Any]) -> Path:
    """Fill a temporary with ``write(tmp)``, then give it the first free name
    of ``path``, ``stem_2.suffix``, ... (a hard link: atomic and exclusive, so
    the file is never seen half written, no empty placeholder is ever left,
    and two runs never take one name).

    Raises:
        OSError: the folder or the file cannot be written; nothing is left.
    """
    path = Path(path)
    tmp = _filled_temporary(path, write, 0o644)
    try:
        n = 1
        while True:
            try:
                os.link(tmp, _numbered(path, n))
                return _numbered(path, n)
            except FileExistsError:
                n += 1
            except OSError:  # a file system without hard links (FAT): claim the name, then rename onto it
                claimed = claim_unique(_numbered(path, n))
                os.replace(tmp, claimed)
                return claimed
    finally:
        _remove(tmp)


def atomic_write(path: Path, write: Callable[[Path], Any], mode: int = 0o644) -> Path:
    """Call ``write(tmp)`` to fill a temporary beside ``path``, fsync it and
    rename it to ``path`` (atomic on POSIX). The parent folder is created.

    Raises:
        OSError: any failure to write (ENOSPC, EFBIG, EACCES ...); the
            temporary is removed and ``path`` keeps its old content.
    """
    path = Path(path)
    tmp = _filled_temporary(path, write, mode)
    try:
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    return path


def write_archive(
    path: Path, arrays: Mapping[str, Any], meta: Mapping[str, Any], default: Optional[Callable[[Any], Any]] = None
) -> Path:
    """Write ``arrays`` and the JSON ``meta`` (its entry ``meta``, UTF-8
    bytes) as one uncompressed NumPy ``.npz`` at ``path``, atomically
    (:func:`atomic_write`). ``default`` is :func:`json.dumps`'s.

    Raises:
        OSError: cannot be written; the previous file stays, no temporary is left.
    """
    entries = dict(arrays)
    entries["meta"] = np.frombuffer(json.dumps(meta, default=default).encode(), dtype=np.uint8)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **entries)

    return atomic_write(Path(path), write)


def read_archive(path: Path) -> Tuple[Dict[str, Any], Dict[str, np.ndarray]]:
    """Read a file of :func:`write_archive`: ``(meta, {name: array})``, with
    pickles refused.

    Raises:
        OSError: cannot be read. ValueError (``zipfile.BadZipFile`` too, and
            JSON errors): not such an archive, truncated or corrupt, or its
            ``meta`` is not a JSON object. KeyError: no ``meta`` entry.
    """
    with open(path, "rb") as f:
        z = np.load(f, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise ValueError("not an .npz archive")
        with z:
            meta = json.loads(bytes(z["meta"]).decode())
            arrays = {k: z[k] for k in z.files if k != "meta"}
    if not isinstance(meta, dict):
        raise ValueError("its meta is not a JSON object")
    return meta, arrays


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(folder: Path) -> List[Path]:
    """Delete the ``.NAME.<pid>.tmp`` files in ``folder`` whose process is gone.

    Returns:
        The files removed (nothing when the folder does not exist).
    """
    folder = Path(folder)
    removed: List[Path] = []
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        m = _TMP.match(p.name)
        if m and not _pid_alive(int(m.group("pid"))):
            try:
                p.unlink()
                removed.append(p)
            except OSError:
                pass
    if removed:
        log.info("removed %d temporary file(s) left by a killed process in %s", len(removed), folder)
    return removed


class FileLock:
    """An exclusive advisory lock on ``path`` (created), held until
    :meth:`release` or the process exits.

    Raises:
        BlockingIOError: another process holds it.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd: Optional[int] = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._fd)
            self._fd = None
            raise BlockingIOError(errno.EWOULDBLOCK, f"{self.path} is locked by another process") from None
        os.ftruncate(self._fd, 0)
        os.write(self._fd, str(os.getpid()).encode())

    @staticmethod
    def held(path: Path) -> bool:
        """Whether another process holds the lock on ``path`` now."""
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        finally:
            os.close(fd)
        return False

    def release(self) -> None:
        """Unlock and remove the lock file."""
        if self._fd is not None:
            try:
                self.path.unlink()
            except OSError:
                pass
            os.close(self._fd)
            self._fd = None


def one_line(exc: BaseException) -> str:
    """``exc`` as one line: ``strerror: filename`` for OS errors, else its text."""
    if isinstance(exc, OSError) and exc.strerror:
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{exc.strerror}{where}"
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def save_run(
    results_path: Path,
    mode: str,
    records: Sequence[Mapping[str, Any]],
    config: Mapping[str, Any],
    selected: Sequence[Sequence[int]],
    num_workers: int,
    model_state: Mapping[str, Any],
    rounds: int,
) -> Tuple[Optional[Path], Optional[str]]:
    """Write a run's spreadsheet at a unique path derived from ``results_path``
    (:func:`publish_unique`) and its final model beside it (``.safetensors``
    of ``model_state``, a state dict: :func:`flq.model.state_dict_from_flat`).

    Returns:
        ``(spreadsheet path or None, None)`` when both were written, or
        ``(path or None, one-line reason)`` when either could not be, for
        whatever reason (a full disk, a bad folder name ...): a spreadsheet
        already written is kept; a partial file never is.
    """
    from .model import save_global_model
    from .results import results_workbook

    try:
        workbook = results_workbook(mode, records, config, selected=selected, num_workers=num_workers)
        path = publish_unique(Path(results_path), lambda tmp: tmp.write_bytes(workbook))
    except Exception as exc:  # noqa: BLE001 - reported in one line, never a lost run in silence
        return None, f"results not written to {Path(results_path).parent}: {_describe(exc)}"
    try:
        save_global_model(path.with_suffix(".safetensors"), model_state, rounds, mode)
    except Exception as exc:  # noqa: BLE001
        return path, f"final model not written beside {path.name}: {_describe(exc)} (the spreadsheet was)"
    return path, None


def _describe(exc: BaseException) -> str:
    return one_line(exc) if isinstance(exc, OSError) else f"{type(exc).__name__}: {one_line(exc)}"


def results_config(cfg: Any, reason: str, detail: str = "", **runtime: Any) -> Dict[str, Any]:
    """What a spreadsheet's ``config`` sheet holds: the run's config
    (:meth:`flq.config.Config.public_sections`, secrets masked), how it ended
    (``run.end``, ``run.detail``: :mod:`flq.outcome`), and the ``runtime``
    it ran with: PyTorch's version and thread count (the simulator and the
    cluster agree bit for bit only at the same thread count) plus ``runtime``."""
    import torch

    out: Dict[str, Any] = dict(cfg.public_sections())
    out["run"] = {"end": reason, "detail": detail}
    out["runtime"] = {"torch": torch.__version__, "threads": torch.get_num_threads(), **runtime}
    return out
