"""A worker's own state on its own disk, so that a restarted ``flq worker``
goes on with its error-feedback residual, lazy clock, mirrors and random
streams instead of starting afresh (:meth:`flq.worker.Worker.state_dict`).

One file per worker id in the worker's state folder,
``<state_dir>/flq_worker_<m>.npz``, rewritten atomically
(:func:`flq.outputs.atomic_write`: a temporary, fsync, rename) after every
round the worker finished, so a SIGKILL mid-write leaves the previous state.
A NumPy ``.npz`` archive (never pickled; read with ``allow_pickle=False``):

- ``ref_up``, ``ref_down``, ``ef``: float32, shape (n,): the worker's halves
  of the mirrors and its error-feedback residual;
- ``batch_permutation``: int64, shape (samples of its share,), the current
  pass of its batch order (shape (0,) before the first batch);
- ``meta``: uint8, the UTF-8 bytes of one JSON object: ``format`` (1), the
  identity of the run (:data:`IDENTITY`: ``run``, the run id the master's
  ``GET /config`` gives, ``worker_id``, model size ``n``, ``mode``, ``b_up``,
  ``b_down``, ``seed``, ``total_workers``, ``dataset``, ``model``,
  ``model_args``, ``buffers``, ``batch_size``; the model's buffers, when it
  has any, are entries ``buffer_0``, ``buffer_1`` ... in their own dtypes),
  ``round`` (0-based index k of the last round finished),
  ``e_hat`` (float), ``clock``, ``up_version``, ``down_version`` (ints),
  ``rng`` (the uplink generator's ``bit_generator.state``), ``batches`` (the
  batch order's state without its permutation) and ``saved_at`` (UTC, ISO 8601).

At start the state is used only when it is of the same run and fits this
worker (:func:`mismatch`); otherwise, or when the file is unreadable, one log
line says why and the worker resynchronizes its mirrors from the master as
without a file. The restored mirror versions go to the master at
registration: equal versions mean equal mirrors (no resync), others make the
master answer ``resync``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from .outputs import one_line, read_archive, remove_stale_temporaries, write_archive

#: The largest round, clock or version a state file may hold (far beyond any run).
_MAX_COUNT = 2**53

log = logging.getLogger(__name__)

FORMAT = 1
#: Metadata that must equal this worker's for a saved state to be used.
IDENTITY = (
    "run",
    "worker_id",
    "n",
    "mode",
    "b_up",
    "b_down",
    "seed",
    "total_workers",
    "dataset",
    "model",
    "model_args",
    "buffers",
    "batch_size",
)
_VECTORS = ("ref_up", "ref_down", "ef")


class StateError(ValueError):
    """A state file that cannot be read or is not a worker state (one line)."""


def state_path(state_dir: str, worker_id: int) -> Path:
    """``<state_dir>/flq_worker_<worker_id>.npz``."""
    return Path(state_dir) / f"flq_worker_{int(worker_id)}.npz"


def identity(run: str, worker_id: int, cfg: Any, n: int) -> Dict[str, Any]:
    """The :data:`IDENTITY` fields of worker ``worker_id`` in run ``run`` with
    config ``cfg`` (a :class:`flq.config.Config`) and a model of ``n`` parameters."""
    return {
        "run": str(run),
        "worker_id": int(worker_id),
        "n": int(n),
        "mode": cfg.mode,
        "b_up": int(cfg.b_up),
        "b_down": int(cfg.b_down),
        "seed": int(cfg.seed),
        "total_workers": int(cfg.total_workers),
        "dataset": cfg.dataset,
        "model": cfg.model,
        "model_args": dict(cfg.model_args),
        "buffers": cfg.buffers,
        "batch_size": int(cfg.batch_size),
    }


def ef_digest(ef: np.ndarray) -> str:
    """SHA-256 (hex) of a residual's bytes as float32 little-endian, C order."""
    return hashlib.sha256(np.ascontiguousarray(ef, dtype="<f4").tobytes()).hexdigest()


def save_state(path: Path, state: Mapping[str, Any], ident: Mapping[str, Any], round_index: int) -> Path:
    """Write ``state`` (a :meth:`flq.worker.Worker.state_dict`), the run's
    ``ident`` (:func:`identity`) and ``round_index`` (0-based k of the round
    just finished) atomically to ``path`` (the folder is created).

    Raises:
        OSError: the file cannot be written (a full disk ...); the previous
            file at ``path`` is then intact and no temporary is left.
    """
    batches = dict(state["batches"])
    perm = batches.pop("permutation")
    arrays = {k: np.ascontiguousarray(state[k], dtype=np.float32) for k in _VECTORS}
    arrays["batch_permutation"] = np.asarray(perm if perm is not None else [], dtype=np.int64)
    for i, b in enumerate(state.get("buffers", ())):
        arrays[f"buffer_{i}"] = np.asarray(b)  # the model's buffers (kept local with buffers local)
    meta = {
        "format": FORMAT,
        **ident,
        "round": int(round_index),
        "e_hat": float(state["e_hat"]),
        "clock": int(state["clock"]),
        "up_version": int(state["up_version"]),
        "down_version": int(state["down_version"]),
        "rng": state["rng"],
        "batches": batches,
        "has_permutation": perm is not None,
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return write_archive(path, arrays, meta)


def read_state(path: Path) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Read a file of :func:`save_state`: ``(state for Worker.load_state_dict, meta)``.

    Raises:
        FileNotFoundError: no file at ``path``.
        StateError: unreadable (truncated, corrupt: the archive's CRCs do
            not match), another format, or arrays that are not float32 (n,)
            vectors with finite values.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no state file at {path}")
    try:
        meta, arrays = read_archive(path)
        if meta.get("format") != FORMAT:
            raise StateError(f"format {meta.get('format')} is not {FORMAT}")
        vectors = {k: arrays[k] for k in _VECTORS}
        perm = arrays["batch_permutation"]
        buffers = [arrays[f"buffer_{i}"] for i in range(sum(1 for k in arrays if k.startswith("buffer_")))]
    except StateError:
        raise
    except Exception as exc:  # any file at all may lie here: whatever it raises, it is not our state
        raise StateError(f"unreadable ({type(exc).__name__}: {one_line(exc)})") from None
    n = meta.get("n")
    for k, v in vectors.items():
        if v.dtype != np.float32 or v.shape != (n,) or not np.isfinite(v).all():
            raise StateError(f"entry {k} is not a finite float32 vector of the model's size {n}")
    if perm.dtype != np.int64 or perm.ndim != 1:
        raise StateError("entry batch_permutation is not an int64 vector")
    for key in ("round", "clock", "up_version", "down_version"):
        value = meta.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= _MAX_COUNT:
            raise StateError(f"metadata {key} {one_line(repr(value))[:40]} is not an integer 0..{_MAX_COUNT}")
    e_hat = meta.get("e_hat")
    if not isinstance(e_hat, (int, float)) or isinstance(e_hat, bool) or not math.isfinite(e_hat) or e_hat < 0:
        raise StateError(f"metadata e_hat {one_line(repr(e_hat))[:40]} is not a finite number >= 0")
    try:
        batches = dict(meta["batches"], permutation=perm if meta["has_permutation"] else None)
        state = {
            **vectors,
            "e_hat": float(e_hat),
            "clock": meta["clock"],
            "up_version": meta["up_version"],
            "down_version": meta["down_version"],
            "rng": dict(meta["rng"]),
            "batches": batches,
            "buffers": buffers,
        }
    except (KeyError, TypeError, ValueError) as exc:
        raise StateError(f"incomplete metadata ({type(exc).__name__}: {one_line(exc)})") from None
    return state, meta


def mismatch(meta: Mapping[str, Any], ident: Mapping[str, Any], master_round: Optional[int] = None) -> str:
    """Why a saved state does not fit this worker ('' when it does): the
    first :data:`IDENTITY` field that differs, or a ``round`` after
    ``master_round`` (the master's current round, 0-based: it went back to
    an older checkpoint, so its mirrors may have moved along another path)."""
    if not ident.get("run"):
        return "the master gives no run id"
    for key in IDENTITY:
        if meta.get(key) != ident.get(key):
            return f"it is of {key} {meta.get(key)!r}, this worker's is {ident.get(key)!r}"
    if master_round is not None and meta["round"] > master_round:
        return (
            f"it is of round {int(meta['round']) + 1}, after the master's round {int(master_round) + 1} "
            f"(the master resumed from an older checkpoint?)"
        )
    return ""


class WorkerStateStore:
    """The state file of one ``flq worker`` process: restores it at start
    (:meth:`restore`) and rewrites it after each round (:meth:`save`).

    Args:
        state_dir: the worker's state folder (created at the first save).
        worker_id: m.
    """

    def __init__(self, state_dir: str, worker_id: int) -> None:
        self.path = state_path(state_dir, worker_id)
        self.worker_id = int(worker_id)
        self.ident: Dict[str, Any] = {}
        self._last_error = ""
        self._writer: Optional[threading.Thread] = None
        try:
            remove_stale_temporaries(self.path.parent)  # left by a process killed mid-write
        except OSError as exc:
            log.warning("worker %d: cannot look into %s: %s", self.worker_id, self.path.parent, one_line(exc))

    def restore(self, worker: Any, ident: Mapping[str, Any], master_round: Optional[int] = None) -> bool:
        """Load the saved state into ``worker`` (a :class:`flq.worker.Worker`)
        when it fits (:func:`mismatch`); log one line either way. ``ident``
        (:func:`identity`) is also what later saves are marked with.

        Returns:
            True when loaded; False (worker untouched) when there is no file,
            it is unreadable, or it is of another run or worker. A master
            that gives no run id: False, and :meth:`save` writes nothing.
        """
        self.ident = dict(ident)
        m = self.worker_id
        if not self.ident.get("run"):
            log.warning("worker %d: the master gives no run id: the worker's state is neither loaded nor kept", m)
            return False
        try:
            state, meta = read_state(self.path)
        except FileNotFoundError:
            log.info("worker %d: no saved state at %s: mirrors from the master", m, self.path)
            return False
        except StateError as exc:
            log.warning("worker %d: saved state %s not used: %s; resynchronizing from the master", m, self.path, exc)
            return False
        why = mismatch(meta, self.ident, master_round)
        if why:
            log.warning("worker %d: saved state %s not used: %s; resynchronizing from the master", m, self.path, why)
            return False
        before = worker.state_dict()
        try:
            worker.load_state_dict(state)
        except Exception as exc:  # a generator or batch state this build cannot take
            worker.load_state_dict(before)
            log.warning(
                "worker %d: saved state %s not used: it does not fit this worker (%s); resynchronizing from the master",
                m,
                self.path,
                one_line(exc),
            )
            return False
        log.info(
            "worker %d: state of round %d loaded from %s (up v%d, down v%d, clock %d, ef sha256 %s)",
            m,
            int(meta["round"]) + 1,
            self.path,
            worker.up_version,
            worker.down_version,
            worker.clock,
            ef_digest(worker.ef),
        )
        return True

    def save_later(self, worker: Any, round_index: int) -> None:
        """:meth:`save` off the round's critical path: the state is copied
        now (:meth:`flq.worker.Worker.state_dict`) and written by a
        background thread while the worker waits for the next round. At
        most one write is in flight: a second call first waits for the
        previous one (one file write, ~50 ms). :meth:`flush` waits for it.
        A process killed before the write ends leaves the previous file,
        which the master's version check on the next offer tells apart (a
        resynchronization, never a wrong mirror)."""
        self.flush()
        if not self.ident.get("run"):
            return
        state = worker.state_dict()
        self._writer = threading.Thread(
            target=self._write, args=(state, round_index), name=f"state-{self.worker_id}", daemon=True
        )
        self._writer.start()

    def flush(self) -> None:
        """Wait for the write :meth:`save_later` started, if any (bounded by one file write)."""
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.join()

    def save(self, worker: Any, round_index: int) -> bool:
        """Write ``worker``'s state after round ``round_index`` (0-based). A
        failure (a full disk) is logged, once per distinct reason, and the
        previous file stays; it never ends the worker.

        Returns:
            True when written.
        """
        self.flush()
        if not self.ident.get("run"):
            return False
        return self._write(worker.state_dict(), round_index)

    def _write(self, state: Mapping[str, Any], round_index: int) -> bool:
        try:
            save_state(self.path, state, self.ident, round_index)
        except OSError as exc:
            reason = one_line(exc)
            if reason != self._last_error:
                log.error(
                    "worker %d: state after round %d not written to %s: %s; %s",
                    self.worker_id,
                    round_index + 1,
                    self.path,
                    reason,
                    "the previous one is kept" if self.path.is_file() else "a restart will resync from the master",
                )
            self._last_error = reason
            return False
        if self._last_error:
            log.info("worker %d: state written again to %s", self.worker_id, self.path)
        self._last_error = ""
        return True
