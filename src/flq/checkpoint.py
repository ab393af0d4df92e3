"""Master checkpoints: the whole :meth:`flq.master.Master.state_dict` (model,
Adam moments, history, per-worker mirrors and versions, round, generator
states, records) in one ``.npz`` file, written atomically.

Arrays go in as arrays (the mirrors as one (M, n) array each); everything
else as one JSON document in the entry ``meta``, with the run's config so a
resume can refuse a checkpoint of a different run.

Each run has its own file, ``flq_master_<dataset>_<mode>_<run>.npz`` (``run``
is the master's start time, made unique), and holds a lock on
``<file>.lock`` while it runs, so two masters sharing a ``checkpoint_dir``
never share a checkpoint and ``--resume`` never picks one that a running
master still writes.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from .outputs import FileLock, read_archive, write_archive

ARRAYS = ("theta", "ref_up", "ref_down")
FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or of another run (one line)."""


def checkpoint_path(checkpoint_dir: str, dataset: str, mode: str, run: str) -> Path:
    """``<checkpoint_dir>/flq_master_<dataset>_<mode>_<run>.npz``: run ``run``'s checkpoint."""
    return Path(checkpoint_dir) / f"flq_master_{dataset}_{mode}_{run}.npz"


def run_of(checkpoint: Path, dataset: str, mode: str) -> str:
    """The run a checkpoint belongs to: ``<run>`` of :func:`checkpoint_path`'s
    name (the file's stem when it is named otherwise)."""
    stem, prefix = Path(checkpoint).stem, f"flq_master_{dataset}_{mode}_"
    return stem[len(prefix) :] if stem.startswith(prefix) and len(stem) > len(prefix) else stem


def lock_path(checkpoint: Path) -> Path:
    """The lock file a running master holds for ``checkpoint``."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.name + ".lock")


def lock_checkpoint(checkpoint: Path) -> FileLock:
    """Hold ``checkpoint``'s lock for this process's lifetime.

    Raises:
        CheckpointError: another running master holds it.
    """
    try:
        return FileLock(lock_path(checkpoint))
    except BlockingIOError:
        raise CheckpointError(f"{checkpoint} is in use by another running master") from None


def find_resumable(checkpoint_dir: str, dataset: str, mode: str, explicit: Optional[str] = None) -> Path:
    """The checkpoint ``--resume`` continues: ``explicit`` when given, else the
    newest ``flq_master_<dataset>_<mode>*.npz`` in ``checkpoint_dir`` that no
    running master holds.

    Raises:
        CheckpointError: none there (naming what is there instead), or the
            explicit file is missing or in use.
    """
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise CheckpointError(f"no checkpoint at {path} (nothing to resume)")
        if FileLock.held(lock_path(path)):
            raise CheckpointError(f"{path} is in use by another running master")
        return path
    folder = Path(checkpoint_dir)
    found = (
        sorted(folder.glob(f"flq_master_{dataset}_{mode}*.npz"), key=lambda p: p.stat().st_mtime, reverse=True)
        if folder.is_dir()
        else []
    )
    free = [p for p in found if not FileLock.held(lock_path(p))]
    if free:
        return free[0]
    if found:
        raise CheckpointError(f"every checkpoint of {dataset}/{mode} in {folder} is in use by a running master")
    others = sorted(p.name for p in folder.glob("flq_master_*.npz")) if folder.is_dir() else []
    hint = f"; there: {', '.join(others)} (another dataset or mode?)" if others else ""
    raise CheckpointError(f"no checkpoint of {dataset}/{mode} in {folder} (nothing to resume){hint}")


def save_checkpoint(
    path: Path, state: Mapping[str, Any], config: Mapping[str, Any], model: Optional[bytes] = None
) -> Path:
    """Write ``state`` (a Master state_dict) and ``config`` atomically to
    ``path``; ``model``: the global model as a safetensors file's bytes (every
    tensor in the module's own dtype and shape, as ``GET /get_global_model``
    sends it), stored as the uint8 array ``model``.

    Raises:
        OSError: the file cannot be written (a full disk); the previous
            checkpoint at ``path`` is then intact and no temporary is left.
    """
    path = Path(path)
    arrays = {
        "theta": np.asarray(state["theta"], np.float32),
        "ref_up": np.stack(state["ref_up"]).astype(np.float32, copy=False),
        "ref_down": np.stack(state["ref_down"]).astype(np.float32, copy=False),
        "adam_m": np.asarray(state["adam"]["m"], np.float32),
        "adam_v": np.asarray(state["adam"]["v"], np.float32),
    }
    for i, b in enumerate(state.get("buffers", ())):
        arrays[f"buffer_{i}"] = np.asarray(b)  # its own dtype and shape
    if model is not None:
        arrays["model"] = np.frombuffer(model, np.uint8)
    meta = {k: v for k, v in state.items() if k not in ARRAYS and k not in ("adam", "buffers")}
    meta["adam"] = {"t": state["adam"]["t"], "lr": state["adam"]["lr"]}
    meta["format"] = FORMAT
    meta["config"] = dict(config)
    return write_archive(path, arrays, meta, default=_json_default)


def load_checkpoint(path: Path) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Read a checkpoint: ``(master state_dict, config it was written with)``.

    Raises:
        CheckpointError: missing or unreadable file, or an unknown format.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path} (nothing to resume)")
    try:
        meta, z = read_archive(path)
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"{path}: checkpoint format {meta.get('format')} is not {FORMAT}")
        state = dict(meta)
        config = state.pop("config")
        state["theta"] = z["theta"]
        state["ref_up"] = list(z["ref_up"])
        state["ref_down"] = list(z["ref_down"])
        state["adam"] = {"m": z["adam_m"], "v": z["adam_v"], "t": meta["adam"]["t"], "lr": meta["adam"]["lr"]}
        count = sum(1 for name in z if name.startswith("buffer_"))
        state["buffers"] = [z[f"buffer_{i}"] for i in range(count)]
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile, EOFError) as exc:
        raise CheckpointError(f"{path}: unreadable checkpoint ({exc})") from None
    return state, config


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"cannot store {type(o).__name__} in a checkpoint")
